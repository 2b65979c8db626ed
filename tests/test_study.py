"""`elf study`: planning, JSON per run, skipping finished runs, sharding, summaries, TOML and YAML configs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch

import elf
from elf.cli import main
from elf.data import CIFAR10_MTT
from elf.io import SyntheticSet, save_synthetic
from elf.study import StudyConfig, load_config, plan_runs, run_study, summarize


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, make_image_folder) -> Path:
    """A tiny ImageFolder (3 classes, 8x8), a 2-per-class synthetic set and a teacher checkpoint."""
    root = tmp_path_factory.mktemp("study")
    make_image_folder(root / "data", 8, 6, 4)
    torch.manual_seed(0)
    save_synthetic(root / "syn.safetensors", SyntheticSet(torch.randn(6, 3, 8, 8), torch.arange(3).repeat_interleave(2),
                                                          normalization=CIFAR10_MTT, metadata={"method": "noise"}))
    teacher = elf.create_model("ConvNetW4D2", num_classes=3, im_size=(8, 8))
    elf.save_checkpoint(teacher, root / "teacher.safetensors")
    return root


def _config(root: Path, out: str, **kw) -> StudyConfig:
    base = dict(sets={"noise": str(root / "syn.safetensors")}, models=["ConvNetW4D2", "ConvNetW4D2BN"],
                data=str(root / "data"), teachers={"w4": {"checkpoint": str(root / "teacher.safetensors"), "model": "ConvNetW4D2"}},
                variants={"baseline": {"lambda_front": 0.0, "lambda_rear": 0.0}, "elf": {}, "elf-mse": {"distance": "mse"}},
                seeds=[0, 1], overrides={"epochs": 1, "batch_size": 3}, out=str(root / out))
    base.update(kw)
    return StudyConfig(**base)


def test_plan_covers_the_matrix_and_references(workspace: Path) -> None:
    runs = plan_runs(_config(workspace, "p", full_data=True))
    assert len(runs) == 1 * 2 * 3 * 2 + 2 * 2 + 2 * 2  # matrix + random-real + full-data
    assert len({r.run_id for r in runs}) == len(runs)
    refs = [r for r in runs if r.set.startswith("random-real")]
    assert {r.variant for r in refs} == {"baseline"}
    # regression: a second set of the same size used to plan identical random-real runs again
    twice = plan_runs(_config(workspace, "p", sets={"a": str(workspace / "syn.safetensors"), "b": str(workspace / "syn.safetensors")}))
    assert sorted({r.set for r in twice if r.set.startswith("random-real")}) == ["random-real:ipc2"]
    assert len(twice) == 2 * 2 * 3 * 2 + 2 * 2


def test_run_skip_summarize(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = _config(workspace, "s1")
    files = run_study(cfg, device="cpu", progress=False, log=lambda _: None)
    assert len(files) == 16 and all(f.exists() for f in files)
    rec = json.loads(next(f for f in files if f.name == "noise__ConvNetW4D2__elf-mse__s0.json").read_text())
    assert rec["run"]["variant"] == "elf-mse" and rec["protocol"]["distance"] == "mse"
    assert rec["teacher"]["teacher_model"] == "ConvNetW4D2" and rec["environment"]["torch_version"] == torch.__version__
    assert rec["history"] and 0 <= rec["accuracy"] <= 100 and "git_revision" in rec

    executed = []
    original = elf.study._execute
    monkeypatch.setattr(elf.study, "_execute", lambda run, *a: executed.append(run.run_id) or original(run, *a))
    files[0].unlink()  # one run lost: only it runs again
    run_study(cfg, device="cpu", progress=False, log=lambda _: None)
    assert executed == [files[0].stem] and files[0].exists()

    table = (Path(cfg.out) / "summary.md").read_text()
    rows = list(csv.DictReader((Path(cfg.out) / "summary.csv").open()))
    assert len(rows) == 16
    expected = np.mean([float(r["accuracy"]) for r in rows if r["model"] == "ConvNetW4D2BN" and r["variant"] == "elf-mse" and r["set"] == "noise"])
    assert f"{expected:.2f} ±" in table and "| noise | ConvNetW4D2BN |" in table
    assert "| random-real:ipc2 | ConvNetW4D2 |" in table and "ELF gain (elf − baseline)" in table


def test_shards_partition_the_runs(workspace: Path) -> None:
    cfg = _config(workspace, "s2", variants={"baseline": {"lambda_front": 0.0, "lambda_rear": 0.0}, "elf": {}}, random_real=False)
    a = run_study(cfg, shard=(0, 2), device="cpu", progress=False, log=lambda _: None)
    b = run_study(cfg, shard=(1, 2), device="cpu", progress=False, log=lambda _: None)
    assert not set(a) & set(b) and len(a) + len(b) == len(plan_runs(cfg)) == 8
    assert not (Path(cfg.out) / "summary.md").exists()  # explicit shards leave the summary to --summarize
    summarize(cfg)
    assert "| noise | ConvNetW4D2 |" in (Path(cfg.out) / "summary.md").read_text()
    with pytest.raises(elf.ELFError, match="shard 2/2"):
        run_study(cfg, shard=(2, 2), device="cpu")


def test_only_runs_the_matching_runs_and_the_summary_counts_seeds(workspace: Path, monkeypatch: pytest.MonkeyPatch,
                                                                    capsys: pytest.CaptureFixture[str]) -> None:
    cfg = _config(workspace, "only", variants={"baseline": {"lambda_front": 0.0, "lambda_rear": 0.0}, "elf": {}},
                  random_real=False)
    executed: list[str] = []
    original = elf.study._execute
    monkeypatch.setattr(elf.study, "_execute", lambda run, *a: executed.append(run.run_id) or original(run, *a))
    files = run_study(cfg, device="cpu", progress=False, log=lambda _: None, only=["*__ConvNetW4D2BN__elf__s1"])
    assert executed == ["noise__ConvNetW4D2BN__elf__s1"] and [f.stem for f in files] == executed
    table = (Path(cfg.out) / "summary.md").read_text()
    row = next(line for line in table.splitlines() if line.startswith("| noise | ConvNetW4D2BN |"))
    assert row.count("(1 of 2 seeds)") == 1  # the elf cell averages one run of two; the baseline cell is empty
    with pytest.raises(elf.ELFError, match="no run of the study matches.*noise__ConvNetW4D2__baseline__s0"):
        run_study(cfg, device="cpu", progress=False, log=lambda _: None, only=["*__ResNet18__*"])
    # the CLI: --only repeated (a pattern that matches nothing is fine beside one that matches)
    toml = workspace / "only.toml"
    toml.write_text(f"""
