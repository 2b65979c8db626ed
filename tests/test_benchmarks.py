"""The benchmark scripts that are meant for a GPU run end to end on a toy problem (tiny data, one epoch)."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest
import torch

from elf.data import CIFAR10_MTT
from elf.io import SyntheticSet, save_synthetic

ROOT = Path(__file__).resolve().parents[1]


def _load(name: str):  # noqa: ANN202
    spec = importlib.util.spec_from_file_location(name, ROOT / "benchmarks" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    sys.modules[name] = mod  # as an import would: dataclasses look their module up there
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


CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


def _gpu_check(tmp_path: Path, *extra: str) -> dict:
    """benchmarks/gpu_check.sh on a toy ImageFolder (6 train and 2 test images per class, made on the first call) on
    the CPU, ``--tiny``; the parsed gpu-check.json."""
    import subprocess
    import sys

    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", 6), ("test", 2)) if not (tmp_path / "data").exists() else ():
        for k in range(10):
            d = tmp_path / "data" / split / CIFAR10_CLASSES[k]  # the DSA set names its classes: as CIFAR-10's
            d.mkdir(parents=True)
            for i in range(n):
                Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / f"{i}.png")
    env = {**__import__("os").environ, "ELF_CACHE": str(tmp_path / "cache"), "PYTHON": sys.executable}
    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny",
                           "--data", str(tmp_path / "data"), "--work", str(tmp_path / "work"), "--results",
                           str(tmp_path / "results"), "--epochs", "1", "--procs", "2", *extra],
                          capture_output=True, text=True, timeout=600, env=env)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    report = json.loads((tmp_path / "results" / "gpu-check.json").read_text())
    failed = {name: stage for name, stage in report["stages"].items() if isinstance(stage, dict) and stage["rc"] != 0}
    logs = {name: (tmp_path / "results" / f"gpu-check-{name}.log").read_text()[-2000:] for name in failed}
    assert not failed, (failed, logs)
    return report


def test_gpu_check_default_plan_tiny(tmp_path: Path, torch_single_thread: None) -> None:
    """A plain call of benchmarks/gpu_check.sh must work the first time on a GPU machine: its default plan (speed,
    cuda_tests, table5) runs here on toy sizes; then the followups stage."""
    report = _gpu_check(tmp_path, "--archive", str(tmp_path / "out" / "gpu-results.tgz"))
    results = tmp_path / "results"
    # what comes back from a lent device is a few files, not a tree: one archive of this call's results and logs
    import tarfile

    with tarfile.open(tmp_path / "out" / "gpu-results.tgz") as tar:
        names = tar.getnames()
    assert any(n.endswith("results/gpu-check.json") for n in names) and any(n.endswith("speed-tiny-batched.json") for n in names)
    assert sum("/gpu-table5/runs/" in n for n in names) == 8 and any(n.endswith("logs/speed.log") for n in names)
    assert not any("/partial/" in n for n in names)
    assert report["stages_selected"] == ["speed", "cuda_tests", "table5"]  # table5 alone on the device
    summary = report["stage_summary"]
    assert set(summary) == {"speed", "cuda_tests", "table5"} and "skipped" in summary["cuda_tests"]
    speed = json.loads((results / "speed-tiny-batched.json").read_text())  # issue #12's speed section
    assert [row["k"] for row in speed["batched_seeds"]["rows"]] == [1, 2]
    assert all(row["batched_same_accuracies"] for row in speed["batched_seeds"]["rows"])
    # table5: batched seeds, each model with the teacher of its feature shape, the official protocol
    runs = [json.loads(f.read_text()) for f in sorted((results / "gpu-table5" / "runs").glob("*.json"))]
    assert len(runs) == 2 * 2 * 2 and all(r["accuracy"] is not None for r in runs)
    assert all(r["protocol"]["name"] == "elf-official" and r["batched"]["seeds"] == 2 for r in runs)
    teachers = {r["run"]["model"]: r["teacher"]["teacher_model"] for r in runs if r["run"]["variant"] == "elf"}
    assert teachers == {"ConvNetBN": "ConvNet", "VGG11BN": "ConvNetW512"}
    t5 = summary["table5"]
    assert t5["whole_block_done"] and t5["wall_s"] > 0 and t5["whole_block_s"] == t5["wall_s"]
    assert t5["studies"]["table5"]["units_done"] == 4 and not t5["cut_by_budget"]
    assert "| dm200 | VGG11BN |" in (results / "gpu-table5" / "summary.md").read_text()
    assert not (results / "gpu-chosen-table").exists() and report["followups_selected"] == []
    # the followups stage by default: only issue #9's chosen table (the others were answered on the CPU), in a
    # GPU-named folder
    chosen_call = _gpu_check(tmp_path, "--stages", "followups", "--followup-procs", "4")
    assert chosen_call["followups_selected"] == ["chosen_table"]
    assert set(chosen_call["stage_summary"]["followups"]["studies"]) == {"chosen_table"}
    assert len(list((results / "gpu-chosen-table" / "runs").glob("*.json"))) == 2 * 2 * 3
    assert not list(results.glob("gpu-followup-*")) and not (results / "gpu-teacher-choice-study").exists()
    # the chosen column: each model's own setting from the per-model tables (toy models: their entries only)
    chosen = {r["run"]["model"]: r for r in (json.loads(f.read_text()) for f in
                                             (results / "gpu-chosen-table" / "runs").glob("dm200__*__chosen__s0.json"))}
    assert chosen["ConvNetBN"]["teacher"]["teacher_model"] == "ConvNet"
    assert chosen["ConvNetBN"]["protocol"]["features_on_augmented"] and not chosen["ConvNetBN"]["protocol"]["align_targets"]
    assert chosen["VGG11"]["teacher"]["teacher_model"] == "ConvNetW512"
    assert chosen["VGG11"]["protocol"]["features_on_augmented"] and not chosen["VGG11"]["protocol"]["align_targets"]
    # the other follow-ups by name (here: all of them), rerun into GPU-named folders; the chosen table is finished
    rest = _gpu_check(tmp_path, "--stages", "followups", "--followups", "all", "--followup-procs", "4")
    assert set(rest["stage_summary"]["followups"]["studies"]) == {"teacher_choice", "vit_val", "vit_test",
                                                                  "in_models_val", "front_scale_val", "onaug_val",
                                                                  "chosen_table"}
    assert rest["stage_summary"]["followups"]["studies"]["chosen_table"]["units_done"] == 2 * 2 * 3
    folders = {"gpu-teacher-choice-study": 2, "gpu-followup-vit-val-study": 3, "gpu-followup-vit-test-study": 3,
               "gpu-followup-in-models-val-study": 3, "gpu-followup-front-scale-val-study": 3,
               "gpu-followup-teacher-on-aug-val-study": 1, "gpu-chosen-table": 2 * 2 * 3}
    for folder, n in folders.items():
        assert len(list((results / folder / "runs").glob("*.json"))) == n, folder
        assert "(cpu, benchmarks/gpu_check.py)" in (results / folder / "summary.md").read_text()
    assert not list(results.glob("cpu-*"))
    onaug = json.loads(next((results / "gpu-followup-teacher-on-aug-val-study" / "runs").glob("*.json")).read_text())
    assert onaug["protocol"]["features_on_augmented"] is True and onaug["accuracy"] is not None
    vit = [json.loads(f.read_text()) for f in (results / "gpu-followup-vit-test-study" / "runs").glob("*.json")]
    assert {(r["split_at"], r["teacher"]["teacher_model"]) for r in vit} == {
        ("norm", "ConvNet"), ("blocks.5", "ConvNet"), ("norm", "ConvNetW512")}
    # a second call skips what is finished and keeps the first report
    again = _gpu_check(tmp_path, "--stages", "table5")
    assert again["stage_summary"]["table5"]["processes"] == 0 and again["previous_report"].startswith("gpu-check-")
    assert (results / again["previous_report"]).exists()


def test_gpu_check_refuses_missing_data_before_any_stage(tmp_path: Path) -> None:
    """Regression: on a lent device machine ../shared is absent; the speed stage ran, then loading the data raised
    and nothing (no gpu-check.json, no logs) was written."""
    import subprocess
    import sys

    proc = subprocess.run(["bash", str(ROOT / "benchmarks" / "gpu_check.sh"), "--device", "cpu", "--tiny", "--data",
                           str(tmp_path / "absent.tar.gz"), "--work", str(tmp_path / "work"), "--results",
                           str(tmp_path / "results")], capture_output=True, text=True, timeout=300,
                          env={**__import__("os").environ, "PYTHON": sys.executable})
    assert proc.returncode == 2 and "does not exist here" in proc.stderr and "carry" in proc.stderr
    assert not (tmp_path / "results").exists() and not (tmp_path / "work").exists()


def test_gpu_check_first_call_stages_tiny(tmp_path: Path, torch_single_thread: None) -> None:
    """The first GPU call's stages (width-512 teacher, DSA set, validation study, cross-architecture tables) stay
    selectable with --stages."""
    report = _gpu_check(tmp_path, "--stages", "teacher,distill,val,tables")
    assert report["stages_selected"] == ["teacher", "distill", "val", "tables"]
    assert report["teacher_w512"]["checkpoint"] == "epoch_001.safetensors" and report["dsa_set"]["metadata"]["method"] == "dsa"
    assert "speed" not in report["stages"] and not (tmp_path / "results" / "gpu-table5").exists()
    dm = (tmp_path / "results" / "gpu-cross-arch-dm" / "summary.md").read_text()
    assert "| dm200 | AlexNet |" in dm and "n/a" in dm  # the paper's ELF cannot serve AlexNet's 192x4x4 cut
    assert (tmp_path / "results" / "gpu-cross-arch-dsa" / "dsa_ipc10.safetensors").exists()
    val = (tmp_path / "results" / "gpu-val-study" / "summary.md").read_text()
    assert val.startswith("# Choosing") and "Validation accuracy" in val
    table = _load("cross_arch_table")
    cells = table.load_cells(tmp_path / "results" / "gpu-cross-arch-dm")
    assert ("dm200", "AlexNet", "elf") not in cells and ("dm200", "AlexNet", "adapt-sbn") in cells


def test_cross_arch_table_marks_the_target(tmp_path: Path) -> None:
    table = _load("cross_arch_table")
    cell = table.Cell
    cells = {("s", "M", "baseline"): cell([30.0, 31.0], "H200", 10000), ("s", "M", "elf"): cell([33.0, 33.2], "H200", 10000),
             ("s", "M", "best"): cell([35.0, 35.4], "H200", 10000), ("s", "N", "baseline"): cell([30.0, 32.0], "H200", 10000),
             ("s", "N", "best"): cell([32.5, 34.5], "H200", 10000)}
    text = table.table(cells, "best")
    assert ("| s | M | H200 30.50 ± 0.50 (2) | H200 33.10 ± 0.10 (2) | H200 35.20 ± 0.20 (2) | +4.70; yes "
            "| +2.10, apart |") in text
    assert "| s | N | H200 31.00 ± 1.00 (2) | n/a | H200 33.50 ± 1.00 (2) | +2.50; no | - |" in text
    # regression: --best read a folder's accuracies itself, so a cell with a failed seed printed as a normal mean
    # and a validation study's accuracies printed as test accuracies
    gpu = {"environment": {"device": "cuda", "device_name": "NVIDIA H200"}, "measured_on": "test", "test_n": 10000}
    for seed in (0, 1):
        _record(tmp_path / "st", "M", "baseline", seed, accuracy=30.0 + seed, **gpu)
    _record(tmp_path / "st", "M", "best", 0, accuracy=35.0, **gpu)
    _record(tmp_path / "st", "M", "best", 1, accuracy=None, failed="diverged", **gpu)
    with pytest.raises(SystemExit, match="the run failed"):
        table.load_cells(tmp_path / "st")
    _record(tmp_path / "val", "M", "best", 0, accuracy=35.0, measured_on="validation: 200 per class")
    with pytest.raises(SystemExit, match="no test accuracy"):
        table.load_cells(tmp_path / "val")


def test_standings_refuse_to_compare_cells_of_other_budgets_or_sets(tmp_path: Path) -> None:
    """Regression: a row compared cells from different studies without checking that they trained alike: a 300-epoch
    chosen cell against a 1000-epoch baseline printed a gain."""
    table = _load("cross_arch_table")
    cpu = {"environment": {"device": "cpu"}, "measured_on": "test", "test_n": 10000, "set_sha256": "aa"}
    for seed in (0, 1):
        _record(tmp_path / "a", "M", "chosen", seed, accuracy=40.0 + seed, protocol={"epochs": 300}, **cpu)
        _record(tmp_path / "b", "M", "baseline", seed, accuracy=30.0 + seed, protocol={"epochs": 1000}, **cpu)
        _record(tmp_path / "c", "M", "baseline", seed, accuracy=30.0 + seed, protocol={"epochs": 300},
                **{**cpu, "set_sha256": "bb"})
        _record(tmp_path / "d", "M", "baseline", seed, accuracy=30.0 + seed, protocol={"epochs": 300}, **cpu)
    spec = tmp_path / "standings.toml"
    for base, match in (("b", "another budget: {'epochs': .300, 1000.}"), ("c", "different set files")):
        spec.write_text(f'set = "s"\n[models.M]\nsetting = "x"\nchosen = "a:chosen"\nbaseline = "{base}:baseline"\n')
        with pytest.raises(SystemExit, match=match):
            table.standings(spec)
    spec.write_text('set = "s"\n[models.M]\nsetting = "x"\nchosen = "a:chosen"\nbaseline = "d:baseline"\n')
    assert "+10.00; yes" in table.standings(spec)


def _record(folder: Path, model: str, variant: str, seed: int, **fields: object) -> None:
    (folder / "runs").mkdir(parents=True, exist_ok=True)
    rec = {"run": {"set": "s", "model": model, "variant": variant, "seed": seed}, "run_id": f"s__{model}__{variant}__s{seed}",
           **fields}
    (folder / "runs" / f"s__{model}__{variant}__s{seed}.json").write_text(json.dumps(rec))


def test_standings_read_test_accuracies_and_name_machines(tmp_path: Path) -> None:
    table = _load("cross_arch_table")
    cpu, gpu = {"environment": {"device": "cpu"}}, {"environment": {"device": "cuda", "device_name": "NVIDIA H200"}}
    val = tmp_path / "val"  # a validation study with also_test: the test numbers are test_accuracy, not accuracy
    for seed, (v, t) in enumerate([(50.0, 40.0), (52.0, 41.0)]):
        _record(val, "M", "chosen", seed, accuracy=v, test_accuracy=t, test_accuracy_n=10000,
                measured_on="validation: 200 per class", **cpu)
        _record(val, "M", "paper", seed, accuracy=v - 5, test_accuracy=t - 0.5, test_accuracy_n=10000,
                measured_on="validation: 200 per class", **cpu)
    test = tmp_path / "test"  # a study measured on the test split: accuracy is the test number
    for seed, a in enumerate([30.0, 31.0, 32.0]):
        _record(test, "M", "baseline", seed, accuracy=a, measured_on="test", test_n=10000, **gpu)
        _record(test, "N", "baseline", seed, accuracy=a, measured_on="test", test_n=2000, **cpu)
        _record(test, "N", "best", seed, accuracy=a + 2.5, measured_on="test", test_n=2000, **cpu)
    spec = tmp_path / "standings.toml"
    spec.write_text('set = "s"\n[models.M]\nlabel = "Model M"\nsetting = "x"\nchosen = "val:chosen"\n'
                    'baseline = "test:baseline"\npaper = "val:paper"\n'
                    '[models.N]\nsetting = "y"\nchosen = "test:best"\nbaseline = "test:baseline"\n')
    text = table.standings(spec)
    assert ("| Model M | x | CPU 40.50 ± 0.50 (2) | H200 31.00 ± 0.82 (3) | +9.50; yes (machines differ) (seeds "
            "differ: [0, 1] vs [0, 1, 2]) | CPU 40.00 ± 0.50 (2) | +0.50, overlapping |") in text
    assert ("| N | y | CPU 33.50 ± 0.82 (3, 2000 test images) | CPU 31.00 ± 0.82 (3, 2000 test images) | +2.50; no "
            "| n/a | - |") in text
    _record(val, "M", "valonly", 0, accuracy=50.0, measured_on="validation: 200 per class", **cpu)
    with pytest.raises(SystemExit, match="no test accuracy"):
        table.load_cell(val, "s", "M", "valonly")
    _record(test, "N", "broken", 0, accuracy=None, failed="diverged: loss is nan at epoch 3", **cpu)
    with pytest.raises(SystemExit, match="the run failed .diverged"):  # was: "no test accuracy (a validation-only run"
        table.load_cell(test, "s", "N", "broken")
    # gains are the difference of the printed means; cells on other seeds say so; leftover seeds are left out
    _record(test, "N", "other", 5, accuracy=40.0, measured_on="test", test_n=2000, **cpu)
    cell = table.load_cell(test, "s", "N", "other")
    assert table.paired(cell, table.load_cell(test, "s", "N", "baseline")) == " (seeds differ: [5] vs [0, 1, 2])"
    check = table.StudyCheck(spec, {0, 1}, {})
    assert table.load_cell(test, "s", "N", "baseline", check=check).accuracies == [30.0, 31.0]
    with pytest.raises(SystemExit, match="made with other settings"):
        table.load_cell(test, "s", "N", "baseline", check=table.StudyCheck(spec, {0, 1}, {"s__N__baseline__s1": "lr: 0.01 -> 0.02"}))
    assert table.shown_difference([33.006, 33.0], [30.0]) == pytest.approx(3.0)
    with pytest.raises(SystemExit, match="no finished run"):
        table.load_cell(val, "s", "M", "absent")


def test_committed_standings_tables_build(capsys: pytest.CaptureFixture[str]) -> None:
    """benchmarks/standings*.toml name cells that exist in the committed results; one table per set."""
    table = _load("cross_arch_table")
    text = table.standings(ROOT / "benchmarks" / "standings.toml")
    assert len(text.splitlines()) == 2 + 8 and "ViT" in text
    table.main(["--standings", str(ROOT / "benchmarks" / "standings.toml"),
                str(ROOT / "benchmarks" / "standings_dsa.toml")])
    out = capsys.readouterr().out
    assert out.startswith("Set: dm200 (the bundled DM set") and "\nSet: dsa (DSA" in out
    for model in ("ConvNet-BN", "ResNet-18 (BN)", "VGG-11 (BN)"):  # the models for the second set
        assert out.split("Set: dsa")[1].count(f"| {model} |") == 1
    # every results folder the standings read has its study file next to them (its seeds and stale runs are checked)
    for spec in ("standings.toml", "standings_dsa.toml"):
        data = table.tomllib.loads((ROOT / "benchmarks" / spec).read_text())
        folders = {v.rpartition(":")[0] for m in data["models"].values() for k, v in m.items()
                   if k in ("chosen", "baseline", "paper")}
        for folder in folders:
            assert table.study_check(ROOT / "benchmarks" / folder, ROOT / "benchmarks") is not None, folder


def test_readme_and_benchmarks_hold_the_standings_the_runs_give(tmp_path: Path) -> None:
    """The standings tables in README.md and BENCHMARKS.md are generated (--update); a run file added or changed
    without regenerating them (or a hand edit of a number) fails here."""
    table = _load("cross_arch_table")
    tables = table.standings_tables([ROOT / "benchmarks" / "standings.toml", ROOT / "benchmarks" / "standings_dsa.toml"])
    for doc in (ROOT / "README.md", ROOT / "benchmarks" / "BENCHMARKS.md"):
        text = doc.read_text()
        start, end = table.marked_block(text, str(doc))
        assert text[start:end] == tables + "\n", f"{doc.name} is stale: run cross_arch_table.py --standings ... --update"
    doc = tmp_path / "doc.md"  # --update rewrites only the marked block, and says when nothing changed
    doc.write_text(f"intro\n{table.BEGIN}\nold table\n{table.END}\noutro\n")
    assert table.update(doc, "new table") and doc.read_text() == f"intro\n{table.BEGIN}\nnew table\n{table.END}\noutro\n"
    assert not table.update(doc, "new table")
    doc.write_text("no markers\n")
    with pytest.raises(SystemExit, match="standings: begin"):
        table.update(doc, "new table")


def test_cpu_dsa_study_runs_the_gpu_tables_chosen_settings() -> None:
    """cpu_dsa_chosen_test_study.toml repeats gpu_chosen_table_study.toml's baseline / paper / chosen settings for its
    models (same fields, same teacher files): a choice changed in one file and not the other would make the DSA
    standings compare a setting that is not the table's."""
    from elf.study import _model_settings, load_config

    cpu = load_config(ROOT / "benchmarks" / "cpu_dsa_chosen_test_study.toml")
    gpu = load_config(ROOT / "benchmarks" / "gpu_chosen_table_study.toml")
    assert set(cpu.models) <= set(gpu.models) and set(cpu.variants) == set(gpu.variants)
    assert cpu.protocol == gpu.protocol and cpu.sets["dsa"] == gpu.sets["dsa"]
    for model in cpu.models:
        for variant in cpu.variants:
            mine, theirs = _model_settings(cpu, variant, model), _model_settings(gpu, variant, model)
            assert mine == theirs, (model, variant)
            if "teacher" in mine:
                assert cpu.teachers[mine["teacher"]] == gpu.teachers[theirs["teacher"]]


