"""Teachers: train the teacher ("distillation model") that ELF takes features from, load it, or load MTT expert buffers.

The expert protocol of the public MTT code (``buffer.py``): SGD lr 0.01, momentum 0 and weight decay 0 (the ELF
paper's feature models: momentum 0.9, weight decay 5e-4), batch 256, DSA augmentation on the real images, constant
lr. A checkpoint per epoch (safetensors, BatchNorm running statistics included, which MTT's expert buffers drop)
lets the user pick the feature epoch; the paper uses epochs 30-100 and finds the choice matters little. Training
resumes after an interruption from ``<out_dir>/resume.safetensors``.

MTT's published experts are ``replay_buffer_<n>.pt`` files of parameter snapshots: :func:`load_expert_buffer` reads
one snapshot and :func:`load_parameters_into` copies it into a model built like the expert
(:func:`elf.batchnorm.recompute_bn_stats` then restores the BatchNorm statistics the buffers drop).
"""

from __future__ import annotations

import json
import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from .checkpoint import load_checkpoint, save_checkpoint
from .errors import ELFError
from .resume import changed_settings
from .fileio import PathLike, atomic_write, safe_torch_load, tensor_sha256
from .models import create_model
from .protocol import Protocol
from .trainer import Callback, ELFTrainer

__all__ = [
    "TeacherRun",
    "expert_protocol",
    "train_teacher",
    "load_teacher",
    "teacher_from_expert_buffer",
    "checkpoint_path",
    "load_expert_buffer",
    "load_parameters_into",
]


def expert_protocol(epochs: int = 50, momentum: float = 0.0, weight_decay: float = 0.0, **changes: Any) -> Protocol:
    """The MTT expert-training protocol as a :class:`Protocol` (no ELF terms, constant lr, no extra epoch).

    MTT's ``buffer.py`` trains its experts with plain SGD (momentum 0, weight decay 0), the defaults here; the ELF
    paper's feature models use momentum 0.9 and weight decay 5e-4 (``expert_protocol(momentum=0.9,
    weight_decay=5e-4)``)."""
    base = Protocol(
        name="mtt-expert",
        epochs=epochs,
        extra_epoch=False,
        lr=0.01,
        momentum=momentum,
        weight_decay=weight_decay,
        batch_size=256,
        lr_decay=1.0,
        lambda_front=0.0,
        lambda_rear=0.0,
        notes="MTT buffer.py expert training: SGD lr 0.01, no momentum, no weight decay, batch 256, DSA on real images",
    )
    return base.replace(**changes) if changes else base


def checkpoint_path(out_dir: PathLike, epoch: int) -> Path:
    """``<out_dir>/epoch_<epoch:03d>.safetensors``: the weights after ``epoch`` (1-based) training epochs."""
    return Path(out_dir) / f"epoch_{epoch:03d}.safetensors"


@dataclass
class TeacherRun:
    """A finished teacher training: its directory, model name, and per-epoch test accuracy (percent)."""

    out_dir: Path
    model: str
    test_accuracy: dict[int, float] = field(default_factory=dict)
    teacher: nn.Module | None = None

    def checkpoint(self, epoch: int) -> Path:
        return checkpoint_path(self.out_dir, epoch)


class _EpochCheckpoints(Callback):
    def __init__(self, run: TeacherRun, test: tuple[torch.Tensor, torch.Tensor] | None, meta: dict[str, str],
                 log: Callable[[str], None]) -> None:
        self.run, self.test, self.meta, self.log = run, test, meta, log
        self.t0 = time.perf_counter()

    def on_epoch_end(self, trainer: ELFTrainer, epoch: int, logs: dict[str, torch.Tensor]) -> None:
        assert trainer.model is not None
        done = epoch + 1
        line = f"epoch {done}: train loss {float(logs['loss']):.4f}, train acc {float(logs['train_acc']):.2f}%"
        meta = {**self.meta, "epoch": str(done)}
        if self.test is not None:
            acc = trainer.evaluate(*self.test)
            self.run.test_accuracy[done] = acc
            line += f", test acc {acc:.2f}%"
            meta.update(test_accuracy=f"{acc:.4f}", test_n=str(int(self.test[1].shape[0])))  # travels into banks and runs
        save_checkpoint(trainer.model, checkpoint_path(self.run.out_dir, done), meta)
        trainer.save_state(self.run.out_dir / "resume.safetensors")
        history = {"model": self.run.model, "test_accuracy": self.run.test_accuracy, "meta": self.meta}
        atomic_write(self.run.out_dir / "history.json", lambda p: Path(p).write_text(json.dumps(history, indent=1)))
        self.log(f"{line} ({time.perf_counter() - self.t0:.0f} s)")


