"""ELFTrainer: the loss of one step against a hand computation, schedule, callbacks, determinism, errors, results."""

from __future__ import annotations

import copy
import re

import numpy as np
import pytest
import torch
from torch import nn

from elf import Callback, ELFError, ELFTrainer, EvalResult, FeatureBank, create_model

pytestmark = pytest.mark.usefixtures("torch_single_thread")

K = 3  # classes
SIZE = 16  # ConvNetW16 at 16x16: front ("features") output 16x2x2


def _data(n: int = 6, k: int = K, size: int = SIZE, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, size, size, generator=g), torch.arange(n) % k


def _teacher(name: str = "ConvNetW16", size: int = SIZE, seed: int = 100, k: int = K) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(name, num_classes=k, im_size=(size, size))


def _bank(x: torch.Tensor, point: str | None = None, teacher: nn.Module | None = None) -> FeatureBank:
    return FeatureBank.build(teacher or _teacher(size=x.shape[-1]), x, point)


def _initial_model(seed: int, name: str = "ConvNetW16", k: int = K, size: int = SIZE) -> nn.Module:
    """The model ELFTrainer(name).fit(seed) starts from."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return create_model(name, channel=3, num_classes=k, im_size=(size, size))


def _trainer(model="ConvNetW16", x=None, y=None, **kw) -> ELFTrainer:
    if x is None:
        x, y = _data()
    kw.setdefault("device", "cpu")
    kw.setdefault("progress", False)
    kw.setdefault("augment", None)
    return ELFTrainer(model, x, y, **kw)


class Capture(Callback):
    def __init__(self) -> None:
        self.initial: dict[str, torch.Tensor] | None = None
        self.steps: list[dict[str, torch.Tensor]] = []
        self.events: list[str] = []

    def on_fit_start(self, trainer):
        self.initial = copy.deepcopy(trainer.model.state_dict())
        self.events.append("fit_start")

    def on_epoch_start(self, trainer, epoch):
        self.events.append(f"epoch_start{epoch}")

    def on_batch_end(self, trainer, step, logs):
        self.steps.append({k: v.detach().clone() for k, v in logs.items()})
        self.events.append(f"batch{step}")

    def on_epoch_end(self, trainer, epoch, logs):
        self.events.append(f"epoch_end{epoch}")

    def on_fit_end(self, trainer):
        self.events.append("fit_end")


# ---- hand-written loss terms (explicit log_softmax / sums, not the library's functions) ---------------------------


def _ce_index(logits, y):
    logp = logits.log_softmax(1)
    return -torch.stack([logp[i, y[i]] for i in range(len(y))]).mean()


def _ce_soft(logits, p):
    return -(p * logits.log_softmax(1)).sum(1).mean()


def _d_ce(h, f):  # soft-target CE over channels, mean over batch and positions
    return -(f * h.log_softmax(1)).sum(1).mean()


def _d_cos(h, f):
    a, b = h.flatten(1), f.flatten(1)
    return (1 - (a * b).sum(1) / (a.norm(dim=1) * b.norm(dim=1))).mean()


HAND_D = {
    "ce": _d_ce,
    "mse": lambda h, f: ((h - f) ** 2).mean(),
    "mae": lambda h, f: (h - f).abs().mean(),
    "cos": _d_cos,
}


def _expected_terms(seed, x, targets, feats, distance, soft=False):
    model = _initial_model(seed).train()
    with torch.no_grad():
        h = model.features(x)
        out = model.classifier(h.flatten(1))
        out_rear = model.classifier(feats.flatten(1))
        ce = _ce_soft if soft else _ce_index
        return model, ce(out, targets), distance(h, feats), ce(out_rear, targets)


def _first_step(trainer: ELFTrainer, seed: int) -> dict[str, torch.Tensor]:
    cap = Capture()
    trainer.callbacks.append(cap)
    trainer.fit(seed)
    trainer.callbacks.remove(cap)
    start = _initial_model(seed)
    for key, value in start.state_dict().items():  # the hand computation starts from the same weights
        assert torch.equal(cap.initial[key], value), key
    return cap.steps[0]


# ---- one step == hand computation ------------------------------------------------------------------------------


@pytest.mark.parametrize("distance", ["ce", "mse", "mae", "cos"])
def test_one_step_loss_equals_hand_computation(distance):
    x, y = _data()
    bank = _bank(x)
    lt, lf, lr_ = 0.7, 0.3, 1.5
    trainer = _trainer(x=x, y=y, feature_bank=bank, epochs=0, batch_size=6, distance=distance,
                       lambda_task=lt, lambda_front=lf, lambda_rear=lr_)
    logs = _first_step(trainer, seed=3)
    _, task, front, rear = _expected_terms(3, x, y, bank.features, HAND_D[distance])
    assert logs["task"].item() == pytest.approx(task.item(), rel=1e-5)
    assert logs["front"].item() == pytest.approx(front.item(), rel=1e-5)
    assert logs["rear"].item() == pytest.approx(rear.item(), rel=1e-5)
    assert logs["loss"].item() == pytest.approx((lt * task + lf * front + lr_ * rear).item(), rel=1e-5)
    # the step trained the model
    assert not torch.equal(trainer.model.features[0].weight, _initial_model(3).features[0].weight)


@pytest.mark.parametrize(
    "lt,lf,lr_",
    [
        (1.0, 1.0, 1.0),  # official ELF
        (1.0, 0.0, 0.0),  # task only (baseline)
        (0.0, 1.0, 0.0),  # front only
        (0.0, 0.0, 1.0),  # rear only
        (0.0, 1.0, 1.0),  # front + rear, no task
        (1.0, 1.0, 0.0),  # task + front
        (1.0, 0.0, 1.0),  # task + rear
    ],
)
def test_lambda_combinations(lt, lf, lr_):
    x, y = _data()
    bank = _bank(x)
    uses_bank = lf > 0 or lr_ > 0
    trainer = _trainer(x=x, y=y, feature_bank=bank if uses_bank else None, epochs=0, batch_size=6,
                       lambda_task=lt, lambda_front=lf, lambda_rear=lr_, weight_decay=0.0)
    logs = _first_step(trainer, seed=1)
    _, task, front, rear = _expected_terms(1, x, y, bank.features, _d_ce)
    expected = lt * task + lf * front + lr_ * rear
    assert logs["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert logs["task"].item() == pytest.approx(task.item(), rel=1e-5)
    assert logs["front"].item() == (pytest.approx(front.item(), rel=1e-5) if lf > 0 else 0.0)
    assert logs["rear"].item() == (pytest.approx(rear.item(), rel=1e-5) if lr_ > 0 else 0.0)
    # the front is trained only by the task and front terms (no weight decay here)
    start = _initial_model(1)
    moved_first = not torch.equal(trainer.model.features[0].weight, start.features[0].weight)
    assert moved_first == (lt > 0 or lf > 0)


def test_callable_distance_in_trainer():
    x, y = _data()
    bank = _bank(x)

    def quartic(a, b):
        return ((a - b) ** 4).mean()

    trainer = _trainer(x=x, y=y, feature_bank=bank, epochs=0, batch_size=6, distance=quartic)
    logs = _first_step(trainer, seed=0)
    _, task, front, rear = _expected_terms(0, x, y, bank.features, lambda h, f: ((h - f) ** 4).mean())
    assert logs["front"].item() == pytest.approx(front.item(), rel=1e-5)
    assert logs["loss"].item() == pytest.approx((task + front + rear).item(), rel=1e-5)
    assert trainer.protocol.to_dict()["distance"] == "quartic"


def test_baseline_needs_no_bank_and_splits_nothing():
    trainer = _trainer(lambda_front=0, lambda_rear=0, epochs=1, batch_size=3)
    trainer.fit(0)
    assert trainer.front is None and trainer.rear is None
    assert trainer.feature_bank is None
    assert len(trainer.history) == 2


@pytest.mark.parametrize("kind", ["prob", "logits"])
def test_soft_labels_loss_equals_soft_target_ce(kind):
    x, _ = _data()
    g = torch.Generator().manual_seed(5)
    raw = torch.randn(6, K, generator=g) * 2
    labels = raw.softmax(1) if kind == "prob" else raw
    probs = raw.softmax(1)
    bank = _bank(x)
    trainer = _trainer(x=x, y=labels, feature_bank=bank, epochs=0, batch_size=6)
    assert trainer.num_classes == K
    assert torch.allclose(trainer.targets, probs, atol=1e-6)
    logs = _first_step(trainer, seed=2)
    _, task, front, rear = _expected_terms(2, x, probs, bank.features, _d_ce, soft=True)
    assert logs["task"].item() == pytest.approx(task.item(), rel=1e-5)
    assert logs["rear"].item() == pytest.approx(rear.item(), rel=1e-5)
    assert logs["loss"].item() == pytest.approx((task + front + rear).item(), rel=1e-5)
    # and trains for a few epochs with finite losses
    trainer = _trainer(x=x, y=labels, feature_bank=bank, epochs=2, batch_size=3, lr=0.01)
    history = trainer.fit(0)
    assert all(np.isfinite(h["loss"]) for h in history)


# ---- determinism and schedule ----------------------------------------------------------------------------------


def _weights(trainer: ELFTrainer) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in trainer.model.state_dict().items()}


def _strip_time(history):
    return [{k: v for k, v in h.items() if k != "time_s"} for h in history]


def test_same_seed_same_weights_and_history_with_augmentation():
    x, y = _data()
    bank = _bank(x)
    kw = dict(x=x, y=y, feature_bank=bank, epochs=2, batch_size=2, augment="color_crop_cutout_flip_scale_rotate", log_every=1)
    trainer = _trainer(**kw)
    h1 = _strip_time(trainer.fit(0))
    w1 = _weights(trainer)
    torch.rand(7)  # disturb the global RNG in between
    h2 = _strip_time(_trainer(**kw).fit(0))
    trainer2 = _trainer(**kw)
    torch.manual_seed(12345)
    trainer2.fit(0)
    assert h1 == h2 == _strip_time(trainer2.history)
    for key, value in _weights(trainer2).items():
        assert torch.equal(value, w1[key]), key
    trainer3 = _trainer(**kw)
    h3 = _strip_time(trainer3.fit(1))
    assert h3 != h1
    assert not torch.equal(_weights(trainer3)["features.0.weight"], w1["features.0.weight"])


def test_lr_schedule_decays_once_and_recreates_optimizer(monkeypatch):
    trainer = _trainer(lambda_front=0, lambda_rear=0, epochs=4, batch_size=3, lr=0.01, momentum=0.9, log_every=1)
    created: list[torch.optim.Optimizer] = []
    original = trainer._optimizer

    def recording(model, lr):
        opt = original(model, lr)
        created.append(opt)
        return opt

    monkeypatch.setattr(trainer, "_optimizer", recording)
    seen: list[tuple[int, int, float]] = []

    class Watch(Callback):
        def on_epoch_start(self, t, epoch):
            seen.append((epoch, len(created), created[-1].param_groups[0]["lr"]))

        def on_epoch_end(self, t, epoch, logs):
            if epoch == 4:  # the new optimizer is the one stepping (fresh momentum state filled)
                assert len(created[-1].state) > 0

    trainer.callbacks.append(Watch())
    trainer.fit(0)
    # epochs = 4 -> 5 passes; decay after epoch index 4 // 2 + 1 = 3
    assert [(e, n) for e, n, _ in seen] == [(0, 1), (1, 1), (2, 1), (3, 1), (4, 2)]
    assert [lr for *_, lr in seen] == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.001])
    assert created[1] is not created[0]
    assert created[1].param_groups[0]["momentum"] == 0.9
    assert trainer.history[-1]["lr"] == pytest.approx(0.001)
    assert trainer.history[0]["lr"] == pytest.approx(0.01)


def test_lr_schedule_without_optimizer_reset(monkeypatch):
    trainer = _trainer(lambda_front=0, lambda_rear=0, epochs=2, batch_size=3, lr=0.05,
                       reset_optimizer_at_decay=False, lr_decay_epoch=0, lr_decay=0.5)
    created = []
    original = trainer._optimizer
    monkeypatch.setattr(trainer, "_optimizer", lambda m, lr: created.append(original(m, lr)) or created[-1])
    lrs = []

    class Watch(Callback):
        def on_epoch_start(self, t, epoch):
            lrs.append(created[-1].param_groups[0]["lr"])

    trainer.callbacks.append(Watch())
    trainer.fit(0)
    assert len(created) == 1
    assert lrs == pytest.approx([0.05, 0.025, 0.025])


def test_history_lr_is_the_lr_used_in_that_epoch():
    trainer = _trainer(lambda_front=0, lambda_rear=0, epochs=4, batch_size=6, log_every=1)
    history = trainer.fit(0)
    assert [h["lr"] for h in history] == pytest.approx([0.01, 0.01, 0.01, 0.01, 0.001])


@pytest.mark.parametrize("extra,expected", [(True, 4), (False, 3)])
def test_extra_epoch(extra, expected):
    cap = Capture()
    trainer = _trainer(lambda_front=0, lambda_rear=0, epochs=3, batch_size=6, extra_epoch=extra, callbacks=[cap])
    trainer.fit(0)
    assert sum(e.startswith("epoch_end") for e in cap.events) == expected
    assert len(cap.steps) == expected  # one batch per epoch
    assert trainer.history[-1]["epoch"] == expected - 1


def test_callback_order():
    cap = Capture()
    x, y = _data(4)
    trainer = _trainer(x=x, y=y, lambda_front=0, lambda_rear=0, epochs=1, batch_size=2, callbacks=[cap])
    trainer.fit(0)
    assert cap.events == ["fit_start", "epoch_start0", "batch0", "batch1", "epoch_end0",
                          "epoch_start1", "batch2", "batch3", "epoch_end1", "fit_end"]  # fmt: skip
    assert set(cap.steps[0]) >= {"loss", "task", "front", "rear", "correct"}
    assert all(isinstance(v, torch.Tensor) for v in cap.steps[0].values())


def test_stop_training_in_on_batch_end(tmp_path):
    class Stop(Callback):
        def on_batch_end(self, trainer, step, logs):
            if step == 2:
                trainer.stop_training = True

    cap = Capture()
    x, y = _data(4)
    trainer = _trainer(x=x, y=y, lambda_front=0, lambda_rear=0, epochs=5, batch_size=2, callbacks=[Stop(), cap])
    trainer.fit(0)
    assert cap.events == ["fit_start", "epoch_start0", "batch0", "batch1", "epoch_end0",
                          "epoch_start1", "batch2", "epoch_end1", "fit_end"]  # fmt: skip
    assert trainer.history[-1]["epoch"] == 1
    # the stopped epoch's means are over the one batch it trained (they were divided by all 4 images: half the loss)
    assert trainer.history[-1]["loss"] == pytest.approx(float(cap.steps[2]["loss"]), rel=1e-6)
    # regression: save_state() then wrote a state that resumed after the cut epoch, skipping the rest of its batches
    with pytest.raises(ELFError, match="middle of epoch 1"):
        trainer.save_state(tmp_path / "cut.safetensors")
    assert trainer.history[-1]["task"] == pytest.approx(float(cap.steps[2]["task"]), rel=1e-6)
    trainer.fit(0)  # the flag is reset for the next fit
    assert len(cap.steps) == 3 + 3


def test_no_host_sync_per_step(host_reads):
    x, y = _data(8)
    bank = _bank(x)
    counts = host_reads

    def syncs(epochs: int, log_every: int) -> tuple[int, int]:
        trainer = _trainer(x=x, y=y, feature_bank=bank, epochs=epochs, batch_size=2, log_every=log_every)
        counts["n"] = 0
        trainer.fit(0)
        return counts["n"], len(trainer.history)

    few_steps, logged_a = syncs(epochs=1, log_every=100)  # 2 epochs x 4 steps, 2 logged epochs (first, last)
    many_steps, logged_b = syncs(epochs=5, log_every=100)  # 6 epochs x 4 steps, 2 logged epochs
    every, logged_c = syncs(epochs=5, log_every=1)  # 6 logged epochs
    assert logged_a == logged_b == 2 and logged_c == 6
    assert few_steps > 0, "the counter does not see the logging syncs"
    assert many_steps == few_steps, "host syncs grow with the number of steps"
    # the same reads per logged epoch, plus one after training (are the weights still finite?)
    per_logged = (every - few_steps) // (logged_c - logged_a)
    assert per_logged > 0 and every - few_steps == per_logged * (logged_c - logged_a)
    assert few_steps == per_logged * logged_a + 1, "host syncs should scale with the number of logged epochs"


def test_teacher_features_are_not_recomputed_during_fit():
    x, y = _data()
    teacher = _teacher()
    calls = []
    teacher.features[0].register_forward_hook(lambda *a: calls.append(1))
    trainer = _trainer(x=x, y=y, teacher=teacher, epochs=1, batch_size=2, augment="color_crop_cutout_flip_scale_rotate")
    assert len(calls) == 1  # the bank, once, at construction
    trainer.fit(0)
    assert len(calls) == 1
    assert torch.allclose(trainer.feature_bank.features, _bank(x, teacher=teacher).features)


def test_features_on_augmented_runs_the_teacher_every_step():
    x, y = _data()
    teacher = _teacher()
    calls = []
    teacher.features[0].register_forward_hook(lambda *a: calls.append(1))
    trainer = _trainer(x=x, y=y, teacher=teacher, epochs=1, batch_size=2, features_on_augmented=True,
                       augment="color_crop_cutout_flip_scale_rotate")
    before = len(calls)
    trainer.fit(0)
    assert len(calls) - before == 2 * 3  # 2 epochs x 3 batches
    # without a front term there is no target to compute: the teacher is not run in the steps
    trainer = _trainer(x=x, y=y, teacher=teacher, epochs=1, batch_size=2, features_on_augmented=True, lambda_front=0.0,
                       augment="color_crop_cutout_flip_scale_rotate")
    before = len(calls)
    trainer.fit(0)
    assert len(calls) == before


def test_features_on_augmented_runs_the_teacher_of_a_built_bank(tmp_path):
    """A bank made in this process by FeatureBank.build holds its teacher: features_on_augmented needs no teacher=
    (so elf eval and studies, which pass banks, can use it) and trains what teacher= trains; a bank read from a
    file has no teacher, and the error says what to pass."""
    x, y = _data()
    teacher = _teacher()
    kw = dict(x=x, y=y, epochs=1, batch_size=2, features_on_augmented=True, augment="color_crop_cutout_flip_scale_rotate")
    bank = _bank(x, teacher=teacher)
    assert bank.teacher is teacher
    via_bank = _trainer(feature_bank=bank, **kw).fit(0)
    via_teacher = _trainer(teacher=teacher, **kw).fit(0)
    assert [h["front"] for h in via_bank] == pytest.approx([h["front"] for h in via_teacher])
    loaded = FeatureBank.load(bank.save(tmp_path / "bank.safetensors"))
    assert loaded.teacher is None
    with pytest.raises(ELFError, match="read from a file"):
        _trainer(feature_bank=loaded, **kw)
    assert _trainer(feature_bank=loaded, teacher=teacher, **kw).teacher is teacher  # the bank's teacher, given again
    # regression: another teacher= was taken without a check (front target and rear features from two networks)
    with pytest.raises(ELFError, match="not the teacher the feature bank was built with"):
        _trainer(feature_bank=loaded, teacher=_teacher(seed=1), **kw)
    cached = FeatureBank.build(teacher, x, cache_dir=tmp_path / "cache")
    again = FeatureBank.build(teacher, x, cache_dir=tmp_path / "cache")  # read from the cache: still holds its teacher
    assert cached.teacher is teacher and again.teacher is teacher
    # regression: the bank's own teacher module was never hashed, so one changed in place after the bank was built
    # trained with stale un-augmented features beside the changed teacher's augmented ones
    with torch.no_grad():
        next(teacher.parameters()).add_(0.1)
    with pytest.raises(ELFError, match="changed since the bank was built"):
        _trainer(feature_bank=bank, **kw)


def test_features_on_augmented_runs_the_teacher_at_the_banks_point():
    """The teacher run on each augmented batch is cut where the bank was cut (the rear term reads the bank), also
    when the bank is not at the teacher's default point and teacher= is given without teacher_point."""
    x, y = _data()
    teacher = _teacher()
    bank = _bank(x, "features.9", teacher=teacher)
    trainer = _trainer(x=x, y=y, feature_bank=bank, teacher=teacher, split_at="features.9", epochs=0, batch_size=6,
                       features_on_augmented=True)
    history = trainer.fit(0)  # before the fix: the default point's (16, 2, 2) targets against (16, 4, 4) maps
    assert history and history[0]["front"] > 0


