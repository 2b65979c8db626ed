"""Protocol presets, and metadata of loaded sets flowing into FeatureBank / ELFTrainer / results."""

from __future__ import annotations

import pytest
import torch

import elf
from elf import ELFError, ELFTrainer, FeatureBank, create_model, save_checkpoint
from elf.data import CIFAR10_MTT, CIFAR100_DC, ImageSet, space_metadata
from elf.evaluation import compare_models
from elf.io import SyntheticSet


def test_presets_pin_their_numbers() -> None:
    p = elf.PROTOCOLS
    official = p["elf"]
    assert (official.lr, official.momentum, official.weight_decay, official.batch_size) == (0.01, 0.9, 5e-4, 256)
    assert (official.epochs, official.total_epochs, official.decay_epoch) == (1000, 1001, 501)
    assert official.augment == "color_crop_cutout_flip_scale_rotate" and official.reset_optimizer_at_decay
    assert (official.lambda_front, official.lambda_rear, official.distance) == (1.0, 1.0, "ce")
    assert not official.features_on_augmented and not official.learned_lr
    # the library default differs from the public code only in the rear's BatchNorm statistics
    assert not official.rear_bn_stats_from_features and p["elf-official"].rear_bn_stats_from_features
    assert p["elf-official"].replace(name="elf", rear_bn_stats_from_features=False, notes="") == official
    assert p["elf-cross"].adapter == "auto" and p["elf-cross"].align_targets
    assert p["elf-cross"].replace(name="elf", adapter=None, align_targets=False) == official
    # elf-aug: elf-cross with the teacher run on each augmented batch in place of aligned targets
    assert p["elf-aug"].features_on_augmented and p["elf-aug"].adapter == "auto" and not p["elf-aug"].align_targets
    assert p["elf-aug"].replace(name="elf-cross", notes="") == elf.get_protocol(
        "elf-cross", features_on_augmented=True).replace(notes="")
    for name in ("dsa", "dm", "mtt", "glad"):
        assert not p[name].uses_features and p[name].epochs == 1000 and p[name].augment == official.augment
    assert p["mtt"].learned_lr and p["glad"].learned_lr and not p["dsa"].learned_lr
    assert p["dc"].epochs == 300 and p["dc"].augment is None
    assert p["mtt"].with_elf().lambda_front == 1.0 and official.with_elf() is official
    with pytest.raises(ELFError, match="unknown protocol 'mt'"):
        elf.get_protocol("mt")


def _set(lr: float | None = 0.03, normalization=CIFAR10_MTT, zca: bool = False) -> SyntheticSet:
    torch.manual_seed(0)
    return SyntheticSet(torch.randn(6, 3, 8, 8), torch.arange(3).repeat_interleave(2), normalization=normalization,
                        zca=zca, lr=lr, metadata={"method": "test"})


def test_from_synthetic_uses_learned_lr_only_when_the_protocol_says() -> None:
    s = _set()
    common = dict(epochs=1, augment=None, progress=False, device="cpu", log_every=1)
    mtt = ELFTrainer.from_synthetic("ConvNetW4D1", s, protocol="mtt", **common)
    assert mtt.protocol.lr == pytest.approx(0.03)
    assert mtt.fit(0)[0]["lr"] == pytest.approx(0.03)
    official = ELFTrainer.from_synthetic("ConvNetW4D1", s, protocol="dsa", **common)
    assert official.protocol.lr == 0.01
    given = ELFTrainer.from_synthetic("ConvNetW4D1", s, protocol="mtt", lr=0.5, **common)
    assert given.protocol.lr == 0.5


def test_an_lr_given_with_a_learned_lr_preset_is_the_lr_that_trains() -> None:
    """Regression: a protocol made with an explicit lr under "mtt" (a study's overrides, `elf eval --protocol mtt
    --lr`) still trained with the set's learned lr while its record said the given one."""
    s = _set()
    common = dict(epochs=1, augment=None, progress=False, device="cpu", log_every=1)
    given = elf.get_protocol("mtt", lr=0.005)
    assert given.learned_lr is False and elf.get_protocol("mtt", lr=0.005, learned_lr=True).learned_lr is True
    trainer = ELFTrainer.from_synthetic("ConvNetW4D1", s, protocol=given, **common)
    assert trainer.fit(0)[0]["lr"] == pytest.approx(0.005)
    learned = ELFTrainer.from_synthetic("ConvNetW4D1", s, protocol="mtt", **common)
    assert learned.protocol.learned_lr and learned.protocol.lr == pytest.approx(0.03)  # what trained is what is recorded
    rows = compare_models(["ConvNetW4D1"], s, None, s.images, s.labels, protocol="mtt", lr=0.005, seeds=1, elf=False,
                          epochs=1, augment=None, progress=False, log=lambda _: None)
    assert rows[0].baseline.histories[0][0]["lr"] == pytest.approx(0.005)
    assert rows[0].baseline.protocol["lr"] == 0.005 and rows[0].baseline.protocol["learned_lr"] is False


