"""Reading and writing model checkpoints: safetensors for what we write, ``weights_only`` torch files for others."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

import torch
from torch import nn

from .errors import ELFError, model_name
from .fileio import PathLike, load_tensors, safe_torch_load, save_tensors, state_dict_sha256

__all__ = ["save_checkpoint", "load_state_dict", "load_checkpoint"]


def save_checkpoint(model: nn.Module, path: PathLike, metadata: Mapping[str, object] | None = None) -> Path:
    """Save ``model.state_dict()`` (BatchNorm running statistics included) as safetensors, atomically."""
    state = {k: v for k, v in model.state_dict().items()}
    meta = {"format": "elf-checkpoint/1", "class": type(model).__name__, "sha256": state_dict_sha256(state)}
    name = getattr(model, "elf_model_name", None)
    if name:
        meta["model"] = str(name)
    meta.update({k: str(v) for k, v in (metadata or {}).items()})
    return save_tensors(path, state, meta)


def load_state_dict(path: PathLike) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """``(state_dict, metadata)`` from a ``.safetensors`` file or a ``.pt``/``.pth`` state dict.

    ``.pt`` files are read with ``weights_only=True``; a dict holding the state under ``"state_dict"``,
    ``"model"`` or ``"net"`` is unwrapped.
    """
    p = Path(path)
    if p.suffix == ".safetensors":
        return load_tensors(p)
    obj = safe_torch_load(p)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model", "net"):
            if key in obj and isinstance(obj[key], Mapping):
                obj = obj[key]
                break
        if all(isinstance(v, torch.Tensor) for v in obj.values()):
            return dict(obj), {}
    raise ELFError(f"{p}: expected a state dict (a mapping of parameter names to tensors), got {type(obj).__name__}")


def load_checkpoint(model: nn.Module, path: PathLike, strict: bool = True) -> nn.Module:
    """Load a checkpoint into ``model`` (in place; returned for chaining), with an error naming mismatched keys.

    A state dict saved from ``nn.DataParallel`` (the DC code's ``get_network`` wraps models in it on several GPUs)
    has every key prefixed with ``module.``: the prefix is dropped when the model's own keys do not have it.
    """
    state, meta = load_state_dict(path)
    if "sha256" in meta and meta["sha256"] != state_dict_sha256(state):
        raise ELFError(f"{path}: the weights do not match the checksum stored in the file; it is corrupt, recreate it")
    own_keys = model.state_dict().keys()
    if (state and all(k.startswith("module.") for k in state)
            and not any(k.startswith("module.") for k in own_keys)):
        state = {k[len("module."):]: v for k, v in state.items()}
    try:
        result = model.load_state_dict(state, strict=False)
    except RuntimeError as e:  # shape mismatches: one line naming the first few, not torch's one line per tensor
        own = model.state_dict()
        mismatched = [k for k, v in own.items() if k in state and tuple(state[k].shape) != tuple(v.shape)]  # model order
        bad = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in mismatched]
        detail = "; ".join(bad[:3]) + (f"; and {len(bad) - 3} more" if len(bad) > 3 else "") if bad else str(e).splitlines()[0]
        linear_only = bool(mismatched) and all(own[k].dim() == 2 for k in mismatched)
        why = ("only the fully connected layers differ: the model was built for images of another size than the file "
               "was trained on (a ConvNet's classifier takes its flattened features), so use images of the size it "
               "was trained on, or a checkpoint trained on yours" if linear_only else
               f"was it saved from another model (file says: {meta.get('model', meta.get('class', 'unknown'))})? Build "
               "the model it was saved from (e.g. --teacher-model with its width)")
        raise ELFError(f"{path} does not fit {model_name(model)} (shapes, file vs model: {detail}); {why}") from e
    problems = []
    if strict and result.missing_keys:
        problems.append(f"missing {result.missing_keys[:5]}")
    if strict and result.unexpected_keys:
        problems.append(f"unexpected {result.unexpected_keys[:5]}")
    if problems:
        raise ELFError(
            f"{path} does not fit {model_name(model)} ({'; '.join(problems)}); was it saved from another model "
            f"(file says: {meta.get('model', meta.get('class', 'unknown'))})?"
        )
    return model
