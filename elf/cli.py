"""The ``elf`` command line: ``elf demo``, ``elf eval``, ``elf study``, ``elf train-teacher``, ``elf models``, ``elf split-points``.

Run ``elf COMMAND --help`` for every option.
"""

from __future__ import annotations

import argparse
import contextlib
import glob
import json
import os
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


def _add_import(p: argparse.ArgumentParser) -> None:
    p.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                   help="import MODULE first (a module name or a .py file) so the models it registers with "
                        "elf.register_model can be named; repeat for several. Installed plugins (entry-point group "
                        "elf_dd.models) load without it")


_NORMALIZATIONS_HELP = "cifar10_mtt (MTT/ELF; also their CIFAR-100 convention), cifar100_dc, imagenet, none"
_SET_NORMALIZATION_HELP = (f"mean/std used for real images and assumed for the synthetic set: {_NORMALIZATIONS_HELP} "
                           "(default: the set's own, else cifar10_mtt; with --zca none, as MTT whitens un-normalized "
                           "images)")


def _add_test_data(p: argparse.ArgumentParser, required: bool = True, normalization_help: str = _SET_NORMALIZATION_HELP) -> None:
    g = p.add_argument_group("real data")
    g.add_argument("--data", required=required, default=None,
                   help="real data: 'cifar10' / 'cifar100' (torchvision download), an ImageFolder directory or a "
                        ".tar/.tar.gz archive of one with train/ and test/ folders (default: $ELF_DATA)")
    g.add_argument("--data-root", default=None,
                   help="download root for cifar10/cifar100 (default: torchvision/ in $ELF_CACHE or ~/.cache/elf-dd)")
    g.add_argument("--normalization", default=None, help=normalization_help)
    g.add_argument("--test-per-class", type=int, default=None, help="use a class-balanced test subset of this many per class")
    g.add_argument("--cache-dir", default=None, help="decoded-data and feature cache (default: $ELF_CACHE or ~/.cache/elf-dd)")


