"""ELF's loss terms: feature distances D(front(x), F(x)) and the classification loss for hard or soft labels.

The default distance ``"ce"`` is the official ELF code's ``nn.CrossEntropyLoss()(front_output, teacher_features)``:
the raw teacher features are used *as they are* as probability targets over the channel dimension (dim 1), and the
loss is averaged over the batch and every spatial position. Its values are large (order 1e3 for random features).
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from .errors import ELFError

__all__ = ["FeatureDistance", "DISTANCES", "feature_distance", "soft_target_ce", "mse", "mae", "cosine", "cosine_batch", "prepare_targets", "check_test_labels", "infer_label_kind", "is_distribution"]

FeatureDistance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


def soft_target_ce(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_{n,h,w} -sum_c target[n,c,h,w] * log_softmax(pred)[n,c,h,w]``; pred, target ``(N, C, ...)``."""
    return F.cross_entropy(pred, target)


def mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean squared error over every element."""
    return F.mse_loss(pred, target)


def mae(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Mean absolute error over every element."""
    return F.l1_loss(pred, target)


def cosine(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """``mean_n (1 - cos(pred[n], target[n]))`` with each sample's feature flattened to one vector."""
    return (1.0 - F.cosine_similarity(pred.flatten(1), target.flatten(1), dim=1)).mean()


def cosine_batch(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """The official ELF code's ``COS``: ``1 - <P, T> / (|P| |T| + 1e-6)``, with the whole batch of ``pred`` and of
    ``target`` ``(N, ...)`` each flattened into *one* vector (so images with large features weigh more than in
    :func:`cosine`, which averages one cosine per image)."""
    p, t = pred.flatten(), target.flatten()
    return 1.0 - (p * t).sum() / (p.norm() * t.norm() + 1e-6)


DISTANCES: dict[str, FeatureDistance] = {"ce": soft_target_ce, "mse": mse, "mae": mae, "cos": cosine,
                                         "cos-batch": cosine_batch}


def feature_distance(distance: str | FeatureDistance) -> FeatureDistance:
    """Resolve ``"ce" | "mse" | "mae" | "cos" | "cos-batch"`` or pass a callable ``(pred, target) -> scalar`` through."""
    if callable(distance):
        return distance
    try:
        return DISTANCES[distance]
    except KeyError:
        raise ELFError(f"unknown feature distance {distance!r}; choose one of {sorted(DISTANCES)} or pass a callable") from None


def is_distribution(labels: torch.Tensor, atol: float = 1e-2) -> bool:
    """True when every row of ``labels`` ``(N, K)`` is non-negative and sums to 1 (within ``atol``, summed in float64).

    The tolerance admits probabilities that passed through bfloat16 (each value rounded to 8 bits: a row of 100
    sums to 1 only within ~4e-3); non-negative logits whose rows all sum to within 1 % of 1 do not occur in practice."""
    lab = labels.detach().double()
    return bool((lab >= 0).all()) and bool(torch.allclose(lab.sum(1), torch.ones_like(lab[:, 0]), rtol=0.0, atol=atol))


def infer_label_kind(labels: torch.Tensor) -> str:
    """``"index"`` for integer ``(N,)`` labels; for float ``(N, K)``: ``"prob"`` if every row is a distribution,
    else ``"logits"``."""
    if labels.dim() == 1:
        if labels.is_floating_point():
            raise ELFError(f"labels of shape {tuple(labels.shape)} must be integer class indices (got {labels.dtype})")
        return "index"
    if labels.dim() == 2 and labels.is_floating_point():
        return "prob" if is_distribution(labels) else "logits"
    raise ELFError(
        f"labels must be class indices (N,) or soft labels (N, K) of floats; got shape {tuple(labels.shape)}, dtype {labels.dtype}"
    )


def prepare_targets(labels: torch.Tensor, kind: str = "auto", num_classes: int | None = None) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Turn labels into cross-entropy targets.

    Returns ``(targets, hard, num_classes)``: ``targets`` is int64 ``(N,)`` for hard labels or float probabilities
    ``(N, K)`` for soft labels (logits are softmaxed once here); ``hard`` is int64 ``(N,)`` (argmax for soft labels).
    """
    kind = infer_label_kind(labels) if kind == "auto" else kind
    labels = labels.detach()
    if kind == "index":
        if labels.dim() != 1 or labels.is_floating_point():
            raise ELFError(f"label_kind='index' needs integer labels of shape (N,), got {tuple(labels.shape)} {labels.dtype}")
        labels = labels.long()
        k = int(labels.max()) + 1 if num_classes is None and labels.numel() else int(num_classes or 0)
        if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= k):
            raise ELFError(f"labels must lie in [0, {k}) for {k} classes; found values in [{int(labels.min())}, {int(labels.max())}]")
        return labels, labels, k
    if kind not in ("prob", "logits"):
        raise ELFError(f"unknown label_kind {kind!r}; use 'auto', 'index', 'prob' or 'logits'")
    if labels.dim() != 2 or not labels.is_floating_point():
        raise ELFError(f"label_kind={kind!r} needs float labels of shape (N, K), got {tuple(labels.shape)} {labels.dtype}")
    if num_classes is not None and labels.shape[1] != num_classes:
        raise ELFError(f"soft labels have {labels.shape[1]} columns but num_classes={num_classes}")
    if not torch.isfinite(labels).all():
        raise ELFError("soft labels contain NaN or inf")
    probs = labels.float() if kind == "prob" else labels.float().softmax(dim=1)
    return probs, probs.argmax(dim=1), labels.shape[1]


def check_test_labels(labels: torch.Tensor, num_classes: int) -> None:
    """Test labels must be class indices of the model's ``num_classes`` classes: labels outside them would score
    0 % silently. Raises :class:`ELFError` naming the range found."""
    if labels.is_floating_point() or labels.dtype == torch.bool:
        raise ELFError(f"test labels must be integer class indices, got {labels.dtype}")
    if labels.numel() and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ELFError(f"test labels lie in [{int(labels.min())}, {int(labels.max())}] but the synthetic set has "
                       f"{num_classes} classes (0..{num_classes - 1}); the test data must use the set's classes")
