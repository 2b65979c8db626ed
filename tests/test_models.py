"""Built-in models: names, shapes, parameter layout (published ConvNet / MTT format), default split points."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import elf
from elf import ELFError, create_model, default_split_point, list_models, register_model, split_model
from elf.models import registry

pytestmark = pytest.mark.usefixtures("torch_single_thread")

# input side per built-in name (everything else at 32x32)
SIZES = {"ConvNetD4": 64, "ConvNetD5": 128}
BUILTINS = [n for n in list_models() if not n.startswith(("torchvision.", "timm."))]


def _x(size: int, n: int = 2, channel: int = 3) -> torch.Tensor:
    return torch.randn(n, channel, size, size, generator=torch.Generator().manual_seed(0))


def test_list_models_has_the_papers_models():
    names = set(list_models())
    for name in ("ConvNet", "ConvNetBN", "ConvNetW512", "ConvNetD4", "ResNet18", "ResNet18BN", "VGG11", "VGG11BN", "AlexNet"):
        assert name in names
    assert "torchvision.<name>" in names and "timm.<name>" in names
    assert len(BUILTINS) >= 15


@pytest.mark.parametrize("name", BUILTINS)
def test_builtin_builds_and_gives_logits(name):
    size = SIZES.get(name, 32)
    torch.manual_seed(0)
    model = create_model(name, num_classes=7, im_size=(size, size))
    assert isinstance(model, nn.Module)
    model.eval()
    with torch.no_grad():
        out = model(_x(size))
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    assert model.elf_model_name == name


@pytest.mark.parametrize("name,size", [("ResNet18", 64), ("VGG11", 64), ("ConvNetD4", 64)])
def test_64px_models(name, size):
    model = create_model(name, num_classes=200, im_size=(size, size)).eval()
    with torch.no_grad():
        assert model(_x(size)).shape == (2, 200)


def test_one_channel_convnet_pads_like_published_code():
    model = create_model("ConvNet", channel=1, im_size=(28, 28)).eval()
    assert model.features[0].padding == (3, 3)
    with torch.no_grad():
        assert model(_x(28, channel=1)).shape == (2, 10)
        assert model.features(_x(28, channel=1)).shape == (2, 128, 4, 4)


# ---- the published ConvNet layout -------------------------------------------------------------------------------


def test_convnet_parameter_names_and_order_equal_published_convnet():
    model = create_model("ConvNet")
    names = [n for n, _ in model.named_parameters()]
    assert names == [
        "features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias",
        "features.4.weight", "features.4.bias", "features.5.weight", "features.5.bias",
        "features.8.weight", "features.8.bias", "features.9.weight", "features.9.bias",
        "classifier.weight", "classifier.bias",
    ]  # fmt: skip
    shapes = [tuple(p.shape) for p in model.parameters()]
    assert shapes[0] == (128, 3, 3, 3)
    assert shapes[4] == (128, 128, 3, 3)
    assert shapes[-2] == (10, 2048)
    # layer types at the published positions: conv, norm (instance norm = GroupNorm(C, C)), relu, avg pool
    f = model.features
    assert isinstance(f[0], nn.Conv2d) and isinstance(f[1], nn.GroupNorm) and f[1].num_groups == 128
    assert isinstance(f[2], nn.ReLU) and isinstance(f[3], nn.AvgPool2d)


def test_default_convnet_has_320010_parameters():
    assert sum(p.numel() for p in create_model("ConvNet").parameters()) == 320_010
    assert sum(p.numel() for p in elf.ConvNet().parameters()) == 320_010


def test_mtt_parameter_list_loads_by_zip_copy():
    torch.manual_seed(1)
    source = create_model("ConvNet")
    params = [p.detach().clone() for p in source.parameters()]  # MTT snapshot: list in parameters() order
    torch.manual_seed(2)
    target = create_model("ConvNet")
    x = _x(32)
    assert not torch.allclose(source(x), target(x))
    assert len(params) == len(list(target.parameters()))
    with torch.no_grad():
        for p, t in zip(target.parameters(), params):
            p.copy_(t)
    assert torch.equal(source(x), target(x))


def test_convnet_bn_state_dict_has_running_stats():
    keys = create_model("ConvNetBN").state_dict().keys()
    assert "features.1.running_mean" in keys and "features.1.num_batches_tracked" in keys


# ---- literature names ------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,width,depth,norm_type",
    [
        ("ConvNet-BN", 128, 3, nn.BatchNorm2d),
        ("convnet-bn", 128, 3, nn.BatchNorm2d),
        ("ConvNetW512", 512, 3, nn.GroupNorm),
        ("convnetw512", 512, 3, nn.GroupNorm),
        ("ConvNetD4", 128, 4, nn.GroupNorm),
        ("ConvNetW512BN", 512, 3, nn.BatchNorm2d),
        ("CONVNET_W512_BN", 512, 3, nn.BatchNorm2d),
        ("ConvNetD4W512", 512, 4, nn.GroupNorm),
        ("ConvNetLN", 128, 3, nn.LayerNorm),
    ],
)
def test_literature_names_parse(name, width, depth, norm_type):
    model = create_model(name, im_size=(64, 64) if depth == 4 else (32, 32))
    assert model.width == width and model.depth == depth
    convs = [m for m in model.features if isinstance(m, nn.Conv2d)]
    assert len(convs) == depth and all(c.out_channels == width for c in convs)
    assert any(isinstance(m, norm_type) for m in model.features)


def test_name_tokens_for_activation_pooling_and_no_norm():
    model = create_model("ConvNetNN")
    assert not any(isinstance(m, (nn.GroupNorm, nn.BatchNorm2d, nn.LayerNorm)) for m in model.features)
    assert any(isinstance(m, nn.MaxPool2d) for m in create_model("ConvNetMP").features)
    assert any(isinstance(m, nn.Sigmoid) for m in create_model("ConvNetAS").features)
    assert not any(isinstance(m, (nn.AvgPool2d, nn.MaxPool2d)) for m in create_model("ConvNetNP").features)


@pytest.mark.parametrize("name", ["ResNet18BN", "resnet18bn", "ResNet-18-BN", "resnet_18_bn"])
def test_resnet_names_are_case_and_dash_insensitive(name):
    model = create_model(name)
    assert isinstance(model, elf.ResNet)
    assert isinstance(model.bn1, nn.BatchNorm2d)


def test_resnet18_instance_norm_by_default():
    assert isinstance(create_model("ResNet18").bn1, nn.GroupNorm)
    assert isinstance(create_model("VGG11").features[1], nn.GroupNorm)
    assert isinstance(create_model("VGG11BN").features[1], nn.BatchNorm2d)


@pytest.mark.parametrize("name,hint", [("ResNet19", "ResNet18"), ("VGG12", "VGG11"), ("AlexNett", "AlexNet")])
def test_unknown_name_raises_with_close_match(name, hint):
    with pytest.raises(ELFError) as info:
        create_model(name)
    assert hint in str(info.value)
    assert "Did you mean" in str(info.value)


@pytest.mark.parametrize("name", ["ConvNetXYZ", "ConvNetW", "Transformer"])
def test_garbage_names_raise_elferror(name):
    with pytest.raises(ELFError, match="unknown model"):
        create_model(name)


def test_unknown_torchvision_name_raises_elferror():
    with pytest.raises(ELFError, match="torchvision"):
        create_model("torchvision.not_a_model")


def test_torchvision_prefix_builds_with_num_classes():
    model = create_model("torchvision.resnet18", num_classes=7)
    assert model.fc.out_features == 7


def test_torchvision_model_refuses_other_channel_counts():
    with pytest.raises(ELFError, match="3-channel images"):
        create_model("torchvision.resnet18", channel=1, num_classes=10)


def test_builtin_kwargs_are_not_silently_ignored():
    assert create_model("ConvNet", width=64).width == 64
    assert create_model("ConvNet:width=48").width == 48
    with pytest.raises(ELFError, match="cannot be called"):
        create_model("ResNet18", width=64)  # a built-in that takes no width says so


def test_bad_convnet_configuration_raises_elferror():
    with pytest.raises(ELFError):
        elf.ConvNet(depth=6, im_size=(32, 32))  # pools 32 px below 1
    with pytest.raises(ELFError):
        elf.ConvNet(norm="weirdnorm")
    with pytest.raises(ELFError):
        elf.ConvNet(pooling="median")


# ---- default split points ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "name,expected",
    [("ConvNet", (128, 4, 4)), ("ConvNetBN", (128, 4, 4)), ("ResNet18", (512, 4, 4)), ("ResNet18BN", (512, 4, 4)),
     ("VGG11", (512, 4, 4)), ("VGG11BN", (512, 4, 4)), ("AlexNet", (192, 4, 4))],
)  # fmt: skip
def test_default_split_point_shape_at_32px(name, expected):
    model = create_model(name).eval()
    point = default_split_point(model)
    assert point == model.elf_split_point
    front, _ = split_model(model, point)
    with torch.no_grad():
        assert tuple(front(_x(32)).shape[1:]) == expected


def test_default_split_matches_convnet_teachers_at_32px():
    x = _x(32)
    with torch.no_grad():
        w512 = create_model("ConvNetW512").eval().features(x).shape[1:]
        w128 = create_model("ConvNet").eval().features(x).shape[1:]
        for name in ("ResNet18", "ResNet18BN", "VGG11", "VGG11BN"):
            model = create_model(name).eval()
            assert split_model(model, model.elf_split_point).front(x).shape[1:] == w512
        model = create_model("ConvNetBN").eval()
        assert split_model(model, model.elf_split_point).front(x).shape[1:] == w128
    assert tuple(w512) == (512, 4, 4)


@pytest.mark.parametrize(("name", "teacher", "shape"), [("ResNet18", "ConvNetD4W256", (256, 4, 4)),
                                                          ("VGG11", "ConvNetD4W512", (512, 4, 4))])
def test_default_split_matches_elfs_teacher_at_64px(name, teacher, shape):
    """At 64x64 the default cuts are the ELF code's (ResNet18ImageNet_L4: after the third stage, teacher
    ConvNetD4W256; VGG11ImageNet_L6: after the pool that follows the 6th conv, teacher ConvNetD4W512)."""
    x = _x(64)
    with torch.no_grad():
        teacher_shape = create_model(teacher, im_size=(64, 64)).eval().features(x).shape[1:]
        model = create_model(name, im_size=(64, 64)).eval()
        front_shape = split_model(model, model.elf_split_point).front(x).shape[1:]
    assert tuple(teacher_shape) == shape
    assert front_shape == teacher_shape


def test_64px_resnet_and_vgg_are_the_elf_codes_imagenet_models():
    """Regression: at 64x64 (Tiny-ImageNet) ResNet-18 had a stride-2 3x3 stem no code base uses and VGG-11 a single
    linear head; the ELF code's ResNet18ImageNet (7x7/2 stem + max-pool) and VGG11ImageNet (4096-4096 head) have
    11,279,112 and 35,219,400 parameters for 200 classes."""
    count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
    resnet = create_model("ResNet18", num_classes=200, im_size=(64, 64))
    assert count(resnet) == 11_279_112 and resnet.conv1.kernel_size == (7, 7)
    assert count(create_model("ResNet18ImageNet", num_classes=200, im_size=(64, 64))) == 11_279_112
    assert count(create_model("VGG11", num_classes=200, im_size=(64, 64))) == 35_219_400
    assert count(create_model("ResNet18", num_classes=10)) == 11_173_962  # 32x32: unchanged, DC's CIFAR ResNet
    assert count(create_model("VGG11", num_classes=10)) == 9_231_114


def test_vgg_default_point_depends_on_size():
    assert create_model("VGG11").elf_split_point == "features.17"
    assert create_model("VGG11", im_size=(64, 64)).elf_split_point == "features.21"


def test_default_split_point_missing_raises_elferror():
    with pytest.raises(ELFError, match="list_split_points"):
        default_split_point(nn.Sequential(nn.Linear(2, 2)))


# ---- registry hook -----------------------------------------------------------------------------------------------


class _Tiny(nn.Module):
    def __init__(self, channel: int, num_classes: int) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Conv2d(channel, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.head = nn.Linear(16, num_classes)
        self.elf_split_point = "body"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x).flatten(1))


def test_register_model_hook(monkeypatch):
    monkeypatch.setattr(registry, "_REGISTRY", dict(registry._REGISTRY))  # keep the global registry clean
    calls = []

    def builder(channel, num_classes, im_size):
        calls.append((channel, num_classes, im_size))
        return _Tiny(channel, num_classes)

    register_model("MyTinyNet", builder, "a test model")
    assert list_models()["MyTinyNet"] == "a test model"
    model = create_model("mytinynet", channel=1, num_classes=5, im_size=(16, 16))
    assert calls == [(1, 5, (16, 16))]
    assert isinstance(model, _Tiny) and model.elf_model_name == "MyTinyNet"
    assert default_split_point(model) == "body"
    front, rear = split_model(model, default_split_point(model))
    x = _x(16, channel=1)
    assert front(x).shape == (2, 4, 2, 2)
    assert torch.equal(rear(front(x)), model(x))


class _WithToken(nn.Module):
    """A module holding a parameter of its own (like a ViT's class token) next to layers with reset_parameters."""

    def __init__(self) -> None:
        super().__init__()
        self.token = nn.Parameter(torch.ones(4))
        self.fc = nn.Linear(4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1)[:, :4] + self.token)


