"""One call on a GPU machine: a list of stages run against one wall-clock budget (``--budget``, default 540 s).

    python benchmarks/gpu_check.py --data PATH/cifar10-jpeg.tar.gz                       # on the GPU machine: the plan
    python benchmarks/gpu_check.py --data PATH --stages teacher,distill,val,tables       # the first call's stages
    python benchmarks/gpu_check.py --device cpu --tiny --data toy_folder --work /tmp/w   # the CPU path CI tests

``--stages`` (comma list; default ``speed,cuda_tests,table5``: issue #12's measurements, with table5's 12 cells in
12 processes and nothing else on the device; add ``followups`` for issue #9's table, answered on the CPU meanwhile):

  speed       ``speed.py``'s batched-seeds section alone on the device (ConvNet-BN; issue #12), time-boxed by
              ``--speed-seconds``: first eager, k = 1, 5, 10 batched vs one by one (``speed-<device>-batched.json``,
              with each k's loop over one seed's: the issue's "5 seeds in at most 2x one"), then the compiled modes
              at k = 1, 5 in the rest of the box (``speed-<device>-batched-compile.json``). Runs before anything else.
  cuda_tests  the CUDA-only tests, in the background (only when the device is cuda).
  table5      issue #12 item 4: one Table 5 row block, ``gpu_table5_study.toml``: the bundled DM set, ConvNet,
              ConvNetBN, ResNet18, ResNet18BN, VGG11, VGG11BN, baseline and ELF ("elf-official": each model gets the
              teacher of its feature shape, the bundled width-128 ConvNet or the committed width-512 one), 5 seeds
              batched per cell, ``--table5-epochs`` (1000) epochs, all 10,000 test images; sharded by cells over
              ``--procs`` processes; ``results/gpu-table5/``. Its wall time and per-cell times go in gpu-check.json.
  followups   issue #9's follow-up studies named by ``--followups`` (default ``chosen_table``; ``all`` for every one
              of ``FOLLOWUPS``), rerun on the GPU with their own settings (data from ``--data``), sharded over
              ``--followup-procs`` processes in all (in proportion to each study's unfinished runs); results in
              ``results/gpu-<the study's folder without "cpu-">/`` (never the CPU folders: numerics differ).
              ``chosen_table`` is ``gpu_chosen_table_study.toml``: issue #9's table with each model's setting chosen
              on validation data, on one machine (``results/gpu-chosen-table/``), the one follow-up the CPU has not
              answered; the others were answered on the CPU and are there to repeat them on the GPU by name.
  teacher, distill, val, tables   the first call's stages (results committed): train the width-512 ConvNet teacher
              (``elf train-teacher``, time-boxed by ``--teacher-seconds``), distill a DSA set (``elf distill``,
              ``--distill-seconds``), the validation study ``gpu_val_study.toml``, and once teacher and set exist
              (from this call or an earlier one in ``--work``) the ``--epochs`` (300) cross-architecture tables
              ``gpu_cross_arch_study.toml`` / ``gpu_cross_arch_dsa_study.toml`` over ``--procs`` (+ half) processes.

Order: speed alone; then cuda_tests in the background, one decode of the real data into the cache, and every other
selected stage in parallel (tables once teacher and distill have finished). A process still running at the
deadline gets SIGINT (then SIGKILL 10 s later): finished study runs are files and stay, and a second call skips them
(a batched cell is written when its seeds finish together). Results go to ``--results`` (default benchmarks/results)
with ``gpu-check.json`` (device, budget, the stages selected, stage and process times; an earlier gpu-check.json is
kept as ``gpu-check-<its finished_at>.json``, its logs of the same names likewise) and ``gpu-check-<process>.log``.

``--tiny``: toy sizes for the CPU test: a few models (``TINY_MODELS``; the ViT with 6 blocks), seeds [0] (table5:
[0, 1], still batched), ``--epochs`` epochs for every study, ``test_per_class = 2`` / ``validation_per_class = 1``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STUDIES = {"val": "gpu_val_study.toml", "dm": "gpu_cross_arch_study.toml", "dsa": "gpu_cross_arch_dsa_study.toml",
           "table5": "gpu_table5_study.toml"}
#: issue #9's follow-ups, committed as CPU studies; the GPU reruns them into results/gpu-<out folder without "cpu-">
FOLLOWUPS = {"teacher_choice": "cpu_teacher_choice_study.toml", "vit_val": "followup_vit_val_study.toml",
             "vit_test": "followup_vit_test_study.toml", "in_models_val": "followup_in_models_val_study.toml",
             "front_scale_val": "followup_front_scale_val_study.toml",
             "onaug_val": "followup_teacher_on_aug_val_study.toml", "chosen_table": "gpu_chosen_table_study.toml"}
TINY_VIT = "timm.vit_tiny_patch16_224:patch_size=4,depth=6"  # the studies' ViT-Tiny/4, 6 blocks (blocks.5 is the last)
TINY_MODELS = {"val": ["ConvNetW64", TINY_VIT], "dm": ["ConvNet", "AlexNet", "torchvision.resnet18"], "dsa": ["ConvNet"],
               "table5": ["ConvNetBN", "VGG11BN"],  # both teachers (128x4x4, 512x4x4); BatchNorm inside vmap
               "teacher_choice": ["ConvNet"], "vit_val": [TINY_VIT], "vit_test": [TINY_VIT], "in_models_val": ["ConvNet"],
               "front_scale_val": ["ConvNetBN"], "onaug_val": ["ConvNet"],
               "chosen_table": ["ConvNetBN", "VGG11"]}  # w128 exact shape; w512 run on the augmented batches
STAGES = ["speed", "cuda_tests", "table5", "followups", "teacher", "distill", "val", "tables"]
DEFAULT_STAGES = "speed,cuda_tests,table5"  # table5 alone on the device: issue #12's block time, not shared
DEFAULT_FOLLOWUPS = "chosen_table"  # what the CPU could not answer: issue #9's whole table on one machine
STAGE_STUDIES = {"val": ["val"], "tables": ["dm", "dsa"], "table5": ["table5"]}  # followups: --followups


def _followups(value: str) -> list[str]:
    """``--followups``: a comma list of ``FOLLOWUPS`` names, or ``all``; in ``FOLLOWUPS``' order."""
    names = [n.strip() for n in value.split(",") if n.strip()]
    if names == ["all"]:
        return list(FOLLOWUPS)
    unknown = sorted(set(names) - set(FOLLOWUPS))
    if unknown or not names:
        raise argparse.ArgumentTypeError(f"unknown follow-up(s) {unknown}; names are all, {', '.join(FOLLOWUPS)}")
    return [n for n in FOLLOWUPS if n in names]


