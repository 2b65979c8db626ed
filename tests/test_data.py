"""Tests for elf.data: normalization, ImageSet, ImageFolder/tar loading with cache, CIFAR entry points, ZCA."""

from __future__ import annotations

import json
import os
import shutil
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import elf.data as data
from elf.data import (
    CIFAR10_CLASSES,
    CIFAR10_MTT,
    CIFAR100_DC,
    IMAGENET,
    ZCA,
    ImageSet,
    Normalization,
    default_data_path,
    fit_zca_cached,
    get_normalization,
    load_cifar,
    load_dataset,
    load_image_folder,
)
from elf.errors import ELFError
from elf.fileio import load_tensors, save_tensors


# ---------------------------------------------------------------------------------------------- helpers


def _write_tree(root: Path, splits=("train", "test"), classes=("cat", "dog", "ant"), per_class=3, size=(8, 8), seed=0) -> dict:
    """Write <split>/<class>/<i>.png with random pixels; returns {(split, class, i): uint8 (3, H, W)}."""
    rng = np.random.default_rng(seed)
    pixels = {}
    for split in splits:
        for cls in classes:
            d = root / split / cls if split else root / cls
            d.mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                arr = rng.integers(0, 256, size=(*size, 3), dtype=np.uint8)
                Image.fromarray(arr).save(d / f"{i:03d}.png")
                pixels[(split, cls, i)] = torch.from_numpy(arr).permute(2, 0, 1)
    return pixels


def _tar(src: Path, dst: Path) -> Path:
    with tarfile.open(dst, "w:gz") as tf:
        for p in sorted(src.rglob("*")):
            tf.add(p, arcname=p.relative_to(src).as_posix(), recursive=False)
    return dst


# ---------------------------------------------------------------------------------------------- Normalization


def test_normalization_constants_and_round_trip():
    assert CIFAR10_MTT.mean == (0.4914, 0.4822, 0.4465) and CIFAR10_MTT.std == (0.2023, 0.1994, 0.2010)
    assert CIFAR100_DC.mean == (0.5071, 0.4866, 0.4409) and CIFAR100_DC.std == (0.2673, 0.2564, 0.2762)
    assert IMAGENET.std == (0.229, 0.224, 0.225)
    x = torch.rand(4, 3, 5, 5)
    y = CIFAR10_MTT.normalize(x)
    assert torch.allclose(y[:, 0], (x[:, 0] - 0.4914) / 0.2023)
    assert torch.allclose(CIFAR10_MTT.denormalize(y), x, atol=1e-6)
    assert Normalization.from_dict(json.loads(json.dumps(CIFAR100_DC.to_dict()))) == CIFAR100_DC
    assert get_normalization("cifar10-mtt") is CIFAR10_MTT
    with pytest.raises(ELFError, match="3 channels"):
        CIFAR10_MTT.normalize(torch.rand(2, 1, 4, 4))
    with pytest.raises(ELFError, match="known"):
        get_normalization("nope")
    with pytest.raises(ELFError):
        Normalization((0.5,), (0.0,), "bad")


# ---------------------------------------------------------------------------------------------- ImageSet


def _toy_set(n_per=4, k=3) -> ImageSet:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (n_per * k, 3, 4, 4), generator=g, dtype=torch.uint8)
    labels = torch.arange(k).repeat(n_per)  # interleaved, not class-major
    return ImageSet(images, labels, [f"c{i}" for i in range(k)], "h0")


