"""Batched seeds (elf/batched.py): k seeds trained as one vectorized model equal k sequential fits; fallbacks."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import elf.batched as batched_mod
from elf import Callback, ELFError, ELFTrainer, FeatureBank, create_model
from toy_data import lifted_channel_data

pytestmark = pytest.mark.usefixtures("torch_single_thread")

K = 3  # classes
SIZE = 16
SEEDS = [0, 1, 2]


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return lifted_channel_data(n, seed, K, SIZE)


TRAIN = _data(12, 0)
TEST = _data(60, 1)


def _teacher() -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(100)
        return create_model("ConvNetW16", num_classes=K, im_size=(SIZE, SIZE))


def _bank(point: str) -> FeatureBank:
    return FeatureBank.build(_teacher(), TRAIN[0], point)


def _trainer(model: object = "ConvNetW16", labels: torch.Tensor | None = None, **kw: object) -> ELFTrainer:
    kw = {"device": "cpu", "progress": False, "epochs": 4, "batch_size": 5, "lr_decay_epoch": 1, "log_every": 1,
          "lambda_front": 0.0, "lambda_rear": 0.0, **kw}
    return ELFTrainer(model, TRAIN[0], TRAIN[1] if labels is None else labels, **kw)  # type: ignore[arg-type]


def _run(trainer: ELFTrainer, monkeypatch: pytest.MonkeyPatch, **run_kw: object):
    """``trainer.run`` on the test set, returning the result and each seed's trained state (model and adapters) as
    ``evaluate`` sees it (both paths evaluate once per seed, in seed order)."""
    states: list[dict[str, torch.Tensor]] = []
    evaluate = ELFTrainer.evaluate

    def capture(self: ELFTrainer, *args: object, **kwargs: object) -> float:
        state = {f"model.{k}": v.clone() for k, v in self.model.state_dict().items()}  # type: ignore[union-attr]
        if self.adapters is not None:
            state.update({f"adapter.{k}": v.clone() for k, v in self.adapters.state_dict().items()})
        states.append(state)
        return evaluate(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(ELFTrainer, "evaluate", capture)
    result = trainer.run(*TEST, SEEDS, **run_kw)  # type: ignore[arg-type]
    monkeypatch.setattr(ELFTrainer, "evaluate", evaluate)
    return result, states


def _assert_same(seq, bat, seq_states, bat_states, atol: float = 1e-5) -> None:
    assert bat.data["batched"]["seeds"] == len(SEEDS), bat.data["batched"]
    assert bat.accuracies == seq.accuracies
    assert bat.seeds == seq.seeds
    assert len(seq_states) == len(bat_states) == len(SEEDS)
    for s, b in zip(seq_states, bat_states):
        assert s.keys() == b.keys()
        for name in s:
            assert torch.allclose(s[name].float(), b[name].float(), atol=atol, rtol=1e-4), name
    for hs, hb in zip(seq.histories, bat.histories):
        assert [r.keys() for r in hs] == [r.keys() for r in hb]
        assert [r["epoch"] for r in hs] == [r["epoch"] for r in hb]
        assert [r["lr"] for r in hs] == [r["lr"] for r in hb]
        for rs, rb in zip(hs, hb):
            for key in ("loss", "task", "front", "rear", "train_acc"):
                assert rb[key] == pytest.approx(rs[key], rel=1e-4, abs=1e-4), key


def _differ(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> bool:
    return any(not torch.allclose(a[k].float(), b[k].float()) for k in a if a[k].is_floating_point())


@pytest.mark.parametrize("reset", [True, False])
def test_convnet_batched_equals_sequential(monkeypatch, reset):
    """Instance-norm ConvNet, DSA on, lr decay (with and without an optimizer reset), a short last batch."""
    seq, seq_states = _run(_trainer(reset_optimizer_at_decay=reset), monkeypatch)
    bat, bat_states = _run(_trainer(reset_optimizer_at_decay=reset), monkeypatch, batched=True)
    _assert_same(seq, bat, seq_states, bat_states)
    assert len(set(map(tuple, (s["model.classifier.bias"].tolist() for s in bat_states)))) == len(SEEDS)
    assert 0 < min(seq.accuracies) and max(seq.accuracies) < 100  # the comparison means something


def test_batchnorm_running_statistics_come_out_per_seed(monkeypatch):
    seq, seq_states = _run(_trainer("ConvNetW16BN"), monkeypatch)
    bat, bat_states = _run(_trainer("ConvNetW16BN"), monkeypatch, batched=True)
    _assert_same(seq, bat, seq_states, bat_states)
    means = [s["model.features.1.running_mean"] for s in bat_states]
    assert not torch.allclose(means[0], means[1]) and not torch.allclose(means[1], means[2])
    assert all(int(s["model.features.1.num_batches_tracked"]) == 5 * 3 for s in bat_states)  # 5 epochs x 3 batches


@pytest.mark.parametrize("extra", [
    {},  # ELF: front and rear terms, rear BatchNorm statistics frozen in the rear term
    {"rear_bn_stats_from_features": True},
    {"adapter": "always", "align_targets": True, "distance": "mse", "lambda_task": 0.5},
    {"features_on_augmented": True},  # the teacher runs on the k augmented batches at once, outside vmap
])
def test_elf_with_bank_split_and_adapters(monkeypatch, extra):
    """ConvNet-BN cut after its first block, so the rear holds BatchNorm layers (frozen_bn_stats matters)."""
    kw = {"feature_bank": _bank("features.3"), "split_at": "features.3", "lambda_front": 1.0, "lambda_rear": 1.0,
          **extra}
    seq, seq_states = _run(_trainer("ConvNetW16BN", **kw), monkeypatch)
    bat, bat_states = _run(_trainer("ConvNetW16BN", **kw), monkeypatch, batched=True)
    _assert_same(seq, bat, seq_states, bat_states)
    assert all(r["front"] > 0 and r["rear"] > 0 for h in bat.histories for r in h)
    tracked = 15 * (2 if extra.get("rear_bn_stats_from_features") else 1)
    assert int(bat_states[0]["model.features.5.num_batches_tracked"]) == tracked
    assert bat.data["split_at"] == "features.3"
    if extra.get("adapter"):
        assert any(k.startswith("adapter.") for k in bat_states[0]) and "adapters" in bat.data


def test_the_teacher_on_augmented_batches_runs_once_per_step_for_all_seeds():
    """features_on_augmented: one teacher forward per step on the k seeds' batches (plus the probe step and the
    one-batch check for reassigned buffers), not k."""
    bank = _bank("features.3")
    batches = []
    bank.teacher.features[0].register_forward_hook(lambda _m, args, _o: batches.append(args[0].shape[0]))
    trainer = _trainer("ConvNetW16BN", feature_bank=bank, split_at="features.3", lambda_front=1.0, lambda_rear=1.0,
                       features_on_augmented=True)
    result = trainer.run(*TEST, SEEDS, batched=True)
    assert result.data["batched"]["seeds"] == len(SEEDS)
    steps = trainer.protocol.total_epochs * 3  # 12 images in batches of 5
    k = len(SEEDS)
    assert batches[:2] == [5 * k, 5]  # the probe (k batches), the buffer check (one)
    assert batches[2:] == [5 * k, 5 * k, 2 * k] * trainer.protocol.total_epochs  # each step: the k batches at once


def test_soft_labels(monkeypatch):
    logits = torch.randn(TRAIN[0].shape[0], K, generator=torch.Generator().manual_seed(3))
    seq, seq_states = _run(_trainer(labels=logits, label_kind="logits"), monkeypatch)
    bat, bat_states = _run(_trainer(labels=logits, label_kind="logits"), monkeypatch, batched=True)
    _assert_same(seq, bat, seq_states, bat_states)


def test_a_parameter_used_directly_in_the_rear_is_trained_per_seed(monkeypatch):
    """torch.fx reads a parameter used in ``forward`` itself (not through a submodule) with ``get_attr``: the halves
    then hold it on modules of their own, which the batched step must swap as well."""

    class Gained(nn.Module):
        elf_split_point = "body"

        def __init__(self) -> None:
            super().__init__()
            self.body = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(),
                                      nn.AdaptiveAvgPool2d(2))
            self.gain = nn.Parameter(torch.ones(1, 4, 1, 1))
            self.head = nn.Linear(16, K)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.head((self.body(x) * self.gain).flatten(1))

    bank = FeatureBank(torch.randn(TRAIN[0].shape[0], 4, 2, 2, generator=torch.Generator().manual_seed(4)))
    kw = {"feature_bank": bank, "lambda_front": 1.0, "lambda_rear": 1.0}
    seq, seq_states = _run(_trainer(Gained, **kw), monkeypatch)
    bat, bat_states = _run(_trainer(Gained, **kw), monkeypatch, batched=True)
    _assert_same(seq, bat, seq_states, bat_states)
    assert not torch.allclose(bat_states[0]["model.gain"], torch.ones(1, 4, 1, 1))


def test_each_seed_draws_its_own_batches_and_augmentation(monkeypatch):
    """The batches (order and DSA draw) a batched run feeds seed i are bit-identical to those of fit(i)."""
    seen: list[torch.Tensor] = []
    batch = ELFTrainer.batch

    def record(self, idx, dsa, gen):
        x, y, feats = batch(self, idx, dsa, gen)
        seen.append(x.clone())
        return x, y, feats

    monkeypatch.setattr(ELFTrainer, "batch", record)
    trainer = _trainer()
    sequential = []
    for seed in SEEDS:
        seen.clear()
        trainer.fit(seed)
        sequential.append(list(seen))
    seen.clear()
    _trainer().run(*TEST, SEEDS, batched=True)
    together = seen[1:]  # the first call makes the probe batch (un-augmented, nothing drawn)
    steps = len(sequential[0])
    assert len(together) == steps * len(SEEDS)
    for i in range(len(SEEDS)):
        mine = together[i :: len(SEEDS)]
        assert all(torch.equal(a, b) for a, b in zip(mine, sequential[i]))
    assert not any(torch.equal(a, b) for a, b in zip(sequential[0], sequential[1]))


def test_shared_augmentation_draws_would_be_caught(monkeypatch):
    """With every seed drawing from seed 0's DSA, the batched run no longer equals the sequential one: the equality
    tests above detect seeds that share augmentation draws."""
    seq, _ = _run(_trainer(), monkeypatch)
    make = batched_mod.make_augmentation
    monkeypatch.setattr(batched_mod, "make_augmentation", lambda strategy, mode, seed: make(strategy, mode, 0))
    shared, _ = _run(_trainer(), monkeypatch, batched=True)
    assert shared.data["batched"]["seeds"] == len(SEEDS)
    assert [h[-1]["loss"] for h in shared.histories] != pytest.approx([h[-1]["loss"] for h in seq.histories], rel=1e-4)


def test_result_fields_and_trainer_state(monkeypatch):
    trainer = _trainer()
    result = trainer.run(*TEST, SEEDS, batched=True)
    info = result.data["batched"]
    assert info["seeds"] == 3 and info["compile"] is False and info["wall_time_s"] == batched_mod.WALL_TIME_NOTE
    assert len(result.wall_time_s) == 3 and len(set(result.wall_time_s)) == 1
    assert sum(result.wall_time_s) == pytest.approx(info["total_s"])
    assert len(result.histories) == 3 and trainer.history == result.histories[-1]
    assert len(result.histories[0]) == 5  # log_every=1, 5 epochs
    assert trainer.evaluate(*TEST) == result.accuracies[-1]  # the trainer holds the last seed's model
    with pytest.raises(ELFError, match="save_state"):
        trainer.save_state("unused.safetensors")


class _Noop(Callback):
    pass


class _Dropped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Dropout(0.5), nn.Linear(3 * SIZE * SIZE, K))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)


class _Small(nn.Module):
    """A tiny model whose ``post`` the cases below change."""

    def __init__(self, width: int = 8) -> None:
        super().__init__()
        self.conv, self.head = nn.Conv2d(3, width, 3, padding=1), nn.Linear(width, K)

    def post(self, h: torch.Tensor) -> torch.Tensor:
        return h

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.post(self.conv(x))).mean((2, 3)))


class _ReassignedBuffer(_Small):
    """A warm-up counter kept as a buffer but reassigned, not updated in place."""

    def __init__(self) -> None:
        super().__init__()
        self.register_buffer("steps", torch.zeros(()))

    def post(self, h: torch.Tensor) -> torch.Tensor:
        if self.training:
            self.steps = self.steps + 1
        return h * torch.clamp(self.steps / 3, max=1.0)


class _PlainMask(_Small):
    """A random channel mask drawn at init and kept as a plain attribute (not a buffer): it differs per seed."""

    def __init__(self) -> None:
        super().__init__()
        self.mask = (torch.rand(1, 8, 1, 1) > 0.5).float()

    def post(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.mask


class _CumulativeBN(_Small):
    def __init__(self) -> None:
        super().__init__()
        self.bn = nn.BatchNorm2d(8, momentum=None)  # a cumulative average: reads the batch count on the host

    def post(self, h: torch.Tensor) -> torch.Tensor:
        return self.bn(h)


def _varying_width() -> nn.Module:
    return _Small(int(torch.randint(4, 9, (1,))))  # the width drawn from the seed


@pytest.mark.parametrize("make, reason", [
    (lambda: _trainer(callbacks=[_Noop()]), "callbacks"),
    (lambda: _trainer(_Dropped), "random numbers"),
    # regression: these ran vmapped and silently wrong (the counter stayed 0; every seed used seed 0's mask), or
    # stopped with torch's own error (structures that differ), or gave a reason cut off mid-word (.item())
    (lambda: _trainer(_ReassignedBuffer), "reassigns buffer model.steps"),
    (lambda: _trainer(_PlainMask), "model.mask is a tensor attribute"),
    (lambda: _trainer(_varying_width), "differ in structure"),
    (lambda: _trainer(_CumulativeBN), "momentum=None"),
])
def test_fallback_runs_sequentially_with_a_reason(make, reason, capsys):
    expected = make().run(*TEST, SEEDS)
    result = make().run(*TEST, SEEDS, batched=True)
    assert reason in result.data["batched"]["fallback"]
    err = capsys.readouterr().err
    assert "fall back to sequential runs" in err and reason in err
    assert result.accuracies == expected.accuracies and len(result.histories) == len(SEEDS)


def test_front_rear_pair_falls_back():
    model = create_model("ConvNetW16", num_classes=K, im_size=(SIZE, SIZE))
    pair = (copy.deepcopy(model.features), nn.Sequential(nn.Flatten(), copy.deepcopy(model.classifier)))
    result = _trainer(pair).run(*TEST, [0], batched=True)
    assert "(front, rear) pair" in result.data["batched"]["fallback"]


def test_compile_failure_runs_eagerly(monkeypatch, capsys):
    def broken(fn):
        def run(*args):
            raise RuntimeError("no compiler here")
        return run

    resets = []
    monkeypatch.setattr(torch, "compile", broken)
    monkeypatch.setattr(torch.compiler, "reset", lambda: resets.append(1))
    seq = _trainer().run(*TEST, SEEDS)
    result = _trainer().run(*TEST, SEEDS, batched=True, compile=True)
    assert resets == [1]  # each compiled run starts from empty caches (dynamo's recompile limit)
    note = result.data["batched"]["compile"]
    assert note.startswith("failed, ran eagerly") and "no compiler" in note
    assert "torch.compile of the batched step failed, ran eagerly" in capsys.readouterr().err  # said, as vmap's fallback is
    assert result.accuracies == seq.accuracies


def test_compile_needs_batched():
    from elf.evaluation import compare_models

    with pytest.raises(ELFError, match="batched=True"):
        _trainer().run(*TEST, SEEDS, compile=True)
    with pytest.raises(ELFError, match="batched=True"):
        compare_models(["ConvNetW16"], *TRAIN, *TEST, elf=False, compile=True, device="cpu", progress=False)


def test_compare_models_batched(monkeypatch):
    from elf.evaluation import compare_models

    kw = {"device": "cpu", "progress": False, "epochs": 2, "batch_size": 5, "seeds": [0, 1], "elf": False,
          "log": lambda _: None}
    seq = compare_models(["ConvNetW16"], *TRAIN, *TEST, **kw)[0].baseline
    bat = compare_models(["ConvNetW16"], *TRAIN, *TEST, batched=True, **kw)[0].baseline
    assert bat is not None and seq is not None
    assert bat.accuracies == seq.accuracies and bat.seeds == [0, 1] and bat.data["batched"]["seeds"] == 2


def test_a_diverging_seed_raises_as_in_fit():
    from elf import DivergedError

    with pytest.raises(DivergedError, match="diverged"):
        _trainer(lr=1e12).run(*TEST, SEEDS)
    with pytest.raises(DivergedError, match="batched"):
        _trainer(lr=1e12).run(*TEST, SEEDS, batched=True)


def test_speed_benchmark_batched_section(tmp_path):
    """benchmarks/speed.py's section 5 runs end to end on a toy setting and records equal accuracies."""
    import importlib.util
    import json
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "speed.py"
    spec = importlib.util.spec_from_file_location("speed", path)
    assert spec is not None and spec.loader is not None
    speed = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(speed)
    out = tmp_path / "speed.json"
    speed.main(["--batched-only", "--images", "10", "--batch", "4", "--batched-epochs", "2", "--seeds", "1", "2",
                "--repeats", "1", "--batched-models", "ConvNetW16", "--device", "cpu", "--out", str(out)])
    rows = json.loads(out.read_text())["batched_seeds"]["rows"]
    assert [(r["model"], r["k"]) for r in rows] == [("ConvNetW16", 1), ("ConvNetW16", 2)]
    assert all(r["batched_same_accuracies"] and r["batched"]["batched"]["seeds"] == r["k"] for r in rows)
    assert rows[1]["sequential"]["loop_s_per_epoch"] > 0
    assert rows[1]["batched_max_abs_accuracy_diff"] == 0.0 and "partial" not in json.loads(out.read_text())["batched_seeds"]

    # regression: the file was written only at the end, so a run cut by its time box (as on the GPU call) kept nothing
    real_time_seeds = speed.time_seeds

    def cut_at_the_second_row(*args, **kw):
        if args[4] == 2:  # k
            raise KeyboardInterrupt
        return real_time_seeds(*args, **kw)

    speed.time_seeds = cut_at_the_second_row
    cut = tmp_path / "cut.json"
    speed.main(["--batched-only", "--images", "10", "--batch", "4", "--batched-epochs", "2", "--seeds", "1", "2",
                "--repeats", "1", "--batched-models", "ConvNetW16", "--device", "cpu", "--out", str(cut)])
    part = json.loads(cut.read_text())["batched_seeds"]
    assert part["partial"] is True and [r["k"] for r in part["rows"]] == [1]


