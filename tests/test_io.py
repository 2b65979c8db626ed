"""Tests for elf.io: SyntheticSet, our format, the published formats, expert buffers, refusal of malicious pickles."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch import nn

from elf.data import CIFAR10_CLASSES, CIFAR10_MTT, CIFAR100_DC
from elf.errors import ELFError
from elf.io import (
    SyntheticSet,
    infer_label_kind,
    load_any,
    load_dc_result,
    load_expert_buffer,
    load_mtt,
    load_npz,
    load_parameters_into,
    load_synthetic,
    recompute_bn_stats,
    save_synthetic,
)

K, IPC = 3, 2
N = K * IPC


def _images(n=N, seed=0) -> torch.Tensor:
    return torch.randn(n, 3, 4, 4, generator=torch.Generator().manual_seed(seed))


def _class_major() -> torch.Tensor:
    return torch.arange(K).repeat_interleave(IPC)


# ---------------------------------------------------------------------------------------------- SyntheticSet


def test_synthetic_set_validation_and_inference():
    s = SyntheticSet(_images(), _class_major())
    assert s.label_kind == "index" and s.ipc == IPC and s.num_classes == K and len(s) == N
    assert SyntheticSet(_images(), torch.tensor([0, 1, 2, 0, 1, 2])).ipc is None  # not class-major
    probs = torch.softmax(torch.randn(N, K), 1)
    assert infer_label_kind(probs) == "prob" and infer_label_kind(torch.randn(N, K) * 5) == "logits"
    sp = SyntheticSet(_images(), probs)
    assert sp.label_kind == "prob" and torch.equal(sp.hard_labels(), probs.argmax(1))
    with pytest.raises(ELFError, match="float"):
        SyntheticSet(torch.zeros(N, 3, 4, 4, dtype=torch.uint8), _class_major())
    with pytest.raises(ELFError, match="N, C, H, W"):
        SyntheticSet(torch.zeros(N, 4, 4), _class_major())
    bad = _images()
    bad[0, 0, 0, 0] = float("nan")
    with pytest.raises(ELFError, match="NaN"):
        SyntheticSet(bad, _class_major())
    with pytest.raises(ELFError, match="one label per image"):
        SyntheticSet(_images(), _class_major()[:-1])
    with pytest.raises(ELFError, match="sum to 1"):
        SyntheticSet(_images(), torch.randn(N, K), label_kind="prob")
    with pytest.raises(ELFError, match="label_kind"):
        SyntheticSet(_images(), _class_major(), label_kind="hard")
    with pytest.raises(ELFError, match="channels"):
        SyntheticSet(torch.zeros(N, 1, 4, 4), _class_major(), normalization=CIFAR10_MTT)
    with pytest.raises(ELFError, match="class name"):
        SyntheticSet(_images(), _class_major(), classes=["a", "b"])


def test_save_load_synthetic_round_trip(tmp_path):
    logits = torch.nn.functional.one_hot(_class_major(), K) * 4.0 + torch.randn(N, K) * 0.1
    s = SyntheticSet(
        _images(), logits, "logits", CIFAR100_DC, True, ["a", "b", "c"], None, 0.0123, {"method": "datm", "source": "x"}
    )
    assert s.ipc == IPC  # inferred from the argmax, which is class-major
    p = save_synthetic(tmp_path / "s.safetensors", s)
    t = load_synthetic(p)
    assert torch.equal(t.images, s.images) and torch.equal(t.labels, s.labels)
    assert (t.label_kind, t.normalization, t.zca, t.classes, t.ipc, t.lr, t.metadata) == (
        "logits", CIFAR100_DC, True, ["a", "b", "c"], s.ipc, pytest.approx(0.0123), s.metadata
    )
    u = load_synthetic(save_synthetic(tmp_path / "h.safetensors", SyntheticSet(_images(), _class_major())))
    assert u.normalization is None and u.lr is None and u.ipc == IPC and not u.zca and u.classes is None
    assert load_any(tmp_path / "h.safetensors").label_kind == "index"
    from elf.fileio import save_tensors

    save_tensors(tmp_path / "other.safetensors", {"x": torch.zeros(1)})
    with pytest.raises(ELFError, match="not an elf-dd synthetic set"):
        load_synthetic(tmp_path / "other.safetensors")


SyntheticSet.__test__ = False  # keep pytest from collecting the dataclass  # type: ignore[attr-defined]


# ---------------------------------------------------------------------------------------------- MTT family


def test_load_mtt_hard_soft_logits_lr(tmp_path):
    d = tmp_path / "mtt"
    d.mkdir()
    x = _images()
    torch.save(x, d / "images_best.pt")
    torch.save(_class_major(), d / "labels_best.pt")
    s = load_mtt(d, zca=True)
    assert torch.equal(s.images, x) and s.label_kind == "index" and s.ipc == IPC and s.lr is None
    assert s.zca and s.normalization.name == "none" and s.metadata["format"] == "mtt"

    # TESLA: (N, K) probabilities
    probs = torch.softmax(torch.randn(N, K), 1)
    torch.save(probs, d / "labels_best.pt")
    assert load_mtt(d / "images_best.pt").label_kind == "prob"

    # DATM: logits saved with requires_grad, a learned lr saved as a Parameter
    logits = (torch.randn(N, K) * 3).requires_grad_(True)
    torch.save(logits, d / "labels_best.pt")
    torch.save(nn.Parameter(torch.tensor(0.01)), d / "lr_best.pt")
    s = load_any(d)
    assert s.label_kind == "logits" and not s.labels.requires_grad and s.lr == pytest.approx(0.01)

    # images_<iter>.pt finds labels_<iter>.pt
    torch.save(x, d / "images_5000.pt")
    torch.save(_class_major(), d / "labels_5000.pt")
    s = load_any(d / "images_5000.pt")
    assert s.label_kind == "index" and s.lr is None
    (d / "labels_best.pt").unlink()
    with pytest.raises(ELFError, match="labels_best.pt"):
        load_mtt(d)
    with pytest.raises(ELFError, match="does not take"):
        load_any(d / "images_5000.pt", experiment=1)


# ---------------------------------------------------------------------------------------------- DC / DSA / DM


def _write_dc(path: Path, n_exp=2) -> list:
    data = [[_images(seed=e), _class_major()] for e in range(n_exp)]
    torch.save({"data": data, "accs_all_exps": {"ConvNet": [np.float64(0.25), np.float64(0.5)]}}, path)
    return data


def test_load_dc_result(tmp_path):
    p = tmp_path / "res_DM_CIFAR10_ConvNet_2ipc.pt"
    data = _write_dc(p)
    s = load_dc_result(p, experiment=1)
    assert torch.equal(s.images, data[1][0]) and s.label_kind == "index" and s.ipc == 2
    assert (s.metadata["method"], s.metadata["dataset"], s.metadata["model"], s.metadata["ipc"]) == ("DM", "CIFAR10", "ConvNet", "2")
    assert json.loads(s.metadata["accs_all_exps"]) == {"ConvNet": [0.25, 0.5]}
    assert s.normalization == CIFAR10_MTT and s.classes == CIFAR10_CLASSES[:10] and not s.zca
    with pytest.raises(ELFError, match="holds 2 experiment"):
        load_dc_result(p, experiment=2)
    q = tmp_path / "res_DSA_CIFAR100_ConvNetBN_2ipc.pt"
    _write_dc(q, 1)
    s = load_any(q)
    assert s.normalization == CIFAR100_DC and s.metadata["model"] == "ConvNetBN" and s.metadata["method"] == "DSA"


def test_dc_allowlist_is_narrow(tmp_path):
    """A DC-shaped file holding a numpy array (not only float64 scalars) needs more than the allowlist: refused."""
    p = tmp_path / "res_DC_CIFAR10_ConvNet_2ipc.pt"
    torch.save({"data": [[_images(), _class_major()]], "accs_all_exps": {"ConvNet": np.zeros(3)}}, p)
    with pytest.raises(ELFError, match="refused"):
        load_dc_result(p)


def test_dc_negative_experiment_records_its_index_and_the_file_hash(tmp_path, monkeypatch):
    """experiment=-1 was recorded as "-1", which names another set once DC appends an experiment, and no file hash was
    recorded; the index from the start and the file's sha256 are recorded now, and a file rewritten mid-read is refused."""
    import elf.io
    from elf.fileio import file_sha256

    p = tmp_path / "res_DM_CIFAR10_ConvNet_2ipc.pt"
    data = _write_dc(p, 3)
    s = load_dc_result(p, experiment=-1)
    assert torch.equal(s.images, data[2][0])
    assert (s.metadata["experiment"], s.metadata["num_experiments"], s.metadata["sha256"]) == ("2", "3", file_sha256(p))
    assert load_any(p, experiment=-3).metadata["experiment"] == "0"

    real_load = elf.io.safe_torch_load

    def load_then_rewrite(path, *a, **kw):  # a DC run saving its next experiment while we read
        obj = real_load(path, *a, **kw)
        _write_dc(Path(path), 4)
        return obj

    monkeypatch.setattr(elf.io, "safe_torch_load", load_then_rewrite)
    with pytest.raises(ELFError, match="changed while it was read"):
        load_dc_result(p, experiment=-1)