# ---- models given in other forms ---------------------------------------------------------------------------------


def test_front_rear_tuple_trains():
    x, y = _data()
    teacher = _teacher("ConvNetW16D2")  # 16 x 4 x 4 at 16 px
    bank = _bank(x, teacher=teacher)
    front = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4))
    rear = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, K))
    trainer = _trainer((front, rear), x, y, feature_bank=bank, epochs=0, batch_size=6)
    cap = Capture()
    trainer.callbacks.append(cap)
    trainer.fit(0)
    f0 = nn.Sequential(nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.AvgPool2d(4))
    r0 = nn.Sequential(nn.Flatten(), nn.Linear(16 * 4 * 4, K))
    f0.load_state_dict({k[len("front."):]: v for k, v in cap.initial.items() if k.startswith("front.")})
    r0.load_state_dict({k[len("rear."):]: v for k, v in cap.initial.items() if k.startswith("rear.")})
    with torch.no_grad():
        h = f0(x)
        expected = _ce_index(r0(h), y) + _d_ce(h, bank.features) + _ce_index(r0(bank.features), y)
    assert cap.steps[0]["loss"].item() == pytest.approx(expected.item(), rel=1e-5)
    assert trainer.front is not front  # trained copies; the given modules are untouched
    assert not torch.equal(trainer.front[0].weight, cap.initial["front.0.weight"])
    assert 0.0 <= trainer.evaluate(x, y) <= 100.0


