"""Procedurally drawn faces for the seven expressions, written in a real dataset layout.

The synthetic set is the embedded default: a fresh clone runs every stage with no licence-gated
data. The faces are drawn with PIL (2x supersampled, then downsampled) and finished with numpy
(lighting, blur, noise), one ``numpy.random.Generator`` per image seeded from
``(seed, layout, index)``, so the same seed writes the same bytes on any machine with the
pinned stack, whatever its CPU, thread count, locale or time zone: the 8-bit rounding happens in
float64 (CPU-specific math kernels differ by a few ULP), JPEGs use fixed settings and
libjpeg-turbo's integer DCT, PNGs are written here with stored (uncompressed) deflate blocks
(no compressor involved), and no file holds a timestamp or a path.

Cues per class (each scaled by a per-image intensity in 0.35..1, plus noise and identity
offsets such as a naturally down-turned mouth, so weak expressions overlap with neutral):

=========  ============================================================================
class      cues
=========  ============================================================================
surprise   brows raised high and arched, forehead wrinkles, eyes wide (white above the
           iris), mouth dropped open in a round "O", narrower than at rest
fear       brows raised but flat, inner ends pulled up, eyes wide, mouth stretched wide
           and half open with corners pulled down, lower teeth sometimes showing
disgust    brows lowered, nose wrinkles and flared nostrils, eyes narrowed from below,
           upper lip raised on one side (asymmetric), corners down, nasolabial folds
happiness  mouth corners up (smile), often open with upper teeth, cheeks raised and
           flushed, eyes squinted from below, smile lines
sadness    inner brow ends raised (oblique brows), upper lids drooping, mouth corners down,
           lower lip pushed up, faint forehead lines
anger      brows pulled down and together (V shape), vertical lines between the brows,
           glaring narrowed eyes, lips pressed thin (sometimes a bared-teeth snarl)
neutral    everything at the identity's rest position
=========  ============================================================================

Nuisances varied per image: face shape (width, jaw, chin), feature placement and size, skin
tone (light to dark), hair colour and style, glasses, moustache, pose (in-plane rotation, small
yaw, shift and scale), lighting (directional gradient, gain, gamma, colour cast), occlusion
(hand, sunglasses, hair strand, object) and sensor noise/blur. Fear and surprise share raised
brows and wide eyes and differ mostly in brow shape and mouth; sadness, anger and neutral
overlap at low intensity: learnable, not trivial. Measured: a small 8-conv CNN (0.5 M params,
56x56 input, 48 crops, 15 epochs on the default 1078 train images, CPU, ~12 min) reaches 86%
ten-crop top-1 / 74% mean class accuracy on the default test split (always-happiness: 39%).

Layouts:

``rafdb``  100x100 JPEG (quality 90), tight aligned crops on soft backgrounds, RAF-DB basic layout
           (``EmoLabel/list_patition_label.txt`` + ``Image/aligned/train_00001_aligned.jpg``),
           about 80/20 train/test, default n=1500.
``sfew``   112x112 PNG (stored, uncompressed), a visibly different "movie still" domain: smaller face with neck and
           shoulders, dark cluttered backgrounds, strong side light, colour casts, more blur and
           noise, larger pose; ``Train/Train_Aligned_Faces/<Emotion>/*.png`` and
           ``Val/Val_Aligned_Faces/<Emotion>/*.png`` (about 70/30), default n=600.

Both use RAF-DB's train class frequencies (surprise 1290, fear 281, disgust 717, happiness 4772,
sadness 1982, anger 705, neutral 2524, as proportions).
"""
from __future__ import annotations

import io
import json
import math
import os
import struct
import zlib
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.outputs import check_replaceable, output_lock, replacing
from pipeline.workers import default_workers, process_pool
from pipeline.data.classes import CLASSES, RAFDB_TRAIN_COUNTS, SFEW_FOLDERS
from pipeline.errors import FerError

DEFAULT_N = {"rafdb": 1500, "sfew": 600}
_LAYOUT_ID = {"rafdb": 1, "sfew": 2}
_TRAIN_FRACTION = {"rafdb": 0.8, "sfew": 0.7}
_MARKER = ".synthetic.json"
_POOL_MIN_N = 300  # below this, a pool costs more than it saves
JPEG_QUALITY = 90

