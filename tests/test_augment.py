"""Tests for elf.augment (Differentiable Siamese Augmentation). Fast, CPU only (one optional CUDA test)."""

from __future__ import annotations

import copy
import math
import pickle

import pytest
import torch

from elf.augment import AUGMENT_OPS, DSA, OFFICIAL_STRATEGY, DSAParams, DSASample, parse_strategy
from elf.errors import ELFError


def _images(n: int = 6, c: int = 3, h: int = 16, w: int = 16, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, h, w, generator=g)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


# --------------------------------------------------------------------------- parameters and parsing

def test_official_params() -> None:
    p = DSAParams()
    assert (p.prob_flip, p.ratio_scale, p.ratio_rotate, p.ratio_crop_pad) == (0.5, 1.2, 15.0, 0.125)
    assert (p.ratio_cutout, p.brightness, p.saturation, p.contrast) == (0.5, 1.0, 2.0, 0.5)
    with pytest.raises(Exception):
        p.prob_flip = 0.1  # type: ignore[misc]  # frozen


@pytest.mark.parametrize(
    "kwargs", [{"prob_flip": 1.5}, {"ratio_cutout": -0.1}, {"brightness": float("nan")}, {"ratio_scale": 0.0}]
)
def test_bad_params(kwargs: dict) -> None:
    with pytest.raises(ELFError):
        DSAParams(**kwargs)


def test_parse_strategy() -> None:
    assert parse_strategy(OFFICIAL_STRATEGY) == AUGMENT_OPS
    assert parse_strategy("flip") == ("flip",)
    assert parse_strategy(None) == () and parse_strategy("none") == () and parse_strategy("None") == ()


def test_unknown_op_lists_valid_ones() -> None:
    with pytest.raises(ELFError) as info:
        DSA("color_blur")
    msg = str(info.value)
    assert "blur" in msg and all(op in msg for op in AUGMENT_OPS)
    with pytest.raises(ELFError):
        DSA("color__crop")
    with pytest.raises(ELFError):
        DSA(mode="X")


# --------------------------------------------------------------------------- basic behaviour

