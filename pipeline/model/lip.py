"""Local Importance-based Pooling (Gao et al., ICCV 2019).

O = sum(I * exp(G)) / sum(exp(G)) over each window. Within a window this is a softmax of the
logits, so subtracting any per-window constant leaves O unchanged: we subtract the window's max
before `exp`, which keeps every weight in (0, 1] and the denominator >= 1 — finite in fp16/bf16
whatever the logits (the naive formula overflows fp16 at logits above ~11).

`LIPPool2d` feeds bounded logits (SoftGate: [0, 12]), for which the paper's naive form
avg_pool(x e^G) / avg_pool(e^G) cannot overflow in fp32 or bf16 (e^12 ~ 1.6e5) and is as exact
(tests/test_model.py bounds both against float64); it is faster on CPU (bench/lip.py), so the
pool uses it wherever the logits are not fp16 and keeps the shifted form for fp16.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def lip2d(x: torch.Tensor, logits: torch.Tensor, kernel_size: int = 2, stride: int = 2,
          padding: int = 0) -> torch.Tensor:
    """LIP of `x` weighted by exp(`logits`) (same shape as `x`); floor-mode like max_pool2d."""
    if x.shape != logits.shape:
        raise ValueError(f"lip2d: x {tuple(x.shape)} and logits {tuple(logits.shape)} differ")
    if kernel_size == stride and padding == 0:
        return _lip2d_disjoint(x, logits, kernel_size)
    # Overlapping windows: a per-(N, C) shift is constant within every window, so it cancels too.
    shift = logits.detach().amax(dim=(2, 3), keepdim=True)
    w = torch.exp(logits - shift)
    num = F.avg_pool2d(x * w, kernel_size, stride, padding)
    return num / F.avg_pool2d(w, kernel_size, stride, padding)


def lip2d_bounded(x: torch.Tensor, logits: torch.Tensor, kernel_size: int = 2, stride: int = 2,
                  padding: int = 0) -> torch.Tensor:
    """The naive form, for logits known to lie in [0, SoftGate.COEFF] and not fp16: no shift."""
    if x.shape != logits.shape:
        raise ValueError(f"lip2d: x {tuple(x.shape)} and logits {tuple(logits.shape)} differ")
    w = torch.exp(logits)
    return F.avg_pool2d(x * w, kernel_size, stride, padding) / F.avg_pool2d(w, kernel_size, stride, padding)


def _lip2d_disjoint(x: torch.Tensor, logits: torch.Tensor, k: int) -> torch.Tensor:
    n, c, h, w = x.shape
    ho, wo = h // k, w // k
    if ho == 0 or wo == 0:
        raise ValueError(f"lip2d: input {h}x{w} is smaller than the {k}x{k} window")
    # View each window as its own two axes (a view even for channels_last), softmax over them.
    xs = x[:, :, : ho * k, : wo * k].reshape(n, c, ho, k, wo, k)
    ls = logits[:, :, : ho * k, : wo * k].reshape(n, c, ho, k, wo, k)
    e = torch.exp(ls - ls.detach().amax(dim=(3, 5), keepdim=True))
    return (xs * e).sum(dim=(3, 5)) / e.sum(dim=(3, 5))


class SoftGate(nn.Module):
    """Bounds logits to (0, 12): a window can prefer one pixel by at most e^12, as in the LIP paper."""

    COEFF = 12.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.sigmoid(x) * self.COEFF


class LIPLogit(nn.Module):
    """G(I): a conv/InstanceNorm/ReLU bottleneck ending in SoftGate (the LIP paper's BottleneckLIP).

    The last InstanceNorm's gain and bias start at zero, so at start every logit is
    SoftGate(0) = 6 and LIP is average pooling: ImageNet-initialised features are not disturbed
    before the logits learn, and the logits then depart from a constant in proportion to the gain.
    (Zeroing the last *conv* instead, as this module once did, does not give a smooth start: the
    norm after it rescales the conv's first tiny non-zero output to unit variance, so one optimiser
    step takes the logits from constant to 12 * sigmoid(N(0, 1)); reports/recipe.md measures both.)
    The conv keeps its He init: with it zero too, the gain would get no gradient and LIP would stay
    average pooling for ever.
    """

    def __init__(self, channels: int, bottleneck: float = 0.25, norm: bool = True):
        super().__init__()
        r = max(8, int(round(channels * bottleneck)))
        self.norm = norm
        if norm:
            self.body = nn.Sequential(
                nn.Conv2d(channels, r, 1, bias=False),
                nn.InstanceNorm2d(r, affine=True),
                nn.ReLU(inplace=True),
                nn.Conv2d(r, r, 3, padding=1, bias=False),
                nn.InstanceNorm2d(r, affine=True),
                nn.ReLU(inplace=True),
                nn.Conv2d(r, channels, 1, bias=False),
                nn.InstanceNorm2d(channels, affine=True),
                SoftGate(),
            )
        else:  # `lip_norm: false`: no InstanceNorms (they are most of the module's CPU time)
            self.body = nn.Sequential(
                nn.Conv2d(channels, r, 1),
                nn.ReLU(inplace=True),
                nn.Conv2d(r, r, 3, padding=1),
                nn.ReLU(inplace=True),
                nn.Conv2d(r, channels, 1),
                SoftGate(),
            )
        self.reset_last()

    def reset_last(self) -> None:
        """LIP starts as average pooling: the last norm's gain and bias at zero (with norms), or
        the last conv at zero (without: no norm then rescales its first steps)."""
        last = self.body[7] if self.norm else self.body[4]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)


class LIPPool2d(nn.Module):
    """Drop-in replacement for VGG's 2x2/stride-2 max pool."""

    def __init__(self, channels: int, kernel_size: int = 2, stride: int = 2, bottleneck: float = 0.25,
                 norm: bool = True):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.logit = LIPLogit(channels, bottleneck, norm)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logit(x)
        pool = lip2d if logits.dtype == torch.float16 else lip2d_bounded
        return pool(x, logits, self.kernel_size, self.stride)