def test_the_learned_lr_that_trains_is_the_one_compare_models_and_studies_record(tmp_path) -> None:
    """compare_models (elf eval --out) recorded the preset's protocol (lr 0.01) while the set's learned lr (0.03)
    trained; a study recorded the same way (and must not call its own record stale for it)."""
    from elf.evaluation import ModelComparison

    s = _set()
    kw = dict(seeds=1, elf=False, epochs=1, augment=None, progress=False, log=lambda _: None)
    rows = compare_models(["ConvNetW4D1"], s, None, s.images, s.labels, protocol="mtt", **kw)
    assert rows[0].baseline.histories[0][0]["lr"] == pytest.approx(0.03)
    assert rows[0].baseline.protocol["lr"] == pytest.approx(0.03) and rows[0].baseline.protocol["learned_lr"] is True
    # an eval written before the learned lr was recorded (the preset's protocol) still resumes: it trained the same
    old = ModelComparison.from_dict(rows[0].to_dict())
    assert old.baseline is not None
    old.baseline.protocol = elf.get_protocol("mtt", epochs=1, augment=None).baseline().to_dict()
    more = compare_models(["ConvNetW4D1"], s, None, s.images, s.labels, protocol="mtt", previous=[old],
                          **{**kw, "seeds": 2})
    assert more[0].baseline.seeds == [0, 1]


def test_a_study_records_the_learned_lr_that_trains(tmp_path, make_image_folder) -> None:
    from elf.io import save_synthetic
    from elf.study import StudyConfig, run_study, stale_runs

    folder = make_image_folder(tmp_path / "data", 8, 4, 4, "abc")
    s = _set()
    s.classes = ["a", "b", "c"]
    save_synthetic(tmp_path / "s.safetensors", s)
    cfg = StudyConfig.from_dict({"sets": {"s": str(tmp_path / "s.safetensors")}, "models": ["ConvNetW4D1"],
                                 "data": str(folder), "protocol": "mtt", "seeds": 1, "random_real": False,
                                 "variants": {"baseline": {"lambda_front": 0.0, "lambda_rear": 0.0}},
                                 "overrides": {"epochs": 1, "augment": None}, "out": str(tmp_path / "out")})
    import json

    (path,) = run_study(cfg, device="cpu", progress=False, log=lambda _: None)
    record = json.loads(path.read_text())
    assert record["protocol"]["lr"] == pytest.approx(0.03) and record["history"][0]["lr"] == pytest.approx(0.03)
    assert stale_runs(cfg) == []


def test_set_metadata_reaches_the_result() -> None:
    s = _set()
    t = ELFTrainer.from_synthetic("ConvNetW4D1", s, protocol="dsa", epochs=1, augment=None, progress=False, device="cpu")
    result = t.run(s.images, s.labels, seeds=1)
    assert result.data["ipc"] == 2 and result.data["method"] == "test" and result.data["zca"] is False
    assert result.data["normalization"]["mean"] == list(CIFAR10_MTT.mean)
    assert result.to_dict()["data"]["learned_lr"] == pytest.approx(0.03)


def test_bank_from_another_pixel_space_is_refused() -> None:
    s = _set()
    teacher = create_model("ConvNetW4D1", im_size=(8, 8))
    bank = FeatureBank.build(teacher, s)  # records CIFAR10_MTT, no ZCA
    assert bank.metadata["space_zca"] == "false" and bank.metadata["space_mean"].startswith("0.4914")
    zca_set = _set(zca=True)
    with pytest.raises(ELFError, match="different pixel spaces: ZCA"):
        ELFTrainer.from_synthetic("ConvNetW4D1", zca_set, feature_bank=bank, progress=False, device="cpu")
    dc_set = _set(normalization=CIFAR100_DC)
    with pytest.raises(ELFError, match="normalization mean"):
        ELFTrainer.from_synthetic("ConvNetW4D1", dc_set, feature_bank=bank, progress=False, device="cpu")