@pytest.mark.parametrize("mode", ["S", "M"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_shape_dtype(mode: str, dtype: torch.dtype) -> None:
    x = _images(h=12, w=20).to(dtype)
    dsa = DSA(mode=mode, seed=0)
    for _ in range(8):
        y = dsa(x, _gen(1))
        assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
        assert torch.isfinite(y).all()


@pytest.mark.parametrize("strategy", [None, "none", "None", ""])
def test_identity(strategy: str | None) -> None:
    x = _images()
    dsa = DSA(strategy)
    assert not dsa.enabled
    assert dsa(x) is x
    assert dsa.apply(x, dsa.sample(x.shape)) is x


def test_determinism() -> None:
    x = _images(n=8)
    for mode in ("S", "M"):
        outs = [DSA(mode=mode, seed=5)(x, _gen(7)) for _ in range(2)]
        assert torch.equal(outs[0], outs[1])
        # Several calls in sequence repeat too.
        a, b = DSA(mode=mode, seed=5), DSA(mode=mode, seed=5)
        ga, gb = _gen(3), _gen(3)
        for _ in range(6):
            assert torch.equal(a(x, ga), b(x, gb))
    # Different per-sample seeds -> different output (every op is random at these ranges).
    for op in AUGMENT_OPS:
        dsa = DSA(op)
        assert not torch.equal(dsa(x, _gen(1)), dsa(x, _gen(2))), op
    # Different op seeds -> a different sequence of ops.
    seq = [[DSA(seed=s).sample(x.shape).ops for _ in range(20)] for s in (0, 1)]
    assert seq[0] != seq[1]


def test_global_rng_reproducible() -> None:
    x = _images()
    torch.manual_seed(123)
    a = [DSA()(x) for _ in range(4)]
    torch.manual_seed(123)
    b = [DSA()(x) for _ in range(4)]
    assert all(torch.equal(u, v) for u, v in zip(a, b))


def test_op_generator_argument() -> None:
    x = _images()
    dsa = DSA(seed=0)
    a = dsa(x, _gen(1), op_generator=_gen(9))
    b = DSA(seed=99)(x, _gen(1), op_generator=_gen(9))
    assert torch.equal(a, b)


def test_copy_and_pickle_keep_op_generator_state() -> None:
    x = _images()
    dsa = DSA(seed=11)
    dsa(x, _gen(0))
    for clone in (copy.deepcopy(dsa), pickle.loads(pickle.dumps(dsa))):
        assert clone.sample(x.shape).ops == copy.deepcopy(dsa).sample(x.shape).ops
    ops_a = [copy.deepcopy(dsa).sample(x.shape).ops for _ in range(3)]
    assert len(set(ops_a)) == 1


@pytest.mark.parametrize("op", AUGMENT_OPS)
def test_gradient_flows(op: str) -> None:
    x = _images().requires_grad_(True)
    sample = DSA(op).sample(x.shape, generator=_gen(0))
    y = DSA(op).apply(x, sample)
    (y * torch.randn_like(y)).sum().backward()
    assert x.grad is not None and torch.isfinite(x.grad).all() and x.grad.abs().sum() > 0


def test_gradient_full_strategy() -> None:
    x = _images().requires_grad_(True)
    DSA(mode="M")(x, _gen(0)).square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0


# --------------------------------------------------------------------------- each op on constructed inputs

def test_flip() -> None:
    x = _images(n=4)
    dsa = DSA("flip")
    s = DSASample(ops=("flip",), flip=torch.tensor([True, False, True, False]))
    y = dsa.apply(x, s)
    for i in range(4):
        expected = x[i].flip(-1) if i % 2 == 0 else x[i]
        assert torch.equal(y[i], expected)
    # Sampled: each image is either flipped or untouched, and the frequency is about prob_flip.
    x = _images(n=400, h=4, w=5)
    y = dsa(x, _gen(0))
    flipped = (y == x.flip(-1)).flatten(1).all(1)
    same = (y == x).flatten(1).all(1)
    assert bool((flipped | same).all())
    assert 140 < int(flipped.sum()) < 260
    never = DSA("flip", DSAParams(prob_flip=0.0))(x, _gen(0))
    assert torch.equal(never, x)


def _shift_reference(img: torch.Tensor, dy: int, dx: int) -> torch.Tensor:
    c, h, w = img.shape
    out = torch.zeros_like(img)
    for i in range(h):
        for j in range(w):
            if 0 <= i + dy < h and 0 <= j + dx < w:
                out[:, i, j] = img[:, i + dy, j + dx]
    return out


def test_crop_integer_shift_zero_fill() -> None:
    x = _images(n=4, h=8, w=10) + 10.0  # no zeros in the image
    shifts = torch.tensor([[0, 0], [2, -3], [-1, 4], [-2, 1]])
    y = DSA("crop").apply(x, DSASample(ops=("crop",), crop=shifts))
    for i in range(4):
        assert torch.equal(y[i], _shift_reference(x[i], *shifts[i].tolist()))


def test_crop_sampled_range() -> None:
    h, w = 32, 24
    s = DSA("crop").sample((2000, 3, h, w), generator=_gen(0))
    assert s.crop is not None and s.crop.dtype == torch.int64
    sh, sw = int(h * 0.125 + 0.5), int(w * 0.125 + 0.5)  # 4 and 3
    assert s.crop[:, 0].min() == -sh and s.crop[:, 0].max() == sh
    assert s.crop[:, 1].min() == -sw and s.crop[:, 1].max() == sw
    # Values of a sampled crop are a shifted copy: each output pixel is 0 or the input pixel at the shift.
    x = torch.arange(1.0, 1.0 + 3 * h * w).view(1, 3, h, w).repeat(5, 1, 1, 1)
    sample = DSA("crop").sample(x.shape, generator=_gen(1))
    y = DSA("crop").apply(x, sample)
    for i in range(5):
        assert torch.equal(y[i], _shift_reference(x[i], *sample.crop[i].tolist()))  # type: ignore[index]


def _cutout_reference(h: int, w: int, cy: int, cx: int, size_h: int, size_w: int) -> torch.Tensor:
    keep = torch.ones(h, w)
    top, left = cy - size_h // 2, cx - size_w // 2
    for i in range(max(0, top), min(h, top + size_h)):
        for j in range(max(0, left), min(w, left + size_w)):
            keep[i, j] = 0
    return keep


def test_cutout_square() -> None:
    h, w = 16, 12
    x = _images(n=4, h=h, w=w) + 10.0
    centres = torch.tensor([[8, 6], [0, 0], [16, 12], [3, 11]])
    y = DSA("cutout").apply(x, DSASample(ops=("cutout",), cutout=centres))
    size_h, size_w = int(h * 0.5 + 0.5), int(w * 0.5 + 0.5)  # 8, 6
    for i in range(4):
        keep = _cutout_reference(h, w, *centres[i].tolist(), size_h, size_w)
        assert torch.equal(y[i], x[i] * keep)
        zeros = (y[i] == 0).all(0)
        assert torch.equal(zeros, keep == 0)
    # A centred cut-out zeroes exactly size_h x size_w pixels; a corner one is clipped.
    assert int((y[0] == 0).all(0).sum()) == size_h * size_w
    assert int((y[1] == 0).all(0).sum()) == (size_h // 2) * (size_w // 2)


def test_cutout_sampled() -> None:
    h = w = 9  # odd size: side int(4.5 + 0.5) = 5, centres in [0, h - 1]
    s = DSA("cutout").sample((3000, 1, h, w), generator=_gen(0))
    assert s.cutout is not None
    assert int(s.cutout.min()) == 0 and int(s.cutout.max()) == h - 1
    h = w = 8  # even side 4: centres in [0, h]
    s = DSA("cutout").sample((3000, 1, h, w), generator=_gen(0))
    assert int(s.cutout.min()) == 0 and int(s.cutout.max()) == h  # type: ignore[union-attr]
    x = torch.ones(50, 2, h, w)
    sample = DSA("cutout").sample(x.shape, generator=_gen(3))
    y = DSA("cutout").apply(x, sample)
    for i in range(50):
        keep = _cutout_reference(h, w, *sample.cutout[i].tolist(), 4, 4)  # type: ignore[index]
        assert torch.equal(y[i], x[i] * keep)
        assert (y[i] == 0).all(0).sum() > 0


def test_color_formula() -> None:
    x = _images(n=3)
    b = torch.tensor([0.3, -0.2, 0.0])
    s = torch.tensor([1.5, 0.0, 1.0])
    c = torch.tensor([0.7, 1.2, 1.0])
    y = DSA("color").apply(x, DSASample(ops=("color",), brightness=b, saturation=s, contrast=c))
    for i in range(3):
        z = x[i] + b[i]
        m = z.mean(0, keepdim=True)
        z = (z - m) * s[i] + m
        m = z.mean()
        z = (z - m) * c[i] + m
        torch.testing.assert_close(y[i], z)
    # Neutral parameters are the identity.
    one = torch.ones(3)
    y = DSA("color").apply(x, DSASample(ops=("color",), brightness=one * 0, saturation=one, contrast=one))
    torch.testing.assert_close(y, x)


def test_color_sampled_ranges() -> None:
    s = DSA("color").sample((5000, 3, 4, 4), generator=_gen(0))
    assert s.brightness is not None and s.saturation is not None and s.contrast is not None
    assert -0.5 <= float(s.brightness.min()) < -0.45 and 0.45 < float(s.brightness.max()) <= 0.5
    assert 0.0 <= float(s.saturation.min()) < 0.05 and 1.95 < float(s.saturation.max()) <= 2.0
    assert 0.5 <= float(s.contrast.min()) < 0.55 and 1.45 < float(s.contrast.max()) <= 1.5


def test_scale_and_rotate_identity_params() -> None:
    x = _images(n=3, h=10, w=14)
    ones = torch.ones(3, 2)
    y = DSA("scale").apply(x, DSASample(ops=("scale",), scale=ones))
    torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)
    y = DSA("rotate").apply(x, DSASample(ops=("rotate",), rotate=torch.zeros(3)))
    torch.testing.assert_close(y, x, atol=1e-5, rtol=1e-5)


def test_scale_and_rotate_geometry() -> None:
    h = w = 9
    x = torch.zeros(1, 1, h, w)
    x[0, 0, 4, 8] = 1.0  # a point on the right edge, middle row
    # 90 degrees (square image, align_corners=True: exact): the point moves to the top or bottom edge centre.
    y = DSA("rotate").apply(x, DSASample(ops=("rotate",), rotate=torch.tensor([90.0])))
    assert y.sum().item() == pytest.approx(1.0, abs=1e-5)
    peak = divmod(int(y.flatten().argmax()), w)
    assert peak in {(0, 4), (8, 4)}
    # Scale 2 along the width: the output samples input x-coordinate 2u, so the edge point moves to the middle
    # of the right half, and the outer half is zero padding.
    y = DSA("scale").apply(x, DSASample(ops=("scale",), scale=torch.tensor([[2.0, 1.0]])))
    assert y[0, 0, 4, 6].item() == pytest.approx(1.0, abs=1e-5)
    assert y.sum().item() == pytest.approx(1.0, abs=1e-5)
    s = DSA("scale_rotate", mode="M").sample((4000, 1, 4, 4), generator=_gen(0))
    assert s.scale is not None and s.rotate is not None
    assert 1 / 1.2 <= float(s.scale.min()) and float(s.scale.max()) <= 1.2
    assert -15.0 <= float(s.rotate.min()) < -14.9 and 14.9 < float(s.rotate.max()) <= 15.0


# --------------------------------------------------------------------------- modes and siamese use

def test_mode_s_applies_exactly_one_op() -> None:
    x = _images(n=4)
    dsa = DSA(seed=0)
    seen = set()
    for i in range(60):
        s = dsa.sample(x.shape, generator=_gen(i))
        assert len(s.ops) == 1 and s.ops[0] in AUGMENT_OPS
        present = {
            name
            for name in ("brightness", "saturation", "contrast", "crop", "cutout", "flip", "scale", "rotate")
            if getattr(s, name) is not None
        }
        expected = {"brightness", "saturation", "contrast"} if s.ops[0] == "color" else {s.ops[0]}
        assert present == expected
        seen.add(s.ops[0])
    assert seen == set(AUGMENT_OPS)
    # __call__ equals sample + apply with the same generators.
    a = DSA(seed=4)(x, _gen(2))
    d = DSA(seed=4)
    b = d.apply(x, d.sample(x.shape, x.device, _gen(2)))
    assert torch.equal(a, b)


def test_mode_m_applies_every_op_in_order() -> None:
    x = _images(n=4)
    dsa = DSA("flip_crop", mode="M")
    s = dsa.sample(x.shape, generator=_gen(0))
    assert s.ops == ("flip", "crop")
    # apply() follows the sample's op list, so build one-op samples for the step-by-step reference.
    flipped = DSA("flip").apply(x, DSASample(ops=("flip",), flip=s.flip))
    manual = DSA("crop").apply(flipped, DSASample(ops=("crop",), crop=s.crop))
    assert torch.equal(dsa.apply(x, s), manual)


def test_single_op_strategy_in_mode_s() -> None:
    dsa = DSA("rotate", seed=0)
    assert all(dsa.sample((2, 1, 4, 4)).ops == ("rotate",) for _ in range(5))


def test_siamese_same_params_on_two_copies() -> None:
    x = _images(n=5)
    for mode in ("S", "M"):
        dsa = DSA(mode=mode, seed=1)
        for i in range(12):
            s = dsa.sample(x.shape, generator=_gen(i))
            assert torch.equal(dsa.apply(x, s), dsa.apply(x.clone(), s))


def test_batch_shared_params_apply_to_any_batch_size() -> None:
    dsa = DSA(mode="M")
    real = _images(n=7, seed=1)
    syn = _images(n=3, seed=2)
    s = dsa.sample(real.shape, generator=_gen(0), batch_shared=True)
    assert s.batch_size == 1
    out_real, out_syn = dsa.apply(real, s), dsa.apply(syn, s)
    assert out_real.shape == real.shape and out_syn.shape == syn.shape
    # Every image gets the same transform: augmenting an image alone gives the same result.
    torch.testing.assert_close(out_real[2:3], dsa.apply(real[2:3], s))
    torch.testing.assert_close(out_syn[0:1], dsa.apply(syn[0:1], s))
    # Per-sample parameters do not fit another batch size.
    per_sample = dsa.sample(real.shape, generator=_gen(0))
    with pytest.raises(ELFError):
        dsa.apply(syn, per_sample)


def test_input_validation() -> None:
    dsa = DSA("flip")
    with pytest.raises(ELFError):
        dsa(torch.zeros(3, 8, 8))
    with pytest.raises(ELFError):
        dsa(torch.zeros(2, 3, 8, 8, dtype=torch.int64))
    with pytest.raises(ELFError):
        dsa.apply(_images(), DSASample(ops=("flip",)))  # missing parameters
    with pytest.raises(ELFError):
        DSA("crop").apply(_images(n=2), DSASample(ops=("crop",), crop=torch.zeros(2, 2)))  # float shifts
    with pytest.raises(ELFError):
        dsa.sample((2, 3, 8, 8), device="meta", generator=_gen(0))  # generator on the wrong device


# --------------------------------------------------------------------------- no host synchronization

def test_no_host_sync_calls(monkeypatch: pytest.MonkeyPatch) -> None:
    x = _images(n=4).requires_grad_(True)
    dsa = DSA(seed=0)
    dsa_m = DSA(mode="M")

    def forbidden(*args, **kwargs):
        raise AssertionError("host synchronization inside DSA")

    for name in ("item", "tolist", "cpu", "numpy", "__bool__", "nonzero"):
        monkeypatch.setattr(torch.Tensor, name, forbidden)
    for i in range(30):
        dsa(x, _gen(i))
        dsa(x, _gen(i), batch_shared=True)
    out = dsa_m(x, _gen(0))
    monkeypatch.undo()
    out.sum().backward()
    assert x.grad is not None


def test_works_on_meta_device() -> None:
    # The meta device has no data at all: any read of a tensor value (a host sync on a GPU) would fail here.
    x = torch.empty(4, 3, 8, 8, device="meta")
    for mode in ("S", "M"):
        dsa = DSA(mode=mode, seed=0)
        for _ in range(12):
            y = dsa(x)
            assert y.shape == x.shape and y.device.type == "meta"


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_no_sync() -> None:
    x = torch.randn(8, 3, 32, 32, device="cuda", requires_grad=True)
    gen = torch.Generator(device="cuda").manual_seed(0)
    dsa_s, dsa_m = DSA(seed=0), DSA(mode="M")
    dsa_s(x, gen), dsa_m(x, gen)  # warm up (lazy initialization may sync)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        for _ in range(20):
            dsa_s(x, gen)
        y = dsa_m(x, gen)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    y.sum().backward()
    a = DSA(seed=3)(x, torch.Generator(device="cuda").manual_seed(1))
    b = DSA(seed=3)(x, torch.Generator(device="cuda").manual_seed(1))
    assert torch.equal(a, b)
    with pytest.raises(ELFError):
        dsa_s(x, _gen(0))  # CPU generator for CUDA images
    assert math.isfinite(float(y.sum()))
