"""Tests for the package layout: one home per concept, old import paths kept, no private names across modules,
a docstring on every module, the version's single source, and DSA draws pinned across refactors."""

from __future__ import annotations

import ast
import importlib
import re
import sys
from pathlib import Path

import pytest
import torch

import elf

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "elf"
MODULE_FILES = sorted(PACKAGE.rglob("*.py"))


def _module_name(path: Path) -> str:
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join(parts)


# --------------------------------------------------------------------------- old import paths

#: (old module, name, new module): names that moved; the old import keeps working for this release.
MOVED = [
    ("elf.io", "SyntheticSet", "elf.synthetic"),
    ("elf.io", "LABEL_KINDS", "elf.synthetic"),
    ("elf.io", "recompute_bn_stats", "elf.batchnorm"),
    ("elf.io", "load_expert_buffer", "elf.teacher"),
    ("elf.io", "load_parameters_into", "elf.teacher"),
    ("elf.io", "infer_label_kind", "elf.losses"),
    *[("elf.data", name, "elf.pixel_space") for name in importlib.import_module("elf.pixel_space").__all__],
    ("elf", "__version__", "elf.version"),
]


@pytest.mark.parametrize("old, name, new", MOVED, ids=[f"{o}.{n}" for o, n, _ in MOVED])
def test_old_import_paths_give_the_same_objects(old: str, name: str, new: str) -> None:
    old_obj = getattr(importlib.import_module(old), name)
    new_obj = getattr(importlib.import_module(new), name)
    assert old_obj is new_obj
    if old != "elf":
        assert name in importlib.import_module(old).__all__, f"{old}.__all__ lost {name}"
        assert name in importlib.import_module(new).__all__, f"{new}.__all__ does not list {name}"


def test_moved_names_are_defined_in_their_new_home() -> None:
    for _, name, new in MOVED:
        obj = getattr(importlib.import_module(new), name)
        home = getattr(obj, "__module__", None)
        if home is not None and callable(obj):  # classes and functions record where they were defined
            assert home == new, f"{name} is defined in {home}, expected {new}"


def test_the_pixel_space_names_that_moved_are_all_still_in_elf_data() -> None:
    moved = "Normalization CIFAR10_MTT CIFAR100_DC IMAGENET NORMALIZATIONS get_normalization ZCA fit_zca_cached space_metadata check_same_space"
    import elf.data
    import elf.pixel_space

    for name in moved.split():
        assert getattr(elf.data, name) is getattr(elf.pixel_space, name)
        assert name in elf.data.__all__


def test_star_imports_of_old_modules_still_work() -> None:
    namespace: dict = {}
    exec("from elf.io import *\nfrom elf.data import *", namespace)
    for old, name, _ in MOVED:
        if old in ("elf.io", "elf.data"):
            assert name in namespace


# --------------------------------------------------------------------------- version


def test_version_has_one_source_that_pyproject_reads() -> None:
    from elf.version import __version__

    assert elf.__version__ == __version__
    assert re.fullmatch(r"\d+\.\d+\.\d+([.-]?\w+)*", __version__)
    text = (ROOT / "pyproject.toml").read_text()
    if sys.version_info >= (3, 11):
        import tomllib

        project = tomllib.loads(text)
        static = project["project"].get("version")
        if static is not None:
            assert static == __version__
        else:
            assert "version" in project["project"]["dynamic"]
            attr = project["tool"]["setuptools"]["dynamic"]["version"]["attr"]
            module, _, name = attr.rpartition(".")
            assert getattr(importlib.import_module(module), name) == __version__
    else:  # pragma: no cover - 3.10 has no tomllib
        assert 'attr = "elf.version.__version__"' in text


def test_setuptools_reads_the_version_without_importing_the_package() -> None:
    expand = pytest.importorskip("setuptools.config.expand")
    assert expand.read_attr("elf.version.__version__", package_dir={}, root_dir=str(ROOT)) == elf.__version__
    # static reading: version.py must stay a plain assignment (no imports torch would need at build time)
    tree = ast.parse((PACKAGE / "version.py").read_text())
    assert not [n for n in tree.body if isinstance(n, (ast.Import, ast.ImportFrom))]


# --------------------------------------------------------------------------- no private names across modules


def _private_imports(source: str, label: str) -> list[str]:
    """``label:line: ...`` for every private name (or private module) a relative or ``elf`` import names."""
    tree = ast.parse(source, filename=label)
    dunder = re.compile(r"__\w+__")
    found: list[tuple[int, str]] = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.ImportFrom):
            continue
        module = node.module or ""
        if node.level == 0 and module.split(".")[0] != "elf":
            continue
        for part in module.split("."):
            if part.startswith("_") and not dunder.fullmatch(part):
                found.append((node.lineno, f"{label}:{node.lineno}: module {module}"))
        for alias in node.names:
            if alias.name.startswith("_") and not dunder.fullmatch(alias.name):
                found.append((node.lineno, f"{label}:{node.lineno}: {'.' * node.level}{module} import {alias.name}"))
    return [line for _, line in sorted(found)]


