"""ECA channel attention (Wang et al., CVPR 2020): a 1-D conv across pooled channels, no reduction."""
from __future__ import annotations

import math

import torch
from torch import nn


def eca_kernel_size(channels: int, gamma: int = 2, b: int = 1) -> int:
    """k(C) = |log2(C)/gamma + b/gamma| made odd, as in the ECA reference code (C=512 -> 5)."""
    t = int(abs((math.log2(channels) + b) / gamma))
    return t if t % 2 else t + 1


class ECA(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        k = eca_kernel_size(channels)
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean(dim=(2, 3))                      # (N, C)
        y = self.conv(y.unsqueeze(1)).squeeze(1)    # local cross-channel interaction
        return x * torch.sigmoid(y)[:, :, None, None].to(x.dtype)
