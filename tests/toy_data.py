"""Toy data shared by tests that compare training runs (batched vs sequential seeds, channels-last vs contiguous)."""

from __future__ import annotations

import torch


def lifted_channel_data(n: int, seed: int, classes: int = 3, size: int = 16) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``(n, 3, size, size)`` whose class lifts one channel (learnable in a few steps, not trivially), and
    labels ``(n,)`` cycling over ``classes``."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(n) % classes
    x = torch.randn(n, 3, size, size, generator=g)
    x[torch.arange(n), y] += 0.6
    return x, y