#: Expression deltas from the identity's rest face, per class (index order of CLASSES).
#: Keys: brow (both ends up), inner (inner end up), arch, eye (opening), lower (lower lid up),
#: smile (corners up), open (mouth), width (mouth), lip (upper lip raise, one side), wrinkle
#: (nose), forehead (lines), glabella (lines), cheek (raise/flush).
_EXPR = {
    "surprise": dict(brow=1.0, inner=0.1, arch=0.8, eye=0.6, lower=-0.1, smile=0.0, open=1.0,
                     width=-0.35, lip=0.0, wrinkle=0.0, forehead=1.0, glabella=0.0, cheek=0.0),
    "fear": dict(brow=0.7, inner=0.6, arch=-0.4, eye=0.5, lower=0.1, smile=-0.3, open=0.45,
                 width=0.35, lip=0.0, wrinkle=0.0, forehead=0.6, glabella=0.3, cheek=0.0),
    "disgust": dict(brow=-0.5, inner=-0.3, arch=0.0, eye=-0.35, lower=0.5, smile=-0.5, open=0.12,
                    width=-0.05, lip=0.8, wrinkle=1.0, forehead=0.0, glabella=0.4, cheek=0.3),
    "happiness": dict(brow=0.1, inner=0.0, arch=0.1, eye=-0.4, lower=0.7, smile=1.0, open=0.3,
                      width=0.25, lip=0.0, wrinkle=0.1, forehead=0.0, glabella=0.0, cheek=1.0),
    "sadness": dict(brow=0.0, inner=0.8, arch=-0.2, eye=-0.3, lower=0.0, smile=-0.8, open=0.0,
                    width=-0.05, lip=0.0, wrinkle=0.0, forehead=0.3, glabella=0.3, cheek=0.0),
    "anger": dict(brow=-0.6, inner=-0.9, arch=0.0, eye=-0.2, lower=0.4, smile=-0.3, open=0.05,
                  width=-0.15, lip=0.15, wrinkle=0.4, forehead=0.0, glabella=1.0, cheek=0.0),
    "neutral": {},
}
_KEYS = ("brow", "inner", "arch", "eye", "lower", "smile", "open", "width", "lip", "wrinkle",
         "forehead", "glabella", "cheek")


# --------------------------------------------------------------------------- class counts


def class_counts(n: int) -> list[int]:
    """Split ``n`` into per-class counts proportional to RAF-DB's train distribution
    (largest remainder; every class gets at least one image when n >= 7)."""
    total = sum(RAFDB_TRAIN_COUNTS)
    exact = [n * c / total for c in RAFDB_TRAIN_COUNTS]
    counts = [int(math.floor(e)) for e in exact]
    order = sorted(range(len(exact)), key=lambda i: (-(exact[i] - counts[i]), i))
    for i in order[: n - sum(counts)]:
        counts[i] += 1
    if n >= len(counts):
        for i in range(len(counts)):
            if counts[i] == 0:  # take one from the largest class
                j = max(range(len(counts)), key=lambda k: counts[k])
                counts[j] -= 1
                counts[i] += 1
    return counts


def plan(n: int, layout: str, seed: int) -> list[tuple[int, str, int]]:
    """(label, split, index-within-split) for every image, in writing order (train then test)."""
    counts = class_counts(n)
    frac = _TRAIN_FRACTION[layout]
    rng = np.random.default_rng([seed, _LAYOUT_ID[layout], 7])
    train, test = [], []
    for label, c in enumerate(counts):
        n_train = int(round(frac * c))
        if c >= 2:
            n_train = min(max(n_train, 1), c - 1)
        train += [label] * n_train
        test += [label] * (c - n_train)
    train = [int(v) for v in rng.permutation(train)] if train else []
    test = [int(v) for v in rng.permutation(test)] if test else []
    return ([(lab, "train", i + 1) for i, lab in enumerate(train)]
            + [(lab, "test", i + 1) for i, lab in enumerate(test)])


# --------------------------------------------------------------------------- drawing


