"""Channels-last memory format (``ELFTrainer(channels_last=True)``, issue #12): the same training as contiguous up to
float rounding, actually channels-last while training, reachable from compare_models, `elf eval` and `elf study`,
and ignored (with a note) by batched seeds."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

import elf
from elf import Callback, ELFError, ELFTrainer, FeatureBank, create_model
from elf.cli import main
from elf.data import CIFAR10_MTT
from elf.io import SyntheticSet, save_synthetic
from toy_data import lifted_channel_data

pytestmark = pytest.mark.usefixtures("torch_single_thread")

K = 3  # classes
SIZE = 16
CL = torch.channels_last


def _data(n: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    return lifted_channel_data(n, seed, K, SIZE)


TRAIN = _data(12, 0)
TEST = _data(60, 1)


def _bank() -> FeatureBank:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(100)
        teacher = create_model("ConvNetW8", num_classes=K, im_size=(SIZE, SIZE))
    return FeatureBank.build(teacher, TRAIN[0], "features.3")


#: ELF settings: ConvNet-BN cut after its first block (a rear with BatchNorm), a bank of that shape.
ELF = {"split_at": "features.3", "lambda_front": 1.0, "lambda_rear": 1.0}


def _trainer(model: str = "ConvNetW8BN", **kw: object) -> ELFTrainer:
    kw = {"device": "cpu", "progress": False, "epochs": 3, "batch_size": 5, "lr_decay_epoch": 1, "log_every": 1,
          "lambda_front": 0.0, "lambda_rear": 0.0, **kw}
    return ELFTrainer(model, *TRAIN, **kw)  # type: ignore[arg-type]


def _is_cl(t: torch.Tensor) -> bool:
    """Channels-last and not also contiguous (the model's 3x3 convolutions and image batches here)."""
    return t.is_contiguous(memory_format=CL) and not t.is_contiguous()


def _telling(t: torch.Tensor) -> bool:
    """A 4-D shape whose contiguous and channels-last layouts differ (not a 1x1 convolution's weight)."""
    return t.dim() == 4 and not torch.empty(t.shape).is_contiguous(memory_format=CL)


class _Watch(Callback):
    """Records the starting weights, the memory format of the 4-D parameters (model, halves, adapters) after every
    step, and of the first convolution's input, training and testing."""

    def __init__(self) -> None:
        self.start: dict[str, torch.Tensor] = {}
        self.weights: list[bool] = []
        self.inputs: dict[bool, list[bool]] = {True: [], False: []}  # model.training -> formats seen

    def on_fit_start(self, trainer: ELFTrainer) -> None:
        assert trainer.model is not None
        self.start = {k: v.clone() for k, v in trainer.model.state_dict().items()}
        conv = next(m for m in trainer.model.modules() if isinstance(m, nn.Conv2d))
        conv.register_forward_pre_hook(lambda m, args: self.inputs[m.training].append(_is_cl(args[0])))

    def on_batch_end(self, trainer: ELFTrainer, step: int, logs: dict[str, torch.Tensor]) -> None:
        modules = [trainer.model, trainer.front, trainer.rear, trainer.adapters]
        params = [p for m in modules if m is not None for p in m.parameters() if _telling(p)]
        assert params
        self.weights.append(all(_is_cl(p) for p in params))


def _fit(channels_last: bool, **kw: object) -> tuple[ELFTrainer, _Watch, elf.EvalResult]:
    watch = _Watch()
    trainer = _trainer(channels_last=channels_last, callbacks=[watch], **kw)
    return trainer, watch, trainer.run(*TEST, [0])


@pytest.mark.parametrize("kind", ["baseline", "elf", "elf+adapters"])
def test_same_training_as_contiguous_and_really_channels_last(kind):
    kw: dict[str, object] = {}
    if kind != "baseline":
        kw = {**ELF, "feature_bank": _bank()}
    if kind == "elf+adapters":
        kw["adapter"] = "always"
    plain, plain_watch, plain_result = _fit(False, **kw)
    cl, cl_watch, cl_result = _fit(True, **kw)
    # the option took effect: weights channels-last after every step, inputs channels-last in training and testing
    assert cl_watch.weights and all(cl_watch.weights)
    for training in (True, False):
        assert cl_watch.inputs[training] and all(cl_watch.inputs[training])
    assert not any(plain_watch.weights) and not any(plain_watch.inputs[True] + plain_watch.inputs[False])
    if kind == "elf+adapters":
        assert cl.adapters is not None and any(p.dim() == 4 for p in cl.adapters.parameters())
    # ... and changed nothing but rounding: same start, same end within tolerance, same accuracy
    assert plain_watch.start.keys() == cl_watch.start.keys()
    assert all(torch.equal(plain_watch.start[k], cl_watch.start[k]) for k in plain_watch.start)
    assert plain.model is not None and cl.model is not None
    a, b = plain.model.state_dict(), cl.model.state_dict()
    for k in a:
        assert torch.allclose(a[k].float(), b[k].float(), atol=1e-4, rtol=1e-4), k
    if plain.adapters is not None:
        assert cl.adapters is not None
        for k, v in plain.adapters.state_dict().items():
            assert torch.allclose(v, cl.adapters.state_dict()[k], atol=1e-4, rtol=1e-4), k
    assert cl_result.accuracies == pytest.approx(plain_result.accuracies, abs=1e-6)
    for rp, rc in zip(plain_result.histories[0], cl_result.histories[0]):
        assert rc["loss"] == pytest.approx(rp["loss"], rel=1e-4, abs=1e-4)
    assert cl_result.data["channels_last"] is True and "channels_last" not in plain_result.data
    if kind != "baseline":
        assert all(r["front"] > 0 and r["rear"] > 0 for r in cl_result.histories[0])


def test_resume_in_channels_last(tmp_path):
    """A state saved from a channels-last fit resumes into one (momentum buffers, weights) like the unbroken fit."""
    path = tmp_path / "state.safetensors"

    class Save(Callback):
        def on_epoch_end(self, trainer: ELFTrainer, epoch: int, logs: dict[str, torch.Tensor]) -> None:
            if epoch == 1:
                trainer.save_state(path)

    whole = _trainer(channels_last=True, callbacks=[Save()])
    whole.fit(0)
    resumed = _trainer(channels_last=True)
    resumed.fit(0, resume_from=path)
    assert resumed.model is not None and whole.model is not None
    for k, v in whole.model.state_dict().items():
        assert torch.allclose(v.float(), resumed.model.state_dict()[k].float(), atol=1e-6), k
    assert all(_is_cl(p) for p in resumed.model.parameters() if _telling(p))


def test_batched_seeds_ignore_it_with_a_note(capsys):
    contiguous = _trainer().run(*TEST, [0, 1], batched=True)
    capsys.readouterr()
    result = _trainer(channels_last=True).run(*TEST, [0, 1], batched=True)
    err = capsys.readouterr().err
    assert result.data["batched"]["seeds"] == 2 and result.data["channels_last"] is False
    assert err.count("ignore channels_last") == 1 and len([ln for ln in err.splitlines() if "channels_last" in ln]) == 1
    assert result.accuracies == contiguous.accuracies  # the vectorized seeds ran exactly as without the option

    class Noop(Callback):
        pass

    # seeds that fall back to sequential runs (here: a callback) use it
    fallback = _trainer(channels_last=True, callbacks=[Noop()]).run(*TEST, [0, 1], batched=True)
    err = capsys.readouterr().err
    assert "fallback" in fallback.data["batched"] and fallback.data["channels_last"] is True
    assert "fall back to sequential runs" in err and "ignore channels_last" not in err


def test_bad_value_and_compare_models():
    from elf.evaluation import compare_models

    with pytest.raises(ELFError, match="channels_last must be True or False"):
        _trainer(channels_last="yes")
    kw = {"device": "cpu", "progress": False, "epochs": 1, "batch_size": 5, "seeds": [0], "elf": False,
          "log": lambda _: None}
    (row,) = compare_models(["ConvNetW8"], *TRAIN, *TEST, channels_last=True, **kw)
    assert row.baseline is not None and row.baseline.data["channels_last"] is True


@pytest.fixture(scope="module")
def workspace(tmp_path_factory: pytest.TempPathFactory, make_image_folder) -> Path:
    """A tiny ImageFolder (3 classes, 8x8) and a 2-per-class synthetic set."""
    root = tmp_path_factory.mktemp("cl")
    make_image_folder(root / "data", 8, 6, 4)
    torch.manual_seed(0)
    images, labels = torch.randn(6, 3, 8, 8), torch.arange(3).repeat_interleave(2)
    save_synthetic(root / "syn.safetensors", SyntheticSet(images, labels, normalization=CIFAR10_MTT))
    return root


def test_cli_flag_reaches_the_trainer(workspace: Path):
    common = ["eval", "--images", str(workspace / "syn.safetensors"), "--no-elf", "--models", "ConvNetW4D2",
              "--epochs", "1", "--runs", "1", "--batch-size", "3", "--data", str(workspace / "data"),
              "--cache-dir", str(workspace / "cache"), "--no-progress", "--device", "cpu"]
    for flag, expected in (([], None), (["--channels-last"], True)):
        out = workspace / f"eval{len(flag)}.json"
        assert main([*common, *flag, "--out", str(out)]) == 0
        (row,) = json.loads(out.read_text())["results"]
        assert row["baseline"]["data"].get("channels_last") is expected


def test_study_key_reaches_the_trainer(workspace: Path, capsys: pytest.CaptureFixture[str]):
    def study(name: str, extra: str) -> dict:
        toml = workspace / f"{name}.toml"
        toml.write_text(f"""
name = "{name}"
data = "data"
models = ["ConvNetW4D2"]
seeds = 1
out = "{name}"
random_real = false
{extra}
[sets]
noise = "syn.safetensors"
[overrides]
epochs = 1
batch_size = 3
[variants.baseline]
lambda_front = 0.0
lambda_rear = 0.0
""")
        assert main(["study", str(toml), "--no-progress", "--device", "cpu"]) == 0
        (run,) = sorted((workspace / name / "runs").glob("*.json"))
        return json.loads(run.read_text())

    assert "channels_last" not in study("off", "")
    assert study("on", "channels_last = true")["channels_last"] is True
    assert study("on-batched", "channels_last = true\nbatched = true")["channels_last"] is False
    capsys.readouterr()
    bad = workspace / "bad.toml"
    bad.write_text('data = "data"\nmodels = ["ConvNetW4D2"]\nchannels_last = "yes"\n[sets]\nnoise = "syn.safetensors"\n')
    assert main(["study", str(bad)]) == 2
    assert "channels_last takes true/false" in capsys.readouterr().err