def test_module_and_factory_specs():
    x, y = _data()
    bank = _bank(x)
    module = create_model("ConvNetW16", num_classes=K, im_size=(SIZE, SIZE))
    snapshot = copy.deepcopy(module.state_dict())
    t1 = _trainer(module, x, y, feature_bank=bank, epochs=0, batch_size=6)
    t1.fit(0)
    for k, v in module.state_dict().items():  # the given module is not trained in place
        assert torch.equal(v, snapshot[k])
    t2 = _trainer(lambda: create_model("ConvNetW16", num_classes=K, im_size=(SIZE, SIZE)), x, y, feature_bank=bank,
                  epochs=0, batch_size=6)
    assert len(t2.fit(0)) == 1


# ---- results ---------------------------------------------------------------------------------------------------


def test_memorizes_a_tiny_set():
    x, y = _data(10, k=10)
    trainer = _trainer(x=x, y=y, lambda_front=0, lambda_rear=0, epochs=30, batch_size=10, lr=0.05)
    trainer.fit(0)
    assert trainer.evaluate(x, y) == 100.0
    assert trainer.evaluate(x, (y + 1) % 10) == 0.0
    assert trainer.history[-1]["train_acc"] == 100.0
    acc = trainer.evaluate(x[:4], y[:4], batch_size=3)
    assert acc == 100.0


