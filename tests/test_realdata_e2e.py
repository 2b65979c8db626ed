"""End to end on real CIFAR-10 (the archive named by ELF_DATA): train teachers briefly with `elf train-teacher`,
make a 10-images-per-class set, and run `elf eval` (baseline and ELF) on three architectures.

CPU-sized on purpose (about three minutes on two cores): teachers see a few hundred images for one or two epochs
and students train 20 epochs, so the accuracies only have to be well above chance (10 %), not paper-level.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from elf.cli import main
from elf.data import CIFAR10_MTT, load_dataset
from elf.io import SyntheticSet, save_synthetic

pytestmark = [pytest.mark.realdata, pytest.mark.slow]

TEST_PER_CLASS = 50  # 500 test images: chance accuracy has a standard deviation of about 1.3 points


def test_train_teacher_and_eval_on_cifar10(elf_data_path: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    cache = tmp_path / "cache"
    train = load_dataset(elf_data_path, "train", cache_dir=cache, progress=False)
    assert len(train) == 50_000 and train.classes[0] == "airplane"
    subset = train.per_class(10, torch.Generator().manual_seed(1))
    syn = tmp_path / "syn.safetensors"
    save_synthetic(syn, SyntheticSet(subset.as_float(CIFAR10_MTT), subset.labels, normalization=CIFAR10_MTT,
                                     classes=subset.classes, metadata={"method": "random real subset"}))

    common = ["--data", str(elf_data_path), "--cache-dir", str(cache), "--test-per-class", str(TEST_PER_CLASS),
              "--no-progress", "--device", "cpu"]
    # width-128 teacher for ConvNet students, width-512 teacher for ResNet-18 / VGG-11 (the paper's pairing)
    assert main(["train-teacher", "--model", "ConvNet", "--out", str(tmp_path / "t128"), "--epochs", "2",
                 "--momentum", "0.9", "--weight-decay", "5e-4", "--train-per-class", "200", *common]) == 0
    assert main(["train-teacher", "--model", "ConvNetW512", "--out", str(tmp_path / "t512"), "--epochs", "1",
                 "--momentum", "0.9", "--weight-decay", "5e-4", "--train-per-class", "40", *common]) == 0
    teacher_log = capsys.readouterr().out
    t128_history = json.loads((tmp_path / "t128" / "history.json").read_text())
    t128 = t128_history["test_accuracy"]
    assert t128["2"] > 20.0, teacher_log  # the teacher learned something real
    trained = json.loads(t128_history["meta"]["protocol"])
    assert (trained["momentum"], trained["weight_decay"]) == (0.9, 5e-4)  # the ELF paper's feature-model SGD

    out = tmp_path / "result.json"
    assert main(["eval", "--images", str(syn),
                 "--teacher", str(tmp_path / "t128" / "epoch_002.safetensors"), "--teacher-model", "ConvNet",
                 "--teacher", str(tmp_path / "t512" / "epoch_001.safetensors"), "--teacher-model", "ConvNetW512",
                 "--models", "ConvNetBN", "VGG11BN", "ResNet18BN", "--epochs", "20", "--batch-size", "10",
                 "--runs", "1", "--out", str(out), *common]) == 0
    table = capsys.readouterr().out
    print(table)
    result = json.loads(out.read_text())
    rows = {r["model"]: r for r in result["results"]}
    assert set(rows) == {"ConvNetBN", "VGG11BN", "ResNet18BN"}
    assert rows["ConvNetBN"]["feature_bank"]["teacher_model"] == "ConvNet"
    assert rows["ResNet18BN"]["feature_bank"]["teacher_model"] == "ConvNetW512"
    assert rows["ResNet18BN"]["split_at"] == "layer4.0" and rows["VGG11BN"]["split_at"] == "features.17"
    for name, row in rows.items():
        for method in ("baseline", "elf"):
            acc = row[method]["accuracies"][0]
            # 14 %: 3 std above chance (10 %) on the 500 test images; the numbers move with the thread count
            # (VGG-11 BN's baseline: 15.2 % with one thread on 2026-12-01, above 16 % with two)
            assert acc > 14.0, f"{name} {method}: {acc:.1f}% is not well above chance (10%)\n{table}"
    assert result["synthetic"]["ipc"] == 10 and result["test"]["n"] == 10 * TEST_PER_CLASS