class _Parser(argparse.ArgumentParser):
    """An argument parser whose usage errors are one line, like every other `elf` error (exit status 2)."""

    def error(self, message: str) -> Any:  # type: ignore[override]
        self.exit(2, f"{self.prog}: error: {message} (see `{self.prog} --help`)\n")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="elf", description="ELF: evaluate distilled datasets on any architecture with distillation features.")
    from .version import __version__

    parser.add_argument("--version", action="version", version=f"elf-dd {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    p = sub.add_parser("models", help="list the model names (built-in, registered, plugins)",
                       description="List model names for --models and --teacher-model: built-ins, models of --import "
                                   "modules and of installed plugins (entry-point group elf_dd.models).")
    _add_import(p)
    p.set_defaults(func=_cmd_models)

    p = sub.add_parser("split-points", help="list the valid split points of a model with their output shapes",
                       description="List the valid ELF split points of MODEL (exactly one tensor crosses each) and the per-image output shape there.")
    p.add_argument("model", help="model name, e.g. ResNet18BN or torchvision.resnet18")
    p.add_argument("--im-size", type=int, nargs=2, default=(32, 32), metavar=("H", "W"))
    p.add_argument("--channels", type=int, default=3)
    p.add_argument("--num-classes", type=int, default=10)
    p.add_argument("--shape", default=None, metavar="CxHxW",
                   help="list only the points with this per-image output shape, e.g. 512x4x4 (a teacher's feature shape)")
    _add_import(p)
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
    g.add_argument("--buffer-trajectory", type=int, default=-1,
                   help="trajectory of an MTT replay_buffer_*.pt teacher (default: the last, as ELF's script takes)")
    g.add_argument("--buffer-epoch", type=int, default=-1, help="snapshot (epoch) of an MTT replay_buffer_*.pt teacher (default: last; ELF's runs: 100 of 200)")
    g.add_argument("--feature-dtype", default="float32", choices=["float32", "float16", "bfloat16"], help="feature storage dtype")
    g = p.add_argument_group("evaluation")
    g.add_argument("--models", nargs="+", default=["ConvNetBN"], help="evaluation models (see `elf models`)")
    g.add_argument("--split-at", action="append", default=[], metavar="MODEL=POINT",
                   help="split point for a model (default: its ELF default); POINT 'auto' picks the deepest point matching "
                        "the teacher's shape (or grid, with --adapter auto); a bare POINT applies to every model")
    g.add_argument("--protocol", default="elf", help="protocol preset: elf (default: official numbers, rear BatchNorm "
                                                   "statistics from the student's path), elf-official (the public code "
                                                   "exactly), elf-cross (elf + adapters + aligned targets), elf-aug (elf + "
                                                   "adapters + the teacher on each augmented batch), dsa, dm, dc, dc-aug (DC with its crop/noise augmentation, for a ConvNet-BN student), mtt, "
                                                   "glad; see docs/protocols.md. ELF runs always have the ELF terms on")
    g.add_argument("--epochs", type=int, default=None, help="the protocol's Epoch (official 1000; the loop runs Epoch+1)")
    g.add_argument("--runs", type=int, default=5, help="runs per model and method (seeds --seed .. --seed + runs - 1)")
    g.add_argument("--seed", type=int, default=0, help="first seed")
    g.add_argument("--lr", type=float, default=None)
    g.add_argument("--batch-size", type=int, default=None)
    g.add_argument("--lambda-front", type=float, default=None)
    g.add_argument("--lambda-rear", type=float, default=None)
    g.add_argument("--lambda-task", type=float, default=None)
    g.add_argument("--distance", default=None, choices=["ce", "mse", "mae", "cos", "cos-batch"],
                   help="front-term distance (default ce, the official soft-target CE; cos: one cosine per image; "
                        "cos-batch: the official code's COS, one cosine over the flattened batch)")
    g.add_argument("--rear-bn-stats", default=None, choices=["features", "student"],
                   help="BatchNorm running stats in the rear: also updated by the pass on teacher features (official "
                        "loop, elf-official) or by the student's own path only (default; see docs/protocols.md)")
    g.add_argument("--adapter", default=None, choices=["none", "auto", "always"],
                   help="auto: learned adapters bridge a student feature whose shape differs from the teacher's (any "
                        "teacher for any model; see docs/adapters.md); always: learned projections even for equal "
                        "shapes; none: shapes must match (paper)")
    g.add_argument("--align-targets", nargs="?", const=True, default=False, choices=["flip"],
                   help="apply each batch's geometric DSA transform to the teacher feature maps too (see docs/trainer.md); "
                        "'--align-targets flip': the flips only")
    g.add_argument("--teacher-on-augmented", action="store_true",
                   help="run the teacher on every augmented batch for the front term's target (features_on_augmented; "
                        "a teacher forward per step, shared by --batched seeds), instead of its cached features of the "
                        "un-augmented images; it replaces a preset's aligned targets (--protocol elf-cross) and "
                        "cannot be combined with --align-targets")
    g.add_argument("--no-augment", action="store_true", help="train without DSA")
    g.add_argument("--augment", default=None, metavar="STRATEGY",
                   help="the student's augmentation instead of the protocol's: a DSA strategy (ops joined by '_'), "
                        "'dc:crop_noise' (DC's per-image crop/noise, what DC's main.py gives a ConvNet-BN student; "
                        "preset dc-aug), or 'none'")
    g.add_argument("--no-baseline", action="store_true", help="skip the baseline runs")
    g.add_argument("--no-elf", action="store_true", help="skip the ELF runs")
    g.add_argument("--batched", nargs="?", const=True, default=False, type=int, metavar="M",
                   help="train the runs of each model and method at once as one vectorized model (same accuracies as "
                        "one by one; M: at most M seeds at a time); see docs/trainer.md, Batched seeds")
    g.add_argument("--compile", action="store_true", help="with --batched: torch.compile the batched step")
    g.add_argument("--channels-last", action="store_true",
                   help="train and test in the channels-last memory format (same numbers up to float rounding; "
                        "sequential runs only, --batched ignores it); see docs/trainer.md, Channels-last")
    g.add_argument("--out", default=None, help="write the full result as JSON here (rewritten after every finished run, "
                                               "so an interrupted eval keeps its finished runs)")
    g.add_argument("--resume", action="store_true", help="continue the eval whose --out file exists: its finished runs "
                   "are kept, the rest run (the settings must be the same)")
    _add_test_data(p, required=False)
    _add_device(p)
    _add_import(p)
    p.set_defaults(func=_cmd_eval)

    p = sub.add_parser("demo", help="baseline vs ELF on the bundled CIFAR-10 assets (no download)",
                       description="Evaluate the bundled 10-images-per-class CIFAR-10 set with the bundled ConvNet teacher on the "
                                   "bundled 1,000-image test subset, with and without ELF. CPU default: ConvNet-BN, 200 epochs, "
                                   "2 runs (about 4 minutes on an idle 2-core CPU); --full: the official protocol (1000 epochs, 5 runs; for a GPU).")
    p.add_argument("--models", nargs="+", default=None, help="evaluation models (ConvNet family: the bundled teacher is width 128)")
    p.add_argument("--epochs", type=int, default=None, help="training epochs per run (default 200; --full: 1000)")
    p.add_argument("--runs", type=int, default=None, help="runs (seeds) per model and method (default 2; --full: 5)")
    p.add_argument("--full", action="store_true", help="the official protocol: 1000 epochs, 5 runs, ConvNet / ConvNet-BN / ConvNet-LN")
    p.add_argument("--info", action="store_true", help="print how the bundled assets were made and exit")
    _add_device(p)
    p.set_defaults(func=_cmd_demo)

    p = sub.add_parser("study", help="run a study: synthetic sets x models x {baseline, ELF, ablations} x seeds",
                       description="Run the study described by a TOML/YAML file (see docs/study.md): one JSON per run under "
                                   "<out>/runs (finished runs are skipped on restart), then summary.csv, summary.md and summary.png.")
    p.add_argument("config", help="study file (.toml, .yaml)")
    p.add_argument("--shard", default=None, metavar="I/N", help="run only shard I of N (0-based); under torchrun the rank decides")
    p.add_argument("--summarize", action="store_true", help="only collect finished runs into the summary")
    p.add_argument("--only", action="append", default=None, metavar="PATTERN",
                   help="run only the runs whose id (SET__MODEL__VARIANT__sSEED) matches this shell-style pattern, "
                        "e.g. '*__VGG11__*__s2'; repeat for several")
    _add_device(p)
    _add_import(p)
    p.set_defaults(func=_cmd_study)

    p = sub.add_parser("train-teacher", help="train a teacher ConvNet on real data (MTT expert protocol)",
                       description="Train a model on real data with the MTT expert protocol, saving a safetensors checkpoint per epoch "
                                   "(BatchNorm statistics included) and test accuracy per epoch. Resumes when interrupted.")
    p.add_argument("--model", default="ConvNet", help="model name (ConvNet for ConvNet students, ConvNetW512 for ResNet-18/VGG-11)")
    p.add_argument("--out", required=True, help="output directory for epoch_XXX.safetensors and history.json")
    p.add_argument("--epochs", type=int, default=50)
    p.add_argument("--momentum", type=float, default=0.0, help="SGD momentum (MTT's experts 0; the ELF paper's feature models 0.9)")
    p.add_argument("--weight-decay", type=float, default=0.0,
                   help="SGD weight decay (MTT's experts 0; the ELF paper's feature models 5e-4)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--train-per-class", type=int, default=None, help="train on a class-balanced subset (quick runs)")
    p.add_argument("--no-augment", action="store_true", help="train without DSA")
    p.add_argument("--zca", action="store_true", help="train in ZCA space (eps 0.1, fit on the full training set), for ZCA'd sets")
    p.add_argument("--no-resume", action="store_true", help="start over even if a resume file exists")
    _add_test_data(p, required=False, normalization_help=(
        "mean/std of the real images, recorded in the checkpoints (sets evaluated with this teacher must be in the "
        f"same space): {_NORMALIZATIONS_HELP} (default: cifar10_mtt; with --zca none, as MTT whitens un-normalized "
        "images)"))
    _add_device(p)
    _add_import(p)
    p.set_defaults(func=_cmd_train_teacher)

    p = sub.add_parser("distill", help="distill a synthetic set from real data (DM, DC, DSA, MTT; pixels or GLaD latents)",
                       description="Distill a synthetic set with DM, DC, DSA or MTT (pixels, optionally IDC multi-formation, "
                                   "or GLaD generator latents), "
                                   "from random-init networks or an Acc-DD pool of early-stage (optionally perturbed) "
                                   "networks. Writes an elf-dd .safetensors set that `elf eval --images` reads. Method "
                                   "defaults follow the public DC/DSA/DM code (see docs/distill.md).")
    p.add_argument("--method", required=True, choices=["dm", "dc", "dsa", "mtt"], help="objective: dm (distribution "
                   "matching), dc / dsa (gradient matching without / with Siamese augmentation), mtt (trajectory matching)")
    p.add_argument("--ipc", type=int, required=True, help="stored images per class")
    p.add_argument("--out", required=True, help="output .safetensors file")
    p.add_argument("--iterations", type=int, default=None, help="image updates (default: DM 20000; DC/DSA 1000 x outer loop)")
    p.add_argument("--param", default="pixels", choices=["pixels", "glad"], help="parameterization of the set")
    p.add_argument("--model", default="ConvNet", help="network the objective matches through (default ConvNet, instance norm)")
    p.add_argument("--init", default=None, choices=["real", "noise"], help="pixel initialization (default: DM/DSA real, DC noise; --param pixels only)")
    p.add_argument("--factor", type=int, default=1, help="IDC multi-formation factor (2: each stored image holds 4 tiles; --param pixels only)")
    p.add_argument("--lr-img", type=float, default=None, help="pixel lr (default: DM 1.0, DC/DSA 0.1; --param pixels only)")
    p.add_argument("--momentum-img", type=float, default=None, help="pixel SGD momentum (default 0.5; --param pixels only)")
    p.add_argument("--batch-real", type=int, default=None, help="real images per class per iteration (default 256)")
    p.add_argument("--dsa-strategy", default=None, help="Siamese augmentation (default: DM/DSA the official strategy, DC none; 'none' turns it off)")
    g = p.add_argument_group("gradient matching (dc, dsa)")
    g.add_argument("--match", default="all", choices=["all", "conv"], help="match all parameters (DC/DSA) or conv weights only (Acc-DD)")
    g.add_argument("--distance", default="dc", choices=["dc", "mse", "cos"], help="gradient distance (DC: dc; Acc-DD: mse)")
    g.add_argument("--outer-loop", type=int, default=None, help="image updates per network (default: DC's table for the ipc)")
    g.add_argument("--inner-loop", type=int, default=None, help="network epochs on the synthetic set between updates (default: DC's table)")
    g.add_argument("--lr-net", type=float, default=0.01, help="network lr in the inner loop (DC 0.01)")
    g = p.add_argument_group("trajectory matching (mtt)")
    g.add_argument("--experts", default=None, help="expert trajectories: an `elf train-teacher` output folder, a folder of "
                   "such runs (one trajectory each), an MTT replay_buffer_<n>.pt, or a folder of those")
    g.add_argument("--syn-steps", type=int, default=20, help="student steps on the synthetic set per iteration (MTT N)")
    g.add_argument("--expert-epochs", type=int, default=2, help="expert epochs to match (MTT M)")
    g.add_argument("--max-start-epoch", type=int, default=20, help="latest expert start epoch (MTT T+)")
    g.add_argument("--syn-lr", type=float, default=0.01, help="initial learned student lr (MTT lr_teacher)")
    g.add_argument("--lr-lr", type=float, default=1e-5, help="lr of the learned lr (MTT lr_lr)")
    g = p.add_argument_group("generator latents (--param glad)")
    g.add_argument("--generator", default="random", help="'random' (randomly initialized SmallGenerator), 'trained' (train "
                   "elf-dd's small VAE-decoder generator on the real data first), or a generator checkpoint file")
    g.add_argument("--generator-epochs", type=int, default=10, help="epochs for --generator trained")
    g.add_argument("--glad-init", choices=["noise", "real"], default="noise",
                   help="latent initialization: noise, or the encoder's codes of real images (--generator trained, or a "
                        "checkpoint saved with its encoder)")
    g.add_argument("--glad-split", default=None, help="generator layer whose output is optimized (default: the generator's own)")
    g.add_argument("--chunk-size", type=int, default=10, help="images per generator chunk (peak memory = one chunk)")
    g = p.add_argument_group("network pool")
    g.add_argument("--pool", default="random", choices=["random", "early"], help="fresh random networks (DC/DSA/DM) or an "
                   "Acc-DD pool of networks trained briefly on real data (trained once, cached); not with --method mtt, which draws no network")
    g.add_argument("--pool-size", type=int, default=5, help="networks in an early-stage pool")
    g.add_argument("--pool-epochs", type=int, default=2, help="real-data epochs per early-stage network (Acc-DD 2)")
    g.add_argument("--perturb", action="store_true", help="Acc-DD parameter perturbation of every drawn network (dm, dc, dsa only)")
    g = p.add_argument_group("run")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--checkpoint-dir", default=None, help="checkpoint here and resume from here (exact on CPU; default: "
                   "OUT.ckpt/ beside --out, removed once the set is written)")
    g.add_argument("--checkpoint-every", type=int, default=100)
    g.add_argument("--no-resume", action="store_true", help="ignore an existing checkpoint")
    g.add_argument("--log-every", type=int, default=10, help="steps between loss read-backs")
    g.add_argument("--snapshot-every", type=int, default=None,
                   help="also write the set every N steps (and at the end) as OUT_STEM.stepNNNNNN.safetensors, with the "
                        "distillation wall time so far in its metadata (for accuracy-vs-time curves)")
    g = p.add_argument_group("real data")
    g.add_argument("--data", default=None, help="real data: 'cifar10' / 'cifar100', an ImageFolder directory or a .tar/.tar.gz "
                                               "archive of one with a train/ folder (default: $ELF_DATA)")
    g.add_argument("--data-root", default=None,
                   help="download root for cifar10/cifar100 (default: torchvision/ in $ELF_CACHE or ~/.cache/elf-dd)")
    g.add_argument("--normalization", default=None, help="mean/std of the real images and of the set (cifar10_mtt, "
                                                             "cifar100_dc, imagenet, none; default cifar10_mtt)")
    g.add_argument("--train-per-class", type=int, default=None, help="distill from a class-balanced subset (quick runs)")
    g.add_argument("--cache-dir", default=None, help="decoded-data and pool cache (default: $ELF_CACHE or ~/.cache/elf-dd)")
    _add_device(p)
    _add_import(p)
    p.set_defaults(func=_cmd_distill)
    return parser