def test_elf_aug_preset_is_the_chosen_setting_of_seven_table_models() -> None:
    """The `elf-aug` preset's notes and docs say it is the setting chosen on validation data for ConvNet-BN,
    ResNet-18 (IN, BN), VGG-11 (IN, BN), AlexNet and torchvision's resnet18: gpu_chosen_table_study.toml's chosen
    column for those models resolves to that preset's fields (and to another setting for the ViT)."""
    import elf
    from elf.study import _decisive_fields, _resolved_settings, load_config

    gpu = load_config(ROOT / "benchmarks" / "gpu_chosen_table_study.toml")
    preset = _decisive_fields(elf.get_protocol("elf-aug", **gpu.overrides))
    chosen = {m: _decisive_fields(_resolved_settings(gpu, "chosen", m)[0]) == preset for m in gpu.models}
    assert chosen == {m: m != "timm.vit_tiny_patch16_224:patch_size=4" for m in gpu.models}


def test_committed_width512_teacher_loads() -> None:
    """The H200's width-512 teacher, committed in fp16 for the CPU studies, passes the checkpoint checksum."""
    import elf

    model = elf.create_model("ConvNetW512")
    elf.load_checkpoint(model, ROOT / "benchmarks" / "results" / "gpu-cross-arch-dm" / "teacher_w512_epoch007_fp16.safetensors")
    assert next(model.parameters()).dtype == torch.float32


