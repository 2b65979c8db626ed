"""Shared pytest fixtures."""

from __future__ import annotations

import os
from pathlib import Path

import pytest


@pytest.fixture
def elf_data_path() -> Path:
    """The real-data archive named by env ELF_DATA; skipped when unset, but a failure when env CI is set."""
    env = os.environ.get("ELF_DATA")
    if not env:
        if os.environ.get("CI"):
            pytest.fail("ELF_DATA is not set but CI is: the real-data tests must run in CI (set ELF_DATA to the CIFAR-10 archive)")
        pytest.skip("ELF_DATA is not set (point it at cifar10-jpeg.tar.gz to run the real-data tests)")
    path = Path(env).expanduser()
    if not path.exists():
        pytest.fail(f"ELF_DATA={env} does not exist")
    return path


@pytest.fixture(scope="module")
def torch_single_thread():
    """Run a test module with one intra-op thread (tiny tensors: thread start-up and spinning dominate, badly so
    on a shared 2-core machine); restores the previous setting afterwards."""
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


def write_image_folder(root: Path, side: int, train: int, test: int, classes: str = "abc") -> Path:
    """``root/{train,test}/<class>/<i>.png``: ``side``x``side`` PNGs whose class shows in the mean colour (class k
    lifts channel k), so tiny models learn them in a few steps. Deterministic (numpy seed 0)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(0)
    for split, n in (("train", train), ("test", test)):
        for k, cls in enumerate(classes):
            d = root / split / cls
            d.mkdir(parents=True)
            for i in range(n):
                img = rng.integers(0, 60, (side, side, 3), dtype=np.uint8)
                img[..., k] += 180
                Image.fromarray(img).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="session")
def make_image_folder():
    """:func:`write_image_folder` for tests (any fixture scope can use it)."""
    return write_image_folder


@pytest.fixture
def host_reads(monkeypatch: pytest.MonkeyPatch) -> dict[str, int]:
    """Counts reads of tensor values back to the host (``.item()``, ``float(t)``, ``.tolist()``, ``.cpu()``, ...) in
    ``counts["n"]``: the tests that training never synchronizes per step use it."""
    import torch

    counts = {"n": 0}
    for name in ("item", "__float__", "__int__", "__bool__", "__index__", "tolist", "numpy", "cpu"):
        original = getattr(torch.Tensor, name)

        def counting(self, *a, _orig=original, **k):  # type: ignore[no-untyped-def]
            counts["n"] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, name, counting)
    return counts