# ---- commands -------------------------------------------------------------------------------------------------
def _cmd_models(args: argparse.Namespace) -> int:
    from .models import list_models

    models = list_models()
    width = max(map(len, models))
    for name, desc in models.items():
        print(f"{name:<{width}}  {desc}")
    print("\nConvNet variants by name: ConvNetW<width>D<depth> plus BN/IN/LN/GN/NN (norm), AS/AR/AL (activation), "
          "NP/MP/AP (pooling), e.g. ConvNetW512, ConvNetW64D4BN; any model with arguments: NAME:key=value,...")
    return 0


def _cmd_split_points(args: argparse.Namespace) -> int:
    from .models import create_model
    from .split import list_split_points

    h, w = args.im_size
    if args.channels < 1 or h < 1 or w < 1 or args.num_classes < 1:
        raise ELFError(f"--channels, --im-size and --num-classes must be positive, got {args.channels}, {h}x{w}, "
                       f"{args.num_classes}")
    shape = _parse_shape(args.shape) if args.shape else None
    model = create_model(args.model, channel=args.channels, num_classes=args.num_classes, im_size=(h, w))
    default = getattr(model, "elf_split_point", None)
    points = list_split_points(model, (args.channels, h, w), shape=shape)
    which = f" with output shape {'x'.join(map(str, shape))}" if shape else ""
    print(f"{args.model} at {args.channels}x{h}x{w}: valid split points{which} (output shape per image)")
    for point in points:
        mark = "  <- default ELF point" if point.name == default or default in point.aliases else ""
        print(f"  {point}{mark}")
    if shape and not points:
        print(f"  (none: no point of {args.model} outputs {shape}; adapters bridge other shapes: --adapter auto)")
    if isinstance(default, str) and not shape and not any(default == p.name or default in p.aliases for p in points):
        print(f"elf split-points: warning: {args.model}'s default ELF point {default!r} (its registration's split_point) "
              "is not among its valid points: ELF runs without --split-at will fail; register one listed here",
              file=sys.stderr)
    return 0


