"""Local Importance-based Pooling (Gao et al., ICCV 2019).

O = sum(I * exp(G)) / sum(exp(G)) over each window. Within a window this is a softmax of the
logits, so subtracting any per-window constant leaves O unchanged: we subtract the window's max
before `exp`, which keeps every weight in (0, 1] and the denominator >= 1 — finite in fp16/bf16
whatever the logits (the naive formula overflows fp16 at logits above ~11).

`LIPPool2d` feeds bounded logits (SoftGate: [0, 12]), for which the paper's naive form
avg_pool(x e^G) / avg_pool(e^G) cannot overflow in fp32 or bf16 (e^12 ~ 1.6e5) and is as exact
(tests/test_model.py bounds both against float64); it is faster on CPU (bench/lip.py), so the
pool uses it wherever the logits are not fp16 and keeps the shifted form for fp16.

Two forms make LIP cost closer to its FLOPs on the CPU (bench/lip.py breaks the step down): the
bounded pool's backward is written by hand (`BoundedLIPFunction`: three full-resolution passes instead of
autograd's five), and the logit module's InstanceNorms run as GroupNorm with one channel per group
(`InstanceNorm`: the same normalisation and parameter names, so checkpoints load either way; PyTorch's
CPU InstanceNorm reshapes to a batch norm over N*C channels, 2-3x slower for the module's few channels).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pipeline.params_schema import LIP_STARTS


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
    if kernel_size == stride and padding == 0 and torch.is_grad_enabled() \
            and (x.requires_grad or logits.requires_grad) and not torch.jit.is_tracing():
        return BoundedLIPFunction.apply(x, logits, kernel_size)
    w = torch.exp(logits)
    return F.avg_pool2d(x * w, kernel_size, stride, padding) / F.avg_pool2d(w, kernel_size, stride, padding)


class BoundedLIPFunction(torch.autograd.Function):
    """`lip2d_bounded` over disjoint k x k windows with its gradient written out.

    With w = e^G, S = sum(w) and O = sum(I w) / S over a window, dO/dI_i = w_i / S and
    dO/dG_i = w_i (I_i - O) / S: both are one broadcast of the window's g / S against w, so the
    backward is three passes over the full-resolution tensors and keeps no x * w product. Used for
    training only (grad enabled); inference and export take the plain ops, which give the same forward.
    """

    @staticmethod
    def forward(ctx, x, logits, k):
        n, c, h, w = x.shape
        ho, wo = h // k, w // k
        xc, lc = x[:, :, : ho * k, : wo * k], logits[:, :, : ho * k, : wo * k]
        e = torch.exp(lc)
        den = F.avg_pool2d(e, k)
        out = F.avg_pool2d(xc * e, k) / den
        ctx.save_for_backward(xc, e, out, den)
        ctx.k, ctx.hw = k, (h, w)
        return out

    @staticmethod
    def backward(ctx, g):
        xc, e, out, den = ctx.saved_tensors
        k, (h, w) = ctx.k, ctx.hw
        n, c, ho, wo = out.shape
        gs = (g / den).mul_(1.0 / (k * k)).view(n, c, ho, 1, wo, 1)
        gx = e.reshape(n, c, ho, k, wo, k) * gs
        gl = gx * (xc.reshape(n, c, ho, k, wo, k) - out.view(n, c, ho, 1, wo, 1))
        gx, gl = gx.view(n, c, ho * k, wo * k), gl.view(n, c, ho * k, wo * k)
        if (h, w) != (ho * k, wo * k):  # floor mode: the rows and columns no window covers get 0
            pad = (0, w - wo * k, 0, h - ho * k)
            gx, gl = F.pad(gx, pad), F.pad(gl, pad)
        return gx, gl, None


class InstanceNorm(nn.GroupNorm):
    """InstanceNorm2d(affine=True) as GroupNorm with one channel per group (see the module doc)."""

    def __init__(self, channels: int):
        super().__init__(channels, channels)


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

    `start="max"` adds a per-channel gain on the input itself before the gate,
    G = SoftGate(body(I) + gain * I), the gain starting at `MAX_START_GAIN`: the LIP paper's own
    special case G(I) = beta * I, which tends to max pooling as beta grows. LIP then starts as a soft
    max pooling (within a window of post-ReLU features ~1 apart, the larger weighs ~e^3 more) and
    learns from where max pooling learns fast, instead of from average pooling, which learns slowest
    of the three on the embedded set (reports/recipe.md); the body's zero-gain last norm still joins
    smoothly. `start="avg"` is the module as the paper describes it.

    The last InstanceNorm's gain and bias start at zero, so at start every logit is
    SoftGate(0) = 6 and LIP is average pooling: ImageNet-initialised features are not disturbed
    before the logits learn, and the logits then depart from a constant in proportion to the gain.
    (Zeroing the last *conv* instead, as this module once did, does not give a smooth start: the
    norm after it rescales the conv's first tiny non-zero output to unit variance, so one optimiser
    step takes the logits from constant to 12 * sigmoid(N(0, 1)); reports/recipe.md measures both.)
    The conv keeps its He init: with it zero too, the gain would get no gradient and LIP would stay
    average pooling for ever.
    """

    MAX_START_GAIN = 1.0

    def __init__(self, channels: int, bottleneck: float = 0.25, norm: bool = True, start: str = "avg"):
        super().__init__()
        if start not in LIP_STARTS:
            raise ValueError(f"LIPLogit: start={start!r}, expected one of {LIP_STARTS}")
        r = max(8, int(round(channels * bottleneck)))
        self.norm = norm
        # only with start="max": the paper's module keeps its state-dict keys (and checkpoints)
        self.input_gain = (nn.Parameter(torch.full((1, channels, 1, 1), self.MAX_START_GAIN))
                           if start == "max" else None)
        if norm:
            self.body = nn.Sequential(
                nn.Conv2d(channels, r, 1, bias=False),
                InstanceNorm(r),
                nn.ReLU(inplace=True),
                nn.Conv2d(r, r, 3, padding=1, bias=False),
                InstanceNorm(r),
                nn.ReLU(inplace=True),
                nn.Conv2d(r, channels, 1, bias=False),
                InstanceNorm(channels),
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
        if self.input_gain is not None:
            nn.init.constant_(self.input_gain, self.MAX_START_GAIN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.input_gain is None:
            return self.body(x)
        *pre, gate = self.body
        h = x
        for layer in pre:
            h = layer(h)
        return gate(torch.addcmul(h, x, self.input_gain))


class LIPPool2d(nn.Module):
    """Drop-in replacement for VGG's 2x2/stride-2 max pool."""

    def __init__(self, channels: int, kernel_size: int = 2, stride: int = 2, bottleneck: float = 0.25,
                 norm: bool = True, start: str = "avg"):
        super().__init__()
        self.kernel_size, self.stride = kernel_size, stride
        self.logit = LIPLogit(channels, bottleneck, norm, start)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.logit(x)
        pool = lip2d if logits.dtype == torch.float16 else lip2d_bounded
        return pool(x, logits, self.kernel_size, self.stride)