def test_evaluate_errors():
    x, y = _data()
    trainer = _trainer(x=x, y=y, lambda_front=0, lambda_rear=0, epochs=0, batch_size=6)
    with pytest.raises(ELFError, match="fit"):
        trainer.evaluate(x, y)
    trainer.fit(0)
    with pytest.raises(ELFError):
        trainer.evaluate(x, y[:3])
    with pytest.raises(ELFError):
        trainer.evaluate(torch.randn(2, 3, 8, 8), y[:2])
    with pytest.raises(ELFError):
        trainer.evaluate(x.long(), y)


def test_run_two_seeds():
    x, y = _data()
    test_x, test_y = _data(9, seed=1)
    trainer = _trainer(x=x, y=y, feature_bank=_bank(x), epochs=1, batch_size=3)
    result = trainer.run(test_x, test_y, seeds=2)
    assert isinstance(result, EvalResult)
    assert result.seeds == [0, 1]
    assert len(result.accuracies) == 2 and len(result.histories) == 2 and len(result.wall_time_s) == 2
    assert all(0.0 <= a <= 100.0 for a in result.accuracies)
    assert all(round(a * 9 / 100) == pytest.approx(a * 9 / 100) for a in result.accuracies)  # k / 9 correct
    assert result.mean == pytest.approx(float(np.mean(result.accuracies)))
    assert result.std == pytest.approx(float(np.std(result.accuracies)))
    assert re.fullmatch(r"\d+\.\d\d ± \d+\.\d\d", str(result))
    assert str(result) == f"{np.mean(result.accuracies):.2f} ± {np.std(result.accuracies):.2f}"
    assert result.protocol["lambda_front"] == 1.0 and result.protocol["epochs"] == 1
    assert result.to_dict()["mean"] == result.mean