# ---------------------------------------------------------------------------------------------- npz, image dirs


def test_load_npz(tmp_path):
    x = np.random.default_rng(0).standard_normal((N, 5, 4, 3)).astype(np.float32)  # NHWC
    onehot = np.eye(K, dtype=np.float32)[_class_major().numpy()]
    np.savez(tmp_path / "kip.npz", images=x, labels=onehot)
    s = load_npz(tmp_path / "kip.npz")
    assert s.images.shape == (N, 3, 5, 4) and torch.allclose(s.images[1, 2], torch.from_numpy(x[1, :, :, 2]))
    assert s.label_kind == "index" and s.labels.tolist() == _class_major().tolist() and s.ipc == IPC
    np.savez(tmp_path / "centered.npz", x=x, y=onehot - 1.0 / K)  # KIP regression targets
    assert load_any(tmp_path / "centered.npz").label_kind == "index"
    with pytest.warns(UserWarning, match="whitened KIP's way"):  # KIP's ZCA is not the one elf-dd applies to test images
        assert load_npz(tmp_path / "kip.npz", zca=True).zca
    probs = np.full((N, K), 0.1, np.float32)
    probs[:, 0] = 0.8
    probs[0] = [0.5, 0.25, 0.25]
    np.savez(tmp_path / "soft.npz", images=x, labels=probs)
    assert load_npz(tmp_path / "soft.npz").label_kind == "prob"
    np.savez(tmp_path / "obj.npz", images=np.array([object()], dtype=object), labels=onehot)
    with pytest.raises(ELFError, match="unpickling"):
        load_npz(tmp_path / "obj.npz")
    np.savez(tmp_path / "keys.npz", a=x, b=onehot)
    with pytest.raises(ELFError, match="images_key"):
        load_npz(tmp_path / "keys.npz")
    assert load_npz(tmp_path / "keys.npz", images_key="a", labels_key="b").ipc == IPC


