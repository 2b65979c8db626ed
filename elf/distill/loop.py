"""The distillation loop shared by every parameterization and objective, with checkpoints and exact resume.

Per step: ``x = param.images_for_loss()``; ``loss = objective.loss(x, param.labels, step, generator)``;
``loss.backward(inputs=...)`` into the optimized parameters (and ``x`` when it is a detached leaf) only;
``param.finish_backward(x)``; one SGD step over the parameterization's and the objective's
parameter groups. Every random choice is drawn from one seeded ``torch.Generator`` on the device; the loss is read
back to the host only every ``log_every`` steps.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from ..errors import ELFError
from ..fileio import PathLike
from ..resume import read_state, write_state
from ..synthetic import SyntheticSet
from .base import Objective, Parameterization

__all__ = ["distill", "make_optimizer", "CHECKPOINT_NAME", "STATE_FORMAT"]

CHECKPOINT_NAME = "distill_state.safetensors"
STATE_FORMAT = "elf-distill-state/1"


def make_optimizer(param: Parameterization, objective: Objective) -> torch.optim.SGD:
    """SGD over ``param.param_groups() + objective.param_groups()``, each group with its own lr and momentum."""
    groups = []
    for g in list(param.param_groups()) + list(objective.param_groups()):
        if "params" not in g or "lr" not in g:
            raise ELFError(f"an optimizer group needs 'params' and 'lr'; got keys {sorted(g)}")
        groups.append({k: v for k, v in g.items() if k != "name"})
    if not groups:
        raise ELFError("nothing to optimize: the parameterization and the objective returned no parameter groups")
    return torch.optim.SGD(groups, lr=groups[0]["lr"])


def _fingerprint(param: Parameterization, objective: Objective) -> str:
    return json.dumps({"param": type(param).__name__, "objective": objective.metadata()}, sort_keys=True)


def _settings(param: Parameterization, objective: Objective) -> str:
    """What else decides the run: the set's pixel space, the parameterization's own settings (init, factor, ...) and
    every optimizer group's lr and momentum (checked on resume when the checkpoint records it)."""
    groups = [{k: v for k, v in g.items() if k != "params"} for g in [*param.param_groups(), *objective.param_groups()]]
    own = param.metadata() if callable(getattr(param, "metadata", None)) else {}
    norm = param.normalization.to_dict() if param.normalization is not None else None
    return json.dumps({"normalization": norm, "param": own, "groups": groups}, sort_keys=True, default=str)


def _save(path: Path, step: int, seed: int, param: Parameterization, objective: Objective, opt: torch.optim.Optimizer,
          gen: torch.Generator, history: list[dict[str, Any]], window: tuple[float, int]) -> None:
    """``window``: the loss sum and step count of the log window in progress (so that a resumed run logs the same
    averages as an uninterrupted one)."""
    meta = {"step": str(step), "seed": str(seed), "fingerprint": _fingerprint(param, objective),
            "settings": _settings(param, objective),
            "history": json.dumps(history, default=str), "loss_window": json.dumps(list(window))}
    write_state(path, STATE_FORMAT, sections={"param": param.state_dict(), "objective": objective.state_dict()},
                optimizer=opt, generators={"loop": gen}, meta=meta)