def _parse_shape(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(v) for v in text.lower().replace(",", "x").split("x"))
    except ValueError:
        shape = ()
    if not shape or any(v < 1 for v in shape):
        raise ELFError(f"--shape must look like 512x4x4 (positive integers), got {text!r}")
    return shape


def _data_spec(args: argparse.Namespace) -> str:
    from .data import default_data_path

    spec = args.data or (str(default_data_path()) if default_data_path() else None)
    if not spec:
        raise ELFError("no real data given: pass --data cifar10 (downloads), --data PATH (ImageFolder or .tar.gz), or set ELF_DATA")
    return spec


def _load_split(args: argparse.Namespace, split: str, per_class: int | None, seed: int = 0) -> Any:
    from .data import default_download_root, load_cifar, load_dataset

    spec = _data_spec(args)
    if spec.lower() in ("cifar10", "cifar100"):
        root = Path(args.data_root).expanduser() if args.data_root else default_download_root()
        images = load_cifar(spec.lower(), root, train=(split == "train"))
    else:
        images = load_dataset(spec, split, cache_dir=args.cache_dir, progress=not args.no_progress)
    if per_class is not None:
        images = images.per_class(per_class, torch.Generator().manual_seed(seed))
    return images


def _protocol_overrides(args: argparse.Namespace) -> dict[str, Any]:
    names = {"epochs": "epochs", "lr": "lr", "batch_size": "batch_size", "lambda_front": "lambda_front",
             "lambda_rear": "lambda_rear", "lambda_task": "lambda_task", "distance": "distance"}
    out = {field: getattr(args, attr) for attr, field in names.items() if getattr(args, attr, None) is not None}
    if getattr(args, "augment", None) is not None:
        if getattr(args, "no_augment", False):
            raise ELFError("--augment and --no-augment: give one (--augment none is --no-augment)")
        out["augment"] = None if args.augment == "none" else args.augment
    if getattr(args, "no_augment", False):
        out["augment"] = None
    if getattr(args, "adapter", None) is not None:
        out["adapter"] = None if args.adapter == "none" else args.adapter
    if getattr(args, "align_targets", False):
        out["align_targets"] = args.align_targets  # True, or "flip"
    if getattr(args, "teacher_on_augmented", False):
        out["features_on_augmented"] = True  # replaces a preset's aligned targets (Protocol.replace)
    if getattr(args, "rear_bn_stats", None) is not None:
        out["rear_bn_stats_from_features"] = args.rear_bn_stats == "features"
    return out