def _study_config(name: str, args: argparse.Namespace) -> Any:
    """The study's TOML with this run's data, work paths, results folder and (``--tiny``) toy sizes."""
    from elf.study import load_config

    cfg = load_config(HERE / (STUDIES.get(name) or FOLLOWUPS[name]))
    cfg.data = args.data
    if name in FOLLOWUPS:  # their own settings (epochs, seeds, teachers); results in a GPU-named folder
        folder = Path(cfg.out).name
        cfg.out = str(Path(args.results) / ("gpu-" + folder.removeprefix("cpu-")))
        where = "GPU" if args.device.startswith("cuda") else args.device
        cfg.name = cfg.name.replace("(CPU)", "").rstrip() + f" ({where}, benchmarks/gpu_check.py)"
        if args.tiny:
            cfg.overrides["epochs"] = args.epochs
    elif name == "table5":
        cfg.out = str(Path(args.results) / Path(cfg.out).name)
        cfg.overrides["epochs"] = args.epochs if args.tiny else args.table5_epochs
        cfg.compile = args.table5_compile
    else:  # the first call's studies, as they ran
        work = Path(args.work)
        if "w512" in cfg.teachers:
            cfg.teachers["w512"]["checkpoint"] = str(work / "teacher_w512.safetensors")
        if "dsa" in cfg.sets:
            cfg.sets["dsa"] = str(work / "dsa_ipc10.safetensors")
        cfg.out = str(Path(args.results) / Path(cfg.out).name)
        cfg.overrides["epochs"] = args.epochs
    if args.tiny:
        cfg.models = TINY_MODELS.get(name, cfg.models[:1])
        cfg.seeds = [0, 1] if name == "table5" else [0]
        cfg.variants = {k: v for k, v in list(cfg.variants.items())[:3]}
        if cfg.validation_per_class:
            cfg.validation_per_class = 1
        else:
            cfg.test_per_class = 2
    return cfg


