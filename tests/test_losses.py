"""Feature distances and label handling, checked against hand computations written out with loops."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from elf import DISTANCES, ELFError, feature_distance
from elf.losses import infer_label_kind, prepare_targets

pytestmark = pytest.mark.usefixtures("torch_single_thread")


def _pair(shape=(2, 3, 2, 2), seed=0, nonneg_target=True):
    g = torch.Generator().manual_seed(seed)
    pred = torch.randn(*shape, generator=g, dtype=torch.float64)
    target = torch.randn(*shape, generator=g, dtype=torch.float64)
    if nonneg_target:
        target = target.abs() * 3  # raw teacher features after ReLU: non-negative, unnormalized
    return pred, target


def _ce_by_hand(pred, target):
    """mean over (n, h, w) of -sum_c target[n,c,h,w] * log(softmax_c(pred[n,:,h,w]))."""
    n, c, h, w = pred.shape
    total = 0.0
    for i in range(n):
        for y in range(h):
            for x in range(w):
                logits = [float(pred[i, k, y, x]) for k in range(c)]
                m = max(logits)
                log_z = m + math.log(sum(math.exp(v - m) for v in logits))
                total += -sum(float(target[i, k, y, x]) * (logits[k] - log_z) for k in range(c))
    return total / (n * h * w)


def _mse_by_hand(pred, target):
    p, t = pred.flatten().tolist(), target.flatten().tolist()
    return sum((a - b) ** 2 for a, b in zip(p, t)) / len(p)


def _mae_by_hand(pred, target):
    p, t = pred.flatten().tolist(), target.flatten().tolist()
    return sum(abs(a - b) for a, b in zip(p, t)) / len(p)


def _cos_by_hand(pred, target):
    total = 0.0
    for i in range(pred.shape[0]):
        a, b = pred[i].flatten().tolist(), target[i].flatten().tolist()
        dot = sum(u * v for u, v in zip(a, b))
        na, nb = math.sqrt(sum(u * u for u in a)), math.sqrt(sum(v * v for v in b))
        total += 1.0 - dot / (na * nb)
    return total / pred.shape[0]


def _cos_batch_by_hand(pred, target):
    """The official ELF code's cos_dis: every sample flattened and joined into one vector, one cosine, +1e-6."""
    a, b = pred.flatten().tolist(), target.flatten().tolist()
    dot = sum(u * v for u, v in zip(a, b))
    return 1.0 - dot / (math.sqrt(sum(u * u for u in a)) * math.sqrt(sum(v * v for v in b)) + 1e-6)


HAND = {"ce": _ce_by_hand, "mse": _mse_by_hand, "mae": _mae_by_hand, "cos": _cos_by_hand, "cos-batch": _cos_batch_by_hand}


def test_distance_names():
    assert set(DISTANCES) == {"ce", "mse", "mae", "cos", "cos-batch"}


@pytest.mark.parametrize("name", ["ce", "mse", "mae", "cos", "cos-batch"])
@pytest.mark.parametrize("seed", [0, 1])
def test_distance_equals_hand_computation(name, seed):
    pred, target = _pair(seed=seed)
    got = feature_distance(name)(pred, target)
    assert got.dim() == 0
    assert got.item() == pytest.approx(HAND[name](pred, target), rel=1e-9, abs=1e-12)


@pytest.mark.parametrize("name", ["ce", "mse", "mae", "cos", "cos-batch"])
def test_distance_is_differentiable_and_zero_only_where_expected(name):
    pred, target = _pair()
    pred.requires_grad_(True)
    feature_distance(name)(pred, target).backward()
    assert pred.grad is not None and pred.grad.abs().sum() > 0
    if name in ("mse", "mae"):
        assert feature_distance(name)(target, target).item() == 0.0
    if name in ("cos", "cos-batch"):
        assert feature_distance(name)(2 * target, target).item() == pytest.approx(0.0, abs=1e-6)


def test_cos_batch_weighs_images_by_their_norm_unlike_cos():
    """The official COS is one cosine over the flattened batch: an image with 100x larger features dominates it,
    while "cos" averages one cosine per image."""
    _, target = _pair(shape=(4, 8, 2, 2), seed=3)
    target[0] *= 100
    pred = target.clone()
    pred[0] = -target[0]  # one image opposite (distance 2) with large features; three aligned (distance 0)
    assert feature_distance("cos")(pred, target).item() == pytest.approx(0.5, abs=1e-9)  # (2 + 0 + 0 + 0) / 4
    assert feature_distance("cos-batch")(pred, target).item() > 1.9  # the large image dominates one cosine


def test_ce_equals_official_cross_entropy_with_raw_targets():
    pred, target = _pair(shape=(3, 5, 4, 4), seed=7)
    pred, target = pred.float(), target.float()
    official = nn.CrossEntropyLoss()(pred, target)
    assert torch.allclose(feature_distance("ce")(pred, target), official, rtol=1e-6)
    # raw, unnormalized targets: not the same as normalizing them first
    normalized = target / target.sum(1, keepdim=True)
    assert not torch.allclose(feature_distance("ce")(pred, target), nn.CrossEntropyLoss()(pred, normalized))


