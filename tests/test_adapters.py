"""Feature adapters and what comes with them: layouts, adapter shapes, ELFTrainer with adapters (training, resume),
split_at="auto", align_targets, protocol checks, model specs (timm ViT tokens), choose_bank, CLI options and the
study's validation split."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import elf
from elf import DSA, Callback, ELFError, ELFTrainer, FeatureBank, create_model, get_protocol
from elf.adapters import ELFAdapters, FeatureAdapter, FeatureLayout, build_adapters, infer_layout
from elf.augment import DSASample
from elf.fileio import load_tensors
from elf.split import auto_split_point, list_split_points, split_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

K = 4  # classes
N = 20  # synthetic images
SIZE = 32


def _data(n: int = N, size: int = SIZE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.arange(n) % K


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    return _data()


@pytest.fixture(scope="module")
def bank128(data) -> FeatureBank:
    """Features of a width-128 ConvNet teacher (the paper's ConvNet teacher): 128x4x4 at 32x32."""
    x, _ = data
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(100)
        teacher = create_model("ConvNet", num_classes=K, im_size=(SIZE, SIZE))
    bank = FeatureBank.build(teacher, x)
    assert bank.shape == (128, 4, 4)
    return bank


def _fake_bank(shape: tuple[int, ...], n: int = N, name: str = "fake", seed: int = 1) -> FeatureBank:
    g = torch.Generator().manual_seed(seed)
    return FeatureBank(torch.randn(n, *shape, generator=g).softmax(1), {"teacher_model": name})


def _trainer(model, x, y, **kw) -> ELFTrainer:
    kw.setdefault("device", "cpu")
    kw.setdefault("progress", False)
    kw.setdefault("epochs", 1)
    return ELFTrainer(model, x, y, **kw)


def _n_params(module: nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


# ---- 1. layouts and adapters ------------------------------------------------------------------------------------


def test_infer_layout_maps_channels_last_and_tokens():
    assert infer_layout((128, 4, 4)) == FeatureLayout("map", 128, (4, 4), 0)
    assert infer_layout(torch.Size([512, 4, 4])).shape == (512, 4, 4)
    assert infer_layout((8, 8, 8)).kind == "map"  # C == H == W: a map
    cl = infer_layout((4, 4, 768))
    assert (cl.kind, cl.channels, cl.grid, cl.prefix) == ("channels_last", 768, (4, 4), 0)
    assert cl.shape == (4, 4, 768)
    tok = infer_layout((65, 192))
    assert (tok.kind, tok.channels, tok.grid, tok.prefix) == ("tokens", 192, (8, 8), 1)
    assert tok.shape == (65, 192)
    assert infer_layout((64, 192)) == FeatureLayout("tokens", 192, (8, 8), 0)
    assert infer_layout((198, 384)).prefix == 2  # DeiT: class + distillation token on 14x14
    # explicit kinds for non-square grids
    assert infer_layout((4, 8, 16), "channels_last") == FeatureLayout("channels_last", 16, (4, 8), 0)
    assert infer_layout((16, 4, 4), "map").kind == "map"
    for bad, kind in [((2, 3, 4, 5), "auto"), ((512,), "auto"), ((65, 192), "map"), ((3, 4, 4), "tokens"), ((0, 8), "tokens")]:
        with pytest.raises(ELFError):
            infer_layout(bad, kind)


@pytest.mark.parametrize("shape", [(6, 3, 5), (3, 5, 6), (65, 12), (16, 12)])
def test_layout_to_map_from_map_round_trip(shape):
    layout = infer_layout(shape, "channels_last" if shape == (3, 5, 6) else "auto")
    x = torch.randn(2, *shape)
    m = layout.to_map(x)
    assert m.shape == (2, layout.channels, *layout.grid)
    prefix = x[:, : layout.prefix][:1] if layout.prefix else None
    back = layout.from_map(m, prefix)
    if layout.prefix:  # prefix tokens come from prefix_tokens, the same for every sample
        back[1, : layout.prefix] = x[1, : layout.prefix]
    assert torch.equal(back, x)
    if layout.kind == "channels_last":
        assert torch.equal(m, x.permute(0, 3, 1, 2))
    if layout.kind == "tokens":  # patch token p = i * w + j sits at cell (i, j); prefix tokens are dropped
        h, w = layout.grid
        i, j = 2, 3
        assert torch.equal(m[:, :, i, j], x[:, layout.prefix + i * w + j])


def test_feature_adapter_map_to_map_both_directions():
    small = infer_layout((64, 8, 8))
    big = infer_layout((128, 4, 4))
    down = FeatureAdapter(small, big)
    up = FeatureAdapter(big, small)
    assert isinstance(down.proj, nn.Conv2d) and down.proj.weight.shape == (128, 64, 1, 1)
    assert isinstance(up.proj, nn.Conv2d) and up.proj.weight.shape == (64, 128, 1, 1)
    assert down(torch.randn(3, 64, 8, 8)).shape == (3, 128, 4, 4)
    assert up(torch.randn(3, 128, 4, 4)).shape == (3, 64, 8, 8)
    # shrinking by an integer factor is average pooling, then the 1x1 convolution
    x = torch.randn(2, 64, 8, 8)
    torch.testing.assert_close(down(x), down.proj(F.avg_pool2d(x, 2)))


def test_feature_adapter_identity_channels_has_no_parameters():
    same = FeatureAdapter(infer_layout((16, 8, 8)), infer_layout((16, 4, 4)))
    assert isinstance(same.proj, nn.Identity) and _n_params(same) == 0
    x = torch.randn(2, 16, 8, 8)
    assert torch.allclose(same(x), F.avg_pool2d(x, 2))
    quarter = FeatureAdapter(infer_layout((16, 8, 8)), infer_layout((16, 2, 2)))  # every cell of a 4x4 block counts
    assert torch.allclose(quarter(x), F.avg_pool2d(x, 4))
    grow = FeatureAdapter(infer_layout((16, 4, 4)), infer_layout((16, 6, 6)))  # not an integer factor: bilinear
    assert _n_params(grow) == 0
    y = torch.randn(2, 16, 4, 4)
    assert torch.allclose(grow(y), F.interpolate(y, size=(6, 6), mode="bilinear", align_corners=False))
    ident = FeatureAdapter(infer_layout((16, 4, 4)), infer_layout((16, 4, 4)))
    assert torch.equal(ident(y), y)


def test_feature_adapter_tokens_and_channels_last():
    tokens, teacher = infer_layout((65, 192)), infer_layout((128, 4, 4))
    to_map = FeatureAdapter(tokens, teacher)
    x = torch.randn(3, 65, 192)
    out = to_map(x)
    assert out.shape == (3, 128, 4, 4)
    # the class token plays no part in the map
    x2 = x.clone()
    x2[:, 0] += 100
    assert torch.equal(to_map(x2), out)
    to_tokens = FeatureAdapter(teacher, tokens)
    assert to_tokens.prefix is not None and to_tokens.prefix.shape == (1, 1, 192)
    with torch.no_grad():
        to_tokens.prefix.normal_()
    t = to_tokens(torch.randn(3, 128, 4, 4))
    assert t.shape == (3, 65, 192)
    for b in range(3):  # the class token: the learned offset plus the average of the sample's patch tokens
        torch.testing.assert_close(t[b, 0], to_tokens.prefix[0, 0] + t[b, 1:].mean(0))
    assert _n_params(to_tokens) == 128 * 192 + 192 + 192

    cl = infer_layout((4, 4, 32))
    a = FeatureAdapter(cl, teacher)
    b = FeatureAdapter(teacher, cl)
    assert a(torch.randn(2, 4, 4, 32)).shape == (2, 128, 4, 4)
    assert b(torch.randn(2, 128, 4, 4)).shape == (2, 4, 4, 32)
    # same channels and grid: channels-last -> map is a pure permutation
    perm = FeatureAdapter(infer_layout((4, 4, 128)), teacher)
    assert _n_params(perm) == 0
    z = torch.randn(2, 4, 4, 128)
    assert torch.equal(perm(z), z.permute(0, 3, 1, 2))


def test_elf_adapters_and_build_adapters():
    pair = ELFAdapters((65, 192), (128, 4, 4))
    assert pair.to_teacher(torch.randn(2, 65, 192)).shape == (2, 128, 4, 4)
    assert pair.to_student(torch.randn(2, 128, 4, 4)).shape == (2, 65, 192)
    with pytest.raises(ELFError, match="teacher feature map"):
        ELFAdapters((64, 4, 4), (2048,))
    assert build_adapters(None, (64, 4, 4), (128, 4, 4)) is None
    assert build_adapters("auto", (128, 4, 4), (128, 4, 4)) is None
    built = build_adapters("auto", (64, 4, 4), (128, 4, 4))
    assert isinstance(built, ELFAdapters) and built.student_shape == (64, 4, 4)
    with pytest.raises(ELFError, match="adapter mode"):
        build_adapters("linear", (64, 4, 4), (128, 4, 4))


# ---- 2. ELFTrainer with adapters --------------------------------------------------------------------------------


class _Snapshot(Callback):
    """The adapters' and model's weights at fit start (after the adapters are built)."""

    def __init__(self) -> None:
        self.adapters: dict[str, torch.Tensor] | None = None
        self.model: dict[str, torch.Tensor] | None = None

    def on_fit_start(self, trainer):
        self.adapters = copy.deepcopy(trainer.adapters.state_dict()) if trainer.adapters is not None else None
        self.model = copy.deepcopy(trainer.model.state_dict())


def test_trainer_without_adapter_refuses_other_shapes(data, bank128):
    x, y = data
    t = _trainer("ConvNetW64", x, y, feature_bank=bank128, augment=None)
    with pytest.raises(ELFError, match="adapter") as info:
        t.fit(0)
    assert "(64, 4, 4)" in str(info.value) and "(128, 4, 4)" in str(info.value)
    assert t.adapters is None


def test_trainer_with_adapters_trains_them_outside_the_model(data, bank128):
    x, y = data
    snap = _Snapshot()
    t = _trainer("ConvNetW64", x, y, feature_bank=bank128, adapter="auto", callbacks=[snap])
    history = t.fit(0)
    assert isinstance(t.adapters, ELFAdapters)
    assert t.adapters.student_shape == (64, 4, 4) and t.adapters.teacher_shape == (128, 4, 4)
    assert all(torch.isfinite(torch.tensor([r["loss"], r["front"], r["rear"]])).all() for r in history)
    assert history[-1]["front"] > 0 and history[-1]["rear"] > 0
    # the evaluated model is the plain model: same parameter count, no adapter parameter inside it
    reference = create_model("ConvNetW64", num_classes=K, im_size=(SIZE, SIZE))
    assert _n_params(t.model) == _n_params(reference)
    assert t.model.state_dict().keys() == reference.state_dict().keys()
    model_ids = {id(p) for p in t.model.parameters()}
    adapter_params = list(t.adapters.parameters())
    assert adapter_params and not any(id(p) in model_ids for p in adapter_params)
    # ...but they are optimized with it: in the optimizer, and changed by training (both directions)
    opt_ids = {id(p) for g in t._loop.optimizer.param_groups for p in g["params"]}
    assert all(id(p) in opt_ids for p in adapter_params)
    after = t.adapters.state_dict()
    for key in ("to_teacher.proj.weight", "to_teacher.proj.bias", "to_student.proj.weight", "to_student.proj.bias"):
        assert not torch.equal(snap.adapters[key], after[key]), key
    assert 0 <= t.evaluate(x, y) <= 100


def test_adapters_are_built_under_the_seed(data, bank128):
    x, y = data
    weights = []
    for _ in range(2):
        snap = _Snapshot()
        _trainer("ConvNetW64", x, y, feature_bank=bank128, adapter="auto", callbacks=[snap], epochs=0,
                 extra_epoch=False).fit(3)
        weights.append(snap.adapters)
    assert all(torch.equal(weights[0][k], weights[1][k]) for k in weights[0])


def test_adapter_auto_with_matching_shapes_builds_none(data, bank128):
    x, y = data
    t = _trainer("ConvNet", x, y, feature_bank=bank128, adapter="auto", augment=None)
    t.fit(0)
    assert t.adapters is None


# ---- 3. save_state / resume with adapters ----------------------------------------------------------------------


class _SaveAt(Callback):
    def __init__(self, epoch: int, path: Path, stop: bool) -> None:
        self.epoch, self.path, self.stop = epoch, path, stop

    def on_epoch_end(self, trainer, epoch, logs):
        if epoch == self.epoch:
            trainer.save_state(self.path)
            if self.stop:
                trainer.stop_training = True


def test_resume_with_adapters_is_bit_identical(data, bank128, tmp_path):
    x, y = data
    kw = dict(feature_bank=bank128, adapter="auto", epochs=3, batch_size=8)  # 3 batches per epoch, lr decay at 2
    full = _trainer("ConvNetW64", x, y, **kw)
    full.fit(5)
    path = tmp_path / "state.safetensors"
    first = _trainer("ConvNetW64", x, y, callbacks=[_SaveAt(0, path, stop=True)], **kw)
    first.fit(5)
    tensors, _ = load_tensors(path)
    assert any(k.startswith("adapter.to_teacher.proj") for k in tensors)
    n_model = len(list(first.model.parameters()))
    assert f"momentum.0.{n_model}" in tensors  # the adapters' momentum buffers come after the model's
    resumed = _trainer("ConvNetW64", x, y, **kw)
    resumed.fit(5, resume_from=path)
    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key
    for key, value in full.adapters.state_dict().items():
        assert torch.equal(resumed.adapters.state_dict()[key], value), key
    # the same state cannot resume a fit without adapters (student shape equals this bank's)
    other = _trainer("ConvNetW64", x, y, feature_bank=_fake_bank((64, 4, 4)), adapter="auto", epochs=3, batch_size=8)
    with pytest.raises(ELFError, match="adapters"):
        other.fit(5, resume_from=path)


# ---- 4. split_at="auto" -----------------------------------------------------------------------------------------


def test_auto_split_point_on_models():
    conv = create_model("ConvNetW64", num_classes=K)
    point, why = auto_split_point(conv, (3, 32, 32), (64, 4, 4))
    assert point == "features" and "shape" in why
    # an exact match earlier than the default point
    assert auto_split_point(conv, (3, 32, 32), (64, 8, 8))[0] == "features.10"
    with pytest.raises(ELFError, match="adapter"):
        auto_split_point(conv, (3, 32, 32), (128, 4, 4))
    # with adapters: the deepest point on the teacher's grid, not simply the deepest point
    assert auto_split_point(conv, (3, 32, 32), (128, 4, 4), adapter=True)[0] == "features"
    assert auto_split_point(conv, (3, 32, 32), (128, 8, 8), adapter=True)[0] == "features.10"
    assert auto_split_point(conv, (3, 32, 32), (128, 16, 16), adapter=True)[0] == "features.6"
    # no point on the grid: the deepest map point (adapters resize)
    point, why = auto_split_point(conv, (3, 32, 32), (128, 3, 3), adapter=True)
    assert point == "features" and "grid" in why
    resnet = create_model("ResNet18BN", num_classes=K)
    assert auto_split_point(resnet, (3, 32, 32), (512, 4, 4))[0] == "layer4"
    assert auto_split_point(resnet, (3, 32, 32), (256, 8, 8))[0] == "layer3"
    assert auto_split_point(resnet, (3, 32, 32), (128, 4, 4), adapter=True)[0] == "layer4"
    assert auto_split_point(resnet, (3, 32, 32), (128, 8, 8), adapter=True)[0] == "layer3"


def test_auto_split_point_considers_the_deepest_valid_point():
    class Head(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = nn.Linear(16 * 4 * 4, K)

        def forward(self, x):
            return self.fc(x.flatten(1))

    net = nn.Sequential(nn.Conv2d(3, 16, 8, stride=8), Head())
    points = list_split_points(net, (3, 32, 32), leaf_modules=[Head])
    assert [(p.name, p.shape) for p in points] == [("0", (16, 4, 4))]  # the only valid cut, and split_model takes it
    assert split_model(net, "0", leaf_modules=[Head]).front(torch.zeros(1, 3, 32, 32)).shape == (1, 16, 4, 4)
    assert auto_split_point(net, (3, 32, 32), (16, 4, 4), leaf_modules=[Head])[0] == "0"


def test_trainer_split_at_auto_records_the_choice(data, bank128):
    x, y = data
    t = _trainer("ConvNet", x, y, feature_bank=bank128, split_at="auto", augment=None)
    t.fit(0)
    assert t.split_point == "features" and t.adapters is None
    quick = dict(epochs=0, extra_epoch=False)  # builds, splits and checks shapes; no training step
    r = _trainer("ResNet18BN", x, y, feature_bank=_fake_bank((512, 4, 4)), split_at="auto", **quick)
    r.fit(0)
    assert r.split_point == "layer4" and r.adapters is None
    w = _trainer("ConvNetW64", x, y, feature_bank=_fake_bank((64, 8, 8)), split_at="auto", **quick)
    w.fit(0)
    assert w.split_point == "features.10" and w.adapters is None
    a = _trainer("ConvNetW64", x, y, feature_bank=bank128, split_at="auto", adapter="auto", **quick)
    a.fit(0)
    assert a.split_point == "features" and a.adapters is not None
    g = _trainer("ConvNetW64", x, y, feature_bank=_fake_bank((128, 8, 8)), split_at="auto", adapter="auto", **quick)
    g.fit(0)
    assert g.split_point == "features.10" and g.adapters.student_shape == (64, 8, 8)
    with pytest.raises(ELFError, match="adapter"):
        _trainer("ConvNetW64", x, y, feature_bank=bank128, split_at="auto", **quick).fit(0)
    # the choice is recorded in run()'s results
    res = _trainer("ConvNetW64", x, y, feature_bank=_fake_bank((64, 8, 8)), split_at="auto", **quick).run(x, y, seeds=1)
    assert res.data["split_at"] == "features.10"


def test_baseline_ignores_split_at_auto(data):
    # a study's [overrides] split_at = "auto" reaches its baseline and random-real runs too
    x, y = data
    t = _trainer("ConvNetW64", x, y, protocol="dsa", split_at="auto", epochs=0, extra_epoch=False)
    t.fit(0)
    assert t.front is None and t.adapters is None


# ---- 5. align_targets ------------------------------------------------------------------------------------------


def _geometric_samples(n: int) -> list[DSASample]:
    g = torch.Generator().manual_seed(0)
    return [
        DSASample(ops=("crop",), crop=torch.tensor([[1, -2], [0, 3], [-4, 0], [2, 2]])[:n]),
        DSASample(ops=("flip",), flip=torch.tensor([True, False, True, True])[:n]),
        DSA("scale").sample((n, 3, 8, 8), generator=g),
        DSA("rotate").sample((n, 3, 8, 8), generator=g),
    ]


def test_apply_geometric_at_image_size_equals_apply():
    dsa = DSA()
    x = torch.randn(4, 3, 8, 8)
    for sample in _geometric_samples(4):
        out = dsa.apply_geometric(x, sample, (8, 8))
        assert not torch.allclose(out, x), sample.ops  # the op does something
        torch.testing.assert_close(out, dsa.apply(x, sample), atol=1e-5, rtol=1e-5, msg=str(sample.ops))
    both = DSASample(ops=("crop", "flip"), crop=torch.tensor([[1, 1]]), flip=torch.tensor([True]))
    torch.testing.assert_close(dsa.apply_geometric(x, both, (8, 8)), dsa.apply(x, both), atol=1e-5, rtol=1e-5)


def test_apply_geometric_skips_colour_and_cutout():
    dsa = DSA()
    feats = torch.randn(4, 16, 4, 4)
    for op in ("color", "cutout"):
        sample = DSA(op).sample((4, 3, 32, 32), generator=torch.Generator().manual_seed(0))
        img = torch.randn(4, 3, 32, 32)
        assert not torch.equal(dsa.apply(img, sample), img)  # the op changes images, not feature geometry
        assert torch.equal(dsa.apply_geometric(feats, sample, (32, 32)), feats), op
    with pytest.raises(ELFError):
        dsa.apply_geometric(torch.randn(4, 16), _geometric_samples(4)[0], (32, 32))
    with pytest.raises(ELFError):
        dsa.apply_geometric(torch.ones(4, 16, 4, 4, dtype=torch.long), _geometric_samples(4)[0], (32, 32))


def test_crop_shift_of_a_feature_cell():
    dsa = DSA()
    m = torch.randn(3, 5, 4, 4)
    crop = torch.tensor([[8, 0], [0, -8], [-8, 8]])  # 8 pixels of 32 = one cell of 4
    out = dsa.apply_geometric(m, DSASample(ops=("crop",), crop=crop), (32, 32))
    # out[i, j] = m[i + dy, j + dx] in cells, zeros outside
    torch.testing.assert_close(out[0, :, :3], m[0, :, 1:])
    assert torch.equal(out[0, :, 3], torch.zeros(5, 4))
    torch.testing.assert_close(out[1, :, :, 1:], m[1, :, :, :3])
    assert torch.equal(out[1, :, :, 0], torch.zeros(5, 4))
    torch.testing.assert_close(out[2, :, 1:, :3], m[2, :, :3, 1:])
    # half a cell: the average of two neighbouring cells
    half = dsa.apply_geometric(m[:1], DSASample(ops=("crop",), crop=torch.tensor([[4, 0]])), (32, 32))
    torch.testing.assert_close(half[0, :, :3], (m[0, :, :3] + m[0, :, 1:]) / 2)
    # non-square images: dy is measured against H, dx against W
    wide = dsa.apply_geometric(m[:1], DSASample(ops=("crop",), crop=torch.tensor([[8, 16]])), (32, 64))
    torch.testing.assert_close(wide[0, :, :3, :3], m[0, :, 1:, 1:])


class _TargetSpy:
    def __init__(self) -> None:
        self.targets: list[torch.Tensor] = []

    def wrap(self, name):
        fn = elf.losses.feature_distance(name)

        def distance(h, target):
            self.targets.append(target.detach().clone())
            return fn(h, target)

        return distance


def test_trainer_align_targets_moves_the_targets(data, bank128, monkeypatch):
    x, y = data
    runs = {}
    for align in (False, True):
        spy = _TargetSpy()
        monkeypatch.setattr(elf.trainer, "feature_distance", spy.wrap)
        t = _trainer("ConvNet", x, y, feature_bank=bank128, augment="crop", align_targets=align, epochs=2, batch_size=10)
        history = t.fit(0)
        runs[align] = (spy.targets, history)
    plain, aligned = runs[False][0], runs[True][0]
    assert len(plain) == len(aligned) == 6
    rows = bank128.features.flatten(1)

    def is_bank_row(r):
        return bool((rows == r.flatten()).all(1).any())

    assert all(is_bank_row(r) for t in plain for r in t)  # un-aligned: the bank's features as stored
    moved = [not is_bank_row(r) for t in aligned for r in t]
    assert sum(moved) > len(moved) // 2  # crops of -4..4 pixels shift most 4x4 targets
    assert runs[False][1][-1]["front"] != runs[True][1][-1]["front"]


def test_trainer_align_targets_without_augmentation_changes_nothing(data, bank128):
    x, y = data
    a = _trainer("ConvNet", x, y, feature_bank=bank128, augment=None, align_targets=True)
    b = _trainer("ConvNet", x, y, feature_bank=bank128, augment=None)
    ha, hb = a.fit(0), b.fit(0)
    assert [r["loss"] for r in ha] == [r["loss"] for r in hb]


# ---- 6. protocol ------------------------------------------------------------------------------------------------


def test_protocol_adapter_and_align_targets_fields():
    p = get_protocol("elf")
    assert p.adapter is None and p.align_targets is False  # the paper's setting by default
    q = get_protocol("elf", adapter="auto", align_targets=True)
    assert q.to_dict()["adapter"] == "auto" and q.to_dict()["align_targets"] is True
    for bad in ("linear", "Auto", "none", 1):
        with pytest.raises(ELFError, match="adapter"):
            get_protocol("elf", adapter=bad)
    with pytest.raises(ELFError, match="align_targets"):
        get_protocol("elf", align_targets=True, features_on_augmented=True)
    with pytest.raises(ELFError):
        elf.Protocol(adapter="conv")


# ---- 7. model specs and the timm ViT token path ---------------------------------------------------------------


def test_parse_model_spec():
    from elf.models.registry import parse_model_spec

    assert parse_model_spec("timm.vit_tiny_patch16_224:patch_size=4") == ("timm.vit_tiny_patch16_224", {"patch_size": 4})
    assert isinstance(parse_model_spec("x:patch_size=4")[1]["patch_size"], int)
    assert parse_model_spec("ResNet18BN") == ("ResNet18BN", {})
    assert parse_model_spec("m:drop_rate=0.1, norm=batchnorm,flag=True,") == (
        "m", {"drop_rate": 0.1, "norm": "batchnorm", "flag": True})
    for bad in ("m:patch_size", "m:4=4", "m:a=1,b"):
        with pytest.raises(ELFError, match="key=value"):
            parse_model_spec(bad)
    # tuples, lists and strings holding commas are one value each (the commas inside used to split them)
    assert parse_model_spec("m:depths=(1, 1,1),dims=[8,16],name='a,b',x=2") == (
        "m", {"depths": (1, 1, 1), "dims": [8, 16], "name": "a,b", "x": 2})
    # built-ins take the keywords too, and name themselves with them (records said "ConvNet" for a width-32 teacher)
    conv = create_model("ConvNet:width=32,depth=2", num_classes=K, im_size=(16, 16))
    assert conv.elf_model_name == "ConvNet:width=32,depth=2"
    assert parse_model_spec(conv.elf_model_name) == ("ConvNet", {"width": 32, "depth": 2})
    assert FeatureBank.build(conv, torch.zeros(2, 3, 16, 16), "features").metadata["teacher_model"] == conv.elf_model_name
    with torch.no_grad():
        assert split_model(conv, "features").front(torch.zeros(1, 3, 16, 16)).shape == (1, 32, 4, 4)
    with pytest.raises(ELFError):
        create_model("ConvNet:width")


VIT = "timm.vit_tiny_patch16_224:patch_size=4"


def test_timm_vit_spec_is_built_for_the_images():
    pytest.importorskip("timm")
    model = create_model(VIT, num_classes=10, im_size=(32, 32))
    assert model.patch_embed.grid_size == (8, 8)
    with torch.no_grad():
        assert model(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    # an explicit img_size wins over im_size
    other = create_model(VIT + ",img_size=16", num_classes=3, im_size=(32, 32))
    assert other.patch_embed.grid_size == (4, 4)


def test_timm_model_without_img_size():
    pytest.importorskip("timm")
    model = create_model("timm.resnet10t", num_classes=3, im_size=(32, 32)).eval()
    with torch.no_grad():
        assert model(torch.zeros(1, 3, 32, 32)).shape == (1, 3)


def test_trainer_vit_tokens_with_adapters(bank128):
    pytest.importorskip("timm")
    x, y = _data()
    idx = torch.arange(8)
    small = FeatureBank(bank128.features[idx], {"teacher_model": "ConvNet"})
    snap = _Snapshot()
    t = _trainer(VIT, x[idx], y[idx], feature_bank=small, adapter="auto", split_at="auto", callbacks=[snap],
                 extra_epoch=False)
    history = t.fit(0)
    assert t.split_point == "norm"
    assert t.adapters is not None and t.adapters.student_shape == (65, 192)
    assert t.adapters.to_student.prefix is not None and t.adapters.to_student.prefix.shape == (1, 1, 192)
    assert len(history) == 1 and all(torch.isfinite(torch.tensor(v)) for v in history[0].values())
    after = t.adapters.state_dict()
    assert not torch.equal(after["to_teacher.proj.weight"], snap.adapters["to_teacher.proj.weight"])
    assert not torch.equal(after["to_student.prefix"], snap.adapters["to_student.prefix"])
    assert _n_params(t.model) == _n_params(create_model(VIT, num_classes=K, im_size=(32, 32)))


# ---- 8. choose_bank ---------------------------------------------------------------------------------------------


def test_choose_bank():
    from elf.evaluation import choose_bank

    b128, b64 = _fake_bank((128, 4, 4), n=2, name="ConvNet"), _fake_bank((64, 4, 4), n=2, name="ConvNetW64")
    with pytest.raises(ELFError, match="adapter") as info:
        choose_bank("ConvNetW64", (3, 32, 32), K, [b128])
    assert "(64, 4, 4)" in str(info.value)
    assert choose_bank("ConvNetW64", (3, 32, 32), K, [b128], adapter="auto") is b128
    assert choose_bank("ConvNetW64", (3, 32, 32), K, [b128, b64]) is b64
    assert choose_bank("ConvNetW64", (3, 32, 32), K, [b128, b64], adapter="auto") is b64  # a match comes first
    b8 = _fake_bank((64, 8, 8), n=2)
    assert choose_bank("ConvNetW64", (3, 32, 32), K, [b128, b8], split_at="auto") is b8
    assert choose_bank("ConvNetW64", (3, 32, 32), K, [b128, b8], split_at="features.10") is b8
    with pytest.raises(ELFError, match="adapter"):
        choose_bank("ConvNetW64", (3, 32, 32), K, [b128], split_at="auto")
    assert choose_bank("ConvNetW64", (3, 32, 32), K, [b128], split_at="auto", adapter="auto") is b128
    with pytest.raises(ELFError):
        choose_bank("ConvNetW64", (3, 32, 32), K, [], adapter="auto")


# ---- 9. CLI -----------------------------------------------------------------------------------------------------


def test_cli_split_points():
    from elf.cli import _split_points

    assert _split_points(["ResNet18BN=layer4.0", "auto"], ["A", "B"]) == {"ResNet18BN": "layer4.0", "A": "auto", "B": "auto"}
    assert _split_points(["auto", "A=features"], ["A", "B"]) == {"A": "features", "B": "auto"}
    assert _split_points([], ["A"]) == {}
    spec = "timm.vit_tiny_patch16_224:patch_size=4"
    assert _split_points([f"{spec}=blocks.5"], [spec]) == {spec: "blocks.5"}


def test_cli_adapter_and_align_targets_options():
    from elf.cli import _protocol_overrides, build_parser

    parser = build_parser()
    args = parser.parse_args(["eval", "--images", "syn.safetensors", "--adapter", "auto", "--align-targets", "--epochs", "3"])
    over = _protocol_overrides(args)
    assert over["adapter"] == "auto" and over["align_targets"] is True and over["epochs"] == 3
    get_protocol("elf", **over)  # a valid protocol
    none = _protocol_overrides(parser.parse_args(["eval", "--images", "s", "--adapter", "none"]))
    assert "adapter" in none and none["adapter"] is None and "align_targets" not in none
    plain = _protocol_overrides(parser.parse_args(["eval", "--images", "s"]))
    assert "adapter" not in plain and "align_targets" not in plain
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--images", "s", "--adapter", "linear"])


# ---- 10. study: validation_per_class ---------------------------------------------------------------------------


def test_study_measures_on_held_out_training_images(tmp_path, make_image_folder):
    from elf.data import CIFAR10_MTT
    from elf.io import SyntheticSet, save_synthetic
    from elf.study import StudyConfig, _Resources, run_study

    classes = "abc"
    make_image_folder(tmp_path / "data", 8, 6, 4, classes)  # 6 train, 4 test per class
    torch.manual_seed(0)
    save_synthetic(tmp_path / "syn.safetensors", SyntheticSet(torch.randn(6, 3, 8, 8), torch.arange(3).repeat_interleave(2),
                                                              normalization=CIFAR10_MTT, metadata={"method": "noise"}))
    cfg = StudyConfig(sets={"noise": str(tmp_path / "syn.safetensors")}, models=["ConvNetW4D2"], data=str(tmp_path / "data"),
                      variants={"baseline": {"lambda_front": 0.0, "lambda_rear": 0.0}}, seeds=[0], random_real=False,
                      overrides={"epochs": 1, "batch_size": 3}, validation_per_class=2, out=str(tmp_path / "out"))
    files = run_study(cfg, device="cpu", progress=False, log=lambda _: None)
    rec = json.loads(files[0].read_text())
    assert rec["measured_on"].startswith("validation")
    assert rec["test_n"] == 2 * len(classes)  # not the 4 test images per class
    assert "Validation accuracy" in (Path(cfg.out) / "summary.md").read_text()
    # the held-out images come out of the training data (disjoint from what remains for training)
    res = _Resources(cfg, None, lambda _: None)
    train, val = res.real("train"), res.real("test")
    assert len(val) == 2 * len(classes) and len(train) == 4 * len(classes)
    assert sorted(val.labels.tolist()) == [0, 0, 1, 1, 2, 2]
    tr = train.as_float(res.norm()).flatten(1)
    for img in val.as_float(res.norm()).flatten(1):
        assert not (tr == img).all(1).any()


def test_adapter_always_learns_projections_for_equal_shapes(data, bank128) -> None:
    """adapter="always": learned 1x1 projections both ways even when the student's cut has the teacher's shape."""
    from elf.adapters import build_adapters

    assert build_adapters("auto", (128, 4, 4), (128, 4, 4)) is None
    ad = build_adapters("always", (128, 4, 4), (128, 4, 4))
    assert ad is not None
    assert isinstance(ad.to_teacher.proj, nn.Conv2d) and isinstance(ad.to_student.proj, nn.Conv2d)
    with pytest.raises(ELFError, match="always"):
        build_adapters("sometimes", (128, 4, 4), (128, 4, 4))
    x, y = data
    tr = _trainer("ConvNet", x, y, feature_bank=bank128, adapter="always")
    tr.fit(0)
    assert tr.adapters is not None and isinstance(tr.adapters.to_teacher.proj, nn.Conv2d)
    assert sum(p.numel() for p in tr.model.parameters()) == sum(p.numel() for p in create_model("ConvNet", num_classes=K).parameters())
    plain = _trainer("ConvNet", x, y, feature_bank=bank128, adapter="auto")
    plain.fit(0)
    assert plain.adapters is None


def test_class_token_head_at_the_deepest_cut_sees_the_teacher_feature(bank128) -> None:
    """Regression: with a constant (learned) class token, a head that reads only the class token (timm's ViT cut at
    ``norm``) gave the same logits for every teacher feature, so the rear term stayed at ln(K) and trained nothing
    (seen in the H200 runs: rear = 2.303 at every logged epoch). The class token now carries the mapped feature."""
    pytest.importorskip("timm")
    x, y = _data()
    idx = torch.arange(8)
    small = FeatureBank(bank128.features[idx], {"teacher_model": "ConvNet"})
    t = _trainer(VIT, x[idx], y[idx], feature_bank=small, adapter="auto", split_at="norm", extra_epoch=False)
    t.fit(0)
    assert t.adapters is not None and t.rear is not None
    with torch.no_grad():
        logits = t.rear.eval()(t.adapters.to_student(small.features[:4]))
    assert logits.shape == (4, K)
    assert (logits - logits[:1]).abs().amax() > 1e-4  # not one row repeated: the head sees each sample's feature


def test_feature_adapter_learned_prefix_is_one_constant():
    tokens, teacher = infer_layout((65, 192)), infer_layout((128, 4, 4))
    to_tokens = FeatureAdapter(teacher, tokens, prefix="learned")
    with torch.no_grad():
        to_tokens.prefix.normal_()
    t = to_tokens(torch.randn(3, 128, 4, 4))
    for b in range(3):  # the model's own way: a learned class token, the same for every sample
        torch.testing.assert_close(t[b, 0], to_tokens.prefix[0, 0])
    assert "prefix tokens learned" in repr(to_tokens)
    with pytest.raises(ELFError, match="prefix-token mode"):
        FeatureAdapter(teacher, tokens, prefix="mean")


def test_prefix_mode_follows_what_the_rear_reads(bank128) -> None:
    """At ``norm`` the ViT's rear is its class-token head: the class token must carry the teacher feature ("pooled").
    At ``blocks.5`` attention blocks follow and fill the class token themselves, as in the model: "learned" (the
    pooled token slowed the rear there: ViT w128 at blocks.5, validation seed 0, 28.80 pooled vs 29.60 learned).
    The probe leaves the global RNG alone, so ELF and baseline models still start alike."""
    pytest.importorskip("timm")
    from elf.adapters import prefix_mode_for
    x, y = _data()
    idx = torch.arange(8)
    small = FeatureBank(bank128.features[idx], {"teacher_model": "ConvNet"})
    modes = {}
    for cut in ("norm", "blocks.5"):
        t = _trainer(VIT, x[idx], y[idx], feature_bank=small, adapter="auto", split_at=cut, epochs=0)
        t.fit(0)
        assert t.adapters is not None
        modes[cut] = t.adapters.to_student.prefix_mode
    assert modes == {"norm": "pooled", "blocks.5": "learned"}
    model = create_model(VIT, num_classes=K, im_size=(32, 32))
    model.train()
    rear = split_model(model, "norm").rear
    state = torch.get_rng_state()
    assert prefix_mode_for(rear, infer_layout((65, 192))) == "pooled"
    assert torch.equal(torch.get_rng_state(), state) and rear.training  # RNG untouched, train mode restored
    assert prefix_mode_for(rear, infer_layout((128, 4, 4))) == "learned"  # maps have no prefix tokens
    assert build_adapters("auto", (65, 192), (128, 4, 4)).to_student.prefix_mode == "pooled"  # no rear: pooled


def test_trainer_says_once_which_adapters_it_built(bank128, capsys) -> None:
    x, y = _data()
    t = _trainer("ConvNetW64", x, y, feature_bank=bank128, adapter="auto", progress=True, epochs=0, extra_epoch=False)
    t.fit(0)
    t.fit(1)
    said = [line for line in capsys.readouterr().err.replace("\r", "\n").splitlines() if "adapters bridge" in line]
    assert said == ["ConvNetW64: adapters bridge student (64, 4, 4) <-> teacher (128, 4, 4)"]


def test_align_targets_flip_moves_targets_by_flips_only(data, bank128, monkeypatch):
    """``align_targets="flip"``: the teacher maps follow the batch's flips exactly (a mirrored 4x4 map, no
    resampling) and ignore its crops, scales and rotations."""
    x, y = data
    targets = {}
    for augment, align in (("crop_flip", "flip"), ("flip", True), ("crop", "flip"), ("crop", False)):
        spy = _TargetSpy()
        monkeypatch.setattr(elf.trainer, "feature_distance", spy.wrap)
        _trainer("ConvNet", x, y, feature_bank=bank128, augment=augment, align_targets=align, epochs=1,
                 batch_size=10).fit(0)
        targets[(augment, align)] = spy.targets
    rows = bank128.features
    for t in targets[("crop_flip", "flip")]:  # each target: a stored map or its mirror image, never resampled
        for r in t:
            assert any(torch.equal(r, rows[i]) or torch.equal(r, rows[i].flip(-1)) for i in range(len(rows)))
    assert any(not any(torch.equal(r, rows[i]) for i in range(len(rows))) for t in targets[("crop_flip", "flip")]
               for r in t)  # and some are mirrored
    for a, b in zip(targets[("crop", "flip")], targets[("crop", False)]):  # crops alone: nothing to align
        assert torch.equal(a, b)
    with pytest.raises(ELFError, match="align_targets"):
        get_protocol("elf", align_targets="crop")


def test_teacher_on_augmented_replaces_a_presets_aligned_targets():
    """`features_on_augmented=True` over `elf-cross` (aligned targets) runs elf-cross with the teacher on the augmented
    batches instead (it used to fail: the two are ways to match the view), in the API, the CLI and a study variant;
    the reverse change likewise; both turned on at once still fails."""
    from elf.cli import _protocol_overrides, build_parser

    p = get_protocol("elf-cross", features_on_augmented=True)
    assert p.features_on_augmented and p.align_targets is False and p.adapter == "auto"
    back = p.replace(align_targets="flip")
    assert back.align_targets == "flip" and not back.features_on_augmented
    with pytest.raises(ELFError, match="choose one"):
        get_protocol("elf", align_targets=True, features_on_augmented=True)
    parser = build_parser()
    over = _protocol_overrides(parser.parse_args(["eval", "--images", "s", "--protocol", "elf-cross",
                                                  "--teacher-on-augmented"]))
    assert get_protocol("elf-cross", **over) == p
    both = _protocol_overrides(parser.parse_args(["eval", "--images", "s", "--teacher-on-augmented", "--align-targets"]))
    with pytest.raises(ELFError, match="choose one"):
        get_protocol("elf", **both)
    from elf.study import StudyConfig, _resolved_settings

    cfg = StudyConfig(name="x", data="d", sets={"s": "s.safetensors"}, models=["ConvNet"], protocol="elf-cross",
                      variants={"onaug": {"features_on_augmented": True}})
    cfg.check()
    assert _resolved_settings(cfg, "onaug", "ConvNet")[0] == p


def test_cli_align_targets_flip():
    from elf.cli import _protocol_overrides, build_parser

    parser = build_parser()
    over = _protocol_overrides(parser.parse_args(["eval", "--images", "s", "--align-targets", "flip"]))
    assert over["align_targets"] == "flip" and get_protocol("elf", **over).align_targets == "flip"
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--images", "s", "--align-targets", "rotate"])


def test_a_timm_vits_prefix_and_register_tokens_are_not_read_as_patches() -> None:
    """Regression: the token grid was the largest square <= N: a ViT with 4 register tokens on a 2x2 patch grid
    (9 tokens) was read as 3x3 patches with no prefix, so the rear term fed the class token a corner of the teacher
    map; a non-square grid (4x6 + class token = 25) was read as 5x5. The trainer now takes timm's grid and the
    image's aspect ratio."""
    pytest.importorskip("timm")
    x, y = torch.randn(6, 3, 32, 32), torch.arange(6) % 3
    bank = FeatureBank(torch.randn(6, 8, 4, 4), {"teacher_model": "toy"})
    kw = dict(protocol="elf", adapter="auto", epochs=1, batch_size=6, device="cpu", progress=False, augment=None)
    trainer = ELFTrainer("timm.vit_tiny_patch16_224:reg_tokens=4,depth=1", x, y, feature_bank=bank, split_at="norm", **kw)
    trainer.fit(0)
    assert trainer.adapters is not None
    source = trainer.adapters.to_teacher.source
    assert (source.grid, source.prefix) == ((2, 2), 5)
    assert infer_layout((25, 192), image_size=(32, 48)) == FeatureLayout("tokens", 192, (4, 6), prefix=1)


def test_a_non_square_map_is_not_read_as_channels_last() -> None:
    """Regression: a (C, H, W) map with C == H and H != W (ConvNetW8D1 on 16x32 images: (8, 8, 16)) was read as a
    channels-last (H, W, C) map, so the adapters mixed width columns as if they were channels."""
    x, y = torch.randn(6, 3, 16, 32), torch.arange(6) % 3
    bank = FeatureBank(torch.randn(6, 8, 4, 4), {"teacher_model": "toy"})
    kw = dict(protocol="elf", adapter="auto", epochs=1, batch_size=6, device="cpu", progress=False, augment=None)
    trainer = ELFTrainer("ConvNetW8D1", x, y, feature_bank=bank, **kw)
    trainer.fit(0)
    assert trainer.adapters is not None
    source = trainer.adapters.to_teacher.source
    assert (source.kind, source.channels, source.grid) == ("map", 8, (8, 16))
    assert infer_layout((8, 8, 16), image_size=(32, 32)).kind == "channels_last"  # a square image's channels-last stage


class _MixThenClassToken(nn.Module):
    """A rear that mixes the tokens (as attention does) and then reads the class token; its head starts at zero."""

    def __init__(self, tokens: int, dim: int, zero_head: bool) -> None:
        super().__init__()
        self.mix = nn.Linear(tokens, tokens)
        self.head = nn.Linear(dim, 3)
        if zero_head:
            nn.init.zeros_(self.head.weight)
            nn.init.zeros_(self.head.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.mix(x.transpose(1, 2)).transpose(1, 2)[:, 0])


def test_prefix_mode_sees_through_a_zero_initialized_head() -> None:
    """Regression: a rear whose head starts at zero (timm's weight_init="jax") gives equal outputs whatever it reads,
    so the probe called it a class-token head ("pooled") though the tokens are mixed before it ("learned")."""
    from elf.adapters import prefix_mode_for

    layout = infer_layout((17, 8))  # 4x4 patches + a class token
    for zero_head in (False, True):
        rear = _MixThenClassToken(17, 8, zero_head)
        before = {k: v.clone() for k, v in rear.state_dict().items()}
        assert prefix_mode_for(rear, layout) == "learned", zero_head
        assert all(torch.equal(v, rear.state_dict()[k]) for k, v in before.items())  # its weights put back