def _cmd_eval(args: argparse.Namespace) -> int:
    from .evaluation import compare_models, format_table

    _check_eval_args(args)
    log = (lambda s: None) if args.no_progress else (lambda s: print(s, file=sys.stderr))
    previous = _previous_eval(args.out) if args.resume else None
    sset, test_x, test_y = _eval_data(args, log)
    device = torch.device(args.device) if args.device else None
    banks = [] if args.no_elf else _eval_banks(args, sset, device, log)
    settings = _eval_settings(args, sset, banks, test_x, test_y, sset.normalization)
    rows_before: list[Any] = []
    if previous is not None:
        rows_before = _resumable_rows(args.out, previous, settings)
        log(f"resuming {args.out}: {_finished_runs(rows_before)} finished run(s) kept")
    record = _EvalRecord(args, sset, banks, test_x, settings, device, previous, _finished_runs(rows_before))
    try:
        rows = compare_models(args.models, sset, None, test_x, test_y, banks=banks, protocol=args.protocol,
                              seeds=list(range(args.seed, args.seed + args.runs)), baseline=not args.no_baseline,
                              elf=not args.no_elf, split_at=_split_points(args.split_at, args.models), device=device,
                              progress=not args.no_progress, log=log, previous=rows_before, on_update=record.save,
                              batched=args.batched, compile=args.compile, channels_last=args.channels_last,
                              **_protocol_overrides(args))
    except KeyboardInterrupt:
        where = (f"{record.runs} finished run(s) saved in {args.out}; continue with the same command and --resume"
                 if args.out and record.runs else "no run had finished yet, nothing saved" if args.out
                 else "nothing finished was saved (pass --out FILE to keep finished runs)")
        print(f"elf eval: interrupted: {where}", file=sys.stderr)
        return 130
    print(format_table(rows))
    if args.out:
        record.save(rows, complete=True)
        print(f"wrote {args.out}")
    return 0


def _check_eval_args(args: argparse.Namespace) -> None:
    """Option errors of ``elf eval`` that need no data, and a writable ``--out``, before anything is loaded."""
    from .fileio import check_writable

    if args.compile and not args.batched:
        raise ELFError("--compile compiles the batched step: add --batched")
    if args.batched is not True and args.batched is not False and args.batched < 1:
        raise ELFError(f"--batched M takes M >= 1 seeds at a time, got {args.batched}")
    if args.resume and not args.out:
        raise ELFError("--resume continues the eval saved in --out: pass --out FILE")
    for flag, values in (("--teacher-model", args.teacher_model), ("--teacher-point", args.teacher_point)):
        if len(values) > len(args.teacher):
            raise ELFError(f"{len(values)} {flag} value(s) for {len(args.teacher)} --teacher(s): each {flag} belongs "
                           "to the --teacher in the same position; drop the extra or add its --teacher")
    if args.runs < 1:
        raise ELFError(f"--runs must be >= 1, got {args.runs}")
    from .protocol import get_protocol

    get_protocol(args.protocol, **_protocol_overrides(args))  # its numbers (--lr nan, --lambda-front inf) checked now
    if args.out:
        check_writable(args.out, "--out")
        if not args.resume:
            _refuse_overwriting_runs(args.out)


def _normalization(args: argparse.Namespace) -> Any:
    """``--normalization``, else the code bases' default for the pixel space asked for: ``none`` with ``--zca`` (MTT,
    TESLA and DATM fit and apply ZCA to un-normalized [0, 1] images), else ``cifar10_mtt``."""
    from .pixel_space import get_normalization

    return get_normalization(args.normalization or ("none" if getattr(args, "zca", False) else "cifar10_mtt"))


def _eval_data(args: argparse.Namespace, log: Any) -> tuple[Any, torch.Tensor, torch.Tensor]:
    """The synthetic set (in its pixel space) and the real test images ``(M, C, H, W)`` and labels, matched to it."""
    from .io import load_assuming, load_mtt

    given = _normalization(args)
    name = Path(args.images).name.lower()
    if args.labels:
        sset = load_mtt(args.images, args.labels, normalization=given)
    else:  # MTT files, .npz, image folders: in the given normalization (uint8 images converted with it); a DC result
        # infers it from its file name, an elf-dd set records its own
        sset = load_assuming(args.images, given, **({"experiment": args.experiment} if name.startswith("res_") else {}))
    if args.normalization and sset.normalization is not None and sset.normalization.to_dict() != given.to_dict():
        if name.endswith(".safetensors"):  # an elf-dd set records the space it was made in: a disagreement is an error
            raise ELFError(f"{args.images} records normalization {sset.normalization.name!r}, but --normalization is "
                           f"{given.name!r}: drop --normalization (the set's own is used)")
        # a DC result's normalization is inferred from its file name: the explicit flag wins, said
        print(f"elf eval: note: --normalization {given.name} replaces {sset.normalization.name!r}, inferred from "
              f"{Path(args.images).name}", file=sys.stderr)
        sset.normalization = given
    if sset.normalization is None:  # e.g. a DC/DM result of a dataset without known statistics: said, not silent
        print(f"elf eval: note: {args.images} records no normalization: assuming {given.name} (mean {given.mean}, "
              f"std {given.std}); pass --normalization if the set was made with other statistics", file=sys.stderr)
        sset.normalization = given
    if args.zca and name.endswith(".safetensors") and not sset.zca:
        print(f"elf eval: note: --zca overrides {args.images}'s own record that its images are not ZCA-whitened "
              "(elf-dd sets record their pixel space): drop --zca unless that record is wrong", file=sys.stderr)
    if args.zca and not name.endswith(".safetensors") and not sset.normalization.is_identity:
        print(f"elf eval: note: --zca with normalization {sset.normalization.name!r}: MTT, TESLA and DATM whiten "
              "un-normalized images (normalization 'none', what --zca assumes without --normalization); "
              f"{sset.normalization.name!r} is right only for a set whitened after normalizing", file=sys.stderr)
    if args.zca and name.endswith(".npz"):
        from .io import KIP_ZCA_NOTE

        print(f"elf eval: note: --zca on an .npz set: {KIP_ZCA_NOTE}", file=sys.stderr)
    if args.zca:
        sset.zca = True
    test = sset.label_real(_load_split(args, "test", args.test_per_class), "the test split", log)
    test_x, test_y = test.as_float(sset.normalization), test.labels
    if sset.zca:
        log("the set is in ZCA space: fitting ZCA (eps 0.1) on the full real training set (cached)")
        test_x = _zca(args, sset.normalization).transform(test_x)
    if tuple(test_x.shape[1:]) != tuple(sset.images.shape[1:]):
        raise ELFError(f"test images are {tuple(test_x.shape[1:])} but the synthetic images are {tuple(sset.images.shape[1:])}")
    return sset, test_x, test_y