def test_teacher_checkpoint_from_another_space_is_refused(tmp_path) -> None:
    teacher = create_model("ConvNetW4D1", num_classes=3, im_size=(8, 8))
    ckpt = save_checkpoint(teacher, tmp_path / "t.safetensors", space_metadata(CIFAR10_MTT, zca=True))
    with pytest.raises(ELFError, match="ZCA"):
        FeatureBank.from_checkpoint(ckpt, "ConvNetW4D1", _set(), num_classes=3)
    bank = FeatureBank.from_checkpoint(ckpt, "ConvNetW4D1", _set(zca=True), num_classes=3)
    assert bank.metadata["space_zca"] == "true"


def test_compare_models_turns_elf_on_for_baseline_presets() -> None:
    s = _set(lr=None)
    bank = FeatureBank.build(create_model("ConvNetW4D1", im_size=(8, 8)), s)
    (row,) = compare_models(["ConvNetW4D1BN"], s, None, s.images, s.labels, banks=[bank], protocol="mtt", seeds=1,
                            epochs=1, augment=None, device="cpu", progress=False, log=lambda _: None)
    assert row.baseline.protocol["lambda_front"] == 0.0 and row.elf.protocol["lambda_front"] == 1.0
    assert row.elf.data["method"] == "test"
    # regression: resuming from earlier rows (previous=) checked the protocol only, so ELF seeds of another teacher
    # were kept and averaged with the new ones
    other = FeatureBank.build(create_model("ConvNetW4D1", im_size=(8, 8)), s)  # other random weights
    with pytest.raises(ELFError, match="another feature bank"):
        compare_models(["ConvNetW4D1BN"], s, None, s.images, s.labels, banks=[other], protocol="mtt", seeds=2, epochs=1,
                       augment=None, device="cpu", progress=False, log=lambda _: None, previous=[row])


def test_validation_split_is_disjoint_and_balanced() -> None:
    labels = torch.arange(4).repeat_interleave(5)
    images = ImageSet(torch.zeros(20, 3, 2, 2, dtype=torch.uint8), labels, list("abcd"), "h")
    rest, val = images.split_validation(2, torch.Generator().manual_seed(0))
    assert len(rest) == 12 and len(val) == 8
    assert torch.bincount(val.labels).tolist() == [2, 2, 2, 2] and torch.bincount(rest.labels).tolist() == [3, 3, 3, 3]
    with pytest.raises(ELFError, match="fewer than k=6"):
        images.split_validation(6)


def test_method_presets_share_the_library_default_for_elf_runs() -> None:
    """ELF runs under a method's preset (``with_elf()``) use the measured default, not the official BN behaviour."""
    for name in ("dsa", "dm", "dc", "dc-aug", "mtt", "glad"):
        assert not elf.PROTOCOLS[name].with_elf().rear_bn_stats_from_features


@pytest.mark.parametrize("reset", [True, False])
def test_after_epoch_decays_once_at_the_decay_epoch(reset: bool) -> None:
    """The one lr-decay rule ``fit`` and the batched loop share: x lr_decay after ``decay_epoch`` only; a fresh
    optimizer (momentum dropped) when the protocol resets it, else the same optimizer with the new lr."""
    p = elf.get_protocol("elf", epochs=10, lr=0.1, lr_decay=0.5, reset_optimizer_at_decay=reset)
    w = torch.nn.Parameter(torch.ones(2))
    opt = torch.optim.SGD([w], lr=p.lr, momentum=0.9)
    made: list[float] = []

    def new(lr: float) -> torch.optim.Optimizer:
        made.append(lr)
        return torch.optim.SGD([w], lr=lr, momentum=0.9)

    lr = p.lr
    for epoch in range(p.total_epochs):
        before = opt
        lr, opt = p.after_epoch(epoch, lr, opt, new)
        assert (opt is before) == (not reset or epoch != p.decay_epoch)
    assert lr == pytest.approx(0.05) and opt.param_groups[0]["lr"] == pytest.approx(0.05)
    assert made == ([pytest.approx(0.05)] if reset else [])


