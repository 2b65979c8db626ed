"""The paper's full protocol (ELF Table 5): CIFAR-10, 10 images per class, 1000 epochs, 5 seeds, six evaluation models.

Meant for a GPU. It trains the two teachers with the project's own code (ConvNet width 128 for ConvNet students,
width 512 for ResNet-18 / VGG-11; momentum 0.9, 50 epochs, features from the last epoch — the paper uses epochs
30-100 of a 200-epoch run and finds the choice matters little), then runs an ``elf study`` over the given sets,
with a random real subset of the same size as a reference, and copies the summary to benchmarks/results/.

    python benchmarks/full_protocol.py --data cifar10 --set dm=sets/dm_ipc10.safetensors --set mtt=sets/mtt/images_best.pt
    torchrun --nproc-per-node 8 benchmarks/full_protocol.py ...      # one rank per GPU (teachers on rank 0 first)

Budget on one H100 (estimate, not yet measured): teachers ~10 min; each run 1001 epochs of 100 images.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from pathlib import Path

from elf.study import StudyConfig, distributed_shard, run_study

MODELS = ["ConvNet", "ConvNetBN", "ResNet18", "ResNet18BN", "VGG11", "VGG11BN"]  # Table 5 + the ConvNet-IN reference


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=os.environ.get("ELF_DATA", "cifar10"))
    ap.add_argument("--set", action="append", required=True, metavar="NAME=PATH", help="a synthetic set (repeat)")
    ap.add_argument("--out", default="runs/full-protocol")
    ap.add_argument("--teacher-epochs", type=int, default=50)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--lr", type=float, default=0.01, help="0.005 reproduces Table 5 for DM/DSA sets")
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--results", default=str(Path(__file__).parent / "results"), help="where the summary is copied")
    args = ap.parse_args(argv)
    out = Path(args.out)
    rank, world = distributed_shard()
    teachers = {}
    for label, model in (("w128", "ConvNet"), ("w512", "ConvNetW512")):
        tdir = out / "teachers" / label
        ckpt = tdir / f"epoch_{args.teacher_epochs:03d}.safetensors"
        if rank == 0 and not ckpt.exists():
            from elf.cli import main as cli

            cli(["train-teacher", "--data", args.data, "--model", model, "--epochs", str(args.teacher_epochs),
                 "--momentum", "0.9", "--weight-decay", "5e-4", "--out", str(tdir)])
        teachers[label] = {"checkpoint": str(ckpt), "model": model}
    if world > 1:
        import torch.distributed as dist

        dist.barrier()  # every rank waits for the teachers
    cfg = StudyConfig(
        name="ELF Table 5 protocol: CIFAR-10, 10 IPC, 1000 epochs",
        sets=dict(s.split("=", 1) for s in args.set), models=args.models, data=args.data, teachers=teachers,
        seeds=list(range(args.seeds)), overrides={"epochs": args.epochs, "lr": args.lr}, out=str(out / "study"),
        protocol="elf-official",
    )
    run_study(cfg)
    if rank == 0:
        import torch

        results = Path(args.results)
        results.mkdir(parents=True, exist_ok=True)
        shutil.copy(out / "study" / "summary.md", results / "full-protocol.md")
        shutil.copy(out / "study" / "summary.csv", results / "full-protocol.csv")
        device = torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"
        settings = {**vars(args), "device": device, "gpus": max(world, 1), "torch": torch.__version__}
        (results / "full-protocol-settings.json").write_text(json.dumps(settings, indent=1))


if __name__ == "__main__":
    main()