data = "data"
models = ["ConvNetW4D2"]
seeds = 2
out = "only-cli"
random_real = false
[sets]
noise = "syn.safetensors"
[overrides]
epochs = 1
[variants.baseline]
lambda_front = 0.0
lambda_rear = 0.0
""")
    executed.clear()
    assert main(["study", str(toml), "--no-progress", "--device", "cpu", "--only", "*__s1", "--only", "nothing*"]) == 0
    assert executed == ["noise__ConvNetW4D2__baseline__s1"] and "(1 of 2 seeds)" in capsys.readouterr().out


def test_a_variant_field_can_be_a_table_per_model(workspace: Path) -> None:
    chosen = {"distance": {"ConvNetW4D2BN": "mse", "*": "ce"}, "lambda_rear": {"ConvNetW4D2": 0.0},
              "teacher": {"*": "w4"}}
    cfg = _config(workspace, "per-model", variants={"chosen": chosen}, seeds=[0], random_real=False)
    run_study(cfg, device="cpu", progress=False, log=lambda _: None)
    recs = {m: json.loads((Path(cfg.out) / "runs" / f"noise__{m}__chosen__s0.json").read_text())
            for m in ("ConvNetW4D2", "ConvNetW4D2BN")}
    assert recs["ConvNetW4D2"]["protocol"]["distance"] == "ce" and recs["ConvNetW4D2"]["protocol"]["lambda_rear"] == 0.0
    assert recs["ConvNetW4D2BN"]["protocol"]["distance"] == "mse" and recs["ConvNetW4D2BN"]["protocol"]["lambda_rear"] == 1.0
    # each model's run is the run a plain variant with its values gives (same training, same accuracy)
    plain = _config(workspace, "per-model-plain", variants={"chosen": {"distance": "mse"}}, seeds=[0], random_real=False,
                    models=["ConvNetW4D2BN"])
    run_study(plain, device="cpu", progress=False, log=lambda _: None)
    rec = json.loads((Path(plain.out) / "runs" / "noise__ConvNetW4D2BN__chosen__s0.json").read_text())
    def losses(r: dict) -> list:
        return [{k: v for k, v in h.items() if k != "time_s"} for h in r["history"]]

    assert rec["accuracy"] == recs["ConvNetW4D2BN"]["accuracy"] and losses(rec) == losses(recs["ConvNetW4D2BN"])
    assert elf.study.stale_runs(cfg) == []
    # a model spelt another way would silently take "*": refused, as is a teacher or value wrong for one model only
    with pytest.raises(elf.ELFError, match="distance names 'ConvNetW4D2bn', but the study's model is 'ConvNetW4D2BN'"):
        _config(workspace, "x", variants={"v": {"distance": {"ConvNetW4D2bn": "mse"}}}).check()
    # entries for models the study does not have (a table shared with other studies) are ignored, and said so
    shared = _config(workspace, "shared", variants={"v": {"split_at": {"ResNet18": "layer3.1"}, "lambda_rear": 0.0}},
                     seeds=[0], random_real=False, models=["ConvNetW4D2"])
    logged: list[str] = []
    run_study(shared, device="cpu", progress=False, log=logged.append)
    assert "variant 'v': split_at has entries for ['ResNet18'], not models of this study: ignored here" in logged
    with pytest.raises(elf.ELFError, match="variant 'v' for ConvNetW4D2BN names teacher 'w9'"):
        _config(workspace, "x", variants={"v": {"teacher": {"ConvNetW4D2BN": "w9"}}}).check()
    with pytest.raises(elf.ELFError, match="variant 'v' for ConvNetW4D2: .*adapter"):
        _config(workspace, "x", variants={"v": {"adapter": {"ConvNetW4D2": "nope", "*": "auto"}}}).check()


def test_a_dotted_variant_name_is_refused_not_run_as_the_plain_preset(tmp_path: Path) -> None:
    """TOML reads [variants.front0.3] as variant 'front0' holding a table '3'; resolved per model, a table naming
    neither the model nor "*" is left out, so the variant used to run as the bare preset (lambda_front 1, not 0.3)
    under a wrong name. Unknown field names are refused before per-model resolution, with the fix named."""
    toml = tmp_path / "study.toml"
    head = 'name = "x"\ndata = "d"\nmodels = ["ConvNetW4D2"]\n[sets]\nnoise = "n.safetensors"\n'
    toml.write_text(head + "[variants.front0.3]\nlambda_front = 0.3\n")
    with pytest.raises(elf.ELFError, match=r"""variant 'front0': unknown field '3' .*\[variants."front0.3"\]"""):
        load_config(toml)
    toml.write_text(head + '[variants."front0.3"]\nlambda_front = 0.3\n')  # quoted: one variant, as meant
    assert load_config(toml).variants == {"front0.3": {"lambda_front": 0.3}}
    toml.write_text(head + "[overrides]\nlamda_front = 0.3\n")  # a misspelt field in overrides
    with pytest.raises(elf.ELFError, match="overrides: unknown field 'lamda_front'"):
        load_config(toml)
    toml.write_text(head + '[variants.v]\nlamda_rear = { "*" = 0.0 }\n')  # misspelt, as a per-model table
    with pytest.raises(elf.ELFError, match="variant 'v': unknown field 'lamda_rear'"):
        load_config(toml)


def test_baseline_or_elf_follows_each_models_settings(workspace: Path) -> None:
    base = {"lambda_front": 0.0, "lambda_rear": 0.0}
    cfg = _config(workspace, "kinds", variants={"mixed": {"lambda_front": {"ConvNetW4D2": 0.0, "*": 0.0},
                                                          "lambda_rear": {"ConvNetW4D2BN": 0.5, "*": 0.0}},
                                                "off": {k: {"*": 0.0} for k in base}, "elf": {}})
    assert [v for v in cfg.variants if elf.study._is_elf(cfg, v)] == ["mixed", "elf"]
    assert {r.variant for r in plan_runs(cfg) if r.set.startswith("random-real")} == {"off"}  # the first baseline
    # the study's overrides count too: with both λ = 0 there, a variant that sets neither is a baseline
    assert not elf.study._is_elf(_config(workspace, "kinds", overrides={"epochs": 1, **base}, variants={"elf": {}}), "elf")
    # and so does the protocol (regression: λ were taken as 1 whatever the preset): under "dsa", {} is a baseline and
    # the random-real references run under it
    dsa = _config(workspace, "kinds", protocol="dsa", variants={"plain": {}, "elf": {"lambda_front": 1.0, "lambda_rear": 1.0}})
    assert [v for v in dsa.variants if elf.study._is_elf(dsa, v)] == ["elf"]
    assert {r.variant for r in plan_runs(dsa) if r.set.startswith("random-real")} == {"plain"}


def test_the_summary_averages_only_the_studys_seeds(workspace: Path) -> None:
    cfg = _config(workspace, "seeds", variants={"baseline": {"lambda_front": 0.0, "lambda_rear": 0.0}},
                  random_real=False, models=["ConvNetW4D2"])
    run_study(cfg, device="cpu", progress=False, log=lambda _: None)
    rows = {r["seed"]: float(r["accuracy"]) for r in csv.DictReader((Path(cfg.out) / "summary.csv").open())}
    cfg.seeds = [0]  # seed 1's run stays in runs/: it used to be averaged into a table that says "seeds [0]"
    table = summarize(cfg).read_text()
    assert f"| noise | ConvNetW4D2 | {rows['0']:.2f} ± 0.00 |" in table
    assert "Runs of seeds [1] are in `runs/`" in table


def test_toml_and_yaml_configs_via_cli(workspace: Path, capsys: pytest.CaptureFixture[str]) -> None:
    toml = workspace / "study.toml"
    toml.write_text("""
