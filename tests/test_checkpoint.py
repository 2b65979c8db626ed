"""Checkpoints: safetensors round trip with BatchNorm statistics, safe loading of .pt files, clear errors."""

from __future__ import annotations

import struct
from pathlib import Path

import pytest
import torch

from elf import ELFError, create_model, load_checkpoint, save_checkpoint
from elf.checkpoint import load_state_dict

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _model(name: str = "ConvNetW16BN", seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)
    return create_model(name)


def _x(n: int = 4) -> torch.Tensor:
    return torch.randn(n, 3, 32, 32, generator=torch.Generator().manual_seed(0))


class _Evil:
    """Unpickling this object would create ``marker`` (the payload of a malicious checkpoint)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def test_round_trip_with_batchnorm_running_stats(tmp_path):
    model = _model().train()
    for _ in range(3):
        model(_x())  # moves the running statistics away from their initial values
    assert int(model.features[1].num_batches_tracked) == 3
    path = save_checkpoint(model, tmp_path / "m.safetensors", metadata={"epoch": 30, "note": "teacher"})
    fresh = _model(seed=1)
    assert not torch.equal(fresh.features[1].running_mean, model.features[1].running_mean)
    assert load_checkpoint(fresh, path) is fresh
    state = model.state_dict()
    for key, value in fresh.state_dict().items():
        assert torch.equal(value, state[key]), key
        assert value.dtype == state[key].dtype, key
    assert int(fresh.features[1].num_batches_tracked) == 3
    model.eval()
    fresh.eval()
    with torch.no_grad():
        assert torch.equal(fresh(_x()), model(_x()))
    _, meta = load_state_dict(path)
    assert meta["epoch"] == "30" and meta["note"] == "teacher"
    assert meta["model"] == "ConvNetW16BN"


def test_save_is_atomic_and_overwrites(tmp_path):
    path = tmp_path / "sub" / "m.safetensors"
    save_checkpoint(_model(seed=0), path)
    save_checkpoint(_model(seed=1), path)
    fresh = _model(seed=2)
    load_checkpoint(fresh, path)
    assert torch.equal(fresh.features[0].weight, _model(seed=1).features[0].weight)
    assert [p.name for p in path.parent.iterdir()] == ["m.safetensors"]  # no stray temporary files


def test_wrong_architecture_names_the_mismatch(tmp_path):
    path = save_checkpoint(_model("ConvNetW16BN"), tmp_path / "bn.safetensors")
    with pytest.raises(ELFError) as info:
        load_checkpoint(_model("ConvNetW16"), path)  # instance norm: no running statistics
    msg = str(info.value)
    assert "unexpected" in msg and "features.1.running_mean" in msg
    assert "ConvNetW16BN" in msg  # what the file says it holds
    with pytest.raises(ELFError) as info:
        load_checkpoint(_model("ConvNetW32BN"), path)  # same keys, other shapes
    msg = str(info.value)
    assert "features.0.weight (16, 3, 3, 3) vs (32, 3, 3, 3)" in msg and "more" in msg and "ConvNetW16BN" in msg
    assert "\n" not in msg  # one line (torch's message has a line per mismatched tensor)
    w16 = save_checkpoint(_model("ConvNetW16"), tmp_path / "in.safetensors")
    with pytest.raises(ELFError, match="missing"):
        load_checkpoint(_model("ConvNetW16BN"), w16)


def test_non_strict_load_ignores_extra_keys(tmp_path):
    source = _model("ConvNetW16BN")
    path = save_checkpoint(source, tmp_path / "bn.safetensors")
    target = _model("ConvNetW16", seed=5)
    load_checkpoint(target, path, strict=False)
    assert torch.equal(target.features[0].weight, source.features[0].weight)


@pytest.mark.parametrize("wrap", [None, "state_dict", "model", "net"])
def test_plain_pt_state_dict_loads(tmp_path, wrap):
    source = _model()
    state = source.state_dict()
    path = tmp_path / "m.pt"
    torch.save(state if wrap is None else {wrap: state, "epoch": 3}, path)
    target = _model(seed=9)
    load_checkpoint(target, path)
    for key, value in target.state_dict().items():
        assert torch.equal(value, state[key]), key


def test_a_dataparallel_state_dict_loads(tmp_path):
    """Regression: a state dict saved from nn.DataParallel (the DC code wraps models in it on several GPUs) has every
    key prefixed with "module." and failed with "missing keys"."""
    source = _model()
    torch.save(torch.nn.DataParallel(source).state_dict(), tmp_path / "dp.pt")
    target = load_checkpoint(_model(seed=9), tmp_path / "dp.pt")
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in target.state_dict().items())

    class Wrapper(torch.nn.Module):  # a model whose own keys start with "module.": its files keep the prefix
        def __init__(self) -> None:
            super().__init__()
            self.module = torch.nn.Linear(3, 2)

    wrapped = Wrapper()
    torch.save(wrapped.state_dict(), tmp_path / "w.pt")
    assert torch.equal(load_checkpoint(Wrapper(), tmp_path / "w.pt").module.weight, wrapped.module.weight)


def test_mtt_parameter_list_is_not_a_state_dict(tmp_path):
    path = tmp_path / "list.pt"
    torch.save([p.detach() for p in _model().parameters()], path)
    with pytest.raises(ELFError, match="state dict"):
        load_checkpoint(_model(), path)


def test_malicious_pt_is_refused_without_running_code(tmp_path):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pt"
    state = dict(_model().state_dict())
    state["evil"] = _Evil(marker)
    torch.save(state, path)
    with pytest.raises(ELFError, match="refused"):
        load_checkpoint(_model(), path)
    assert not marker.exists()
    with pytest.raises(ELFError):
        load_state_dict(path)
    assert not marker.exists()
    # the payload is live: unpickling it the unsafe way would have created the marker
    control = tmp_path / "control"
    torch.save({"evil": _Evil(control)}, tmp_path / "control.pt")
    obj = torch.load(tmp_path / "control.pt", weights_only=False)
    obj["evil"].close()
    assert control.exists()


def test_tampered_safetensors_checkpoint_raises(tmp_path):
    path = save_checkpoint(_model(), tmp_path / "m.safetensors")
    raw = bytearray(path.read_bytes())
    (header_len,) = struct.unpack("<Q", raw[:8])
    raw[8 + header_len + 100] ^= 0xFF
    path.write_bytes(bytes(raw))
    with pytest.raises(ELFError, match="checksum"):
        load_checkpoint(_model(), path)


def test_truncated_checkpoint_raises(tmp_path):
    path = save_checkpoint(_model(), tmp_path / "m.safetensors")
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(ELFError):
        load_checkpoint(_model(), path)


@pytest.mark.parametrize("name", ["missing.safetensors", "missing.pt", "missing.pth"])
def test_missing_checkpoint_file(tmp_path, name):
    with pytest.raises(ELFError, match="no such file"):
        load_checkpoint(_model(), tmp_path / name)


def test_written_files_get_umask_permissions(tmp_path):
    """Regression: atomic writes used mkstemp's 0600 mode, so caches and checkpoints were private to their writer."""
    import os
    import stat

    from elf.fileio import atomic_write

    old = os.umask(0o022)
    try:
        path = atomic_write(tmp_path / "f.txt", lambda p: open(p, "w").write("x"))
    finally:
        os.umask(old)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644


def test_atomic_write_flushes_the_file_to_disk_before_the_rename(tmp_path, monkeypatch):
    """Without fsync, a power loss right after the rename can leave an empty file under the final name."""
    import os

    from elf.fileio import atomic_write

    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: events.append("fsync") or real_fsync(fd))
    monkeypatch.setattr(os, "replace", lambda a, b: events.append("replace") or real_replace(a, b))
    atomic_write(tmp_path / "f.json", lambda p: open(p, "w").write("{}"))
    # the folder is flushed after the rename too (POSIX), or a power loss can drop the rename
    want = ["fsync", "replace", "fsync"] if hasattr(os, "O_DIRECTORY") else ["fsync", "replace"]
    assert events == want and (tmp_path / "f.json").read_text() == "{}"
