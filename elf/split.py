"""Cut a model into ``front`` and ``rear`` so that ``rear(front(x)) == model(x)``.

Points are named as in torchvision's ``models.feature_extraction``: a module path such as ``"layer4.0"`` means
"after the last operation inside that module", and a node name such as ``"layer4.0.add"`` means after that node.
The model is traced with torchvision's ``NodePathTracer`` (torch.fx) in train and in eval mode and partitioned with
copying the graph's nodes before and after the cut into two ``GraphModule``s; front and rear share parameters
with the original model.

A cut is valid when exactly one tensor crosses it. Cutting inside a residual block is crossed by the skip tensor as
well, and is refused. Models with ``forward_features``/``forward_head`` (timm, our built-ins) can also be cut at
``"forward_features"`` without tracing; models that cannot be traced are passed as a ``(front, rear)`` pair instead.
"""

from __future__ import annotations

import contextlib
import difflib
import inspect
import io
import operator
import sys
import warnings
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp
from torchvision.models.feature_extraction import NodePathTracer

from .errors import ELFError, model_name
from .modes import in_mode

__all__ = ["SplitModules", "SplitOptions", "SplitPoint", "split_model", "list_split_points", "auto_split_point",
           "model_split_options"]

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


_WARNED_PRIVATE: set[Callable[..., Any]] = set()


@dataclass(frozen=True)
class SplitOptions:
    """How to cut a model, one value for every trace (student, teacher, feature bank, shape listing, evaluation).

    Attributes:
        at: the cut ("layer4.0", "auto", ...); None means the model's default (its ``elf_split_point``).
        leaf_modules: module classes torch.fx must not trace into (blocks with data-dependent control flow).
        autowrap_functions: functions kept as single graph nodes.

    A model can declare its own options (``register_model(..., leaf_modules=...)`` stores them on the models it
    builds as ``elf_split_options``); every trace merges those with the options passed in.
    """

    at: str | None = None
    leaf_modules: tuple[type, ...] = ()
    autowrap_functions: tuple[Callable[..., Any], ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "leaf_modules", tuple(self.leaf_modules))
        object.__setattr__(self, "autowrap_functions", tuple(self.autowrap_functions))
        for leaf in self.leaf_modules:
            if not (isinstance(leaf, type) and issubclass(leaf, nn.Module)):
                raise ELFError(f"leaf_modules must be nn.Module classes, got {leaf!r}")
        for fn in self.autowrap_functions:
            if not callable(fn):
                raise ELFError(f"autowrap_functions must be functions, got {fn!r}")

    def merged(self, other: SplitOptions | None) -> SplitOptions:
        """These options plus ``other``'s leaves and functions; ``other.at`` fills ``at`` only when this has none."""
        if other is None:
            return self
        return SplitOptions(
            self.at if self.at is not None else other.at,
            tuple(dict.fromkeys(self.leaf_modules + other.leaf_modules)),
            tuple(dict.fromkeys(self.autowrap_functions + other.autowrap_functions)),
        )


def model_split_options(model: nn.Module) -> SplitOptions:
    """The options ``model`` declares: its ``elf_split_options`` (set by a registration) and its default cut."""
    declared = getattr(model, "elf_split_options", None)
    opts = declared if isinstance(declared, SplitOptions) else SplitOptions()
    point = getattr(model, "elf_split_point", None)
    return SplitOptions(point, opts.leaf_modules, opts.autowrap_functions) if opts.at is None and isinstance(point, str) else opts


def _options(options: SplitOptions | None, leaf_modules: Iterable[type], autowrap_functions: Iterable[Callable[..., Any]]) -> SplitOptions:
    """Keyword arguments and an options value as one :class:`SplitOptions`."""
    return (options or SplitOptions()).merged(SplitOptions(None, tuple(leaf_modules), tuple(autowrap_functions)))


class _MethodModule(nn.Module):
    """Calls one method of a wrapped model (``forward_features`` or ``forward_head``); shares its parameters.
    ``copy_input``: call it on a copy (the head may write into its input in place, e.g. ``ReLU(inplace=True)``,
    and must not change the front output ELF's feature loss still reads)."""

    def __init__(self, model: nn.Module, method: str, copy_input: bool = False) -> None:
        super().__init__()
        self.model = model
        self.method = method
        self.copy_input = copy_input

    def forward(self, x: torch.Tensor) -> Any:
        return getattr(self.model, self.method)(x.clone() if self.copy_input else x)