def test_a_compiled_batched_run_compiles_its_step_once():
    """Regression: the probe step ran on an expanded view (stride 0 along the seeds), the training batches are
    stacked: torch.compile compiled the step a second time at the first batch (tens of seconds on a GPU)."""
    from torch._dynamo.utils import counters

    counters.clear()
    _trainer(batch_size=4).run(*TEST, SEEDS[:2], batched=True, compile=True)  # 12 images: whole batches only (a
    assert counters["stats"]["unique_graphs"] == 1, dict(counters["stats"])  # smaller last batch is another shape)


def test_groups_of_seeds(monkeypatch):
    """``batched=2`` trains seeds (0, 1) then (2,) with one step built for the first group; results as sequential."""
    built = []
    vectorized = batched_mod._vectorized_step
    monkeypatch.setattr(batched_mod, "_vectorized_step", lambda *a: built.append(1) or vectorized(*a))
    seq, seq_states = _run(_trainer("ConvNetW16BN"), monkeypatch)
    bat, bat_states = _run(_trainer("ConvNetW16BN"), monkeypatch, batched=2)
    _assert_same(seq, bat, seq_states, bat_states)
    assert built == [1] and bat.data["batched"]["group"] == 2
    assert bat.wall_time_s[0] == bat.wall_time_s[1] != bat.wall_time_s[2]
    with pytest.raises(ELFError, match="seeds per group"):
        _trainer().run(*TEST, SEEDS, batched=0)


