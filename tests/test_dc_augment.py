"""DC's per-image augmentation (elf/dc_augment.py): each op against a per-image loop written from DC's description,
its use through protocols (preset dc-aug), the trainer, batched seeds and the CLI."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from elf import ELFError, ELFTrainer
from elf.augment import DSA
from elf.dc_augment import DCAugment, make_augmentation
from elf.protocol import get_protocol

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _images(n: int = 8, c: int = 3, h: int = 10, w: int = 10) -> torch.Tensor:
    return torch.randn(n, c, h, w, generator=torch.Generator().manual_seed(0))


def _reference_crop(x: torch.Tensor, shift: torch.Tensor, crop: int) -> torch.Tensor:
    """DC's cropfun, one image at a time: a canvas filled with the batch's channel means, the image in its middle,
    the window at the drawn offsets."""
    n, c, h, w = x.shape
    mean = [float(x[:, ch].mean()) for ch in range(c)]
    out = x.clone()
    for i in range(n):
        canvas = torch.zeros(c, h + 2 * crop, w + 2 * crop)
        for ch in range(c):
            canvas[ch] = mean[ch]
        canvas[:, crop:crop + h, crop:crop + w] = x[i]
        r, col = int(shift[i, 0]), int(shift[i, 1])
        out[i] = canvas[:, r:r + h, col:col + w]
    return out


def test_crop_matches_dc_per_image_loop_and_covers_every_offset() -> None:
    x = _images(64)
    aug = DCAugment("crop")
    s = aug.sample(x.shape, generator=torch.Generator().manual_seed(1))
    assert torch.equal(aug.apply(x, s), _reference_crop(x, s.shift, 4))
    assert set(s.shift.flatten().tolist()) == set(range(8))  # offsets 0..2*crop-1: shifts -4..+3, as DC draws them
    assert not torch.equal(aug.apply(x, s), x)


def test_noise_adds_the_drawn_noise_and_scale_matches_dc_per_image_loop() -> None:
    x = _images()
    noisy = DCAugment("noise")
    s = noisy.sample(x.shape, generator=torch.Generator().manual_seed(2))
    assert torch.equal(noisy.apply(x, s), x + s.noise) and 0 < s.noise.abs().max() < 0.01  # 0.001 * N(0, 1)
    scaled = DCAugment("scale")
    s = scaled.sample(x.shape, generator=torch.Generator().manual_seed(3))
    out = scaled.apply(x, s)
    assert s.size.min() >= 8 and s.size.max() <= 12  # int(U(0.8, 1.2) * 10)
    for i, (h, w) in enumerate(s.size.tolist()):  # DC's scalefun
        tmp = F.interpolate(x[i:i + 1], [h, w])[0]
        m = max(h, w, 10)
        canvas = torch.zeros(3, m, m)
        canvas[:, int((m - h) / 2):int((m - h) / 2) + h, int((m - w) / 2):int((m - w) / 2) + w] = tmp
        assert torch.equal(out[i], canvas[:, int((m - 10) / 2):int((m - 10) / 2) + 10, int((m - 10) / 2):int((m - 10) / 2) + 10])


def test_each_image_gets_one_op_chosen_per_image() -> None:
    x = _images(64)
    aug = DCAugment("crop_noise")
    s = aug.sample(x.shape, generator=torch.Generator().manual_seed(4))
    out = aug.apply(x, s)
    cropped, noised = _reference_crop(x, s.shift, 4), x + s.noise
    for i in range(len(x)):
        assert torch.equal(out[i], cropped[i] if s.choice[i] == 0 else noised[i])
    assert 0 < int(s.choice.sum()) < len(x)  # both ops drawn in one batch
    again = aug.sample(x.shape, generator=torch.Generator().manual_seed(4))
    assert torch.equal(aug.apply(x, again), out)  # a seeded generator repeats the draw


def test_make_augmentation_and_protocol_checks() -> None:
    assert make_augmentation(None) is None and make_augmentation("none") is None
    assert isinstance(make_augmentation("dc:crop_noise"), DCAugment)
    assert isinstance(make_augmentation("flip", seed=0), DSA)
    p = get_protocol("dc-aug")
    assert (p.augment, p.epochs, p.lambda_front, p.lambda_rear) == ("dc:crop_noise", 1000, 0.0, 0.0)
    assert get_protocol("dc").augment is None and get_protocol("dc").epochs == 300
    with pytest.raises(ELFError, match="'rotate'.*not implemented"):
        get_protocol("dc-aug", augment="dc:crop_rotate")
    with pytest.raises(ELFError, match="unknown op"):
        get_protocol("dc-aug", augment="dc:crop_flip")
    with pytest.raises(ELFError, match="align_targets needs a DSA strategy"):
        get_protocol("dc-aug", align_targets=True)
    with pytest.raises(ELFError, match="unknown DSA op"):  # a bad DSA strategy is refused when the protocol is made
        get_protocol("elf", augment="color_bogus")


def _trainer(**kw: object) -> ELFTrainer:
    from toy_data import lifted_channel_data

    x, y = lifted_channel_data(12, 0, 3, 16)
    return ELFTrainer("ConvNetW16BN", x, y, protocol="dc-aug", epochs=3, batch_size=5, device="cpu", progress=False,
                      log_every=1, **kw)  # type: ignore[arg-type]


def test_the_trainer_trains_with_dc_augmentation_repeatably_and_batched_seeds_agree(monkeypatch) -> None:
    from toy_data import lifted_channel_data

    test = lifted_channel_data(30, 1, 3, 16)
    calls: list[int] = []
    apply = DCAugment.apply
    monkeypatch.setattr(DCAugment, "apply", lambda self, x, s: calls.append(len(x)) or apply(self, x, s))
    seq = _trainer().run(*test, [0, 1])
    assert calls == [5, 5, 2] * 4 * 2  # every batch of every epoch (3 + 1 extra) of both seeds
    assert seq.accuracies == _trainer().run(*test, [0, 1]).accuracies
    plain = ELFTrainer("ConvNetW16BN", *lifted_channel_data(12, 0, 3, 16), protocol="dc", epochs=3, batch_size=5,
                       device="cpu", progress=False, log_every=1).fit(0)
    assert [r["loss"] for r in plain] != [r["loss"] for r in _trainer().fit(0)]
    bat = _trainer().run(*test, [0, 1], batched=True)
    assert bat.data["batched"]["seeds"] == 2 and bat.accuracies == seq.accuracies
    for hs, hb in zip(seq.histories, bat.histories):
        assert [r["loss"] for r in hb] == pytest.approx([r["loss"] for r in hs], rel=1e-4)


def test_cli_augment_option(tmp_path) -> None:
    import argparse

    from elf.cli import _protocol_overrides

    ns = argparse.Namespace(augment="dc:crop_noise", no_augment=False)
    assert _protocol_overrides(ns) == {"augment": "dc:crop_noise"}
    assert _protocol_overrides(argparse.Namespace(augment="none", no_augment=False)) == {"augment": None}
    with pytest.raises(ELFError, match="--augment and --no-augment"):
        _protocol_overrides(argparse.Namespace(augment="flip", no_augment=True))
