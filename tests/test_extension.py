"""Custom architectures end to end (issue #10): registration with a default cut, plugins for the CLI and studies,
and one SplitOptions value (leaf modules, autowrap functions) that reaches every trace."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from torch import nn

import elf
from elf import ELFError, ELFTrainer, FeatureBank, SplitOptions, create_model, list_split_points, register_model
from elf.cli import main
from elf.data import CIFAR10_MTT
from elf.io import SyntheticSet, save_synthetic
from elf.models import registry


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test registers into a copy of the global registry."""
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))


class Gate(nn.Module):
    """Data-dependent control flow: torch.fx cannot trace into it (it must be a leaf module)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # a Python branch on a tensor value
            return torch.relu(x)
        return x


class GatedNet(nn.Module):
    def __init__(self, channel: int = 3, num_classes: int = 10, width: int = 8) -> None:
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(channel, width, 3, padding=1), nn.AvgPool2d(2))
        self.gate = Gate()
        self.body = nn.Sequential(nn.Conv2d(width, width, 3, padding=1), nn.ReLU(), nn.AvgPool2d(2))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.body(self.gate(self.stem(x)))
        return self.head(x.mean((2, 3)))


def test_decorator_registration_with_default_cut_and_kwargs() -> None:
    @register_model("DecoNet", split_point="body", leaf_modules=[Gate])
    def deco_net(channel: int = 3, num_classes: int = 10, width: int = 8) -> nn.Module:
        """a gated test CNN"""
        return GatedNet(channel, num_classes, width)

    assert deco_net(3, 10).head.in_features == 8  # the decorator leaves the function usable
    model = create_model("deco-net", num_classes=4, width=6)  # case/'-' ignored; kwargs reach the builder
    assert model.head.out_features == 4 and model.head.in_features == 6
    assert elf.default_split_point(model) == "body"
    assert create_model("DecoNet:width=5").head.in_features == 5  # NAME:key=value specs
    assert "a gated test CNN" in elf.list_models()["DecoNet"] and "default cut body" in elf.list_models()["DecoNet"]
    # the registered leaf module reaches the trace without being passed again
    assert [p.name for p in list_split_points(model, (3, 16, 16), shape=(6, 4, 4))] == ["body"]
    front, rear = elf.split_model(model, "body")
    x = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(rear(front(x)), model(x))


def test_split_point_as_a_function_of_image_size() -> None:
    register_model("SizedNet", lambda num_classes: GatedNet(3, num_classes), split_point=lambda hw: "stem" if hw[0] <= 16 else "body",
                   leaf_modules=[Gate])
    assert elf.default_split_point(create_model("SizedNet", im_size=(16, 16))) == "stem"
    assert elf.default_split_point(create_model("SizedNet", im_size=(32, 32))) == "body"


def test_legacy_positional_builder_still_works() -> None:
    register_model("OldStyle", lambda c, k, s: GatedNet(c, k), "0.1-style builder(c, k, s)")
    assert create_model("OldStyle", channel=1, num_classes=3).head.out_features == 3


def test_registration_errors_are_one_line() -> None:
    with pytest.raises(ELFError, match="already registered.*override=True"):
        register_model("ResNet18", lambda: GatedNet())
    with pytest.raises(ELFError, match="already registered"):
        register_model("ConvNetW64", lambda: GatedNet())  # a ConvNet name is built in too
    register_model("Twice", lambda: GatedNet())
    with pytest.raises(ELFError, match="already registered"):
        register_model("twice", lambda: GatedNet())
    register_model("Twice", lambda: GatedNet(num_classes=3), override=True)
    assert create_model("Twice").head.out_features == 3
    register_model("ResNet18", lambda num_classes: GatedNet(num_classes=num_classes), override=True)
    assert isinstance(create_model("ResNet18"), GatedNet)
    with pytest.raises(ELFError, match="reserved"):
        register_model("timm.mine", lambda: GatedNet())
    with pytest.raises(ELFError, match="split_point"):
        register_model("BadPoint", lambda: GatedNet(), split_point=3)  # type: ignore[arg-type]
    register_model("NotAModule", lambda: "oops")  # type: ignore[arg-type,return-value]
    with pytest.raises(ELFError, match="returned str, not an nn.Module"):
        create_model("NotAModule")
    register_model("NeedsArg", lambda depth: GatedNet())
    with pytest.raises(ELFError, match="cannot be called"):
        create_model("NeedsArg")
    with pytest.raises(ELFError, match="cannot be called"):
        create_model("Twice", width=3)  # the builder takes no 'width'


def test_leaf_modules_reach_teacher_bank_and_student() -> None:
    """Without the leaf option the gated teacher cannot be traced; with it the bank, the trainer's own bank, the
    student's cut and the shape listing all work (issue #10: leaf_modules used to reach the student only)."""
    torch.manual_seed(0)
    teacher = GatedNet(width=8).eval()
    images = torch.randn(6, 3, 16, 16)
    labels = torch.arange(6) % 3
    with pytest.raises(ELFError, match="cannot be traced"):
        FeatureBank.build(teacher, images, "body")
    opts = SplitOptions(leaf_modules=(Gate,))
    bank = FeatureBank.build(teacher, images, "body", options=opts)
    assert bank.shape == (8, 4, 4)
    with pytest.raises(ELFError, match="cannot be traced"):
        list_split_points(teacher, (3, 16, 16))
    assert [p.name for p in list_split_points(teacher, (3, 16, 16), options=opts, shape=(8, 4, 4))] == ["body"]
    # the trainer builds the bank from teacher= and splits the student with the same options
    trainer = ELFTrainer(GatedNet(num_classes=3), images, labels, teacher=teacher, teacher_point="body", split_at="body",
                         leaf_modules=[Gate], epochs=1, batch_size=3, device="cpu", progress=False)
    trainer.fit(0)
    torch.testing.assert_close(trainer.feature_bank.features, bank.features)
    assert trainer.split_point == "body"
    # the same through one options value (the cut travels in it too)
    t2 = ELFTrainer(GatedNet(num_classes=3), images, labels, teacher=teacher, teacher_point="body",
                    split_options=SplitOptions("body", (Gate,)), epochs=1, batch_size=3, device="cpu", progress=False)
    t2.fit(0)
    assert t2.split_point == "body"