def test_a_module_given_as_the_model_warns_about_parameters_it_cannot_reset() -> None:
    """Regression: a module spec's own parameters (no reset_parameters) silently kept the given values in every seed."""
    from elf.models.registry import build_model

    given = _WithToken()
    with pytest.warns(UserWarning, match="token belong to modules without reset_parameters"):
        fresh = build_model(given, (3, 2, 2), 3)
    assert torch.equal(fresh.token, given.token) and not torch.equal(fresh.fc.weight, given.fc.weight)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        build_model(nn.Sequential(nn.Flatten(), nn.Linear(12, 3)), (3, 2, 2), 3)  # every parameter is reset: silent
        build_model(_WithToken, (3, 2, 2), 3)  # a factory builds afresh: silent


@pytest.mark.parametrize("name", ["ResNet18_AP", "ResNet18BN_AP"])
def test_resnet18_ap_is_dcs(name):
    """DC/MTT's ResNet18_AP (MTT's cross-architecture pool): stride-1 convs with 2x2 average pools, the last stage
    flattened into the classifier; 11,250,762 parameters at 32x32 (checked against the official definition, weights
    copied in state-dict order, outputs equal), its state-dict keys DC's, and the ELF cut 512x4x4 at layer4.0."""
    model = create_model(name).eval()
    assert sum(p.numel() for p in model.parameters()) == 11_250_762
    keys = model.state_dict().keys()
    assert "layer2.0.shortcut.2.weight" in keys and model.classifier.weight.shape == (10, 512 * 4 * 4)
    x = _x(32)
    with torch.no_grad():
        assert split_model(model, model.elf_split_point).front(x).shape[1:] == (512, 4, 4)
        assert model(x).shape == (x.shape[0], 10)
    assert create_model(name.replace("_", "-")).elf_model_name == name  # typed with '-' or '_' alike


