"""One call on a GPU machine: CUDA-only tests, a width-512 teacher, a DSA set, the validation study that chooses the
ELF setting and the cross-architecture tables of issue #9, all against one wall-clock budget.

    python benchmarks/gpu_check.py --data PATH/cifar10-jpeg.tar.gz --budget 520          # on the GPU machine
    python benchmarks/gpu_check.py --device cpu --tiny --data toy_folder --work /tmp/w   # the CPU path CI tests

Stages (each writes what it finished; a stage cut short by the budget keeps its finished runs):
  0. ``speed.py``'s batched-seeds section alone on the device (ConvNet-BN, k = 1, 5, 10 seeds batched vs one by one,
     eager and compiled; issue #12), time-boxed by ``--speed-seconds``; ``speed-<device>-batched.json``.
  1. CUDA-only tests (in the background) and one decode of the real data into the cache.
  2. In parallel: train the width-512 ConvNet teacher (``elf train-teacher``, time-boxed, last finished epoch used),
     distill a DSA set (``elf distill``, time-boxed, last snapshot used) and run ``gpu_val_study.toml`` (validation).
  3. ``gpu_cross_arch_study.toml`` (bundled DM set) and ``gpu_cross_arch_dsa_study.toml`` (the DSA set), sharded
     over several processes on the one GPU (each run is launch-bound, so processes overlap well).
Results go to ``--results`` (default benchmarks/results) with ``gpu-check.json`` (device, budgets, stage times).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
STUDIES = {"val": "gpu_val_study.toml", "dm": "gpu_cross_arch_study.toml", "dsa": "gpu_cross_arch_dsa_study.toml"}
TINY_MODELS = {"val": ["ConvNetW64", "timm.vit_tiny_patch16_224:patch_size=4"], "dm": ["ConvNet", "AlexNet", "torchvision.resnet18"], "dsa": ["ConvNet"]}


def _study_config(name: str, args: argparse.Namespace) -> Any:
    """The study's TOML with this run's data, work paths, results folder and (``--tiny``) toy sizes."""
    from elf.study import load_config

    cfg = load_config(HERE / STUDIES[name])
    cfg.data = args.data
    work = Path(args.work)
    if "w512" in cfg.teachers:
        cfg.teachers["w512"]["checkpoint"] = str(work / "teacher_w512.safetensors")
    if "dsa" in cfg.sets:
        cfg.sets["dsa"] = str(work / "dsa_ipc10.safetensors")
    cfg.out = str(Path(args.results) / Path(cfg.out).name)
    cfg.overrides["epochs"] = args.epochs
    if args.tiny:
        cfg.models = TINY_MODELS[name]
        cfg.seeds = [0]
        cfg.variants = {k: v for k, v in list(cfg.variants.items())[:3]}
        if cfg.validation_per_class:
            cfg.validation_per_class = 1
        else:
            cfg.test_per_class = 2
    return cfg


def worker(args: argparse.Namespace) -> int:
    """One shard of one study (a separate process)."""
    from elf.study import run_study

    cfg = _study_config(args.worker, args)
    i, n = (int(x) for x in args.shard.split("/"))
    run_study(cfg, shard=(i, n), device=args.device, progress=False, log=lambda s: print(s, flush=True), keep_going=True)
    return 0


class Stage:
    """Background processes with a deadline; their output goes to one log file each."""

    def __init__(self, logs: Path) -> None:
        self.logs = logs
        self.procs: dict[str, tuple[subprocess.Popen[bytes], float, float]] = {}

    def start(self, name: str, cmd: list[str], deadline: float) -> None:
        log = open(self.logs / f"{name}.log", "wb")
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
        self.procs[name] = (subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT, env=env),
                            deadline, time.time())
        print(f"[{time.strftime('%H:%M:%S')}] start {name}: {' '.join(cmd)}", flush=True)

    def wait(self, names: list[str]) -> dict[str, dict[str, Any]]:
        """Wait for ``names``; a process past its deadline gets SIGINT, then SIGKILL 10 s later."""
        out: dict[str, dict[str, Any]] = {}
        pending = list(names)
        while pending:
            for name in list(pending):
                proc, deadline, t0 = self.procs[name]
                rc = proc.poll()
                now = time.time()
                if rc is None and now > deadline:
                    proc.send_signal(2)
                    try:
                        rc = proc.wait(10)
                    except subprocess.TimeoutExpired:
                        proc.kill()
                        rc = proc.wait()
                    out[name] = {"rc": rc, "seconds": round(now - t0, 1), "cut_by_budget": True}
                elif rc is not None:
                    out[name] = {"rc": rc, "seconds": round(now - t0, 1), "cut_by_budget": False}
                if name in out:
                    pending.remove(name)
                    print(f"[{time.strftime('%H:%M:%S')}] {name}: {out[name]}", flush=True)
            time.sleep(0.5)
        return out


def _latest(folder: Path, pattern: str) -> Path | None:
    files = sorted(folder.glob(pattern))
    return files[-1] if files else None


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("ELF_DATA"), help="real CIFAR-10 (ImageFolder dir or .tar.gz)")
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--budget", type=float, default=520, help="wall-clock seconds for everything")
    ap.add_argument("--epochs", type=int, default=300, help="the protocol's Epoch for every study run")
    ap.add_argument("--teacher-seconds", type=float, default=170, help="time box of the width-512 teacher")
    ap.add_argument("--distill-seconds", type=float, default=170, help="time box of the DSA distillation")
    ap.add_argument("--speed-seconds", type=float, default=75, help="time box of the batched-seeds speed stage")
    ap.add_argument("--procs", type=int, default=8, help="processes for the DM table (the DSA table gets half)")
    ap.add_argument("--work", default=str(HERE / "work" / "gpu"))
    ap.add_argument("--results", default=str(HERE / "results"))
    ap.add_argument("--tiny", action="store_true", help="toy sizes (the CPU test of this script)")
    ap.add_argument("--worker", choices=sorted(STUDIES), help=argparse.SUPPRESS)
    ap.add_argument("--shard", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if not args.data:
        ap.error("--data (or ELF_DATA) is required")
    # every process runs in the repository root; paths inside it are recorded relative to it
    args.data, args.work, args.results = (_portable(p) for p in (args.data, args.work, args.results))
    os.chdir(ROOT)
    if args.worker:
        return worker(args)

    t_start = time.time()
    end = t_start + args.budget
    work, results = Path(args.work), Path(args.results)
    work.mkdir(parents=True, exist_ok=True)
    results.mkdir(parents=True, exist_ok=True)
    logs = work / "logs"
    logs.mkdir(exist_ok=True)
    py = sys.executable
    elf = [py, "-m", "elf"]
    common = ["--data", args.data, "--device", args.device, "--no-progress"]
    report: dict[str, Any] = {"script": "benchmarks/gpu_check.py", "argv": sys.argv[1:] if argv is None else argv,
                              "budget_s": args.budget, "epochs": args.epochs, "tiny": args.tiny, "stages": {}}
    import torch

    from elf.evaluation import environment

    report["environment"] = environment(args.device)
    stage = Stage(logs)

    # 0. issue #12's speed section alone on the device (batched vs sequential seeds, eager and compiled), time-boxed
    speed_out = results / f"speed-{'tiny' if args.tiny else args.device.split(':')[0]}-batched.json"
    speed_args = (["--seeds", "1", "2", "--batched-epochs", "2", "--images", "20"] if args.tiny
                  else ["--seeds", "1", "5", "10", "--batched-epochs", "20", "--compile"])
    stage.start("speed", [py, str(HERE / "speed.py"), "--device", args.device, "--batched-only", "--batched-models",
                          "ConvNetBN", *speed_args, "--out", str(speed_out),
                          "--note", "benchmarks/gpu_check.py stage 0, alone on the device"],
                min(end, time.time() + args.speed_seconds))
    report["stages"].update(stage.wait(["speed"]))

    # 1. CUDA-only tests, data decode
    if args.device.startswith("cuda"):
        stage.start("cuda_tests", [py, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests/test_augment.py",
                                   "tests/test_trainer.py", "-k", "cuda"], end)
    t0 = time.time()
    from elf.data import load_dataset

    for split in ("train", "test"):
        load_dataset(args.data, split, progress=False)
    report["stages"]["decode_s"] = round(time.time() - t0, 1)

    # 2. teacher, DSA set, validation study
    tiny_teacher = ["--train-per-class", "5", "--test-per-class", "2", "--epochs", "1"] if args.tiny else ["--epochs", "50"]
    stage.start("teacher_w512", elf + ["train-teacher", "--model", "ConvNetW512", "--momentum", "0.9", "--out",
                                       str(work / "teacher_w512"), *tiny_teacher, *common],
                min(end, time.time() + args.teacher_seconds))
    tiny_distill = (["--ipc", "1", "--train-per-class", "5", "--iterations", "2", "--outer-loop", "1", "--inner-loop", "1",
                     "--batch-real", "4"] if args.tiny else ["--ipc", "10", "--iterations", "1000"])
    stage.start("distill_dsa", elf + ["distill", "--method", "dsa", *tiny_distill, "--snapshot-every", "1" if args.tiny else "20",
                                      "--out", str(work / "dsa_run" / "dsa.safetensors"), "--seed", "0", *common],
                min(end, time.time() + args.distill_seconds))
    val_procs = 2 if args.tiny else 4
    for i in range(val_procs):
        stage.start(f"val_{i}", [py, __file__, "--worker", "val", "--shard", f"{i}/{val_procs}", *_pass(args)], end)
    report["stages"].update(stage.wait(["teacher_w512", "distill_dsa"]))

    # the last finished teacher epoch and the last DSA snapshot become the study's inputs
    ckpt = _latest(work / "teacher_w512", "epoch_*.safetensors")
    if ckpt is not None:
        shutil.copyfile(ckpt, work / "teacher_w512.safetensors")
        hist = work / "teacher_w512" / "history.json"
        report["teacher_w512"] = {"checkpoint": ckpt.name,
                                  "history": json.loads(hist.read_text()) if hist.exists() else None}
    final = work / "dsa_run" / "dsa.safetensors"
    snap = final if final.exists() else _latest(work / "dsa_run", "dsa.step*.safetensors")
    if snap is not None:
        shutil.copyfile(snap, work / "dsa_ipc10.safetensors")
        (results / "gpu-cross-arch-dsa").mkdir(parents=True, exist_ok=True)
        shutil.copyfile(snap, results / "gpu-cross-arch-dsa" / "dsa_ipc10.safetensors")
        from elf.io import load_any

        report["dsa_set"] = {"file": snap.name, "metadata": load_any(work / "dsa_ipc10.safetensors").metadata}

    # 3. the tables
    names = []
    if ckpt is not None:
        n_dm = args.procs
        for i in range(n_dm):
            stage.start(f"dm_{i}", [py, __file__, "--worker", "dm", "--shard", f"{i}/{n_dm}", *_pass(args)], end)
            names.append(f"dm_{i}")
        if snap is not None:
            n_dsa = max(1, args.procs // 2)
            for i in range(n_dsa):
                stage.start(f"dsa_{i}", [py, __file__, "--worker", "dsa", "--shard", f"{i}/{n_dsa}", *_pass(args)], end)
                names.append(f"dsa_{i}")
    report["stages"].update(stage.wait([f"val_{i}" for i in range(val_procs)] + names
                                       + (["cuda_tests"] if "cuda_tests" in stage.procs else [])))
    from elf.study import summarize

    for name in STUDIES:
        cfg = _study_config(name, args)
        if (Path(cfg.out) / "runs").is_dir():
            summarize(cfg)
    report["wall_time_s"] = round(time.time() - t_start, 1)
    report["torch_cuda"] = torch.version.cuda
    (results / "gpu-check.json").write_text(json.dumps(report, indent=1, default=str))
    for log in sorted(logs.glob("*.log")):
        shutil.copyfile(log, results / f"gpu-check-{log.name}")
    print(json.dumps({k: v for k, v in report.items() if k != "teacher_w512"}, indent=1, default=str))
    return 0


def _portable(path: str) -> str:
    """``path`` relative to the repository root when it lies inside it (records carry no machine paths), else absolute."""
    full = Path(path).resolve()
    return str(full.relative_to(ROOT)) if full.is_relative_to(ROOT) else str(full)


def _pass(args: argparse.Namespace) -> list[str]:
    """The options a worker needs to rebuild the same study configs."""
    out = ["--data", args.data, "--device", args.device, "--epochs", str(args.epochs), "--work", args.work,
           "--results", args.results]
    return out + (["--tiny"] if args.tiny else [])


if __name__ == "__main__":
    sys.exit(main())
