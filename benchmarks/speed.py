"""Speed of elf-dd's training loop, as ratios measured in one process.

1. ELF training step vs the plain task-only step, per built-in model (same data, batch, DSA, seed).
2. Images per second of the training loop (plain and ELF).
3. FeatureBank: building (teacher forward over every image) vs reusing the content-hash cache.
4. ELFTrainer's loop vs a plain PyTorch loop with a DataLoader over the same tensors (same model, DSA, SGD).

    python benchmarks/speed.py                      # CPU-sized defaults
    python benchmarks/speed.py --device cuda --images 500 --epochs 20 --out benchmarks/results/speed-h100.json

Timings are wall-clock seconds after one warm-up epoch; on CUDA, the device is synchronized before reading clocks.
The three loops of a model are timed in turn, ``--repeats`` times, and each keeps its fastest repeat (the least
disturbed by other work on the machine). All three draw the same DSA ops (one op per batch, seeded), whose costs
differ a lot, so use enough steps (``epochs * images / batch``) for the mix to even out.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, TensorDataset

import elf
from elf.evaluation import environment

TEACHER_FOR = {"ConvNet": "ConvNet", "ConvNetBN": "ConvNet", "ResNet18": "ConvNetW512", "ResNet18BN": "ConvNetW512",
               "VGG11": "ConvNetW512", "VGG11BN": "ConvNetW512", "AlexNet": "ConvNetW192"}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_fit(model: str, images: torch.Tensor, labels: torch.Tensor, bank: elf.FeatureBank | None, epochs: int,
             batch: int, device: torch.device) -> float:
    """Seconds per epoch of ELFTrainer.fit (after a one-epoch warm-up run)."""
    kw = dict(epochs=epochs, extra_epoch=False, batch_size=batch, progress=False, device=device, log_every=10**9)
    if bank is None:
        kw.update(lambda_front=0.0, lambda_rear=0.0)
    trainer = elf.ELFTrainer(model, images, labels, feature_bank=bank, **kw)
    warm = elf.ELFTrainer(model, images, labels, feature_bank=bank, **{**kw, "epochs": 1})
    warm.fit(0)
    _sync(device)
    t0 = time.perf_counter()
    trainer.fit(0)
    _sync(device)
    return (time.perf_counter() - t0) / epochs


def time_dataloader_loop(model_name: str, images: torch.Tensor, labels: torch.Tensor, epochs: int, batch: int,
                         device: torch.device) -> float:
    """Seconds per epoch of a plain PyTorch loop: DataLoader over CPU tensors, DSA, SGD (the usual DD script)."""
    c, h, w = images.shape[1:]
    model = elf.create_model(model_name, channel=c, num_classes=int(labels.max()) + 1, im_size=(h, w)).to(device)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    dsa = elf.DSA(seed=0)
    loader = DataLoader(TensorDataset(images.cpu(), labels.cpu()), batch_size=batch, shuffle=True, num_workers=0)

    def epoch() -> None:
        model.train()
        for x, y in loader:
            x, y = x.to(device), y.to(device)
            loss = F.cross_entropy(model(dsa(x)), y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            loss.item()  # what such scripts do to accumulate the epoch loss

    epoch()
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(epochs):
        epoch()
    _sync(device)
    return (time.perf_counter() - t0) / epochs


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["ConvNet", "ConvNetBN", "ResNet18BN", "VGG11BN", "AlexNet"])
    ap.add_argument("--images", type=int, default=100, help="synthetic images (10 classes)")
    ap.add_argument("--batch", type=int, default=50)
    ap.add_argument("--epochs", type=int, default=8, help="timed epochs per measurement")
    ap.add_argument("--repeats", type=int, default=3, help="timed repeats per loop; the fastest counts")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--out", default=None, help="JSON file (default: benchmarks/results/speed-<device>.json)")
    args = ap.parse_args()
    device = torch.device(args.device)
    torch.manual_seed(0)
    images = torch.randn(args.images, 3, 32, 32)
    labels = torch.arange(10).repeat_interleave(args.images // 10)
    rows, results = [], {"settings": vars(args), "environment": environment(device)}

    teachers: dict[str, torch.nn.Module] = {}
    banks: dict[str, elf.FeatureBank] = {}
    cache_times = {}
    for name in sorted({TEACHER_FOR[m] for m in args.models}):
        teachers[name] = elf.create_model(name).to(device)
        with tempfile.TemporaryDirectory() as d:
            _sync(device)
            t0 = time.perf_counter()
            banks[name] = elf.FeatureBank.build(teachers[name], images, cache_dir=d, device=device)
            _sync(device)
            t_build = time.perf_counter() - t0
            t0 = time.perf_counter()
            elf.FeatureBank.build(teachers[name], images, cache_dir=d, device=device)
            _sync(device)
            t_reuse = time.perf_counter() - t0
        cache_times[name] = {"build_s": t_build, "reuse_s": t_reuse, "ratio": t_build / t_reuse}
    results["feature_bank"] = cache_times

    for m in args.models:
        times: dict[str, list[float]] = {"plain": [], "elf": [], "loader": []}
        for _ in range(args.repeats):
            times["plain"].append(time_fit(m, images, labels, None, args.epochs, args.batch, device))
            times["elf"].append(time_fit(m, images, labels, banks[TEACHER_FOR[m]], args.epochs, args.batch, device))
            times["loader"].append(time_dataloader_loop(m, images, labels, args.epochs, args.batch, device))
        plain, with_elf, loop = min(times["plain"]), min(times["elf"]), min(times["loader"])
        row = {"model": m, "plain_s_per_epoch": plain, "elf_s_per_epoch": with_elf, "elf_over_plain": with_elf / plain,
               "plain_img_per_s": args.images / plain, "elf_img_per_s": args.images / with_elf,
               "dataloader_s_per_epoch": loop, "dataloader_over_trainer": loop / plain, "all_repeats_s_per_epoch": times}
        rows.append(row)
        print(f"{m}: plain {row['plain_img_per_s']:.0f} img/s, ELF {row['elf_img_per_s']:.0f} img/s "
              f"(x{row['elf_over_plain']:.2f}), DataLoader loop x{row['dataloader_over_trainer']:.2f} of the trainer's time", flush=True)
    results["models"] = rows

    print("\n| model | plain img/s | ELF img/s | ELF step / plain step | DataLoader loop / trainer loop |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['plain_img_per_s']:.0f} | {r['elf_img_per_s']:.0f} | {r['elf_over_plain']:.2f} | "
              f"{r['dataloader_over_trainer']:.2f} |")
    print("\n| teacher | bank build (s) | cache reuse (s) | build / reuse |\n|---|---|---|---|")
    for name, t in cache_times.items():
        print(f"| {name} | {t['build_s']:.3f} | {t['reuse_s']:.4f} | {t['ratio']:.0f} |")
    out = Path(args.out or Path(__file__).parent / "results" / f"speed-{device.type}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(results, indent=1))
    print(f"\nwrote {out}")


if __name__ == "__main__":
    main()