@pytest.mark.parametrize(("elf_name", "ours", "size"), [
    ("ConvNet_L3", "ConvNet", 32), ("ConvNetBN_L3", "ConvNetBN", 32), ("ResNet18_Layered", "ResNet18", 32),
    ("ResNet18BN_Layered", "ResNet18BN", 32), ("VGG11_L5", "VGG11", 32), ("VGG11BN_L5", "VGG11BN", 32),
    ("ConvNetD4_L4", "ConvNetD4", 64), ("ResNet18ImageNet_L4", "ResNet18ImageNet", 64),
    ("VGG11ImageNet_L6", "VGG11", 64), ("VGG11BNImageNet", "VGG11BN", 64)])
def test_the_elf_codes_model_names_are_accepted(elf_name, ours, size):
    """Users coming from the ELF scripts type their layered names: the same networks, our default cut."""
    a = create_model(elf_name, im_size=(size, size))
    b = create_model(ours, im_size=(size, size))
    assert a.elf_model_name == ours and repr(a) == repr(b) and a.elf_split_point == b.elf_split_point


@pytest.mark.parametrize(("name", "match"), [
    ("VGG11_L2", "not one of the ELF code's layered models"), ("ConvNet_L1", "give the plain name 'ConvNet'"),
    ("ConvNetBNIN", "gives the ConvNet's norm twice"), ("ConvNetD4D3", "gives the ConvNet's depth twice")])
