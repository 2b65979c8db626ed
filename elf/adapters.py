"""Feature adapters: learned maps between a student's features at its cut and a teacher's feature map.

ELF needs the student's front output to have the teacher's feature shape ``(C_t, H_t, W_t)``. When it does not (a
width-128 ConvNet teacher for ResNet-18, a ViT's tokens, a channels-last stage), two small learned modules bridge
the gap during training only:

* ``to_teacher`` (P): student feature -> teacher map ``(B, C_t, H_t, W_t)``; the front term is ``D(P(front(x)), F(x))``.
* ``to_student`` (L): teacher map -> the student's layout and shape; the rear term is ``CE(rear(L(F(x))), y)``.

Channels are mapped by a 1x1 convolution, spatial size by average pooling (to a smaller map) or bilinear
resizing (to a larger one). Student features may be maps ``(B, C, H, W)``, channels-last maps ``(B, H, W, C)`` or
tokens ``(B, N, D)`` whose last ``h*w`` tokens are patches on an ``h x w`` grid (the first ``N - h*w`` are prefix
tokens such as a class token). Adapters are not part of the evaluated model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .errors import ELFError
from .modes import in_mode
from .protocol import ADAPTER_MODES

__all__ = ["FeatureLayout", "infer_layout", "FeatureAdapter", "ELFAdapters", "build_adapters", "token_grid", "prefix_mode_for",
           "PREFIX_MODES"]

#: How ``to_student`` makes a token feature's prefix (class) tokens; see :class:`FeatureAdapter`.
PREFIX_MODES = ("learned", "pooled")


@dataclass(frozen=True)
class FeatureLayout:
    """How one sample's feature is laid out.

    Attributes:
        kind: ``"map"`` ``(C, H, W)``, ``"channels_last"`` ``(H, W, C)`` or ``"tokens"`` ``(N, D)``.
        channels: C (or the token width D).
        grid: spatial size ``(H, W)`` of the map or of the patch-token grid.
        prefix: tokens before the patch tokens (class / distillation tokens); 0 for maps.
    """

    kind: str
    channels: int
    grid: tuple[int, int]
    prefix: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        """The per-sample shape this layout describes."""
        h, w = self.grid
        if self.kind == "map":
            return (self.channels, h, w)
        if self.kind == "channels_last":
            return (h, w, self.channels)
        return (self.prefix + h * w, self.channels)

    def to_map(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, *shape)`` -> ``(B, C, H, W)`` (prefix tokens dropped)."""
        h, w = self.grid
        if self.kind == "map":
            return x
        if self.kind == "channels_last":
            return rearrange(x, "b h w c -> b c h w")
        return rearrange(x[:, self.prefix :], "b (h w) d -> b d h w", h=h, w=w)

    def from_map(self, m: torch.Tensor, prefix_tokens: torch.Tensor | None = None) -> torch.Tensor:
        """``(B, C, H, W)`` -> ``(B, *shape)``; ``prefix_tokens`` ``(1 or B, prefix, D)`` are prepended to tokens."""
        if self.kind == "map":
            return m
        if self.kind == "channels_last":
            return rearrange(m, "b c h w -> b h w c")
        tokens = rearrange(m, "b d h w -> b (h w) d")
        if self.prefix:
            assert prefix_tokens is not None
            tokens = torch.cat([prefix_tokens.expand(m.shape[0], -1, -1), tokens], dim=1)
        return tokens


def _aspect_gap(h: int, w: int, image_size: tuple[int, int]) -> float:
    """How far a grid's ``h / w`` is from the image's height / width (0 when equal; log scale)."""
    return abs(math.log(h / w) - math.log(image_size[0] / image_size[1]))


