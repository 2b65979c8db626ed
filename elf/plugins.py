"""Plugins: user models from modules named on the command line or in a study, and from installed packages.

Two ways to make a model the command line and studies can use (both end in :func:`elf.register_model` calls):

- ``elf eval --import my_models ...`` / a study's ``import = ["my_models"]``: imports that module (a dotted name
  importable from the current directory or ``sys.path``, or a path to a ``.py`` file) before anything is built.
- an installed package that declares an entry point in the ``elf_dd.models`` group, e.g. in its pyproject.toml::

      [project.entry-points."elf_dd.models"]
      my_models = "my_models"              # a module that registers on import
      more = "my_models.extra:register"    # or a function called with no arguments

  Entry points are loaded once, the first time a model name is looked up (``create_model``, ``list_models``,
  ``elf models``). A plugin that fails to load is reported as a warning and skipped.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
import warnings
from collections.abc import Iterable
from importlib import metadata
from pathlib import Path
from types import ModuleType

from .errors import ELFError

__all__ = ["ENTRY_POINT_GROUP", "import_plugins", "load_entry_points"]

ENTRY_POINT_GROUP = "elf_dd.models"
_loaded_entry_points: set[str] = set()
_loading = False


def load_entry_points(force: bool = False) -> list[str]:
    """Load every ``elf_dd.models`` entry point not loaded yet (all of them again with ``force``); returns their names.

    A module entry point registers on import; an entry point naming a function is called with no arguments.
    """
    global _loading
    if _loading:  # a plugin that itself looks up models while loading
        return []
    if force:
        _loaded_entry_points.clear()
    loaded = []
    _loading = True
    try:
        for ep in metadata.entry_points(group=ENTRY_POINT_GROUP):
            key = f"{ep.name}={ep.value}"
            if key in _loaded_entry_points:
                continue
            _loaded_entry_points.add(key)
            try:
                obj = ep.load()
                if callable(obj) and not isinstance(obj, ModuleType):
                    obj()
            except Exception as e:  # a broken plugin must not break the library
                warnings.warn(f"elf-dd plugin {ep.name!r} ({ep.value}) failed to load and is skipped: "
                              f"{type(e).__name__}: {e}", RuntimeWarning, stacklevel=2)
                continue
            loaded.append(ep.name)
    finally:
        _loading = False
    return loaded


def import_plugins(modules: Iterable[str], base_dir: str | Path | None = None) -> list[ModuleType]:
    """Import each of ``modules``: a dotted module name or a path to a ``.py`` file (relative to ``base_dir``,
    default the current directory). Names are looked up on ``sys.path`` plus ``base_dir`` and the current
    directory, as ``python -m`` would. Raises :class:`ELFError` naming the module and the import error.
    """
    base = Path(base_dir) if base_dir is not None else Path.cwd()
    out = []
    for spec in modules:
        spec = str(spec).strip()
        if not spec:
            continue
        if spec.endswith(".py") or "/" in spec or "\\" in spec:
            out.append(_import_file(base / spec if not Path(spec).is_absolute() else Path(spec)))
            continue
        for extra in (str(base.resolve()), str(Path.cwd().resolve())):
            if extra not in sys.path:
                sys.path.append(extra)
        try:
            out.append(importlib.import_module(spec))
        except Exception as e:
            raise ELFError(f"cannot import plugin module {spec!r} ({type(e).__name__}: {e}); give a module importable "
                           f"from {base} or sys.path, or a path to a .py file") from e
    return out


def _import_file(path: Path) -> ModuleType:
    if not path.is_file():
        raise ELFError(f"plugin file {path} does not exist")
    resolved = path.resolve()
    for module in list(sys.modules.values()):  # imported already, e.g. by its module name: its models are registered
        file = getattr(module, "__file__", None)
        if file and file.endswith(".py") and Path(file).resolve() == resolved:
            return module
    name = f"elf_plugin_{path.stem}_{abs(hash(str(resolved))) % 10**8}"
    spec = importlib.util.spec_from_file_location(name, path)
    if spec is None or spec.loader is None:
        raise ELFError(f"cannot import plugin file {path}: not a Python module")
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    try:
        spec.loader.exec_module(module)
    except Exception as e:
        del sys.modules[name]
        raise ELFError(f"importing plugin file {path} failed ({type(e).__name__}: {e})") from e
    return module