def test_gpu_check_shares_processes_by_unfinished_runs() -> None:
    share = _load("gpu_check")._share
    assert share(12, {"big": 90, "small": 10, "done": 0}) == {"big": 11, "small": 1, "done": 0}
    assert share(4, {"a": 1, "b": 1, "c": 1, "d": 1, "e": 1}) == {k: 1 for k in "abcde"}  # each unfinished one runs
    assert share(12, {"a": 2, "b": 30}) == {"a": 1, "b": 11}


def test_gpu_check_followups_option_names_the_studies() -> None:
    """--followups: default chosen_table (the one the CPU did not answer), ``all`` or a comma list in FOLLOWUPS'
    order; an unknown name is refused with the valid names."""
    import argparse

    gpu_check = _load("gpu_check")
    assert gpu_check._followups(gpu_check.DEFAULT_FOLLOWUPS) == ["chosen_table"]
    assert gpu_check._followups("all") == list(gpu_check.FOLLOWUPS)
    assert gpu_check._followups("chosen_table, vit_val") == ["vit_val", "chosen_table"]
    with pytest.raises(argparse.ArgumentTypeError, match="names are all, teacher_choice"):
        gpu_check._followups("vit")


def test_every_committed_study_file_loads() -> None:
    """A study file that stops loading (e.g. after a stricter check) would only show on the machine that runs it."""
    from elf.study import load_config

    files = sorted((ROOT / "benchmarks").glob("*_study.toml"))
    assert len(files) > 10
    # every other TOML file there is a table's spec, not a study that would escape this check
    assert {f.name for f in (ROOT / "benchmarks").glob("*.toml")} - {f.name for f in files} == {
        "standings.toml", "standings_dsa.toml"}
    for f in files:
        load_config(f).check(running=True)  # (sets and teachers are read when a study runs; some are made then)