def _ellipse(cx, cy, rx, ry, n=28, t0=0.0, t1=2 * math.pi):
    t = np.linspace(t0, t1, n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


class _Face:
    """Maps face coordinates (head half-width = 1, y down) to canvas pixels and draws."""

    def __init__(self, draw: ImageDraw.ImageDraw, cx, cy, scale, rot, yaw):
        self.d = draw
        self.cx, self.cy, self.s = cx, cy, scale
        self.c, self.sn = math.cos(rot), math.sin(rot)
        self.yaw = yaw

    def px(self, pts) -> list[tuple[float, float]]:
        p = np.asarray(pts, dtype=np.float64).reshape(-1, 2)
        x = p[:, 0] * (1.0 - 0.12 * abs(self.yaw)) + self.yaw * 0.18 * (1.0 - 0.3 * p[:, 1] ** 2)
        y = p[:, 1]
        X = self.cx + self.s * (x * self.c - y * self.sn)
        Y = self.cy + self.s * (x * self.sn + y * self.c)
        return list(zip(X.tolist(), Y.tolist()))

    def w(self, units: float) -> int:
        return max(1, int(round(units * self.s)))

    def poly(self, pts, fill):
        self.d.polygon(self.px(pts), fill=fill)

    def line(self, pts, fill, width):
        self.d.line(self.px(pts), fill=fill, width=self.w(width), joint="curve")


def _mix(a, b, t):
    return tuple(int(round(a[i] * (1 - t) + b[i] * t)) for i in range(3))


def _clip(c):
    return tuple(int(min(255, max(0, v))) for v in c)


def _draw_face(rng: np.random.Generator, label: int, layout: str) -> Image.Image:
    sfew = layout == "sfew"
    out_size = 112 if sfew else 100
    S = out_size * 2
    u = rng.uniform

    # ---- background
    G = 32  # the gradient is smooth: compute it small, upsample
    lin = (np.arange(G, dtype=np.float32) + 0.5) / G - 0.5
    if sfew:
        c0 = rng.uniform(10, 90, 3)
        c1 = rng.uniform(10, 110, 3)
    else:
        c0 = rng.uniform(90, 230, 3)
        c1 = rng.uniform(70, 220, 3)
    ang = u(0, 2 * math.pi)
    t = np.clip(0.5 + lin[None, :] * math.cos(ang) + lin[:, None] * math.sin(ang), 0, 1)[..., None]
    bg = c0.astype(np.float32) + (c1 - c0).astype(np.float32) * t
    img = Image.fromarray(bg.astype(np.uint8), "RGB").resize((S, S), Image.Resampling.BILINEAR)
    d = ImageDraw.Draw(img)
    if sfew:  # clutter: props, windows, bokeh
        for _ in range(int(rng.integers(2, 7))):
            col = _clip(rng.uniform(0, 140, 3))
            x0, y0 = u(-0.2, 1.0) * S, u(-0.2, 1.0) * S
            if rng.random() < 0.5:
                d.rectangle([x0, y0, x0 + u(0.1, 0.5) * S, y0 + u(0.1, 0.6) * S], fill=col)
            else:
                r = u(0.03, 0.12) * S
                d.ellipse([x0, y0, x0 + r, y0 + r], fill=_clip(np.array(col) + 80))

    # ---- identity
    skin_t = u(0, 1)
    skin = np.array(_mix((244, 210, 186), (92, 60, 44), skin_t)) + rng.normal(0, 6, 3)
    if sfew:
        skin = skin * rng.uniform(0.75, 1.0)
    skin = _clip(skin)
    shade = _clip(np.array(skin) * 0.78)
    dark = _clip(np.array(skin) * 0.45)
    lipc = _mix(skin, (165, 62, 70), u(0.35, 0.6))
    hair_palette = [(25, 20, 18), (60, 40, 25), (110, 75, 40), (200, 170, 110), (150, 150, 150),
                    (130, 50, 25)]
    hair = _clip(np.array(hair_palette[int(rng.integers(len(hair_palette)))]) + rng.normal(0, 8, 3))
    browc = _mix(hair, (20, 15, 12), 0.4)
    iris_c = _clip(rng.choice([[60, 40, 25], [40, 30, 20], [70, 100, 140], [80, 110, 70]]))

    jaw = u(0.05, 0.35)           # how much the jaw narrows
    hh = u(1.22, 1.42)            # head half-height
    eye_y = u(-0.16, -0.06)
    eye_x = u(0.34, 0.44)
    eye_w = u(0.16, 0.21)
    eye_h0 = u(0.06, 0.085)
    brow_gap = u(0.14, 0.22)
    brow_t = u(0.035, 0.065)
    nose_y = u(0.24, 0.34)
    nose_w = u(0.12, 0.18)
    mouth_y = u(0.56, 0.66)
    mouth_w0 = u(0.24, 0.34)
    lip_t = u(0.025, 0.05)
    rest = {k: 0.0 for k in _KEYS}
    rest.update(smile=rng.normal(0, 0.15), brow=rng.normal(0, 0.15), inner=rng.normal(0, 0.12),
                eye=rng.normal(0, 0.1))

    # ---- expression
    intensity = u(0.35, 1.0)
    delta = _EXPR[CLASSES[label]]
    e = {k: rest[k] + intensity * delta.get(k, 0.0) + rng.normal(0, 0.1) for k in _KEYS}
    name = CLASSES[label]
    # class-specific variants; drawn for every class so that the same (seed, index) gives the
    # same person, pose and lighting whatever the label (only the expression changes)
    r_variant, r_open = rng.random(), u(0.3, 0.6)
    teeth = False
    if name == "happiness" and r_variant < 0.55:  # open smile
        e["open"] += r_open * intensity
        teeth = True
    if name == "anger" and r_variant < 0.3:  # snarl
        e["open"] += 0.45 * intensity
        teeth = True
    if name in ("fear", "disgust") and r_variant < 0.5:
        teeth = True
    for k in ("open", "wrinkle", "forehead", "glabella", "cheek", "lip"):
        e[k] = max(0.0, e[k])

    # ---- pose and framing
    if sfew:
        scale = S * u(0.25, 0.32)
        cx, cy = S * u(0.38, 0.62), S * u(0.36, 0.50)
        rot = math.radians(rng.normal(0, 9))
        yaw = rng.normal(0, 0.35)
    else:
        scale = S * u(0.37, 0.43)
        cx, cy = S * u(0.46, 0.54), S * u(0.44, 0.50)
        rot = math.radians(rng.normal(0, 5))
        yaw = rng.normal(0, 0.2)
    yaw = float(np.clip(yaw, -0.6, 0.6))
    f = _Face(d, cx, cy, scale, rot, yaw)

    # ---- body (sfew framing shows neck and shoulders)
    if sfew:
        cloth = _clip(rng.uniform(20, 160, 3))
        f.poly([(-2.6, 3.6), (-2.2, 1.75), (-0.5, 1.45), (0.5, 1.45), (2.2, 1.75), (2.6, 3.6)], cloth)
        f.poly([(-0.42, 0.9), (0.42, 0.9), (0.46, 1.6), (-0.46, 1.6)], shade)

    # ---- ears, head, hair
    for sgn in (-1, 1):
        f.poly(_ellipse(sgn * 0.98, eye_y + 0.12, 0.12, 0.22), shade)
    t = np.linspace(0, 2 * math.pi, 48)
    hx = np.cos(t) * (1 - jaw * np.clip(np.sin(t), 0, 1) ** 2)
    hy = hh * np.sin(t) - 0.1
    f.poly(np.stack([hx, hy], 1), skin)
    if rng.random() > 0.08:  # not bald
        hairline = u(-0.95, -0.62)
        tt = np.linspace(math.pi * 0.96, math.pi * 2.04, 24)
        outer = np.stack([1.07 * np.cos(tt), (hh + 0.12) * np.sin(tt) - 0.1], 1)
        xs = np.linspace(1.0, -1.0, 15)
        inner = np.stack([xs, hairline + 0.18 * xs ** 2 + rng.normal(0, 0.015, 15)], 1)
        side = u(0.0, 0.45)  # sideburn / long hair length
        f.poly(np.concatenate([[(-1.07, side)], outer, [(1.07, side)], inner]), hair)

    # ---- cheeks (raised and flushed in happiness)
    if e["cheek"] > 0.05:
        cc = _mix(skin, (215, 95, 95), min(0.35, 0.25 * e["cheek"]))
        for sgn in (-1, 1):
            f.poly(_ellipse(sgn * 0.47, nose_y + 0.05 - 0.05 * e["cheek"], 0.2, 0.13), cc)

    # ---- forehead and glabella lines
    if e["forehead"] > 0.3:
        for k in range(int(min(3, 1 + e["forehead"] * 2))):
            y = eye_y - 0.48 - 0.09 * k - 0.05 * e["brow"]
            xs = np.linspace(-0.42, 0.42, 9)
            f.line(np.stack([xs, y + 0.04 * (xs / 0.42) ** 2], 1), shade, 0.018)
    if e["glabella"] > 0.3:
        for sgn in (-1, 1):
            f.line([(sgn * 0.045, eye_y - 0.22), (sgn * 0.06, eye_y - 0.08)], shade, 0.02 + 0.01 * e["glabella"])

    # ---- eyes
    open_ = float(np.clip(1.0 + e["eye"], 0.25, 1.9))
    lower = float(np.clip(e["lower"], -0.3, 1.0))
    gaze = rng.normal(0, 0.02, 2)
    eyes_hidden = False
    for sgn in (-1, 1):
        ex, ey = sgn * eye_x, eye_y
        up_h = eye_h0 * open_
        lo_h = eye_h0 * 0.8 * (1.0 - 0.6 * lower)
        tt = np.linspace(0, math.pi, 12)
        upper = np.stack([ex + eye_w * np.cos(tt), ey - up_h * np.sin(tt)], 1)
        lowr = np.stack([ex - eye_w * np.cos(tt), ey + lo_h * np.sin(tt)], 1)
        f.poly(np.concatenate([upper, lowr]), (238, 236, 230))
        ir = min(0.075, 0.95 * (up_h + lo_h) / 2 + 0.01)
        icy = ey + (lo_h - up_h) / 2 * 0.5 + gaze[1]
        irx = 0.075 if up_h > 0.075 else 0.07
        f.poly(_ellipse(ex + gaze[0], icy, irx, ir, 16), iris_c)
        f.poly(_ellipse(ex + gaze[0], icy, 0.03, min(0.03, ir), 10), (10, 10, 10))
        f.line(upper, dark, 0.028)  # upper lid
        f.line(lowr, shade, 0.014)
        if lower > 0.35:  # cheek push under the eye
            f.line(np.stack([ex - eye_w * 0.8 * np.cos(tt), ey + lo_h + 0.05 + 0.02 * np.sin(tt)], 1), shade, 0.012)

    # ---- brows
    for sgn in (-1, 1):
        by = eye_y - 0.2 - 0.11 * e["brow"]
        inner_y = by - 0.09 * e["inner"]
        outer_y = by + 0.03 * e["inner"] - 0.02 * e["brow"]
        mid_y = (inner_y + outer_y) / 2 - 0.06 * (1 + e["arch"])
        xi, xo = sgn * (brow_gap / 2 + 0.06 - 0.04 * max(0.0, -e["inner"])), sgn * (eye_x + eye_w + 0.05)
        xm = (xi + xo) / 2
        tt = np.linspace(0, 1, 9)
        bx = (1 - tt) ** 2 * xi + 2 * (1 - tt) * tt * xm + tt ** 2 * xo
        by_ = (1 - tt) ** 2 * inner_y + 2 * (1 - tt) * tt * mid_y + tt ** 2 * outer_y
        f.line(np.stack([bx, by_], 1), browc, brow_t)

    # ---- nose
    nw = nose_w * (1 + 0.25 * max(e["wrinkle"], 0))
    f.line([(-0.05, eye_y + 0.05), (-0.07, nose_y - 0.05)], shade, 0.015)
    f.line(_ellipse(0, nose_y - 0.02, nw, 0.07, 12, 0.15 * math.pi, 0.85 * math.pi), dark, 0.02)
    for sgn in (-1, 1):
        f.poly(_ellipse(sgn * nw * 0.45, nose_y + 0.02, 0.035, 0.02, 10), dark)
    if e["wrinkle"] > 0.3:
        for k in range(int(min(3, 1 + 2 * e["wrinkle"]))):
            y = eye_y + 0.06 + 0.06 * k
            f.line([(-0.1, y), (0.0, y - 0.02), (0.1, y)], dark, 0.016)

    # ---- mouth
    mw = mouth_w0 * float(np.clip(1 + e["width"], 0.5, 1.6))
    smile = float(np.clip(e["smile"], -1.2, 1.3))
    op = float(np.clip(e["open"], 0.0, 1.4))
    s = np.linspace(-1, 1, 17)
    yc = mouth_y - 0.12 * smile * s ** 2 + 0.04 * smile
    if CLASSES[label] == "surprise":
        shape = np.sqrt(np.clip(1 - s ** 2, 0, 1))  # round O
    elif CLASSES[label] == "fear":
        shape = np.sqrt(np.clip(1 - s ** 4, 0, 1))  # stretched rectangle
    else:
        shape = np.clip(1 - s ** 2, 0, 1) ** 0.7
    lip_raise = e["lip"] * 0.08 * np.clip(s + 0.3, 0, 1.3)  # one-sided upper lip raise
    up = yc - 0.02 - 0.11 * op * shape - lip_raise * shape ** 0.3
    lo = yc + 0.02 + 0.16 * op * shape
    xs = mw * s
    if op > 0.12:
        f.poly(np.concatenate([np.stack([xs, up], 1), np.stack([xs[::-1], lo[::-1]], 1)]), (60, 20, 25))
        if teeth:
            tb = np.minimum(up + 0.05 + 0.03 * op, lo)
            f.poly(np.concatenate([np.stack([xs * 0.9, up], 1), np.stack([xs[::-1] * 0.9, tb[::-1]], 1)]), (235, 232, 220))
        f.line(np.stack([xs, up], 1), lipc, lip_t * 1.2)
        f.line(np.stack([xs, lo], 1), lipc, lip_t * 1.6)
    else:
        if CLASSES[label] == "sadness":  # lower lip pushed up
            f.line(np.stack([xs * 0.6, lo + 0.03 - 0.02 * np.clip(e["smile"], -1, 0)], 1), lipc, lip_t * 1.5)
        f.line(np.stack([xs, up - 0.01], 1), lipc, lip_t * (1.0 if name != "anger" else 0.6))
        f.line(np.stack([xs, (up + lo) / 2], 1), (90, 35, 40), 0.018)
        f.line(np.stack([xs, lo + 0.01], 1), lipc, lip_t * (1.3 if name != "anger" else 0.7))
    if abs(smile) > 0.4 or e["lip"] > 0.4:  # nasolabial folds
        for sgn in (-1, 1):
            f.line([(sgn * (nw + 0.05), nose_y), (sgn * (mw + 0.06), yc[0] - 0.05 * np.sign(smile))],
                   shade, 0.016)

    # ---- accessories
    if rng.random() < 0.12:  # moustache
        f.poly([(-mw - 0.02, mouth_y - 0.06), (0, mouth_y - 0.13), (mw + 0.02, mouth_y - 0.06),
                (mw, mouth_y - 0.03), (0, mouth_y - 0.07), (-mw, mouth_y - 0.03)], hair)
    if rng.random() < 0.15:  # glasses
        gc = _clip(rng.uniform(0, 120, 3))
        for sgn in (-1, 1):
            f.line(_ellipse(sgn * eye_x, eye_y, eye_w + 0.07, 0.13, 20), gc, 0.022)
        f.line([(-eye_x + eye_w + 0.07, eye_y), (eye_x - eye_w - 0.07, eye_y)], gc, 0.022)

    # ---- occlusion
    if rng.random() < (0.3 if sfew else 0.2):
        kind = int(rng.integers(4))
        if kind == 0:  # hand / fingers from below
            hx0 = u(-0.9, 0.9)
            f.poly(_ellipse(hx0, u(0.9, 1.3), u(0.3, 0.5), u(0.35, 0.55)), _clip(np.array(skin) * u(0.9, 1.1)))
        elif kind == 1 and not eyes_hidden:  # sunglasses
            for sgn in (-1, 1):
                f.poly(_ellipse(sgn * eye_x, eye_y, eye_w + 0.06, 0.12, 16), (15, 15, 20))
            f.line([(-eye_x, eye_y), (eye_x, eye_y)], (15, 15, 20), 0.03)
        elif kind == 2:  # hair strand across one side
            sgn = rng.choice([-1, 1])
            f.poly([(sgn * 0.15, -1.3), (sgn * 1.1, -1.1), (sgn * 1.0, u(0.0, 0.8)), (sgn * u(0.3, 0.7), u(-0.2, 0.4))], hair)
        else:  # an object entering from an edge
            col = _clip(rng.uniform(0, 255, 3))
            x0 = u(-1.6, 0.6)
            y0 = u(-1.2, 0.8)
            f.poly([(x0, y0), (x0 + u(0.4, 1.0), y0), (x0 + u(0.4, 1.0), y0 + u(0.3, 0.8)), (x0, y0 + u(0.3, 0.8))], col)

    # ---- finish: downsample, light, blur, noise
    img = img.resize((out_size, out_size), Image.Resampling.BILINEAR, reducing_gap=None)
    blur = u(0.0, 1.1) if sfew else u(0.0, 0.6)
    if blur > 0.25:
        img = img.filter(ImageFilter.GaussianBlur(blur))
    # float64 from here on: the power (gamma) is the one transcendental step whose result is
    # rounded to 8 bits, and numpy picks its kernel by CPU (AVX-512 has its own, a few ULP away
    # from the baseline one). In float32, 1-2 ULP flip about 1 pixel in 10^5 after rounding
    # (simulated; up to a third of the images); in float64 they sit ~10^-13 below the rounding.
    a = np.asarray(img, dtype=np.float64) / 255.0
    lin = np.linspace(-1.0, 1.0, out_size)
    ang = u(0, 2 * math.pi)
    strength = u(0.0, 0.6) if sfew else u(0.0, 0.3)
    light = 1.0 + strength * (math.cos(ang) * lin[None, :] + math.sin(ang) * lin[:, None])
    gain = u(0.62, 1.05) if sfew else u(0.85, 1.15)
    a = a * (light * gain)[..., None]
    if sfew:  # colour cast: tungsten / teal / none
        cast = [np.array([1.12, 1.0, 0.82]), np.array([0.85, 1.02, 1.12]), np.ones(3)][int(rng.integers(3))]
        a = a * cast
        a = 0.08 + 0.84 * a  # lifted blacks, lower contrast
    gamma = u(0.85, 1.2)
    a = np.clip(a, 0, 1) ** gamma
    sigma = (u(3, 10) if sfew else u(1, 6)) / 255.0
    # drawn as float32 (the draws the set was first made with: the same faces as before),
    # added in float64
    a = a + rng.standard_normal(a.shape, dtype=np.float32).astype(np.float64) * sigma
    return Image.fromarray(np.floor(np.clip(a, 0, 1) * 255 + 0.5).astype(np.uint8), "RGB")


def _png(img: Image.Image) -> bytes:
    """``img`` (RGB) as a PNG whose bytes depend on the pixels only: filter 0 and *stored*
    (uncompressed) deflate blocks, written here. A compressor's output is not fixed by its
    format: zlib and zlib-ng (Pillow's) differ, and zlib-ng does not promise the same bytes
    across versions or CPUs. Costs ~1.5x the size of a compressed PNG; any PNG reader reads it."""
    w, h = img.size
    px = np.asarray(img.convert("RGB"), dtype=np.uint8).reshape(h, w * 3)
    raw = np.concatenate([np.zeros((h, 1), np.uint8), px], axis=1).tobytes()  # filter byte 0
    blocks = [b"\x78\x01"]  # zlib header: deflate, 32K window, no dictionary
    for i in range(0, len(raw), 0xFFFF):
        part = raw[i:i + 0xFFFF]
        last = int(i + 0xFFFF >= len(raw))
        blocks.append(struct.pack("<BHH", last, len(part), len(part) ^ 0xFFFF) + part)
    blocks.append(struct.pack(">I", zlib.adler32(raw)))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, 2, 0, 0, 0))
            + chunk(b"IDAT", b"".join(blocks)) + chunk(b"IEND", b""))