def infer_layout(shape: tuple[int, ...] | torch.Size, kind: str = "auto", *, image_size: tuple[int, int] | None = None,
                 grid: tuple[int, int] | None = None) -> FeatureLayout:
    """The layout of a per-sample feature ``shape``.

    ``kind="auto"``: 3-D shapes are maps ``(C, H, W)`` or channels-last maps ``(H, W, C)``: with ``image_size``
    (the input's ``(H, W)``) the reading whose grid has the image's aspect ratio (a map when both have it), without
    it a map unless the first two sizes are equal and the third differs. 2-D shapes are tokens ``(N, D)``: the patch
    grid is ``grid`` when given (a timm ViT's ``patch_embed.grid_size``; the tokens before it are prefix tokens:
    class, register), else the largest grid ``h x w <= N`` with the image's aspect ratio (square without
    ``image_size``), the rest prefix tokens.
    """
    shape = tuple(int(s) for s in shape)
    if kind == "auto":
        if len(shape) == 3 and image_size is not None:
            as_map, as_last = _aspect_gap(shape[1], shape[2], image_size), _aspect_gap(shape[0], shape[1], image_size)
            kind = "channels_last" if as_last < as_map else "map"
        elif len(shape) == 3:
            kind = "channels_last" if shape[0] == shape[1] and shape[1] != shape[2] else "map"
        elif len(shape) == 2:
            kind = "tokens"
        else:
            raise ELFError(f"cannot adapt a feature of shape {shape}: adapters take maps (C, H, W), channels-last "
                           "maps (H, W, C) or tokens (N, D); cut the model where its feature has one of these forms")
    if kind == "map" and len(shape) == 3:
        return FeatureLayout("map", shape[0], (shape[1], shape[2]))
    if kind == "channels_last" and len(shape) == 3:
        return FeatureLayout("channels_last", shape[2], (shape[0], shape[1]))
    if kind == "tokens" and len(shape) == 2:
        n, d = shape
        if grid is not None:
            h, w = (int(g) for g in grid)
            if not 0 < h * w <= n:
                raise ELFError(f"a token feature {shape} cannot hold a {h}x{w} patch grid")
            return FeatureLayout("tokens", d, (h, w), prefix=n - h * w)
        if image_size is None:
            h = w = math.isqrt(n)
        else:  # the largest grid with the image's aspect ratio
            ratio = image_size[1] / image_size[0]
            fits = [(a, max(1, round(a * ratio))) for a in range(1, n + 1)]
            h, w = max((g for g in fits if g[0] * g[1] <= n), key=lambda g: g[0] * g[1], default=(0, 0))
        if h * w == 0 or h * w > n:
            raise ELFError(f"a token feature {shape} has no patch tokens to arrange on a grid")
        return FeatureLayout("tokens", d, (h, w), prefix=n - h * w)
    raise ELFError(f"feature shape {shape} does not fit layout {kind!r} (map: (C, H, W); channels_last: (H, W, C); tokens: (N, D))")


def _resize(m: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Resize a map ``(B, C, H, W)`` to ``size``: average pooling when shrinking evenly, else bilinear."""
    h, w = m.shape[-2:]
    if (h, w) == tuple(size):
        return m
    if h % size[0] == 0 and w % size[1] == 0:
        return F.adaptive_avg_pool2d(m, size)
    return F.interpolate(m, size=size, mode="bilinear", align_corners=False)


class FeatureAdapter(nn.Module):
    """Map features of layout ``source`` to layout ``target``: to a map, resize, 1x1 convolution, to ``target``.

    The convolution is left out when the channel counts are equal (the adapter is then parameter-free unless the
    target has prefix tokens), unless ``learned=True``. A target's prefix tokens (a ViT's class token) are made in
    one of two ways (``prefix``, see :data:`PREFIX_MODES`):

    - ``"learned"``: a learned constant per prefix token (zero at the start), as the model's own class token is.
      Right when attention blocks follow the cut: they fill the class token from the patch tokens.
    - ``"pooled"``: the average of the mapped patch tokens plus a learned offset (zero at the start). Needed when the
      rear reads only the class token (timm's ``global_pool="token"`` cut at ``norm``): a constant would give every
      sample the same rear logits, so the rear term would train nothing.

    :func:`prefix_mode_for` picks between them by probing the rear.
    """

    def __init__(self, source: FeatureLayout, target: FeatureLayout, learned: bool = False,
                 prefix: str = "pooled") -> None:
        super().__init__()
        if prefix not in PREFIX_MODES:
            raise ELFError(f"unknown prefix-token mode {prefix!r}; use one of {PREFIX_MODES}")
        self.source, self.target, self.prefix_mode = source, target, prefix
        self.proj = (nn.Conv2d(source.channels, target.channels, 1) if learned or source.channels != target.channels
                     else nn.Identity())
        self.prefix = nn.Parameter(torch.zeros(1, target.prefix, target.channels)) if target.prefix else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``(B, *source.shape)`` -> ``(B, *target.shape)``."""
        m = self.proj(_resize(self.source.to_map(x), self.target.grid))
        prefix = self.prefix
        if prefix is not None and self.prefix_mode == "pooled":
            prefix = prefix + m.mean((2, 3)).unsqueeze(1)  # (B, prefix, D)
        return self.target.from_map(m, prefix)

    def extra_repr(self) -> str:
        tail = f", prefix tokens {self.prefix_mode}" if self.target.prefix else ""
        return f"{self.source.shape} -> {self.target.shape}{tail}"


@torch.no_grad()
def prefix_mode_for(rear: nn.Module, layout: FeatureLayout) -> str:
    """How the rear term's adapter should make the prefix tokens of a token feature ``layout``.

    Probes ``rear`` (in eval mode, its mode restored after) on two random inputs ``(2, *layout.shape)`` that share
    their prefix tokens and differ in the patch tokens: if the outputs differ, the rear reads the patch tokens
    (attention blocks, or an average-pooling head) and the prefix tokens are ``"learned"``; if not, the rear reads
    only the prefix tokens (a class-token head) and they are ``"pooled"`` from the patch tokens. Weights that are all
    zero at initialization (a zero-initialized head, e.g. timm's ``weight_init="jax"``) would make every output
    equal: they are filled with small random values for the probe and put back after. The draws use a private
    generator, so the global RNG (model seeds) is untouched. Maps have no prefix tokens: ``"learned"``.
    """
    if layout.kind != "tokens" or layout.prefix == 0:
        return "learned"
    param = next(rear.parameters(), None)
    device = param.device if param is not None else torch.device("cpu")
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(2, *layout.shape, generator=gen)
    b = a.clone()
    b[:, layout.prefix:] = torch.randn(b[:, layout.prefix:].shape, generator=gen)
    zero = [p for p in rear.parameters() if p.is_floating_point() and p.numel() > 1 and not bool(p.any())]
    saved = [p.clone() for p in zero]
    try:
        for p in zero:
            p.copy_(0.02 * torch.randn(p.shape, generator=gen))
        with in_mode(rear, False):
            out_a, out_b = (rear(t.to(device=device, dtype=dtype)) for t in (a, b))
    finally:
        for p, value in zip(zero, saved):
            p.copy_(value)
    return "learned" if not torch.allclose(out_a, out_b, rtol=1e-4, atol=1e-5) else "pooled"


class ELFAdapters(nn.Module):
    """The pair used by one ELF run: ``to_teacher`` for the front term and ``to_student`` for the rear term."""

    def __init__(self, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...],
                 student_layout: str | FeatureLayout = "auto", learned: bool = False, prefix: str = "pooled", *,
                 image_size: tuple[int, int] | None = None, grid: tuple[int, int] | None = None) -> None:
        """``student_layout``: a :class:`FeatureLayout`, or a ``kind`` for :func:`infer_layout` (with ``image_size``
        and ``grid``)."""
        super().__init__()
        if len(teacher_shape) != 3:
            raise ELFError(f"adapters need a teacher feature map (C, H, W); the bank holds {tuple(teacher_shape)}")
        s = (student_layout if isinstance(student_layout, FeatureLayout)
             else infer_layout(student_shape, student_layout, image_size=image_size, grid=grid))
        t = infer_layout(teacher_shape, "map")
        self.student_shape, self.teacher_shape = tuple(student_shape), tuple(teacher_shape)
        self.to_teacher = FeatureAdapter(s, t, learned)
        self.to_student = FeatureAdapter(t, s, learned, prefix=prefix)

    def extra_repr(self) -> str:
        return f"student {self.student_shape} <-> teacher {self.teacher_shape}"