def _eval_banks(args: argparse.Namespace, sset: Any, device: torch.device | None, log: Any) -> list[Any]:
    """One feature bank per ``--teacher`` (a checkpoint, or an MTT expert buffer)."""
    from .feature_bank import FeatureBank

    if not args.teacher:
        raise ELFError("ELF needs a teacher: pass --teacher CKPT --teacher-model NAME (or --no-elf for the baseline only)")
    banks = []
    for i, ckpt in enumerate(args.teacher):
        name = args.teacher_model[i] if i < len(args.teacher_model) else "ConvNet"
        point = args.teacher_point[i] if i < len(args.teacher_point) else None
        if not Path(ckpt).exists():
            raise ELFError(f"teacher checkpoint {ckpt} does not exist (train one with `elf train-teacher`)")
        bank_kw = dict(dtype=args.feature_dtype, cache_dir=_feature_cache(args), device=device, progress=not args.no_progress)
        if Path(ckpt).name.startswith("replay_buffer"):
            teacher = _teacher_from_buffer(args, ckpt, name, sset, sset.num_classes, log)
            bank = FeatureBank.build(teacher.to(device or "cpu"), sset, point, **bank_kw)
        else:
            bank = FeatureBank.from_checkpoint(ckpt, name, sset, point, num_classes=sset.num_classes, **bank_kw)
        log(f"teacher {name} ({ckpt}): features {bank.shape} at {bank.point}")
        banks.append(bank)
    return banks


class _EvalRecord:
    """The ``--out`` JSON of ``elf eval``, rewritten (atomically) after every finished run."""

    def __init__(self, args: argparse.Namespace, sset: Any, banks: list[Any], test_x: torch.Tensor,
                 settings: dict[str, Any], device: torch.device | None, previous: dict[str, Any] | None, runs: int) -> None:
        from .evaluation import environment, git_revision

        self.out, self.runs = args.out, runs
        self.t0 = time.perf_counter()
        self.earlier_s = float(previous.get("wall_time_s", 0.0)) if previous else 0.0
        self.result: dict[str, Any] = {
            "command": "elf eval",
            "complete": False,
            "settings": settings,
            "synthetic": {"path": str(args.images), "n": len(sset), "label_kind": sset.label_kind, "ipc": sset.ipc,
                          "normalization": sset.normalization.to_dict(), **sset.metadata},
            "teachers": [b.metadata for b in banks],
            "test": {"source": _data_spec(args), "n": int(test_x.shape[0])},
            "results": [],
            "environment": environment(device),
            "git_revision": git_revision(),
            "wall_time_s": 0.0,
        }
        if previous and runs:  # the sessions before a resume: their runs ran on that machine and code, not this one's
            session = {"environment": previous.get("environment"), "git_revision": previous.get("git_revision"),
                       "finished_runs": runs - sum(s["finished_runs"] for s in previous.get("earlier_sessions", []))}
            self.result["earlier_sessions"] = [*previous.get("earlier_sessions", []), session]

    def save(self, rows: list[Any], complete: bool = False) -> None:
        """Write ``rows`` (every finished run so far) to ``--out``; nothing without ``--out``."""
        from .fileio import atomic_write

        if not self.out:
            return
        self.result.update(results=[r.to_dict() for r in rows], complete=complete,
                           wall_time_s=time.perf_counter() - self.t0 + self.earlier_s)
        self.runs = _finished_runs(rows)
        try:
            atomic_write(self.out, lambda p: Path(p).write_text(json.dumps(self.result, indent=1, default=str)))
        except OSError as e:
            raise ELFError(f"cannot write --out {self.out}: {e.strerror or e}") from e


def _finished_runs(rows: Sequence[Any]) -> int:
    return sum(len(r.baseline.seeds if r.baseline else []) + len(r.elf.seeds if r.elf else []) for r in rows)


def _eval_settings(args: argparse.Namespace, sset: Any, banks: Sequence[Any], test_x: torch.Tensor, test_y: torch.Tensor,
                   norm: Any) -> dict[str, Any]:
    """Everything that decides the numbers of an `elf eval`: a resumed eval must have the same."""
    from .fileio import tensor_sha256

    keys = ("images", "labels", "experiment", "zca", "models", "split_at", "protocol", "epochs", "seed", "lr",
            "batch_size", "lambda_front", "lambda_rear", "lambda_task", "distance", "rear_bn_stats", "adapter",
            "align_targets", "no_augment", "no_baseline", "no_elf", "test_per_class", "feature_dtype")
    out: dict[str, Any] = {k: getattr(args, k) for k in keys}
    if args.teacher_on_augmented:  # only when given, so evals saved before the option existed still resume
        out["teacher_on_augmented"] = True
    if args.augment is not None:  # (likewise)
        out["augment"] = args.augment
    out["images_n"] = len(sset)
    out["normalization"] = norm.to_dict()
    out["teachers"] = [b.metadata.get("teacher_sha256", "") for b in banks]
    if args.teacher_point:  # only when given (evals saved before it was recorded still resume); omitting it differs
        out["teacher_points"] = [b.point for b in banks]
    out["test_n"] = int(test_x.shape[0])
    # the contents, not only the paths: a set file replaced in place, or other --data, must not be resumed into
    out["set_sha256"] = sset.content_sha256()
    out["test_sha256"] = tensor_sha256(test_x, test_y)
    return json.loads(json.dumps(out, default=str))


