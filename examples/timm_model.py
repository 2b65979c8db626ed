"""ELF with a timm model (pip install 'elf-dd[timm]') as the evaluation model.

``create_model("timm.<name>")`` builds ``timm.create_model(name, pretrained=False, num_classes=..., in_chans=...)``.
timm's ResNets have an ImageNet stem (stride 4 before layer1), so at 32x32 ``timm.resnet18`` outputs 128x4x4 after
``layer2``, 256x2x2 after ``layer3`` and 512x1x1 after ``layer4`` (= ``forward_features``). With ``--point auto``
(default) the script takes the deepest split point whose shape equals the teacher's feature shape; with the default
teacher ``ConvNet`` (width 128, depth 3: 128x4x4) that is ``layer2``. ``--point forward_features`` cuts between
timm's ``forward_features`` and ``forward_head`` (it needs a teacher with that shape, e.g. ``ConvNetW512D5`` for
512x1x1 at 32x32).

    python examples/timm_model.py --tiny
    python examples/timm_model.py --model timm.resnet18 --synthetic syn.pt --test test.pt --teacher w128.safetensors

Without timm installed the script says so and exits with status 0.
"""

from __future__ import annotations

import argparse
import importlib.util
import sys

import torch

from elf import ELFError, ELFTrainer, FeatureBank, create_model, list_split_points, split_model

from _inputs import load_inputs


def timm_available() -> bool:
    if importlib.util.find_spec("timm") is None:
        return False
    try:
        import timm  # noqa: F401
    except ImportError:
        return False
    return True


def choose_point(model: torch.nn.Module, input_shape: tuple[int, ...], want: tuple[int, ...], point: str) -> str:
    """``point`` itself after checking its shape, or for "auto" the deepest valid point with shape ``want``."""
    if point == "forward_features":
        front = split_model(model.eval(), point).front
        with torch.no_grad():
            got = tuple(front(torch.zeros(2, *input_shape)).shape[1:])
        if got != want:
            raise ELFError(f"forward_features outputs {got} but the teacher features are {want}; pick another point or teacher")
        return point
    points = list_split_points(model, input_shape)
    for p in points:
        mark = "   <- matches the teacher" if p.shape == want else ""
        if "." not in p.name or mark:
            print(f"  {p}{mark}")
    matching = [p for p in points if p.shape == want]
    if point == "auto":
        if not matching:
            raise ELFError(f"no split point of this model outputs {want}; use a teacher of another width/depth")
        return matching[-1].name
    chosen = next((p for p in points if point in (p.name, *p.aliases)), None)
    if chosen is None or chosen.shape != want:
        raise ELFError(f"point {point!r} outputs {chosen.shape if chosen else '?'}, the teacher gives {want}; "
                       f"points that fit: {[p.name for p in matching] or 'none'}")
    return point


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="timm.resnet18", help="timm.<name> (any timm model name)")
    ap.add_argument("--synthetic", help=".pt {'images', 'labels'} or .safetensors")
    ap.add_argument("--test", help=".pt {'images', 'labels'} or .safetensors, normalized like the synthetic set")
    ap.add_argument("--teacher", help="teacher checkpoint (.safetensors or a .pt state dict)")
    ap.add_argument("--teacher-model", default="ConvNet")
    ap.add_argument("--point", default="auto", help="'auto', 'forward_features' or a name from the printed list")
    ap.add_argument("--epochs", type=int, default=1000)
    ap.add_argument("--seeds", type=int, default=5)
    ap.add_argument("--device", default=None)
    ap.add_argument("--tiny", action="store_true", help="random tensors and a random teacher, 1 epoch, 2 seeds")
    args = ap.parse_args(argv)

    if not timm_available():
        print("timm is not installed: this example needs it (pip install 'elf-dd[timm]'); nothing to do.")
        return 0
    if not args.model.startswith("timm."):
        args.model = "timm." + args.model

    images, labels, test_x, test_y, teacher, num_classes = load_inputs(args, ap)
    channel = images.shape[1]

    bank = FeatureBank.build(teacher, images)
    print(f"teacher {args.teacher_model} features: {'x'.join(map(str, bank.shape))}")
    model = create_model(args.model, channel=channel, num_classes=num_classes)
    point = choose_point(model, tuple(images.shape[1:]), bank.shape, args.point)
    print(f"split point: {point}")

    def factory() -> torch.nn.Module:  # a fresh timm model per seed (ELFTrainer seeds the RNG before calling it)
        return create_model(args.model, channel=channel, num_classes=num_classes)

    common = dict(epochs=args.epochs, device=args.device, progress=False, num_classes=num_classes)
    base = ELFTrainer(factory, images, labels, lambda_front=0, lambda_rear=0, **common).run(test_x, test_y, args.seeds)
    elf = ELFTrainer(factory, images, labels, feature_bank=bank, split_at=point, **common).run(test_x, test_y, args.seeds)
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
