"""The example scripts run end to end with --tiny (random tensors, a few seconds each on CPU)."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
RESULT = r"\d+\.\d\d ± \d+\.\d\d"  # EvalResult's "mean ± std"


def run_example(name: str, *args: str, extra_path: Path | None = None, timeout: int = 300) -> str:
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", "1")  # tiny tensors gain nothing from threads; avoids oversubscribed CPUs
    if extra_path is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(extra_path), env.get("PYTHONPATH", "")]))
    proc = subprocess.run(
        [sys.executable, str(EXAMPLES / name), *args],
        capture_output=True, text=True, timeout=timeout, env=env, cwd=EXAMPLES.parent,
    )
    assert proc.returncode == 0, f"{name} exited with {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
    return proc.stdout


def test_evaluate_synthetic_set_tiny() -> None:
    out = run_example("evaluate_synthetic_set.py", "--tiny")
    assert "teacher ConvNet: features 128x2x2 at 'features'" in out
    assert "teacher ConvNetW512: features 512x2x2 at 'features'" in out
    assert "| model | baseline | ELF | gain |" in out, out
    assert re.search(rf"^\| ConvNetBN \| {RESULT} \| {RESULT} \| [+-]\d+\.\d\d \|$", out, re.M), out
    assert re.search(rf"^\| ResNet18BN \| {RESULT} \| {RESULT} \| [+-]\d+\.\d\d \|$", out, re.M), out


def test_custom_architecture_tiny() -> None:
    out = run_example("custom_architecture.py", "--tiny")
    assert "teacher ConvNet features: 128x4x4" in out
    assert re.search(r"^\s+stage3\s+128x4x4\s+<- matches the teacher$", out, re.M), out
    assert "split point: stage3" in out
    assert re.search(rf"^SmallCNN baseline: {RESULT}$", out, re.M), out
    assert re.search(rf"^SmallCNN ELF:\s+{RESULT}$", out, re.M), out
    assert re.search(r"front [1-9]\d*\.\d", out), "the ELF feature term should be active"


def test_torchvision_model_tiny() -> None:
    out = run_example("torchvision_model.py", "--tiny")
    assert "teacher ConvNetW256D4 features: 256x2x2" in out
    assert re.search(r"^\s+layer3\s+256x2x2\s+<- matches the teacher$", out, re.M), out
    assert re.search(r"^\s+layer4\s+512x1x1$", out, re.M), out
    assert "split point: layer3" in out
    assert re.search(rf"^torchvision\.resnet18 ELF:\s+{RESULT}$", out, re.M), out


def _timm_installed() -> bool:
    if importlib.util.find_spec("timm") is None:
        return False
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def test_timm_model_tiny() -> None:
    """Passes with and without timm; the ELF result is checked only when timm is importable."""
    out = run_example("timm_model.py", "--tiny")
    if not _timm_installed():
        assert "timm is not installed" in out
        pytest.skip("timm is not installed: only the no-timm path of examples/timm_model.py was checked")
    assert "teacher ConvNet features: 128x4x4" in out
    assert "split point: layer2" in out
    assert re.search(rf"^timm\.resnet18 baseline: {RESULT}$", out, re.M), out
    assert re.search(rf"^timm\.resnet18 ELF:\s+{RESULT}$", out, re.M), out


def test_timm_model_without_timm(tmp_path: Path) -> None:
    """With timm hidden (an importable stub that raises ImportError), the example explains and exits 0."""
    stub = tmp_path / "timm"
    stub.mkdir()
    (stub / "__init__.py").write_text('raise ImportError("timm hidden by the test")\n')
    out = run_example("timm_model.py", "--tiny", extra_path=tmp_path)
    assert "timm is not installed" in out
    assert "ELF" not in out.replace("elf-dd", "")


def test_my_models_plugin_module_on_the_command_line() -> None:
    """examples/my_models.py registers a custom CNN and a torchvision model with default cuts of the shapes its
    docs promise (128x4x4 and 512x4x4 at 32x32), for `elf ... --import examples/my_models.py`."""
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = {}
    for model, shape in (("SmallCNN", "128x4x4"), ("CifarResNet18", "512x4x4")):
        proc = subprocess.run([sys.executable, "-m", "elf", "split-points", model, "--import", "examples/my_models.py",
                               "--shape", shape], capture_output=True, text=True, timeout=300, env=env, cwd=EXAMPLES.parent)
        assert proc.returncode == 0, proc.stderr
        out[model] = proc.stdout
    assert re.search(r"^\s+stage3\s+128x4x4  <- default ELF point$", out["SmallCNN"], re.M), out["SmallCNN"]
    assert re.search(r"^\s+layer4\.0\s+512x4x4  <- default ELF point$", out["CifarResNet18"], re.M), out["CifarResNet18"]