def test_imageset_float_subset_per_class():
    s = _toy_set()
    assert len(s) == 12 and s.num_classes == 3 and s.image_shape == (3, 4, 4)
    x = s.as_float()
    assert x.dtype == torch.float32 and 0 <= x.min() and x.max() <= 1
    assert torch.allclose(s.as_float(CIFAR10_MTT), CIFAR10_MTT.normalize(x))
    assert s.as_float(dtype=torch.float64).dtype == torch.float64
    sub = s.subset([5, 1])
    assert torch.equal(sub.images[0], s.images[5]) and sub.labels.tolist() == [s.labels[5], s.labels[1]]
    assert sub.source_hash != s.source_hash
    pc = s.per_class(2, torch.Generator().manual_seed(1))
    assert pc.labels.tolist() == [0, 0, 1, 1, 2, 2]
    again = s.per_class(2, torch.Generator().manual_seed(1))
    assert torch.equal(pc.images, again.images)
    with pytest.raises(ELFError, match="fewer than k=5"):
        s.per_class(5)
    with pytest.raises(ELFError, match="uint8"):
        ImageSet(torch.rand(2, 3, 4, 4), torch.zeros(2), ["a"], "h")
    with pytest.raises(ELFError, match="labels"):
        ImageSet(s.images, s.labels[:3], s.classes, "h")


# ---------------------------------------------------------------------------------------------- ImageFolder / tar


def test_load_image_folder_dir_tar_and_cache(tmp_path, monkeypatch):
    src = tmp_path / "tree"
    pixels = _write_tree(src)
    cache = tmp_path / "cache"
    s = load_image_folder(src, "train", cache_dir=cache, progress=False)
    assert s.classes == ["ant", "cat", "dog"]
    assert s.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    assert s.images.shape == (9, 3, 8, 8) and s.images.dtype == torch.uint8
    assert torch.equal(s.images[3], pixels[("train", "cat", 0)])  # PNG is lossless
    assert len(list(cache.glob("*.safetensors"))) == 1

    # the archive gives the same tensors; and the second load never decodes
    arc = _tar(src, tmp_path / "tree.tar.gz")
    t = load_image_folder(arc, "train", cache_dir=cache, progress=False)
    assert torch.equal(t.images, s.images) and torch.equal(t.labels, s.labels)
    test = load_image_folder(arc, "test", cache_dir=cache, progress=False)
    assert torch.equal(test.images[0], pixels[("test", "ant", 0)]) and test.source_hash != t.source_hash

    def boom(*a, **k):
        raise AssertionError("decoded although cached")

    monkeypatch.setattr(data, "_decode_bytes", boom)
    for src_ in (src, arc):
        u = load_image_folder(src_, "train", cache_dir=cache, progress=False)
        assert torch.equal(u.images, s.images) and u.source_hash in (s.source_hash, t.source_hash)
    monkeypatch.undo()

    # a tampered cache is detected by its hash, reported, and rebuilt
    cache_file = next(f for f in cache.glob("*.safetensors") if load_tensors(f)[1]["source_hash"] == t.source_hash)
    tensors, meta = load_tensors(cache_file)
    tensors["images"][0, 0, 0, 0] ^= 1
    save_tensors(cache_file, tensors, meta)
    with pytest.warns(UserWarning, match="does not match"):
        v = load_image_folder(arc, "train", cache_dir=cache, progress=False)
    assert torch.equal(v.images, s.images)

    # a changed source gets a new key
    Image.fromarray(np.zeros((8, 8, 3), np.uint8)).save(src / "train" / "cat" / "000.png")
    w = load_image_folder(src, "train", cache_dir=cache, progress=False)
    assert w.images[3].sum() == 0 and w.source_hash != s.source_hash