class _ModeDispatch(nn.Module):
    """Runs the graph traced in train mode while the original model trains and the eval-mode graph otherwise.

    The mode is read from the original model (not registered as a submodule, so parameters are not listed twice);
    ``train()``/``eval()`` on this half switch the original model too, as they do for its shared submodules.
    """

    def __init__(self, train_graph: nn.Module, eval_graph: nn.Module, owner: nn.Module) -> None:
        super().__init__()
        self.train_graph = train_graph
        self.eval_graph = eval_graph
        object.__setattr__(self, "_owner", owner)

    def train(self, mode: bool = True) -> _ModeDispatch:
        super().train(mode)
        self._owner.train(mode)
        return self

    def forward(self, x: Any) -> Any:
        return (self.train_graph if self._owner.training else self.eval_graph)(x)


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


def _optional_args(model: nn.Module) -> dict[str, Any] | None:
    """Forward arguments after the input that have defaults (e.g. ``attn_mask=None``), traced as those constants."""
    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return None
    kinds = (inspect.Parameter.POSITIONAL_OR_KEYWORD, inspect.Parameter.KEYWORD_ONLY)
    extra = {p.name: p.default for p in params[1:] if p.kind in kinds and p.default is not inspect.Parameter.empty}
    return extra or None


def _warn_private_autowrap(options: SplitOptions, model: nn.Module) -> None:
    """Say, once per function, that torch.fx will trace through an autowrap function it can only find under a
    private name (fx wraps a global name that does not start with '_' in the model's module)."""
    for fn in options.autowrap_functions:
        name = getattr(fn, "__name__", "")
        if not name.startswith("_") or fn in _WARNED_PRIVATE:
            continue
        scopes = [vars(sys.modules[m]) for m in {getattr(fn, "__module__", None), type(model).__module__}
                  if m in sys.modules]
        if not any(v is fn and not k.startswith("_") for scope in scopes for k, v in scope.items()):
            _WARNED_PRIVATE.add(fn)
            warnings.warn(f"autowrap function {name!r}: torch.fx wraps a function only where the model calls it by a "
                          "global name that does not start with '_', so it will be traced through; bind it to a public "
                          f"name (e.g. {name.lstrip('_') or 'fn'} = {name}) and call that, or make its module a leaf "
                          "(leaf_modules=)", stacklevel=4)


def _trace(model: nn.Module, train: bool, options: SplitOptions) -> _Traced:
    timm_leaves, timm_functions = _notrace_defaults(model)
    opts = options.merged(model_split_options(model))
    _warn_private_autowrap(opts, model)  # the user's and the model's own; timm's defaults are timm's business
    opts = opts.merged(SplitOptions(None, tuple(timm_leaves), tuple(timm_functions)))
    tracer = NodePathTracer(leaf_modules=list(opts.leaf_modules), autowrap_functions=opts.autowrap_functions)
    try:
        with in_mode(model, train):
            graph = tracer.trace(model, concrete_args=_optional_args(model))
    except Exception as e:
        raise ELFError(
            f"{model_name(model)} cannot be traced by torch.fx ({type(e).__name__}: {e}). Mark the untraceable "
            "submodules as leaves or functions as autowrapped: SplitOptions(leaf_modules=[MyBlock], "
            "autowrap_functions=[fn]) (ELFTrainer(..., leaf_modules=..., autowrap_functions=...), or declare them once "
            "with register_model(..., leaf_modules=...)); or split the model yourself and pass (front, rear) to ELFTrainer."
        ) from e
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


def _shape_value(node: fx.Node) -> bool:
    """Whether ``node`` is a number read from a tensor's shape (``x.shape``, ``x.shape[0]``, ``x.size(0)``)."""
    if node.op == "call_method":
        return node.target in ("size", "dim")
    if node.op != "call_function":
        return False
    if node.target is getattr:
        return len(node.args) > 1 and node.args[1] in ("shape", "ndim")
    return node.target is operator.getitem and isinstance(node.args[0], fx.Node) and _shape_value(node.args[0])


def _all_names(traced: _Traced) -> list[str]:
    return sorted(traced.last_index, key=lambda s: (traced.last_index[s], len(s)))


