"""What the single-model examples read: random tensors for ``--tiny``, else a synthetic set, a test set and a teacher.

Shared by custom_architecture.py, torchvision_model.py and timm_model.py (run them from anywhere: a script's own
folder is on ``sys.path``).
"""

from __future__ import annotations

import argparse

import torch
from torch import nn

from elf import create_model
from elf.io import load_tensor_pair
from elf.teacher import load_teacher


def load_inputs(args: argparse.Namespace, ap: argparse.ArgumentParser) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, nn.Module, int]:
    """``(images, labels, test_x, test_y, teacher, num_classes)``; ``--tiny`` also cuts epochs to 1 and seeds to 2."""
    torch.manual_seed(0)
    if args.tiny:
        images, labels = torch.randn(20, 3, 32, 32), torch.arange(10).repeat_interleave(2)
        test_x, test_y = torch.randn(100, 3, 32, 32), torch.randint(0, 10, (100,))
        teacher = create_model(args.teacher_model)  # random weights: the accuracies are meaningless
        args.epochs, args.seeds = 1, 2
        return images, labels, test_x, test_y, teacher, 10
    if not (args.synthetic and args.test and args.teacher):
        ap.error("--synthetic, --test and --teacher are required (or use --tiny)")
    images, labels = load_tensor_pair(args.synthetic)
    test_x, test_y = load_tensor_pair(args.test)
    num_classes = labels.shape[1] if labels.dim() == 2 else int(labels.max()) + 1
    teacher = load_teacher(args.teacher_model, args.teacher, channel=images.shape[1], num_classes=num_classes,
                           im_size=tuple(images.shape[2:]))
    return images, labels, test_x, test_y, teacher, num_classes