#: Settings recorded since a later version: an earlier record without them still resumes (they are not compared).
_RECORDED_LATER = frozenset({"set_sha256", "test_sha256"})


def _refuse_overwriting_runs(out: str) -> None:
    """An existing ``--out`` holding finished runs of an earlier eval is not overwritten without ``--resume``."""
    try:
        data = json.loads(Path(out).expanduser().read_text())
    except (OSError, ValueError):  # none yet, or not an eval record: written as asked
        return
    if isinstance(data, dict) and data.get("command") == "elf eval":
        from .evaluation import ModelComparison

        done = _finished_runs([ModelComparison.from_dict(r) for r in data.get("results", [])])
        if done:
            raise ELFError(f"--out {out} holds {done} finished run(s) of an earlier eval: add --resume to continue it "
                           "(same settings), or give another --out (or delete the file) to start over")


def _previous_eval(out: str) -> dict[str, Any] | None:
    """The JSON of an earlier `elf eval --out` run, for --resume; None when there is none yet."""
    path = Path(out)
    if not path.exists():
        return None
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise ELFError(f"--resume: cannot read {out} ({e}); delete it to start over") from e
    if not isinstance(data, dict) or data.get("command") != "elf eval" or "settings" not in data:
        raise ELFError(f"--resume: {out} is not a resumable `elf eval` result (no recorded settings); delete it or "
                       "choose another --out")
    return data


def _resumable_rows(out: str, previous: dict[str, Any], settings: dict[str, Any]) -> list[Any]:
    from .evaluation import ModelComparison
    from .resume import changed_settings

    later = frozenset(k for k in _RECORDED_LATER if k not in previous["settings"])
    shown = changed_settings(previous["settings"], settings, later, new_keys=True)
    if shown:
        why = {"set_sha256": "the synthetic set's contents differ", "test_sha256": "the test images differ (--data)"}
        hints = "".join(f"; {why[k]}" for k in why if k + ":" in shown)
        raise ELFError(f"--resume: {out} was computed with other settings ({shown}{hints}); use the same command, or "
                       "another --out to start over")
    return [ModelComparison.from_dict(r) for r in previous.get("results", [])]


def _split_points(items: Sequence[str], models: Sequence[str]) -> dict[str, str]:
    """``MODEL=POINT`` entries (a bare ``POINT`` applies to every model) as a dict; model specs may hold '='."""
    out: dict[str, str] = {}
    for item in items:
        if "=" in item:
            model, point = item.rsplit("=", 1)
            if not model or not point:
                raise ELFError(f"--split-at {item!r}: expected MODEL=POINT (or a bare POINT for every model)")
            out[model] = point
        elif item in models:
            raise ELFError(f"--split-at {item!r} names a model, not a point: give {item}=POINT "
                           f"(`elf split-points {item}` lists the points)")
        else:
            out.update({m: item for m in models})
    return out


def _teacher_from_buffer(args: argparse.Namespace, path: str, name: str, sset: Any, num_classes: int, log: Any) -> Any:
    """A teacher from one snapshot of an MTT expert buffer; BatchNorm statistics from up to 500 real training images
    per class, prepared like the set (see :func:`elf.teacher.teacher_from_expert_buffer`)."""
    from .teacher import teacher_from_expert_buffer

    def bn_images() -> torch.Tensor:
        train = _load_split(args, "train", None)
        train = train.per_class(min(500, int(train.class_counts().min())), torch.Generator().manual_seed(0))
        x = train.as_float(sset.normalization)
        return _zca(args, sset.normalization).transform(x) if sset.zca else x

    return teacher_from_expert_buffer(path, name, tuple(sset.images.shape[1:]), num_classes, trajectory=args.buffer_trajectory,
                                      epoch=args.buffer_epoch, bn_images=bn_images, log=log)


def _zca(args: argparse.Namespace, norm: Any) -> Any:
    from .pixel_space import fit_zca_cached

    train = _load_split(args, "train", None)
    return fit_zca_cached(train, norm, eps=0.1, cache_dir=args.cache_dir)


def _feature_cache(args: argparse.Namespace) -> Path:
    from .data import default_cache_dir

    return Path(args.cache_dir).expanduser() / "features" if args.cache_dir else default_cache_dir() / "features"


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import demo_info, run_demo
    from .evaluation import format_table

    if args.info:
        print(json.dumps(demo_info(), indent=1))
        return 0
    log = (lambda s: None) if args.no_progress else (lambda s: print(s, file=sys.stderr))
    rows = run_demo(args.models, args.epochs, args.runs, full=args.full, device=args.device, progress=not args.no_progress, log=log)
    print(format_table(rows))
    return 0


def _cmd_study(args: argparse.Namespace) -> int:
    from .study import main_study

    return main_study(args.config, args.shard, args.device, not args.no_progress, args.summarize, args.only)


def _cmd_train_teacher(args: argparse.Namespace) -> int:
    from .fileio import check_writable
    from .models import create_model
    from .pixel_space import space_metadata
    from .teacher import train_teacher

    if args.epochs < 1:
        raise ELFError(f"--epochs must be >= 1, got {args.epochs}")
    out = Path(args.out).expanduser()
    if out.exists() and not out.is_dir():
        raise ELFError(f"--out {out} is a file; give a folder (created if missing) for the epoch checkpoints")
    check_writable(out / "history.json", "--out")  # (in the nearest existing folder: none is created yet)
    create_model(args.model)  # an unknown name fails now, not after the data is loaded
    norm = _normalization(args)
    train = _load_split(args, "train", args.train_per_class, args.seed)
    test = _load_split(args, "test", args.test_per_class).with_classes(train.classes, "the test split")
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
                        epochs=args.epochs, momentum=args.momentum, weight_decay=args.weight_decay, seed=args.seed, device=args.device,
                        progress=not args.no_progress, resume=not args.no_resume, metadata=meta, **changes)
    last = max(run.test_accuracy) if run.test_accuracy else None
    if last is not None:
        print(f"final test accuracy after {last} epochs: {run.test_accuracy[last]:.2f}%  ({run.checkpoint(last)})")
    return 0