def test_npz_integer_images_are_not_taken_for_normalized_floats(tmp_path):
    """int64 0-255 images used to be cast to float and used as normalized images (values up to 255); uint8 converts."""
    img = np.random.default_rng(0).integers(0, 256, (N, 4, 4, 3)).astype(np.uint8)
    labels = np.eye(K, dtype=np.float32)[_class_major().numpy()]
    np.savez(tmp_path / "int.npz", images=img.astype(np.int64), labels=labels)
    with pytest.raises(ELFError, match=r"int64.*astype\(np.uint8\)"):
        load_npz(tmp_path / "int.npz", normalization=CIFAR10_MTT)
    np.savez(tmp_path / "u8.npz", images=img, labels=labels)
    with pytest.warns(UserWarning, match="uint8"):
        s = load_npz(tmp_path / "u8.npz", normalization=CIFAR10_MTT)
    assert s.images.abs().max() < 3.0
    np.savez(tmp_path / "f64.npz", images=img.astype(np.float64) / 255.0, labels=labels)
    assert load_npz(tmp_path / "f64.npz").images.dtype == torch.float32


def test_npz_label_column_is_class_indices(tmp_path):
    """(N, 1) integer labels are a column of class indices (they were read as one class of logits)."""
    x = np.random.default_rng(0).standard_normal((N, 4, 4, 3)).astype(np.float32)
    np.savez(tmp_path / "col.npz", images=x, labels=_class_major().numpy()[:, None])
    s = load_npz(tmp_path / "col.npz")
    assert s.label_kind == "index" and s.labels.tolist() == _class_major().tolist() and s.num_classes == K


