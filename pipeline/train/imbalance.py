"""Rare classes: a class-balanced sampler and logit adjustment (beside ``class_weighted``).

RAF-DB's train set is skewed (fear 2%, disgust 6%, anger 6%; happiness 39%). Three remedies
are selectable per training run (``TrainConfig``):

* ``class_weighted: true`` — cross-entropy weighted by ``N / (K n_c)`` (in the worker).
* ``sampler: balanced`` — each epoch draws as many images as the train shard holds, with
  replacement, image ``i`` with probability proportional to ``n_{y_i}^-power`` (power 1: every
  class equally often; 0.5: "square-root" sampling). :func:`balanced_order` builds the order;
  :class:`BalancedBatches` is ``DeviceBatches`` with that order instead of a permutation.
* ``logit_adjust: tau`` (> 0) — the logit-adjusted loss of Menon et al. (ICLR 2021):
  cross-entropy of ``logits + tau * log(prior)``. The network's raw logits, used unchanged at
  inference, then estimate the class-balanced posterior (for tau = 1), so nothing else changes:
  evaluation, export and serving read the same model.
"""
from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

from pipeline.data.loader import DeviceBatches, normalize, random_crop_flip
from pipeline.train.config import TrainConfig


def class_prior(counts: torch.Tensor) -> torch.Tensor:
    """Class frequencies from counts; a class without images gets one (no log(0))."""
    c = counts.double().clamp(min=1)
    return c / c.sum()


def balanced_weights(labels: torch.Tensor, num_classes: int, power: float = 1.0) -> torch.Tensor:
    """Per-image sampling weight ``n_{y_i}^-power`` (float64, same device as ``labels``)."""
    counts = torch.bincount(labels, minlength=num_classes).double().clamp(min=1)
    return counts.pow(-float(power))[labels]


def balanced_order(labels: torch.Tensor, num_classes: int, generator: torch.Generator,
                   power: float = 1.0, n: int | None = None) -> torch.Tensor:
    """``n`` (default ``len(labels)``) indices drawn with replacement by :func:`balanced_weights`."""
    w = balanced_weights(labels, num_classes, power)
    if w.device != generator.device:
        w = w.to(generator.device)
    idx = torch.multinomial(w, len(labels) if n is None else n, replacement=True, generator=generator)
    return idx.to(labels.device)


class LogitAdjustedLoss(nn.Module):
    """Cross-entropy of ``logits + tau * log(prior)`` (label smoothing as in ``nn.CrossEntropyLoss``)."""

    def __init__(self, counts: torch.Tensor, tau: float = 1.0, label_smoothing: float = 0.0):
        super().__init__()
        self.register_buffer("offset", float(tau) * class_prior(counts).log().float())
        self.label_smoothing = float(label_smoothing)

    def forward(self, logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
        return F.cross_entropy(logits + self.offset.to(logits.device, logits.dtype), target,
                               label_smoothing=self.label_smoothing)


def make_criterion(run: TrainConfig, counts: torch.Tensor, device) -> nn.Module:
    """The training loss for a worker config: plain / class-weighted / logit-adjusted CE."""
    tau = float(run.logit_adjust or 0.0)
    if tau > 0:
        return LogitAdjustedLoss(counts, tau, run.label_smoothing).to(device)
    weight = None
    if run.class_weighted:
        weight = (counts.sum() / (len(counts) * counts.clamp(min=1))).float().to(device)
    return nn.CrossEntropyLoss(weight=weight, label_smoothing=run.label_smoothing)


def make_batches(run: TrainConfig, tx: torch.Tensor, ty: torch.Tensor, **kw) -> DeviceBatches:
    """``DeviceBatches`` for ``sampler: shuffle`` (default), :class:`BalancedBatches` for ``balanced``."""
    if run.sampler == "balanced":
        return BalancedBatches(tx, ty, num_classes=run.num_classes, **kw)
    return DeviceBatches(tx, ty, **kw)


class BalancedBatches(DeviceBatches):
    """Training batches in a class-balanced order (with replacement), same augmentation."""

    def __init__(self, images, labels, *, num_classes: int, power: float = 1.0, **kw):
        super().__init__(images, labels, **kw)
        if not self.train:
            raise ValueError("BalancedBatches is for training batches (train=True)")
        self.num_classes, self.power = int(num_classes), float(power)

    def __iter__(self):
        n, bs = len(self.images), self.batch_size
        stop = (n // bs) * bs if self.drop_last else n
        g = self._generator()
        order = balanced_order(self.labels, self.num_classes, g, self.power)
        for i in range(0, stop, bs):
            idx = order[i:i + bs]
            xb = random_crop_flip(self.images[idx], self.crop, generator=g,
                                  flip_p=self.flip_p, max_rotate_deg=self.max_rotate_deg)
            yield normalize(xb), self.labels[idx]