def _resolve(traced: _Traced, at: str, model: nn.Module) -> int:
    if at not in traced.last_index:
        names = _all_names(traced)
        close = difflib.get_close_matches(at, names, n=5, cutoff=0.4)
        hint = f" Close matches: {', '.join(close)}." if close else ""
        raise ELFError(
            f"{model_name(model)} has no split point {at!r}.{hint} "
            "elf.list_split_points(model, input_shape) (or `elf split-points MODEL`) lists the valid points."
        )
    cut = traced.last_index[at]
    if cut == len(traced.nodes) - 1:
        raise ELFError(f"split point {at!r} is the model's last operation: the rear would be empty; choose an earlier point")
    crossing = _crossing(traced, cut)
    if len(crossing) != 1 or crossing[0] is not traced.nodes[cut]:
        names = ", ".join(repr(traced.qualname[n]) for n in crossing)
        sizes = [traced.qualname[n] for n in crossing if _shape_value(n)]
        if sizes:
            raise ELFError(
                f"split point {at!r} of {model_name(model)} is crossed by {len(crossing)} values ({names}): the "
                f"input's shape is read before the cut ({', '.join(map(repr, sizes))}; e.g. b = x.shape[0] at the "
                "top of forward) and used after it. Read the shape where it is used (x.flatten(1), or "
                "x.reshape(x.shape[0], -1) after the cut) so that one tensor crosses; then the points inside the "
                "model are valid."
            )
        raise ELFError(
            f"split point {at!r} of {model_name(model)} is crossed by {len(crossing)} tensors ({names}), "
            "e.g. a residual skip connection; a cut must be crossed by exactly one tensor. Cut at a block boundary "
            "instead: elf.list_split_points(model, input_shape) lists the valid points."
        )
    return cut


def _modes_disagree(train: _Traced, train_cut: int, eval_: _Traced, eval_cut: int) -> list[str]:
    """The modules both modes call that one mode's cut puts in the front and the other's in the rear: a point name
    (e.g. node ``add``) that names two places, because the forward branches on ``self.training`` before it."""
    def calls(traced: _Traced, stop: int | None = None) -> set[str]:
        return {str(n.target) for n in traced.nodes[:stop] if n.op == "call_module"}

    shared = calls(train) & calls(eval_)
    return sorted((calls(train, train_cut + 1) ^ calls(eval_, eval_cut + 1)) & shared)


def _check_same_place(train: _Traced, train_cut: int, eval_: _Traced, eval_cut: int, at: str, model: nn.Module) -> None:
    moved = _modes_disagree(train, train_cut, eval_, eval_cut)
    if moved:
        raise ELFError(
            f"split point {at!r} of {model_name(model)} is not the same place in train and eval mode (the forward "
            f"branches on self.training before it, so node names shift): module(s) {', '.join(moved[:4])} run before "
            "the cut in one mode and after it in the other. Name the point by a module path instead (e.g. the module "
            "the cut follows); elf.list_split_points(model, input_shape) lists the points valid in both modes."
        )


def _copy_nodes(traced: _Traced, nodes: list[fx.Node], inputs: dict[fx.Node, fx.Node], graph: fx.Graph, env: dict[fx.Node, fx.Node]) -> None:
    """Copy ``nodes`` into ``graph``; ``get_attr`` nodes they read are copied on demand (parameters stay shared)."""
    env.update(inputs)

    def lookup(a: fx.Node) -> fx.Node:
        if a not in env:
            if a.op != "get_attr":
                raise ELFError(f"internal: node {a.name} is used across the cut")  # excluded by _resolve
            env[a] = graph.node_copy(a, lookup)
        return env[a]

    for n in nodes:
        if n.op == "get_attr" and not n.users:
            continue
        env[n] = graph.node_copy(n, lookup)


def _is_inplace(node: fx.Node, gm: fx.GraphModule) -> bool:
    """Whether ``node`` may write into its input: in-place modules, leaf modules that are not torch's own (their
    code is not traced, so it may do anything), ``inplace=True`` calls, ``x.op_()`` methods."""
    if node.op == "call_module":
        module = gm.get_submodule(str(node.target))
        return bool(getattr(module, "inplace", False)) or not type(module).__module__.startswith("torch.")
    if node.kwargs.get("inplace"):
        return True
    if node.op == "call_method":
        return str(node.target).endswith("_") and not str(node.target).endswith("__")
    if node.op == "call_function":
        name = getattr(node.target, "__name__", "")
        return name.startswith("i") and name[1:] in ("add", "sub", "mul", "truediv", "and", "or") or name.endswith("_")
    return False


