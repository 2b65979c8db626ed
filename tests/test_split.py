"""split_model / list_split_points: rear(front(x)) == model(x), shared parameters, gradients, errors."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torchvision
from torch import nn

from elf import ELFError, create_model, list_models, list_split_points, split_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

SIZES = {"ConvNetD4": 64, "ConvNetD5": 128}
BUILTINS = [n for n in list_models() if not n.startswith(("torchvision.", "timm."))]


def _x(size: int = 32, n: int = 2, channel: int = 3, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, channel, size, size, generator=torch.Generator().manual_seed(seed))


def _check_equal_both_modes(model: nn.Module, at: str, x: torch.Tensor) -> None:
    front, rear = split_model(model, at)
    # train mode: identical RNG state for dropout; BatchNorm uses batch statistics on both paths
    model.train()
    torch.manual_seed(123)
    want = model(x)
    torch.manual_seed(123)
    got = rear(front(x))
    assert got.shape == want.shape
    assert torch.equal(got, want), f"train mode, cut {at!r}: max diff {(got - want).abs().max()}"
    model.eval()
    with torch.no_grad():
        want = model(x)
        got = rear(front(x))
    assert torch.equal(got, want), f"eval mode, cut {at!r}: max diff {(got - want).abs().max()}"


def _points_for(model: nn.Module, size: int) -> list[str]:
    points = list_split_points(model, (3, size, size))
    names = [p.name for p in points]
    others = [names[0], names[len(names) // 2]]
    default = getattr(model, "elf_split_point", None)
    if default is None:  # a model without a default cut (DC's MLP): its listed points only
        return others
    assert any(default == p.name or default in p.aliases for p in points)
    return [default] + [p for p in others if p != default]


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_split_equals_model(name):
    size = SIZES.get(name, 32)
    torch.manual_seed(0)
    model = create_model(name, im_size=(size, size))
    x = _x(size)
    for at in _points_for(model, size):
        _check_equal_both_modes(model, at, x)


@pytest.mark.parametrize(
    "arch,points",
    [("resnet18", ["layer3", "layer2.0", "layer4.0"]), ("vgg11_bn", ["features.14", "avgpool", "classifier.2"]),
     ("mobilenet_v2", ["features.7", "features.0"])],
)  # fmt: skip
def test_torchvision_split_equals_model(arch, points):
    torch.manual_seed(0)
    model = getattr(torchvision.models, arch)(num_classes=10, weights=None)
    x = _x(32)
    for at in points:
        _check_equal_both_modes(model, at, x)


def test_torchvision_front_equals_feature_extractor():
    from torchvision.models.feature_extraction import create_feature_extractor

    model = torchvision.models.resnet18(num_classes=10, weights=None).eval()
    x = _x(32)
    with torch.no_grad():
        want = create_feature_extractor(model, {"layer2": "f"})(x)["f"]
        got = split_model(model, "layer2").front(x)
    assert torch.equal(got, want)


# ---- sharing, gradients, running statistics --------------------------------------------------------------------


@pytest.mark.parametrize("name,at", [("ConvNetBN", "features"), ("ResNet18BN", "layer4.0"), ("VGG11", "features.17")])
def test_parameters_and_buffers_are_shared(name, at):
    model = create_model(name)
    front, rear = split_model(model, at)
    model_params = {id(p): p for p in model.parameters()}
    split_params = list(front.parameters()) + list(rear.parameters())
    assert split_params, "front/rear expose no parameters"
    assert {id(p) for p in split_params} == set(model_params)
    assert {p.data_ptr() for p in split_params} == {p.data_ptr() for p in model.parameters()}
    model_buffers = {id(b) for b in model.buffers()}
    assert {id(b) for b in list(front.buffers()) + list(rear.buffers())} == model_buffers
    # a weight change through the model is seen by the split
    x = _x(32)
    model.eval()
    with torch.no_grad():
        before = rear(front(x)).clone()
        model.classifier.bias.add_(1.0)
        after = rear(front(x))
    assert torch.allclose(after, before + 1.0, atol=1e-5)


@pytest.mark.parametrize("name,at,first,last", [("ConvNetBN", "features", "features.0.weight", "classifier.weight"),
                                                ("ResNet18BN", "layer4.0", "conv1.weight", "layer4.1.conv1.weight")])
def test_gradients_reach_both_sides_of_the_cut(name, at, first, last):
    torch.manual_seed(0)
    model = create_model(name)
    reference = copy.deepcopy(model)
    front, rear = split_model(model, at)
    x = _x(32)
    model.zero_grad(set_to_none=True)
    rear(front(x)).square().sum().backward()
    reference(x).square().sum().backward()
    grads = dict(model.named_parameters())
    ref = dict(reference.named_parameters())
    for key in (first, last, "classifier.bias"):
        assert grads[key].grad is not None, f"no gradient for {key}"
        assert grads[key].grad.abs().sum() > 0
        assert torch.allclose(grads[key].grad, ref[key].grad, rtol=1e-4, atol=1e-6), key


def test_batchnorm_running_stats_through_split_are_the_models():
    torch.manual_seed(0)
    model = create_model("ConvNetBN")
    reference = copy.deepcopy(model)
    front, rear = split_model(model, "features")
    bn_first, bn_last = model.features[1], model.features[9]
    x = _x(32, n=4)
    model.train()
    reference.train()
    rear(front(x))
    reference(x)
    assert int(bn_first.num_batches_tracked) == 1 and int(bn_last.num_batches_tracked) == 1
    assert not torch.equal(bn_first.running_mean, torch.zeros_like(bn_first.running_mean))
    for key, value in reference.state_dict().items():
        assert torch.equal(model.state_dict()[key], value), key


def test_split_follows_eval_for_builtins_without_retracing():
    torch.manual_seed(0)
    model = create_model("ConvNetBN")
    front, rear = split_model(model, "features")
    x = _x(32)
    model.eval()
    with torch.no_grad():
        want = model(x)
        got = rear(front(x))
    assert torch.equal(got, want)
    assert int(model.features[1].num_batches_tracked) == 0  # eval through the split did not update stats


class _ModeNet(nn.Module):
    """Forward depends on self.training before the cut: train and eval graphs differ."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 4, 3, padding=1)
        self.head = nn.Linear(4 * 8 * 8, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.training:
            x = x + 1.0
        return self.head(self.body(x).flatten(1))


def test_mode_dependent_model_split_in_its_creation_mode():
    x = _x(8)
    model = _ModeNet().train()
    front, rear = split_model(model, "body")
    assert torch.equal(rear(front(x)), model(x))
    model = _ModeNet().eval()
    front, rear = split_model(model, "body")
    with torch.no_grad():
        assert torch.equal(rear(front(x)), model(x))


def test_mode_dependent_model_split_follows_model_eval():
    x = _x(8)
    model = _ModeNet().train()
    front, rear = split_model(model, "body")
    model.eval()
    with torch.no_grad():
        assert torch.allclose(rear(front(x)), model(x))


def test_rear_does_not_modify_front_output():
    model = create_model("ConvNetW16")
    front, rear = split_model(model, "features.9")  # norm of the 3rd block; features.10 is ReLU(inplace=True)
    h = front(_x(32))
    saved = h.clone()
    rear(h)
    assert torch.equal(h, saved)
    # regression: an in-place op on a *view* of the cut tensor (flatten, then Dropout(inplace=True)) changed it too
    head = nn.Sequential(nn.Conv2d(3, 4, 3), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Dropout(0.5, inplace=True),
                         nn.Linear(4, 3)).train()
    front, rear = split_model(head, "1")
    h = front(_x(8))
    saved = h.clone()
    rear(h)
    assert torch.equal(h, saved)


# ---- list_split_points -------------------------------------------------------------------------------------------


def test_list_split_points_shapes_match_front_outputs_for_every_point():
    torch.manual_seed(0)
    model = create_model("ConvNetW16BN")
    x = _x(32)
    points = list_split_points(model, (3, 32, 32))
    assert [p.name for p in points][:4] == ["features.0", "features.1", "features.2", "features.3"]
    assert "classifier" not in [p.name for p in points]  # the last node is not a cut
    model.eval()
    for p in points:
        for name in (p.name,) + p.aliases:
            with torch.no_grad():
                out = split_model(model, name).front(x)
            assert tuple(out.shape[1:]) == p.shape, name
    shapes = {p.name: p.shape for p in points}
    assert shapes["features"] == (16, 4, 4)
    assert shapes["features.3"] == (16, 16, 16)


def test_list_split_points_resnet18():
    torch.manual_seed(0)
    model = create_model("ResNet18")
    points = list_split_points(model, (3, 32, 32))
    by_name = {p.name: p for p in points}
    assert by_name["layer4.0"].shape == (512, 4, 4)
    assert by_name["layer3"].shape == (256, 8, 8)
    assert by_name["layer1"].shape == (64, 32, 32)
    all_names = {n for p in points for n in (p.name,) + p.aliases}
    for inside in ("layer4.0.conv2", "layer4.0.bn2", "layer4.0.conv1", "layer3.1.conv1"):
        assert inside not in all_names
    x = _x(32)
    model.eval()
    for name in ("conv1", "layer2.0", "layer3", "layer4.0", "flatten"):
        with torch.no_grad():
            assert tuple(split_model(model, name).front(x).shape[1:]) == by_name[name].shape, name
    assert model.training is False  # left as it was (eval)


def test_list_split_points_does_not_change_mode_or_stats():
    model = create_model("ConvNetW16BN").train()
    before = copy.deepcopy(model.state_dict())
    list_split_points(model, (3, 32, 32))
    assert model.training
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_list_split_points_bad_input_shape_raises_elferror():
    with pytest.raises(ELFError, match="input_shape"):
        list_split_points(create_model("ConvNetW16"), (3, 16, 16))  # classifier was built for 32x32


# ---- errors ------------------------------------------------------------------------------------------------------


def test_unknown_point_names_close_match_and_list_split_points():
    with pytest.raises(ELFError) as info:
        split_model(create_model("ConvNetW16"), "featurs")
    msg = str(info.value)
    assert "'featurs'" in msg and "features" in msg.replace("'featurs'", "")
    assert "list_split_points" in msg


def test_unknown_point_in_resnet_suggests_the_right_layer():
    with pytest.raises(ELFError) as info:
        split_model(create_model("ResNet18"), "layer4.0.cnv2")
    assert "layer4.0.conv2" in str(info.value)


def test_cut_crossed_by_skip_names_the_tensors():
    with pytest.raises(ELFError) as info:
        split_model(create_model("ResNet18"), "layer4.0.conv2")
    msg = str(info.value)
    assert "crossed by 2 tensors" in msg
    assert "layer4.0.conv2" in msg and "layer3.1.relu_1" in msg  # the cut tensor and the skip tensor


class _Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Conv2d(3, 3, 3, padding=1)
        self.b = nn.Conv2d(3, 3, 3, padding=1)
        self.head = nn.Linear(3 * 4 * 4, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.b(torch.relu(self.a(x))) + x
        return self.head(y.flatten(1))


def test_small_residual_model_cuts():
    model = _Residual()
    names = {p.name for p in list_split_points(model, (3, 4, 4))}
    assert "a" not in names and "relu" not in names and "add" in names
    for at in ("a", "relu", "b"):
        with pytest.raises(ELFError, match="crossed by 2 tensors"):
            split_model(model, at)
    front, rear = split_model(model, "add")
    x = _x(4)
    assert torch.equal(rear(front(x)), model(x))


def test_last_node_is_refused():
    with pytest.raises(ELFError, match="last operation"):
        split_model(create_model("ConvNetW16"), "classifier")


class _Branchy(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.sum() > 0:  # data-dependent control flow: untraceable
            return x * 2
        return x - 1


class _BranchyTop(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3)
        self.head = nn.Linear(4 * 6 * 6, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv(x)
        if h.mean() > 0:
            h = h * 2
        return self.head(h.flatten(1))


def _branchy_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(3, 4, 3), _Branchy(), nn.Flatten(), nn.Linear(4 * 6 * 6, 2))


@pytest.mark.parametrize("model_fn", [_branchy_model, _BranchyTop])
def test_untraceable_model_error_mentions_leaf_modules_and_pair(model_fn):
    with pytest.raises(ELFError) as info:
        split_model(model_fn(), "0" if model_fn is _branchy_model else "conv")
    msg = str(info.value)
    assert "leaf_modules" in msg and "(front, rear)" in msg


def test_leaf_modules_make_branching_submodule_splittable():
    model = _branchy_model()
    for at in ("0", "1"):
        front, rear = split_model(model, at, leaf_modules=[_Branchy])
        for sign in (1.0, -1.0):  # both branches of the leaf
            x = sign * _x(8).abs() + sign * 5
            assert torch.equal(rear(front(x)), model(x))
    names = [p.name for p in list_split_points(model, (3, 8, 8), leaf_modules=[_Branchy])]
    assert names[:3] == ["0", "1", "2"]


@pytest.mark.parametrize("name", ["ConvNet", "ConvNetBN", "ResNet18BN", "VGG11", "AlexNet"])
def test_forward_features_point(name):
    torch.manual_seed(0)
    model = create_model(name)
    front, rear = split_model(model, "forward_features")
    x = _x(32)
    model.eval()
    with torch.no_grad():
        assert torch.equal(front(x), model.forward_features(x))
        assert torch.equal(rear(front(x)), model(x))
    assert {id(p) for p in front.parameters()} == {id(p) for p in model.parameters()}


def test_forward_features_point_needs_the_methods():
    with pytest.raises(ELFError, match="forward_features"):
        split_model(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2)), "forward_features")


class _TrainOnlyAux(nn.Module):
    """Deep supervision: in train mode an auxiliary head on ``a``'s output is added to the logits."""

    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.b = nn.Sequential(nn.Conv2d(8, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2))
        self.aux = nn.Linear(8, 10)
        self.head = nn.Linear(8 * 8 * 8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.a(x)
        out = self.head(torch.flatten(self.b(h), 1))
        return out + 0.3 * self.aux(h.mean((2, 3))) if self.training else out


def test_listed_points_are_valid_in_train_mode_too():
    """list_split_points traced only the eval graph: it listed cuts (b, flatten) that a training-only branch crosses,
    which split_model (and auto_split_point's choice) then refused."""
    model = _TrainOnlyAux()
    names = [p.name for p in list_split_points(model)]
    assert names == ["a.0", "a.1", "a"]
    for name in names:
        split_model(model, name)


def test_a_tuple_valued_cut_is_not_listed():
    """A cut after chunk() is crossed by one node whose value is a tuple: listed with shape '?', its split failed."""

    class Chunk(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.c = nn.Conv2d(3, 8, 3, padding=1)
            self.r = nn.ReLU(inplace=True)
            self.h = nn.Linear(4 * 32 * 32, 10)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            a, b = self.c(x).chunk(2, 1)
            return self.h(torch.flatten(self.r(a) + b, 1))

    points = list_split_points(Chunk())
    assert [p.name for p in points] == ["c", "add", "flatten"] and all(p.shape is not None for p in points)


def test_hooks_on_the_model_itself_warn():
    """fx tracing drops hooks registered on the traced module itself: training through front/rear differed from
    model(x) (evaluation) without a word; hooks on submodules are kept and do not warn."""
    import warnings

    model = _TrainOnlyAux()
    model.a.register_forward_hook(lambda m, i, o: o * 2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        split_model(model, "a")
    model.register_forward_pre_hook(lambda m, inp: (inp[0].flip(-1),))
    with pytest.warns(UserWarning, match="forward pre-hooks on the model itself"):
        split_model(model, "a")


def test_a_model_that_cannot_run_on_the_shape_says_why(capsys):
    """The model's own error (channels) is named, and ShapeProp's traceback is not printed to the terminal."""
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), nn.Flatten())
    with pytest.raises(ELFError, match=r"\(3, 32, 32\) failed \(RuntimeError: .*to have 1 channels"):
        list_split_points(model)
    assert capsys.readouterr().err == ""


def _private_shift(x: torch.Tensor) -> torch.Tensor:
    return x + 1


def public_shift(x: torch.Tensor) -> torch.Tensor:
    return x + 1


class _ShiftNet(nn.Module):
    def __init__(self, fn) -> None:
        super().__init__()
        self.fn = fn
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (_private_shift(self.conv(x)) if self.fn is _private_shift else public_shift(self.conv(x))).mean((2, 3))


def test_autowrap_function_with_a_private_name_warns():
    """torch.fx silently traces through an autowrap function called by a name starting with '_': say so up front."""
    from elf import SplitOptions

    private = SplitOptions(autowrap_functions=(_private_shift,))
    with pytest.warns(UserWarning, match="'_private_shift'.*does not start with '_'"):
        names = [p.name for p in list_split_points(_ShiftNet(_private_shift), (3, 8, 8), options=private)]
    assert "_private_shift" not in names and "add" in names  # what the warning says: it was traced through
    public = SplitOptions(autowrap_functions=(public_shift,))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        names = [p.name for p in list_split_points(_ShiftNet(public_shift), (3, 8, 8), options=public)]
    assert "public_shift" in names


def _gate(x: torch.Tensor) -> torch.Tensor:
    return x * 2


gate = _gate  # the public name the model calls: torch.fx wraps it


class _GateNet(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return gate(self.conv(x)).mean((2, 3))


def test_a_private_function_called_by_a_public_name_is_wrapped_without_a_warning():
    """Regression: the warning looked at the function's own __name__; bound to a public name (as it advised), fx wraps
    it, and the warning must not fire."""
    from elf import SplitOptions

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        names = [p.name for p in list_split_points(_GateNet(), (3, 8, 8), options=SplitOptions(autowrap_functions=(gate,)))]
    assert "_gate" in names and "mul" not in names


def test_splitting_and_evaluating_keep_each_submodules_mode() -> None:
    """Regression: split_model, list_split_points, FeatureBank.build and the trainer's checks restored the model's
    mode with model.train(was_training), which sets every submodule to the root's flag: a model with frozen
    BatchNorm layers (eval mode inside a training model) came back with all of them training."""
    from elf import FeatureBank, create_model
    from elf.modes import in_mode

    model = create_model("ResNet18BN").train()
    frozen = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)][:5]
    for m in frozen:
        m.eval()
    modes = [m.training for m in model.modules()]
    split_model(model, "layer4.0")
    list_split_points(model, (3, 32, 32))
    FeatureBank.build(model, torch.randn(2, 3, 32, 32), "layer4.0")
    assert [m.training for m in model.modules()] == modes
    with pytest.raises(RuntimeError), in_mode(model, False):
        assert not any(m.training for m in model.modules())
        raise RuntimeError("restored after an exception too")
    assert [m.training for m in model.modules()] == modes


class _TrainNoise(nn.Module):
    """A train-only branch before the cut: node names after it shift between the train and eval graphs."""

    def __init__(self, noise_module: bool = False) -> None:
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1)
        self.noise = nn.Dropout(0.1) if noise_module else None
        self.fc = nn.Linear(8, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv1(x)
        if self.training:
            x = self.noise(x) if self.noise is not None else x + 0.1
        x = self.conv2(x) + 1
        return self.fc(x.mean((2, 3)))


def test_a_point_name_that_means_two_places_in_train_and_eval_mode_is_refused():
    """Regression: the point was looked up by name in the train and the eval graph separately, so node 'add' cut
    after conv2 in eval mode but before it (at the train-only add) in train mode: ELF trained the teacher's feature
    into another tensor than the one the shapes were checked on, silently."""
    model = _TrainNoise()
    with pytest.raises(ELFError, match=r"'add' of _TrainNoise is not the same place in train and eval mode.*conv2"):
        split_model(model, "add")
    assert "add" not in [p.name for p in list_split_points(model, (3, 8, 8))]
    x = torch.randn(2, 3, 8, 8)
    for m in (model, _TrainNoise(noise_module=True)):  # a module path names one place in both modes
        front, rear = split_model(m, "conv2")
        for train in (True, False):
            m.train(train)
            torch.manual_seed(0)
            want = m(x)
            torch.manual_seed(0)
            torch.testing.assert_close(rear(front(x)), want)
        m.eval()
        torch.testing.assert_close(front(x), m.conv2(m.conv1(x)))


class _ClampInPlace(nn.Module):
    """A leaf module (not traced) that writes into its input."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.clamp_(min=0)


class _InPlaceHead(nn.Module):
    """``forward_head`` starts with an in-place ReLU (``inplace_relu``); ``gate`` is a leaf that clamps in place."""

    def __init__(self, inplace_relu: bool) -> None:
        super().__init__()
        self.body = nn.Conv2d(3, 8, 3, padding=1)
        self.gate = _ClampInPlace()
        self.head = nn.Sequential(nn.ReLU(inplace=inplace_relu), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(8, 10))

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.gate(self.forward_features(x)))


def test_the_rear_never_writes_into_the_front_output():
    """Regression: the rear runs on a copy when it may write in place, but the forward_features/forward_head path
    and leaf modules of the user's (untraced code) skipped that guard: the rear's in-place ReLU/clamp changed the
    front output that ELF's feature loss reads (measured: another front loss than the traced cut gave)."""
    x = torch.randn(2, 3, 8, 8)
    for at, inplace_relu, options in (("forward_features", True, {}), ("body", False, {"leaf_modules": [_ClampInPlace]})):
        front, rear = split_model(_InPlaceHead(inplace_relu).eval(), at, **options)
        h = front(x)
        before = h.clone()
        assert before.min() < 0
        rear(h)
        assert torch.equal(h, before), at


class _BatchUpFront(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.MaxPool2d(4))
        self.fc = nn.Linear(8 * 2 * 2, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        return self.fc(self.features(x).reshape(b, -1))


def test_a_shape_read_before_the_cut_is_named_as_the_cause():
    """Regression: ``b = x.shape[0]`` at the top of forward crosses every cut; the error called it 'e.g. a residual
    skip connection' and suggested cutting at a block boundary, which cannot help."""
    with pytest.raises(ELFError, match=r"the input's shape is read before the cut \('getitem'; .*x\.flatten\(1\)") as e:
        split_model(_BatchUpFront(), "features")
    assert "residual" not in str(e.value)