def test_elf_aug_preset_runs_a_student_of_another_shape_with_the_banks_teacher() -> None:
    """`protocol="elf-aug"` with a bank built in this process: adapters bridge the shapes and the bank's teacher runs
    on the augmented batches (no teacher= needed); the CLI takes the preset by name."""
    from elf.cli import _protocol_overrides, build_parser

    torch.manual_seed(0)
    x, y = torch.randn(8, 3, 16, 16), torch.arange(4).repeat_interleave(2)
    teacher = create_model("ConvNetW4D1", num_classes=4, im_size=(16, 16))
    bank = FeatureBank.build(teacher, x)
    calls = []
    teacher.features[0].register_forward_hook(lambda *a: calls.append(1))  # (the bank runs a module cut from it)
    t = ELFTrainer("ConvNetD2", x, y, feature_bank=bank, protocol="elf-aug", epochs=1, batch_size=4, progress=False,
                   device="cpu")
    log = t.fit(0)[-1]
    assert t.protocol.name == "elf-aug" and t.adapters is not None
    assert log["front"] > 0 and log["rear"] > 0
    assert len(calls) == 2 * 2  # the bank's teacher ran on each augmented batch: 2 passes (epochs + 1) x 2 batches
    loaded = FeatureBank(bank.features.cpu(), metadata=bank.metadata)  # as read from a file: no teacher
    with pytest.raises(ELFError, match="'elf-aug' has features_on_augmented=True.*read from a file"):
        ELFTrainer("ConvNetD2", x, y, feature_bank=loaded, protocol="elf-aug", progress=False, device="cpu")
    args = build_parser().parse_args(["eval", "--images", "s", "--protocol", "elf-aug"])
    assert elf.get_protocol(args.protocol, **_protocol_overrides(args)) == elf.PROTOCOLS["elf-aug"]


def test_elf_aug_baselines_need_no_teacher() -> None:
    """compare_models(protocol="elf-aug") crashed on its baseline: proto.baseline() keeps features_on_augmented,
    and the trainer asked for a teacher that a run with both lambdas 0 never uses."""
    s = _set()
    teacher = create_model("ConvNetW4D1", im_size=(8, 8))
    bank = FeatureBank.build(teacher, s)
    kw = dict(epochs=1, augment=None, progress=False, device="cpu")
    ELFTrainer.from_synthetic("ConvNetW4D1", s, protocol="elf-aug", lambda_front=0.0, lambda_rear=0.0, **kw).fit(0)
    rows = compare_models(["ConvNetW4D1"], s, None, s.images, s.labels, banks=[bank], protocol="elf-aug", seeds=1,
                          log=lambda _: None, **kw)
    assert rows[0].baseline is not None and rows[0].elf is not None
    assert rows[0].elf.protocol["features_on_augmented"] is True


def test_protocol_overrides_to_from_synthetic_apply_before_the_sets_learned_lr() -> None:
    """The set's learned lr was applied before keyword overrides: protocol="mtt", learned_lr=False trained with the
    set's lr while recording learned_lr=False, and protocol="dsa", learned_lr=True trained at 0.01."""
    s = _set()
    common = dict(epochs=1, augment=None, progress=False, device="cpu", log_every=1)
    off = ELFTrainer.from_synthetic("ConvNetW4D1", s, protocol="mtt", learned_lr=False, **common)
    assert off.protocol.lr == 0.01 and not off.protocol.learned_lr
    assert off.fit(0)[0]["lr"] == pytest.approx(0.01)
    on = ELFTrainer.from_synthetic("ConvNetW4D1", s, protocol="dsa", learned_lr=True, **common)
    assert on.protocol.lr == pytest.approx(0.03) and on.protocol.learned_lr
    assert on.fit(0)[0]["lr"] == pytest.approx(0.03)
    given = ELFTrainer.from_synthetic("ConvNetW4D1", s, protocol="dsa", learned_lr=True, lr=0.5, **common)
    assert given.protocol.lr == 0.5  # an explicit lr still wins


@pytest.mark.parametrize("name", ["extra_epoch", "reset_optimizer_at_decay", "features_on_augmented",
                                  "rear_bn_stats_from_features", "learned_lr", "align_targets"])
@pytest.mark.parametrize("value", ["false", "true", 0, 1, None])
def test_boolean_protocol_fields_take_only_bools(name: str, value: object) -> None:
    """A boolean field took any value: "false" (a quoted YAML/TOML value) counted as true, silently."""
    with pytest.raises(ELFError, match=rf"protocol {name} must be .*got {value!r}"):
        elf.get_protocol("elf", **{name: value})
    for ok in (True, False):
        assert getattr(elf.get_protocol("dsa", **{name: ok}), name) is ok
    assert elf.get_protocol("elf", align_targets="flip").align_targets == "flip"