def test_damaged_npz_is_an_elf_error_naming_the_file(tmp_path):
    """A truncated .npz escaped as a bare zipfile.BadZipFile, without the path."""
    p = tmp_path / "kip.npz"
    np.savez(p, images=np.zeros((N, 4, 4, 3), np.float32), labels=np.eye(K, dtype=np.float32)[_class_major().numpy()])
    good = p.read_bytes()
    for cut in (good[: len(good) // 2], good[:100], good[:-10]):
        p.write_bytes(cut)
        with pytest.raises(ELFError, match=rf"{p.name}: the .npz file is truncated or corrupt.*download or copy it again"):
            load_npz(p)
    with pytest.raises(ELFError, match="no such file"):
        load_npz(tmp_path / "missing.npz")


def test_load_image_dir(tmp_path):
    rng = np.random.default_rng(0)
    px = {}
    for c in ("zebra", "apple"):
        (tmp_path / "syn" / c).mkdir(parents=True)
        for i in range(IPC):
            arr = rng.integers(0, 256, (4, 4, 3), dtype=np.uint8)
            Image.fromarray(arr).save(tmp_path / "syn" / c / f"{i}.png")
            px[(c, i)] = arr
    s = load_any(tmp_path / "syn", normalization=CIFAR10_MTT)
    assert s.classes == ["apple", "zebra"] and s.labels.tolist() == [0, 0, 1, 1] and s.ipc == IPC
    expect = CIFAR10_MTT.normalize(torch.from_numpy(px[("zebra", 1)]).permute(2, 0, 1)[None].float() / 255)
    assert torch.allclose(s.images[3:4], expect, atol=1e-6)
    assert s.normalization == CIFAR10_MTT


def test_load_any_unknown(tmp_path):
    (tmp_path / "weird.bin").write_bytes(b"abc")
    with pytest.raises(ELFError, match="Supported"):
        load_any(tmp_path / "weird.bin")
    torch.save([[[torch.zeros(1)]]], tmp_path / "replay_buffer_0.pt")
    with pytest.raises(ELFError, match="load_expert_buffer"):
        load_any(tmp_path / "replay_buffer_0.pt")
    with pytest.raises(ELFError, match="no such file"):
        load_any(tmp_path / "missing.pt")


# ---------------------------------------------------------------------------------------------- expert buffers


def _small_net(bn: bool) -> nn.Module:
    norm = nn.BatchNorm2d(4) if bn else nn.GroupNorm(4, 4, affine=True)
    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), norm, nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, K))