def test_ce_is_large_on_random_feature_sized_tensors():
    g = torch.Generator().manual_seed(0)
    pred = torch.randn(4, 512, 4, 4, generator=g)
    target = torch.relu(torch.randn(4, 512, 4, 4, generator=g))
    assert feature_distance("ce")(pred, target).item() > 500  # order 1e3, as noted for the official loss


def test_ce_on_flat_features():
    pred, target = _pair(shape=(3, 4), seed=2)
    by_hand = sum(
        -sum(float(target[i, k]) * float(torch.log_softmax(pred[i], 0)[k]) for k in range(4)) for i in range(3)
    ) / 3
    assert feature_distance("ce")(pred, target).item() == pytest.approx(by_hand, rel=1e-9)


def test_callable_passes_through():
    def my_distance(a, b):
        return (a - b).abs().max()

    assert feature_distance(my_distance) is my_distance
    pred, target = _pair()
    assert feature_distance(my_distance)(pred, target) == (pred - target).abs().max()


@pytest.mark.parametrize("bad", ["kl", "CE ", "l2", ""])
def test_unknown_distance_raises(bad):
    with pytest.raises(ELFError, match="unknown feature distance"):
        feature_distance(bad)


# ---- labels --------------------------------------------------------------------------------------------------------


def test_index_labels():
    labels = torch.tensor([2, 0, 1, 2], dtype=torch.int32)
    targets, hard, k = prepare_targets(labels)
    assert k == 3
    assert targets.dtype == torch.int64 and hard.dtype == torch.int64
    assert targets.tolist() == [2, 0, 1, 2] and hard.tolist() == [2, 0, 1, 2]
    _, _, k = prepare_targets(labels, num_classes=10)
    assert k == 10
    assert infer_label_kind(labels) == "index"


def test_prob_labels():
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.0, 0.0, 1.0]])
    assert infer_label_kind(probs) == "prob"
    targets, hard, k = prepare_targets(probs)
    assert k == 3
    assert torch.equal(targets, probs)
    assert hard.tolist() == [0, 2]


def test_prob_labels_that_passed_through_bfloat16_stay_probabilities():
    """Regression: rows of bf16 probabilities sum to 1 only within ~4e-3, were read as logits and softmaxed again
    (near-uniform targets for 100 classes)."""
    g = torch.Generator().manual_seed(0)
    for k in (10, 100):
        probs = torch.softmax(3 * torch.randn(20, k, generator=g), 1)
        for labels in (probs.bfloat16(), probs.bfloat16().float()):
            assert infer_label_kind(labels) == "prob"
            targets, _, _ = prepare_targets(labels)
            assert torch.allclose(targets.float().max(1).values, probs.max(1).values, atol=1e-2)


def test_logit_labels_are_softmaxed():
    logits = torch.tensor([[2.0, -1.0, 0.5], [0.0, 3.0, 1.0]], requires_grad=True)  # DATM logits need grad
    assert infer_label_kind(logits) == "logits"
    targets, hard, k = prepare_targets(logits)
    assert k == 3 and hard.tolist() == [0, 1]
    assert not targets.requires_grad
    for i in range(2):
        row = [float(v) for v in logits[i].detach()]
        z = sum(math.exp(v) for v in row)
        for j in range(3):
            assert float(targets[i, j]) == pytest.approx(math.exp(row[j]) / z, rel=1e-6)
    # an explicit kind overrides the guess: rows of a distribution can also be read as logits
    probs = torch.tensor([[0.5, 0.5], [1.0, 0.0]])
    as_logits, _, _ = prepare_targets(probs, kind="logits")
    assert torch.allclose(as_logits, probs.softmax(1))


def test_soft_label_double_precision_becomes_float32():
    targets, _, _ = prepare_targets(torch.tensor([[0.25, 0.75]], dtype=torch.float64))
    assert targets.dtype == torch.float32


@pytest.mark.parametrize(
    "labels,kwargs",
    [
        (torch.tensor([0, 1, 10]), {"num_classes": 10}),
        (torch.tensor([0, -1, 2]), {}),
        (torch.tensor([0, -1, 2]), {"num_classes": 3}),
    ],
)
def test_label_range_errors(labels, kwargs):
    with pytest.raises(ELFError, match="must lie in"):
        prepare_targets(labels, **kwargs)


@pytest.mark.parametrize(
    "labels,kwargs",
    [
        (torch.tensor([0.0, 1.0]), {}),  # float class indices
        (torch.zeros(2, 3, dtype=torch.long), {}),  # integer one-hot
        (torch.zeros(2, 3, 1), {}),  # 3-d
        (torch.zeros(2, 3), {"kind": "index"}),
        (torch.tensor([0, 1]), {"kind": "prob"}),
        (torch.full((2, 3), 1 / 3), {"num_classes": 4}),  # columns != classes
        (torch.tensor([[float("nan"), 1.0]]), {"kind": "logits"}),
        (torch.tensor([0, 1]), {"kind": "onehot"}),
    ],
)
def test_wrong_label_shapes_and_kinds(labels, kwargs):
    with pytest.raises(ELFError):
        prepare_targets(labels, **kwargs)
