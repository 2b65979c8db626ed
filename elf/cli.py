"""The ``elf`` command line: ``elf eval``, ``elf study``, ``elf train-teacher``, ``elf models``, ``elf split-points``.

Run ``elf COMMAND --help`` for every option.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from .errors import ELFError

__all__ = ["main", "build_parser"]


def _add_device(p: argparse.ArgumentParser) -> None:
    p.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def _add_test_data(p: argparse.ArgumentParser, required: bool = True) -> None:
    g = p.add_argument_group("real data")
    g.add_argument("--data", required=required, default=None,
                   help="real data: 'cifar10' / 'cifar100' (torchvision download), an ImageFolder directory or a "
                        ".tar/.tar.gz archive of one with train/ and test/ folders (default: $ELF_DATA)")
    g.add_argument("--data-root", default="~/.cache/elf-dd/torchvision", help="download root for cifar10/cifar100")
    g.add_argument("--normalization", default="cifar10_mtt",
                   help="mean/std used for real images and assumed for the synthetic set: cifar10_mtt (MTT/ELF; also "
                        "their CIFAR-100 convention), cifar100_dc, imagenet (default: cifar10_mtt, or the set's own)")
    g.add_argument("--test-per-class", type=int, default=None, help="use a class-balanced test subset of this many per class")
    g.add_argument("--cache-dir", default=None, help="decoded-data and feature cache (default: $ELF_CACHE or ~/.cache/elf-dd)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="elf", description="ELF: evaluate distilled datasets on any architecture with distillation features.")
    from . import __version__

    parser.add_argument("--version", action="version", version=f"elf-dd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list the built-in model names", description="List model names for --models and --teacher-model.")
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("split-points", help="list the valid split points of a model with their output shapes",
                       description="List the valid ELF split points of MODEL (exactly one tensor crosses each) and the per-image output shape there.")
    p.add_argument("model", help="model name, e.g. ResNet18BN or torchvision.resnet18")
    p.add_argument("--im-size", type=int, nargs=2, default=(32, 32), metavar=("H", "W"))
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.set_defaults(func=_cmd_split_points)

    p = sub.add_parser("eval", help="evaluate a synthetic set with the baseline and with ELF",
                       description="Train each evaluation model on the synthetic set with the plain baseline and with ELF "
                                   "(official protocol unless changed) and report test accuracy, mean ± std over runs.")
    g = p.add_argument_group("synthetic set")
    g.add_argument("--images", required=True, help="synthetic set: images_best.pt (MTT/ELF/TESLA/DATM), res_*.pt (DC/DSA/DM), "
                                                   ".npz (KIP), .safetensors (elf-dd), or a folder of PNGs per class")
    g.add_argument("--labels", default=None, help="labels file for images_best.pt-style sets (default: found beside the images)")
    g.add_argument("--experiment", type=int, default=0, help="experiment index inside a DC/DSA/DM res_*.pt file")
    g.add_argument("--zca", action="store_true", help="the set was distilled in ZCA space (MTT's --zca); files that "
                                                     "record it (elf-dd .safetensors) need no flag")
    g = p.add_argument_group("teacher (distillation model)")
    g.add_argument("--teacher", action="append", default=[], help="teacher checkpoint (safetensors, state-dict .pt, or an MTT "
                                                                "replay_buffer_*.pt expert buffer); repeat for several")
    g.add_argument("--teacher-model", action="append", default=[], help="teacher model name per --teacher (default ConvNet)")
    g.add_argument("--teacher-point", action="append", default=[], help="teacher split point per --teacher (default: its last conv block)")
    g.add_argument("--buffer-trajectory", type=int, default=0, help="trajectory of an MTT replay_buffer_*.pt teacher")
    g.add_argument("--buffer-epoch", type=int, default=-1, help="snapshot (epoch) of an MTT replay_buffer_*.pt teacher (default: last)")
    g.add_argument("--feature-dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="feature storage dtype")
    g = p.add_argument_group("evaluation")
    g.add_argument("--models", nargs="+", default=["ConvNetBN"], help="evaluation models (see `elf models`)")
    g.add_argument("--split-at", action="append", default=[], metavar="MODEL=POINT", help="split point for a model (default: its ELF default)")
    g.add_argument("--protocol", default="elf", help="protocol preset: elf (official ELF evaluation, default), dsa, dm, dc, "
                                                   "mtt, glad; see docs/protocols.md. ELF runs always have the ELF terms on")
    g.add_argument("--epochs", type=int, default=None, help="the protocol's Epoch (official 1000; the loop runs Epoch+1)")
    g.add_argument("--runs", type=int, default=5, help="runs (seeds 0..runs-1) per model and method")
    g.add_argument("--seed", type=int, default=0, help="first seed")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--lambda-front", type=float, default=None)
    g.add_argument("--lambda-rear", type=float, default=None)
    g.add_argument("--lambda-task", type=float, default=None)
    g.add_argument("--distance", default=None, choices=["ce", "mse", "mae", "cos"])
    g.add_argument("--no-augment", action="store_true", help="train without DSA")
    g.add_argument("--no-baseline", action="store_true", help="skip the baseline runs")
    g.add_argument("--no-elf", action="store_true", help="skip the ELF runs")
    g.add_argument("--out", default=None, help="write the full result as JSON here")
    _add_test_data(p, required=False)
    _add_device(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("study", help="run a study: synthetic sets x models x {baseline, ELF, ablations} x seeds",
                       description="Run the study described by a TOML/YAML file (see docs/study.md): one JSON per run under "
                                   "<out>/runs (finished runs are skipped on restart), then summary.csv, summary.md and summary.png.")
    p.add_argument("config", help="study file (.toml, .yaml)")
    p.add_argument("--shard", default=None, metavar="I/N", help="run only shard I of N (0-based); under torchrun the rank decides")
    p.add_argument("--summarize", action="store_true", help="only collect finished runs into the summary")
    _add_device(p)
    p.set_defaults(func=_cmd_study)

    p = sub.add_parser("train-teacher", help="train a teacher ConvNet on real data (MTT expert protocol)",
                       description="Train a model on real data with the MTT expert protocol, saving a safetensors checkpoint per epoch "
                                   "(BatchNorm statistics included) and test accuracy per epoch. Resumes when interrupted.")
    p.add_argument("--model", default="ConvNet", help="model name (ConvNet for ConvNet students, ConvNetW512 for ResNet-18/VGG-11)")
    p.add_argument("--out", required=True, help="output directory for epoch_XXX.safetensors and history.json")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (MTT default 0; the ELF paper's feature models 0.9)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-per-class", type=int, default=None, help="train on a class-balanced subset (quick runs)")
    p.add_argument("--no-augment", action="store_true", help="train without DSA")
    p.add_argument("--zca", action="store_true", help="train in ZCA space (eps 0.1, fit on the full training set), for ZCA'd sets")
    p.add_argument("--no-resume", action="store_true", help="start over even if a resume file exists")
    _add_test_data(p, required=False)
    _add_device(p)
    p.set_defaults(func=_cmd_train_teacher)
    return parser


# ---- commands -------------------------------------------------------------------------------------------------
def _cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models

    models = list_models()
    width = max(map(len, models))
    for name, desc in models.items():
        print(f"{name:<{width}}  {desc}")
    return 0


def _cmd_split_points(args: argparse.Namespace) -> int:
    from .models import create_model
    from .split import list_split_points

    h, w = args.im_size
    model = create_model(args.model, channel=args.channels, num_classes=args.num_classes, im_size=(h, w))
    default = getattr(model, "elf_split_point", None)
    print(f"{args.model} at {args.channels}x{h}x{w}: valid split points (output shape per image)")
    for point in list_split_points(model, (args.channels, h, w)):
        mark = "  <- default ELF point" if point.name == default or default in point.aliases else ""
        print(f"  {point}{mark}")
    return 0


def _data_spec(args: argparse.Namespace) -> str:
    from .data import default_data_path

    spec = args.data or (str(default_data_path()) if default_data_path() else None)
    if not spec:
        raise ELFError("no real data given: pass --data cifar10 (downloads), --data PATH (ImageFolder or .tar.gz), or set ELF_DATA")
    return spec


def _load_split(args: argparse.Namespace, split: str, per_class: int | None, seed: int = 0) -> Any:
    from .data import load_cifar, load_dataset

    spec = _data_spec(args)
    if spec.lower() in ("cifar10", "cifar100"):
        images = load_cifar(spec.lower(), Path(args.data_root).expanduser(), train=(split == "train"))
    else:
        images = load_dataset(spec, split, cache_dir=args.cache_dir, progress=not args.no_progress)
    if per_class is not None:
        images = images.per_class(per_class, torch.Generator().manual_seed(seed))
    return images


def _protocol_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = {"epochs": "epochs", "lr": "lr", "batch_size": "batch_size", "lambda_front": "lambda_front",
             "lambda_rear": "lambda_rear", "lambda_task": "lambda_task", "distance": "distance"}
    out = {field: getattr(args, attr) for attr, field in names.items() if getattr(args, attr, None) is not None}
    if getattr(args, "no_augment", False):
        out["augment"] = None
    return out


def _cmd_eval(args: argparse.Namespace) -> int:
    from .data import get_normalization
    from .evaluation import compare_models, environment, format_table
    from .feature_bank import FeatureBank
    from .fileio import atomic_write
    from .io import load_any, load_mtt

    log = (lambda s: None) if args.no_progress else (lambda s: print(s, file=sys.stderr))
    sset = load_mtt(args.images, args.labels) if args.labels else (
        load_any(args.images, experiment=args.experiment) if Path(args.images).name.startswith("res_") else load_any(args.images))
    if sset.normalization is None:
        sset.normalization = get_normalization(args.normalization)
    norm = sset.normalization
    if args.zca:
        sset.zca = True
    test = _load_split(args, "test", args.test_per_class)
    test_x, test_y = test.as_float(norm), test.labels
    if sset.zca:
        log("the set is in ZCA space: fitting ZCA (eps 0.1) on the full real training set (cached)")
        test_x = _zca(args, norm).transform(test_x)
    c, h, w = sset.images.shape[1:]
    num_classes = sset.num_classes
    if tuple(test_x.shape[1:]) != (c, h, w):
        raise ELFError(f"test images are {tuple(test_x.shape[1:])} but the synthetic images are {(c, h, w)}")
    device = torch.device(args.device) if args.device else None
    banks = []
    if not args.no_elf:
        if not args.teacher:
            raise ELFError("ELF needs a teacher: pass --teacher CKPT --teacher-model NAME (or --no-elf for the baseline only)")
        for i, ckpt in enumerate(args.teacher):
            name = args.teacher_model[i] if i < len(args.teacher_model) else "ConvNet"
            point = args.teacher_point[i] if i < len(args.teacher_point) else None
            if not Path(ckpt).exists():
                raise ELFError(f"teacher checkpoint {ckpt} does not exist (train one with `elf train-teacher`)")
            bank_kw = dict(dtype=args.feature_dtype, cache_dir=_feature_cache(args), device=device, progress=not args.no_progress)
            if Path(ckpt).name.startswith("replay_buffer"):
                teacher = _teacher_from_buffer(args, ckpt, name, sset, num_classes, log)
                bank = FeatureBank.build(teacher.to(device or "cpu"), sset, point, **bank_kw)
            else:
                bank = FeatureBank.from_checkpoint(ckpt, name, sset, point, num_classes=num_classes, **bank_kw)
            log(f"teacher {name} ({ckpt}): features {bank.shape} at {bank.point}")
            banks.append(bank)
    split_at = dict(s.split("=", 1) for s in args.split_at)
    seeds = list(range(args.seed, args.seed + args.runs))
    t0 = time.perf_counter()
    rows = compare_models(args.models, sset, None, test_x, test_y, banks=banks, protocol=args.protocol,
                          seeds=seeds, baseline=not args.no_baseline, elf=not args.no_elf, split_at=split_at,
                          device=device, progress=not args.no_progress, log=log, **_protocol_overrides(args))
    print(format_table(rows))
    if args.out:
        result = {
            "command": "elf eval",
            "synthetic": {"path": str(args.images), "n": len(sset), "label_kind": sset.label_kind, "ipc": sset.ipc,
                          "normalization": norm.to_dict(), **sset.metadata},
            "teachers": [b.metadata for b in banks],
            "test": {"source": _data_spec(args), "n": int(test_x.shape[0])},
            "results": [r.to_dict() for r in rows],
            "environment": environment(device),
            "wall_time_s": time.perf_counter() - t0,
        }
        atomic_write(args.out, lambda p: Path(p).write_text(json.dumps(result, indent=1, default=str)))
        print(f"wrote {args.out}")
    return 0


def _teacher_from_buffer(args: argparse.Namespace, path: str, name: str, sset: Any, num_classes: int, log: Any) -> Any:
    """A teacher from one snapshot of an MTT expert buffer. Buffers hold parameters only: BatchNorm statistics are
    recomputed on up to 500 real training images per class (prepared like the set), since the stored ones are lost."""
    from torch import nn

    from .io import load_expert_buffer, load_parameters_into, recompute_bn_stats
    from .models import create_model

    c, h, w = sset.images.shape[1:]
    teacher = create_model(name, channel=c, num_classes=num_classes, im_size=(h, w))
    load_parameters_into(teacher, load_expert_buffer(path, args.buffer_trajectory, args.buffer_epoch))
    if any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in teacher.modules()):
        log(f"{path} holds no BatchNorm statistics: recomputing them for {name} on real training images")
        train = _load_split(args, "train", None)
        train = train.per_class(min(500, int(train.class_counts().min())), torch.Generator().manual_seed(0))
        x = train.as_float(sset.normalization)
        if sset.zca:
            x = _zca(args, sset.normalization).transform(x)
        recompute_bn_stats(teacher, x)
    return teacher.eval()


def _zca(args: argparse.Namespace, norm: Any) -> Any:
    from .data import fit_zca_cached

    train = _load_split(args, "train", None)
    return fit_zca_cached(train, norm, eps=0.1, cache_dir=args.cache_dir)


def _feature_cache(args: argparse.Namespace) -> Path:
    from .data import default_cache_dir

    return Path(args.cache_dir).expanduser() / "features" if args.cache_dir else default_cache_dir() / "features"


def _cmd_study(args: argparse.Namespace) -> int:
    from .study import main_study

    return main_study(args.config, args.shard, args.device, not args.no_progress, args.summarize)


def _cmd_train_teacher(args: argparse.Namespace) -> int:
    from .data import get_normalization
    from .teacher import train_teacher

    from .data import space_metadata

    norm = get_normalization(args.normalization)
    train = _load_split(args, "train", args.train_per_class, args.seed)
    test = _load_split(args, "test", args.test_per_class)
    train_x, test_x = train.as_float(norm), test.as_float(norm)
    if args.zca:
        zca = _zca(args, norm)
        train_x, test_x = zca.transform(train_x), zca.transform(test_x)
    changes: dict[str, Any] = {"lr": args.lr, "batch_size": args.batch_size}
    if args.no_augment:
        changes["augment"] = None
    meta = {"data_source": train.source_hash, "normalization": json.dumps(norm.to_dict()), "classes": json.dumps(train.classes),
            **space_metadata(norm, args.zca)}
    run = train_teacher(args.model, train_x, train.labels, args.out, test=(test_x, test.labels),
                        epochs=args.epochs, momentum=args.momentum, seed=args.seed, device=args.device,
                        progress=not args.no_progress, resume=not args.no_resume, metadata=meta, **changes)
    last = max(run.test_accuracy) if run.test_accuracy else None
    if last is not None:
        print(f"final test accuracy after {last} epochs: {run.test_accuracy[last]:.2f}%  ({run.checkpoint(last)})")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``elf`` console script; returns the exit status."""
    parser = build_parser()
    args = parser.parse_args(argv)
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args))
    except ELFError as e:
        print(f"elf {args.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