def test_gpu_check_cuts_workers_with_a_keyboard_interrupt_even_when_sigint_is_ignored(tmp_path: Path) -> None:
    """Regression: started from a shell that ignores SIGINT (a non-interactive ``cmd &``), the workers inherited the
    ignore, so the deadline's SIGINT did nothing and the SIGKILL 10 s later lost the run's last minutes."""
    import signal
    import time

    stage_cls = _load("gpu_check").Stage
    worker = ("import time\ntry:\n    time.sleep(60)\nexcept KeyboardInterrupt:\n"
              f"    open({str(tmp_path / 'cut')!r}, 'w').write('saved')\n")
    before = signal.signal(signal.SIGINT, signal.SIG_IGN)
    try:
        stage = stage_cls(tmp_path, time.time())
        stage.start("worker", [sys.executable, "-c", worker], deadline=time.time() + 1.5)
        out = stage.wait(["worker"])["worker"]
    finally:
        signal.signal(signal.SIGINT, before)
    assert out["cut_by_budget"] and out["rc"] == 0
    assert (tmp_path / "cut").read_text() == "saved"


def test_speed_times_epochs_only_and_names_the_official_loop(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: speed.py's trainer arm counted building the model and tracing its split (the DataLoader arm built
    its model before the clock), which on a GPU's 3-11 ms epochs was 15-28 % of the trainer's time."""
    import time as time_module

    from elf.trainer import ELFTrainer

    speed = _load("speed")
    build = ELFTrainer._build_model

    def slow_build(self):  # noqa: ANN001, ANN202
        time_module.sleep(1.0)
        return build(self)

    monkeypatch.setattr(ELFTrainer, "_build_model", slow_build)
    x, y = torch.randn(10, 3, 8, 8), torch.arange(10)
    per_epoch = speed.time_fit("ConvNetW4D1", x, y, None, 2, 10, torch.device("cpu"))
    assert per_epoch < 0.4  # the 1 s build is outside the clock (a tiny epoch takes milliseconds)
    assert "official evaluation loop" in speed.time_dataloader_loop.__doc__