name = "tiny"
data = "data"
models = ["ConvNetW4D2"]
seeds = 1
out = "out-toml"
random_real = false
[sets]
noise = "syn.safetensors"
[teachers.w4]
checkpoint = "teacher.safetensors"
model = "ConvNetW4D2"
[overrides]
epochs = 1
[variants.baseline]
lambda_front = 0.0
lambda_rear = 0.0
[variants.elf]
""")
    assert main(["study", str(toml), "--no-progress", "--device", "cpu"]) == 0
    assert "| noise | ConvNetW4D2 |" in capsys.readouterr().out
    assert len(list((workspace / "out-toml" / "runs").glob("*.json"))) == 2
    yaml_file = workspace / "study.yaml"
    yaml_file.write_text("name: tiny\ndata: data\nmodels: [ConvNetW4D2]\nsets: {noise: syn.safetensors}\n"
                         "variants: {baseline: {lambda_front: 0, lambda_rear: 0}}\nseeds: [3]\nrandom_real: false\n"
                         "overrides: {epochs: 1}\nout: out-yaml\n")
    cfg = load_config(yaml_file)
    assert cfg.seeds == [3] and cfg.sets["noise"] == str(workspace / "syn.safetensors")
    assert main(["study", str(yaml_file), "--no-progress", "--device", "cpu"]) == 0
    assert main(["study", str(workspace / "nope.toml")]) == 2
    assert "no such study file" in capsys.readouterr().err
    bad = workspace / "bad.toml"
    bad.write_text('data = "x"\nmodels = []\nsets = {}\ncolour = 1\n')
    assert main(["study", str(bad)]) == 2
    assert "unknown study setting(s) ['colour']" in capsys.readouterr().err


def test_summary_plot(workspace: Path) -> None:
    pytest.importorskip("matplotlib")  # in the dev extra, so CI runs this
    cfg = _config(workspace, "s3", models=["ConvNetW4D2"], seeds=[0], random_real=False)
    run_study(cfg, device="cpu", progress=False, log=lambda _: None)
    png = Path(cfg.out) / "summary.png"
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 1000


def test_torchrun_ranks_split_the_study(workspace: Path) -> None:
    """Two CPU ranks under torchrun (gloo on loopback): every run done once, rank 0 writes the summary."""
    import subprocess
    import sys

    cfg_file = workspace / "dist.yaml"
    cfg_file.write_text("name: dist\ndata: data\nmodels: [ConvNetW4D2, ConvNetW4D2BN]\nsets: {noise: syn.safetensors}\n"
                        "teachers: {w4: {checkpoint: teacher.safetensors, model: ConvNetW4D2}}\n"
                        "seeds: [0, 1]\nrandom_real: false\noverrides: {epochs: 1}\nout: out-dist\n")
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "elf", "study", str(cfg_file), "--no-progress"], capture_output=True, text=True,
                          timeout=300, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    runs = sorted((workspace / "out-dist" / "runs").glob("*.json"))
    assert len(runs) == 2 * 2 * 2  # models x variants (baseline, elf) x seeds
    assert proc.stderr.count("/4] ") == 8  # each of the two ranks ran its own 4 runs, not all 8
    assert "| noise | ConvNetW4D2BN |" in (workspace / "out-dist" / "summary.md").read_text()
    assert proc.stdout.count("| noise | ConvNetW4D2BN |") == 1  # printed by rank 0 only


def test_batched_study_equals_sequential(workspace: Path) -> None:
    """`batched = true`: a cell's seeds train at once; the run files hold the accuracies of one-by-one runs."""
    seq = _config(workspace, "seq-b", random_real=False, seeds=[0, 1, 2])
    bat = _config(workspace, "bat-b", random_real=False, seeds=[0, 1, 2], batched=True)
    run_study(seq, device="cpu", progress=False, log=lambda _: None)
    files = run_study(bat, device="cpu", progress=False, log=lambda _: None)
    assert len(files) == 2 * 3 * 3 and all(f.exists() for f in files)
    for f in files:
        b = json.loads(f.read_text())
        s = json.loads((Path(seq.out) / "runs" / f.name).read_text())
        assert b["accuracy"] == pytest.approx(s["accuracy"], abs=1e-6), f.name
        assert b["batched"]["seeds"] == 3 and b["run"] == s["run"]
    lost = files[4]
    lost.unlink()  # a lost run: its cell's other seeds are kept, only it runs again
    run_study(bat, device="cpu", progress=False, log=lambda _: None)
    assert json.loads(lost.read_text())["batched"]["seeds"] == 1
    with pytest.raises(elf.ELFError, match="batched"):
        run_study(_config(workspace, "x", compile=True), device="cpu", progress=False, log=lambda _: None)


def test_a_batched_cell_that_cannot_be_batched_runs_each_seed_with_its_checkpoints(workspace: Path, monkeypatch) -> None:
    """Regression: a cell whose model falls back (dropout) trained its seeds one by one inside one batched call,
    without the per-run checkpoints of a sequential study, and a divergence then retrained every seed again."""
    from torch import nn

    import elf.study
    from elf.models import register_model

    class DropNet(nn.Module):
        def __init__(self, channel: int = 3, num_classes: int = 3) -> None:
            super().__init__()
            self.features = nn.Sequential(nn.Conv2d(channel, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1))
            self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(4, num_classes))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.classifier(self.features(x))

    register_model("DropNetStudyTest", lambda channel, num_classes: DropNet(channel, num_classes), override=True)
    executed: list[str] = []
    execute = elf.study._execute
    monkeypatch.setattr(elf.study, "_execute", lambda run, *a: executed.append(run.run_id) or execute(run, *a))
    said: list[str] = []
    cfg = _config(workspace, "drop-b", models=["DropNetStudyTest"], random_real=False, seeds=[0, 1], batched=True,
                  variants={"baseline": {"lambda_front": 0.0, "lambda_rear": 0.0}})
    files = run_study(cfg, device="cpu", progress=False, log=said.append)
    assert executed == ["noise__DropNetStudyTest__baseline__s0", "noise__DropNetStudyTest__baseline__s1"]
    for f in files:
        assert "random numbers" in json.loads(f.read_text())["batched"]["fallback"]
    assert any("fall back to one run at a time" in line for line in said)


class _Killed(BaseException):
    """Stands in for the process being killed (not an Exception: keep_going must not swallow it)."""