def render(label: int, layout: str = "rafdb", seed: int = 0, index: int = 0) -> bytes:
    """The encoded bytes (JPEG for rafdb, PNG for sfew) of one synthetic face."""
    rng = np.random.default_rng([seed, _LAYOUT_ID[layout], index])
    img = _draw_face(rng, label, layout)
    if layout == "sfew":
        return _png(img)
    buf = io.BytesIO()  # libjpeg-turbo: integer DCT, the same bytes with or without its SIMD
    img.save(buf, format="JPEG", quality=JPEG_QUALITY, subsampling=0, optimize=False,
             progressive=False)
    return buf.getvalue()


# --------------------------------------------------------------------------- writing


def _relpath(layout: str, label: int, split: str, k: int) -> str:
    if layout == "rafdb":
        return f"Image/aligned/{split}_{k:05d}_aligned.jpg"
    top = "Train" if split == "train" else "Val"
    return f"{top}/{top}_Aligned_Faces/{SFEW_FOLDERS[label]}/sfew_{split}_{k:05d}.png"


def _write_chunk(args) -> int:
    root, layout, seed, jobs = args
    for index, label, rel in jobs:
        p = os.path.join(root, rel)
        with open(p, "wb") as fh:
            fh.write(render(label, layout, seed, index))
    return len(jobs)


