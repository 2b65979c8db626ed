"""The library's exception type.

Every error that elf-dd raises on purpose is an :class:`ELFError`: it names the thing that is wrong and says
what to do about it. It subclasses :class:`ValueError` so code that already catches bad input keeps working.
"""

from __future__ import annotations

__all__ = ["ELFError", "DivergedError"]


class ELFError(ValueError):
    """A user-facing error from elf-dd (bad input, unknown name, corrupt file, ...)."""


class DivergedError(ELFError):
    """Training diverged: the loss became NaN or inf. The message names the model, the seed and the epoch."""