def train_teacher(
    model: str,
    train_images: torch.Tensor,
    train_labels: torch.Tensor,
    out_dir: PathLike,
    *,
    test: tuple[torch.Tensor, torch.Tensor] | None = None,
    epochs: int = 50,
    momentum: float = 0.0,
    weight_decay: float = 0.0,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    resume: bool = True,
    metadata: dict[str, str] | None = None,
    log: Callable[[str], None] = print,
    **protocol_changes: Any,
) -> TeacherRun:
    """Train ``model`` (a name, e.g. "ConvNet" or "ConvNetW512") on real data, saving a checkpoint per epoch.

    Args:
        train_images: real images ``(N, C, H, W)``, normalized. train_labels: ``(N,)`` class indices.
        out_dir: where ``epoch_XXX.safetensors``, ``history.json`` and ``resume.safetensors`` go.
        test: optional ``(images, labels)``; test accuracy is reported and recorded after every epoch.
        epochs, momentum, weight_decay, seed: the expert protocol's numbers (see :func:`expert_protocol`; MTT's
            experts: momentum 0 and weight decay 0; the ELF paper's feature models: 0.9 and 5e-4).
        resume: continue from ``resume.safetensors`` when present (same seed, protocol, training images and
            ``metadata``, e.g. the pixel space; another is refused). ``False`` starts over and removes the
            checkpoints of an earlier run in ``out_dir``; epoch checkpoints without a resume state are refused
            unless ``resume=False``.
        metadata: strings stored in every checkpoint (e.g. the dataset's hash and normalization).
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    protocol = expert_protocol(epochs, momentum, weight_decay, **protocol_changes)
    run = TeacherRun(out, model)
    history_file = out / "history.json"
    state_file = out / "resume.safetensors"
    resume_from = state_file if resume and state_file.exists() else None
    earlier = sorted(out.glob("epoch_*.safetensors"))
    if resume_from is None and earlier:  # starting over must not leave the earlier run's later epochs beside the new
        if resume:
            raise ELFError(f"{out} holds {len(earlier)} checkpoint(s) of an earlier run but no resume.safetensors to "
                           "continue it: start over with resume=False / --no-resume (removes them), or use another "
                           "output directory")
        for path in earlier:
            path.unlink()
        history_file.unlink(missing_ok=True)
        state_file.unlink(missing_ok=True)
        log(f"starting over in {out}: removed {len(earlier)} checkpoint(s) of the earlier run")
    meta = {"model": model, "protocol": json.dumps(protocol.to_dict()), "seed": str(seed),
            "train_sha256": tensor_sha256(train_images, train_labels),
            # the test images too: a resume scored on others would mix two test sets in history.json
            "test_sha256": tensor_sha256(*test) if test is not None else "", **(metadata or {})}
    if resume_from is not None and history_file.exists():
        old = json.loads(history_file.read_text())
        before = old.get("meta", {})  # what the saved epochs were trained with (keys it predates are not compared)
        # (the protocol is the trainer's to compare: more epochs of a constant lr continue the same run)
        shown = changed_settings({k: v for k, v in before.items() if k in meta}, meta, {"protocol"})
        if shown:
            raise ELFError(f"{out} holds a run trained with other data or settings ({shown}); resume with the same "
                           "data and options, or start over (another output directory, or resume=False / --no-resume)")
        run.test_accuracy = {int(k): v for k, v in old.get("test_accuracy", {}).items()}
    trainer = ELFTrainer(model, train_images, train_labels, protocol=protocol, device=device, progress=progress,
                         callbacks=[_EpochCheckpoints(run, test, meta, log)], log_every=1)
    if resume_from is not None:
        log(f"resuming {model} from {resume_from}")
    trainer.fit(seed, resume_from=resume_from)
    run.teacher = trainer.model
    return run


def load_teacher(model: str, checkpoint: PathLike, *, channel: int = 3, num_classes: int = 10,
                 im_size: tuple[int, int] = (32, 32), device: torch.device | str = "cpu") -> nn.Module:
    """Build ``model`` and load a checkpoint into it, in eval mode."""
    path = Path(checkpoint)
    if not path.exists():
        raise ELFError(f"teacher checkpoint {path} does not exist (train one with `elf train-teacher`)")
    teacher = create_model(model, channel=channel, num_classes=num_classes, im_size=im_size)
    load_checkpoint(teacher, path)
    return teacher.to(device).eval()


# --------------------------------------------------------------------------------------------------------------
# MTT expert buffers


def load_expert_buffer(path: PathLike, trajectory: int = -1, epoch: int = -1) -> list[Tensor]:
    """Parameters of one snapshot of an MTT ``replay_buffer_<n>.pt``: a list of tensors in ``model.parameters()`` order.

    Defaults: the last trajectory (as the ELF evaluation script takes ``buffer[-1]``) and its last snapshot; ELF's
    published runs take epoch 100 of 200-epoch buffers (``--feature_epochs 100``: ``epoch=100``).

    The file is a list of trajectories; each trajectory a list of (epochs + 1) snapshots; each snapshot a list of
    CPU tensors. BatchNorm running statistics are *not* stored: after :func:`load_parameters_into`, a model with
    BatchNorm keeps its initial running stats, so call :func:`elf.batchnorm.recompute_bn_stats` before using it in
    eval mode.
    """
    path = Path(path).expanduser()
    obj = safe_torch_load(path)
    if not isinstance(obj, (list, tuple)) or not obj:
        raise ELFError(f"{path}: not an MTT expert buffer (expected a non-empty list of trajectories)")
    if not -len(obj) <= trajectory < len(obj):
        raise ELFError(f"{path}: trajectory {trajectory} does not exist; the buffer holds {len(obj)} trajectories")
    traj = obj[trajectory]
    if not isinstance(traj, (list, tuple)) or not traj:
        raise ELFError(f"{path}: trajectory {trajectory} is not a non-empty list of snapshots")
    if not -len(traj) <= epoch < len(traj):
        raise ELFError(f"{path}: epoch {epoch} does not exist; trajectory {trajectory} holds {len(traj)} snapshots (epochs 0..{len(traj) - 1})")
    snap = traj[epoch]
    if not isinstance(snap, (list, tuple)) or not all(isinstance(t, Tensor) for t in snap):
        raise ELFError(f"{path}: snapshot [{trajectory}][{epoch}] is not a list of tensors")
    return [t.detach() for t in snap]


def load_parameters_into(model: nn.Module, params: Sequence[Tensor]) -> nn.Module:
    """Copy ``params`` into ``model.parameters()`` in order (count and shapes checked); returns ``model``.

    Buffers (BatchNorm running statistics) are untouched: see :func:`elf.batchnorm.recompute_bn_stats`.
    """
    named = list(model.named_parameters())
    for i, ((name, p), t) in enumerate(zip(named, params)):
        if tuple(p.shape) != tuple(t.shape):
            raise ELFError(
                f"parameter {i} {name!r}: the model has shape {tuple(p.shape)} but the buffer has {tuple(t.shape)}; "
                "build the same architecture (width, depth, norm, image size, classes) as the expert"
            )
    if len(named) != len(params):
        first = repr(named[len(params)][0]) if len(named) > len(params) else f"buffer tensor {len(named)} {tuple(params[len(named)].shape)}"
        raise ELFError(
            f"the buffer has {len(params)} tensors but the model has {len(named)} parameters (first unmatched: {first}); "
            "build the same architecture as the expert"
        )
    with torch.no_grad():
        for (_, p), t in zip(named, params):
            p.copy_(t.to(device=p.device, dtype=p.dtype))
    return model


def _check_buffer_folder(path: Path, teacher: nn.Module, model: str, image_shape: tuple[int, int, int],
                         num_classes: int) -> None:
    """Warn when ``path``'s parent folder names a model (MTT's ``<dataset>/<model>/`` layout) built differently from
    ``teacher`` (``model``)."""
    from .models.registry import RESERVED_PREFIXES, canonical_name

    folder = path.expanduser().parent.name
    if not folder or folder.startswith(RESERVED_PREFIXES) or canonical_name(folder) == canonical_name(model):
        return  # torchvision/timm names are not MTT's folders (and could be huge); the same name needs no build
    c, h, w = image_shape
    try:
        with torch.device("meta"):  # no memory, no draw from the global RNG
            named = create_model(folder, channel=c, num_classes=num_classes, im_size=(h, w))
    except Exception:  # not a model name (a dataset, a run folder): nothing to compare
        return
    if repr(named) != repr(teacher):
        warnings.warn(f"{path} sits in a folder named {folder!r} (MTT saves buffers under <dataset>/<model>/), another "
                      f"architecture than {model!r}, which it is read as: parameters of the same shapes load into "
                      "either (e.g. instance norm and BatchNorm), so check the teacher model name", stacklevel=3)


def teacher_from_expert_buffer(
    path: PathLike,
    model: str,
    image_shape: tuple[int, int, int],
    num_classes: int,
    *,
    trajectory: int = -1,
    epoch: int = -1,
    bn_images: Callable[[], Tensor] | Tensor | None = None,
    log: Callable[[str], None] = print,
) -> nn.Module:
    """A teacher (eval mode) from one snapshot of an MTT expert buffer ``replay_buffer_<n>.pt``.

    Buffers hold parameters only: for a model with BatchNorm, the running statistics are recomputed on ``bn_images``
    (real training images ``(M, C, H, W)`` prepared like the synthetic set, or a function returning them, called
    only when needed); without them such a teacher is refused. MTT's ``buffer.py`` saves buffers under
    ``<dataset>/<model>/``: a parent folder named after another registered model (an instance-norm ``ConvNet`` buffer
    read as ``ConvNetBN``, whose parameters have the same shapes) warns.
    """
    from .batchnorm import has_batchnorm, recompute_bn_stats

    c, h, w = image_shape
    teacher = create_model(model, channel=c, num_classes=num_classes, im_size=(h, w))
    _check_buffer_folder(Path(path), teacher, model, image_shape, num_classes)
    load_parameters_into(teacher, load_expert_buffer(path, trajectory, epoch))
    if has_batchnorm(teacher):
        if bn_images is None:
            raise ELFError(f"{path} holds no BatchNorm statistics and {model} has BatchNorm: give real images to "
                           "recompute them (bn_images=)")
        log(f"{path} holds no BatchNorm statistics: recomputing them for {model} on real training images")
        recompute_bn_stats(teacher, bn_images() if callable(bn_images) else bn_images)
    return teacher.eval()