def write_synthetic(out: str | os.PathLike, layout: str = "rafdb", n: int | None = None,
                    seed: int = 0, workers: int | None = None) -> dict:
    """Write ``n`` synthetic faces at ``out`` in the real ``layout`` ("rafdb" or "sfew").

    The folder is written next to ``out`` and renamed into place at the end. An existing
    ``out`` is replaced only if it is empty or a previous synthetic set (it holds the
    ``.synthetic.json`` marker); anything else is an error. Returns a summary dict with
    ``counts`` (split -> class name -> images).
    """
    if layout not in DEFAULT_N:
        raise FerError(f"unknown synthetic layout {layout!r}; use 'rafdb' or 'sfew'")
    n = DEFAULT_N[layout] if n is None else n
    if isinstance(n, bool) or not isinstance(n, int) or n < 1:
        raise FerError(f"n = {n!r}: the number of images must be an integer >= 1")
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise FerError(f"seed = {seed!r}: must be an integer")
    out = Path(out)
    check_replaceable(out, what="fer synth", markers=(_MARKER,))
    try:
        with output_lock(out, "the synthetic set"):
            check_replaceable(out, what="fer synth", markers=(_MARKER,))
            return _write(out, layout, n, seed, workers)
    except OSError as e:
        raise FerError(f"cannot write the synthetic set at {out}: {e}") from e


