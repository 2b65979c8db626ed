"""The shape every built-in model shares, following timm's ``forward_features`` / ``forward_head`` convention."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["FeaturesHeadNet"]


class FeaturesHeadNet(nn.Module):
    """``forward(x) = forward_head(forward_features(x))``.

    Default halves: ``self.features`` maps ``(N, C, H, W)`` images to conv features, and ``self.classifier`` maps the
    flattened features to logits ``(N, num_classes)``. Subclasses override either half where they differ.
    """

    features: nn.Module
    classifier: nn.Module

    def forward_features(self, x: torch.Tensor) -> torch.Tensor:
        return self.features(x)

    def forward_head(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(x.flatten(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_head(self.forward_features(x))
