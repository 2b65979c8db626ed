"""ELF with your own architecture: pick a split point whose shape matches the teacher, register the model, train.

    python examples/custom_architecture.py --tiny
    python examples/custom_architecture.py --synthetic syn.pt --test test.pt \
        --teacher teachers/w128.safetensors --teacher-model ConvNet

The teacher ``ConvNet`` (width 128, depth 3) gives 128x4x4 features at 32x32; ``SmallCNN`` below is built so that
one of its block boundaries has that shape too. ``list_split_points(..., shape=bank.shape)`` finds it;
``register_model(..., split_point=...)`` makes the model available by name with that default cut
(``ELFTrainer("SmallCNN", ...)``; on the command line through ``--import``, see ``examples/my_models.py``).
"""

from __future__ import annotations

import argparse
import sys

from elf import ELFError, ELFTrainer, FeatureBank, list_split_points, register_model

from _inputs import load_inputs
from my_models import SmallCNN  # the same CNN the command-line example registers


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", help=".pt {'images', 'labels'} or .safetensors")
    ap.add_argument("--test", help=".pt {'images', 'labels'} or .safetensors, normalized like the synthetic set")
    ap.add_argument("--teacher", help="teacher checkpoint (.safetensors or a .pt state dict)")
    ap.add_argument("--teacher-model", default="ConvNet", help="teacher model name (default ConvNet: 128x4x4 at 32x32)")
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--device", default=None)
    ap.add_argument("--tiny", action="store_true", help="random tensors and a random teacher, 1 epoch, 2 seeds")
    args = ap.parse_args(argv)

    images, labels, test_x, test_y, teacher, num_classes = load_inputs(args, ap)
    channel, im_size = images.shape[1], tuple(images.shape[2:])

    # 1. the teacher's features, once
    bank = FeatureBank.build(teacher, images)
    want = bank.shape
    print(f"teacher {args.teacher_model} features: {'x'.join(map(str, want))}")

    # 2. the split points of our model, and the ones with the teacher's shape
    points = list_split_points(SmallCNN(channel, num_classes), (channel, *im_size))
    for p in points:
        print(f"  {p}{'   <- matches the teacher' if p.shape == want else ''}")
    matching = [p.name for p in list_split_points(SmallCNN(channel, num_classes), (channel, *im_size), shape=want)]
    if not matching:
        print(f"no split point of SmallCNN outputs {want}; choose another teacher width/depth", file=sys.stderr)
        return 1
    point = matching[-1]  # the deepest match leaves the smallest rear, as the paper does for ResNet-18
    print(f"split point: {point}")

    # 3. register it by name with its default cut, so create_model / ELFTrainer know it (for the command line and
    #    studies, put the registration in a module: see examples/my_models.py and docs/custom-architectures.md)
    register_model("SmallCNN", SmallCNN, f"example CNN; default cut {point}", split_point=point, override=True)

    # 4. baseline and ELF
    common = dict(epochs=args.epochs, device=args.device, progress=False, num_classes=num_classes)
    base = ELFTrainer("SmallCNN", images, labels, lambda_front=0, lambda_rear=0, **common).run(test_x, test_y, args.seeds)
    elf = ELFTrainer("SmallCNN", images, labels, feature_bank=bank, **common).run(test_x, test_y, args.seeds)
    print(f"SmallCNN baseline: {base}")
    print(f"SmallCNN ELF:      {elf}")
    last = elf.histories[0][-1]
    print(f"ELF loss terms, last epoch of seed {elf.seeds[0]}: task {last['task']:.3f}  front {last['front']:.1f}  rear {last['rear']:.3f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ELFError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
