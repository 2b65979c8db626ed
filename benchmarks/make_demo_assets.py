"""Build the demo bundle shipped in elf/assets from real CIFAR-10 with the project's own code.

    python benchmarks/make_demo_assets.py --data ../shared/data/cifar10-jpeg.tar.gz --teacher-dir runs/demo-teacher

1. Teacher: ``elf train-teacher --model ConvNet --momentum 0.9 --weight-decay 5e-4`` on the full training set (``--teacher-epochs``;
   resumable, so an existing run in ``--teacher-dir`` is reused); its last checkpoint becomes demo_teacher.safetensors.
2. Synthetic set: DM (distribution matching) with elf-dd's distiller, 10 images per class, initialized from real
   images, random-init ConvNet pool, official DSA, ``--dm-iterations`` iterations.
3. Test subset: 100 random test images per class (seed 0), stored as uint8.
4. demo_assets.json: every setting, the teacher's per-epoch test accuracy, the hashes of the sources and outputs.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from elf.checkpoint import save_checkpoint
from elf.cli import main as cli
from elf.data import CIFAR10_MTT, load_dataset
from elf.distill import DistributionMatching, PixelParam, RandomInitPool, RealSampler, distill
from elf.fileio import atomic_write, file_sha256, save_tensors
from elf.io import save_synthetic
from elf.teacher import load_teacher

ROOT = Path(__file__).resolve().parents[1]
ASSETS = ROOT / "elf" / "assets"


def portable_settings(settings: dict) -> dict:
    """The settings as recorded: paths relative to the repository (no machine's absolute paths), numbers as given."""
    import os

    out = {}
    for key, value in settings.items():
        if key in ("data", "teacher_dir", "out"):
            value = os.path.relpath(os.path.abspath(value), ROOT)  # abspath: a symlinked data folder keeps its name
        out[key] = value
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", required=True, help="CIFAR-10 ImageFolder archive or directory")
    ap.add_argument("--teacher-dir", default="runs/demo-teacher")
    ap.add_argument("--teacher-epochs", type=int, default=4)
    ap.add_argument("--dm-iterations", type=int, default=200)
    ap.add_argument("--dm-batch-real", type=int, default=128)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=str(ASSETS))
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    info: dict = {"made_by": "benchmarks/make_demo_assets.py", "settings": portable_settings(vars(args)), "data_sha256": file_sha256(args.data)}

    # 1. teacher
    t0 = time.perf_counter()
    assert cli(["train-teacher", "--data", args.data, "--model", "ConvNet", "--epochs", str(args.teacher_epochs),
                "--momentum", "0.9", "--weight-decay", "5e-4", "--out", args.teacher_dir, "--no-progress"]) == 0
    history = json.loads((Path(args.teacher_dir) / "history.json").read_text())
    ckpt = Path(args.teacher_dir) / f"epoch_{args.teacher_epochs:03d}.safetensors"
    teacher = load_teacher("ConvNet", ckpt)
    save_checkpoint(teacher, out / "demo_teacher.safetensors", {"model": "ConvNet", "epochs": str(args.teacher_epochs),
                                                                "space_zca": "false", **_space()})
    info["teacher"] = {"model": "ConvNet (width 128, depth 3, instance norm)", "epochs": args.teacher_epochs,
                       "momentum": 0.9, "weight_decay": 5e-4, "test_accuracy_per_epoch": history["test_accuracy"],
                       "train_wall_time_s_this_call": time.perf_counter() - t0}

    # 2. DM set
    train = load_dataset(args.data, "train")
    sampler = RealSampler(train.as_float(CIFAR10_MTT), train.labels, normalization=CIFAR10_MTT, source_hash=train.source_hash)
    gen = torch.Generator().manual_seed(args.seed)
    param = PixelParam(10, 10, (3, 32, 32), CIFAR10_MTT, init="real", sampler=sampler, generator=gen, lr=1.0, momentum=0.5)
    objective = DistributionMatching(sampler, RandomInitPool("ConvNet", 3, 10, (32, 32)), batch_real=args.dm_batch_real)
    t0 = time.perf_counter()
    sset = distill(param, objective, args.dm_iterations, seed=args.seed, progress=True, log_every=10,
                   metadata={"source": "CIFAR-10 (shared JPEG archive)", "data_sha256": info["data_sha256"]})
    info["synthetic_set"] = {"method": "DM", "ipc": 10, "iterations": args.dm_iterations, "init": "real",
                             "pool": "random-init ConvNet", "batch_real": args.dm_batch_real, "lr": 1.0, "momentum": 0.5,
                             "dsa": "color_crop_cutout_flip_scale_rotate", "wall_time_s": time.perf_counter() - t0}
    save_synthetic(out / "demo_set.safetensors", sset)

    # 3. test subset
    test = load_dataset(args.data, "test").per_class(100, torch.Generator().manual_seed(0))
    save_tensors(out / "demo_test.safetensors", {"images": test.images, "labels": test.labels},
                 {"classes": json.dumps(test.classes), "source": "CIFAR-10 test split, 100 per class, seed 0"})
    info["test_subset"] = {"per_class": 100, "seed": 0, "classes": test.classes}
    info["files_sha256"] = {p.name: file_sha256(p) for p in sorted(out.glob("demo_*.safetensors"))}
    atomic_write(out / "demo_assets.json", lambda p: Path(p).write_text(json.dumps(info, indent=1)))
    print(json.dumps(info, indent=1))


def _space() -> dict[str, str]:
    from elf.data import space_metadata

    return space_metadata(CIFAR10_MTT, False)


if __name__ == "__main__":
    main()