def test_eval_result_statistics():
    r = EvalResult("m", [50.0, 60.0, 70.0], [0, 1, 2], {})
    assert r.mean == 60.0
    assert r.std == pytest.approx(np.std([50.0, 60.0, 70.0]))  # population std, not ddof=1
    assert str(r) == "60.00 ± 8.16"


# ---- bad input -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "images,labels,kw,match",
    [
        (torch.randn(3, 16, 16), torch.tensor([0, 1, 2]), {}, "unsqueeze"),
        (torch.randint(0, 255, (6, 3, 16, 16), dtype=torch.uint8), torch.arange(6) % 3, {}, "float"),
        (torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, 3]), {"num_classes": 3}, "must lie in"),
        (torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2, 0, 1, -1]), {}, "must lie in"),
        (torch.randn(6, 3, 16, 16), torch.tensor([0, 1, 2]), {}, "6 images but 3 labels"),
        (torch.randn(6, 3, 16, 16), [0, 1, 2, 0, 1, 2], {}, "torch.Tensor"),
        (torch.randn(6, 3, 16, 16), torch.randn(6), {}, "class indices"),
        (torch.zeros(0, 3, 16, 16), torch.zeros(0, dtype=torch.long), {"num_classes": 3}, "empty"),
    ],
)
def test_bad_input_raises_elferror(images, labels, kw, match):
    with pytest.raises(ELFError, match=match):
        _trainer(x=images, y=labels, lambda_front=0, lambda_rear=0, **kw)


def test_non_finite_images():
    x, y = _data()
    x[2, 0, 3, 3] = float("nan")
    x[4, 1, 0, 0] = float("inf")
    with pytest.raises(ELFError, match="2 image"):
        _trainer(x=x, y=y, lambda_front=0, lambda_rear=0)


def test_elf_protocol_without_features():
    with pytest.raises(ELFError, match="feature_bank"):
        _trainer()
    with pytest.raises(ELFError, match="features_on_augmented=True, which runs the teacher"):
        _trainer(features_on_augmented=True)
    _trainer(lambda_front=0, lambda_rear=0, features_on_augmented=True)  # a baseline never runs the teacher


def test_unknown_protocol_field_and_preset():
    with pytest.raises(ELFError, match="epochz"):
        _trainer(lambda_front=0, lambda_rear=0, epochz=3)
    with pytest.raises(ELFError, match="unknown protocol"):
        _trainer(lambda_front=0, lambda_rear=0, protocol="elff")
    with pytest.raises(ELFError):
        _trainer(lambda_front=0, lambda_rear=0, lambda_task=-1.0)


def test_bank_for_other_images():
    x, y = _data()
    bank = _bank(x)
    other, _ = _data(seed=9)
    with pytest.raises(ELFError, match="other images"):
        _trainer(x=other, y=y, feature_bank=bank)
    with pytest.raises(ELFError, match="6 features"):
        _trainer(x=x[:4], y=y[:4], feature_bank=bank)


def test_front_shape_mismatch_lists_matching_points():
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    bank = FeatureBank(torch.rand(2, 256, 8, 8))
    trainer = _trainer("ResNet18", x, torch.tensor([0, 1]), feature_bank=bank, num_classes=10, epochs=0, batch_size=2)
    with pytest.raises(ELFError) as info:
        trainer.fit(0)
    msg = str(info.value)
    assert "(512, 4, 4)" in msg and "(256, 8, 8)" in msg
    assert re.search(r"layer3\.0(?=[.,]?(\s|$))", msg) and re.search(r"layer3(?=[.,]?(\s|$))", msg)


def test_front_shape_mismatch_without_matching_point():
    x, y = _data()
    bank = FeatureBank(torch.rand(6, 512, 4, 4))
    with pytest.raises(ELFError, match="No split point"):
        _trainer(x=x, y=y, feature_bank=bank, epochs=0, batch_size=6).fit(0)


def test_model_output_classes_mismatch():
    x, y = _data()
    with pytest.raises(ELFError, match="classes"):
        _trainer(create_model("ConvNetW16", num_classes=10, im_size=(SIZE, SIZE)), x, y,
                 lambda_front=0, lambda_rear=0, epochs=0).fit(0)


def test_model_that_rejects_the_images_raises_elferror():
    x, y = _data()
    model = create_model("ConvNetW16", channel=1, num_classes=K, im_size=(SIZE, SIZE))
    with pytest.raises(ELFError):
        _trainer(model, x, y, lambda_front=0, lambda_rear=0, epochs=0).fit(0)


