"""The benchmark scripts that are meant for a GPU run end to end on a toy problem (tiny data, one epoch)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import torch

from elf.data import CIFAR10_MTT
from elf.io import SyntheticSet, save_synthetic

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_full_protocol_script_runs_on_a_toy_folder(tmp_path: Path, torch_single_thread: None, make_image_folder) -> None:
    make_image_folder(tmp_path / "data", 32, 4, 2)
    torch.manual_seed(0)
    syn = tmp_path / "noise.safetensors"
    save_synthetic(syn, SyntheticSet(torch.randn(3, 3, 32, 32), torch.arange(3), normalization=CIFAR10_MTT))
    _load("full_protocol").main(["--data", str(tmp_path / "data"), "--set", f"noise={syn}", "--out", str(tmp_path / "run"),
                                 "--teacher-epochs", "1", "--seeds", "1", "--epochs", "1", "--models", "ConvNet",
                                 "--results", str(tmp_path / "results")])
    table = (tmp_path / "results" / "full-protocol.md").read_text()
    assert "| noise | ConvNet |" in table and "| random-real:ipc1 | ConvNet |" in table
    settings = json.loads((tmp_path / "results" / "full-protocol-settings.json").read_text())
    assert settings["device"] and settings["epochs"] == 1
    assert (tmp_path / "run" / "teachers" / "w512" / "epoch_001.safetensors").exists()


def test_accdd_time_ratio_reads_study_runs(tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir()
    table = {("random", 20): (30.0, 100.0), ("random", 40): (34.0, 200.0),
             ("early", 20): (35.0, 90.0), ("early", 40): (36.0, 180.0)}
    for (pool, step), (acc, secs) in table.items():
        for seed, delta in ((0, -1.0), (1, 1.0)):
            rec = {"run": {"set": f"{pool}-{step:03d}", "seed": seed}, "accuracy": acc + delta,
                   "data": {"distill_wall_time_s": str(secs), "pool_build_time_s": "60" if pool == "early" else "0",
                            "snapshot_step": str(step)}}
            (runs / f"{pool}-{step}-{seed}.json").write_text(json.dumps(rec))
    out = tmp_path / "ratio.json"
    _load("accdd_time_ratio").main(["--runs", str(runs), "--out", str(out)])
    result = json.loads(out.read_text())
    assert result["early"]["reaches_target"] and result["target"]["mean"] == 34.0 and result["early"]["step"] == 20
    assert abs(result["early"]["time_ratio_distill_only"] - 90 / 200) < 1e-9
    assert abs(result["early"]["time_ratio_with_pool"] - 150 / 200) < 1e-9
    assert [p["std"] for p in result["curves"]["early"]] == [1.0, 1.0]
    _load("accdd_time_ratio").main(["--runs", str(runs), "--out", str(out), "--pool-seconds", "early=100"])
    assert abs(json.loads(out.read_text())["early"]["time_ratio_with_pool"] - 190 / 200) < 1e-9
