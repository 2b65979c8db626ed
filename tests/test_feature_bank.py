"""FeatureBank: teacher features computed once, saved/loaded with verified metadata, cached by content hash."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from torch import nn

import elf
from elf import ELFError, FeatureBank, create_model, save_checkpoint
from elf.fileio import state_dict_sha256, tensor_sha256

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _images(n: int = 6, size: int = 32, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(seed))


def _teacher(name: str = "ConvNetW16", seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return create_model(name)


class _Counter:
    """Counts real (tensor) forward calls of a submodule through a forward hook."""

    def __init__(self, module: nn.Module) -> None:
        self.calls = 0
        self.images = 0
        module.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if isinstance(output, torch.Tensor):
            self.calls += 1
            self.images += output.shape[0]


def _data_offset(path: Path) -> int:
    raw = path.read_bytes()
    (header_len,) = struct.unpack("<Q", raw[:8])
    return 8 + header_len


def _flip_byte(path: Path, offset: int) -> None:
    with open(path, "r+b") as f:  # in place, no truncation
        f.seek(offset)
        b = f.read(1)
        f.seek(offset)
        f.write(bytes([b[0] ^ 0xFF]))


def _only_file(directory: Path) -> Path:
    files = [p for p in directory.iterdir() if p.suffix == ".safetensors"]
    assert len(files) == 1, files
    return files[0]


# ---- building ------------------------------------------------------------------------------------------------------


def test_build_equals_teacher_features_in_eval_mode():
    teacher = _teacher("ConvNetW16BN").train()
    x = _images()
    teacher(x)  # give BN non-trivial running stats
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    bank = FeatureBank.build(teacher, x)
    assert teacher.training, "build must restore the teacher's mode"
    for k, v in teacher.state_dict().items():
        assert torch.equal(v, before[k]), f"build changed {k}"
    teacher.eval()
    with torch.no_grad():
        want = teacher.features(x)
        train_mode = teacher.train().features(x)
    assert bank.shape == (16, 4, 4) and len(bank) == 6
    assert bank.features.dtype == torch.float32
    assert torch.allclose(bank.features, want, atol=1e-6)
    assert not torch.allclose(bank.features, train_mode, atol=1e-3)  # BN batch statistics would differ
    assert bank.point == "features"
    assert not bank.features.requires_grad


def test_build_at_an_explicit_point():
    teacher = _teacher().eval()
    x = _images()
    bank = FeatureBank.build(teacher, x, "features.7")
    with torch.no_grad():
        want = teacher.features[:8](x)
    assert bank.shape == (16, 8, 8)
    assert torch.allclose(bank.features, want, atol=1e-6)
    assert bank.metadata["point"] == "features.7"


@pytest.mark.parametrize("batch_size", [1, 4, 5])
def test_batch_size_splitting_gives_identical_results(batch_size):
    teacher = _teacher()
    x = _images(6)
    counter = _Counter(teacher.features[0])
    whole = FeatureBank.build(teacher, x, batch_size=256)
    assert counter.calls == 1
    parts = FeatureBank.build(teacher, x, batch_size=batch_size)
    assert counter.calls == 1 + -(-6 // batch_size)
    assert torch.allclose(parts.features, whole.features, atol=1e-5, rtol=1e-5)


def test_index_returns_float32_rows():
    bank = FeatureBank.build(_teacher(), _images(), dtype=torch.float16)
    idx = torch.tensor([4, 1])
    rows = bank[idx]
    assert rows.dtype == torch.float32 and rows.shape == (2, 16, 4, 4)
    assert torch.equal(rows, bank.features[idx].float())


def test_build_rejects_bad_images_and_dtype():
    with pytest.raises(ELFError):
        FeatureBank.build(_teacher(), torch.randn(3, 32, 32))
    with pytest.raises(ELFError, match="dtype"):
        FeatureBank.build(_teacher(), _images(), dtype="int8")
    with pytest.raises(ELFError):
        FeatureBank(torch.randn(5))


class _ModeTeacher(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:  # e.g. a train-only noise/augmentation path
            x = x + 1.0
        return self.head(self.body(x).flatten(1))


def test_build_uses_eval_graph_of_mode_dependent_teacher():
    torch.manual_seed(0)
    teacher = _ModeTeacher().train()
    x = _images(2, size=8)
    bank = FeatureBank.build(teacher, x, "body")
    with torch.no_grad():
        want = teacher.body(x)  # eval-mode forward: no "+ 1"
    assert torch.allclose(bank.features, want, atol=1e-6)


# ---- files ---------------------------------------------------------------------------------------------------------


def test_save_load_round_trip_with_metadata(tmp_path):
    teacher = _teacher()
    x = _images()
    bank = FeatureBank.build(teacher, x)
    path = bank.save(tmp_path / "bank.safetensors")
    assert path.exists()
    loaded = FeatureBank.load(path)
    assert torch.equal(loaded.features, bank.features)
    meta = loaded.metadata
    from elf.feature_bank import teacher_sha256

    assert meta["teacher_sha256"] == teacher_sha256(teacher) != state_dict_sha256(teacher)  # weights + architecture
    assert meta["images_sha256"] == tensor_sha256(x)
    assert meta["point"] == "features"
    assert meta["shape"] == "6,16,4,4"
    assert meta["dtype"] == "float32"
    assert meta["elf_version"] == elf.__version__
    assert loaded.point == "features" and loaded.shape == (16, 4, 4)
    loaded.check_matches(x)
    # the metadata is stored in the safetensors header (readable without elf)
    with safe_open(str(path), framework="pt") as f:
        assert f.metadata()["images_sha256"] == tensor_sha256(x)


def test_features_beyond_float16s_range_are_refused_not_stored_as_inf():
    """Regression: features above 65504 became inf in a float16 bank (cached so), and training then stopped with
    'diverged: lower lr or lambda', which blamed the wrong thing."""
    teacher = _teacher("ConvNetW16NN")  # no normalization: the features scale with the images
    x = _images() * 1e7  # features reach ~7e5
    with pytest.raises(ELFError, match="beyond float16's range"):
        FeatureBank.build(teacher, x, dtype=torch.float16)
    assert torch.isfinite(FeatureBank.build(teacher, x, dtype="bfloat16").features).all()


@pytest.mark.parametrize("dtype,name", [(torch.float16, "float16"), ("bfloat16", "bfloat16")])
def test_low_precision_storage(tmp_path, dtype, name):
    teacher = _teacher()
    x = _images()
    full = FeatureBank.build(teacher, x)
    bank = FeatureBank.build(teacher, x, dtype=dtype)
    assert bank.features.dtype == getattr(torch, name)
    path = bank.save(tmp_path / "bank.safetensors")
    with safe_open(str(path), framework="pt") as f:
        assert f.get_tensor("features").dtype == getattr(torch, name)
    assert json.loads(path.read_bytes()[8:_data_offset(path)])["features"]["dtype"] == {"float16": "F16", "bfloat16": "BF16"}[name]
    loaded = FeatureBank.load(path)
    assert loaded.features.dtype == getattr(torch, name)
    assert loaded.metadata["dtype"] == name
    rows = loaded[torch.arange(6)]
    assert rows.dtype == torch.float32
    assert torch.allclose(rows, full.features, rtol=2e-2, atol=2e-2)
    assert path.stat().st_size < full.features.numel() * 4  # really stored with 2 bytes per value


def test_tampered_file_raises_on_load(tmp_path):
    path = FeatureBank.build(_teacher(), _images()).save(tmp_path / "bank.safetensors")
    _flip_byte(path, _data_offset(path) + 17)
    with pytest.raises(ELFError, match="hash"):
        FeatureBank.load(path)
    FeatureBank.load(path, verify=False)  # explicitly unverified reads still work


@pytest.mark.parametrize("keep", [5, 100, 0.5])
def test_truncated_file_raises(tmp_path, keep):
    path = FeatureBank.build(_teacher(), _images()).save(tmp_path / "bank.safetensors")
    raw = path.read_bytes()
    n = int(len(raw) * keep) if isinstance(keep, float) else keep
    path.write_bytes(raw[:n])
    with pytest.raises(ELFError):
        FeatureBank.load(path)


def test_missing_and_foreign_files_raise(tmp_path):
    with pytest.raises(ELFError, match="no such file"):
        FeatureBank.load(tmp_path / "nope.safetensors")
    from safetensors.torch import save_file

    save_file({"weights": torch.zeros(3)}, str(tmp_path / "other.safetensors"))
    with pytest.raises(ELFError, match="feature bank"):
        FeatureBank.load(tmp_path / "other.safetensors")


def test_loaded_bank_is_independent_of_the_file(tmp_path):
    path = FeatureBank.build(_teacher(), _images()).save(tmp_path / "bank.safetensors")
    bank = FeatureBank.load(path)
    saved = bank.features.clone()
    _flip_byte(path, _data_offset(path) + 17)
    assert torch.equal(bank.features, saved)


# ---- cache ---------------------------------------------------------------------------------------------------------


def test_cache_hit_computes_nothing(tmp_path):
    teacher = _teacher()
    x = _images()
    counter = _Counter(teacher.features[0])
    first = FeatureBank.build(teacher, x, cache_dir=tmp_path, batch_size=4)
    assert counter.calls == 2 and counter.images == 6
    cached = _only_file(tmp_path)
    second = FeatureBank.build(teacher, x, cache_dir=tmp_path, batch_size=4)
    assert counter.calls == 2, "a cache hit must not run the teacher"
    assert torch.equal(second.features, first.features)
    assert second.metadata["key"] == first.metadata["key"]
    assert second.metadata == first.metadata  # a miss describes its bank as a hit does (hash and version included)
    assert _only_file(tmp_path) == cached


def test_a_cache_hit_records_the_pixel_space_of_this_call(tmp_path):
    """Regression: a bank read from the cache kept the space metadata of its first build, so the check that bank and
    set share a pixel space compared the set with an older claim."""
    from elf.pixel_space import CIFAR10_MTT, IMAGENET, check_same_space, space_metadata

    teacher, x = _teacher(), _images()
    FeatureBank.build(teacher, x, cache_dir=tmp_path, space=space_metadata(CIFAR10_MTT, False))
    again = FeatureBank.build(teacher, x, cache_dir=tmp_path, space=space_metadata(IMAGENET, True))
    assert again.metadata["space_zca"] == "true" and again.metadata["space_mean"] == space_metadata(IMAGENET, True)["space_mean"]
    with pytest.raises(ELFError, match="ZCA"):
        check_same_space(again.metadata, space_metadata(CIFAR10_MTT, False), "the bank", "the set")


def test_cache_changed_teacher_or_images_recomputes(tmp_path):
    teacher = _teacher()
    x = _images()
    counter = _Counter(teacher.features[0])
    first = FeatureBank.build(teacher, x, cache_dir=tmp_path)
    assert counter.calls == 1
    x2 = x.clone()
    x2[3, 0, 0, 0] += 1.0
    changed_images = FeatureBank.build(teacher, x2, cache_dir=tmp_path)
    assert counter.calls == 2
    assert changed_images.metadata["images_sha256"] != first.metadata["images_sha256"]
    with torch.no_grad():
        teacher.features[0].weight[0, 0, 0, 0] += 0.5
    changed_teacher = FeatureBank.build(teacher, x, cache_dir=tmp_path)
    assert counter.calls == 3
    assert not torch.equal(changed_teacher.features, first.features)
    # another point or storage dtype is another key
    FeatureBank.build(teacher, x, "features.7", cache_dir=tmp_path)
    FeatureBank.build(teacher, x, dtype="float16", cache_dir=tmp_path)
    assert counter.calls == 5
    assert len(list(tmp_path.glob("*.safetensors"))) == 5
    with torch.no_grad():
        teacher.eval()
        assert torch.allclose(changed_teacher.features, teacher.features(x), atol=1e-6)


def test_cache_tampered_file_warns_and_recomputes(tmp_path):
    teacher = _teacher()
    x = _images()
    counter = _Counter(teacher.features[0])
    first = FeatureBank.build(teacher, x, cache_dir=tmp_path)
    expected = first.features.clone()
    path = _only_file(tmp_path)
    _flip_byte(path, _data_offset(path) + 33)
    with pytest.warns(UserWarning, match="recomputing"):
        again = FeatureBank.build(teacher, x, cache_dir=tmp_path)
    assert counter.calls == 2
    assert torch.equal(again.features, expected)
    assert torch.equal(FeatureBank.load(path).features, expected)  # the cache was rewritten correctly


def test_cache_truncated_file_warns_and_recomputes(tmp_path):
    teacher = _teacher()
    x = _images()
    counter = _Counter(teacher.features[0])
    expected = FeatureBank.build(teacher, x, cache_dir=tmp_path).features.clone()
    path = _only_file(tmp_path)
    path.write_bytes(path.read_bytes()[:50])
    with pytest.warns(UserWarning):
        again = FeatureBank.build(teacher, x, cache_dir=tmp_path)
    assert counter.calls == 2
    assert torch.equal(again.features, expected)


# ---- from_checkpoint / check_matches -----------------------------------------------------------------------------


def test_from_checkpoint_equals_build(tmp_path):
    teacher = _teacher(seed=3)
    x = _images()
    ckpt = save_checkpoint(teacher, tmp_path / "teacher.safetensors")
    bank = FeatureBank.from_checkpoint(ckpt, "ConvNetW16", x)
    want = FeatureBank.build(teacher, x)
    assert torch.equal(bank.features, want.features)
    assert bank.metadata["teacher_sha256"] == want.metadata["teacher_sha256"]
    assert bank.metadata["teacher_model"] == "ConvNetW16"
    other = FeatureBank.build(_teacher(seed=4), x)
    assert not torch.allclose(bank.features, other.features)


def test_from_checkpoint_errors(tmp_path):
    x = _images()
    with pytest.raises(ELFError):
        FeatureBank.from_checkpoint(tmp_path / "missing.safetensors", "ConvNetW16", x)
    ckpt = save_checkpoint(_teacher(), tmp_path / "teacher.safetensors")
    with pytest.raises(ELFError):
        FeatureBank.from_checkpoint(ckpt, "ConvNetW32", x)  # wrong architecture for the file
    with pytest.raises(ELFError):
        FeatureBank.from_checkpoint(ckpt, "ConvNetW16", x[0])


def test_check_matches():
    x = _images()
    bank = FeatureBank.build(_teacher(), x)
    bank.check_matches(x.clone())
    other = x.clone()
    other[0, 0, 0, 0] += 1e-3
    with pytest.raises(ELFError, match="other images"):
        bank.check_matches(other)
    with pytest.raises(ELFError, match="6 features"):
        bank.check_matches(x[:5])
    bare = FeatureBank(bank.features.clone())  # no recorded hash: only the count is checked
    bare.check_matches(other)
    with pytest.raises(ELFError):
        bare.check_matches(x[:4])


def test_cache_key_includes_teacher_architecture(tmp_path):
    """Regression: two teachers with identical weights but different activations must not share cached features."""
    from elf import create_model

    x = torch.randn(4, 3, 16, 16)
    torch.manual_seed(0)
    relu = create_model("ConvNetW8D2", im_size=(16, 16))
    torch.manual_seed(0)
    sigmoid = create_model("ConvNetW8D2AS", im_size=(16, 16))
    assert all(torch.equal(a, b) for a, b in zip(relu.state_dict().values(), sigmoid.state_dict().values()))
    FeatureBank.build(relu, x, cache_dir=tmp_path)
    bank = FeatureBank.build(sigmoid, x, cache_dir=tmp_path)
    with torch.no_grad():
        expected = sigmoid.eval().features(x)
    torch.testing.assert_close(bank.features, expected)
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 2



def shift_relu(x: torch.Tensor) -> torch.Tensor:
    return torch.relu(x + 1)


class _AddNet(torch.nn.Module):
    """Traced through, ``shift_relu``'s add is node ``add`` and the net's own is ``add_1``; with the function
    autowrapped, the net's own add is ``add``: one point name, two tensors."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)
        self.head = torch.nn.Linear(4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = shift_relu(self.conv(x)) + 2
        return self.head(h.mean((2, 3)))


def test_cache_key_includes_the_trace_options(tmp_path):
    """Regression: a bank cached for point "add" traced through a function was returned for "add" with the function
    autowrapped (another node), because the key left out the split options."""
    from elf import SplitOptions

    torch.manual_seed(0)
    teacher, x = _AddNet().eval(), torch.randn(3, 3, 8, 8)
    wrapped = SplitOptions(autowrap_functions=(shift_relu,))
    inlined = FeatureBank.build(teacher, x, "add", cache_dir=tmp_path)
    as_node = FeatureBank.build(teacher, x, "add", cache_dir=tmp_path, options=wrapped)
    with torch.no_grad():
        h = teacher.conv(x)
        torch.testing.assert_close(inlined.features, h + 1)
        torch.testing.assert_close(as_node.features, torch.relu(h + 1) + 2)
    assert len(list(tmp_path.glob("features-*.safetensors"))) == 2
    again = FeatureBank.build(teacher, x, "add", cache_dir=tmp_path, options=wrapped)
    assert again.metadata["key"] == as_node.metadata["key"]  # a cache hit under the same options



_USER_TEACHER = """
import torch


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x):
        return torch.relu(self.conv(x){block_edit})


class Teacher(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()
        self.fc = torch.nn.Linear(4, 10)

    def forward(self, x):
        return self.fc(self.block(x{forward_edit}).mean((2, 3)))
"""


def _user_teacher(folder, block_edit: str = "", forward_edit: str = "") -> torch.nn.Module:
    """``Teacher`` of a user's module ``user_teacher`` (``folder/user_teacher.py``) as written now, imported afresh
    into ``sys.modules`` (the caller restores it), with seed-0 weights."""
    import importlib.util
    import sys

    path = folder / "user_teacher.py"
    path.write_text(_USER_TEACHER.format(block_edit=block_edit, forward_edit=forward_edit))
    spec = importlib.util.spec_from_file_location("user_teacher", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["user_teacher"] = module
    spec.loader.exec_module(module)
    torch.manual_seed(0)
    return module.Teacher()


def test_cache_key_includes_the_teachers_code(tmp_path, monkeypatch):
    """Regression: the key held the weights and the module tree's repr, so a teacher whose code was edited (same
    class names, modules and weights) got the features cached for the old code: traced code, and leaf modules."""
    from elf import SplitOptions

    import sys

    monkeypatch.setitem(sys.modules, "user_teacher", None)  # (restored at the end)
    x = torch.randn(3, 3, 8, 8)
    cache = tmp_path / "cache"
    FeatureBank.build(_user_teacher(tmp_path), x, "block", cache_dir=cache)
    edited = _user_teacher(tmp_path, forward_edit=" * 2")  # traced through: the front's generated code changes
    bank = FeatureBank.build(edited, x, "block", cache_dir=cache)
    with torch.no_grad():
        torch.testing.assert_close(bank.features, edited.block(x * 2))
    first = _user_teacher(tmp_path)
    FeatureBank.build(first, x, "block", cache_dir=cache, options=SplitOptions(leaf_modules=(type(first.block),)))
    edited = _user_teacher(tmp_path, block_edit=" + 1")  # a leaf module, not traced: its class's source changes
    bank = FeatureBank.build(edited, x, "block", cache_dir=cache, options=SplitOptions(leaf_modules=(type(edited.block),)))
    with torch.no_grad():
        torch.testing.assert_close(bank.features, edited.block(x))
    assert len(list(cache.glob("features-*.safetensors"))) == 4
