"""Baseline vs ELF on one synthetic (distilled) set, for several evaluation models.

Real use (CIFAR-10, a width-512 teacher for ResNet-18 / VGG-11 and a width-128 one for ConvNet students):

    python examples/evaluate_synthetic_set.py \
        --synthetic syn.pt --test cifar10_test.pt \
        --teacher ConvNetW512=teachers/w512.safetensors --teacher ConvNet=teachers/w128.safetensors \
        --models ConvNetBN ResNet18BN VGG11BN

``--synthetic`` takes a ``.pt`` file holding ``{"images": (N, C, H, W), "labels": (N,) or (N, K)}`` (or an
``(images, labels)`` pair), a ``.safetensors`` file with tensors ``images`` and ``labels``, or any format that
``elf.io.load_any`` reads (e.g. MTT's ``images_best.pt`` with ``labels_best.pt`` beside it). ``--test`` takes the
same ``.pt`` / ``.safetensors`` layout, normalized like the synthetic images. Each model uses the teacher whose
feature shape equals its front's output at the model's default split point.

``--tiny`` runs everything on random tensors and random teachers in a few seconds (the accuracies are meaningless;
it only shows that the pipeline works).
"""

from __future__ import annotations

import argparse
import sys

import torch

from elf import ELFError, FeatureBank, create_model
from elf.evaluation import compare_models, format_table
from elf.io import load_tensor_pair
from elf.teacher import load_teacher


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", help="synthetic set: .pt {'images','labels'}, .safetensors, or images_best.pt")
    ap.add_argument("--test", help="test set: .pt {'images','labels'} or .safetensors, normalized like the synthetic set")
    ap.add_argument("--teacher", action="append", default=[], metavar="MODEL=CHECKPOINT",
                    help="teacher model name and checkpoint, e.g. ConvNetW512=w512.safetensors (repeatable)")
    ap.add_argument("--models", nargs="+", default=["ConvNetBN", "ResNet18BN", "VGG11BN"])
    ap.add_argument("--epochs", type=int, default=1000, help="official: 1000 (the loop runs epochs + 1 passes)")
    ap.add_argument("--seeds", type=int, default=5, help="runs per model and setting (official: 5)")
    ap.add_argument("--lr", type=float, default=0.01, help="official: 0.01 (Table 5 uses 0.005 for DM/DSA sets)")
    ap.add_argument("--feature-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--cache-dir", default=None, help="reuse teacher features computed earlier (content-hashed)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--tiny", action="store_true", help="random tensors and teachers, 1 epoch, 2 seeds: a smoke test")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    if args.tiny:
        images = torch.randn(20, 3, 16, 16)  # 2 images per class, 16x16 to be quick
        labels = torch.arange(10).repeat_interleave(2)
        test_x, test_y = torch.randn(100, 3, 16, 16), torch.randint(0, 10, (100,))
        teachers = {name: create_model(name, im_size=(16, 16)) for name in ("ConvNet", "ConvNetW512")}  # random weights
        args.models = ["ConvNetBN", "ResNet18BN"] if args.models == ap.get_default("models") else args.models
        args.epochs, args.seeds = 1, 2
    else:
        if not (args.synthetic and args.test and args.teacher):
            ap.error("--synthetic, --test and at least one --teacher are required (or use --tiny)")
        images, labels = load_tensor_pair(args.synthetic)
        test_x, test_y = load_tensor_pair(args.test)
        num_classes = labels.shape[1] if labels.dim() == 2 else int(labels.max()) + 1
        teachers = {}
        for spec in args.teacher:
            name, sep, ckpt = spec.partition("=")
            if not sep:
                ap.error(f"--teacher takes MODEL=CHECKPOINT, got {spec!r}")
            teachers[name] = load_teacher(name, ckpt, channel=images.shape[1], num_classes=num_classes,
                                          im_size=tuple(images.shape[2:]))

    device = torch.device(args.device) if args.device else None
    banks = {}
    for name, teacher in teachers.items():
        if device is not None:
            teacher.to(device)
        banks[name] = FeatureBank.build(teacher, images, dtype=args.feature_dtype, cache_dir=args.cache_dir)
        print(f"teacher {name}: features {'x'.join(map(str, banks[name].shape))} at {banks[name].point!r}")

    # each model gets the bank whose feature shape equals its front output at its default split point
    rows = compare_models(args.models, images, labels, test_x, test_y, banks=list(banks.values()), seeds=args.seeds,
                          device=device, progress=False, log=lambda line: print(line, file=sys.stderr),
                          epochs=args.epochs, lr=args.lr)
    print(f"test accuracy (%), mean ± std over {args.seeds} runs, {args.epochs} epochs")
    print(format_table(rows))
    return 0 if rows else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ELFError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