def _partition(traced: _Traced, cut: int, model: nn.Module) -> SplitModules:
    """Two GraphModules over ``model``: nodes ``[0, cut]`` (returning the cut tensor) and the rest."""
    gm = traced.graph_module
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    output = next(n for n in gm.graph.nodes if n.op == "output")
    cut_node = traced.nodes[cut]
    name = type(model).__name__

    front_graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    front_inputs = {p: front_graph.node_copy(p) for p in placeholders}
    _copy_nodes(traced, [n for n in traced.nodes[: cut + 1] if n.op != "get_attr"], front_inputs, front_graph, env)
    front_graph.output(env[cut_node])

    rear_graph = fx.Graph()
    env = {}
    rear_x = rear_graph.placeholder("x")
    if any(_is_inplace(n, gm) for n in traced.nodes[cut + 1 :]):
        # the rear writes in place somewhere (e.g. ReLU(inplace=True) right after the cut, or Dropout(inplace=True)
        # on a flattened view of it); it must not change the front output the caller still holds (ELF's feature
        # loss reads it), so it works on a copy (one copy of the cut tensor per step)
        rear_x = rear_graph.call_method("clone", (rear_x,))
    rear_input = {cut_node: rear_x}
    _copy_nodes(traced, [n for n in traced.nodes[cut + 1 :] if n.op != "get_attr"], rear_input, rear_graph, env)
    rear_graph.output(fx.map_arg(output.args[0], lambda a: env[a]))
    front = fx.GraphModule(gm, front_graph, f"{name}Front")
    rear = fx.GraphModule(gm, rear_graph, f"{name}Rear")
    return SplitModules(front, rear)


def _same_graph(a: fx.GraphModule, b: fx.GraphModule) -> bool:
    return a.code == b.code


def _warn_top_level_hooks(model: nn.Module) -> None:
    """Hooks registered on ``model`` itself run in ``model(x)`` but not in a front and rear (hooks on submodules do)."""
    kinds = [k for k, d in (("forward pre-hooks", model._forward_pre_hooks), ("forward hooks", model._forward_hooks)) if d]
    if kinds:
        warnings.warn(f"{model_name(model)} has {' and '.join(kinds)} on the model itself: the front and rear do not "
                      "run them (training through the cut would differ from model(x)); register them on a submodule, "
                      "or put what they do into forward", stacklevel=3)


def split_model(
    model: nn.Module,
    at: str,
    *,
    leaf_modules: Iterable[type] = (),
    autowrap_functions: Iterable[Callable[..., Any]] = (),
    options: SplitOptions | None = None,
) -> SplitModules:
    """Split ``model`` after point ``at`` into ``(front, rear)`` with ``rear(front(x)) == model(x)``.

    Both halves share parameters (and buffers) with ``model``, so training them trains ``model``; they follow
    ``model``'s train/eval graphs. Split after ``.to()`` / ``.double()``: those replace buffers, and one that
    ``forward`` reads itself (not through a submodule) stays as it was at the split in the halves. ``at="forward_features"`` uses the model's ``forward_features``/``forward_head``
    methods instead of tracing.

    Args:
        model: any ``nn.Module`` that torch.fx can trace.
        at: module path ("layer4.0", "features.17") or node name ("layer4.0.relu_1"), as torchvision's
            ``get_graph_node_names`` names them.
        leaf_modules: module classes not to trace into (for blocks with data-dependent control flow).
        autowrap_functions: functions to keep as single graph nodes.
        options: a :class:`SplitOptions` (its leaves and functions are added to the two above; its ``at`` is not
            used: ``at`` is the cut). The model's own declared options always apply.

    Raises:
        ELFError: unknown point (with close matches), a point crossed by more than one tensor (naming them),
            or a model that cannot be traced.
    """
    _warn_top_level_hooks(model)
    if at == FORWARD_FEATURES:
        if not (hasattr(model, "forward_features") and hasattr(model, "forward_head")):
            raise ELFError(f"{model_name(model)} has no forward_features/forward_head; name a traced split point instead")
        return SplitModules(_MethodModule(model, "forward_features"), _MethodModule(model, "forward_head", copy_input=True))
    opts = _options(options, leaf_modules, autowrap_functions)
    traced_train = _trace(model, True, opts)
    traced_eval = _trace(model, False, opts)
    train_cut = _resolve(traced_train, at, model)
    train_split = _partition(traced_train, train_cut, model)
    if _same_graph(traced_train.graph_module, traced_eval.graph_module):
        return train_split
    eval_cut = _resolve(traced_eval, at, model)
    _check_same_place(traced_train, train_cut, traced_eval, eval_cut, at, model)
    eval_split = _partition(traced_eval, eval_cut, model)
    return SplitModules(
        _ModeDispatch(train_split.front, eval_split.front, model),
        _ModeDispatch(train_split.rear, eval_split.rear, model),
    )


