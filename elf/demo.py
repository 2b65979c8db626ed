"""``elf demo``: the main job on the assets shipped with the package, with no download.

The bundle (``elf/assets``, made by ``benchmarks/make_demo_assets.py`` from real CIFAR-10 with the project's own code):

* ``demo_set.safetensors``: a 10-images-per-class CIFAR-10 synthetic set made with elf-dd's DM distiller;
* ``demo_teacher.safetensors``: a ConvNet (width 128, instance norm) teacher trained on real CIFAR-10;
* ``demo_test.safetensors``: a class-balanced 1,000-image CIFAR-10 test subset (uint8) with labels;
* ``demo_assets.json``: how each was made (settings, accuracies, source hashes).

On a CPU the demo evaluates ConvNet-BN with and without ELF for a shortened schedule (200 epochs, 2 runs each): four
runs of about a minute each on an idle 2-core CPU, about 4 minutes in all (measured in
``benchmarks/results/cpu-demo-study``; proportionally longer when other work shares the cores). It reports its
overall progress after every run. ``full=True`` (on a GPU) runs the official protocol: 1000 epochs, 5 runs.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import Any

import torch

from .errors import ELFError

__all__ = ["asset_path", "demo_info", "load_demo_assets", "DemoAssets", "run_demo", "CPU_SETTINGS", "FULL_SETTINGS"]

ASSETS = ("demo_set.safetensors", "demo_teacher.safetensors", "demo_test.safetensors", "demo_assets.json")
CPU_SETTINGS = {"models": ["ConvNetBN"], "epochs": 200, "runs": 2}
FULL_SETTINGS = {"models": ["ConvNet", "ConvNetBN", "ConvNetLN"], "epochs": 1000, "runs": 5}


def asset_path(name: str) -> Path:
    """Path of a bundled asset; a clear error when the installation lacks it."""
    if name not in ASSETS:
        raise ELFError(f"unknown demo asset {name!r}; assets: {ASSETS}")
    path = Path(str(resources.files("elf") / "assets" / name))
    if not path.is_file():
        raise ELFError(f"the demo asset {name} is missing from this installation ({path}); reinstall elf-dd, or rebuild "
                       "the assets with benchmarks/make_demo_assets.py")
    return path


def demo_info() -> dict[str, Any]:
    """How the bundled assets were made (``demo_assets.json``)."""
    return json.loads(asset_path("demo_assets.json").read_text())


@dataclass
class DemoAssets:
    """The bundled demo material, ready for the API: the synthetic set (a :class:`~elf.synthetic.SyntheticSet`,
    normalized with ``synthetic.normalization``), the trained ConvNet teacher (eval mode), the 1,000 test images as
    normalized float ``(1000, 3, 32, 32)`` with their labels, and ``info`` (how each was made)."""

    synthetic: Any
    teacher: torch.nn.Module
    test_images: torch.Tensor
    test_labels: torch.Tensor
    info: dict[str, Any]


def load_demo_assets() -> DemoAssets:
    """Load the bundled CIFAR-10 set, teacher and test subset (no download), e.g.::

        from elf import ELFTrainer, FeatureBank
        from elf.demo import load_demo_assets

        demo = load_demo_assets()
        bank = FeatureBank.build(demo.teacher, demo.synthetic)
        trainer = ELFTrainer.from_synthetic("ConvNetBN", demo.synthetic, feature_bank=bank, epochs=20)
        print(trainer.run(demo.test_images, demo.test_labels, seeds=1))
    """
    from .checkpoint import load_checkpoint
    from .fileio import load_tensors
    from .io import load_synthetic
    from .models import create_model

    sset = load_synthetic(asset_path("demo_set.safetensors"))
    if sset.normalization is None:
        raise ELFError("the bundled demo set records no normalization; rebuild the assets")
    tensors, _ = load_tensors(asset_path("demo_test.safetensors"))
    test_x = sset.normalization.normalize(tensors["images"].float() / 255.0)
    c, h, w = sset.images.shape[1:]
    teacher = create_model("ConvNet", channel=c, num_classes=sset.num_classes, im_size=(h, w))
    load_checkpoint(teacher, asset_path("demo_teacher.safetensors"))
    return DemoAssets(sset, teacher.eval(), test_x, tensors["labels"].long(), demo_info())


def _check_demo_models(models: Sequence[str], sset: Any, bank: Any) -> None:
    """Refuse, before training, a model whose default cut does not give the demo teacher's feature shape (the demo
    has no adapters or other teachers; ``elf eval`` has)."""
    from .evaluation import choose_bank
    from .models import create_model

    for name in models:
        create_model(name, channel=int(sset.images.shape[1]), num_classes=sset.num_classes,
                     im_size=tuple(sset.images.shape[2:]))  # an unknown name: its own error
        try:
            choose_bank(name, tuple(sset.images.shape[1:]), sset.num_classes, [bank])
        except ELFError:
            raise ELFError(f"{name}'s front does not give the demo teacher's features {bank.shape} (a width-128 "
                           "ConvNet's last block): the demo runs the ConvNet family (ConvNet, ConvNetBN, ConvNetLN, "
                           "ConvNetW128D3, ...). For other models use `elf eval` with a teacher of their feature shape "
                           "or --adapter auto (docs/adapters.md)") from None


def run_demo(
    models: Sequence[str] | None = None,
    epochs: int | None = None,
    runs: int | None = None,
    *,
    full: bool = False,
    device: torch.device | str | None = None,
    progress: bool = True,
    log: Callable[[str], None] = print,
) -> list[Any]:
    """Baseline vs ELF on the bundled set, teacher and test subset; returns :class:`~elf.evaluation.ModelComparison` rows."""
    from .evaluation import compare_models
    from .feature_bank import FeatureBank
    from .fileio import load_tensors
    from .io import load_synthetic

    settings = dict(FULL_SETTINGS if full else CPU_SETTINGS)
    settings.update({k: v for k, v in {"models": models, "epochs": epochs, "runs": runs}.items() if v is not None})
    sset = load_synthetic(asset_path("demo_set.safetensors"))
    tensors, _ = load_tensors(asset_path("demo_test.safetensors"))
    if sset.normalization is None:
        raise ELFError("the bundled demo set records no normalization; rebuild the assets")
    test_x = sset.normalization.normalize(tensors["images"].float() / 255.0)
    test_y = tensors["labels"].long()
    bank = FeatureBank.from_checkpoint(asset_path("demo_teacher.safetensors"), "ConvNet", sset,
                                       num_classes=sset.num_classes, device=device)
    _check_demo_models(settings["models"], sset, bank)
    total = 2 * len(settings["models"]) * int(settings["runs"])  # baseline and ELF, every model, every run
    log(f"demo: {len(sset)} synthetic images ({sset.metadata.get('method', '?')}), teacher ConvNet features {bank.shape}, "
        f"{len(test_y)} test images; models {settings['models']}, {settings['epochs']} epochs, {settings['runs']} runs "
        f"each, {total} runs in all")
    start = time.perf_counter()

    def overall(rows: list[Any]) -> None:
        done = sum(len(r.baseline.accuracies) if r.baseline else 0 for r in rows) + \
            sum(len(r.elf.accuracies) if r.elf else 0 for r in rows)
        elapsed = time.perf_counter() - start
        left = elapsed / max(done, 1) * (total - done)
        log(f"demo: {done}/{total} runs done, {elapsed / 60:.1f} min so far, about {left / 60:.1f} min left")

    return compare_models(settings["models"], sset, None, test_x, test_y, banks=[bank], seeds=settings["runs"],
                          device=device, progress=progress, log=log, on_update=overall, epochs=settings["epochs"])
