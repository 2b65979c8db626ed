"""Dataset distillation: real sampler, pixels (multi-formation), pools (Acc-DD perturbation), DM / gradient matching,
the loop (exact resume), the round trip into ELFTrainer, and `elf distill` on a tiny ImageFolder."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

import elf
from elf.augment import DSA
from elf.cli import main
from elf.data import CIFAR10_MTT
from elf.distill import (
    DistributionMatching,
    EarlyStagePool,
    GradientMatching,
    PerturbedPool,
    PixelParam,
    RandomInitPool,
    RealSampler,
    dc_distance,
    decode_tiles,
    distill,
    encode_tiles,
    filter_normalized_direction,
    perturb_,
)
from elf.errors import ELFError
from elf.io import load_synthetic, save_synthetic

pytestmark = pytest.mark.usefixtures("torch_single_thread")

K, N_PER, SIDE = 3, 12, 16
MODEL = "ConvNetW8D2"


def _real_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """3 classes of 16x16 images whose class shows in one channel's mean; labels interleaved (not class-major)."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(K).repeat(N_PER)
    x = torch.randn(K * N_PER, 3, SIDE, SIDE, generator=g) * 0.5
    x[torch.arange(K * N_PER), labels] += 1.5
    return x, labels


@pytest.fixture(scope="module")
def sampler() -> RealSampler:
    x, y = _real_data()
    return RealSampler(x, y, normalization=CIFAR10_MTT)


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _fixed_pool() -> EarlyStagePool:
    torch.manual_seed(5)
    return EarlyStagePool([elf.create_model(MODEL, num_classes=K, im_size=(SIDE, SIDE))])


def _history(sset: elf.io.SyntheticSet) -> list[float]:
    return [h["loss"] for h in json.loads(sset.metadata["history"]) if "loss" in h]


# ---- real sampler and pixels ---------------------------------------------------------------------------------
def test_real_sampler_batches_are_class_wise_distinct_and_seeded(sampler: RealSampler) -> None:
    x, y = _real_data()
    for c in range(K):
        b = sampler.batch(c, 5, _gen(1))
        assert b.shape == (5, 3, SIDE, SIDE)
        rows = [int(torch.nonzero((x == img).flatten(1).all(1))[0]) for img in b]
        assert all(int(y[r]) == c for r in rows) and len(set(rows)) == 5
        assert torch.equal(b, sampler.batch(c, 5, _gen(1)))
    assert sampler.batch(0, 1000, _gen(0)).shape[0] == N_PER  # a small class gives all it has (as DC's get_images)
    assert sampler.batch_size(0, 1000) == N_PER
    with pytest.raises(ELFError, match="out of range"):
        sampler.batch(K, 2, _gen())
    with pytest.raises(ELFError, match="float tensor"):
        RealSampler(x.to(torch.uint8), y)


def test_pixel_param_init_and_groups(sampler: RealSampler) -> None:
    p = PixelParam(K, 2, (3, SIDE, SIDE), init="real", sampler=sampler, generator=_gen(), lr=0.1, momentum=0.5)
    imgs = p.images()
    assert imgs.shape == (K * 2, 3, SIDE, SIDE) and p.labels.tolist() == [0, 0, 1, 1, 2, 2]
    for i, img in enumerate(imgs.detach()):  # each is a real image of its class
        assert any(torch.equal(img, r) for r in sampler.class_images(int(p.labels[i])))
    exported = p.export()
    with torch.no_grad():
        p.pixels.add_(1.0)
    assert not torch.equal(exported.images, p.images().detach())  # an export is a copy, not a view of the pixels
    (group,) = p.param_groups()
    assert group["name"] == "pixels" and group["lr"] == 0.1 and group["momentum"] == 0.5
    assert p.normalization == CIFAR10_MTT  # taken from the sampler
    noise = PixelParam(K, 2, (3, SIDE, SIDE), init="noise", generator=_gen())
    assert abs(float(noise.pixels.detach().std()) - 1) < 0.2
    with pytest.raises(ELFError, match="needs real images"):
        PixelParam(K, 2, (3, SIDE, SIDE), init="real")
    with pytest.raises(ELFError, match="must divide"):
        PixelParam(K, 1, (3, SIDE, SIDE), init="noise", factor=3)
    with pytest.raises(ELFError, match="distinct real images"):
        PixelParam(K, 4, (3, SIDE, SIDE), sampler=sampler, generator=_gen(), factor=2)  # 16 > 12 per class