def token_grid(model: nn.Module, student_shape: tuple[int, ...]) -> tuple[int, int] | None:
    """A timm ViT's patch grid (``patch_embed.grid_size``) when ``student_shape`` is its tokens ``(prefix + h*w, D)``
    (``num_prefix_tokens``: class and register tokens), else None (the grid is then inferred from the shape)."""
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    prefix = getattr(model, "num_prefix_tokens", None)
    if grid is None or prefix is None or len(student_shape) != 2:
        return None
    h, w = (int(g) for g in grid)
    return (h, w) if int(student_shape[0]) == int(prefix) + h * w else None


def build_adapters(mode: str | None, student_shape: tuple[int, ...], teacher_shape: tuple[int, ...],
                   rear: nn.Module | None = None, *, image_size: tuple[int, int] | None = None,
                   grid: tuple[int, int] | None = None) -> ELFAdapters | None:
    """Adapters for ``mode``: ``None``: none; ``"auto"``: only when the shapes differ; ``"always"``: learned 1x1
    projections both ways even when the shapes are equal (the student is then not forced to copy the teacher's map
    channel for channel). With token features and a ``rear``, its prefix tokens follow :func:`prefix_mode_for`
    (without a rear: ``"pooled"``). ``image_size`` (the input's ``(H, W)``) and ``grid`` (see :func:`token_grid`)
    settle the student's layout (:func:`infer_layout`)."""
    if mode not in ADAPTER_MODES:
        raise ELFError(f"unknown adapter mode {mode!r}; use one of {ADAPTER_MODES}")
    if mode is None or (mode == "auto" and tuple(student_shape) == tuple(teacher_shape)):
        return None
    layout = infer_layout(tuple(student_shape), image_size=image_size, grid=grid)
    prefix = prefix_mode_for(rear, layout) if rear is not None and layout.prefix else "pooled"
    return ELFAdapters(tuple(student_shape), tuple(teacher_shape), layout, learned=mode == "always", prefix=prefix)
