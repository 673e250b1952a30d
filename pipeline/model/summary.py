"""Parameters and FLOPs per variant: what the conv head and LIP cost or save."""
from __future__ import annotations

import itertools

import torch
from torch.utils.flop_counter import FlopCounterMode

from pipeline.model.vgg import ATTENTIONS, HEADS, POOLS, lip_vgg16


def count(pool: str, head: str, attention: str, *, size: int = 90, width: float = 1.0,
          num_classes: int = 7) -> dict:
    model = lip_vgg16(num_classes, pool=pool, head=head, attention=attention, width=width).eval()
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad(), FlopCounterMode(display=False) as fc:
        model(torch.zeros(1, 3, size, size))
    return dict(pool=pool, head=head, attention=attention, params=params, flops=fc.get_total_flops())


def summary_table(size: int = 90, width: float = 1.0, num_classes: int = 7) -> str:
    rows = [count(p, h, a, size=size, width=width, num_classes=num_classes)
            for p, h, a in itertools.product(POOLS, HEADS, ATTENTIONS)]
    base = next(r for r in rows if (r["pool"], r["head"], r["attention"]) == ("max", "fc", "none"))
    lines = [f"LIP-VGG16 variants at {size}x{size}, width {width}, {num_classes} classes "
             "(FLOPs = 2 x multiply-adds, forward, batch 1)",
             f"{'pool':5} {'head':5} {'attn':5} {'params':>12} {'vs vgg16_bn':>12} {'GFLOPs':>8}"]
    for r in rows:
        lines.append(f"{r['pool']:5} {r['head']:5} {r['attention']:5} {r['params']:>12,} "
                     f"{r['params'] / base['params']:>11.3f}x {r['flops'] / 1e9:>8.3f}")
    return "\n".join(lines)
