"""`elf-official` trains what the public ELF evaluation loop trains.

The reference below is a plain PyTorch loop written from the semantics of the ELF authors' ``evaluate_feature_synset``
/ ``epoch_for_feature`` (not from elf-dd's trainer): one SGD optimizer (momentum 0.9, weight decay 5e-4), re-created
with lr x0.1 after epoch ``Epoch // 2 + 1``, ``Epoch + 1`` passes, and per batch
``CE(net(x), y) + λ_front · CE(front(x), F) + λ_rear · CE(rear(F), y)`` in train mode (so BatchNorm layers of the
rear also update their running statistics on the teacher features F), F used as soft targets over the channels.
Only the batch order and the augmented images are taken from the trainer's run (its own seeded generators draw them;
the DSA ops themselves are checked against reference implementations in ``test_augment.py``).
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from elf import Callback, ELFTrainer, FeatureBank, create_model

N, K, BATCH, EPOCHS = 30, 10, 8, 4


class _Recording(ELFTrainer):
    """The trainer, recording each step's image indices and augmented images."""

    def batch(self, idx, dsa, gen):  # noqa: ANN001, ANN201
        x, y, feats = super().batch(idx, dsa, gen)
        self.steps.append((idx.clone(), x.detach().clone()))
        return x, y, feats


class _Initial(Callback):
    def on_fit_start(self, trainer: ELFTrainer) -> None:
        self.model = copy.deepcopy(trainer.model)


def _reference(initial: nn.Module, cut: int, steps: list[tuple[torch.Tensor, torch.Tensor]], labels: torch.Tensor,
               features: torch.Tensor, lambda_front: float = 1.0, lambda_rear: float = 1.0) -> nn.Module:
    """The official loop on ConvNet ``initial`` cut after ``features[:cut]``, replaying the recorded batches."""
    net = copy.deepcopy(initial)

    def front(x: torch.Tensor) -> torch.Tensor:
        return net.features[:cut](x)

    def rear(h: torch.Tensor) -> torch.Tensor:
        return net.classifier(net.features[cut:](h).flatten(1))

    lr = 0.01
    opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    per_epoch = -(-N // BATCH)
    for ep in range(EPOCHS + 1):
        net.train()
        for idx, x in steps[ep * per_epoch:(ep + 1) * per_epoch]:
            y, f = labels[idx], features[idx]
            h = front(x)
            out = rear(h)  # first the images through the whole net, then the rear on F (the BatchNorm update order)
            out_f = rear(f)
            loss = F.cross_entropy(out, y) + lambda_front * F.cross_entropy(h, f) + lambda_rear * F.cross_entropy(out_f, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
        if ep == EPOCHS // 2 + 1:
            lr *= 0.1
            opt = torch.optim.SGD(net.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    return net


def _run(student: str, cut: int, teacher: str, protocol: str) -> tuple[nn.Module, nn.Module]:
    torch.manual_seed(0)
    images, labels = torch.randn(N, 3, 32, 32), torch.arange(N) % K
    bank = FeatureBank.build(create_model(teacher).eval(), images)
    initial = _Initial()
    trainer = _Recording(student, images, labels, feature_bank=bank, protocol=protocol, epochs=EPOCHS,
                         batch_size=BATCH, split_at=f"features.{cut - 1}", progress=False, device="cpu",
                         callbacks=[initial])
    trainer.steps = []
    trainer.fit(0)
    assert len(trainer.steps) == (EPOCHS + 1) * -(-N // BATCH)
    return trainer.model, _reference(initial.model, cut, trainer.steps, labels, bank.features)


def _assert_same(a: nn.Module, b: nn.Module) -> None:
    for (name, x), y in zip(a.state_dict().items(), b.state_dict().values()):
        torch.testing.assert_close(x, y, rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.parametrize("protocol", ["elf-official", "elf"])
def test_the_paper_case_trains_as_the_official_loop(protocol: str) -> None:
    """An instance-norm ConvNet cut after its conv stack (the paper's ConvNet case): both presets equal the official
    loop (weights to float rounding after 5 passes, the lr decay included)."""
    trained, reference = _run("ConvNetW8D2", 8, "ConvNetW8D2", protocol)
    _assert_same(trained, reference)


def test_a_batchnorm_rear_trains_as_the_official_loop_under_elf_official_only() -> None:
    """With BatchNorm in the rear (ConvNet-BN cut after its first block), `elf-official` equals the official loop,
    running statistics included; the `elf` default keeps the rear's statistics to the student's path (documented
    difference), so its statistics differ and its batch counter is half the official one."""
    trained, reference = _run("ConvNetW8D2BN", 4, "ConvNetW8D1", "elf-official")
    _assert_same(trained, reference)
    default, reference = _run("ConvNetW8D2BN", 4, "ConvNetW8D1", "elf")
    assert int(default.features[5].num_batches_tracked) * 2 == int(reference.features[5].num_batches_tracked)
    assert not torch.allclose(default.features[5].running_mean, reference.features[5].running_mean, atol=1e-4)