def test_teacher_with_float64_images():
    """float64 images: the bank built inside the trainer equals the float32 one, and training runs on float32."""
    x, y = _data()
    teacher = _teacher()
    trainer = _trainer(x=x.double(), y=y, teacher=teacher, epochs=1, batch_size=6)
    history = trainer.fit(0)
    assert trainer.images.dtype == torch.float32
    torch.testing.assert_close(trainer.feature_bank.features, FeatureBank.build(teacher, x.float()).features)
    assert np.isfinite(history[-1]["loss"])


def test_front_loss_at_a_cut_before_inplace_relu():
    x, y = _data()
    teacher = _teacher()
    bank = _bank(x, "features.9", teacher=teacher)  # norm of the 3rd block; ReLU(inplace) follows
    trainer = _trainer(x=x, y=y, feature_bank=bank, split_at="features.9", epochs=0, batch_size=6,
                       lambda_task=0.0, lambda_front=1.0, lambda_rear=0.0, distance="mse")
    logs = _first_step(trainer, seed=0)
    with torch.no_grad():
        h = _initial_model(0).features[:10](x)
    assert logs["front"].item() == pytest.approx(((h - bank.features) ** 2).mean().item(), rel=1e-5)


def test_stop_in_on_epoch_end_keeps_that_epochs_record(tmp_path):
    """Regression: the epoch whose on_epoch_end sets stop_training is still logged."""
    x, y = torch.randn(6, 3, 8, 8), torch.arange(3).repeat(2)

    class StopAtOne(Callback):
        def on_epoch_end(self, trainer, epoch, logs):
            if epoch == 1:
                trainer.stop_training = True

    t = ELFTrainer("ConvNetW4D1", x, y, lambda_front=0, lambda_rear=0, epochs=40, augment=None, log_every=100,
                   progress=False, device="cpu", callbacks=[StopAtOne()])
    history = t.fit(0)
    assert [h["epoch"] for h in history] == [0.0, 1.0]
    t.save_state(tmp_path / "whole.safetensors")  # stopped at an epoch's end: a state to resume from


def test_seed_makes_dropout_reproducible():
    """Regression: fit(seed) seeds torch's global RNG, so dropout masks repeat."""
    from torch import nn

    def factory():
        return nn.Sequential(nn.Flatten(), nn.Linear(3 * 8 * 8, 16), nn.ReLU(), nn.Dropout(0.5), nn.Linear(16, 3))

    x, y = torch.randn(6, 3, 8, 8), torch.arange(3).repeat(2)
    weights = []
    for _ in range(2):
        torch.manual_seed(1234 + len(weights))  # a different global state before each fit must not matter
        t = ELFTrainer(factory, x, y, lambda_front=0, lambda_rear=0, epochs=3, augment=None, progress=False, device="cpu")
        t.fit(5)
        weights.append([p.detach().clone() for p in t.model.parameters()])
    assert all(torch.equal(a, b) for a, b in zip(*weights))


def test_logged_lr_is_exact():
    x, y = torch.randn(6, 3, 8, 8), torch.arange(3).repeat(2)
    t = ELFTrainer("ConvNetW4D1", x, y, lambda_front=0, lambda_rear=0, epochs=4, augment=None, log_every=1,
                   progress=False, device="cpu")
    lrs = [h["lr"] for h in t.fit(0)]
    assert lrs[0] == 0.01 and lrs[-1] == 0.01 * 0.1


def _bn_rear_pair() -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(3)
    front = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
    rear = nn.Sequential(nn.BatchNorm2d(4), nn.Flatten(), nn.Linear(16, K))
    return front, rear


@pytest.mark.parametrize("from_features", [True, False])
def test_rear_bn_stats_from_features_option(from_features):
    """With rear_bn_stats_from_features=False the rear's pass on F(x) leaves the BatchNorm running statistics as the
    student's own path set them (checked after one step, before any weight update can differ)."""
    x, y = _data()
    feats = FeatureBank(torch.rand(6, 4, 2, 2) * 5 + 3)  # teacher features far from the student's statistics

    def bn_after_one_step(**kw):
        t = ELFTrainer(_bn_rear_pair(), x, y, feature_bank=feats, epochs=0, batch_size=6, augment=None, progress=False, **kw)
        t.fit(0)
        return t.rear[0].running_mean.clone(), int(t.rear[0].num_batches_tracked)

    student_only, count = bn_after_one_step(lambda_rear=0.0)
    mean, n = bn_after_one_step(rear_bn_stats_from_features=from_features)
    assert torch.equal(mean, student_only) != from_features
    assert n == (2 if from_features else 1) == count + from_features


def test_frozen_bn_stats_restores_momentum():
    from elf.batchnorm import frozen_bn_stats

    bn = nn.BatchNorm1d(3, momentum=None)
    with frozen_bn_stats(bn):
        bn(torch.randn(8, 3) + 10)
    assert bn.momentum is None and torch.equal(bn.running_mean, torch.zeros(3)) and int(bn.num_batches_tracked) == 0


class _SaveAfterFirstEpoch(Callback):
    """Save the fit's state after epoch 0 and stop there (an interrupted run)."""

    def __init__(self, path) -> None:
        self.path = path

    def on_epoch_end(self, trainer, epoch, logs):
        if epoch == 0:
            trainer.save_state(self.path)
            trainer.stop_training = True


def test_state_files_of_0_1_resume(tmp_path):
    """State files written before elf.resume (momentum buffers as ``momentum.{index}``) still resume exactly."""
    from elf.fileio import load_tensors, save_tensors

    x, y = torch.randn(12, 3, 8, 8), torch.arange(12) % 3
    kw = dict(protocol="elf", lambda_front=0.0, lambda_rear=0.0, epochs=2, batch_size=4, device="cpu", progress=False)

    full = ELFTrainer("ConvNetW8D2", x, y, **kw)
    full.fit(1)
    ELFTrainer("ConvNetW8D2", x, y, callbacks=[_SaveAfterFirstEpoch(tmp_path / "s.safetensors")], **kw).fit(1)
    tensors, meta = load_tensors(tmp_path / "s.safetensors")
    old = {(f"momentum.{k.split('.')[2]}" if k.startswith("momentum.0.") else k): v for k, v in tensors.items()}
    assert any(k.startswith("momentum.") and k.count(".") == 1 for k in old)
    save_tensors(tmp_path / "old.safetensors", old, meta)
    resumed = ELFTrainer("ConvNetW8D2", x, y, **kw)
    resumed.fit(1, resume_from=tmp_path / "old.safetensors")
    for key, value in full.model.state_dict().items():
        assert torch.equal(resumed.model.state_dict()[key], value), key