def test_names_that_say_something_the_model_would_not_do_are_refused(name, match):
    """Regression: an ELF-style name with another layer number (VGG11_L2: ELF cuts after conv 2) built the model with
    our default cut, and a ConvNet name with two norms or depths took the last one, both silently."""
    with pytest.raises(ELFError, match=match):
        create_model(name)


@pytest.mark.parametrize(("name", "channel", "size", "params"), [
    ("MLP", 3, 32, 411_146), ("MLP", 1, 28, 118_282), ("LeNet", 3, 32, 62_006), ("LeNet", 1, 28, 61_706)])
def test_dcs_mlp_and_lenet(name, channel, size, params):
    """DC's cross-architecture MLP and LeNet: the official definitions' parameter counts (checked with their weights
    copied in: equal outputs), LeNet's default cut 16x5x5 at both input sizes."""
    model = create_model(name, channel=channel, im_size=(size, size)).eval()
    assert sum(p.numel() for p in model.parameters()) == params
    x = torch.randn(2, channel, size, size)
    with torch.no_grad():
        assert model(x).shape == (2, 10)
        if name == "LeNet":
            assert split_model(model, model.elf_split_point).front(x).shape[1:] == (16, 5, 5)
    if name == "MLP":
        assert not hasattr(model, "elf_split_point")  # no conv map to match a teacher's: no default cut