def test_multi_formation_layout_and_labels(sampler: RealSampler) -> None:
    # stored image j holds 2x2 tiles; a constant tile decodes to a constant image, so the order is visible
    stored = torch.zeros(2, 1, 4, 4)
    for j in range(2):
        for r in range(2):
            for s in range(2):
                stored[j, 0, 2 * r : 2 * r + 2, 2 * s : 2 * s + 2] = j * 4 + r * 2 + s
    decoded = decode_tiles(stored, 2, (4, 4))
    assert decoded.shape == (8, 1, 4, 4)
    assert torch.allclose(decoded, torch.arange(8.0).view(8, 1, 1, 1).expand(8, 1, 4, 4))
    assert torch.allclose(encode_tiles(decoded, 2), stored)
    p = PixelParam(K, 1, (3, SIDE, SIDE), sampler=sampler, generator=_gen(), factor=2)
    assert p.pixels.shape == (K, 3, SIDE, SIDE) and p.images().shape == (K * 4, 3, SIDE, SIDE)
    assert p.ipc == 4 and p.labels.tolist() == [0] * 4 + [1] * 4 + [2] * 4
    sset = p.export()
    assert sset.ipc == 4 and sset.metadata["factor"] == "2" and sset.metadata["storage_ipc"] == "1"
    # decoded real-initialized images are blurred real images of their class: their class channel is the brightest
    means = p.images().detach().mean((2, 3))
    assert means.argmax(1).tolist() == p.labels.tolist()


# ---- pools ---------------------------------------------------------------------------------------------------
def test_filter_normalized_direction_matches_filter_norms() -> None:
    w = torch.randn(6, 4, 3, 3)
    d = filter_normalized_direction(w, _gen(2))
    assert torch.allclose(d.flatten(1).norm(dim=1), w.flatten(1).norm(dim=1), rtol=1e-5)
    with pytest.raises(ELFError):
        filter_normalized_direction(torch.randn(5), _gen())


def test_perturbation_is_acc_dd() -> None:
    model = elf.create_model(MODEL + "BN", num_classes=K, im_size=(SIDE, SIDE))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    gen = _gen(7)
    replay = _gen(7)
    a, b = perturb_(model, gen)
    assert 0.01 <= abs(float(a)) <= 0.09 and 0.01 <= abs(float(b)) <= 0.09
    torch.rand(2, generator=replay), torch.randint(0, 2, (2,), generator=replay)  # the same draw order
    for name, p in model.named_parameters():
        if p.dim() < 2:
            assert torch.equal(p, before[name]), name  # biases and norm weights untouched
            continue
        d1 = filter_normalized_direction(before[name], replay)
        d2 = filter_normalized_direction(before[name], replay)
        assert torch.allclose(p - before[name], a * d1 + b * d2, atol=1e-6), name
        rel = (p - before[name]).flatten(1).norm(dim=1) / before[name].flatten(1).norm(dim=1)
        assert bool((rel <= abs(float(a)) + abs(float(b)) + 1e-6).all())
    for name, buf in model.named_buffers():
        assert torch.equal(buf, before[name]), name  # BatchNorm statistics untouched
    signs = {(float(x) > 0, float(y) > 0) for x, y in (perturb_(model, _gen(s)) for s in range(40))}
    assert len(signs) == 4  # both signs occur for both coefficients


def test_pools_sample_owned_seeded_models() -> None:
    pool = RandomInitPool(MODEL, 3, K, (SIDE, SIDE))
    m1, m2 = pool.sample(_gen(0)), pool.sample(_gen(0))
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))
    state = torch.random.get_rng_state()
    pool.sample(_gen(1))
    assert torch.equal(state, torch.random.get_rng_state())  # global RNG not disturbed
    fixed = _fixed_pool()
    copy = fixed.sample(_gen())
    with torch.no_grad():
        next(copy.parameters()).add_(1.0)
    assert not torch.equal(next(copy.parameters()), next(fixed.models[0].parameters()))  # the pool's model is intact
    perturbed = PerturbedPool(fixed).sample(_gen(3))
    assert not torch.equal(next(perturbed.parameters()), next(fixed.models[0].parameters()))


