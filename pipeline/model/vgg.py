"""LIP-VGG16 (Cui Dong et al., 2021) with the switches that make every row of its ablation a config.

Module names and indices follow torchvision's `vgg16_bn` (`features.N`, `avgpool`, `classifier.N`),
so `pool="max", head="fc", attention="none"` *is* vgg16_bn and loads its state dict unchanged.
"""
from __future__ import annotations

from torch import nn

from pipeline.model.attention import ECA
from pipeline.model.lip import LIPPool2d
from pipeline.params_schema import (ATTENTIONS, HEADS, LIP_STARTS, MAX_SIZE, MIN_SIZE, POOLS,
                                    recorded_lip_switches)

VGG16_CFG = (64, 64, "P", 128, 128, "P", 256, 256, 256, "P", 512, 512, 512, "P", 512, 512, 512, "P")


def _scaled(c: int, width: float) -> int:
    return max(8, int(round(c * width)))


def _features(pool: str, width: float, lip_bottleneck: float, lip_norm: bool = True,
              lip_start: str = "avg") -> nn.Sequential:
    layers: list[nn.Module] = []
    c_in = 3
    for v in VGG16_CFG:
        if v == "P":
            layers.append(LIPPool2d(c_in, bottleneck=lip_bottleneck, norm=lip_norm, start=lip_start)
                          if pool == "lip"
                          else nn.AvgPool2d(2, 2) if pool == "avg" else nn.MaxPool2d(2, 2))
        else:
            c = _scaled(v, width)
            layers += [nn.Conv2d(c_in, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True)]
            c_in = c
    return nn.Sequential(*layers)


class LIPVGG16(nn.Module):
    def __init__(self, num_classes: int = 7, pool: str = "lip", head: str = "conv",
                 attention: str = "eca", width: float = 1.0, lip_bottleneck: float = 0.25,
                 dropout: float = 0.5, lip_norm: bool = True, lip_start: str = "avg"):
        super().__init__()
        for name, value, allowed in (("pool", pool, POOLS), ("head", head, HEADS),
                                     ("attention", attention, ATTENTIONS)):
            if value not in allowed:
                raise ValueError(f"lip_vgg16: {name}={value!r}, expected one of {allowed}")
        if not 0 < width <= 4:
            raise ValueError(f"lip_vgg16: width={width} must be in (0, 4]")
        self.config = dict(num_classes=num_classes, pool=pool, head=head, attention=attention,
                           width=width, lip_bottleneck=lip_bottleneck, dropout=dropout)
        if lip_start not in LIP_STARTS:
            raise ValueError(f"lip_vgg16: lip_start={lip_start!r}, expected one of {LIP_STARTS}")
        self.config.update(recorded_lip_switches(pool, lip_norm, lip_start))
        c = _scaled(512, width)
        self.features = _features(pool, width, lip_bottleneck, lip_norm, lip_start)
        if head == "conv":
            # The paper's change: two conv layers and one FC instead of VGG's three FC layers.
            self.head = nn.Sequential(
                nn.Conv2d(c, c, 3, padding=1), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
                nn.Conv2d(c, c, 1), nn.BatchNorm2d(c), nn.ReLU(inplace=True),
            )
            self.attention = ECA(c) if attention == "eca" else nn.Identity()
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.classifier = nn.Sequential(nn.Dropout(dropout), nn.Linear(c, num_classes))
        else:
            hidden = _scaled(4096, width)
            self.head = nn.Identity()
            self.attention = ECA(c) if attention == "eca" else nn.Identity()
            self.avgpool = nn.AdaptiveAvgPool2d((7, 7))
            self.classifier = nn.Sequential(
                nn.Linear(c * 49, hidden), nn.ReLU(True), nn.Dropout(dropout),
                nn.Linear(hidden, hidden), nn.ReLU(True), nn.Dropout(dropout),
                nn.Linear(hidden, num_classes),
            )
        self._init_weights()

    def _init_weights(self) -> None:
        # torchvision's VGG initialisation, except the LIP logit's zero-gain last norm (LIPLogit).
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")
                if m.bias is not None:
                    nn.init.zeros_(m.bias)
            elif isinstance(m, nn.BatchNorm2d):
                nn.init.ones_(m.weight)
                nn.init.zeros_(m.bias)
            elif isinstance(m, nn.Linear):
                nn.init.normal_(m.weight, 0, 0.01)
                nn.init.zeros_(m.bias)
        for m in self.modules():
            if isinstance(m, LIPPool2d):
                m.logit.reset_last()

    @property
    def classifier_prefix(self) -> str:
        """State-dict prefix of the layer that depends on the number of classes."""
        return f"classifier.{len(self.classifier) - 1}."

    def forward(self, x):
        h, w = x.shape[-2:]
        if not (MIN_SIZE <= h <= MAX_SIZE and MIN_SIZE <= w <= MAX_SIZE):
            raise ValueError(f"LIP-VGG16 takes {MIN_SIZE}..{MAX_SIZE} px inputs, got {h}x{w}")
        x = self.features(x)
        x = self.attention(self.head(x))
        return self.classifier(self.avgpool(x).flatten(1))


def lip_vgg16(num_classes: int = 7, pool: str = "lip", head: str = "conv", attention: str = "eca",
              width: float = 1.0, **kw) -> LIPVGG16:
    return LIPVGG16(num_classes=num_classes, pool=pool, head=head, attention=attention, width=width, **kw)