def _load(path: Path, seed: int, param: Parameterization, objective: Objective, opt: torch.optim.Optimizer,
          gen: torch.Generator, device: torch.device) -> tuple[int, list[dict[str, Any]], tuple[float, int]]:
    saved = read_state(path, STATE_FORMAT, what="a distillation checkpoint; delete it or pass resume=False", device=device)
    meta = saved.meta
    if meta.get("seed") != str(seed):
        raise ELFError(f"{path} was written by a run with seed {meta.get('seed')}; resume with seed={meta.get('seed')} "
                       "or start over with resume=False (or another checkpoint_dir)")
    if meta.get("fingerprint") != _fingerprint(param, objective):
        raise ELFError(f"{path} was written with other settings ({meta.get('fingerprint')}); use the same settings, "
                       "another checkpoint_dir, or resume=False")
    if "settings" in meta and meta["settings"] != _settings(param, objective):  # (older checkpoints lack it)
        raise ELFError(f"{path} was written with another pixel space, initialization or optimizer setting "
                       f"({meta['settings']}, now {_settings(param, objective)}); use the same settings, another "
                       "checkpoint_dir, or resume=False")
    try:
        param.load_state_dict(saved.section("param"))
    except RuntimeError as e:
        raise ELFError(f"{path} does not fit this parameterization ({e}); use the same ipc/shape or resume=False") from e
    saved.restore_momentum(opt)
    saved.restore_generator("loop", gen)
    objective.load_state_dict(saved.section("objective"))
    loss_sum, count = json.loads(meta.get("loss_window", "[0.0, 0]"))  # (older checkpoints: the window restarts)
    return int(meta["step"]), json.loads(meta.get("history", "[]")), (float(loss_sum), int(count))