def test_early_stage_pool_trains_once_then_loads(tmp_path: Path) -> None:
    x, y = _real_data()
    lines: list[str] = []
    kw = dict(epochs=1, batch_size=12, cache_dir=tmp_path, source_hash="tiny", device="cpu", log=lines.append)
    pool = EarlyStagePool.train(MODEL, x, y, 2, **kw)
    assert len(pool) == 2 and sum("trained" in line for line in lines) == 2
    assert not torch.equal(next(pool.models[0].parameters()), next(pool.models[1].parameters()))  # seeds differ
    again = EarlyStagePool.train(MODEL, x, y, 2, **kw)
    assert sum("loaded" in line for line in lines) == 2
    for m, n in zip(pool.models, again.models):
        assert all(torch.equal(p, q) for p, q in zip(m.state_dict().values(), n.state_dict().values()))
    EarlyStagePool.train(MODEL, x, y, 1, **{**kw, "lr": 0.02})  # other settings: another cache key
    assert sum("trained" in line for line in lines) == 3
    # regression: the same raw data in another pixel space (normalization) loaded the pool trained in the first
    EarlyStagePool.train(MODEL, (x - 0.1) / 1.2, y, 1, **kw)
    assert sum("trained" in line for line in lines) == 4



def test_early_stage_pool_keeps_its_optimizer_through_long_runs(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: the pool's constant-lr protocol re-created SGD (momentum dropped) at the evaluation protocol's
    lr-decay point (epoch epochs // 2 + 1), which runs of >= 5 epochs reach."""
    from elf.trainer import ELFTrainer

    made: list[float] = []
    original = ELFTrainer._optimizer

    def counting(self: ELFTrainer, model: nn.Module, lr: float) -> torch.optim.Optimizer:
        made.append(lr)
        return original(self, model, lr)

    monkeypatch.setattr(ELFTrainer, "_optimizer", counting)
    x, y = _real_data()
    EarlyStagePool.train(MODEL, x, y, 1, epochs=5, batch_size=12, cache_dir=tmp_path, source_hash="tiny", device="cpu")
    assert made == [0.01]  # one optimizer for the whole run, at the constant lr

# ---- objectives ----------------------------------------------------------------------------------------------
def test_siamese_dsa_gives_real_and_synthetic_the_same_augmentation(sampler: RealSampler) -> None:
    obj = DistributionMatching(sampler, _fixed_pool(), batch_real=8)
    assert obj.dsa is not None
    real = sampler.batch(0, 8, _gen())
    ops = set()
    for seed in range(30):
        gen = _gen(seed)
        out_real, out_syn = obj._siamese(real, real[:3].clone(), gen, gen)
        assert torch.equal(out_real[:3], out_syn)  # the same images get exactly the same transform
        ops.add(obj.dsa.sample(real.shape, "cpu", _gen(seed), op_generator=_gen(seed)).ops)
    assert len(ops) >= 4
    s = DSA().sample(real.shape, "cpu", _gen(), batch_shared=True)
    assert s.batch_size == 1


def test_dc_distance_definition() -> None:
    g = [torch.randn(4, 3, 3, 3), torch.randn(4), torch.randn(5, 4)]
    assert float(dc_distance(g, g)) < 1e-5
    flipped = [-g[0], g[1], g[2]]
    assert abs(float(dc_distance(flipped, g)) - 2 * 4) < 1e-4  # 4 output rows at cos = -1
    other_bias = [g[0], torch.randn(4), g[2]]
    assert float(dc_distance(other_bias, g)) < 1e-5  # 1-D tensors are skipped
    with pytest.raises(ELFError):
        dc_distance([torch.randn(3)], [torch.randn(3)])


@pytest.mark.parametrize("kind", ["dm", "dc", "acc-dd"])
def test_loss_decreases(kind: str, sampler: RealSampler) -> None:
    """A fixed network and full-class real batches make the objective deterministic: it must go down."""
    pool = _fixed_pool()
    if kind == "dm":
        obj, lr = DistributionMatching(sampler, pool, batch_real=N_PER, dsa=None), 1.0
    elif kind == "dc":
        obj, lr = GradientMatching(sampler, pool, batch_real=N_PER, dsa=None), 1.0
    else:
        obj, lr = GradientMatching(sampler, pool, batch_real=N_PER, dsa=None, params="conv", distance="mse"), 10.0
    param = PixelParam(K, 2, (3, SIDE, SIDE), init="noise", generator=_gen(), lr=lr, momentum=0.5)
    losses = _history(distill(param, obj, 30, progress=False, log_every=1))
    first, last = np.mean(losses[:5]), np.mean(losses[-5:])
    assert last < 0.7 * first, losses  # measured: DM ~0.04, DC ~0.3, Acc-DD ~0.25


def test_gradient_matching_outer_inner_loop_and_bn(sampler: RealSampler) -> None:
    pool = RandomInitPool(MODEL + "BN", 3, K, (SIDE, SIDE))
    obj = GradientMatching(sampler, pool, batch_real=6, outer_loop=3, inner_loop=1, batch_train=4)
    param = PixelParam(K, 2, (3, SIDE, SIDE), sampler=sampler, generator=_gen(), lr=0.1)
    nets = []
    for step in range(4):
        obj.loss(param.images(), param.labels, step, _gen(step))
        nets.append(obj._net)
    assert nets[0] is nets[1] is nets[2] and nets[3] is not nets[2]  # a new network every outer_loop steps
    bn = next(m for m in nets[3].modules() if isinstance(m, nn.BatchNorm2d))
    assert not bn.training and float(bn.running_var.mean()) != 1.0  # statistics from real data, then frozen
    meta = obj.metadata()
    assert meta["method"] == "dsa" and meta["outer_loop"] == "3" and meta["dsa"].startswith("color")


# ---- loop ----------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("kind", ["dsa-loops", "dm-accdd-pool"])
def test_resume_is_bit_identical(kind: str, sampler: RealSampler, tmp_path: Path) -> None:
    def make() -> tuple[PixelParam, object]:
        param = PixelParam(K, 1, (3, SIDE, SIDE), sampler=sampler, generator=_gen(9), lr=0.1, factor=2 if kind != "dsa-loops" else 1)
        if kind == "dsa-loops":
            obj = GradientMatching(sampler, RandomInitPool(MODEL, 3, K, (SIDE, SIDE)), batch_real=6, outer_loop=2, inner_loop=1)
        else:
            obj = DistributionMatching(sampler, PerturbedPool(_fixed_pool()), batch_real=6)
        return param, obj

    full = distill(*make(), 6, seed=4, progress=False)
    part_dir = tmp_path / "ck"
    distill(*make(), 3, seed=4, progress=False, checkpoint_dir=part_dir)  # "interrupted" after step 3
    resumed = distill(*make(), 6, seed=4, progress=False, checkpoint_dir=part_dir, checkpoint_every=2)
    assert torch.equal(full.images, resumed.images)
    assert not torch.equal(full.images, distill(*make(), 6, seed=5, progress=False).images)
    with pytest.raises(ELFError, match="seed"):
        distill(*make(), 6, seed=3, progress=False, checkpoint_dir=part_dir)
    # regression: the log window in progress was not checkpointed: a run killed mid-window logged (and exported as
    # final_loss) the average of the steps since the resume only
    class Killed(Exception):
        pass

    param, obj = make()
    loss = obj.loss

    def dies_at_step_5(images: torch.Tensor, labels: torch.Tensor, step: int, generator: torch.Generator) -> torch.Tensor:
        if step == 5:
            raise Killed
        return loss(images, labels, step, generator)

    obj.loss = dies_at_step_5  # type: ignore[method-assign]
    kill_dir = tmp_path / "killed"
    with pytest.raises(Killed):
        distill(param, obj, 7, seed=4, progress=False, checkpoint_dir=kill_dir, checkpoint_every=2, log_every=7)
    whole = distill(*make(), 7, seed=4, progress=False, log_every=7)
    again = distill(*make(), 7, seed=4, progress=False, checkpoint_dir=kill_dir, checkpoint_every=2, log_every=7)
    assert torch.equal(whole.images, again.images)
    assert again.metadata["final_loss"] == whole.metadata["final_loss"]
    assert _history(again) == _history(whole)
    # regression: a checkpoint resumed under another lr (or pixel space, or init) continued as one run
    param, obj = make()
    param.lr = 0.2
    with pytest.raises(ELFError, match="another pixel space, initialization or optimizer setting"):
        distill(param, obj, 6, seed=4, progress=False, checkpoint_dir=part_dir)
    param, obj = make()
    param.normalization = elf.pixel_space.IMAGENET
    with pytest.raises(ELFError, match="another pixel space"):
        distill(param, obj, 6, seed=4, progress=False, checkpoint_dir=part_dir)
    # and one past the iterations asked for is not exported as that many
    with pytest.raises(ELFError, match="at step 6, past iterations=4"):
        distill(*make(), 4, seed=4, progress=False, checkpoint_dir=part_dir)


def test_export_round_trip_into_elf_trainer(sampler: RealSampler, tmp_path: Path) -> None:
    param = PixelParam(K, 2, (3, SIDE, SIDE), sampler=sampler, generator=_gen(), lr=1.0)
    obj = DistributionMatching(sampler, RandomInitPool(MODEL, 3, K, (SIDE, SIDE)), batch_real=6)
    seen: list[int] = []
    sset = distill(param, obj, 4, progress=False, eval_fn=lambda s, step: seen.append(step) or len(s), eval_every=2,
                   metadata={"note": "tiny"})
    assert seen == [2, 4]
    meta = sset.metadata
    assert meta["method"] == "dm" and meta["iterations"] == "4" and meta["seed"] == "0" and meta["note"] == "tiny"
    assert meta["pool"] == f"random-init {MODEL}" and meta["source_hash"] == sampler.source_hash
    assert meta["parameterization"] == "PixelParam" and meta["init"] == "real"
    path = save_synthetic(tmp_path / "set.safetensors", sset)
    loaded = load_synthetic(path)
    assert torch.equal(loaded.images, sset.images) and loaded.ipc == 2 and loaded.normalization == CIFAR10_MTT
    trainer = elf.ELFTrainer.from_synthetic(MODEL, loaded, protocol="dm", epochs=1, device="cpu", progress=False)
    history = trainer.fit(0)
    assert np.isfinite(history[-1]["loss"]) and trainer.data_info["method"] == "dm"


# ---- command line --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory, make_image_folder) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("folder"), SIDE, 8, 4)


def test_cli_distill_then_eval(tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data", str(image_folder), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--device", "cpu"]
    out = tmp_path / "dsa.safetensors"
    assert main(["distill", "--method", "dsa", "--ipc", "2", "--iterations", "4", "--model", MODEL, "--batch-real", "4",
                 "--outer-loop", "2", "--inner-loop", "1", "--out", str(out), "--checkpoint-dir", str(tmp_path / "ck"),
                 *data]) == 0
    assert "wrote" in capsys.readouterr().out
    sset = load_synthetic(out)
    assert len(sset) == 6 and sset.classes == ["a", "b", "c"] and sset.normalization == CIFAR10_MTT
    assert sset.metadata["method"] == "dsa" and sset.metadata["iterations"] == "4" and sset.metadata["inner_loop"] == "1"
    assert sset.metadata["data_source_hash"] and "get_loops" in sset.metadata["preset_source"]
    assert (tmp_path / "ck" / "distill_state.safetensors").exists()
    assert main(["eval", "--images", str(out), "--no-elf", "--models", MODEL, "--epochs", "1", "--runs", "1", *data]) == 0
    assert f"| {MODEL} |" in capsys.readouterr().out

    accdd = tmp_path / "dm.safetensors"
    assert main(["distill", "--method", "dm", "--ipc", "1", "--factor", "2", "--iterations", "2", "--model", MODEL,
                 "--batch-real", "4", "--pool", "early", "--pool-size", "2", "--pool-epochs", "1", "--perturb",
                 "--out", str(accdd), *data]) == 0
    meta = load_synthetic(accdd).metadata
    assert meta["factor"] == "2" and "early-stage pool: 2 x" in meta["pool"] and "perturbed" in meta["pool"]
    assert len(list((tmp_path / "cache" / "pools").glob("*/model_*.safetensors"))) == 2


def test_cli_distill_snapshots_record_step_and_wall_time(tmp_path: Path, image_folder: Path) -> None:
    data = ["--data", str(image_folder), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--device", "cpu"]
    out = tmp_path / "dm.safetensors"
    assert main(["distill", "--method", "dm", "--ipc", "1", "--iterations", "5", "--model", MODEL, "--batch-real", "4",
                 "--snapshot-every", "2", "--out", str(out), *data]) == 0
    snaps = sorted(tmp_path.glob("dm.step*.safetensors"))
    assert [p.name for p in snaps] == ["dm.step000002.safetensors", "dm.step000004.safetensors", "dm.step000005.safetensors"]
    times = []
    for p, step in zip(snaps, (2, 4, 5)):
        s = load_synthetic(p)
        assert s.metadata["snapshot_step"] == str(step) and s.classes == ["a", "b", "c"]
        assert s.metadata["method"] == "dm" and s.metadata["seed"] == "0"  # snapshots describe themselves
        assert float(s.metadata["pool_build_time_s"]) >= 0
        times.append(float(s.metadata["distill_wall_time_s"]))
    assert times == sorted(times)
    final = load_synthetic(out)
    assert torch.equal(final.images, load_synthetic(snaps[-1]).images)  # the last snapshot is the final set
    assert main(["distill", "--method", "dm", "--ipc", "1", "--iterations", "1", "--model", MODEL, "--snapshot-every", "0",
                 "--out", str(out), *data]) == 2


def test_cli_distill_errors_are_clean(tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    data = ["--data", str(image_folder), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--device", "cpu"]
    assert main(["distill", "--method", "dm", "--ipc", "20", "--out", str(tmp_path / "x.safetensors"), "--model", MODEL, *data]) == 2
    assert "distinct real images" in capsys.readouterr().err
    assert main(["distill", "--method", "dm", "--ipc", "1", "--model", "ConvNetX", "--out", str(tmp_path / "x.safetensors"), *data]) == 2
    assert "unknown model" in capsys.readouterr().err


def test_base_export_is_a_copy_not_a_view() -> None:
    """Regression: Parameterization.export on CPU returned a view of the live parameters, so exported sets kept
    changing while distillation went on."""
    from torch import nn

    from elf.distill import Parameterization

    class Raw(Parameterization):
        def __init__(self) -> None:
            super().__init__(2, 1, (1, 2, 2), None)
            self.x = nn.Parameter(torch.zeros(2, 1, 2, 2))

        def images(self) -> torch.Tensor:
            return self.x

        def param_groups(self):
            return [{"params": [self.x], "lr": 1.0}]

    p = Raw()
    exported = p.export()
    with torch.no_grad():
        p.x.add_(1.0)
    assert exported.images.abs().sum() == 0


def test_a_glad_run_does_not_resume_with_another_generator_or_latent_init(sampler: RealSampler, tmp_path: Path) -> None:
    """GLaD's settings were not fingerprinted: a checkpoint resumed with another generator (or latents) continued the
    old run while the exported set recorded the new generator."""
    from elf.distill.generators import SmallGenerator
    from elf.distill.glad import GeneratorLatentParam

    def make(gen_seed: int = 0, latent_seed: int = 0) -> tuple[GeneratorLatentParam, object]:
        torch.manual_seed(gen_seed)
        gen = SmallGenerator(z_dim=8, width=8, image_size=SIDE)
        param = GeneratorLatentParam(gen, None, K, 1, None, seed=latent_seed, generator_kind="random")
        return param, DistributionMatching(sampler, _fixed_pool(), batch_real=6)

    part_dir = tmp_path / "ck"
    first = distill(*make(), 1, seed=4, progress=False, checkpoint_dir=part_dir, checkpoint_every=1)
    assert first.metadata["generator_sha256"] == make()[0].generator_sha256 and first.metadata["lr_features"]
    distill(*make(), 2, seed=4, progress=False, checkpoint_dir=part_dir)  # the same settings resume
    for other in (make(gen_seed=1), make(latent_seed=1)):
        with pytest.raises(ELFError, match="another pixel space, initialization or optimizer setting"):
            distill(*other, 3, seed=4, progress=False, checkpoint_dir=part_dir)


def test_drawing_a_network_seeds_only_the_cpu_generator(monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: RandomInitPool seeded with torch.manual_seed inside a CPU-only fork, which also reseeded every CUDA
    generator (not forked): on a GPU each draw reset the CUDA RNG."""
    reseeded: list[int] = []
    monkeypatch.setattr(torch.cuda, "manual_seed_all", reseeded.append)
    monkeypatch.setattr(torch.cuda, "manual_seed", reseeded.append)
    pool = RandomInitPool(MODEL, 3, K, (SIDE, SIDE))
    m1, m2 = pool.sample(_gen(0)), pool.sample(_gen(0))
    assert reseeded == []
    assert all(torch.equal(p, q) for p, q in zip(m1.parameters(), m2.parameters()))  # still seeded


class _DropoutNet(nn.Module):
    """A tiny network with dropout in its features (DM's embedding) and head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.fc = nn.Linear(4 * SIDE * SIDE, K)

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(torch.relu(self.conv(x))).flatten(1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(self.forward_features(x)))


@pytest.mark.parametrize("kind", ["dm", "dc-loops"])
def test_dropout_masks_come_from_the_loop_generator(kind: str, sampler: RealSampler) -> None:
    """Regression: dropout drew its masks from torch's global RNG, so one seed gave different sets (and a resumed run
    differed from an uninterrupted one) depending on the global RNG."""
    torch.manual_seed(0)
    pool = EarlyStagePool([_DropoutNet()])

    def run(global_seed: int, seed: int = 0) -> tuple[torch.Tensor, list[float]]:
        if kind == "dm":
            obj: object = DistributionMatching(sampler, pool, batch_real=6, dsa=None)
        else:
            obj = GradientMatching(sampler, pool, batch_real=6, dsa=None, outer_loop=2, inner_loop=1, batch_train=3)
        param = PixelParam(K, 2, (3, SIDE, SIDE), sampler=sampler, generator=_gen(1), lr=0.1)
        torch.manual_seed(global_seed)
        before = torch.random.get_rng_state()
        sset = distill(param, obj, 3, seed=seed, progress=False, log_every=1)  # type: ignore[arg-type]
        assert torch.equal(before, torch.random.get_rng_state())  # the global RNG is left as it was
        return sset.images, _history(sset)

    a, b = run(1), run(2)
    assert torch.equal(a[0], b[0]) and a[1] == b[1]
    assert a[1] != run(1, seed=1)[1]  # the loop's seed still decides


def test_the_loop_does_not_backpropagate_into_the_matched_network(sampler: RealSampler) -> None:
    """Regression: the loop's loss.backward() also filled .grad of the network gradient matching holds across steps
    (its second-order graph reaches the weights): work for nothing, and grads left on a network the caller may use."""
    obj = GradientMatching(sampler, _fixed_pool(), batch_real=6, dsa=None, outer_loop=3, inner_loop=0)
    param = PixelParam(K, 1, (3, SIDE, SIDE), sampler=sampler, generator=_gen(1), lr=0.1)
    distill(param, obj, 1, progress=False)
    assert obj._net is not None and all(p.grad is None for p in obj._net.parameters())


def test_embed_of_a_model_with_hidden_head_layers_is_its_conv_features() -> None:
    """embed() is the features before the head, as its docs now say: the final linear layer's input only for one-layer
    heads; LeNet (120-84 hidden layers) gives its flattened conv features."""
    from elf.distill import embed

    net = elf.create_model("LeNet", num_classes=K, im_size=(32, 32))
    assert embed(net, torch.zeros(2, 3, 32, 32)).shape == (2, 16 * 5 * 5)  # flattened conv features, not fc2's 84
