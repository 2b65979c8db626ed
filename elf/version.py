"""The package version: ``__version__``, read by ``elf/__init__.py`` and by setuptools (pyproject's dynamic version)."""

__version__ = "0.1.0"