def test_a_state_file_does_not_resume_under_another_protocol(tmp_path):
    """Regression: resume_from checked the seed and the weights' shapes, not the protocol, so a fit resumed with
    another lr (or any other training field) continued silently as one run."""
    x, y = torch.randn(12, 3, 8, 8), torch.arange(12) % 3
    kw = dict(protocol="elf", lambda_front=0.0, lambda_rear=0.0, epochs=2, batch_size=4, device="cpu", progress=False)
    ELFTrainer("ConvNetW8D2", x, y, callbacks=[_SaveAfterFirstEpoch(tmp_path / "s.safetensors")], **kw).fit(1)
    with pytest.raises(ELFError, match=r"another protocol \(lr: 0.01 -> 0.02\)"):
        ELFTrainer("ConvNetW8D2", x, y, **{**kw, "lr": 0.02}).fit(1, resume_from=tmp_path / "s.safetensors")
    ELFTrainer("ConvNetW8D2", x, y, **{**kw, "eval_batch_size": 7}).fit(1, resume_from=tmp_path / "s.safetensors")


def test_a_state_file_does_not_resume_on_other_inputs(tmp_path):
    """resume_from checked seed, protocol and weight shapes: a state saved on one set, cut or teacher continued on
    another as one run."""
    x, y = torch.randn(12, 3, 16, 16), torch.arange(12) % 3
    bank = _bank(x)
    kw = dict(protocol="elf", epochs=2, batch_size=4, device="cpu", progress=False, augment=None)
    state = tmp_path / "s.safetensors"
    ELFTrainer("ConvNetW16", x, y, feature_bank=bank, callbacks=[_SaveAfterFirstEpoch(state)], **kw).fit(1)
    with pytest.raises(ELFError, match=r"other inputs .*inputs_sha256: '"):
        ELFTrainer("ConvNetW16", x + 1, y, feature_bank=_bank(x + 1), **kw).fit(1, resume_from=state)
    with pytest.raises(ELFError, match=r"other inputs .*teacher_sha256: '"):
        ELFTrainer("ConvNetW16", x, y, feature_bank=_bank(x, teacher=_teacher(seed=7)), **kw).fit(1, resume_from=state)
    # regression: the bank's storage dtype was neither compared nor recorded (a float32 run went on in bfloat16)
    low = FeatureBank(bank.features.to(torch.bfloat16), dict(bank.metadata, dtype="bfloat16"))
    with pytest.raises(ELFError, match=r"other inputs .*teacher_dtype: 'torch.float32' -> 'torch.bfloat16'"):
        ELFTrainer("ConvNetW16", x, y, feature_bank=low, **kw).fit(1, resume_from=state)
    result = ELFTrainer("ConvNetW16", x, y, feature_bank=bank, **kw).run(x, y, seeds=1)
    assert result.data["teacher"]["dtype"] == "float32"
    ELFTrainer("ConvNetW16", x, y, feature_bank=bank, **kw).fit(1, resume_from=state)


def test_the_also_evaluated_accuracies_survive_to_dict():
    """Regression: run(also_evaluate=...)'s accuracies were dropped by to_dict (and so from an eval's JSON)."""
    from elf.evaluation import ModelComparison

    x, y = _data()
    result = _trainer(x=x, y=y, lambda_front=0.0, lambda_rear=0.0, epochs=1).run(x, y, [0, 1], also_evaluate={"test": (x, y)})
    assert len(result.also["test"]) == 2
    row = ModelComparison.from_dict(ModelComparison(result.model, None, result, None, {}).to_dict())
    assert row.baseline is not None and row.baseline.also == result.also


def test_progress_bar_shows_task_loss_and_train_accuracy(capsys):
    """Issue #11: the bar showed the total loss (e.g. loss=233, the soft-target CE's scale), which reads as
    divergence; it shows the task loss and the training accuracy instead."""
    x, y = _data()
    _trainer(x=x, y=y, feature_bank=_bank(x), epochs=1, progress=True).fit(0)
    err = capsys.readouterr().err
    assert "task_loss=" in err and "train_acc=" in err and "loss=2" not in err.replace("task_loss=", "")


class _DropoutNet(nn.Module):
    """A tiny classifier with dropout: training draws from torch's global generator."""

    def __init__(self, num_classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(2))
        self.classifier = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(16, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def _resume_dropout_run(tmp_path, device: str) -> tuple[nn.Module, nn.Module]:
    """An uninterrupted fit and a fit saved after epoch 0 and resumed, of a model with dropout on ``device``."""
    x, y = torch.randn(12, 3, 8, 8), torch.arange(12) % 3
    kw = dict(protocol="elf", lambda_front=0.0, lambda_rear=0.0, epochs=3, batch_size=4, device=device, progress=False)
    full = ELFTrainer(_DropoutNet(), x, y, **kw)
    full.fit(2)
    ELFTrainer(_DropoutNet(), x, y, callbacks=[_SaveAfterFirstEpoch(tmp_path / "s.safetensors")], **kw).fit(2)
    resumed = ELFTrainer(_DropoutNet(), x, y, **kw)
    resumed.fit(2, resume_from=tmp_path / "s.safetensors")
    return full.model, resumed.model


def test_resume_continues_the_global_rng_for_dropout(tmp_path):
    """A resumed fit of a model with dropout ends with the weights of the uninterrupted fit: the state file carries
    torch's global generator (before, the resumed dropout masks came from the re-seeded generator)."""
    full, resumed = _resume_dropout_run(tmp_path, "cpu")
    for key, value in full.state_dict().items():
        assert torch.equal(resumed.state_dict()[key], value), key


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_resume_continues_the_global_rng_for_dropout(tmp_path):
    """The same on a GPU, where dropout draws from the device's generator (close, not bitwise: cuDNN's backward
    may sum in another order; other dropout masks would move the weights far more)."""
    full, resumed = _resume_dropout_run(tmp_path, "cuda")
    for key, value in full.state_dict().items():
        torch.testing.assert_close(resumed.state_dict()[key], value, rtol=1e-4, atol=1e-5, msg=key)


# ---- models that are not plain logits functions -----------------------------------------------------------------


class _TupleOut(nn.Module):
    """Returns (logits, features), always or (like torchvision's googlenet with aux_logits) in train mode only."""

    def __init__(self, train_only: bool = False) -> None:
        super().__init__()
        self.train_only = train_only
        self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten())
        self.head = nn.Linear(4, K)

    def forward(self, x: torch.Tensor):
        h = self.body(x)
        if self.train_only and not self.training:
            return self.head(h)
        return self.head(h), h


