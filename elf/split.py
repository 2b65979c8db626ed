"""Cut a model into ``front`` and ``rear`` so that ``rear(front(x)) == model(x)``.

Points are named as in torchvision's ``models.feature_extraction``: a module path such as ``"layer4.0"`` means
"after the last operation inside that module", and a node name such as ``"layer4.0.add"`` means after that node.
The model is traced with torchvision's ``NodePathTracer`` (torch.fx) in train and in eval mode and partitioned with
``torch.fx.passes.split_module``; front and rear share parameters with the original model.

A cut is valid when exactly one tensor crosses it. Cutting inside a residual block is crossed by the skip tensor as
well, and is refused. Models with ``forward_features``/``forward_head`` (timm, our built-ins) can also be cut at
``"forward_features"`` without tracing; models that cannot be traced are passed as a ``(front, rear)`` pair instead.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torch.fx.passes.split_module import split_module as _fx_split_module
from torchvision.models.feature_extraction import NodePathTracer

from .errors import ELFError

__all__ = ["SplitModules", "SplitPoint", "split_model", "list_split_points"]

FORWARD_FEATURES = "forward_features"


class SplitModules(NamedTuple):
    """``front`` maps ``(N, C, H, W)`` images to the cut tensor; ``rear`` maps that tensor to the model output."""

    front: nn.Module
    rear: nn.Module


@dataclass(frozen=True)
class SplitPoint:
    """A valid cut: its ``name`` (outermost module path), other ``aliases``, and per-sample output ``shape``."""

    name: str
    shape: tuple[int, ...] | None
    aliases: tuple[str, ...] = ()

    def __str__(self) -> str:
        shape = "x".join(map(str, self.shape)) if self.shape is not None else "?"
        return f"{self.name:<24} {shape}"


class _MethodModule(nn.Module):
    """Calls one method of a wrapped model (``forward_features`` or ``forward_head``); shares its parameters."""

    def __init__(self, model: nn.Module, method: str) -> None:
        super().__init__()
        self.model = model
        self.method = method

    def forward(self, x: torch.Tensor) -> Any:
        return getattr(self.model, self.method)(x)


class _ModeDispatch(nn.Module):
    """Runs the graph traced in train mode while training and the eval-mode graph otherwise."""

    def __init__(self, train_graph: nn.Module, eval_graph: nn.Module) -> None:
        super().__init__()
        self.train_graph = train_graph
        self.eval_graph = eval_graph

    def forward(self, x: Any) -> Any:
        return (self.train_graph if self.training else self.eval_graph)(x)


@dataclass
class _Traced:
    graph_module: fx.GraphModule
    nodes: list[fx.Node]  # topological order, without the placeholder and output nodes
    qualname: dict[fx.Node, str]
    last_index: dict[str, int]  # every alias (module path or node name) -> index of its last node


def _notrace_defaults(model: nn.Module) -> tuple[list[type], list[Callable[..., Any]]]:
    """timm's own "do not trace into" modules and functions, when the model comes from timm."""
    if not type(model).__module__.startswith("timm"):
        return [], []
    try:
        from timm.models import get_notrace_functions, get_notrace_modules  # timm >= 0.9

        return list(get_notrace_modules()), list(get_notrace_functions())
    except ImportError:  # pragma: no cover - older timm
        try:
            from timm.models._features_fx import _autowrap_functions, _leaf_modules  # type: ignore[attr-defined]

            return list(_leaf_modules), list(_autowrap_functions)
        except ImportError:
            return [], []


def _trace(model: nn.Module, train: bool, leaf_modules: Sequence[type], autowrap_functions: Sequence[Callable[..., Any]]) -> _Traced:
    timm_leaves, timm_functions = _notrace_defaults(model)
    tracer = NodePathTracer(
        leaf_modules=list(leaf_modules) + timm_leaves,
        autowrap_functions=tuple(autowrap_functions) + tuple(timm_functions),
    )
    was_training = model.training
    model.train(train)
    try:
        graph = tracer.trace(model)
    except Exception as e:
        raise ELFError(
            f"{type(model).__name__} cannot be traced by torch.fx ({type(e).__name__}: {e}). Either mark the "
            "untraceable submodules as leaves (split_model(model, at, leaf_modules=[MyBlock])) or functions as "
            "autowrapped (autowrap_functions=[fn]), or split the model yourself and pass (front, rear) to ELFTrainer."
        ) from e
    finally:
        model.train(was_training)
    gm = fx.GraphModule(model, graph, type(model).__name__)
    qualname = {n: tracer.node_to_qualname.get(n, n.name) for n in gm.graph.nodes}
    nodes = [n for n in gm.graph.nodes if n.op not in ("placeholder", "output")]
    last_index: dict[str, int] = {}
    for i, n in enumerate(nodes):
        parts = qualname[n].split(".")
        for k in range(1, len(parts) + 1):
            last_index[".".join(parts[:k])] = i
    return _Traced(gm, nodes, qualname, last_index)


def _crossing(traced: _Traced, cut: int) -> list[fx.Node]:
    """Tensors computed at or before node ``cut`` that are used after it (``get_attr`` constants excluded)."""
    front = set(traced.nodes[: cut + 1])
    placeholders = [n for n in traced.graph_module.graph.nodes if n.op == "placeholder"]
    out = []
    for n in placeholders + traced.nodes[: cut + 1]:
        if n.op == "get_attr":
            continue
        if any(u not in front for u in n.users):
            out.append(n)
    return out


def _all_names(traced: _Traced) -> list[str]:
    return sorted(traced.last_index, key=lambda s: (traced.last_index[s], len(s)))