def _write(out: Path, layout: str, n: int, seed: int, workers: int | None) -> dict:
    items = plan(n, layout, seed)
    jobs = [(i, lab, _relpath(layout, lab, split, k)) for i, (lab, split, k) in enumerate(items)]
    counts: dict[str, dict[str, int]] = {"train": {c: 0 for c in CLASSES}, "test": {c: 0 for c in CLASSES}}
    for lab, split, _ in items:
        counts[split][CLASSES[lab]] += 1

    with replacing(out) as tmp:
        for d in sorted({os.path.dirname(rel) for _, _, rel in jobs}):
            (tmp / d).mkdir(parents=True, exist_ok=True)
        if layout == "rafdb":
            (tmp / "EmoLabel").mkdir()
            lines = [f"{split}_{k:05d}.jpg {lab + 1}\n" for lab, split, k in items]
            (tmp / "EmoLabel" / "list_patition_label.txt").write_text("".join(lines))
        else:
            for top in ("Train/Train_Aligned_Faces", "Val/Val_Aligned_Faces"):
                for folder in SFEW_FOLDERS:
                    (tmp / top / folder).mkdir(parents=True, exist_ok=True)
        workers = min(default_workers(workers), 8)
        chunks = [jobs[i:i + 64] for i in range(0, len(jobs), 64)]
        if workers > 1 and n >= _POOL_MIN_N:
            with process_pool(workers) as ex:
                list(ex.map(_write_chunk, [(str(tmp), layout, seed, c) for c in chunks]))
        else:
            for c in chunks:
                _write_chunk((str(tmp), layout, seed, c))
        summary = {"layout": layout, "n": n, "seed": seed, "counts": counts}
        (tmp / _MARKER).write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    summary["path"] = str(out)
    return summary