def test_no_module_imports_a_private_name_from_another() -> None:
    found = [line for path in MODULE_FILES for line in _private_imports(path.read_text(), str(path.relative_to(ROOT)))]
    assert not found, "private names imported across modules (make them public or move them):\n" + "\n".join(found)


def test_the_private_import_check_catches_them() -> None:
    source = (
        "from .data import _something\n"
        "from elf.io import (\n    load_any,\n    _hidden,\n)\n"
        "def f():\n    from ..generators import _lazy\n"
        "from .version import __version__\n"
        "from numpy import _private_but_not_ours\n"
        "from ._impl import public\n"
    )
    found = _private_imports(source, "probe.py")
    assert found == [
        "probe.py:1: .data import _something",
        "probe.py:2: elf.io import _hidden",
        "probe.py:7: ..generators import _lazy",
        "probe.py:10: module _impl",
    ]


# --------------------------------------------------------------------------- module docstrings


@pytest.mark.parametrize("path", MODULE_FILES, ids=[_module_name(p) for p in MODULE_FILES])
def test_every_module_has_a_docstring_saying_what_it_holds(path: Path) -> None:
    doc = ast.get_docstring(ast.parse(path.read_text()))
    assert doc, f"{_module_name(path)} has no module docstring"
    first = doc.splitlines()[0].strip()
    assert len(first) >= 15 and first.endswith("."), f"{_module_name(path)}: first docstring line {first!r} should be one sentence"


# --------------------------------------------------------------------------- DSA draws pinned

# Computed from the code before DSA sampling became table-driven; any change to these draws changes every
# seeded evaluation, so it must be deliberate.


def test_dsa_sampling_table_matches_the_apply_table() -> None:
    from elf import augment

    assert tuple(augment._SAMPLE) == augment.AUGMENT_OPS
    assert tuple(augment._APPLY) == augment.AUGMENT_OPS


def test_dsa_draws_all_ops_pinned() -> None:
    from elf.augment import DSA

    g = torch.Generator().manual_seed(1234)
    s = DSA("color_crop_cutout_flip_scale_rotate", mode="M").sample((3, 3, 32, 32), generator=g)
    close = dict(rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(s.brightness, torch.tensor([-0.47102075815200806, -0.09810143709182739, -0.24015581607818604]), **close)
    torch.testing.assert_close(s.saturation, torch.tensor([0.7332826852798462, 0.11660146713256836, 1.401289463043213]), **close)
    torch.testing.assert_close(s.contrast, torch.tensor([0.5517973899841309, 0.9681392312049866, 1.1738061904907227]), **close)
    assert s.crop.tolist() == [[-1, 3], [-1, 0], [-3, -4]]
    assert s.cutout.tolist() == [[3, 6], [9, 15], [15, 0]]
    assert s.flip.tolist() == [True, True, False]
    torch.testing.assert_close(
        s.scale,
        torch.tensor([[1.187720775604248, 1.007767915725708], [1.1046479940414429, 1.1208713054656982],
                      [0.9989632368087769, 0.8892486095428467]]),
        **close,
    )
    torch.testing.assert_close(s.rotate, torch.tensor([4.986732482910156, -4.970308303833008, 8.678712844848633]), **close)
    # the generator was advanced by exactly the draws above
    torch.testing.assert_close(torch.rand(2, generator=g), torch.tensor([0.3216397166252136, 0.5247237682342529]), **close)


def test_dsa_draws_mode_s_and_batch_shared_pinned() -> None:
    from elf.augment import DSA

    dsa = DSA("color_crop_cutout_flip_scale_rotate", mode="S", seed=7)
    g = torch.Generator().manual_seed(99)
    samples = [dsa.sample((2, 3, 16, 20), generator=g) for _ in range(6)]
    assert [s.ops for s in samples] == [("flip",), ("scale",), ("crop",), ("cutout",), ("crop",), ("flip",)]
    assert samples[0].flip.tolist() == [True, False]
    torch.testing.assert_close(
        samples[1].scale, torch.tensor([[1.1809589862823486, 0.9531466960906982], [1.1921931505203247, 1.1706767082214355]]),
        rtol=1e-6, atol=1e-6,
    )
    assert samples[2].crop.tolist() == [[0, -3], [1, -1]]
    assert samples[3].cutout.tolist() == [[10, 6], [14, 13]]
    assert samples[4].crop.tolist() == [[2, 2], [1, 2]]
    assert samples[5].flip.tolist() == [False, False]

    s = DSA("crop_scale", mode="M").sample((5, 3, 28, 28), generator=torch.Generator().manual_seed(3), batch_shared=True)
    assert s.ops == ("crop", "scale")
    assert s.crop.tolist() == [[0, 1]]
    torch.testing.assert_close(s.scale, torch.tensor([[0.9381422400474548, 0.8432167768478394]]), rtol=1e-6, atol=1e-6)