def _resolve(traced: _Traced, at: str, model: nn.Module) -> int:
    if at not in traced.last_index:
        names = _all_names(traced)
        close = difflib.get_close_matches(at, names, n=5, cutoff=0.4)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ELFError(
            f"{type(model).__name__} has no split point {at!r}.{hint} "
            "elf.list_split_points(model, input_shape) (or `elf split-points MODEL`) lists the valid points."
        )
    cut = traced.last_index[at]
    if cut == len(traced.nodes) - 1:
        raise ELFError(f"split point {at!r} is the model's last operation: the rear would be empty; choose an earlier point")
    crossing = _crossing(traced, cut)
    if len(crossing) != 1 or crossing[0] is not traced.nodes[cut]:
        names = ", ".join(repr(traced.qualname[n]) for n in crossing)
        raise ELFError(
            f"split point {at!r} of {type(model).__name__} is crossed by {len(crossing)} tensors ({names}), "
            "e.g. a residual skip connection; a cut must be crossed by exactly one tensor. Cut at a block boundary "
            "instead: elf.list_split_points(model, input_shape) lists the valid points."
        )
    return cut


def _partition(traced: _Traced, cut: int, model: nn.Module) -> SplitModules:
    index = {n: i for i, n in enumerate(traced.nodes)}

    def side(n: fx.Node) -> int:
        return 0 if n.op == "placeholder" or index.get(n, -1) <= cut else 1

    parts = _fx_split_module(traced.graph_module, model, side)
    front, rear = parts.submod_0, parts.submod_1
    n_in = sum(1 for n in rear.graph.nodes if n.op == "placeholder")
    if n_in != 1:  # parameters read through get_attr on both sides; keep the check that rear takes one tensor
        raise ELFError(f"split of {type(model).__name__} gave a rear with {n_in} inputs; pass (front, rear) yourself")
    return SplitModules(front, rear)


def _same_graph(a: fx.GraphModule, b: fx.GraphModule) -> bool:
    return a.code == b.code


def split_model(
    model: nn.Module,
    at: str,
    *,
    leaf_modules: Iterable[type] = (),
    autowrap_functions: Iterable[Callable[..., Any]] = (),
) -> SplitModules:
    """Split ``model`` after point ``at`` into ``(front, rear)`` with ``rear(front(x)) == model(x)``.

    Both halves share parameters (and buffers) with ``model``, so training them trains ``model``; they follow
    ``model``'s train/eval graphs. ``at="forward_features"`` uses the model's ``forward_features``/``forward_head``
    methods instead of tracing.

    Args:
        model: any ``nn.Module`` that torch.fx can trace.
        at: module path ("layer4.0", "features.17") or node name ("layer4.0.relu_1"), as torchvision's
            ``get_graph_node_names`` names them.
        leaf_modules: module classes not to trace into (for blocks with data-dependent control flow).
        autowrap_functions: functions to keep as single graph nodes.

    Raises:
        ELFError: unknown point (with close matches), a point crossed by more than one tensor (naming them),
            or a model that cannot be traced.
    """
    if at == FORWARD_FEATURES:
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise ELFError(f"{type(model).__name__} has no forward_features/forward_head; name a traced split point instead")
        return SplitModules(_MethodModule(model, "forward_features"), _MethodModule(model, "forward_head"))
    leaves, wraps = list(leaf_modules), list(autowrap_functions)
    traced_train = _trace(model, True, leaves, wraps)
    traced_eval = _trace(model, False, leaves, wraps)
    train_split = _partition(traced_train, _resolve(traced_train, at, model), model)
    if _same_graph(traced_train.graph_module, traced_eval.graph_module):
        return train_split
    eval_split = _partition(traced_eval, _resolve(traced_eval, at, model), model)
    return SplitModules(
        _ModeDispatch(train_split.front, eval_split.front).train(model.training),
        _ModeDispatch(train_split.rear, eval_split.rear).train(model.training),
    )


def list_split_points(
    model: nn.Module,
    input_shape: Sequence[int] = (3, 32, 32),
    *,
    leaf_modules: Iterable[type] = (),
    autowrap_functions: Iterable[Callable[..., Any]] = (),
) -> list[SplitPoint]:
    """Every valid cut of ``model`` (exactly one tensor crosses it), in forward order, with its output shape.

    Args:
        model: the model (not modified; it is run once in eval mode on a zero batch of two to record shapes).
        input_shape: ``(C, H, W)`` of one input (a leading batch dimension is ignored).
    """
    shape = tuple(input_shape)[-3:] if len(input_shape) >= 3 else tuple(input_shape)
    traced = _trace(model, False, list(leaf_modules), list(autowrap_functions))
    was_training = model.training
    model.eval()
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        with torch.no_grad():
            ShapeProp(traced.graph_module).propagate(torch.zeros((2, *shape), device=device, dtype=dtype))
    except Exception as e:
        raise ELFError(f"running {type(model).__name__} on an input of shape {shape} failed ({e}); check input_shape") from e
    finally:
        model.train(was_training)
    aliases: dict[int, list[str]] = {}
    for name, idx in traced.last_index.items():
        aliases.setdefault(idx, []).append(name)
    points = []
    for i, node in enumerate(traced.nodes[:-1]):
        if i not in aliases:
            continue
        crossing = _crossing(traced, i)
        if len(crossing) != 1 or crossing[0] is not node:
            continue
        meta = node.meta.get("tensor_meta")
        out_shape = tuple(meta.shape[1:]) if meta is not None and hasattr(meta, "shape") else None
        names = sorted(aliases[i], key=lambda s: (s.count("."), len(s)))
        points.append(SplitPoint(names[0], out_shape, tuple(names[1:])))
    return points
