"""ELF with torchvision's resnet18 (weights=None) as the evaluation model.

torchvision's resnet18 has an ImageNet stem (7x7 stride-2 conv + max-pool), so at 32x32 its stages output
64x8x8, 128x4x4, 256x2x2 and 512x1x1: the paper's 512x4x4 ConvNetW512 feature fits nowhere. Two teachers fit:

* ``--point layer3 --teacher-model ConvNetW256D4`` (default): a ConvNet of width 256 and depth 4 gives 256x2x2;
* ``--point layer2 --teacher-model ConvNet``: the standard width-128, depth-3 ConvNet gives 128x4x4.

    python examples/torchvision_model.py --tiny
    python examples/torchvision_model.py --synthetic syn.pt --test test.pt --teacher teachers/w256d4.safetensors
"""

from __future__ import annotations

import argparse
import sys


from elf import ELFError, ELFTrainer, FeatureBank, create_model, list_split_points

from _inputs import load_inputs


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--synthetic", help=".pt {'images', 'labels'} or .safetensors")
    ap.add_argument("--test", help=".pt {'images', 'labels'} or .safetensors, normalized like the synthetic set")
    ap.add_argument("--teacher", help="teacher checkpoint (.safetensors or a .pt state dict)")
    ap.add_argument("--teacher-model", default="ConvNetW256D4")
    ap.add_argument("--model", default="torchvision.resnet18", help="any torchvision classification model name")
    ap.add_argument("--point", default="layer3", help="split point of the model (see the printed list)")
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--device", default=None)
    ap.add_argument("--tiny", action="store_true", help="random tensors and a random teacher, 1 epoch, 2 seeds")
    args = ap.parse_args(argv)

    images, labels, test_x, test_y, teacher, num_classes = load_inputs(args, ap)

    bank = FeatureBank.build(teacher, images)
    print(f"teacher {args.teacher_model} features: {'x'.join(map(str, bank.shape))}")

    # torchvision models have no default cut: look at the valid points and their shapes
    model = create_model(args.model, num_classes=num_classes)
    points = list_split_points(model, tuple(images.shape[1:]))
    for p in points:
        if p.name.startswith("layer") and "." not in p.name:  # the stage boundaries
            print(f"  {p}{'   <- matches the teacher' if p.shape == bank.shape else ''}")
    chosen = next((p for p in points if args.point in (p.name, *p.aliases)), None)
    if chosen is None or chosen.shape != bank.shape:
        fits = [p.name for p in points if p.shape == bank.shape]
        print(f"{args.model} at {args.point!r} outputs {chosen.shape if chosen else '?'}, the teacher gives {bank.shape}; "
              f"points that fit: {fits or 'none'}", file=sys.stderr)
        return 1
    print(f"split point: {args.point}")

    common = dict(epochs=args.epochs, device=args.device, progress=False, num_classes=num_classes)
    base = ELFTrainer(args.model, images, labels, lambda_front=0, lambda_rear=0, **common).run(test_x, test_y, args.seeds)
    elf = ELFTrainer(args.model, images, labels, feature_bank=bank, split_at=args.point, **common).run(test_x, test_y, args.seeds)
    print(f"{args.model} baseline: {base}")
    print(f"{args.model} ELF:      {elf}")
    last = elf.histories[0][-1]
    print(f"ELF loss terms, last epoch of seed {elf.seeds[0]}: task {last['task']:.3f}  front {last['front']:.1f}  rear {last['rear']:.3f}")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except ELFError as e:
        print(f"error: {e}", file=sys.stderr)
        sys.exit(2)