def list_split_points(
    model: nn.Module,
    input_shape: Sequence[int] = (3, 32, 32),
    *,
    leaf_modules: Iterable[type] = (),
    autowrap_functions: Iterable[Callable[..., Any]] = (),
    options: SplitOptions | None = None,
    shape: Sequence[int] | None = None,
) -> list[SplitPoint]:
    """Every valid cut of ``model`` (exactly one tensor crosses it, in eval and train mode), in forward order, with
    its output shape.

    Args:
        model: the model (not modified; it is run once in eval mode on a zero batch of two to record shapes).
        input_shape: ``(C, H, W)`` of one input (a leading batch dimension is ignored).
        leaf_modules, autowrap_functions, options: how to trace, as for :func:`split_model`.
        shape: keep only the points whose per-image output shape is this (e.g. a feature bank's ``(512, 4, 4)``).
    """
    in_shape = tuple(input_shape)[-3:] if len(input_shape) >= 3 else tuple(input_shape)
    opts = _options(options, leaf_modules, autowrap_functions)
    traced = _trace(model, False, opts)
    traced_train = _trace(model, True, opts)
    same = _same_graph(traced.graph_module, traced_train.graph_module)
    try:
        param = next(model.parameters(), None)
        device = param.device if param is not None else torch.device("cpu")
        dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
        # ShapeProp prints a traceback of its own before re-raising: keep it out of the user's terminal
        with torch.no_grad(), contextlib.redirect_stderr(io.StringIO()), in_mode(model, False):
            ShapeProp(traced.graph_module).propagate(torch.zeros((2, *in_shape), device=device, dtype=dtype))
    except Exception as e:
        root: BaseException = e
        while root.__cause__ is not None:  # ShapeProp wraps the model's own error: name that one
            root = root.__cause__
        raise ELFError(f"running {model_name(model)} on an input of shape {in_shape} failed "
                       f"({type(root).__name__}: {str(root).splitlines()[0] if str(root) else ''}); check input_shape "
                       "(channels, height, width of one image)") from e
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
        if meta is None or not hasattr(meta, "shape"):
            continue  # a tuple (e.g. chunk) or a non-tensor crosses here: a front must return one tensor
        names = sorted(aliases[i], key=lambda s: (s.count("."), len(s)))
        if not same:  # the train-mode graph differs (e.g. an auxiliary branch): the cut must be valid there too
            try:
                _check_same_place(traced_train, _resolve(traced_train, names[0], model), traced, i, names[0], model)
            except ELFError:
                continue
        points.append(SplitPoint(names[0], tuple(meta.shape[1:]), tuple(names[1:])))
    if shape is not None:
        want = tuple(int(s) for s in shape)
        points = [p for p in points if p.shape == want]
    return points


def auto_split_point(
    model: nn.Module,
    input_shape: Sequence[int],
    feature_shape: Sequence[int],
    *,
    adapter: bool = False,
    leaf_modules: Iterable[type] = (),
    autowrap_functions: Iterable[Callable[..., Any]] = (),
    options: SplitOptions | None = None,
) -> tuple[str, str]:
    """The cut of ``model`` for a teacher feature of ``feature_shape`` ``(C, H, W)``: ``(point, reason)``.

    The deepest valid point whose output shape equals ``feature_shape``; failing that, with ``adapter``, the deepest
    point whose spatial grid (map, channels-last map or patch tokens) is the teacher's ``H x W``, and failing that
    the deepest map or token point (adapters resize its grid). The model's output itself is never chosen. Raises :class:`ELFError` listing the shapes when nothing fits.
    """
    from .adapters import infer_layout

    want = tuple(int(s) for s in feature_shape)
    opts = _options(options, leaf_modules, autowrap_functions)
    points = [p for p in list_split_points(model, input_shape, options=opts) if p.shape is not None]
    exact = [p for p in points if p.shape == want]
    if exact:
        return exact[-1].name, f"deepest point with the teacher's feature shape {want}"
    if adapter and len(want) == 3:
        adaptable, grid = [], []
        for p in points:
            try:
                layout = infer_layout(p.shape, image_size=(int(input_shape[-2]), int(input_shape[-1])))
            except ELFError:
                continue
            adaptable.append(p)
            if layout.grid == want[1:]:
                grid.append(p)
        if grid:
            return grid[-1].name, f"deepest point on the teacher's {want[1]}x{want[2]} grid ({grid[-1].shape}; adapters bridge the rest)"
        if adaptable:
            return adaptable[-1].name, (f"no point is on the teacher's {want[1]}x{want[2]} grid: deepest map or token "
                                        f"point ({adaptable[-1].shape}; adapters resize it)")
    shapes = ", ".join(f"{p.name} {p.shape}" for p in points[-8:])
    hint = "" if adapter else " Pass adapter='auto' (--adapter auto) to bridge other shapes with learned adapters."
    raise ELFError(f"no split point of {model_name(model)} gives the teacher's feature shape {want}"
                   f"{' or its grid' if adapter else ''} (deepest points: {shapes}).{hint}")
