"""MTT: expert trajectories (train-teacher runs, replay buffers) and the trajectory-matching objective."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from elf.distill.mtt import ExpertTrajectories, TrajectoryMatching, build_mtt_objective, expert_trajectory_from_dir
from elf.errors import ELFError
from elf.models import create_model
from elf.teacher import train_teacher

pytestmark = pytest.mark.usefixtures("torch_single_thread")

K, S, MODEL = 3, 16, "ConvNetW8D2"


def _real_data(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random but learnable 3-class data: a fixed prototype per class plus noise; (images, labels, prototypes)."""
    g = torch.Generator().manual_seed(seed)
    protos = torch.randn(K, 3, S, S, generator=g)
    y = torch.arange(K).repeat_interleave(30)
    return protos[y] + 0.8 * torch.randn(len(y), 3, S, S, generator=g), y, protos


@pytest.fixture(scope="module")
def expert_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    x, y, _ = _real_data()
    out = tmp_path_factory.mktemp("experts") / "run0"
    train_teacher(MODEL, x, y, out, epochs=6, progress=False, log=lambda s: None, batch_size=16, lr=0.05)
    return out


def test_trajectory_from_train_teacher_dir(expert_dir: Path) -> None:
    model = create_model(MODEL, num_classes=K, im_size=(S, S))
    snaps = expert_trajectory_from_dir(expert_dir, model)
    assert len(snaps) == 6  # epochs 1..6; the initialization is not saved by train_teacher
    assert [tuple(t.shape) for t in snaps[0]] == [tuple(p.shape) for p in model.parameters()]
    experts = ExpertTrajectories.load(expert_dir, model)
    assert len(experts) == 1 and experts.first_epoch == [1] and experts.min_length == 6
    assert experts.num_params == sum(p.numel() for p in model.parameters())
    torch.testing.assert_close(experts.trajectories[0][5], torch.cat([t.flatten() for t in snaps[5]]))
    # a directory of runs gives one trajectory per run
    assert len(ExpertTrajectories.load(expert_dir.parent, model)) == 1


def test_expert_architecture_is_checked(expert_dir: Path, tmp_path: Path) -> None:
    with pytest.raises(ELFError, match="shape"):
        ExpertTrajectories.load(expert_dir, create_model("ConvNetW4D2", num_classes=K, im_size=(S, S)))
    x, y, _ = _real_data()
    bn_dir = tmp_path / "bn"
    train_teacher(MODEL + "BN", x, y, bn_dir, epochs=1, progress=False, log=lambda s: None, batch_size=45)
    with pytest.raises(ELFError, match="different architecture"):  # BN and IN parameters have equal shapes
        ExpertTrajectories.load(bn_dir, create_model(MODEL, num_classes=K, im_size=(S, S)))
    with pytest.raises(ELFError, match="BatchNorm"):
        build_mtt_objective(MODEL + "BN", bn_dir, num_classes=K, im_size=(S, S))
    with pytest.raises(ELFError, match="no epoch_XXX"):
        expert_trajectory_from_dir(tmp_path, create_model(MODEL, num_classes=K, im_size=(S, S)))


def test_experts_of_another_pixel_space_are_refused(tmp_path: Path) -> None:
    """Regression: MTT matched experts trained on ZCA'd (or otherwise normalized) images against real images in
    another space, and recorded the new space in the set."""
    from elf.pixel_space import CIFAR10_MTT, IMAGENET, space_metadata

    x, y, _ = _real_data()
    zca_dir = tmp_path / "zca"
    train_teacher(MODEL, x, y, zca_dir, epochs=3, progress=False, log=lambda s: None, batch_size=45,
                  metadata=space_metadata(CIFAR10_MTT, True))
    model = create_model(MODEL, num_classes=K, im_size=(S, S))
    with pytest.raises(ELFError, match="ZCA whitening is true vs false"):
        ExpertTrajectories.load(zca_dir, model, space_metadata(CIFAR10_MTT, False))
    with pytest.raises(ELFError, match="normalization mean"):
        build_mtt_objective(MODEL, zca_dir, num_classes=K, im_size=(S, S), space=space_metadata(IMAGENET, True))
    assert len(ExpertTrajectories.load(zca_dir, model, space_metadata(CIFAR10_MTT, True))) == 1


