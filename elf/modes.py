"""Train/eval mode for a block of code, with every submodule's own flag restored afterwards.

``model.train(was_training)`` after ``model.eval()`` sets *every* submodule to the root's flag, so a model whose
user froze some layers (BatchNorm in eval mode inside a training model) comes back changed; :func:`in_mode` puts
each module back as it was.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from torch import nn

__all__ = ["in_mode"]


@contextlib.contextmanager
def in_mode(module: nn.Module, train: bool) -> Iterator[nn.Module]:
    """``module`` (and all its submodules) in train (``True``) or eval mode inside the block; each submodule's own
    ``training`` flag is restored on exit, also after an exception."""
    saved = [(m, m.training) for m in module.modules()]
    module.train(train)
    try:
        yield module
    finally:
        for m, flag in saved:
            m.training = flag