@pytest.mark.parametrize("train_only", [False, True])
def test_a_model_returning_a_tuple_is_a_clear_error(train_only):
    """A tuple output raised AttributeError ('tuple' object has no attribute 'dim') or, when only the train-mode
    forward returns one (torchvision's googlenet), a TypeError from cross_entropy in the first step."""
    with pytest.raises(ELFError, match="returns a tuple in (eval|train) mode, not a logits tensor.*aux_logits=False"):
        _trainer(_TupleOut(train_only), lambda_front=0, lambda_rear=0, epochs=1).fit(0)


def test_a_model_editing_its_input_in_place_leaves_the_set_alone():
    """The pre-training shape check ran the model on a view of the training images: a forward that edits its input
    in place shifted the set by 0.5 per check, and later seeds trained on other images."""

    class Shift(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.net = nn.Sequential(nn.Flatten(), nn.Linear(3 * SIZE * SIZE, K))

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.net(x.sub_(0.5) if not self.training else x - 0.5)

    x, y = _data()
    before = x.clone()
    trainer = _trainer(Shift(), x=x, y=y, lambda_front=0, lambda_rear=0, epochs=1)
    trainer.fit(0)
    trainer.fit(1)
    assert torch.equal(trainer.images.cpu(), before) and torch.equal(x, before)


def test_a_pair_whose_front_misses_the_bank_is_told_to_change_the_pair():
    """The advice for a (front, rear) pair used to name split points of the pair, which split_at cannot select."""
    x, y = _data()
    bank = _bank(x)  # 16x2x2
    front = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.AvgPool2d(8))  # 8x2x2
    rear = nn.Sequential(nn.Flatten(), nn.Linear(32, K))
    with pytest.raises(ELFError, match=r"the given front of .* outputs \(8, 2, 2\).*give a front that outputs \(16, 2, 2\)") as e:
        _trainer((front, rear), x=x, y=y, feature_bank=bank, epochs=1).fit(0)
    assert "Split points of" not in str(e.value)


def test_negative_teacher_features_with_the_soft_target_ce_warn():
    """A teacher cut before its ReLU gives negative targets: the soft-target CE has no lower bound there (the front
    loss fell below zero without a word); the default cut (after ReLU and pooling) and distance='mse' are quiet."""
    import warnings

    x, y = _data()
    teacher = _teacher()
    with pytest.warns(UserWarning, match="negative values.*no lower bound"):
        _trainer(x=x, y=y, feature_bank=FeatureBank.build(teacher, x, "features.0"), split_at="features.0")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _trainer(x=x, y=y, feature_bank=_bank(x, teacher=teacher))
        _trainer(x=x, y=y, feature_bank=FeatureBank.build(teacher, x, "features.0"), split_at="features.0", distance="mse")


def test_an_elf_result_names_the_teacher_feature_it_trained_against():
    """EvalResult.data said where the student was cut, not which teacher feature it was trained to match."""
    x, y = _data()
    bank = _bank(x)
    result = _trainer(x=x, y=y, feature_bank=bank, epochs=1).run(x, y, [0])
    assert result.data["teacher"] == {k: bank.metadata[k] for k in ("teacher_model", "teacher_sha256", "point", "shape",
                                                                   "dtype", "images_sha256")}
    assert "teacher" not in _trainer(x=x, y=y, feature_bank=bank, lambda_front=0, lambda_rear=0, epochs=1).run(x, y, [0]).data


class _Linear(nn.Module):
    """A linear classifier with a float buffer holding -inf from the start (as an attention mask may)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(3 * SIZE * SIZE, K)
        self.register_buffer("mask", torch.full((2,), float("-inf")))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(x.flatten(1))


def test_a_blow_up_on_the_last_step_is_a_divergence_not_an_accuracy():
    """The divergence watch reads the losses computed before each step: a step that made the weights inf on the last
    step went unseen, and run() reported an accuracy from argmax over NaN logits."""
    from elf import DivergedError

    x, y = _data()
    x = 100 * x
    # one epoch (epochs=0 + the extra one), one step: its loss is finite, the weights after it are not
    blow_up = _trainer(_Linear(), x=x, y=y, lambda_front=0, lambda_rear=0, epochs=0, lr=1e38)
    with pytest.raises(DivergedError, match=r"^diverged: parameter 'fc\.\w+' of _Linear seed 0 is NaN or inf after "
                                            r"the last step .*lower lr or lambda$"):
        blow_up.run(x, y, [0])
    with pytest.raises(DivergedError, match=r"^diverged: parameter 'fc\.\w+' of _Linear seed 0 is NaN or inf after "
                                            r"the last step \(batched with seeds \[0, 1\]"):
        blow_up.run(x, y, [0, 1], batched=True, fall_back=False)
    # a buffer that is inf from the start (a mask) is not a divergence
    fine = _trainer(_Linear(), x=x, y=y, lambda_front=0, lambda_rear=0, epochs=1)
    assert len(fine.run(x, y, [0]).accuracies) == 1
    assert len(fine.run(x, y, [0, 1], batched=True, fall_back=False).accuracies) == 2
