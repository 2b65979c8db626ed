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
import time

import torch

from elf import ELFError, ELFTrainer, FeatureBank, create_model, default_split_point, load_checkpoint, split_model
from elf.io import load_tensor_pair


def front_shape(model_name: str, images: torch.Tensor, num_classes: int) -> tuple[str, tuple[int, ...]]:
    """The model's default split point and the per-image shape its front outputs there."""
    model = create_model(model_name, channel=images.shape[1], num_classes=num_classes, im_size=tuple(images.shape[2:]))
    point = default_split_point(model)
    front = split_model(model.eval(), point).front
    with torch.no_grad():
        return point, tuple(front(images[:2]).shape[1:])


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
    ap.add_argument("--num-classes", type=int, default=None, help="default: inferred from the labels")
    ap.add_argument("--feature-dtype", default="float32", choices=["float32", "float16", "bfloat16"])
    ap.add_argument("--cache-dir", default=None, help="reuse teacher features computed earlier (content-hashed)")
    ap.add_argument("--device", default=None, help="default: cuda if available, else cpu")
    ap.add_argument("--tiny", action="store_true", help="random tensors and teachers, 2 epochs: a smoke test")
    args = ap.parse_args(argv)

    torch.manual_seed(0)
    if args.tiny:
        images = torch.randn(20, 3, 16, 16)  # 2 images per class, 16x16 to be quick
        labels = torch.arange(10).repeat_interleave(2)
        test_x, test_y = torch.randn(100, 3, 16, 16), torch.randint(0, 10, (100,))
        teachers = {name: create_model(name, im_size=(16, 16)) for name in ("ConvNet", "ConvNetW512")}  # random weights
        args.models = ["ConvNetBN", "ResNet18BN"] if args.models == ap.get_default("models") else args.models
        args.epochs, args.seeds = 1, 2
        num_classes = 10
    else:
        if not (args.synthetic and args.test and args.teacher):
            ap.error("--synthetic, --test and at least one --teacher are required (or use --tiny)")
        images, labels = load_tensor_pair(args.synthetic)
        test_x, test_y = load_tensor_pair(args.test)
        num_classes = args.num_classes or (labels.shape[1] if labels.dim() == 2 else int(labels.max()) + 1)
        teachers = {}
        for spec in args.teacher:
            name, sep, ckpt = spec.partition("=")
            if not sep:
                ap.error(f"--teacher takes MODEL=CHECKPOINT, got {spec!r}")
            teacher = create_model(name, channel=images.shape[1], num_classes=num_classes, im_size=tuple(images.shape[2:]))
            teachers[name] = load_checkpoint(teacher, ckpt)

    device = torch.device(args.device) if args.device else None
    banks = {}
    for name, teacher in teachers.items():
        if device is not None:
            teacher.to(device)
        banks[name] = FeatureBank.build(teacher, images, dtype=args.feature_dtype, cache_dir=args.cache_dir)
        print(f"teacher {name}: features {'x'.join(map(str, banks[name].shape))} at {banks[name].point!r}")

    rows = []
    for model_name in args.models:
        point, shape = front_shape(model_name, images, num_classes)
        teacher_name = next((t for t, b in banks.items() if b.shape == shape), None)
        if teacher_name is None:
            have = ", ".join(f"{t} {'x'.join(map(str, b.shape))}" for t, b in banks.items())
            print(f"{model_name}: its front at {point!r} outputs {'x'.join(map(str, shape))}; no teacher matches "
                  f"({have}); skipped", file=sys.stderr)
            continue
        common = dict(epochs=args.epochs, lr=args.lr, num_classes=num_classes, device=device, progress=False)
        t0 = time.perf_counter()
        base = ELFTrainer(model_name, images, labels, lambda_front=0, lambda_rear=0, **common).run(test_x, test_y, args.seeds)
        elf = ELFTrainer(model_name, images, labels, feature_bank=banks[teacher_name], **common).run(test_x, test_y, args.seeds)
        rows.append((model_name, point, teacher_name, str(base), str(elf), f"{elf.mean - base.mean:+.2f}"))
        print(f"{model_name}: done in {time.perf_counter() - t0:.1f} s", file=sys.stderr)

    table = [("model", "split", "teacher", "baseline", "ELF", "gain"), *rows]
    widths = [max(len(r[i]) for r in table) for i in range(6)]
    print(f"test accuracy (%), mean ± std over {args.seeds} runs, {args.epochs} epochs")
    for r in table:
        print("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip())
    return 0 if rows else 1


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ELFError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
