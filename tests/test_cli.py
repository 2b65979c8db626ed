"""The `elf` command line: help, discovery commands, train-teacher and eval on a tiny ImageFolder."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import elf
from elf.cli import main
from elf.data import CIFAR10_MTT
from elf.io import SyntheticSet, save_synthetic

CLASSES = ["a", "b", "c"]


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory: pytest.TempPathFactory, make_image_folder) -> Path:
    """train/ and test/ folders of 16x16 PNGs whose class is visible in the mean colour (learnable in a few steps)."""
    return make_image_folder(tmp_path_factory.mktemp("folder"), 16, 12, 8, "".join(CLASSES))


@pytest.fixture(scope="module")
def synthetic_file(tmp_path_factory: pytest.TempPathFactory, image_folder: Path) -> Path:
    imgs = elf.data.load_image_folder(image_folder, "train", cache_dir=tmp_path_factory.mktemp("c"), progress=False)
    sub = imgs.per_class(2, torch.Generator().manual_seed(0))
    path = tmp_path_factory.mktemp("syn") / "syn.safetensors"
    save_synthetic(path, SyntheticSet(sub.as_float(CIFAR10_MTT), sub.labels, normalization=CIFAR10_MTT, classes=sub.classes))
    return path


def test_help_everywhere(capsys: pytest.CaptureFixture[str]) -> None:
    for argv in (["--help"], ["eval", "--help"], ["train-teacher", "--help"], ["models", "--help"], ["split-points", "--help"]):
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 0
        assert "usage: elf" in capsys.readouterr().out


def test_console_entry_point_runs() -> None:
    out = subprocess.run([sys.executable, "-m", "elf", "eval", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "--teacher-model" in out.stdout and "--models" in out.stdout


def test_models_lists_builtins(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models"]) == 0
    out = capsys.readouterr().out
    for name in ("ConvNet", "ConvNetW512", "ResNet18BN", "VGG11", "AlexNet"):
        assert any(line.split()[0] == name for line in out.splitlines()), name


def test_split_points_marks_default(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["split-points", "ResNet18"]) == 0
    out = capsys.readouterr().out
    default = [line for line in out.splitlines() if "default" in line]
    assert len(default) == 1 and "layer4.0 " in default[0] and "512x4x4" in default[0]
    assert "layer4.0.conv2" not in out  # inside a residual block: not a valid cut


def test_unknown_model_is_a_clean_error(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["split-points", "ResNet19"]) == 2
    err = capsys.readouterr().err
    assert "unknown model 'ResNet19'" in err and "ResNet18" in err


def test_train_teacher_then_eval(tmp_path: Path, image_folder: Path, synthetic_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--data", str(image_folder), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--device", "cpu"]
    assert main(["train-teacher", "--model", "ConvNetW8D2", "--out", str(tmp_path / "t"), "--epochs", "2",
                 "--batch-size", "12", *common]) == 0
    out = capsys.readouterr().out
    assert "epoch 2:" in out and "test acc" in out
    ckpt = tmp_path / "t" / "epoch_002.safetensors"
    assert ckpt.exists() and (tmp_path / "t" / "epoch_001.safetensors").exists()
    history = json.loads((tmp_path / "t" / "history.json").read_text())
    assert set(history["test_accuracy"]) == {"1", "2"}
    # MTT's buffer.py trains experts with plain SGD: no momentum, no weight decay (regression: weight decay was 5e-4)
    trained = json.loads(history["meta"]["protocol"])
    assert (trained["momentum"], trained["weight_decay"]) == (0.0, 0.0)

    result_file = tmp_path / "res.json"
    assert main(["eval", "--images", str(synthetic_file), "--teacher", str(ckpt), "--teacher-model", "ConvNetW8D2",
                 "--models", "ConvNetW8D2BN", "--epochs", "2", "--runs", "2", "--batch-size", "3",
                 "--out", str(result_file), *common]) == 0
    table = capsys.readouterr().out
    assert "| ConvNetW8D2BN |" in table and "±" in table
    result = json.loads(result_file.read_text())
    (row,) = result["results"]
    assert row["split_at"] == "features"
    for method in ("baseline", "elf"):
        accs = row[method]["accuracies"]
        assert len(accs) == 2 and all(0 <= a <= 100 for a in accs)
        assert row[method]["seeds"] == [0, 1]
        assert abs(row[method]["mean"] - float(np.mean(accs))) < 1e-9
    assert row["elf"]["protocol"]["lambda_front"] == 1.0 and row["baseline"]["protocol"]["lambda_front"] == 0.0
    assert row["elf"]["protocol"]["epochs"] == 2 and row["elf"]["protocol"]["batch_size"] == 3
    assert result["test"]["n"] == 3 * 8
    assert result["teachers"][0]["teacher_model"] == "ConvNetW8D2"
    assert result["environment"]["torch_version"] == torch.__version__
    # the CPU is named (BENCHMARKS once named the wrong CPU for a file that did not record it)
    assert "cpu" in result["environment"] and isinstance(result["environment"]["cpu"], str)
    assert row["elf"]["protocol"]["rear_bn_stats_from_features"] is False  # library default
    result_file.unlink()  # (a finished --out is not overwritten without --resume)
    assert main(["eval", "--images", str(synthetic_file), "--teacher", str(ckpt), "--teacher-model", "ConvNetW8D2",
                 "--models", "ConvNetW8D2BN", "--epochs", "1", "--runs", "1", "--protocol", "elf-official",
                 "--out", str(result_file), *common]) == 0
    (row,) = json.loads(result_file.read_text())["results"]
    assert row["elf"]["protocol"]["rear_bn_stats_from_features"] is True
    result_file.unlink()
    assert main(["eval", "--images", str(synthetic_file), "--teacher", str(ckpt), "--teacher-model", "ConvNetW8D2",
                 "--models", "ConvNetW8D2BN", "--epochs", "1", "--runs", "1", "--rear-bn-stats", "student",
                 "--out", str(result_file), *common]) == 0
    (row,) = json.loads(result_file.read_text())["results"]
    assert row["elf"]["protocol"]["rear_bn_stats_from_features"] is False
    # --teacher-on-augmented: the bank's teacher runs on every augmented batch (the bank comes from the cache here)
    result_file.unlink()
    assert main(["eval", "--images", str(synthetic_file), "--teacher", str(ckpt), "--teacher-model", "ConvNetW8D2",
                 "--models", "ConvNetW8D2BN", "--epochs", "1", "--runs", "1", "--teacher-on-augmented", "--no-baseline",
                 "--out", str(result_file), *common]) == 0
    (row,) = json.loads(result_file.read_text())["results"]
    assert row["elf"]["protocol"]["features_on_augmented"] is True and row["elf"]["accuracies"]
    # ... and with --batched its seeds train as one vectorized model (one teacher forward per step serves them all)
    result_file.unlink()
    assert main(["eval", "--images", str(synthetic_file), "--teacher", str(ckpt), "--teacher-model", "ConvNetW8D2",
                 "--models", "ConvNetW8D2BN", "--epochs", "1", "--runs", "2", "--teacher-on-augmented", "--no-baseline",
                 "--batched", "--out", str(result_file), *common]) == 0
    (row,) = json.loads(result_file.read_text())["results"]
    assert row["elf"]["data"]["batched"]["seeds"] == 2 and len(row["elf"]["accuracies"]) == 2, row["elf"]["data"]
    assert main(["eval", "--images", str(synthetic_file), "--teacher", str(ckpt), "--teacher-model", "ConvNetW8D2",
                 "--teacher-on-augmented", "--align-targets", *common]) == 2  # two ways to match the view: one only


def test_train_teacher_resumes(tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--model", "ConvNetW8D2", "--data", str(image_folder), "--cache-dir", str(tmp_path / "c"), "--no-progress",
              "--device", "cpu", "--batch-size", "12"]
    assert main(["train-teacher", "--out", str(tmp_path / "full"), "--epochs", "3", *common]) == 0
    # an interrupted run: 2 of 3 epochs done, then the same command again
    assert main(["train-teacher", "--out", str(tmp_path / "part"), "--epochs", "2", *common]) == 0
    capsys.readouterr()
    (tmp_path / "part" / "epoch_002.safetensors").unlink()  # resume must rely on resume.safetensors, not this
    assert main(["train-teacher", "--out", str(tmp_path / "part"), "--epochs", "3", *common]) == 0
    assert "resuming" in capsys.readouterr().out
    full, _ = elf.checkpoint.load_state_dict(tmp_path / "full" / "epoch_003.safetensors")
    part, _ = elf.checkpoint.load_state_dict(tmp_path / "part" / "epoch_003.safetensors")
    assert all(torch.equal(full[k], part[k]) for k in full)
    # regression: a resume with other data (here a per-class subset) continued the run trained on the first data
    capsys.readouterr()
    assert main(["train-teacher", "--out", str(tmp_path / "part"), "--epochs", "4", "--train-per-class", "4", *common]) == 2
    err = capsys.readouterr().err
    assert "trained with other data or settings" in err and "train_sha256" in err
    # regression: a resume scored on other test images (--test-per-class) mixed two test sets in history.json
    assert main(["train-teacher", "--out", str(tmp_path / "part"), "--epochs", "4", "--test-per-class", "1", *common]) == 2
    err = capsys.readouterr().err
    assert "trained with other data or settings" in err and "test_sha256" in err
    # regression: starting over (--no-resume) overwrote epochs 1..N only, so the earlier run's later epochs stayed
    # beside the new run's, described by nothing (history.json holds the new run alone)
    part = tmp_path / "part"
    assert main(["train-teacher", "--out", str(part), "--epochs", "1", "--seed", "1", "--no-resume", *common]) == 0
    assert "removed 2 checkpoint(s) of the earlier run" in capsys.readouterr().out  # epochs 1 and 3 (2 deleted above)
    assert sorted(p.name for p in part.glob("epoch_*")) == ["epoch_001.safetensors"]
    (part / "resume.safetensors").unlink()  # epochs without a resume state: not written over unless asked
    assert main(["train-teacher", "--out", str(part), "--epochs", "2", *common]) == 2
    assert "no resume.safetensors" in capsys.readouterr().err


def test_eval_errors_are_clean(tmp_path: Path, image_folder: Path, synthetic_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--data", str(image_folder), "--cache-dir", str(tmp_path / "c"), "--no-progress", "--device", "cpu"]
    assert main(["eval", "--images", str(tmp_path / "missing.safetensors"), *common]) == 2
    assert "no such file" in capsys.readouterr().err
    assert main(["eval", "--images", str(synthetic_file), "--models", "ConvNetW8", *common]) == 2
    assert "ELF needs a teacher" in capsys.readouterr().err
    assert main(["eval", "--images", str(synthetic_file), "--teacher", str(tmp_path / "nope.safetensors"), *common]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_eval_without_any_data_explains(monkeypatch: pytest.MonkeyPatch, synthetic_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    monkeypatch.delenv("ELF_DATA", raising=False)
    assert main(["eval", "--images", str(synthetic_file), "--no-elf", "--no-progress"]) == 2
    assert "--data" in capsys.readouterr().err


def test_zca_teacher_and_zca_set(tmp_path: Path, image_folder: Path, synthetic_file: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--data", str(image_folder), "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--device", "cpu"]
    assert main(["train-teacher", "--model", "ConvNetW8D2", "--zca", "--normalization", "cifar10_mtt", "--out",
                 str(tmp_path / "t"), "--epochs", "1", "--batch-size", "12", *common]) == 0
    ckpt = tmp_path / "t" / "epoch_001.safetensors"
    _, meta = elf.checkpoint.load_state_dict(ckpt)
    assert meta["space_zca"] == "true" and meta["space_mean"].startswith("0.4914")
    capsys.readouterr()
    ev = ["eval", "--images", str(synthetic_file), "--teacher", str(ckpt), "--teacher-model", "ConvNetW8D2",
          "--models", "ConvNetW8D2BN", "--epochs", "1", "--runs", "1", *common]
    assert main(ev) == 2  # the set is not ZCA'd, the teacher is
    assert "different pixel spaces: ZCA whitening" in capsys.readouterr().err
    assert main([*ev, "--zca", "--out", str(tmp_path / "r.json")]) == 0
    assert "--zca overrides" in capsys.readouterr().err  # the set's own record says otherwise: said, not silent
    result = json.loads((tmp_path / "r.json").read_text())
    assert result["results"][0]["elf"]["data"]["zca"] is True


def test_zca_defaults_to_mtts_space_of_unnormalized_images(tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """MTT/TESLA/DATM fit ZCA on [0, 1] images: `--zca` without `--normalization` is that space, for the teacher and for
    an images_best.pt set alike (the test images were whitened after normalizing with cifar10_mtt: other pixels)."""
    from elf.pixel_space import NO_NORMALIZATION, fit_zca_cached

    cache = tmp_path / "cache"
    common = ["--data", str(image_folder), "--cache-dir", str(cache), "--no-progress", "--device", "cpu"]
    assert main(["train-teacher", "--model", "ConvNetW8D2", "--zca", "--out", str(tmp_path / "t"), "--epochs", "1",
                 "--batch-size", "12", *common]) == 0
    ckpt = tmp_path / "t" / "epoch_001.safetensors"
    _, meta = elf.checkpoint.load_state_dict(ckpt)
    assert meta["space_zca"] == "true" and meta["space_mean"].startswith("0.0") and meta["space_std"].startswith("1.0")
    train = elf.data.load_image_folder(image_folder, "train", cache_dir=cache, progress=False)
    zca = fit_zca_cached(train, NO_NORMALIZATION, eps=0.1, cache_dir=cache)
    sub = train.per_class(2, torch.Generator().manual_seed(0))
    mtt = tmp_path / "mtt"
    mtt.mkdir()
    torch.save(zca.transform(sub.as_float(NO_NORMALIZATION)), mtt / "images_best.pt")
    torch.save(sub.labels, mtt / "labels_best.pt")
    out = tmp_path / "r.json"
    assert main(["eval", "--images", str(mtt / "images_best.pt"), "--zca", "--teacher", str(ckpt), "--teacher-model",
                 "ConvNetW8D2", "--models", "ConvNetW8D2BN", "--epochs", "1", "--runs", "1", "--out", str(out), *common]) == 0
    assert json.loads(out.read_text())["settings"]["normalization"]["name"] == "none"
    args = elf.cli.build_parser().parse_args(["eval", "--images", str(mtt / "images_best.pt"), "--zca", *common])
    sset, test_x, _ = elf.cli._eval_data(args, lambda s: None)
    test = elf.data.load_image_folder(image_folder, "test", cache_dir=cache, progress=False)
    assert sset.normalization == NO_NORMALIZATION and sset.zca
    assert torch.allclose(test_x, zca.transform(test.as_float(NO_NORMALIZATION)), atol=1e-5)


def test_zca_with_a_normalization_on_an_mtt_file_is_said(tmp_path: Path, image_folder: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: `--zca --normalization cifar10_mtt` on an MTT file whitened the test images after normalizing
    them without a word (load_mtt's warning for that case was never reached: the CLI set zca after loading)."""
    mtt = tmp_path / "mtt"
    mtt.mkdir()
    torch.save(torch.randn(6, 3, 16, 16), mtt / "images_best.pt")
    torch.save(torch.arange(3).repeat_interleave(2), mtt / "labels_best.pt")
    common = ["--data", str(image_folder), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    for norm, said in (("cifar10_mtt", True), ("none", False)):
        args = elf.cli.build_parser().parse_args(["eval", "--images", str(mtt / "images_best.pt"), "--zca",
                                                  "--normalization", norm, *common])
        sset, _, _ = elf.cli._eval_data(args, lambda s: None)
        assert sset.zca and sset.normalization.name == norm
        assert ("whiten un-normalized images" in capsys.readouterr().err) is said


def test_load_mtt_zca_assumes_no_normalization(tmp_path: Path) -> None:
    from elf.io import load_mtt
    from elf.pixel_space import CIFAR10_MTT, NO_NORMALIZATION

    torch.save(torch.randn(6, 3, 4, 4), tmp_path / "images_best.pt")
    torch.save(torch.arange(6) % 3, tmp_path / "labels_best.pt")
    assert load_mtt(tmp_path).normalization is None
    assert load_mtt(tmp_path, zca=True).normalization == NO_NORMALIZATION
    with pytest.warns(UserWarning, match="un-normalized"):
        assert load_mtt(tmp_path, zca=True, normalization=CIFAR10_MTT).normalization == CIFAR10_MTT


@pytest.mark.parametrize("model", ["ConvNetW8D2", "ConvNetW8D2BN"])
def test_eval_with_an_mtt_expert_buffer_teacher(model: str, tmp_path: Path, image_folder: Path, synthetic_file: Path) -> None:
    from elf.feature_bank import teacher_sha256

    torch.manual_seed(3)
    create = elf.create_model(model, num_classes=3, im_size=(16, 16))
    snapshots = [[p.detach().clone() + k for p in create.parameters()] for k in range(3)]  # 3 "epochs"
    buffer = tmp_path / "replay_buffer_0.pt"
    torch.save([snapshots], buffer)  # MTT layout: [trajectory][epoch][param]
    out = tmp_path / "r.json"
    assert main(["eval", "--images", str(synthetic_file), "--teacher", str(buffer), "--teacher-model", model,
                 "--buffer-epoch", "1", "--models", "ConvNetW8D2", "--no-baseline", "--epochs", "1", "--runs", "1",
                 "--data", str(image_folder), "--cache-dir", str(tmp_path / "c"), "--no-progress", "--device", "cpu",
                 "--out", str(out)]) == 0
    recorded = json.loads(out.read_text())["teachers"][0]["teacher_sha256"]
    with torch.no_grad():
        for p, v in zip(create.parameters(), snapshots[1]):
            p.copy_(v)
    # parameters of trajectory 0, epoch 1; with BatchNorm, running stats must have been recomputed (not the init values)
    assert (recorded == teacher_sha256(create)) == (model == "ConvNetW8D2")


def test_distill_mtt_and_glad_from_the_command_line(tmp_path: Path, image_folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    common = ["--data", str(image_folder), "--cache-dir", str(tmp_path / "c"), "--no-progress", "--device", "cpu"]
    assert main(["train-teacher", "--model", "ConvNetW8D2", "--out", str(tmp_path / "expert"), "--epochs", "3",
                 "--batch-size", "12", *common]) == 0
    mtt_set = tmp_path / "mtt.safetensors"
    assert main(["distill", "--method", "mtt", "--experts", str(tmp_path / "expert"), "--ipc", "1", "--iterations", "2",
                 "--syn-steps", "2", "--expert-epochs", "1", "--max-start-epoch", "1", "--model", "ConvNetW8D2",
                 "--snapshot-every", "1", "--out", str(mtt_set), *common]) == 0
    first = elf.io.load_synthetic(tmp_path / "mtt.step000001.safetensors")
    assert first.lr is not None and first.metadata["method"] == "mtt"  # snapshots carry the learned lr too
    sset = elf.io.load_synthetic(mtt_set)
    assert len(sset) == 3 and sset.lr is not None and sset.lr > 0  # the learned lr travels with the set
    # regression: the CLI used the DSA pixel lr (0.1) for MTT instead of MTT's lr_img 1000, so images barely moved
    assert float(sset.metadata["lr_pixels"]) == 1000.0 and sset.metadata["init"] == "real"
    glad_set = tmp_path / "glad.safetensors"
    assert main(["distill", "--method", "dm", "--param", "glad", "--generator", "random", "--ipc", "2",
                 "--iterations", "2", "--batch-real", "4", "--model", "ConvNetW8D2", "--out", str(glad_set), *common]) == 0
    gset = elf.io.load_synthetic(glad_set)
    assert gset.images.shape == (6, 3, 16, 16) and gset.metadata["parameterization"] == "GLaD"
    real_init = tmp_path / "glad_real.safetensors"
    assert main(["distill", "--method", "dm", "--param", "glad", "--generator", "trained", "--generator-epochs", "1",
                 "--glad-init", "real", "--ipc", "1", "--iterations", "1", "--batch-real", "4", "--model", "ConvNetW8D2",
                 "--out", str(real_init), *common]) == 0
    rset = elf.io.load_synthetic(real_init)
    assert rset.images.shape == (3, 3, 16, 16) and rset.metadata["glad_init"] == "real"
    assert rset.metadata["generator_kind"] == "trained"
    capsys.readouterr()
    assert main(["eval", "--images", str(glad_set), "--no-elf", "--protocol", "mtt", "--models", "ConvNetW8D2",
                 "--epochs", "1", "--runs", "1", *common]) == 0
    assert "| ConvNetW8D2 |" in capsys.readouterr().out
    assert main(["distill", "--method", "mtt", "--ipc", "1", "--out", str(tmp_path / "x.safetensors"), *common]) == 2
    assert "--experts" in capsys.readouterr().err


def test_eval_bundled_teacher_serves_resnet_and_vit_through_adapters(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Issue #9: `elf eval --models ResNet18BN timm.<vit> --adapter auto` runs with the bundled width-128 teacher."""
    pytest.importorskip("timm")
    from PIL import Image

    assets = Path(elf.__file__).parent / "assets"
    rng = np.random.default_rng(0)
    for k in range(10):  # the bundled set has CIFAR-10's 10 classes: a toy 10-class test folder at 32x32
        for split in ("train", "test"):
            d = tmp_path / "data" / split / f"c{k}"
            d.mkdir(parents=True)
            Image.fromarray(rng.integers(0, 255, (32, 32, 3), dtype=np.uint8)).save(d / "0.png")
    out = tmp_path / "r.json"
    common = ["--images", str(assets / "demo_set.safetensors"), "--teacher", str(assets / "demo_teacher.safetensors"),
              "--teacher-model", "ConvNet", "--epochs", "1", "--runs", "1", "--no-baseline", "--device", "cpu",
              "--data", str(tmp_path / "data"), "--cache-dir", str(tmp_path / "cache"), "--no-progress"]
    vit = "timm.vit_tiny_patch16_224:patch_size=4"
    # without adapters the shapes do not match: a one-line error naming the fix, exit 2
    assert main(["eval", *common, "--models", "ResNet18BN"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("elf eval: error:") and "--adapter auto" in err
    assert main(["eval", *common, "--models", "ResNet18BN", vit, "--adapter", "auto", "--align-targets", "--out", str(out)]) == 0
    rows = {r["model"]: r for r in json.loads(out.read_text())["results"]}
    assert rows["ResNet18BN"]["split_at"] == "layer4.0" and rows[vit]["split_at"] == "norm"
    assert "(65, 192)" in rows[vit]["elf"]["data"]["adapters"]
    assert rows[vit]["elf"]["protocol"]["adapter"] == "auto" and rows[vit]["elf"]["protocol"]["align_targets"]


def test_eval_batched_equals_sequential(tmp_path: Path, image_folder: Path, synthetic_file: Path,
                                        capsys: pytest.CaptureFixture[str]) -> None:
    """`elf eval --batched` trains the seeds of a model at once and reports the accuracies of one-by-one runs."""
    teacher = elf.create_model("ConvNetW8D2", num_classes=3, im_size=(16, 16))
    ckpt = tmp_path / "t.safetensors"
    elf.save_checkpoint(teacher, ckpt)
    common = ["eval", "--images", str(synthetic_file), "--teacher", str(ckpt), "--teacher-model", "ConvNetW8D2",
              "--models", "ConvNetW8D2BN", "--epochs", "2", "--runs", "3", "--batch-size", "3", "--data", str(image_folder),
              "--cache-dir", str(tmp_path / "cache"), "--no-progress", "--device", "cpu"]
    rows = {}
    for name, extra in (("seq", []), ("batched", ["--batched"]), ("groups", ["--batched", "2"])):
        assert main([*common, *extra, "--out", str(tmp_path / f"{name}.json")]) == 0
        (rows[name],) = json.loads((tmp_path / f"{name}.json").read_text())["results"]
    for name in ("batched", "groups"):
        for method in ("baseline", "elf"):
            assert rows[name][method]["accuracies"] == pytest.approx(rows["seq"][method]["accuracies"], abs=1e-6)
    assert rows["batched"]["elf"]["data"]["batched"]["seeds"] == 3
    capsys.readouterr()
    assert main([*common, "--compile"]) == 2
    assert "add --batched" in capsys.readouterr().err


def test_eval_says_which_normalization_it_assumes_for_a_set_without_one(tmp_path: Path, image_folder: Path,
                                                                         capsys: pytest.CaptureFixture[str]) -> None:
    """Regression: a set recording no normalization (e.g. a DC/DM result of SVHN) got --normalization's default and
    its test images with it, silently."""
    imgs = elf.data.load_image_folder(image_folder, "train", cache_dir=tmp_path / "c", progress=False)
    sub = imgs.per_class(2, torch.Generator().manual_seed(0))
    path = tmp_path / "bare.safetensors"
    save_synthetic(path, SyntheticSet(sub.as_float(CIFAR10_MTT), sub.labels))
    assert main(["eval", "--images", str(path), "--no-elf", "--models", "ConvNetW8D2", "--epochs", "1", "--runs", "1",
                 "--data", str(image_folder), "--cache-dir", str(tmp_path / "c"), "--no-progress", "--device", "cpu"]) == 0
    assert "records no normalization: assuming cifar10_mtt" in capsys.readouterr().err  # also with --no-progress


def test_cifar_downloads_go_under_elf_cache_by_default(tmp_path, monkeypatch) -> None:
    """Regression: --data-root (elf eval, elf distill) and a study's cifar10 had ~/.cache/elf-dd/torchvision hard-coded,
    so a user who moved every cache with ELF_CACHE still got the downloads in the home folder."""
    import argparse

    import elf.data
    import elf.study
    from elf.cli import _load_split

    roots: list[Path] = []

    def fake_load_cifar(name, root, train, download=True):
        roots.append(Path(root))
        raise elf.ELFError("offline")

    monkeypatch.setattr(elf.data, "load_cifar", fake_load_cifar)
    monkeypatch.setenv("ELF_CACHE", str(tmp_path / "cache"))
    args = argparse.Namespace(data="cifar10", data_root=None, cache_dir=None, no_progress=True)
    for given in (None, str(tmp_path / "mine")):
        args.data_root = given
        with pytest.raises(elf.ELFError, match="offline"):
            _load_split(args, "train", None)
    cfg = elf.study.StudyConfig(sets={}, models=["ConvNet"], data="cifar10", out=str(tmp_path / "out"))
    with pytest.raises(elf.ELFError, match="offline"):
        elf.study._Resources(cfg, torch.device("cpu"), lambda _: None)._load("train")
    assert roots == [tmp_path / "cache" / "torchvision", tmp_path / "mine", tmp_path / "cache" / "torchvision"]
