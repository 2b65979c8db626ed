"""The library's exception type.

Every error that elf-dd raises on purpose is an :class:`ELFError`: it names the thing that is wrong and says
what to do about it. It subclasses :class:`ValueError` so code that already catches bad input keeps working.
"""

from __future__ import annotations

from typing import Any

__all__ = ["ELFError", "DivergedError", "model_name"]


def model_name(model: Any) -> str:
    """A model as messages name it: the name it was created by (``create_model``'s spec, e.g. ``ConvNetW512`` or
    ``ResNet18BN``), else its class name."""
    return str(getattr(model, "elf_model_name", None) or type(model).__name__)


class ELFError(ValueError):
    """A user-facing error from elf-dd (bad input, unknown name, corrupt file, ...)."""


class DivergedError(ELFError):
    """Training diverged: the loss became NaN or inf. The message names the model, the seed and the epoch."""