def test_a_buffer_in_another_models_folder_warns(tmp_path):
    """Regression: an instance-norm ConvNet buffer (MTT's <dataset>/<model>/ layout) read as ConvNetBN loaded without a
    word: GroupNorm and BatchNorm parameters have the same shapes."""
    import warnings

    from elf import create_model
    from elf.teacher import teacher_from_expert_buffer

    folder = tmp_path / "CIFAR10" / "ConvNetW8D1"
    folder.mkdir(parents=True)
    snap = [p.detach().clone() for p in create_model("ConvNetW8D1", im_size=(8, 8)).parameters()]
    torch.save([[snap]], folder / "replay_buffer_0.pt")
    images = torch.randn(8, 3, 8, 8)
    with pytest.warns(UserWarning, match="folder named 'ConvNetW8D1'"):
        teacher_from_expert_buffer(folder / "replay_buffer_0.pt", "ConvNetW8D1BN", (3, 8, 8), 10, bn_images=images,
                                   log=lambda s: None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        teacher_from_expert_buffer(folder / "replay_buffer_0.pt", "ConvNetW8D1", (3, 8, 8), 10)
        teacher_from_expert_buffer(folder / "replay_buffer_0.pt", "ConvNetW8D1IN", (3, 8, 8), 10)  # the same network
    # the check builds the folder's model on the meta device: no memory, no draw from the global RNG; never a
    # torchvision/timm name (a folder "torchvision.vit_h_14" would have built a 600M-parameter model)
    big = tmp_path / "torchvision.vit_h_14"
    big.mkdir()
    torch.save([[snap]], big / "replay_buffer_0.pt")
    torch.manual_seed(0)
    teacher_from_expert_buffer(big / "replay_buffer_0.pt", "ConvNetW8D1", (3, 8, 8), 10)
    after_big = torch.rand(1)
    torch.manual_seed(0)
    create_model("ConvNetW8D1", im_size=(8, 8))  # what teacher_from_expert_buffer builds itself
    assert torch.equal(torch.rand(1), after_big)
    torch.manual_seed(0)  # folder ConvNetW8D1, read as ConvNetW8D1IN: the folder's model is built to compare, on meta
    teacher_from_expert_buffer(folder / "replay_buffer_0.pt", "ConvNetW8D1IN", (3, 8, 8), 10)
    assert torch.equal(torch.rand(1), after_big)  # without a draw from the global RNG


def test_expert_buffer_and_parameter_loading(tmp_path):
    torch.manual_seed(0)
    trajectories = []
    for _ in range(2):
        snaps = [[p.detach().clone() for p in _small_net(True).parameters()] for _ in range(3)]
        trajectories.append(snaps)
    torch.save(trajectories, tmp_path / "replay_buffer_0.pt")
    params = load_expert_buffer(tmp_path / "replay_buffer_0.pt", trajectory=1, epoch=2)
    assert all(torch.equal(a, b) for a, b in zip(params, trajectories[1][2]))
    # the default is ELF's: the last trajectory (its script takes buffer[-1]), its last snapshot
    assert all(torch.equal(a, b) for a, b in zip(load_expert_buffer(tmp_path / "replay_buffer_0.pt"), trajectories[-1][-1]))
    with pytest.raises(ELFError, match="holds 2 trajectories"):
        load_expert_buffer(tmp_path / "replay_buffer_0.pt", trajectory=2)
    with pytest.raises(ELFError, match="holds 3 snapshots"):
        load_expert_buffer(tmp_path / "replay_buffer_0.pt", epoch=3)

    model = load_parameters_into(_small_net(True), params)
    assert all(torch.equal(p, t) for p, t in zip(model.parameters(), params))
    with pytest.raises(ELFError, match=r"'0.weight'.*\(4, 3, 3, 3\).*\(4, 3, 5, 5\)"):
        load_parameters_into(_small_net(True), [torch.zeros(4, 3, 5, 5)] + params[1:])
    with pytest.raises(ELFError, match="5 tensors but the model has 6.*'5.bias'"):
        load_parameters_into(_small_net(True), params[:-1])
    with pytest.raises(ELFError, match="7 tensors"):
        load_parameters_into(_small_net(True), params + [torch.zeros(1)])


def test_recompute_bn_stats():
    torch.manual_seed(0)
    model = _small_net(True)
    bn = model[1]
    assert torch.equal(bn.running_mean, torch.zeros(4))  # fresh: what a teacher loaded from a buffer would keep
    x = torch.randn(300, 3, 6, 6) * 2 + 1
    out = recompute_bn_stats(model, x, batch_size=100)
    assert out is model and not model.training and bn.momentum == 0.1
    with torch.no_grad():
        feats = model[0](x)
    assert torch.allclose(bn.running_mean, feats.mean((0, 2, 3)), atol=1e-4)
    # cumulative average of per-batch unbiased variances ~ the overall variance
    assert torch.allclose(bn.running_var, feats.var((0, 2, 3)), rtol=0.05)
    assert not recompute_bn_stats(_small_net(False), x).training
    # regression: class-major images (as per_class returns them) gave one-class batches, whose variances leave out
    # the variance between the classes
    torch.manual_seed(0)
    classes = torch.arange(3).repeat_interleave(100)
    x = torch.randn(300, 3, 6, 6) + 4 * classes.view(-1, 1, 1, 1).float()
    recompute_bn_stats(model, x, batch_size=100)
    with torch.no_grad():
        feats = model[0](x)
    assert torch.allclose(bn.running_var, feats.var((0, 2, 3)), rtol=0.1)


# ---------------------------------------------------------------------------------------------- malicious pickles


class _Evil:
    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_malicious_pickles_are_refused(tmp_path):
    marker = tmp_path / "PWNED"
    evil = _Evil(str(marker))
    d = tmp_path / "mtt"
    d.mkdir()
    torch.save(evil, d / "images_best.pt")
    torch.save(_class_major(), d / "labels_best.pt")
    dc = tmp_path / "res_DM_CIFAR10_ConvNet_2ipc.pt"
    torch.save({"data": [[_images(), _class_major()]], "accs_all_exps": {"ConvNet": [evil]}}, dc)
    buf = tmp_path / "replay_buffer_0.pt"
    torch.save([[[torch.zeros(1), evil]]], buf)
    lbl = tmp_path / "mtt2"
    lbl.mkdir()
    torch.save(_images(), lbl / "images_best.pt")
    torch.save(evil, lbl / "labels_best.pt")
    calls = [
        lambda: load_mtt(d),
        lambda: load_any(d / "images_best.pt"),
        lambda: load_mtt(lbl),
        lambda: load_dc_result(dc),
        lambda: load_any(dc),
        lambda: load_expert_buffer(buf),
    ]
    for call in calls:
        with pytest.raises(ELFError, match="refused"):
            call()
        assert not marker.exists()


def test_load_tensor_pair_formats(tmp_path):
    from elf.io import load_tensor_pair

    x, y = torch.randn(4, 3, 2, 2), torch.tensor([0, 0, 1, 1])
    torch.save({"images": x, "labels": y}, tmp_path / "d.pt")
    torch.save((x.double(), y), tmp_path / "p.pt")
    save_synthetic(tmp_path / "s.safetensors", SyntheticSet(x, y))
    for name in ("d.pt", "p.pt", "s.safetensors"):
        images, labels = load_tensor_pair(tmp_path / name)
        assert images.dtype == torch.float32 and torch.allclose(images, x) and torch.equal(labels, y), name
    torch.save({"weights": x}, tmp_path / "w.pt")
    with pytest.raises(ELFError, match="expected"):
        load_tensor_pair(tmp_path / "w.pt")


def test_float_images_all_in_unit_range_warn(tmp_path):
    """A float (images, labels) pair in [0, 1] (IDC's data.pt holds un-normalized images) was taken for normalized
    images without a word; normalized images, and images declared un-normalized, load quietly."""
    import warnings as w

    from elf.io import load_tensor_pair
    from elf.pixel_space import get_normalization

    x = torch.rand(20, 3, 8, 8)
    torch.save([x, torch.arange(20) % K], tmp_path / "data.pt")
    with pytest.warns(UserWarning, match=r"in \[0, 1\].*un-normalized"):
        load_tensor_pair(tmp_path / "data.pt", CIFAR10_MTT)
    with w.catch_warnings():
        w.simplefilter("error")
        load_tensor_pair(tmp_path / "data.pt", get_normalization("none"))
        torch.save([CIFAR10_MTT.normalize(x), torch.arange(20) % K], tmp_path / "norm.pt")
        load_tensor_pair(tmp_path / "norm.pt", CIFAR10_MTT)


def test_mtts_images_zca_view_files_are_refused(tmp_path):
    """MTT's images_zca_<it>.pt hold inverse-ZCA images (for viewing); following the missing-labels advice loaded
    them as whitened images."""
    torch.save(_images(), tmp_path / "images_zca_5000.pt")
    torch.save(_class_major(), tmp_path / "labels_5000.pt")
    with pytest.raises(ELFError, match=r"whitening undone.*images_5000.pt"):
        load_mtt(tmp_path / "images_zca_5000.pt", tmp_path / "labels_5000.pt", zca=True)


@pytest.mark.parametrize("legacy", [False, True])
def test_truncated_pt_files_are_called_truncated_not_unsafe(tmp_path, legacy):
    """A cut images_best.pt or replay_buffer_0.pt was "refused" as needing more than tensors, with advice to load it
    with weights_only=False: wrong for a damaged file, and it tells people to turn the safety check off."""
    d = tmp_path / "mtt"
    d.mkdir()
    save = lambda obj, path: torch.save(obj, path, _use_new_zipfile_serialization=not legacy)  # noqa: E731
    save(torch.randn(50, 3, 8, 8), d / "images_best.pt")
    save(_class_major(), d / "labels_best.pt")
    save([[[torch.randn(4, 3, 3, 3), torch.randn(4)] for _ in range(3)]], tmp_path / "replay_buffer_0.pt")
    for path, load in ((d / "images_best.pt", lambda: load_mtt(d)), (tmp_path / "replay_buffer_0.pt",
                                                                     lambda: load_expert_buffer(tmp_path / "replay_buffer_0.pt"))):
        good = path.read_bytes()
        for cut in (b"", good[:100], good[: len(good) // 2], good[:-20]):
            path.write_bytes(cut)
            with pytest.raises(ELFError, match=r"truncated or corrupt.*download or copy it again") as e:
                load()
            assert "weights_only=False" not in str(e.value) and path.name in str(e.value)
        # a legacy (pre-zip) file cut inside its pickle reaches the weights-only unpickler, which refuses the cut
        # global name: indistinguishable from a refusal, so the refusal names damage too
        path.write_bytes(good[:300])
        with pytest.raises(ELFError, match="refused" if legacy else "truncated or corrupt") as e:
            load()
        assert "download or copy it again" in str(e.value)
        path.write_bytes(good)
