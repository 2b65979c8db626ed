"""`elf demo` on the bundled assets: present in the package, consistent, and the main job runs with no download."""

from __future__ import annotations

import json

import pytest
import torch

from elf.cli import main
from elf.demo import ASSETS, asset_path, demo_info
from elf.fileio import file_sha256, load_tensors
from elf.io import load_synthetic


def test_assets_are_bundled_and_match_their_record() -> None:
    info = demo_info()
    for name in ASSETS[:3]:
        assert info["files_sha256"][name] == file_sha256(asset_path(name)), name
    sset = load_synthetic(asset_path("demo_set.safetensors"))
    assert sset.images.shape == (100, 3, 32, 32) and sset.ipc == 10 and sset.metadata["method"] == "dm"
    test, _ = load_tensors(asset_path("demo_test.safetensors"))
    assert test["images"].dtype == torch.uint8 and test["images"].shape == (1000, 3, 32, 32)
    assert torch.bincount(test["labels"]).tolist() == [100] * 10
    accs = info["teacher"]["test_accuracy_per_epoch"]
    assert accs[str(info["teacher"]["epochs"])] > 50  # a real teacher, not a random one


def test_demo_runs_offline(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--epochs", "2", "--runs", "1", "--no-progress", "--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "| ConvNetBN |" in out and "±" in out


def test_demo_info(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["demo", "--info"]) == 0
    assert json.loads(capsys.readouterr().out)["synthetic_set"]["method"] == "DM"


def test_shipped_files_record_no_machine_paths() -> None:
    """Docs and the bundled asset record name paths relative to the repository or the user's input, never the
    absolute paths of the machine that wrote them."""
    import re
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    pattern = re.compile(r"[\"'(\s]/(work|home|root|tmp|Users)/")
    files = sorted((root / "docs").glob("*.md")) + sorted((root / "elf" / "assets").glob("*.json")) + [root / "README.md"]
    offenders = [f"{f.relative_to(root)}:{i}" for f in files for i, line in enumerate(f.read_text().splitlines(), 1)
                 if pattern.search(line)]
    assert not offenders, offenders


def test_make_demo_assets_records_relative_paths() -> None:
    import importlib.util
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    spec = importlib.util.spec_from_file_location("make_demo_assets", root / "benchmarks" / "make_demo_assets.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    got = mod.portable_settings({"data": str(root.parent / "shared" / "x.tar.gz"), "out": str(root / "elf" / "assets"),
                                 "teacher_dir": "runs/t", "seed": 0})
    assert got["data"] == "../shared/x.tar.gz" and got["out"] == "elf/assets" and got["seed"] == 0
    assert not Path(got["teacher_dir"]).is_absolute()


def test_load_demo_assets_from_python() -> None:
    from elf import FeatureBank
    from elf.demo import load_demo_assets

    demo = load_demo_assets()
    assert demo.synthetic.images.shape == (100, 3, 32, 32) and demo.test_images.dtype == torch.float32
    assert demo.test_images.shape == (1000, 3, 32, 32) and torch.bincount(demo.test_labels).tolist() == [100] * 10
    assert abs(float(demo.test_images.mean())) < 1.0  # normalized, not 0-255 or 0-1
    bank = FeatureBank.build(demo.teacher, demo.synthetic)
    same = FeatureBank.from_checkpoint(asset_path("demo_teacher.safetensors"), "ConvNet", demo.synthetic, num_classes=10)
    assert bank.shape == (128, 4, 4) and torch.equal(bank.features, same.features)
    assert demo.info["synthetic_set"]["method"] == "DM"