def test_alexnet_bn_and_the_swish_convnet_of_dm_evaluation_pool():
    """DC/DM's 'B' evaluation pool (ConvNetBN, ConvNetASwishBN, AlexNetBN, VGG11BN, ResNet18BN): the two that were
    missing. AlexNetBN is AlexNet with conv -> BatchNorm -> ReLU; AlexNet keeps its parameter names (checkpoints)."""
    plain, bn = create_model("AlexNet"), create_model("AlexNetBN")
    assert [n for n, _ in plain.named_parameters()] == [
        "features.0.weight", "features.0.bias", "features.3.weight", "features.3.bias", "features.6.weight",
        "features.6.bias", "features.8.weight", "features.8.bias", "features.10.weight", "features.10.bias",
        "fc.weight", "fc.bias"]  # fmt: skip
    kinds = [type(m).__name__ for m in bn.features]
    assert kinds[:4] == ["Conv2d", "BatchNorm2d", "ReLU", "MaxPool2d"] and kinds.count("BatchNorm2d") == 5
    assert [m.num_features for m in bn.features if isinstance(m, nn.BatchNorm2d)] == [128, 192, 256, 192, 192]
    assert bn.features(torch.randn(2, 3, 32, 32)).shape == (2, 192, 4, 4) and default_split_point(bn) == "features"
    swish = create_model("ConvNet-ASwish-BN")
    assert isinstance(swish.features[1], nn.BatchNorm2d) and isinstance(swish.features[2], nn.SiLU)
    x = torch.randn(5)
    assert torch.allclose(swish.features[2](x), x * torch.sigmoid(x))  # DC's Swish
    assert registry.canonical_name("convnet-aswish-bn") == "ConvNetASwishBN" and "ConvNetASwish" in list_models()
    assert isinstance(create_model("ConvNetASBN").features[2], nn.Sigmoid)  # "AS" is still sigmoid
