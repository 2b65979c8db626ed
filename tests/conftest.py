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
