"""GLaD: generator-latent parameterization, chunked backward, generators, export."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from elf.data import CIFAR10_MTT
from elf.distill.glad import GLAD_LRS, GeneratorLatentParam, build_glad_param
from elf.distill.generators import SmallGenerator, load_generator, save_generator, train_generator
from elf.errors import ELFError
from elf.io import load_synthetic, save_synthetic

pytestmark = pytest.mark.usefixtures("torch_single_thread")


class BNGenerator(nn.Module):
    """A plain generator (no glad_head/glad_tail) with BatchNorm, cut by split_model."""

    z_dim = 8

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(8, 16 * 4 * 4)
        self.body = nn.Sequential(
            nn.Unflatten(1, (16, 4, 4)), nn.BatchNorm2d(16), nn.ReLU(), nn.Upsample(scale_factor=2.0),
            nn.Conv2d(16, 3, 3, padding=1), nn.Tanh(),
        )

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.body(self.fc(z))


def _small(style_dim: int = 0, seed: int = 0) -> SmallGenerator:
    torch.manual_seed(seed)
    return SmallGenerator(z_dim=16, width=8, image_size=16, style_dim=style_dim)


def _weighted_loss(x: torch.Tensor) -> torch.Tensor:
    """A nonlinear loss that couples images (so a wrong chunk offset shows)."""
    w = torch.linspace(-1.0, 1.0, x.numel()).view_as(x)
    return (x.tanh() * w).sum() + x.mean(0).pow(2).sum()


def _latent_grads(param: GeneratorLatentParam) -> list[torch.Tensor]:
    return [p.grad.clone() for g in param.param_groups() for p in g["params"]]


@pytest.mark.parametrize("style_dim", [0, 6])
@pytest.mark.parametrize("chunk", [1, 3, 4, 10, 32])
def test_chunked_backward_equals_autograd(style_dim: int, chunk: int) -> None:
    param = GeneratorLatentParam(_small(style_dim), "blocks.0", 5, 2, CIFAR10_MTT, chunk_size=chunk)
    assert (param.styles is not None) == (style_dim > 0)
    _weighted_loss(param.images()).backward()
    direct = _latent_grads(param)
    param.zero_grad()
    x = param.images_for_loss()
    assert x.is_leaf and x.requires_grad and x.grad_fn is None
    _weighted_loss(x).backward()
    param.finish_backward(x)
    chunked = _latent_grads(param)
    assert len(direct) == (2 if style_dim else 1)
    for a, b in zip(direct, chunked):
        assert a.abs().sum() > 0
        torch.testing.assert_close(b, a)


def test_chunked_backward_split_model_generator_with_batchnorm() -> None:
    torch.manual_seed(0)
    gen = BNGenerator()
    gen.train()
    param = GeneratorLatentParam(gen, "body.2", 3, 3, None, chunk_size=4)
    param.train()  # the generator must stay in eval mode and frozen
    assert not gen.training and not any(p.requires_grad for p in gen.parameters())
    assert param.features.shape == (9, 16, 4, 4) and param.styles is None
    _weighted_loss(param.images()).backward()
    direct = _latent_grads(param)
    param.zero_grad()
    x = param.images_for_loss()
    _weighted_loss(x).backward()
    param.finish_backward(x)
    torch.testing.assert_close(_latent_grads(param)[0], direct[0])


def test_images_are_generator_output_mapped_to_normalized_space() -> None:
    gen = _small()
    z = torch.randn(6, 16, generator=torch.Generator().manual_seed(3))
    raw = GeneratorLatentParam(gen, "stem", 3, 2, None, latents=z)
    with torch.no_grad():
        expected01 = (gen(z) + 1) / 2
        x01 = raw.images()
    assert x01.shape == (6, 3, 16, 16) and raw.image_shape == (3, 16, 16)
    assert float(x01.min()) >= 0.0 and float(x01.max()) <= 1.0
    torch.testing.assert_close(x01, expected01)
    normed = GeneratorLatentParam(gen, "blocks.1", 3, 2, CIFAR10_MTT, latents=z)
    with torch.no_grad():
        torch.testing.assert_close(normed.images(), CIFAR10_MTT.normalize(expected01), atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(normed.class_images(1), normed.images()[2:4])
    assert normed.labels.tolist() == [0, 0, 1, 1, 2, 2]


def test_seeded_latents_and_split_points() -> None:
    a = GeneratorLatentParam(_small(), None, 2, 2, None, seed=5)
    b = GeneratorLatentParam(_small(), None, 2, 2, None, seed=5)
    c = GeneratorLatentParam(_small(), None, 2, 2, None, seed=6)
    assert a.split_at == "blocks.0" and a.features.shape == (4, 16, 8, 8)
    torch.testing.assert_close(a.features, b.features)
    assert not torch.equal(a.features, c.features)
    with pytest.raises(ELFError, match="no split point"):
        GeneratorLatentParam(_small(), "blocks.9", 2, 2, None)
    with pytest.raises(ELFError, match="latents must be"):
        GeneratorLatentParam(_small(), None, 2, 2, None, latents=torch.zeros(3, 16))
    with pytest.raises(ELFError, match="channels"):
        GeneratorLatentParam(SmallGenerator(z_dim=4, channels=1, width=4, image_size=8), None, 2, 1, CIFAR10_MTT)
    with pytest.raises(ELFError, match="loss.backward"):
        a.finish_backward(a.images_for_loss())


def test_param_groups_and_learning_rates() -> None:
    dm = GeneratorLatentParam(_small(6), None, 2, 1, None)
    groups = dm.param_groups()
    assert [(g["name"], g["lr"], g["momentum"]) for g in groups] == [("features", 10.0, 0.5), ("styles", 0.01, 0.5)]
    assert groups[0]["params"][0] is dm.features and groups[1]["params"][0] is dm.styles
    mtt = GeneratorLatentParam(_small(6), None, 2, 1, None, method="mtt")
    assert [g["lr"] for g in mtt.param_groups()] == list(GLAD_LRS["mtt"]) == [10000.0, 10.0]
    dc = GeneratorLatentParam(_small(), None, 2, 1, None, method="dc", lr_features=2.0, momentum=0.9)
    assert [(g["name"], g["lr"], g["momentum"]) for g in dc.param_groups()] == [("features", 2.0, 0.9)]
    opt = dc.make_optimizer()
    assert opt.param_groups[0]["lr"] == 2.0 and opt.param_groups[0]["momentum"] == 0.9
    with pytest.raises(ELFError, match="no GLaD learning rates"):
        GeneratorLatentParam(_small(), None, 2, 1, None, method="kip")


def test_export_round_trip(tmp_path) -> None:
    param = GeneratorLatentParam(_small(4), None, 3, 2, CIFAR10_MTT, generator_kind="random")
    sset = param.export({"method": "dm"}, lr=0.02)
    assert sset.metadata["parameterization"] == "GLaD"
    assert sset.metadata["generator"] == "SmallGenerator" and sset.metadata["generator_kind"] == "random"
    assert sset.metadata["split_at"] == "blocks.0" and sset.metadata["style"] == "True" and sset.metadata["method"] == "dm"
    back = load_synthetic(save_synthetic(tmp_path / "glad.safetensors", sset))
    torch.testing.assert_close(back.images, param.images().detach())
    assert back.labels.tolist() == [0, 0, 1, 1, 2, 2] and back.ipc == 2 and back.lr == pytest.approx(0.02)
    assert back.normalization == CIFAR10_MTT and back.metadata == sset.metadata


def test_dm_like_iterations_reduce_a_loss_through_the_latents() -> None:
    """The shared distillation loop (images_for_loss -> backward -> finish_backward -> SGD step) moves the
    per-class mean image towards a target."""
    param = GeneratorLatentParam(_small(6), None, 3, 4, CIFAR10_MTT, chunk_size=5, lr_features=0.5, lr_style=0.05)
    target = torch.randn(3, 3, 16, 16, generator=torch.Generator().manual_seed(1)) * 0.5

    def loss_of(x: torch.Tensor) -> torch.Tensor:
        return (x.view(3, 4, 3, 16, 16).mean(1) - target).pow(2).sum()

    opt = param.make_optimizer()
    before = feats0 = None
    for step in range(25):
        x = param.images_for_loss()
        loss = loss_of(x)
        if step == 0:
            before, feats0 = float(loss.detach()), param.features.detach().clone()
        opt.zero_grad()
        loss.backward()
        param.finish_backward(x)
        opt.step()
    with torch.no_grad():
        after = float(loss_of(param.images()))
    assert after < 0.6 * before, (before, after)
    assert not torch.equal(param.features.detach(), feats0)
    assert all(p.grad is None for p in param.generator.parameters())


def test_train_save_load_generator_and_build(tmp_path) -> None:
    gen = torch.Generator().manual_seed(0)
    y = torch.arange(2).repeat_interleave(16)
    base = torch.rand(2, 3, 8, 8, generator=gen)
    x01 = (base[y] + 0.1 * torch.rand(32, 3, 8, 8, generator=gen)).clamp(0, 1)
    x = CIFAR10_MTT.normalize(x01)
    trained = train_generator(x, normalization=CIFAR10_MTT, epochs=4, z_dim=8, width=4, batch_size=8, lr=5e-3, log=None)
    assert len(trained.losses) == 4 and trained.losses[-1] < trained.losses[0]
    assert not trained.generator.training
    path = save_generator(trained.generator, tmp_path / "g.safetensors", encoder=trained.encoder)
    g2, enc2 = load_generator(path, with_encoder=True)
    z = torch.randn(3, 8)
    with torch.no_grad():
        torch.testing.assert_close(g2(z), trained.generator(z))
    assert enc2 is not None
    # a user-constructed module loads the same file
    mine = load_generator(path, SmallGenerator(z_dim=8, width=4, image_size=8))
    with torch.no_grad():
        torch.testing.assert_close(mine(z), g2(z))

    p_ckpt = build_glad_param("checkpoint", 2, 3, CIFAR10_MTT, checkpoint=str(path), real_images=x, real_labels=y, init="real", log=None)
    assert p_ckpt.generator_kind == "checkpoint" and p_ckpt.features.shape[0] == 6
    p_train = build_glad_param("trained", 2, 2, CIFAR10_MTT, image_size=8, real_images=x, train_epochs=1, z_dim=8, width=4, log=None)
    assert p_train.images().shape == (4, 3, 8, 8)
    p_rand = build_glad_param("random", 2, 2, None, image_size=8, z_dim=8, width=4, style_dim=3, method="dc")
    assert [g["lr"] for g in p_rand.param_groups()] == [1.0, 0.001]
    with pytest.raises(ELFError, match="encoder"):
        build_glad_param("random", 2, 2, None, image_size=8, z_dim=8, width=4, init="real", real_images=x, real_labels=y)
    with pytest.raises(ELFError, match="unknown generator kind"):
        build_glad_param("stylegan", 2, 2, None)


def test_recipe_refuses_pixel_options_with_glad() -> None:
    """Regression: --param glad silently ignored --lr-img, --momentum-img, --factor and --init (pixel options)."""
    from elf.distill import DistillRecipe

    DistillRecipe(method="dm", ipc=1, param="glad").check()  # the defaults pass
    for field, value, flag in (("init", "real", "--init"), ("factor", 2, "--factor"), ("lr_img", 5.0, "--lr-img"),
                               ("momentum_img", 0.9, "--momentum-img")):
        with pytest.raises(ELFError, match=f"pixel option\\(s\\) {flag} would be ignored.*--glad-init"):
            DistillRecipe(method="dm", ipc=1, param="glad", **{field: value}).check()  # type: ignore[arg-type]
    DistillRecipe(method="dm", ipc=1, init="noise", factor=2, lr_img=5.0, momentum_img=0.9).check()  # pixels: fine


def test_generators_are_seeded_on_the_cpu_generator_only(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: torch.manual_seed inside a CPU-only fork also reseeded every CUDA generator (not forked)."""
    reseeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", reseeded.append)
    a = build_glad_param("random", 2, 1, None, image_size=8, z_dim=8, width=4, seed=3)
    b = build_glad_param("random", 2, 1, None, image_size=8, z_dim=8, width=4, seed=3)
    assert torch.equal(a.images(), b.images())  # still seeded
    x = torch.rand(8, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    train_generator(x, normalization=None, epochs=1, z_dim=8, width=4, batch_size=8, log=None)
    assert reseeded == []