def _cmd_distill(args: argparse.Namespace) -> int:
    import dataclasses
    import shutil

    from .distill import DistillRecipe, RealSampler, build_distillation, distill
    from .distill.loop import CHECKPOINT_NAME
    from .fileio import check_writable, portable_path
    from .io import save_synthetic

    log = (lambda s: None) if args.no_progress else (lambda s: print(s, file=sys.stderr))
    recipe = DistillRecipe(**{f.name: getattr(args, f.name) for f in dataclasses.fields(DistillRecipe)})
    recipe.check()
    if args.snapshot_every is not None and args.snapshot_every < 1:
        raise ELFError(f"--snapshot-every must be >= 1, got {args.snapshot_every}")
    if Path(args.out).suffix != ".safetensors":
        raise ELFError(f"--out {args.out}: elf distill writes safetensors; name the file NAME.safetensors (readers "
                       "take the format from the suffix)")
    check_writable(args.out, "--out")
    default_ckpt = args.checkpoint_dir is None
    ckpt_dir = Path(args.out).expanduser().with_name(Path(args.out).name + ".ckpt") if default_ckpt else Path(args.checkpoint_dir)
    if default_ckpt and ckpt_dir.exists() and not args.no_resume:
        log(f"resuming from {ckpt_dir} (pass --no-resume to start over)")
    device = torch.device(args.device) if args.device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    norm = _normalization(args)
    train = _load_split(args, "train", args.train_per_class, args.seed)
    sampler = RealSampler.from_imageset(train, norm, device)
    c, h, w = sampler.image_shape
    log(f"real data: {len(train)} images, {sampler.num_classes} classes, {c}x{h}x{w} ({train.origin})")
    cache = Path(args.cache_dir).expanduser() if args.cache_dir else None
    run = build_distillation(recipe, sampler, norm, device=device, cache_dir=cache, source_hash=train.source_hash,
                             progress=not args.no_progress, log=log)
    log(f"distilling {args.method} ({args.param}), {args.ipc} image(s)/class, {run.iterations} iterations on {device}")
    meta = {"command": "elf distill", "data": portable_path(train.origin), "data_source_hash": train.source_hash,
            **run.metadata}
    out = Path(args.out)
    t_start = time.perf_counter()
    if args.no_resume or not (ckpt_dir / CHECKPOINT_NAME).exists():  # a fresh run: --out and its snapshots are rewritten
        earlier = sorted(out.expanduser().parent.glob(f"{glob.escape(out.stem)}.step[0-9]*{out.suffix}"))
        for path in earlier:  # (those of steps this run does not reach would otherwise pass for this run's)
            path.unlink()
        if earlier:
            print(f"elf distill: note: starting over: removed {len(earlier)} snapshot(s) of an earlier run of "
                  f"{args.out}", file=sys.stderr)

    def snapshot(s: Any, step: int) -> str:
        path = out.with_name(f"{out.stem}.step{step:06d}{out.suffix}")
        s = dataclasses.replace(s, classes=list(train.classes),
                                metadata={**s.metadata, "snapshot_step": str(step),
                                          "distill_wall_time_s": f"{time.perf_counter() - t_start:.1f}"})
        save_synthetic(path, s)
        return portable_path(path)

    sset = distill(run.param, run.objective, run.iterations, seed=args.seed, device=device, progress=not args.no_progress,
                   log_every=args.log_every, checkpoint_dir=ckpt_dir, checkpoint_every=args.checkpoint_every,
                   resume=not args.no_resume, metadata=meta,
                   eval_fn=snapshot if args.snapshot_every else None, eval_every=args.snapshot_every)
    sset = dataclasses.replace(sset, classes=list(train.classes))
    save_synthetic(args.out, sset)
    if default_ckpt:  # the set is written: the default checkpoint folder has done its job
        shutil.rmtree(ckpt_dir, ignore_errors=True)
    loss = sset.metadata.get("final_loss", "?")
    with contextlib.suppress(ValueError):
        loss = f"{float(loss):.4g}"
    print(f"wrote {args.out}: {len(sset)} images ({sset.ipc} per class), final loss {loss}")
    return 0


def _check_device(name: str) -> None:
    """--device must name a device torch has here (before any data is loaded)."""
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError) as e:
        raise ELFError(f"--device {name!r} is not a torch device ({e}); use cpu, cuda, cuda:1, mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ELFError(f"--device {name}: CUDA is not available on this machine (torch {torch.__version__}); use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ELFError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ELFError(f"--device {name}: MPS is not available on this machine; use --device cpu")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the ``elf`` console script; returns the exit status."""
    parser = build_parser()
    args, extra = parser.parse_known_args(argv)
    if extra:  # the subcommand's own usage error ("elf eval: error: ..."), not the top-level parser's
        commands = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction)).choices
        commands.get(getattr(args, "command", None), parser).error(f"unrecognized arguments: {' '.join(extra)}")
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        if getattr(args, "imports", None):
            from .plugins import import_plugins

            import_plugins(args.imports)
        if getattr(args, "device", None):
            _check_device(args.device)
        status = int(args.func(args))
        sys.stdout.flush()  # (a closed pipe shows here, inside the handler below)
        return status
    except BrokenPipeError:  # `elf models | head -1`: the reader has all it wants
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes at exit
        return 141  # 128 + SIGPIPE, as a process killed by the closed pipe reports
    except ELFError as e:
        print(f"elf {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"elf {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