def test_a_killed_run_resumes_from_its_checkpoint(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """No lost work: a run killed after its second checkpoint restarts there, and its record (accuracy, weights'
    history, epochs) equals that of the uninterrupted run; the checkpoints are removed once the record is written."""
    from elf.run_checkpoint import RunCheckpoint

    kw = dict(models=["ConvNetW4D2BN"], variants={"elf": {}}, seeds=[0], random_real=False,
              overrides={"epochs": 6, "batch_size": 3}, checkpoint_minutes=1e-9)  # a checkpoint every epoch
    whole = run_study(_config(workspace, "ck-whole", **kw), device="cpu", progress=False, log=lambda _: None)
    ref = json.loads(whole[0].read_text())
    assert not list((workspace / "ck-whole" / "partial").iterdir())

    cfg = _config(workspace, "ck-killed", **kw)
    original = RunCheckpoint.save
    saves: list[int] = []

    def save_then_die(self, trainer, finished, now=None):
        original(self, trainer, finished, now)
        saves.append(finished)
        if len(saves) == 2:
            raise _Killed

    monkeypatch.setattr(RunCheckpoint, "save", save_then_die)
    with pytest.raises(_Killed):
        run_study(cfg, device="cpu", progress=False, log=lambda _: None)
    partial = sorted(p.name for p in (workspace / "ck-killed" / "partial").iterdir())
    assert partial == ["noise__ConvNetW4D2BN__elf__s0.e1.state.safetensors", "noise__ConvNetW4D2BN__elf__s0.json"]
    monkeypatch.setattr(RunCheckpoint, "save", original)
    said: list[str] = []
    files = run_study(cfg, device="cpu", progress=False, log=said.append)
    rec = json.loads(files[0].read_text())
    assert any("resuming at epoch 3" in s for s in said)
    assert rec["resumed_at_epochs"] == [2]
    assert rec["accuracy"] == ref["accuracy"]
    drop_time = lambda h: [{k: v for k, v in r.items() if k != "time_s"} for r in h]  # noqa: E731
    assert drop_time(rec["history"]) == drop_time(ref["history"])
    assert [r["epoch"] for r in rec["history"]] == [float(e) for e in range(7)]  # 6 epochs + the extra epoch
    assert not list((workspace / "ck-killed" / "partial").iterdir())


def test_a_checkpoint_of_other_settings_is_not_resumed(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint saved under other settings (here lambda_rear), or one whose state file was changed, is dropped
    with a message and the run starts over; the record then has no resumed_at_epochs."""
    from elf.run_checkpoint import RunCheckpoint

    kw = dict(models=["ConvNetW4D2"], seeds=[0], random_real=False, checkpoint_minutes=1e-9)
    first = _config(workspace, "ck-other", variants={"elf": {"lambda_rear": 0.5}}, overrides={"epochs": 4, "batch_size": 3},
                    **kw)
    original = RunCheckpoint.save

    def save_then_die(self, trainer, finished, now=None):
        original(self, trainer, finished, now)
        raise _Killed

    monkeypatch.setattr(RunCheckpoint, "save", save_then_die)
    with pytest.raises(_Killed):
        run_study(first, device="cpu", progress=False, log=lambda _: None)
    monkeypatch.setattr(RunCheckpoint, "save", original)
    changed = _config(workspace, "ck-other", variants={"elf": {"lambda_rear": 1.0}},
                      overrides={"epochs": 4, "batch_size": 3}, **kw)
    said: list[str] = []
    files = run_study(changed, device="cpu", progress=False, log=said.append)
    assert any("saved for other settings" in s and "protocol" in s for s in said)
    assert "resumed_at_epochs" not in json.loads(files[0].read_text())

    # regression: a baseline's checkpoint named its set only by name, so it resumed after the set file was replaced
    syn = workspace / "syn-ck.safetensors"
    save_synthetic(syn, SyntheticSet(torch.randn(6, 3, 8, 8), torch.arange(3).repeat_interleave(2), normalization=CIFAR10_MTT))
    base = dict(variants={"baseline": {"lambda_front": 0.0, "lambda_rear": 0.0}}, overrides={"epochs": 4, "batch_size": 3},
                sets={"noise": str(syn)}, **kw)
    monkeypatch.setattr(RunCheckpoint, "save", save_then_die)
    with pytest.raises(_Killed):
        run_study(_config(workspace, "ck-set", **base), device="cpu", progress=False, log=lambda _: None)
    monkeypatch.setattr(RunCheckpoint, "save", original)
    save_synthetic(syn, SyntheticSet(torch.full((6, 3, 8, 8), 0.5), torch.arange(3).repeat_interleave(2),
                                     normalization=CIFAR10_MTT))  # (training reseeds torch: randn would repeat the set)
    said.clear()
    files = run_study(_config(workspace, "ck-set", **base), device="cpu", progress=False, log=said.append)
    assert any("saved for other settings" in s and "set_sha256" in s for s in said), said
    assert "resumed_at_epochs" not in json.loads(files[0].read_text())

    # a state file that no longer matches its SHA-256 is not trusted either
    ck = RunCheckpoint(workspace / "ck-sha", "r", 0, {"a": 1}, log=said.append)
    (workspace / "ck-sha").mkdir()
    (workspace / "ck-sha" / "r.e0.state.safetensors").write_bytes(b"x")
    (workspace / "ck-sha" / "r.json").write_text(json.dumps({"identity": {"a": 1}, "state": "r.e0.state.safetensors",
                                                              "state_sha256": "0" * 64, "history": [], "epoch": 0,
                                                              "elapsed_s": 1.0}))
    assert ck.load() is None and any("does not match its SHA-256" in s for s in said)
    assert not list((workspace / "ck-sha").iterdir())


def test_checkpoint_minutes_is_checked(workspace: Path) -> None:
    with pytest.raises(elf.ELFError, match="checkpoint_minutes"):
        _config(workspace, "x", checkpoint_minutes=-1).check()


def test_finished_runs_made_with_other_settings_stop_the_study(workspace: Path) -> None:
    """No silent wrong numbers: after a variant's settings change, its finished runs would be skipped and summarized
    as if made with the new ones. The study refuses to start and names them; a baseline is not stale for fields of
    the ELF terms, nor a record for a protocol field it predates."""
    from elf.study import stale_runs

    kw = dict(models=["ConvNetW4D2"], seeds=[0], random_real=False, overrides={"epochs": 1, "batch_size": 3})
    cfg = _config(workspace, "stale", variants={"baseline": {"lambda_front": 0.0, "lambda_rear": 0.0},
                                                 "elf": {"lambda_rear": 0.5}}, **kw)
    run_study(cfg, device="cpu", progress=False, log=lambda _: None)
    assert stale_runs(cfg) == []
    changed = _config(workspace, "stale", variants={"baseline": {"lambda_front": 0.0, "lambda_rear": 0.0,
                                                                 "distance": "mse", "align_targets": True},
                                                    "elf": {"lambda_rear": 1.0}}, **kw)
    assert stale_runs(changed) == [("noise__ConvNetW4D2__elf__s0", "lambda_rear: recorded 0.5, study file now 1.0")]
    with pytest.raises(elf.ELFError, match=r"1 finished run\(s\).*noise__ConvNetW4D2__elf__s0 \(lambda_rear"):
        run_study(changed, device="cpu", progress=False, log=lambda _: None)
    summary = summarize(changed).read_text()  # summarizing alone still works, and says so
    assert "**Warning:** 1 run(s) above were made with other settings" in summary and "lambda_rear" in summary
    path = workspace / "stale" / "runs" / "noise__ConvNetW4D2__elf__s0.json"
    record = json.loads(path.read_text())
    del record["protocol"]["lambda_rear"]  # a record older than the field
    path.write_text(json.dumps(record))
    assert stale_runs(changed) == []
    split = _config(workspace, "stale", variants={"baseline": {"lambda_front": 0.0, "lambda_rear": 0.0},
                                                   "elf": {"lambda_rear": 0.5, "split_at": "features.0"}}, **kw)
    assert [why.split(":")[0] for _, why in stale_runs(split)] == ["split_at"]


def test_a_set_or_teacher_file_replaced_under_the_same_name_makes_its_runs_stale(workspace: Path, tmp_path: Path) -> None:
    """Regression: finished runs were compared with the study file by protocol and cut only, so a set or a teacher
    checkpoint replaced under the same name left runs of the old files to be summarized with the new ones."""
    import shutil

    from elf.study import stale_runs

    syn, ckpt = tmp_path / "syn.safetensors", tmp_path / "teacher.safetensors"
    shutil.copy(workspace / "syn.safetensors", syn)
    shutil.copy(workspace / "teacher.safetensors", ckpt)
    cfg = _config(tmp_path, "out", data=str(workspace / "data"), sets={"noise": str(syn)},
                  teachers={"w4": {"checkpoint": str(ckpt), "model": "ConvNetW4D2"}}, models=["ConvNetW4D2"], seeds=[0],
                  random_real=False, variants={"baseline": {"lambda_front": 0.0, "lambda_rear": 0.0}, "elf": {}})
    run_study(cfg, device="cpu", progress=False, log=lambda _: None)
    record = json.loads((tmp_path / "out" / "runs" / "noise__ConvNetW4D2__elf__s0.json").read_text())
    assert record["teacher_label"] == "w4" and len(record["set_sha256"]) == 64
    assert stale_runs(cfg) == []
    torch.manual_seed(5)
    elf.save_checkpoint(elf.create_model("ConvNetW4D2", num_classes=3, im_size=(8, 8)), ckpt)
    assert stale_runs(cfg) == [("noise__ConvNetW4D2__elf__s0", f"teacher 'w4': {ckpt} is not the checkpoint the run used")]
    save_synthetic(syn, SyntheticSet(torch.zeros(6, 3, 8, 8), torch.arange(3).repeat_interleave(2), normalization=CIFAR10_MTT))
    assert sorted(why.split(":")[0] for _, why in stale_runs(cfg)) == ["set 'noise'", "set 'noise'"]


def test_the_stale_check_works_with_a_set_file_not_at_hand(workspace: Path, tmp_path: Path) -> None:
    """Regression: with random-real references, the stale check planned the references by reading every set's size,
    so a study whose set file is not here (e.g. made under the ignored benchmarks/work/) could not be checked at all
    ("no such file"), and its summary said its runs were not compared."""
    import shutil

    from elf.study import stale_runs

    syn = tmp_path / "syn.safetensors"
    shutil.copy(workspace / "syn.safetensors", syn)
    kw = dict(data=str(workspace / "data"), sets={"noise": str(syn)}, models=["ConvNetW4D2"], seeds=[0],
              variants={"baseline": {"lambda_front": 0.0, "lambda_rear": 0.0}})
    run_study(_config(workspace, str(tmp_path / "out"), **kw), device="cpu", progress=False, log=lambda _: None)
    syn.unlink()
    changed = _config(workspace, str(tmp_path / "out"), **{**kw, "overrides": {"epochs": 2, "batch_size": 3}})
    assert sorted(stale_runs(changed)) == [("noise__ConvNetW4D2__baseline__s0", "epochs: recorded 1, study file now 2")]
    assert "not compared" not in summarize(changed).read_text()
    with pytest.raises(elf.ELFError, match="no such file"):  # planning a study to run it still needs its sets
        plan_runs(changed)


def test_runs_of_another_teacher_label_or_another_split_of_the_data_are_stale(workspace: Path, tmp_path: Path) -> None:
    """A variant switched to another teacher (both still in the file), or a study switched between validation and
    test, left its finished runs to be skipped and summarized under the new setting (the test table's heading over
    validation numbers)."""
    from elf.study import stale_runs

    teachers = {"w4": {"checkpoint": str(workspace / "teacher.safetensors"), "model": "ConvNetW4D2"},
                "w4b": {"checkpoint": str(workspace / "teacher.safetensors"), "model": "ConvNetW4D2"}}
    kw = dict(teachers=teachers, models=["ConvNetW4D2"], seeds=[0], random_real=False, validation_per_class=2)
    cfg = _config(tmp_path, "out", data=str(workspace / "data"), sets={"noise": str(workspace / "syn.safetensors")},
                  variants={"elf": {"teacher": "w4"}}, **kw)
    run_study(cfg, device="cpu", progress=False, log=lambda _: None)
    assert stale_runs(cfg) == []
    other = _config(tmp_path, "out", data=str(workspace / "data"), sets={"noise": str(workspace / "syn.safetensors")},
                    variants={"elf": {"teacher": "w4b"}}, **kw)
    assert stale_runs(other) == [("noise__ConvNetW4D2__elf__s0", "teacher: recorded 'w4', study file now 'w4b'")]
    on_test = _config(tmp_path, "out", data=str(workspace / "data"), sets={"noise": str(workspace / "syn.safetensors")},
                      variants={"elf": {"teacher": "w4"}}, **{**kw, "validation_per_class": None})
    assert [why.split(" '")[0] for _, why in stale_runs(on_test)] == ["measured on"]


def test_also_test_records_the_test_accuracy_of_the_validation_runs(workspace: Path) -> None:
    """`also_test`: a validation study's runs are also tested on the test split, and that number equals what a
    study measured on the test split gives (training does not see the held-out images), batched cells included."""
    kw = dict(models=["ConvNetW4D2"], seeds=[0, 1], random_real=False,
              variants={"baseline": {"lambda_front": 0.0, "lambda_rear": 0.0}, "elf": {}})
    both = _config(workspace, "also-val", validation_per_class=2, also_test=True, **kw)
    files = run_study(both, device="cpu", progress=False, log=lambda _: None)
    on_test = run_study(_config(workspace, "also-test", **kw), device="cpu", progress=False, log=lambda _: None)
    batched = run_study(_config(workspace, "also-bat", validation_per_class=2, also_test=True, batched=True, **kw),
                        device="cpu", progress=False, log=lambda _: None)
    for f, t, b in zip(files, on_test, batched):
        rec, ref, bat = (json.loads(p.read_text()) for p in (f, t, b))
        assert rec["measured_on"].startswith("validation") and rec["test_accuracy_n"] == ref["test_n"]
        assert rec["test_accuracy"] == ref["accuracy"], f.name
        assert bat["test_accuracy"] == pytest.approx(rec["test_accuracy"], abs=1e-6)
        assert bat["accuracy"] == pytest.approx(rec["accuracy"], abs=1e-6)
    summary = (Path(both.out) / "summary.md").read_text()
    assert "Test accuracy (%) of the same runs" in summary and summary.count("| noise | ConvNetW4D2 |") == 2
    rows = list(csv.DictReader((Path(both.out) / "summary.csv").open()))
    assert all(r["test_accuracy"] for r in rows)
    with pytest.raises(elf.ELFError, match="validation_per_class"):
        _config(workspace, "x", also_test=True).check()


@pytest.mark.parametrize("batched", [False, True])
def test_a_variant_can_run_the_teacher_on_the_augmented_images(workspace: Path, batched: bool) -> None:
    """`features_on_augmented = true` in a variant: the study hands the trainer the teacher module (it runs on each
    augmented batch), and the run trains exactly what ELFTrainer(teacher=..., features_on_augmented=True) trains;
    batched cells too (the teacher runs outside vmap, no fallback to one-by-one runs)."""
    cfg = _config(workspace, f"on-aug-{batched}", models=["ConvNetW4D2BN"], seeds=[1], random_real=False,
                  batched=batched,
                  overrides={"epochs": 2, "batch_size": 3},
                  variants={"aug": {"features_on_augmented": True, "align_targets": False}, "elf": {"align_targets": False}})
    files = {f.name: json.loads(f.read_text()) for f in run_study(cfg, device="cpu", progress=False, log=lambda _: None)}
    rec = files["noise__ConvNetW4D2BN__aug__s1.json"]
    assert rec["protocol"]["features_on_augmented"] is True
    if batched:
        assert rec["batched"]["seeds"] == 1 and "fallback" not in rec["batched"], rec["batched"]
    from elf.io import load_synthetic
    from elf.teacher import load_teacher

    sset = load_synthetic(workspace / "syn.safetensors")
    teacher = load_teacher("ConvNetW4D2", workspace / "teacher.safetensors", num_classes=3, im_size=(8, 8))
    direct = elf.ELFTrainer.from_synthetic("ConvNetW4D2BN", sset, teacher=teacher, device="cpu", progress=False,
                                           epochs=2, batch_size=3, features_on_augmented=True, align_targets=False)
    history = direct.fit(1)
    assert [h["front"] for h in rec["history"]] == pytest.approx([h["front"] for h in history], rel=1e-5)
    # the teacher saw other images than the cached bank's: the front loss differs from the bank's run
    plain = files["noise__ConvNetW4D2BN__elf__s1.json"]
    assert rec["history"][0]["front"] != pytest.approx(plain["history"][0]["front"], rel=1e-3)


def test_each_set_is_measured_in_its_own_pixel_space_and_class_numbering(workspace: Path, tmp_path: Path) -> None:
    """Regression: a study measured every set on test images in the study's normalization with labels numbered by the
    data's folders. Now, as `elf eval` does, each set gets its own normalization, ZCA when it is whitened, and labels
    numbered by its class names."""
    from elf.data import load_dataset
    from elf.pixel_space import IMAGENET, fit_zca_cached
    from elf.study import _Resources

    x, y = torch.randn(6, 3, 8, 8), torch.arange(3).repeat_interleave(2)
    sets = {"named": SyntheticSet(x, y, normalization=CIFAR10_MTT, classes=["a", "b", "c"]),
            "reversed": SyntheticSet(x, 2 - y, normalization=CIFAR10_MTT, classes=["c", "b", "a"]),
            "imagenet": SyntheticSet(x, y, normalization=IMAGENET),
            "zca": SyntheticSet(x, y, normalization=CIFAR10_MTT, zca=True)}
    for name, s in sets.items():
        save_synthetic(tmp_path / f"{name}.safetensors", s)
    cfg = _config(workspace, "space", sets={k: str(tmp_path / f"{k}.safetensors") for k in sets})
    res = _Resources(cfg, None, lambda _: None)
    real = load_dataset(str(workspace / "data"), "test", progress=False)
    for final in (False, True):
        named, rev = res.test("named", final), res.test("reversed", final)
        assert torch.equal(named[0], rev[0]) and torch.equal(rev[1], 2 - named[1])
    assert torch.equal(res.test("named")[1], real.labels) and torch.equal(res.test("named")[0], real.as_float(CIFAR10_MTT))
    assert torch.equal(res.test("imagenet")[0], real.as_float(IMAGENET))
    zca = fit_zca_cached(load_dataset(str(workspace / "data"), "train", progress=False), CIFAR10_MTT, eps=0.1)
    assert torch.allclose(res.test("zca")[0], zca.transform(real.as_float(CIFAR10_MTT)))


def test_a_set_whose_class_names_are_not_in_the_data_stops_before_training(workspace: Path, tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    save_synthetic(tmp_path / "other.safetensors", SyntheticSet(torch.randn(6, 3, 8, 8), torch.arange(3).repeat_interleave(2),
                                                                normalization=CIFAR10_MTT, classes=["a", "b", "plane"]))
    fits = []
    monkeypatch.setattr(elf.ELFTrainer, "fit", lambda *a, **k: fits.append(1))
    cfg = _config(workspace, "names", sets={"other": str(tmp_path / "other.safetensors")}, random_real=False)
    with pytest.raises(elf.ELFError, match=r"class\(es\) \['c'\].*\['a', 'b', 'plane'\]"):
        run_study(cfg, device="cpu", progress=False, log=lambda _: None)
    assert not fits


def test_a_gain_over_cells_of_different_run_counts_says_so(workspace: Path) -> None:
    """summary.md's gain compared a 2-run cell with a 3-run one without a word; the also_test table also showed
    "(2 of 3 seeds)" where the validation table said "(1 failed)"."""
    from elf.study import _table

    cfg = _config(workspace, "gain", models=["M"], seeds=[0, 1, 2],
                  variants={"baseline": {"lambda_front": 0.0, "lambda_rear": 0.0}, "elf": {}})
    acc = {("s", "M", "baseline"): [30.0, 31.0, 32.0], ("s", "M", "elf"): [40.0, 41.0]}
    seeds = {("s", "M", "baseline"): [0, 1, 2], ("s", "M", "elf"): [0, 1]}
    row = _table(cfg, acc, ["s"], set(), {("s", "M", "elf"): 1}, seeds)[-1]
    assert row.endswith("| +9.50 (2 vs 3 runs) |") and "(1 failed)" in row
    full = {**acc, ("s", "M", "elf"): [40.0, 41.0, 42.0]}
    assert _table(cfg, full, ["s"], set(), {}, {**seeds, ("s", "M", "elf"): [2, 1, 0]})[-1].endswith("| +10.00 |")
    # regression: as many runs, but of other seeds (baseline 0, 1, 2; elf 1, 2, 3), was shown as a plain gain
    assert _table(cfg, full, ["s"], set(), {}, {**seeds, ("s", "M", "elf"): [1, 2, 3]})[-1].endswith("| +10.00 (other seeds) |")


def test_checkpoints_turned_off_still_run(workspace: Path) -> None:
    """Regression: `checkpoint_minutes = 0` (documented: no checkpoints) handed the trainer callbacks=None, which
    crashed every run trained one by one."""
    cfg = _config(workspace, "no-ck", models=["ConvNetW4D2"], seeds=[0], random_real=False,
                  variants={"baseline": {"lambda_front": 0.0, "lambda_rear": 0.0}}, checkpoint_minutes=0)
    (path,) = run_study(cfg, device="cpu", progress=False, log=lambda _: None)
    assert json.loads(path.read_text())["accuracy"] is not None


@pytest.mark.parametrize("sets, match", [
    ({"mtt/ipc2": "a", "mtt-ipc2": "b"}, "give the same run file"),
    ({"DM": "a", "dm": "b"}, "give the same run file"),
    ({"full-data": "a"}, "name of a reference"),
    ({"random-real:ipc2": "a"}, "name of a reference"),
    ({"my__set": "a"}, "contains '__'"),
])
def test_names_that_would_share_a_run_file_are_refused(workspace: Path, sets: dict[str, str], match: str) -> None:
    """Regression: sets 'mtt/ipc2' and 'mtt-ipc2' wrote one run file (the second was 'done, skipped' and left out of
    the table), and a set named 'full-data' trained on the real training data instead of the set."""
    with pytest.raises(elf.ELFError, match=match):
        _config(workspace, "names", sets={k: str(workspace / "syn.safetensors") for k in sets}).check()
    with pytest.raises(elf.ELFError, match="listed twice"):
        _config(workspace, "names", models=["ConvNetW4D2", "ConvNetW4D2"]).check()


def test_what_the_study_asked_beyond_the_protocol_is_compared(workspace: Path, tmp_path: Path) -> None:
    """Regression: finished runs were not compared on a teacher list the library chose from, a split point set back
    to the model's default, a teacher's point, or the test split's size: old and new runs were averaged in one cell."""
    from elf.study import stale_runs

    w4 = {"checkpoint": str(workspace / "teacher.safetensors"), "model": "ConvNetW4D2"}
    torch.manual_seed(3)
    elf.save_checkpoint(elf.create_model("ConvNetW4D2", num_classes=3, im_size=(8, 8)), tmp_path / "early.safetensors")
    early = {"checkpoint": str(tmp_path / "early.safetensors"), "model": "ConvNetW4D2"}
    kw = dict(data=str(workspace / "data"), sets={"noise": str(workspace / "syn.safetensors")}, models=["ConvNetW4D2"],
              seeds=[0], random_real=False, variants={"elf": {}}, test_per_class=2)
    cfg = _config(tmp_path, "out", teachers={"w4": w4}, **kw)
    run_study(cfg, device="cpu", progress=False, log=lambda _: None)
    assert stale_runs(cfg) == []
    assert stale_runs(_config(tmp_path, "out", teachers={"w4": w4, "early": early}, **kw)) == []  # after the one used
    (why,) = [w for _, w in stale_runs(_config(tmp_path, "out", teachers={"early": early, "w4": w4}, **kw))]
    assert why.startswith("teachers:")  # a teacher of the same shape before it: new seeds would use another
    moved = _config(tmp_path, "out", teachers={"w4": {**w4, "point": "features.3"}}, **kw)
    assert [w.split(":")[0] for _, w in stale_runs(moved)] == ["teachers"]
    assert [w.split(":")[0] for _, w in stale_runs(_config(tmp_path, "out", teachers={"w4": w4}, **{**kw, "test_per_class": 1}))] \
        == ["test_per_class"]
    cut = _config(tmp_path, "cut", teachers={"w4": w4}, **{**kw, "variants": {"elf": {"split_at": "features"}}})
    run_study(cut, device="cpu", progress=False, log=lambda _: None)
    (why,) = [w for _, w in stale_runs(_config(tmp_path, "cut", teachers={"w4": w4}, **kw))]
    assert why.startswith("split_at: recorded 'features', study file now None")


def test_a_run_no_teacher_fitted_is_stale_once_one_does(workspace: Path, tmp_path: Path) -> None:
    from elf.study import stale_runs

    elf.save_checkpoint(elf.create_model("ConvNetW8D2", num_classes=3, im_size=(8, 8)), tmp_path / "w8.safetensors")
    kw = dict(data=str(workspace / "data"), sets={"noise": str(workspace / "syn.safetensors")}, models=["ConvNetW4D2"],
              seeds=[0], random_real=False, variants={"elf": {}})
    w8 = {"w8": {"checkpoint": str(tmp_path / "w8.safetensors"), "model": "ConvNetW8D2"}}
    cfg = _config(tmp_path, "out", teachers=w8, **kw)
    (path,) = run_study(cfg, device="cpu", progress=False, log=lambda _: None)
    assert "not_applicable" in json.loads(path.read_text())
    fits = {**w8, "w4": {"checkpoint": str(workspace / "teacher.safetensors"), "model": "ConvNetW4D2"}}
    assert [w.split(":")[0] for _, w in stale_runs(_config(tmp_path, "out", teachers=fits, **kw))] == ["teachers"]


def test_the_summary_counts_only_the_runs_the_study_file_has(workspace: Path) -> None:
    """Regression: records of a reference or variant dropped from the study stayed in summary.md / summary.csv (a
    test-split reference under the validation table's heading)."""
    base = dict(models=["ConvNetW4D2"], seeds=[0], variants={"baseline": {"lambda_front": 0.0, "lambda_rear": 0.0}, "elf": {}})
    run_study(_config(workspace, "leftover", **base), device="cpu", progress=False, log=lambda _: None)
    fewer = _config(workspace, "leftover", **{**base, "random_real": False,
                                              "variants": {"baseline": {"lambda_front": 0.0, "lambda_rear": 0.0}}})
    table = summarize(fewer).read_text()
    assert "random-real" not in table.split("(Runs in")[0] and "| elf" not in table
    assert "no longer has: not counted above: noise__ConvNetW4D2__elf__s0, random-real:ipc2__ConvNetW4D2__baseline__s0" in table
    rows = list(csv.DictReader((workspace / "leftover" / "summary.csv").open()))
    assert [(r["set"], r["variant"]) for r in rows] == [("noise", "baseline")]


def test_a_run_another_process_holds_is_skipped_and_a_dead_ones_lock_taken_over(workspace: Path) -> None:
    """Regression: two processes on one study folder (overlapping --only, shards of a changed file) trained the same
    run at once, and one crashed deleting the other's checkpoint files. A lock file per run prevents it; the lock
    file of a process that is gone is taken over, even one naming a pid that now belongs to a live process (here
    this one: pids are recycled, e.g. after a container restart, and such a lock was kept forever)."""
    import os
    import socket

    from elf.run_lock import RunLock

    cfg = _config(workspace, "locks", models=["ConvNetW4D2"], seeds=[0, 1], random_real=False,
                  variants={"baseline": {"lambda_front": 0.0, "lambda_rear": 0.0}})
    partial = workspace / "locks" / "partial"
    partial.mkdir(parents=True)
    live = RunLock(partial, ["noise__ConvNetW4D2__baseline__s0"])  # held, as by another process, while the study runs
    assert live.acquire() is None
    left = {"host": socket.gethostname(), "pid": os.getpid(), "since": "2024-01-01"}  # its owner is gone
    (partial / "noise__ConvNetW4D2__baseline__s1.lock").write_text(json.dumps(left))
    said: list[str] = []
    run_study(cfg, device="cpu", progress=False, log=said.append)
    runs = workspace / "locks" / "runs"
    assert not (runs / "noise__ConvNetW4D2__baseline__s0.json").exists()
    assert any("skipped, another process is running it" in s and f"pid {os.getpid()} on" in s for s in said)
    assert (runs / "noise__ConvNetW4D2__baseline__s1.json").exists()
    assert sorted(p.name for p in partial.iterdir()) == ["noise__ConvNetW4D2__baseline__s0.lock"]  # ours released
    live.release()
    assert not list(partial.iterdir())


def test_run_lock_is_held_by_one_process_at_a_time(tmp_path: Path) -> None:
    """Regression: taking over a stale lock was read-unlink-create, so two processes that both saw the dead owner
    could each unlink the other's new lock and both train the run; an empty lock file (its owner killed before
    writing) was never taken over. A lock held by a process that exits is free at once."""
    import subprocess
    import sys

    from elf.run_lock import RunLock

    a, b = RunLock(tmp_path, ["r1", "r2"]), RunLock(tmp_path, ["r2"])
    (tmp_path / "r1.lock").write_text("")  # left empty by a killed owner
    assert a.acquire() is None
    assert b.acquire() is not None and b.acquire() is not None  # no takeover of a live holder, however often asked
    assert RunLock(tmp_path, ["r3", "r1"]).acquire() is not None and not (tmp_path / "r3.lock").exists()  # all or none
    a.release()
    assert b.acquire() is None
    b.release()
    code = ("import sys, time; from pathlib import Path; from elf.run_lock import RunLock; "
            "lock = RunLock(Path(sys.argv[1]), ['r4']); assert lock.acquire() is None; print('held', flush=True); "
            "time.sleep(60)")
    child = subprocess.Popen([sys.executable, "-c", code, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "held"
        other = RunLock(tmp_path, ["r4"])
        held_by = other.acquire()
        assert held_by is not None and held_by.startswith(f"pid {child.pid} on ")
        child.kill()  # killed: the lock file stays, the lock goes with the process
        child.wait()
        assert (tmp_path / "r4.lock").exists() and other.acquire() is None
        other.release()
    finally:
        child.kill()


def test_torchrun_waits_for_slow_ranks(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the process group had torch's default timeout (10 min NCCL, 30 min gloo), so rank 0's final
    barrier failed when another rank's runs took longer, and torchrun stopped that rank mid-run."""
    import torch.distributed as dist

    from elf.study import DISTRIBUTED_TIMEOUT_S, distributed_shard

    made: dict[str, object] = {}
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    monkeypatch.setattr(dist, "init_process_group", lambda backend, **kw: made.update(backend=backend, **kw))
    monkeypatch.setattr(dist, "get_rank", lambda: 1)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    assert distributed_shard() == (1, 2)
    assert made["timeout"].total_seconds() == DISTRIBUTED_TIMEOUT_S >= 24 * 3600


def test_a_missing_teacher_checkpoint_stops_the_study_before_any_run(workspace: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: a teacher path with a typo was found when the first ELF run started, after the baselines had
    trained (hours under the full protocol)."""
    executed: list[str] = []
    monkeypatch.setattr(elf.study, "_execute", lambda run, *a: executed.append(run.run_id))
    cfg = _config(workspace, "no-teacher", teachers={"w4": {"checkpoint": str(workspace / "teacherX.safetensors"),
                                                            "model": "ConvNetW4D2"}})
    with pytest.raises(elf.ELFError, match="teacher 'w4': checkpoint .*teacherX.safetensors does not exist"):
        run_study(cfg, device="cpu", progress=False, log=lambda _: None)
    assert executed == []


def test_an_image_folder_set_is_normalized_like_the_test_images(workspace: Path) -> None:
    """Regression: a set given as a folder of PNGs was loaded in [0, 1] and then labelled with the study's
    normalization, so it trained on unnormalized pixels and was tested on normalized ones."""
    from elf.io import load_image_dir
    from elf.pixel_space import CIFAR10_MTT
    from elf.study import _Resources, stale_runs

    folder = workspace / "data" / "train"  # class subfolders of PNGs: a set in the image-folder format
    cfg = _config(workspace, "pngset", sets={"pngs": str(folder)}, random_real=True)
    got = _Resources(cfg, None, lambda _: None).synthetic("pngs")
    want = load_image_dir(folder, CIFAR10_MTT)
    assert got.normalization == CIFAR10_MTT and torch.equal(got.images, want.images)
    assert float(got.images.min()) < -0.5  # normalized, not [0, 1]
    assert any(r.set.startswith("random-real") for r in plan_runs(cfg))  # planning reads the folder's size
    assert stale_runs(cfg) == []  # and the stale check hashes it as the runs load it
    with pytest.raises(elf.ELFError, match="records no normalization"):
        load_image_dir(folder)


def test_other_real_data_under_the_same_name_makes_the_runs_stale(workspace: Path, tmp_path: Path) -> None:
    """Regression: records named the real data by its folder or file name only, so runs measured on other test images
    (or references trained on other training images) under the same name were summarized with the new ones."""
    import shutil

    from PIL import Image

    from elf.study import stale_runs

    data = tmp_path / "data"
    shutil.copytree(workspace / "data", data)
    cfg = _config(workspace, str(tmp_path / "out"), data=str(data), sets={"noise": str(workspace / "syn.safetensors")},
                  models=["ConvNetW4D2"], seeds=[0], variants={"baseline": {"lambda_front": 0.0, "lambda_rear": 0.0}})
    run_study(cfg, device="cpu", progress=False, log=lambda _: None)
    record = json.loads((tmp_path / "out" / "runs" / "noise__ConvNetW4D2__baseline__s0.json").read_text())
    assert set(record["asked"]["data_source"]) == {"train", "test"}
    assert stale_runs(cfg) == []
    image = next((data / "test").rglob("*.png"))
    Image.new("RGB", (8, 8), (255, 0, 0)).save(image)  # one test image replaced
    stale = stale_runs(cfg)
    assert sorted(run_id for run_id, _ in stale) == ["noise__ConvNetW4D2__baseline__s0",
                                                     "random-real:ipc2__ConvNetW4D2__baseline__s0"]
    assert all(why == f"the real data {data} holds other images than the run was trained and measured on" for _, why in stale)
    shutil.rmtree(data)  # not at hand: not compared on it (a set at hand still is)
    assert stale_runs(cfg) == []


def test_references_train_as_baselines_or_not_at_all(workspace: Path) -> None:
    """Regression: with no baseline variant, the references were planned under a variant "baseline" the study did not
    have, trained with the ELF terms on (the preset's λ) and then left out of the summary (hours of CPU lost); and a
    reference record under a variant other than the references' one, or of a size no set has now, was counted."""
    from elf.study import _in_study

    only_elf = _config(workspace, "refs", variants={"elf": {}})
    assert not [r for r in plan_runs(only_elf) if r.set not in only_elf.sets]
    said: list[str] = []
    run_study(_config(workspace, "refs", variants={"elf": {}}, models=["ConvNetW4D2"], seeds=[0]), device="cpu",
              progress=False, log=said.append)
    assert any("no variant is a baseline" in s for s in said)
    assert sorted(p.name for p in (workspace / "refs" / "runs").iterdir()) == ["noise__ConvNetW4D2__elf__s0.json"]
    two = _config(workspace, "refs", variants={"short": {"lambda_front": 0.0, "lambda_rear": 0.0, "epochs": 1},
                                               "baseline": {"lambda_front": 0.0, "lambda_rear": 0.0}})
    ref = {"set": "random-real:ipc2", "model": "ConvNetW4D2", "variant": "baseline", "seed": 0}
    assert not _in_study(two, ref) and _in_study(two, {**ref, "variant": "short"})
    assert not _in_study(two, {**ref, "set": "random-real:ipc3", "variant": "short"}, {"random-real:ipc2"})


def test_failed_runs_are_checked_and_listed_like_finished_ones(workspace: Path, tmp_path: Path) -> None:
    """Regression: a diverged run's record had no set hash nor what it was measured on, so the stale check kept a
    failure of an old set in the new cell; summary.csv left failed runs out without a word."""
    import shutil

    from elf.study import stale_runs

    syn = tmp_path / "syn.safetensors"
    shutil.copy(workspace / "syn.safetensors", syn)
    cfg = _config(workspace, str(tmp_path / "out"), data=str(workspace / "data"), sets={"noise": str(syn)},
                  models=["ConvNetW4D2"], seeds=[0], random_real=False, variants={"baseline": {"lambda_front": 0.0, "lambda_rear": 0.0}},
                  overrides={"epochs": 1, "batch_size": 3, "lr": 1e12})
    run_study(cfg, device="cpu", progress=False, log=lambda _: None)
    record = json.loads((tmp_path / "out" / "runs" / "noise__ConvNetW4D2__baseline__s0.json").read_text())
    assert record["failed"] and len(record["set_sha256"]) == 64 and record["measured_on"] == "test"
    rows = list(csv.DictReader((tmp_path / "out" / "summary.csv").open()))
    assert [(r["accuracy"], r["status"].split(":")[0]) for r in rows] == [("", "failed")]
    save_synthetic(syn, SyntheticSet(torch.zeros(6, 3, 8, 8), torch.arange(3).repeat_interleave(2), normalization=CIFAR10_MTT))
    assert [run_id for run_id, _ in stale_runs(cfg)] == ["noise__ConvNetW4D2__baseline__s0"]


@pytest.mark.parametrize("setting, match", [
    ({"random_real": "false"}, "random_real takes true/false"),
    ({"models": "ConvNet"}, "models takes a list of model names"),
    ({"sets": ["a.safetensors"]}, "sets takes a table of name = file"),
    ({"test_per_class": 0}, "test_per_class takes a number of images per class >= 1"),
    ({"validation_per_class": 0.5}, "validation_per_class takes a number"),
])
def test_study_settings_of_the_wrong_type_are_refused(setting: dict, match: str) -> None:
    """Regression: random_real = "false" (a string) ran the references, models = "ConvNet" was split into letters,
    a list of sets was a raw AttributeError, validation_per_class = 0.5 a bare TypeError."""
    base = {"sets": {"a": "a.safetensors"}, "models": ["ConvNet"], "data": "d"}
    with pytest.raises(elf.ELFError, match=match):
        StudyConfig.from_dict({**base, **setting})
    # from Python, a Path for a set file and a tuple of models are fine
    cfg = StudyConfig.from_dict({**base, "sets": {"a": Path("a.safetensors")}, "models": ("ConvNet",)})
    assert cfg.sets == {"a": "a.safetensors"} and cfg.models == ["ConvNet"]


def test_a_test_subset_the_data_cannot_give_stops_the_study_before_training(workspace: Path,
                                                                           monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: test_per_class = 1000 on data with 4 test images per class was refused only once the first run had
    trained (hours, in a real study)."""
    executed: list[str] = []
    monkeypatch.setattr(elf.study, "_execute", lambda run, *a: executed.append(run.run_id))
    with pytest.raises(elf.ELFError):
        run_study(_config(workspace, "too-many", test_per_class=1000), device="cpu", progress=False, log=lambda _: None)
    assert executed == []
