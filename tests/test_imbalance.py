"""Rare-class remedies (pipeline.train.imbalance) and the onecycle schedule: the math, fast."""
import math

import pytest
import torch
from torch.nn import functional as F

from pipeline.train.imbalance import (BalancedBatches, LogitAdjustedLoss, balanced_order,
                                      balanced_weights, class_prior, make_batches, make_criterion)


def test_prior_and_weights():
    counts = torch.tensor([8.0, 2.0, 0.0])
    p = class_prior(counts)
    assert torch.allclose(p, torch.tensor([8, 2, 1], dtype=torch.float64) / 11)
    y = torch.tensor([0, 0, 0, 0, 1])
    w = balanced_weights(y, 2)
    # each class carries the same total weight
    assert math.isclose(float(w[y == 0].sum()), float(w[y == 1].sum()))
    w_sqrt = balanced_weights(y, 2, power=0.5)
    assert torch.allclose(w_sqrt, torch.tensor([0.5, 0.5, 0.5, 0.5, 1.0], dtype=torch.float64))


def test_balanced_order_equalises_classes():
    y = torch.tensor([0] * 900 + [1] * 90 + [2] * 10)
    g = torch.Generator().manual_seed(0)
    order = balanced_order(y, 3, g, n=30_000)
    freq = torch.bincount(y[order], minlength=3).double() / 30_000
    assert torch.allclose(freq, torch.full((3,), 1 / 3, dtype=torch.float64), atol=0.02)
    # same seed, same order
    again = balanced_order(y, 3, torch.Generator().manual_seed(0), n=30_000)
    assert torch.equal(order, again)


def test_logit_adjusted_loss_is_ce_of_shifted_logits():
    counts = torch.tensor([70.0, 20.0, 10.0])
    logits = torch.randn(5, 3)
    y = torch.tensor([0, 1, 2, 2, 0])
    crit = LogitAdjustedLoss(counts, tau=1.0)
    want = F.cross_entropy(logits + torch.log(counts / counts.sum()), y)
    assert torch.allclose(crit(logits, y), want, atol=1e-6)
    # tau scales the shift; label smoothing is passed through
    crit2 = LogitAdjustedLoss(counts, tau=0.5, label_smoothing=0.1)
    want2 = F.cross_entropy(logits + 0.5 * torch.log(counts / counts.sum()), y, label_smoothing=0.1)
    assert torch.allclose(crit2(logits, y), want2, atol=1e-6)


def test_logit_adjustment_optimum_is_balanced():
    """Minimising the adjusted loss on skewed labels with constant logits gives equal logits:
    the raw logits then encode the balanced (uniform) prior, as Menon et al. show."""
    counts = torch.tensor([80.0, 15.0, 5.0])
    y = torch.cat([torch.full((int(c),), i) for i, c in enumerate(counts)])
    b = torch.zeros(3, requires_grad=True)
    opt = torch.optim.SGD([b], lr=1.0)
    crit = LogitAdjustedLoss(counts, tau=1.0)
    for _ in range(500):
        opt.zero_grad()
        crit(b.expand(len(y), 3), y).backward()
        opt.step()
    assert float(b.max() - b.min()) < 1e-3


def test_make_criterion_and_batches():
    counts = torch.tensor([3.0, 1.0])
    from pipeline.train.config import TrainConfig

    base = {"data": "-", "label_smoothing": 0.0, "class_weighted": False, "logit_adjust": 0.0, "num_classes": 2}

    def run(**kw):
        return TrainConfig(**{**base, **kw})

    assert make_criterion(run(), counts, "cpu").weight is None
    assert torch.allclose(make_criterion(run(class_weighted=True), counts, "cpu").weight,
                          torch.tensor([4 / 6, 4 / 2]))
    assert isinstance(make_criterion(run(logit_adjust=1.0), counts, "cpu"), LogitAdjustedLoss)
    x = torch.randint(0, 255, (12, 3, 56, 56), dtype=torch.uint8)
    y = torch.tensor([0] * 10 + [1] * 2)
    kw = dict(batch_size=4, crop=48, train=True, drop_last=True)
    assert type(make_batches(run(sampler="shuffle"), x, y, **kw)).__name__ == "DeviceBatches"
    bb = make_batches(run(sampler="balanced"), x, y, **kw)
    assert isinstance(bb, BalancedBatches)
    seen = torch.cat([yb for _, yb in bb])
    assert len(seen) == 12
    xb, _ = next(iter(bb))
    assert xb.shape == (4, 3, 48, 48) and xb.dtype == torch.float32
    with pytest.raises(ValueError):
        BalancedBatches(x, y, num_classes=2, batch_size=4, crop=48, train=False)


def test_onecycle_schedule():
    from pipeline.train.steps import lr_lambda

    f = lr_lambda(10, 10, 1, "onecycle", 10, 0.1)
    vals = [f(i) for i in range(100)]
    assert math.isclose(vals[0], 1 / 25)
    assert max(vals) == pytest.approx(1.0) and vals.index(max(vals)) == 30
    assert vals[-1] < 1e-3
    assert all(a <= b for a, b in zip(vals[:30], vals[1:31]))
    assert all(a >= b for a, b in zip(vals[30:], vals[31:]))


def test_train_config_checks_the_new_keys():
    from pipeline.errors import FerError
    from pipeline.train.config import TrainConfig

    ok = TrainConfig.from_dict({"data": "d", "sampler": "balanced", "logit_adjust": 1.0, "schedule": "onecycle"})
    assert ok.sampler == "balanced" and ok.logit_adjust == 1.0
    for bad in ({"sampler": "uniform"}, {"logit_adjust": -1.0},
                {"logit_adjust": 1.0, "class_weighted": True}):
        with pytest.raises(FerError):
            TrainConfig.from_dict({"data": "d", **bad})