def _units(cfg: Any) -> tuple[list[list[Any]], list[list[Any]]]:
    """``(all, unfinished)``: the study's units of work as run_study shards them (cells when batched, else runs)."""
    from elf.study import plan_units

    units = plan_units(cfg)
    runs = Path(cfg.out) / "runs"
    return units, [u for u in units if not all((runs / f"{r.run_id}.json").exists() for r in u)]


def worker(args: argparse.Namespace) -> int:
    """One shard of one study (a separate process)."""
    from elf.study import run_study

    cfg = _study_config(args.worker, args)
    i, n = (int(x) for x in args.shard.split("/"))
    run_study(cfg, shard=(i, n), device=args.device, progress=False, log=lambda s: print(s, flush=True), keep_going=True)
    return 0


def _interruptible() -> None:
    """In a worker, before its program starts: SIGINT back to the default, so the cut at the deadline is a
    KeyboardInterrupt (the run saves a checkpoint) even when this script was started from a shell that ignores SIGINT
    (a non-interactive ``cmd &``), whose children would inherit the ignore and be killed 10 s later instead."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


class Stage:
    """Background processes with a deadline; their output goes to one log file each."""

    def __init__(self, logs: Path, t_ref: float) -> None:
        self.logs = logs
        self.t_ref = t_ref
        self.procs: dict[str, tuple[subprocess.Popen[bytes], float, float]] = {}
        self.ended: dict[str, float] = {}

    def start(self, name: str, cmd: list[str], deadline: float) -> None:
        log = open(self.logs / f"{name}.log", "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env,
                                             preexec_fn=_interruptible), deadline, time.time())
        print(f"[{time.strftime('%H:%M:%S')}] start {name}: {' '.join(cmd)}", flush=True)

    def wait(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """Wait for ``names``; a process past its deadline gets SIGINT, then SIGKILL 10 s later (all overdue
        processes at once, so a cut stage ends within ~10 s of its deadline)."""
        out: dict[str, dict[str, Any]] = {}
        signalled: dict[str, float] = {}
        pending = list(names)
        while pending:
            for name in list(pending):
                proc, deadline, t0 = self.procs[name]
                rc = proc.poll()
                now = time.time()
                if rc is None and name not in signalled and now > deadline:
                    proc.send_signal(signal.SIGINT)
                    signalled[name] = now
                elif rc is None and name in signalled and now > signalled[name] + 10:
                    proc.kill()
                    rc = proc.wait()
                if rc is not None:
                    end = signalled.get(name, now)
                    self.ended[name] = end
                    out[name] = {"rc": rc, "seconds": round(end - t0, 1), "cut_by_budget": name in signalled,
                                 "start_s": round(t0 - self.t_ref, 1)}
                    pending.remove(name)
                    print(f"[{time.strftime('%H:%M:%S')}] {name}: {out[name]}", flush=True)
            if pending:
                time.sleep(0.5)
        return out

    def span(self, names: list[str]) -> float | None:
        """Wall seconds from the first start to the last end of ``names`` (None if none ran)."""
        names = [n for n in names if n in self.ended]
        if not names:
            return None
        return round(max(self.ended[n] for n in names) - min(self.procs[n][2] for n in names), 1)


def _latest(folder: Path, pattern: str) -> Path | None:
    files = sorted(folder.glob(pattern))
    return files[-1] if files else None


def _start_study(stage: Stage, name: str, procs: int, args: argparse.Namespace, end: float,
                 info: dict[str, Any]) -> list[str]:
    """Start up to ``procs`` shards of study ``name`` (none when every run is finished); their process names."""
    cfg = _study_config(name, args)
    units, todo = _units(cfg)
    n = max(1, min(procs, len(todo)))
    info[name] = {"out": _portable(cfg.out), "units": len(units), "unfinished_at_start": len(todo),
                  "processes": n if todo else 0, "epochs": cfg.overrides.get("epochs"), "seeds": cfg.seeds,
                  "batched": cfg.batched, "compile": cfg.compile}
    if not todo:
        print(f"[{time.strftime('%H:%M:%S')}] {name}: every run finished already, skipped", flush=True)
        return []
    names = [f"{name}_{i}" for i in range(n)]
    for i, proc_name in enumerate(names):
        stage.start(proc_name, [sys.executable, __file__, "--worker", name, "--shard", f"{i}/{n}", *_pass(args)], end)
    return names


def _share(procs: int, todo: dict[str, int]) -> dict[str, int]:
    """Processes per study: ``procs`` in all, in proportion to each study's unfinished units (at least one where
    any is unfinished, never more than it has)."""
    total = sum(todo.values()) or 1
    return {name: min(k, max(1, round(procs * k / total))) for name, k in todo.items()}


def _cells(cfg: Any) -> dict[str, Any]:
    """What a study's run files say: cells finished, per cell the seeds' summed wall time and how they ran."""
    units, todo = _units(cfg)
    runs = Path(cfg.out) / "runs"
    cells: dict[str, Any] = {}
    for unit in units:
        recs = [json.loads((runs / f"{r.run_id}.json").read_text()) for r in unit if (runs / f"{r.run_id}.json").exists()]
        if not recs:
            continue
        r0 = unit[0]
        key = f"{r0.set} / {r0.model} / {r0.variant}" + ("" if cfg.batched else f" / s{r0.seed}")
        accs = [r["accuracy"] for r in recs if r.get("accuracy") is not None]
        cells[key] = {"runs": len(recs), "wall_s": round(sum(r.get("wall_time_s") or 0 for r in recs), 1),
                      "mean_accuracy": round(sum(accs) / len(accs), 2) if accs else None,
                      "batched": recs[0].get("batched"),
                      "teacher": (recs[0].get("teacher") or {}).get("teacher_model"),
                      "not_applicable_or_failed": sum(r.get("accuracy") is None for r in recs)}
    return {"units_total": len(units), "units_done": len(units) - len(todo), "cells": cells}


def _archive_previous(results: Path, started_at: str) -> str | None:
    """Keep an earlier call's gpu-check.json as ``gpu-check-<its finished_at>.json`` (reports without one:
    ``gpu-check-before-<this call's start>.json``); the tag used, or None when there was none."""
    old = results / "gpu-check.json"
    if not old.exists():
        return None
    try:
        tag = str(json.loads(old.read_text()).get("finished_at") or f"before-{started_at}")
    except (json.JSONDecodeError, AttributeError):
        tag = f"before-{started_at}"
    tag = "".join(c if c.isalnum() or c in "-_" else "-" for c in tag)
    target, k = results / f"gpu-check-{tag}.json", 2
    while target.exists():
        target, k = results / f"gpu-check-{tag}-{k}.json", k + 1
    old.rename(target)
    return target.stem.removeprefix("gpu-check-")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("ELF_DATA"), help="real CIFAR-10 (ImageFolder dir or .tar.gz)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--stages", default=DEFAULT_STAGES, help=f"comma list of {', '.join(STAGES)} (default: %(default)s)")
    ap.add_argument("--budget", type=float, default=540, help="wall-clock seconds for everything")
    ap.add_argument("--epochs", type=int, default=300, help="epochs of the val and tables studies (--tiny: of every study)")
    ap.add_argument("--table5-epochs", type=int, default=1000, help="epochs of the table5 study (the full protocol)")
    ap.add_argument("--table5-compile", action="store_true", help="table5: torch.compile the batched step")
    ap.add_argument("--teacher-seconds", type=float, default=170, help="time box of the width-512 teacher")
    ap.add_argument("--distill-seconds", type=float, default=170, help="time box of the DSA distillation")
    ap.add_argument("--speed-seconds", type=float, default=100, help="time box of the batched-seeds speed stage (its "
                    "file is written after every row, so a cut keeps the rows done)")
    ap.add_argument("--procs", type=int, default=12,
                    help="processes for table5 (12: one per cell) and the DM table (the DSA table gets half)")
    ap.add_argument("--followup-procs", type=int, default=12,
                    help="processes for the follow-up studies in all (split evenly, at most one per unfinished run)")
    ap.add_argument("--followups", type=_followups, default=DEFAULT_FOLLOWUPS,
                    help=f"the follow-up studies of the followups stage: a comma list of {', '.join(FOLLOWUPS)}, "
                         "or all (default: %(default)s)")
    ap.add_argument("--work", default=str(HERE / "work" / "gpu"))
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--tiny", action="store_true", help="toy sizes (the CPU test of this script)")
    ap.add_argument("--archive", default=os.environ.get("OUT") and str(Path(os.environ["OUT"]) / "gpu-results.tgz"),
                    help="also write what this call wrote (results, logs) into this .tar.gz, even when a stage fails "
                         "(default: $OUT/gpu-results.tgz when $OUT is set, as on a lent device machine)")
    ap.add_argument("--worker", choices=sorted([*STUDIES, *FOLLOWUPS]), help=argparse.SUPPRESS)
    ap.add_argument("--shard", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.data:
        ap.error("--data (or ELF_DATA) is required")
    selected = [s.strip() for s in args.stages.split(",") if s.strip()]
    unknown = sorted(set(selected) - set(STAGES))
    if unknown or not selected:
        ap.error(f"--stages: unknown stage(s) {unknown}; stages are {', '.join(STAGES)}")
    selected = [s for s in STAGES if s in selected]  # the order they run in
    # every process runs in the repository root; paths inside it are recorded relative to it
    args.data, args.work, args.results = (_portable(p) for p in (args.data, args.work, args.results))
    args.archive = str(Path(args.archive).resolve()) if args.archive else None
    os.chdir(ROOT)
    if args.worker:
        return worker(args)
    if args.data.lower() not in ("cifar10", "cifar100") and not Path(args.data).exists():
        ap.error(f"--data {args.data} does not exist here (on a lent device machine ../shared is not there: carry a "
                 "copy of the archive inside the working tree, e.g. .gpudata/, and point --data at it)")
    t_start = time.time()
    try:
        return _plan(args, selected, t_start, sys.argv[1:] if argv is None else argv)
    finally:  # whatever happened (a stage's error, Ctrl-C), what this call wrote goes into the archive
        if args.archive:
            _write_archive(Path(args.archive), Path(args.results), Path(args.work) / "logs", t_start)


def _write_archive(path: Path, results: Path, logs: Path, since: float) -> None:
    """One ``.tar.gz`` of what this call wrote: the files under ``results`` changed since ``since`` (epoch seconds)
    and this call's logs, named from the repository root (``benchmarks/results/...``) so that unpacking there puts
    them in place. Runs in progress (``partial/``: checkpoints and lock files naming this host) stay out."""
    import tarfile

    files = sorted(p for p in results.rglob("*") if p.is_file() and "partial" not in p.parts
                   and p.stat().st_mtime >= since - 1)
    files += sorted(logs.glob("*.log")) if logs.is_dir() else []
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    with tarfile.open(tmp, "w:gz") as tar:
        for f in files:
            tar.add(f, arcname=_portable(str(f)))
    tmp.replace(path)
    print(f"archived {len(files)} file(s) of this call in {path}", flush=True)


def _plan(args: argparse.Namespace, selected: list[str], t_start: float, argv: list[str]) -> int:
    """The stages of one call (see the module docstring); writes gpu-check.json and the logs under ``--results``."""
    end = t_start + args.budget
    work, results = Path(args.work), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    for old_log in logs.glob("*.log"):  # this call's logs only
        old_log.unlink()
    py = sys.executable
    elf = [py, "-m", "elf"]
    common = ["--data", args.data, "--device", args.device, "--no-progress"]
    report: dict[str, Any] = {"script": "benchmarks/gpu_check.py", "argv": argv,
                              "stages_selected": selected,
                              "followups_selected": args.followups if "followups" in selected else [],
                              "budget_s": args.budget, "epochs": args.epochs,
                              "table5_epochs": args.table5_epochs, "tiny": args.tiny,
                              "started_at": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
                              "stage_summary": {}, "stages": {}}
    import torch

    from elf.evaluation import environment

    report["environment"] = environment(args.device)
    stage = Stage(logs, t_start)
    summary = report["stage_summary"]

    # speed: issue #12's section alone on the device (batched vs sequential seeds, eager and compiled), time-boxed
    if "speed" in selected:
        # eager first (k = 1, 5, 10: the "5 seeds in at most 2x one" needs only these), then the compiled
        # modes, which compile again per k, in what is left of the box: a slow compile cannot cost the eager rows
        device_kind = "tiny" if args.tiny else args.device.split(":")[0]
        runs = {"speed": (results / f"speed-{device_kind}-batched.json",
                          ["--seeds", "1", "2", "--batched-epochs", "2", "--images", "20"] if args.tiny
                          else ["--seeds", "1", "5", "10", "--batched-epochs", "20", "--repeats", "1"], 0.5)}
        if not args.tiny:
            runs["speed_compile"] = (results / f"speed-{device_kind}-batched-compile.json",
                                     ["--seeds", "1", "5", "--batched-epochs", "20", "--repeats", "1", "--compile",
                                      "--modes", "batched+compile", "one-per-group+compile"], 1.0)
        box_start = time.time()
        for name, (speed_out, speed_args, share) in runs.items():
            stage.start(name, [py, str(HERE / "speed.py"), "--device", args.device, "--batched-only", "--batched-models",
                               "ConvNetBN", *speed_args, "--out", str(speed_out),
                               "--note", f"benchmarks/gpu_check.py stage {name}, alone on the device"],
                        min(end, box_start + share * args.speed_seconds))
            report["stages"].update(stage.wait([name]))
            summary[name] = {**report["stages"][name], "out": _portable(str(speed_out))}

    # cuda_tests in the background
    if "cuda_tests" in selected:
        if args.device.startswith("cuda"):
            stage.start("cuda_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_augment.py",
                                       "tests/test_trainer.py", "-k", "cuda"], end)
        else:
            summary["cuda_tests"] = {"skipped": f"device {args.device} is not cuda"}

    # one decode of the real data into the cache before the study processes start
    if set(selected) - {"speed", "cuda_tests"}:
        t0 = time.time()
        from elf.data import load_dataset

        for split in ("train", "test"):
            load_dataset(args.data, split, progress=False)
        report["stages"]["decode_s"] = round(time.time() - t0, 1)

    # the studies of this call, in parallel
    names: dict[str, list[str]] = {}
    study_info: dict[str, dict[str, Any]] = {}
    if "table5" in selected:
        names["table5"] = _start_study(stage, "table5", args.procs, args, end, study_info)
    if "followups" in selected:
        todo = {f: len(_units(_study_config(f, args))[1]) for f in args.followups}
        names["followups"] = [n for f, k in _share(args.followup_procs, todo).items()
                              for n in _start_study(stage, f, k, args, end, study_info)]

    # the first call's stages: teacher, DSA set, validation study; then the tables
    if "teacher" in selected:
        tiny_teacher = ["--train-per-class", "5", "--test-per-class", "2", "--epochs", "1"] if args.tiny else ["--epochs", "50"]
        stage.start("teacher_w512", elf + ["train-teacher", "--model", "ConvNetW512", "--momentum", "0.9", "--weight-decay", "5e-4",
                                           "--out", str(work / "teacher_w512"), *tiny_teacher, *common],
                    min(end, time.time() + args.teacher_seconds))
        names["teacher"] = ["teacher_w512"]
    if "distill" in selected:
        tiny_distill = (["--ipc", "1", "--train-per-class", "5", "--iterations", "2", "--outer-loop", "1", "--inner-loop",
                         "1", "--batch-real", "4"] if args.tiny else ["--ipc", "10", "--iterations", "1000"])
        stage.start("distill_dsa", elf + ["distill", "--method", "dsa", *tiny_distill, "--snapshot-every",
                                          "1" if args.tiny else "20", "--out", str(work / "dsa_run" / "dsa.safetensors"),
                                          "--seed", "0", *common],
                    min(end, time.time() + args.distill_seconds))
        names["distill"] = ["distill_dsa"]
    if "val" in selected:
        names["val"] = _start_study(stage, "val", 2 if args.tiny else 4, args, end, study_info)
    report["stages"].update(stage.wait(names.get("teacher", []) + names.get("distill", [])))

    # the last finished teacher epoch and the last DSA snapshot become the tables' inputs
    if "teacher" in selected:
        ckpt = _latest(work / "teacher_w512", "epoch_*.safetensors")
        if ckpt is not None:
            shutil.copyfile(ckpt, work / "teacher_w512.safetensors")
            hist = work / "teacher_w512" / "history.json"
            report["teacher_w512"] = {"checkpoint": ckpt.name,
                                      "history": json.loads(hist.read_text()) if hist.exists() else None}
        have_teacher = ckpt is not None
    else:  # an earlier call's teacher in --work
        have_teacher = (work / "teacher_w512.safetensors").exists()
    if "distill" in selected:
        final = work / "dsa_run" / "dsa.safetensors"
        snap = final if final.exists() else _latest(work / "dsa_run", "dsa.step*.safetensors")
        if snap is not None:
            shutil.copyfile(snap, work / "dsa_ipc10.safetensors")
            (results / "gpu-cross-arch-dsa").mkdir(parents=True, exist_ok=True)
            shutil.copyfile(snap, results / "gpu-cross-arch-dsa" / "dsa_ipc10.safetensors")
            from elf.io import load_any

            report["dsa_set"] = {"file": snap.name, "metadata": load_any(work / "dsa_ipc10.safetensors").metadata}
        have_set = snap is not None
    else:
        have_set = (work / "dsa_ipc10.safetensors").exists()
    if "tables" in selected:
        names["tables"] = []
        if have_teacher:
            names["tables"] += _start_study(stage, "dm", args.procs, args, end, study_info)
            if have_set:
                names["tables"] += _start_study(stage, "dsa", max(1, args.procs // 2), args, end, study_info)
        if not (have_teacher and have_set):
            summary["tables"] = {"note": f"no width-512 teacher in {work}: tables skipped" if not have_teacher
                                 else f"no DSA set in {work}: the DSA table skipped"}
    waiting = [n for group in names.values() for n in group if n not in report["stages"]]
    report["stages"].update(stage.wait(waiting + (["cuda_tests"] if "cuda_tests" in stage.procs else [])))

    # per stage: wall time, cut or not, and what the studies' run files say
    from elf.study import summarize

    if "cuda_tests" in stage.procs:
        summary["cuda_tests"] = report["stages"]["cuda_tests"]
    for name, group in names.items():
        procs = {n: report["stages"][n] for n in group}
        entry = summary.setdefault(name, {})
        entry.update({"wall_s": stage.span(group), "processes": len(group),
                      "cut_by_budget": any(p["cut_by_budget"] for p in procs.values()),
                      "all_rc_0": all(p["rc"] == 0 for p in procs.values())})
        for study in args.followups if name == "followups" else STAGE_STUDIES.get(name, []):
            cfg = _study_config(study, args)
            if (Path(cfg.out) / "runs").is_dir():
                summarize(cfg)
                entry.setdefault("studies", {})[study] = {**study_info.get(study, {"out": _portable(cfg.out)}),
                                                          **_cells(cfg)}
    if "table5" in summary:
        t5 = summary["table5"]
        done = sum(s["units_done"] for s in t5.get("studies", {}).values())
        total = sum(s["units_total"] for s in t5.get("studies", {}).values())
        others = [s for s in names if s != "table5" and names[s]] + (["cuda_tests"] if "cuda_tests" in stage.procs else [])
        t5["target"] = ("issue #12: the whole row block in under 600 s, 5 seeds in at most 2x the time of one (the "
                        "speed stage measures k = 1, 5, 10 on ConvNet-BN)")
        t5["whole_block_done"] = bool(total) and done == total
        t5["shared_device_with"] = others
        t5["whole_block_s"] = t5["wall_s"] if t5["whole_block_done"] and study_info.get("table5", {}).get(
            "unfinished_at_start") == total else None  # only when this call ran every cell
    report["wall_time_s"] = round(time.time() - t_start, 1)
    report["finished_at"] = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    report["torch_cuda"] = torch.version.cuda
    archived = _archive_previous(results, report["started_at"])
    if archived:
        report["previous_report"] = f"gpu-check-{archived}.json"
    (results / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str))
    for log in sorted(logs.glob("*.log")):
        target = results / f"gpu-check-{log.name}"
        if archived and target.exists():  # an earlier call's log of the same name stays, renamed like its report
            target.rename(results / f"gpu-check-{archived}-{log.name}")
        shutil.copyfile(log, target)
    print(json.dumps({k: v for k, v in report.items() if k not in ("teacher_w512", "environment")}, indent=1, default=str))
    return 0


def _portable(path: str) -> str:
    """``path`` relative to the repository root when it lies inside it (records carry no machine paths), else absolute."""
    full = Path(path).resolve()
    return str(full.relative_to(ROOT)) if full.is_relative_to(ROOT) else str(full)


def _pass(args: argparse.Namespace) -> list[str]:
    """The options a worker needs to rebuild the same study configs."""
    out = ["--data", args.data, "--device", args.device, "--epochs", str(args.epochs), "--table5-epochs",
           str(args.table5_epochs), "--work", args.work, "--results", args.results]
    return out + (["--tiny"] if args.tiny else []) + (["--table5-compile"] if args.table5_compile else [])


if __name__ == "__main__":
    sys.exit(main())