def distill(
    param: Parameterization,
    objective: Objective,
    iterations: int,
    *,
    seed: int = 0,
    device: torch.device | str | None = None,
    progress: bool = True,
    log_every: int = 10,
    checkpoint_dir: PathLike | None = None,
    checkpoint_every: int = 100,
    resume: bool = True,
    eval_fn: Callable[[SyntheticSet, int], Any] | None = None,
    eval_every: int | None = None,
    metadata: dict[str, str] | None = None,
) -> SyntheticSet:
    """Optimize ``param`` for ``iterations`` steps of ``objective``; returns the exported synthetic set.

    Args:
        param: the synthetic set's parameterization (e.g. :class:`~elf.distill.PixelParam`), moved to ``device``.
        objective: e.g. :class:`~elf.distill.DistributionMatching`.
        iterations: image updates in total (a resumed run continues up to this number).
        seed: seeds the loop's generator on ``device``; the same seed gives the same set on CPU.
        device: default: where ``param.labels`` lives.
        progress: tqdm bar (loss shown every ``log_every`` steps; reading it back synchronizes).
        checkpoint_dir: where ``distill_state.safetensors`` (parameters, momentum, generator and objective state,
            step, logged losses) is written every ``checkpoint_every`` steps and at the end. With ``resume`` an
            existing checkpoint there is continued; on CPU the result equals an uninterrupted run bit for bit.
        eval_fn: ``eval_fn(synthetic_set, step)`` every ``eval_every`` steps and after the last one; its result is
            logged (and stored as JSON in the metadata when it serializes). Torch's global RNG state is restored
            after each call.
        metadata: extra strings stored in the exported set (e.g. the data source).

    The exported set's metadata holds the objective's :meth:`~Objective.metadata`, ``iterations``, ``seed``,
    ``final_loss`` and the logged ``history``. An objective may offer ``learned_lr() -> float | None`` (MTT's lr),
    exported as the set's lr.
    """
    if not isinstance(param, Parameterization):
        raise ELFError(f"param must be a Parameterization (PixelParam, ...), got {type(param).__name__}")
    if not isinstance(objective, Objective):
        raise ELFError(f"objective must be an Objective (DistributionMatching, GradientMatching, ...), got {type(objective).__name__}")
    if iterations < 0 or log_every < 1 or checkpoint_every < 1 or (eval_every is not None and eval_every < 1):
        raise ELFError("need iterations >= 0, log_every >= 1, checkpoint_every >= 1 and eval_every >= 1")
    dev = torch.device(device) if device is not None else param.labels.device
    param.to(dev)
    gen = torch.Generator(device=dev)
    gen.manual_seed(seed)
    opt = make_optimizer(param, objective)
    ckpt = Path(checkpoint_dir).expanduser() / CHECKPOINT_NAME if checkpoint_dir is not None else None
    start, history, window = 0, [], (0.0, 0)
    if ckpt is not None and resume and ckpt.exists():
        start, history, window = _load(ckpt, seed, param, objective, opt, gen, dev)
        if start > iterations:  # the set is at step `start`: exporting it as `iterations` steps would misstate it
            raise ELFError(f"{ckpt} is at step {start}, past iterations={iterations}: ask for at least {start} "
                           "iterations, or start over with resume=False (or another checkpoint_dir)")
    evals: list[dict[str, Any]] = []

    def run_eval(step_done: int) -> None:
        assert eval_fn is not None
        with torch.random.fork_rng(devices=[dev] if dev.type == "cuda" else []):
            snapshot_meta = {**objective.metadata(), "iterations": str(iterations), "seed": str(seed), **(metadata or {})}
            result = eval_fn(param.export(snapshot_meta, lr=_learned_lr(objective)), step_done)
        evals.append({"step": step_done, "eval": result})
        history.append({"step": step_done, "eval": result})

    steps: Any = range(start, iterations)
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(steps, desc=f"distill {objective.name}", unit="it", initial=start, total=iterations, leave=False)
        steps = bar
    t0 = time.perf_counter()
    loss_sum = torch.tensor(window[0], device=dev)
    count = window[1]
    last_loss: float | None = next((h["loss"] for h in reversed(history) if "loss" in h), None)
    for step in steps:
        x = param.images_for_loss()
        loss = objective.loss(x, param.labels, step, gen)
        if not isinstance(loss, torch.Tensor) or loss.dim() != 0:
            raise ELFError(f"{type(objective).__name__}.loss must return a scalar tensor")
        opt.zero_grad(set_to_none=True)
        loss.backward(inputs=_backward_inputs(opt, x))  # not into the weights of a network in the graph (gradient matching)
        param.finish_backward(x)
        opt.step()
        loss_sum += loss.detach()
        count += 1
        done = step + 1
        if done % log_every == 0 or done == iterations:
            last_loss = float(loss_sum) / count
            history.append({"step": done, "loss": last_loss})
            loss_sum.zero_()
            count = 0
            if bar is not None:
                bar.set_postfix(loss=f"{last_loss:.4g}")
        if eval_fn is not None and eval_every is not None and done % eval_every == 0 and done != iterations:
            run_eval(done)
        if ckpt is not None and (done % checkpoint_every == 0 or done == iterations):
            _save(ckpt, done, seed, param, objective, opt, gen, history, (float(loss_sum), count))
    if bar is not None:
        bar.close()
    if eval_fn is not None:
        run_eval(max(start, iterations))
    meta: dict[str, str] = {**objective.metadata(), "iterations": str(iterations), "seed": str(seed),
                            "final_loss": "" if last_loss is None else repr(last_loss),
                            "distill_wall_time_s": f"{time.perf_counter() - t0:.1f}",
                            "history": json.dumps(history, default=str)}
    if evals:
        meta["eval"] = json.dumps(evals[-1], default=str)
    meta.update(metadata or {})
    return param.export(meta, lr=_learned_lr(objective))


def _backward_inputs(opt: torch.optim.Optimizer, images: torch.Tensor) -> list[torch.Tensor] | None:
    """What ``loss.backward()`` fills: the optimized tensors, and ``images`` when it is a leaf that
    :meth:`~Parameterization.finish_backward` passes on (GLaD); no other tensor of the graph gets a ``.grad``.
    None (every leaf, as a plain ``backward()``) when no optimized tensor requires grad."""
    inputs = [p for g in opt.param_groups for p in g["params"] if p.requires_grad]
    if images.is_leaf and images.requires_grad and not any(images is p for p in inputs):
        inputs.append(images)
    return inputs or None


def _learned_lr(objective: Objective) -> float | None:
    """The objective's learned student lr (MTT), exported with the set; None for objectives without one."""
    learned = getattr(objective, "learned_lr", None)
    return learned() if callable(learned) else None
