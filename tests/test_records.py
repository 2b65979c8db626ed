"""Record hygiene (issue #11): results carry relative paths, the revision of the code that ran, and the teacher's
own accuracy."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
import torch

import elf
from elf.cli import main
from elf.evaluation import git_revision
from elf.feature_bank import FeatureBank
from elf.fileio import load_tensors, portable_path


def test_portable_path_is_relative_and_keeps_symlink_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path / "real")
    assert portable_path(tmp_path / "real" / "a.txt") == "a.txt"
    assert portable_path(tmp_path / "link" / "b") == "../link/b"  # not resolved to ../real/b
    assert portable_path("x/../y") == "y"
    assert portable_path(tmp_path / "data", root=tmp_path / "real" / "sub") == "../../data"
    assert not portable_path(Path("/") / "somewhere").startswith("/")


def test_git_revision_names_the_checkout_and_a_dirty_tree() -> None:
    here = Path(elf.__file__).parent
    rev = git_revision()
    head = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=here)
    if head.returncode != 0:  # an installed copy outside a checkout records nothing
        assert rev is None
        return
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                           cwd=here).stdout.strip()
    assert rev == head.stdout.strip() + ("+dirty" if dirty else "")


def test_teacher_accuracy_travels_from_checkpoint_to_bank(tmp_path: Path, make_image_folder) -> None:
    data = make_image_folder(tmp_path / "data", 8, 4, 2, "ab")
    common = ["--data", str(data), "--cache-dir", str(tmp_path / "c"), "--no-progress", "--device", "cpu"]
    assert main(["train-teacher", "--model", "ConvNetW4D2", "--out", str(tmp_path / "t"), "--epochs", "1",
                 "--batch-size", "4", *common]) == 0
    ckpt = tmp_path / "t" / "epoch_001.safetensors"
    _, meta = load_tensors(ckpt)
    acc = float(meta["test_accuracy"])
    assert 0.0 <= acc <= 100.0 and meta["test_n"] == "4"
    bank = FeatureBank.from_checkpoint(ckpt, "ConvNetW4D2", torch.randn(3, 3, 8, 8), num_classes=2)
    assert float(bank.metadata["teacher_test_accuracy"]) == acc and bank.metadata["teacher_test_n"] == "4"


def test_distill_records_the_data_path_relative(tmp_path: Path, make_image_folder, monkeypatch: pytest.MonkeyPatch) -> None:
    data = make_image_folder(tmp_path / "data", 8, 4, 1, "ab")
    work = tmp_path / "work"
    work.mkdir()
    monkeypatch.chdir(work)
    out = work / "set.safetensors"
    assert main(["distill", "--method", "dm", "--ipc", "1", "--iterations", "1", "--batch-real", "2", "--model",
                 "ConvNetW4D2", "--data", str(data.resolve()), "--cache-dir", str(tmp_path / "c"), "--no-progress",
                 "--device", "cpu", "--snapshot-every", "1", "--out", str(out)]) == 0
    sset = elf.io.load_synthetic(out)
    assert sset.metadata["data"] == "../data"  # given as an absolute path, recorded relative to where it ran
    assert not any(os.sep + "tmp" in v or str(tmp_path) in v for v in sset.metadata.values()), sset.metadata


def test_study_records_teacher_accuracy_and_revision(tmp_path: Path, make_image_folder) -> None:
    import json

    from elf.io import SyntheticSet, save_synthetic
    from elf.pixel_space import CIFAR10_MTT
    from elf.study import load_config, run_study

    data = make_image_folder(tmp_path / "data", 8, 3, 2, "ab")
    teacher = elf.create_model("ConvNetW4D2", num_classes=2, im_size=(8, 8))
    elf.save_checkpoint(teacher, tmp_path / "t.safetensors")
    save_synthetic(tmp_path / "s.safetensors", SyntheticSet(torch.randn(2, 3, 8, 8), torch.tensor([0, 1]),
                                                             normalization=CIFAR10_MTT, classes=["a", "b"]))
    (tmp_path / "s.toml").write_text(
        'sets = {s = "s.safetensors"}\nmodels = ["ConvNetW4D2"]\ndata = "data"\nseeds = 1\nrandom_real = false\n'
        'out = "out"\n[teachers.t]\ncheckpoint = "t.safetensors"\nmodel = "ConvNetW4D2"\naccuracy = 61.5\n'
        '[overrides]\nepochs = 1\nbatch_size = 2\n[variants.elf]\n')
    cfg = load_config(tmp_path / "s.toml")
    run_study(cfg, device="cpu", progress=False, log=lambda s: None)
    (record,) = [json.loads(p.read_text()) for p in (tmp_path / "out" / "runs").glob("*.json")]
    assert record["teacher"]["teacher_test_accuracy"] == "61.5"
    assert record["teacher"]["teacher_test_accuracy_source"] == "study file"
    assert record["git_revision"] == git_revision()
    (tmp_path / "bad.toml").write_text((tmp_path / "s.toml").read_text().replace("accuracy = 61.5", "acuracy = 61.5"))
    with pytest.raises(elf.ELFError, match="unknown key"):
        load_config(tmp_path / "bad.toml")