def test_load_image_folder_errors(tmp_path):
    src = tmp_path / "tree"
    _write_tree(src, per_class=1)
    with pytest.raises(ELFError, match="split="):
        load_image_folder(src, None, cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(ELFError, match="test, train"):
        load_image_folder(src, "val", cache_dir=tmp_path / "c", progress=False)
    Image.fromarray(np.zeros((9, 8, 3), np.uint8)).save(src / "train" / "dog" / "odd.png")
    with pytest.raises(ELFError, match="odd.png"):
        load_image_folder(src, "train", cache_dir=tmp_path / "c", progress=False)
    with pytest.raises(ELFError, match="no such file"):
        load_image_folder(tmp_path / "missing", "train")
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(ELFError, match="tar archive"):
        load_image_folder(tmp_path / "x.txt")


def test_load_image_folder_without_split_and_gray(tmp_path):
    src = tmp_path / "flat"
    _write_tree(src, splits=(None,), classes=("b", "a"), per_class=2)
    (src / ".hidden").mkdir()
    s = load_image_folder(src, cache_dir=tmp_path / "c", progress=False)
    assert s.classes == ["a", "b"] and len(s) == 4
    g = load_image_folder(src, cache_dir=tmp_path / "c", progress=False, mode="L")
    assert g.images.shape == (4, 1, 8, 8)


def test_load_dataset_and_env(tmp_path, monkeypatch):
    src = tmp_path / "tree"
    _write_tree(src, per_class=1)
    s = load_dataset(str(src), "test", cache_dir=tmp_path / "c", progress=False)
    assert len(s) == 3
    with pytest.raises(ELFError, match="neither a known dataset"):
        load_dataset(str(tmp_path / "nope"), "train")
    monkeypatch.delenv("ELF_DATA", raising=False)
    assert default_data_path() is None
    monkeypatch.setenv("ELF_DATA", str(src))
    assert default_data_path() == src
    monkeypatch.setenv("ELF_CACHE", str(tmp_path / "envcache"))
    assert data.default_cache_dir() == tmp_path / "envcache"


def test_load_cifar_offline_and_conversion(tmp_path, monkeypatch):
    with pytest.raises(ELFError, match="ImageFolder"):
        load_cifar("cifar10", tmp_path / "empty", train=False, download=False)
    with pytest.raises(ELFError, match="cifar10' or 'cifar100"):
        load_cifar("mnist", tmp_path, train=True)

    class FakeCIFAR10:
        def __init__(self, root, train, download):
            self.data = np.arange(2 * 32 * 32 * 3, dtype=np.uint8).reshape(2, 32, 32, 3)
            self.targets = [3, 1]
            self.classes = list(CIFAR10_CLASSES)

    class Offline:
        def __init__(self, root, train, download):
            import urllib.error

            raise urllib.error.URLError("no network")

    import torchvision.datasets as tvd

    monkeypatch.setattr(tvd, "CIFAR10", FakeCIFAR10)
    s = load_dataset("cifar10", "train", root=tmp_path)
    assert s.images.shape == (2, 3, 32, 32) and s.labels.tolist() == [3, 1]
    assert torch.equal(s.images[1, :, 2, 5], torch.from_numpy(FakeCIFAR10(0, 0, 0).data[1, 2, 5]))
    monkeypatch.setattr(tvd, "CIFAR100", Offline)
    with pytest.raises(ELFError, match="could not download"):
        load_dataset("cifar100", "test", root=tmp_path)


# ---------------------------------------------------------------------------------------------- ZCA


def _correlated(n=3000, shape=(3, 4, 4), seed=0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    d = int(np.prod(shape))
    mix = torch.randn(d, d, generator=g) / d**0.5 * torch.linspace(3, 0.01, d)
    return (torch.randn(n, d, generator=g) @ mix.T + 0.5).reshape(n, *shape)


def test_zca_inverse_and_whitening(tmp_path):
    x = _correlated()
    z = ZCA.fit(x, eps=0.1, batch_size=700)
    w = z.transform(x)
    assert w.shape == x.shape
    assert torch.allclose(z.inverse(w), x, atol=1e-4)
    # covariance of whitened data is U diag(S/(S+eps)) U^T: ~identity along the leading eigen directions
    flat = x.reshape(len(x), -1).double()
    S, U = torch.linalg.eigh(torch.cov(flat.T))
    wf = w.reshape(len(w), -1).double()
    var = ((wf - wf.mean(0)) @ U).var(0)
    lead = S > 10 * 0.1
    assert lead.sum() >= 5
    assert torch.allclose(var[lead], torch.ones_like(var[lead]), atol=0.1)
    assert torch.allclose(var, S / (S + 0.1), atol=1e-3)
    z.save(tmp_path / "z.safetensors")
    z2 = ZCA.load(tmp_path / "z.safetensors")
    assert torch.equal(z2.W, z.W) and z2.eps == 0.1 and z2.shape == (3, 4, 4)
    with pytest.raises(ELFError, match="shape"):
        z.transform(torch.zeros(2, 3, 5, 5))


def test_fit_zca_cached(tmp_path, monkeypatch):
    s = _toy_set(n_per=20)
    z = fit_zca_cached(s, CIFAR10_MTT, 0.1, tmp_path)
    ref = ZCA.fit(s.as_float(CIFAR10_MTT), 0.1)
    assert torch.allclose(z.W, ref.W, atol=1e-4)

    def boom(*a, **k):
        raise AssertionError("refit although cached")

    monkeypatch.setattr(ZCA, "_fit_batches", boom)
    assert torch.equal(fit_zca_cached(s, CIFAR10_MTT, 0.1, tmp_path).W, z.W)
    with pytest.raises(AssertionError):
        fit_zca_cached(s, CIFAR100_DC, 0.1, tmp_path)  # other normalization, other key


def test_damaged_zca_cache_is_refit(tmp_path):
    """Regression: a cached ZCA was used as read (only its key checked), so flipped bits in W whitened every image
    wrongly without a word; it now records a hash of its matrices and is fit again when they do not match."""
    from elf.fileio import load_tensors, save_tensors

    s = _toy_set(n_per=20)
    z = fit_zca_cached(s, CIFAR10_MTT, 0.1, tmp_path)
    (path,) = tmp_path.glob("zca-*.safetensors")
    tensors, meta = load_tensors(path)
    tensors["W"] = tensors["W"].clone()
    tensors["W"][0, 0] += 1e30
    save_tensors(path, tensors, meta)
    with pytest.raises(ELFError, match="damaged ZCA file"):
        ZCA.load(path)
    with pytest.warns(UserWarning, match="unusable"):
        again = fit_zca_cached(s, CIFAR10_MTT, 0.1, tmp_path)
    assert torch.equal(again.W, z.W)
    assert torch.equal(ZCA.load(path).W, z.W)  # the refit replaced the damaged file


# ---------------------------------------------------------------------------------------------- real data


@pytest.mark.realdata
def test_real_cifar10_archive(elf_data_path, tmp_path):
    cache = tmp_path / "cache"
    test = load_image_folder(elf_data_path, "test", cache_dir=cache, progress=False)
    assert len(test) == 10_000 and test.image_shape == (3, 32, 32)
    assert test.classes == CIFAR10_CLASSES
    assert test.class_counts().tolist() == [1000] * 10
    import elf.data

    def no_decoding(*args, **kwargs):  # the second load must come from the cache, not from decoding the archive
        raise AssertionError("decoded the archive again instead of reading the cache")

    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(elf.data, "_assemble", no_decoding)
        again = load_image_folder(elf_data_path, "test", cache_dir=cache, progress=False)
    assert torch.equal(again.images, test.images) and again.source_hash == test.source_hash

    train = load_image_folder(elf_data_path, "train", cache_dir=cache, progress=False)
    assert len(train) == 50_000 and train.class_counts().tolist() == [5000] * 10
    mean = train.as_float().mean(dim=(0, 2, 3))
    assert torch.allclose(mean, torch.tensor([0.4913, 0.4821, 0.4465]), atol=2e-3)


def test_a_nameless_set_matched_with_numeric_folders_sorted_as_text_warns() -> None:
    """Folders 0..11 sort as text (0, 1, 10, 11, 2, ...), as torchvision's ImageFolder sorts them: a set without class
    names is matched by position, so its label 2 meets folder "10". Said, not silent; zero-padded names are quiet."""
    import warnings

    from elf.data import ImageSet
    from elf.synthetic import SyntheticSet

    sset = SyntheticSet(torch.zeros(12, 3, 4, 4), torch.arange(12))
    text = sorted(str(i) for i in range(12))
    real = ImageSet(torch.zeros(12, 3, 4, 4, dtype=torch.uint8), torch.arange(12), text, "h", "folder")
    with pytest.warns(UserWarning, match="label 2 is matched with folder '10'"):
        sset.label_real(real)
    padded = ImageSet(real.images, real.labels, [f"{i:02d}" for i in range(12)], "h", "folder")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        SyntheticSet(torch.zeros(12, 3, 4, 4), torch.arange(12)).label_real(padded)


def test_gray_images_are_converted_one_way_in_a_tree_of_mixed_formats(tmp_path):
    """Regression: mode "L" used torchvision's GRAY for JPEGs and PIL's convert("L") for formats torchvision cannot
    read (up to 12 grey levels apart on JPEGs): one tree mixed two conversions. Now PIL converts every file."""
    rng = np.random.default_rng(0)
    src = tmp_path / "mixed"
    (src / "a").mkdir(parents=True)
    arr = rng.integers(0, 256, size=(16, 16, 3), dtype=np.uint8)
    Image.fromarray(arr).save(src / "a" / "0.jpg", quality=90)
    Image.fromarray(arr).save(src / "a" / "1.bmp")
    got = load_image_folder(src, cache_dir=tmp_path / "c", progress=False, mode="L").images
    with Image.open(src / "a" / "0.jpg") as im:
        want_jpg = torch.from_numpy(np.asarray(im.convert("L")).copy())
    with Image.open(src / "a" / "1.bmp") as im:
        want_bmp = torch.from_numpy(np.asarray(im.convert("L")).copy())
    assert torch.equal(got[0, 0], want_jpg) and torch.equal(got[1, 0], want_bmp)


def test_an_archive_member_appended_twice_counts_once_and_a_hard_link_is_refused(tmp_path):
    """Regression: a member appended with `tar -r` was decoded twice (extracting keeps the last copy), and a hard-link
    member was skipped without a word (the folder it extracts to has the image)."""
    src = tmp_path / "tree"
    _write_tree(src, splits=("train",), classes=("a", "b"), per_class=2)
    archive = tmp_path / "t.tar"
    with tarfile.open(archive, "w") as tf:
        for p in sorted(src.rglob("*")):
            tf.add(p, arcname=p.relative_to(src).as_posix(), recursive=False)
    replacement = np.full((8, 8, 3), 7, dtype=np.uint8)
    Image.fromarray(replacement).save(tmp_path / "new.png")
    with tarfile.open(archive, "a") as tf:  # what `tar -r` does: the same name again, later in the archive
        tf.add(tmp_path / "new.png", arcname="./train/a/000.png")
    s = load_image_folder(archive, "train", cache_dir=tmp_path / "c", progress=False)
    assert s.labels.tolist() == [0, 0, 1, 1]
    assert torch.equal(s.images[0], torch.from_numpy(replacement).permute(2, 0, 1))  # the last copy, as extracting
    linked = tmp_path / "linked"
    shutil.copytree(src, linked)
    os.link(linked / "train" / "a" / "000.png", linked / "train" / "b" / "009.png")
    with tarfile.open(tmp_path / "l.tar", "w") as tf:
        for p in sorted(linked.rglob("*")):
            tf.add(p, arcname=p.relative_to(linked).as_posix(), recursive=False)
    with pytest.raises(ELFError, match="hard link"):
        load_image_folder(tmp_path / "l.tar", "train", cache_dir=tmp_path / "c", progress=False)


def test_zca_fit_is_kept_when_its_cache_cannot_be_written(tmp_path):
    """Regression: an unwritable cache raised after the fit was computed (the image cache only warns)."""
    from elf.pixel_space import fit_zca_cached

    src = tmp_path / "tree"
    _write_tree(src, splits=(None,), per_class=2)
    s = load_image_folder(src, cache_dir=tmp_path / "c", progress=False)
    (tmp_path / "file").write_text("not a folder")
    with pytest.warns(UserWarning, match="could not write the ZCA cache"):
        zca = fit_zca_cached(s, None, eps=0.1, cache_dir=tmp_path / "file" / "cache")
    assert zca.transform(s.images.float() / 255).shape == s.images.shape