def test_front_rear_pair_keeps_shared_modules_shared() -> None:
    """A (front, rear) pair whose halves share a module is copied together (tied weights stay tied)."""
    shared = nn.Linear(4, 4)
    front = nn.Sequential(nn.Flatten(), nn.Linear(12, 4), shared)
    rear = nn.Sequential(shared, nn.ReLU(), nn.Linear(4, 3))
    trainer = ELFTrainer((front, rear), torch.randn(6, 3, 2, 2), torch.arange(6) % 3, protocol="elf",
                         lambda_front=0.0, lambda_rear=0.0, epochs=1, batch_size=3, device="cpu", progress=False)
    trainer.fit(0)
    assert trainer.front[2] is trainer.rear[0]
    assert trainer.front[2] is not shared  # a copy, not the user's module


def test_shape_filter_on_the_command_line(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["split-points", "ResNet18BN", "--shape", "512x4x4"]) == 0
    out = capsys.readouterr().out
    assert "layer4.0" in out and "default ELF point" in out and "layer3 " not in out
    assert main(["split-points", "ResNet18BN", "--shape", "7x7"]) == 0
    assert "(none:" in capsys.readouterr().out
    assert main(["split-points", "ResNet18BN", "--shape", "big"]) == 2
    assert "512x4x4" in capsys.readouterr().err


def test_a_registered_default_point_that_is_no_valid_point_is_flagged(capsys: pytest.CaptureFixture[str]) -> None:
    """A registration whose split_point names no point was listed with nothing marked and no word of it."""
    register_model("TypoNet", lambda: GatedNet(), split_point="bodyy", leaf_modules=[Gate])
    assert main(["split-points", "TypoNet"]) == 0
    err = capsys.readouterr().err
    assert "default ELF point 'bodyy'" in err and "not among its valid points" in err
    register_model("GoodNet", lambda: GatedNet(), split_point="body", leaf_modules=[Gate])
    assert main(["split-points", "GoodNet"]) == 0
    assert capsys.readouterr().err == ""


PLUGIN_SOURCE = textwrap.dedent('''
    """A model package elf-dd has never seen: registers PlugNet (with its default cut) on import."""
    import torch
    from torch import nn

    import elf


    @elf.register_model("PlugNet", split_point="features")
    def plug_net(channel=3, num_classes=10, im_size=(32, 32), width=8):
        """tiny plugin CNN"""
        class PlugNet(nn.Module):
            def __init__(self):
                super().__init__()
                self.features = nn.Sequential(nn.Conv2d(channel, width, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4))
                self.head = nn.Linear(width * (im_size[0] // 4) * (im_size[1] // 4), num_classes)

            def forward(self, x):
                return self.head(self.features(x).flatten(1))
        return PlugNet()
''')


def _plugin_dist(root: Path) -> Path:
    """An installed-looking distribution on a sys.path folder: the package and its entry point (group elf_dd.models)."""
    (root / "elf_plug_models").mkdir(parents=True)
    (root / "elf_plug_models" / "__init__.py").write_text(PLUGIN_SOURCE)
    info = root / "elf_plug_models-0.1.dist-info"
    info.mkdir()
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: elf-plug-models\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[elf_dd.models]\nplug = elf_plug_models\n")
    return root


def _elf(args: list[str], pythonpath: Path, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(pythonpath), *filter(None, [os.environ.get("PYTHONPATH")])]),
           "OMP_NUM_THREADS": "1"}
    return subprocess.run([sys.executable, "-m", "elf", *args], capture_output=True, text=True, env=env, cwd=cwd, timeout=600)