def test_loss_decreases_and_gradients_reach_images_and_lr(expert_dir: Path) -> None:
    obj = build_mtt_objective(MODEL, expert_dir, num_classes=K, im_size=(S, S), syn_steps=5, expert_epochs=2,
                              max_start_epoch=3, syn_lr=0.05)
    assert obj.dsa is not None and obj.dsa.strategy == "color_crop_cutout_flip_scale_rotate"
    ipc = 2
    images = torch.randn(K * ipc, 3, S, S, generator=torch.Generator().manual_seed(1)).requires_grad_(True)
    labels = torch.arange(K).repeat_interleave(ipc)

    def mean_loss() -> float:
        return sum(float(obj.loss(images, labels, 0, torch.Generator().manual_seed(100 + s)).detach()) for s in range(6)) / 6

    before = mean_loss()
    groups = [{"params": [images], "lr": 100.0, "momentum": 0.5}] + obj.param_groups()
    opt = torch.optim.SGD([{k: v for k, v in g.items() if k != "name"} for g in groups], lr=1.0)
    gen = torch.Generator().manual_seed(0)
    lr0 = obj.learned_lr()
    for step in range(30):  # the shared loop, with a pixel parameterization
        loss = obj.loss(images, labels, step, gen)
        opt.zero_grad()
        loss.backward()
        if step == 0:
            assert images.grad is not None and float(images.grad.abs().sum()) > 0
            assert obj.syn_lr.grad is not None and float(obj.syn_lr.grad.abs()) > 0
        opt.step()
    after = mean_loss()
    assert after < 0.7 * before, (before, after)
    assert obj.learned_lr() != lr0
    meta = obj.metadata()
    assert meta["method"] == "mtt" and meta["syn_steps"] == "5" and meta["expert_first_epoch"] == "1"
    state = obj.state_dict()
    obj.load_state_dict({"syn_lr": torch.tensor(0.123)})
    assert obj.learned_lr() == pytest.approx(0.123)
    obj.load_state_dict(state)
    assert obj.learned_lr() == pytest.approx(float(state["syn_lr"]))


def test_normalized_distance_equals_hand_computation_for_one_linear_step() -> None:
    torch.manual_seed(0)
    d, k, n = 12, 3, 5
    model = nn.Sequential(nn.Flatten(), nn.Linear(d, k))
    traj = [[torch.randn(k, d), torch.randn(k)] for _ in range(2)]
    experts = ExpertTrajectories.from_snapshots([traj])
    obj = TrajectoryMatching(model, experts, syn_steps=1, expert_epochs=1, max_start_epoch=1, syn_lr=0.3, dsa=None)
    x = torch.randn(n, 1, 3, 4, requires_grad=True)
    y = torch.tensor([0, 1, 2, 1, 0])
    loss = obj.loss(x, y, 0, torch.Generator().manual_seed(0))

    (w0, b0), (wt, bt) = traj
    xf = x.detach().flatten(1)
    p = torch.softmax(xf @ w0.T + b0, dim=1)
    g = (p - F.one_hot(y, k).float()) / n  # d mean-CE / d logits
    gw, gb = g.T @ xf, g.sum(0)
    w1, b1 = w0 - 0.3 * gw, b0 - 0.3 * gb
    den = (w0 - wt).pow(2).sum() + (b0 - bt).pow(2).sum()
    expected = ((w1 - wt).pow(2).sum() + (b1 - bt).pow(2).sum()) / den
    torch.testing.assert_close(loss.detach(), expected)
    loss.backward()
    # d/dα ||θ0 - α g - θt||² / den = -2 <g, θ1 - θt> / den
    dlr = -2 * ((gw * (w1 - wt)).sum() + (gb * (b1 - bt)).sum()) / den
    torch.testing.assert_close(obj.syn_lr.grad, dlr)
    assert x.grad is not None and float(x.grad.abs().sum()) > 0


def test_replay_buffers_in_mtt_layout_load(tmp_path: Path) -> None:
    model = create_model(MODEL, num_classes=K, im_size=(S, S))
    shapes = [p.shape for p in model.parameters()]
    g = torch.Generator().manual_seed(0)
    buffers = []
    for b in range(2):
        trajs = [[[torch.randn(s, generator=g) for s in shapes] for _ in range(4)] for _ in range(2)]  # 3 epochs + init
        torch.save(trajs, tmp_path / f"replay_buffer_{b}.pt")
        buffers.append(trajs)
    experts = ExpertTrajectories.load(tmp_path)
    assert len(experts) == 4 and experts.first_epoch == [0] * 4 and experts.min_length == 4
    torch.testing.assert_close(experts.trajectories[3][2], torch.cat([t.flatten() for t in buffers[1][1][2]]))
    single = ExpertTrajectories.load(tmp_path / "replay_buffer_0.pt")
    assert len(single) == 2
    seg = experts.sample(torch.Generator().manual_seed(0), max_start_epoch=20, expert_epochs=2)
    assert seg.start_index in (0, 1)
    torch.testing.assert_close(seg.target, experts.trajectories[seg.trajectory][seg.start_index + 2])
    obj = build_mtt_objective(MODEL, tmp_path, num_classes=K, im_size=(S, S), syn_steps=2, dsa=None)
    images = torch.randn(6, 3, S, S, requires_grad=True)
    loss = obj.loss(images, torch.arange(K).repeat_interleave(2), 0, torch.Generator().manual_seed(0))
    assert loss.dim() == 0 and torch.isfinite(loss)
    with pytest.raises(ELFError, match="parameters"):
        build_mtt_objective("ConvNetW4D2", tmp_path, num_classes=K, im_size=(S, S))
    with pytest.raises(ELFError, match="expert_epochs"):
        build_mtt_objective(MODEL, tmp_path, num_classes=K, im_size=(S, S), expert_epochs=4)
    torch.save({"not": "a buffer"}, tmp_path / "other.pt")
    with pytest.raises(ELFError, match="not an MTT expert buffer"):
        ExpertTrajectories.load(tmp_path / "other.pt")


