"""BatchNorm statistics helpers: find the layers, set their momentum, freeze or re-estimate their running statistics."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor, nn

__all__ = ["batchnorm_layers", "has_batchnorm", "batchnorm_momentum", "frozen_bn_stats", "recompute_bn_stats"]


def batchnorm_layers(module: nn.Module) -> list[nn.modules.batchnorm._BatchNorm]:
    """Every BatchNorm layer (1-D, 2-D, 3-D, sync) in ``module`` that tracks running statistics."""
    return [m for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm) and m.track_running_stats]


def has_batchnorm(module: nn.Module) -> bool:
    """True when ``module`` holds any BatchNorm layer (tracking running statistics or not)."""
    return any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in module.modules())


@contextlib.contextmanager
def batchnorm_momentum(module: nn.Module, momentum: float | None, *, keep_counts: bool = False) -> Iterator[None]:
    """Within the block, every tracking BatchNorm layer of ``module`` uses ``momentum`` (``None``: cumulative
    average, ``0.0``: running statistics unchanged); the previous momenta come back afterwards, and with
    ``keep_counts`` also the ``num_batches_tracked`` counters."""
    bns = batchnorm_layers(module)
    saved = [(m.momentum, m.num_batches_tracked.clone() if keep_counts and m.num_batches_tracked is not None else None)
             for m in bns]
    for m in bns:
        m.momentum = momentum
    try:
        yield
    finally:
        for m, (previous, count) in zip(bns, saved):
            m.momentum = previous
            if count is not None:
                m.num_batches_tracked.copy_(count)


def frozen_bn_stats(module: nn.Module) -> contextlib.AbstractContextManager[None]:
    """Within the block, BatchNorm layers of ``module`` normalize with batch statistics (in train mode) but leave
    their running statistics and batch counters unchanged."""
    return batchnorm_momentum(module, 0.0, keep_counts=True)


def recompute_bn_stats(model: nn.Module, images: Tensor, batch_size: int = 256) -> nn.Module:
    """Reset BatchNorm running statistics and re-estimate them on ``images`` (N, C, H, W), already preprocessed.

    Runs forward passes in train mode under ``no_grad`` with ``momentum=None``: the running stats become the plain
    average of the per-batch statistics (batches weigh equally, so a short last batch counts as much as a full one);
    returns the model in eval mode. Models without BatchNorm are only switched to eval mode. The images are taken in
    a fixed shuffled order, so class-major inputs (``ImageSet.per_class``) do not give one-class batches, whose
    variance would leave out the variance between classes.
    """
    bns = batchnorm_layers(model)
    if bns:
        images = images[torch.randperm(images.shape[0], generator=torch.Generator().manual_seed(0)).to(images.device)]
        try:
            device = next(model.parameters()).device
        except StopIteration:
            device = images.device
        for m in bns:
            m.reset_running_stats()
        model.train()
        with batchnorm_momentum(model, None), torch.no_grad():
            for i in range(0, images.shape[0], batch_size):
                model(images[i : i + batch_size].to(device))
    return model.eval()