def test_entry_point_plugin_reaches_models_split_points_and_eval(tmp_path: Path, make_image_folder) -> None:
    """Done-when of issue #10: a package with an elf_dd.models entry point (here a dist-info folder on sys.path,
    as pip would install it) makes its model appear in `elf models`, `elf split-points` and `elf eval`."""
    site = _plugin_dist(tmp_path / "site")
    r = _elf(["models"], site, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "PlugNet" in r.stdout and "tiny plugin CNN" in r.stdout
    r = _elf(["split-points", "PlugNet", "--im-size", "16", "16"], site, tmp_path)
    assert r.returncode == 0, r.stderr
    assert "features" in r.stdout and "<- default ELF point" in r.stdout

    data = make_image_folder(tmp_path / "data", 16, 6, 4, "abc")
    imgs = elf.data.load_image_folder(data, "train", cache_dir=tmp_path / "c", progress=False)
    sub = imgs.per_class(2, torch.Generator().manual_seed(0))
    syn = tmp_path / "syn.safetensors"
    save_synthetic(syn, SyntheticSet(sub.as_float(CIFAR10_MTT), sub.labels, normalization=CIFAR10_MTT, classes=sub.classes))
    teacher = elf.create_model("ConvNetW8D2", num_classes=3, im_size=(16, 16))
    ckpt = tmp_path / "teacher.safetensors"
    elf.save_checkpoint(teacher, ckpt)
    out = tmp_path / "r.json"
    r = _elf(["eval", "--images", str(syn), "--teacher", str(ckpt), "--teacher-model", "ConvNetW8D2",
              "--models", "PlugNet", "--epochs", "1", "--runs", "1", "--batch-size", "3", "--device", "cpu",
              "--data", str(data), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--out", str(out)], site, tmp_path)
    assert r.returncode == 0, r.stderr
    (row,) = json.loads(out.read_text())["results"]
    assert row["model"] == "PlugNet" and row["split_at"] == "features"  # its registered default cut, 8x4x4
    assert row["feature_bank"]["teacher_model"] == "ConvNetW8D2"


def test_import_option_and_study_key(tmp_path: Path, make_image_folder) -> None:
    """--import MODULE (a module name from the current folder, or a .py path) and a study's `import` key."""
    (tmp_path / "my_models.py").write_text(PLUGIN_SOURCE.replace("PlugNet", "LocalNet"))
    r = _elf(["models"], tmp_path / "nowhere", tmp_path)
    assert "LocalNet" not in r.stdout
    r = _elf(["models", "--import", "my_models"], tmp_path / "nowhere", tmp_path)
    assert r.returncode == 0 and "LocalNet" in r.stdout, r.stderr
    r = _elf(["split-points", "LocalNet", "--import", str(tmp_path / "my_models.py")], tmp_path / "nowhere", Path("/"))
    assert r.returncode == 0 and "<- default ELF point" in r.stdout, r.stderr
    # regression: one file imported by its module name and by its path registered its models twice (an error)
    r = _elf(["models", "--import", "my_models", "--import", "my_models.py"], tmp_path / "nowhere", tmp_path)
    assert r.returncode == 0 and "LocalNet" in r.stdout, r.stderr
    r = _elf(["models", "--import", "no_such_models"], tmp_path / "nowhere", tmp_path)
    assert r.returncode == 2 and r.stderr.startswith("elf models: error: cannot import plugin module 'no_such_models'")

    from elf.study import load_config

    study = tmp_path / "study" / "s.toml"
    study.parent.mkdir()
    (study.parent / "study_models.py").write_text(PLUGIN_SOURCE.replace("PlugNet", "StudyNet"))
    study.write_text('import = ["study_models.py"]\nmodels = ["StudyNet"]\ndata = "d"\n[sets]\na = "a.safetensors"\n')
    cfg = load_config(study)
    assert cfg.imports == ["study_models.py"]
    assert create_model("StudyNet", im_size=(16, 16)).elf_split_point == "features"


def test_broken_plugin_is_a_warning_not_a_crash(tmp_path: Path) -> None:
    site = tmp_path / "site"
    info = site / "broken_plugin-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: broken-plugin\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[elf_dd.models]\nbroken = no_such_module_xyz\n")
    r = _elf(["models"], site, tmp_path)
    assert r.returncode == 0 and "ResNet18BN" in r.stdout
    assert "plugin 'broken'" in r.stderr and "skipped" in r.stderr


def test_a_model_built_for_other_images_is_an_error_before_any_run() -> None:
    """Regression: ELF's pre-flight (front_shape, used by compare_models / `elf eval` to pick the teacher) ran the
    front unguarded, so a registered model whose builder takes no im_size= crashed with a traceback (exit 1)."""
    from elf.evaluation import front_shape

    @register_model("Fixed64Net", split_point="features")
    def fixed64(num_classes: int = 10) -> nn.Module:  # written for 64x64 inputs; its builder takes no im_size
        return nn.Sequential(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.AvgPool2d(16), nn.Flatten(),
                                           nn.Linear(8 * 4 * 4, 8)), nn.Linear(8, num_classes))

    assert front_shape("Fixed64Net", (3, 64, 64), 10, "0") == (8,)
    with pytest.raises(ELFError, match=r"Fixed64Net cannot run on images of shape \(3, 32, 32\).*im_size="):
        front_shape("Fixed64Net", (3, 32, 32), 10, "0")