def test_glad_latents_with_mtt_in_the_shared_loop_resume_exactly(expert_dir: Path, tmp_path: Path) -> None:
    """GLaD + MTT through elf.distill.distill: the learned lr is exported, and an interrupted run resumes bit for bit."""
    from elf.distill import distill
    from elf.distill.generators import SmallGenerator
    from elf.distill.glad import GeneratorLatentParam

    def make() -> tuple[GeneratorLatentParam, TrajectoryMatching]:
        torch.manual_seed(0)
        gen = SmallGenerator(z_dim=8, width=4, image_size=S, style_dim=4)
        param = GeneratorLatentParam(gen, None, K, 1, None, method="mtt", lr_features=10.0, lr_style=0.1, chunk_size=2)
        obj = build_mtt_objective(MODEL, expert_dir, num_classes=K, im_size=(S, S), syn_steps=2, max_start_epoch=3, lr_lr=1e-3)
        return param, obj

    param, obj = make()
    full = distill(param, obj, 4, seed=1, progress=False, log_every=1)
    assert full.lr == pytest.approx(obj.learned_lr()) and full.lr != pytest.approx(0.01)
    assert full.metadata["parameterization"] == "GLaD" and full.metadata["method"] == "mtt"
    param, obj = make()
    distill(param, obj, 2, seed=1, progress=False, checkpoint_dir=tmp_path, checkpoint_every=1)
    param, obj = make()
    resumed = distill(param, obj, 4, seed=1, progress=False, checkpoint_dir=tmp_path, checkpoint_every=1)
    assert torch.equal(resumed.images, full.images) and resumed.lr == full.lr


def test_the_dsa_op_generator_of_a_gpu_run_is_checkpointed(expert_dir: Path) -> None:
    """Regression: with images on a GPU, DSA picks its ops with a CPU generator seeded from the loop's first draw;
    it was not in the objective's state, so a resumed run re-seeded it (one more draw from the loop's generator) and
    every later segment, batch and augmentation differed from an uninterrupted run."""
    obj = build_mtt_objective(MODEL, expert_dir, num_classes=K, im_size=(S, S), syn_steps=2)
    obj._op_gen = torch.Generator().manual_seed(7)  # as _augment leaves it on a GPU (that branch needs CUDA)
    torch.rand(3, generator=obj._op_gen)
    state = obj.state_dict()
    again = build_mtt_objective(MODEL, expert_dir, num_classes=K, im_size=(S, S), syn_steps=2)
    again.load_state_dict(state)
    assert again._op_gen is not None
    assert torch.equal(torch.rand(5, generator=again._op_gen), torch.rand(5, generator=obj._op_gen))


def test_recipe_refuses_a_pool_for_mtt_and_builds_none(expert_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Regression: --method mtt with --pool early / --perturb trained an Acc-DD pool that trajectory matching never
    draws from (and every MTT run built a random-init pool)."""
    import elf.distill.recipe as recipe_mod
    from elf.data import CIFAR10_MTT
    from elf.distill import DistillRecipe, RealSampler, build_distillation

    for extra in ({"pool": "early"}, {"perturb": True}):
        with pytest.raises(ELFError, match="method 'mtt' draws no network from a pool"):
            DistillRecipe(method="mtt", ipc=1, model=MODEL, experts=str(expert_dir), **extra).check()  # type: ignore[arg-type]

    def no_pool(*args: object, **kwargs: object) -> None:
        raise AssertionError("build_pool called for MTT")

    monkeypatch.setattr(recipe_mod, "build_pool", no_pool)
    x, y, _ = _real_data()
    recipe = DistillRecipe(method="mtt", ipc=1, model=MODEL, experts=str(expert_dir), max_start_epoch=3)
    built = build_distillation(recipe, RealSampler(x, y, normalization=CIFAR10_MTT), CIFAR10_MTT,
                               device=torch.device("cpu"), log=lambda s: None)
    assert isinstance(built.objective, TrajectoryMatching) and built.pool is None


def test_student_dropout_masks_come_from_the_loop_generator() -> None:
    """Regression: a student with dropout drew its masks from torch's global RNG: one loop seed, different losses."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Flatten(), nn.Linear(12, 8), nn.Dropout(0.5), nn.Linear(8, 3))
    experts = ExpertTrajectories.from_snapshots([[[p.detach() + 0.1 * i for p in model.parameters()] for i in range(3)]])
    obj = TrajectoryMatching(model, experts, syn_steps=3, expert_epochs=1, max_start_epoch=2, dsa=None)
    x, y = torch.randn(6, 1, 3, 4, generator=torch.Generator().manual_seed(1)), torch.arange(3).repeat(2)
    losses = []
    for global_seed in (1, 2):
        torch.manual_seed(global_seed)
        before = torch.random.get_rng_state()
        losses.append(obj.loss(x, y, 0, torch.Generator().manual_seed(0)).detach())
        assert torch.equal(before, torch.random.get_rng_state())
    assert torch.equal(losses[0], losses[1])