def test_no_host_sync_per_step_or_epoch(host_reads, monkeypatch):
    """Values are read back from the device only at the logged epochs, however many steps and epochs run."""
    counts = host_reads

    def syncs(epochs: int) -> int:
        trainer = _trainer(epochs=epochs, batch_size=2, log_every=100, augment=None)
        monkeypatch.setattr(trainer, "evaluate", lambda *a: 0.0)
        counts["n"] = 0
        trainer.run(*TEST, SEEDS, batched=True)
        return counts["n"]

    assert syncs(1) == syncs(5) > 0


def test_a_mistake_in_the_model_is_raised_not_taken_for_a_limit_of_vmap(capsys):
    """Regression: the probe step caught every error, so a model that returns a tuple in train mode was first
    reported as something vmap cannot run, then failed the same way in the sequential fit."""

    class Tuple(_Small):
        def forward(self, x: torch.Tensor):  # type: ignore[override]
            out = super().forward(x)
            return (out, out) if self.training else out

    with pytest.raises(ELFError, match="tuple"):
        _trainer(Tuple).run(*TEST, SEEDS, batched=True)
    assert "fall back" not in capsys.readouterr().err


def test_a_later_group_whose_plain_attribute_differs_reruns_every_seed_sequentially(monkeypatch):
    """With groups of one seed, the step's module is seed 0's: seed 1's own mask must not be replaced by it. The later
    groups are checked before the first trains (it used to train and then be thrown away)."""
    import elf.batched as batched

    expected = _trainer(_PlainMask).run(*TEST, SEEDS)
    trained: list[list[int]] = []
    original = batched._train
    monkeypatch.setattr(batched, "_train", lambda *a: trained.append(list(a[-1])) or original(*a))
    result = _trainer(_PlainMask).run(*TEST, SEEDS, batched=1)
    assert "mask is a tensor attribute" in result.data["batched"]["fallback"]
    assert result.accuracies == expected.accuracies and len(result.histories) == len(SEEDS) == len(result.wall_time_s)
    assert trained == []


def test_fall_back_false_leaves_the_seeds_to_the_caller():
    """``run(fall_back=False)`` (a study's batched cell) trains nothing when the seeds cannot be batched: the caller
    runs them its own way (with checkpoints), instead of a probe beforehand repeating run_batched's checks."""
    calls: list[int] = []
    trainer = _trainer(_Dropped)
    trainer.fit = lambda seed, **kw: calls.append(seed)  # type: ignore[method-assign]
    result = trainer.run(*TEST, SEEDS, batched=True, fall_back=False)
    assert "random numbers" in result.data["batched"]["fallback"]
    assert result.accuracies == [] and calls == []
