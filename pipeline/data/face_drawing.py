"""One synthetic face, drawn: the expression cues and the nuisances that make the set learnable
but not trivial.

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

The face is drawn part by part (the functions below, called by :func:`draw_face` in painting
order), all from the image's one generator. The order of the draws is the data set: a draw
moved from one part to another, added, or made conditional on something it was not, shifts
every number after it, and every image changes. So a part draws the same numbers whatever it
then paints (class variants are drawn for every class), and a new part draws after the others.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

from pipeline.data.classes import CLASSES

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
_HAIR_PALETTE = [(25, 20, 18), (60, 40, 25), (110, 75, 40), (200, 170, 110), (150, 150, 150),
                 (130, 50, 25)]


def _ellipse(cx, cy, rx, ry, n=28, t0=0.0, t1=2 * math.pi):
    t = np.linspace(t0, t1, n)
    return np.stack([cx + rx * np.cos(t), cy + ry * np.sin(t)], 1)


def _mix(a, b, t):
    return tuple(int(round(a[i] * (1 - t) + b[i] * t)) for i in range(3))


def _clip(c):
    return tuple(int(min(255, max(0, v))) for v in c)


class FacePainter:
    """Maps face coordinates (head half-width = 1, y down) to canvas pixels and draws. Every
    polygon and line of a face goes through :meth:`poly` and :meth:`line`, so a subclass sees
    the whole drawing (the face benchmark records its landmarks that way)."""

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


@dataclass(frozen=True)
class Identity:
    """Who is drawn: colours and feature geometry (face units), and the rest expression. The
    same ``(seed, index)`` gives the same identity under every label."""
    skin: tuple
    shade: tuple
    dark: tuple
    lipc: tuple
    hair: tuple
    browc: tuple
    iris_c: tuple
    jaw: float        # how much the jaw narrows
    hh: float         # head half-height
    eye_y: float
    eye_x: float
    eye_w: float
    eye_h0: float
    brow_gap: float
    brow_t: float
    nose_y: float
    nose_w: float
    mouth_y: float
    mouth_w0: float
    lip_t: float
    rest: dict


def draw_face(rng: np.random.Generator, label: int, layout: str,
              painter: type[FacePainter] = FacePainter) -> Image.Image:
    """The face of class ``label`` in ``layout``'s domain (``"sfew"``: a movie still, else a
    tight RAF-DB crop), every random number from ``rng``, drawn through ``painter``."""
    sfew = layout == "sfew"
    out_size = 112 if sfew else 100
    S = out_size * 2
    img = _background(rng, S, sfew)
    d = ImageDraw.Draw(img)
    if sfew:
        _clutter(rng, d, S)
    who = _identity(rng, sfew)
    e, teeth = _expression(rng, label, who.rest)
    f = _pose(rng, d, S, sfew, painter)
    if sfew:
        _body(rng, f, who)
    _head_and_hair(rng, f, who)
    _cheeks(f, who, e)
    _forehead_and_glabella_lines(f, who, e)
    _eyes(rng, f, who, e)
    _brows(f, who, e)
    nw = _nose(f, who, e)
    mw = _mouth(f, who, e, CLASSES[label], teeth, nw)
    _accessories(rng, f, who, mw)
    _occlusion(rng, f, who, sfew)
    return _finish(rng, img, out_size, sfew)


# --------------------------------------------------------------------------- scene


def _background(rng: np.random.Generator, S: int, sfew: bool) -> Image.Image:
    """A two-colour gradient at any angle (computed small: it is smooth), ``S`` pixels square."""
    G = 32
    lin = (np.arange(G, dtype=np.float32) + 0.5) / G - 0.5
    if sfew:
        c0 = rng.uniform(10, 90, 3)
        c1 = rng.uniform(10, 110, 3)
    else:
        c0 = rng.uniform(90, 230, 3)
        c1 = rng.uniform(70, 220, 3)
    ang = rng.uniform(0, 2 * math.pi)
    t = np.clip(0.5 + lin[None, :] * math.cos(ang) + lin[:, None] * math.sin(ang), 0, 1)[..., None]
    bg = c0.astype(np.float32) + (c1 - c0).astype(np.float32) * t
    return Image.fromarray(bg.astype(np.uint8), "RGB").resize((S, S), Image.Resampling.BILINEAR)


def _clutter(rng: np.random.Generator, d: ImageDraw.ImageDraw, S: int) -> None:
    """The movie-still domain's props, windows and bokeh behind the face."""
    u = rng.uniform
    for _ in range(int(rng.integers(2, 7))):
        col = _clip(rng.uniform(0, 140, 3))
        x0, y0 = u(-0.2, 1.0) * S, u(-0.2, 1.0) * S
        if rng.random() < 0.5:
            d.rectangle([x0, y0, x0 + u(0.1, 0.5) * S, y0 + u(0.1, 0.6) * S], fill=col)
        else:
            r = u(0.03, 0.12) * S
            d.ellipse([x0, y0, x0 + r, y0 + r], fill=_clip(np.array(col) + 80))


def _identity(rng: np.random.Generator, sfew: bool) -> Identity:
    u = rng.uniform
    skin_t = u(0, 1)
    skin = np.array(_mix((244, 210, 186), (92, 60, 44), skin_t)) + rng.normal(0, 6, 3)
    if sfew:
        skin = skin * rng.uniform(0.75, 1.0)
    skin = _clip(skin)
    lipc = _mix(skin, (165, 62, 70), u(0.35, 0.6))
    hair = _clip(np.array(_HAIR_PALETTE[int(rng.integers(len(_HAIR_PALETTE)))]) + rng.normal(0, 8, 3))
    iris_c = _clip(rng.choice([[60, 40, 25], [40, 30, 20], [70, 100, 140], [80, 110, 70]]))
    # keyword arguments are evaluated in the order written: the order of the draws
    geometry = dict(jaw=u(0.05, 0.35), hh=u(1.22, 1.42), eye_y=u(-0.16, -0.06), eye_x=u(0.34, 0.44),
                    eye_w=u(0.16, 0.21), eye_h0=u(0.06, 0.085), brow_gap=u(0.14, 0.22),
                    brow_t=u(0.035, 0.065), nose_y=u(0.24, 0.34), nose_w=u(0.12, 0.18),
                    mouth_y=u(0.56, 0.66), mouth_w0=u(0.24, 0.34), lip_t=u(0.025, 0.05))
    rest = {k: 0.0 for k in _KEYS}
    rest.update(smile=rng.normal(0, 0.15), brow=rng.normal(0, 0.15), inner=rng.normal(0, 0.12),
                eye=rng.normal(0, 0.1))
    return Identity(skin=skin, shade=_clip(np.array(skin) * 0.78), dark=_clip(np.array(skin) * 0.45),
                    lipc=lipc, hair=hair, browc=_mix(hair, (20, 15, 12), 0.4), iris_c=iris_c,
                    rest=rest, **geometry)


def _expression(rng: np.random.Generator, label: int, rest: dict) -> tuple[dict, bool]:
    """The expression's feature values (``_KEYS``) and whether teeth show."""
    intensity = rng.uniform(0.35, 1.0)
    delta = _EXPR[CLASSES[label]]
    e = {k: rest[k] + intensity * delta.get(k, 0.0) + rng.normal(0, 0.1) for k in _KEYS}
    name = CLASSES[label]
    # class-specific variants; drawn for every class so that the same (seed, index) gives the
    # same person, pose and lighting whatever the label (only the expression changes)
    r_variant, r_open = rng.random(), rng.uniform(0.3, 0.6)
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
    return e, teeth


def _pose(rng: np.random.Generator, d: ImageDraw.ImageDraw, S: int, sfew: bool,
          painter: type[FacePainter]) -> FacePainter:
    """Framing (scale, centre) and head pose (roll, yaw): a painter placed on the canvas."""
    u = rng.uniform
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
    return painter(d, cx, cy, scale, rot, yaw)


def _body(rng: np.random.Generator, f: FacePainter, who: Identity) -> None:
    """Neck and shoulders (the movie-still framing shows them)."""
    cloth = _clip(rng.uniform(20, 160, 3))
    f.poly([(-2.6, 3.6), (-2.2, 1.75), (-0.5, 1.45), (0.5, 1.45), (2.2, 1.75), (2.6, 3.6)], cloth)
    f.poly([(-0.42, 0.9), (0.42, 0.9), (0.46, 1.6), (-0.46, 1.6)], who.shade)


# --------------------------------------------------------------------------- the face


def _head_and_hair(rng: np.random.Generator, f: FacePainter, who: Identity) -> None:
    u = rng.uniform
    for sgn in (-1, 1):  # ears
        f.poly(_ellipse(sgn * 0.98, who.eye_y + 0.12, 0.12, 0.22), who.shade)
    t = np.linspace(0, 2 * math.pi, 48)
    hx = np.cos(t) * (1 - who.jaw * np.clip(np.sin(t), 0, 1) ** 2)
    hy = who.hh * np.sin(t) - 0.1
    f.poly(np.stack([hx, hy], 1), who.skin)
    if rng.random() > 0.08:  # not bald
        hairline = u(-0.95, -0.62)
        tt = np.linspace(math.pi * 0.96, math.pi * 2.04, 24)
        outer = np.stack([1.07 * np.cos(tt), (who.hh + 0.12) * np.sin(tt) - 0.1], 1)
        xs = np.linspace(1.0, -1.0, 15)
        inner = np.stack([xs, hairline + 0.18 * xs ** 2 + rng.normal(0, 0.015, 15)], 1)
        side = u(0.0, 0.45)  # sideburn / long hair length
        f.poly(np.concatenate([[(-1.07, side)], outer, [(1.07, side)], inner]), who.hair)


def _cheeks(f: FacePainter, who: Identity, e: dict) -> None:
    """Raised and flushed (happiness)."""
    if e["cheek"] > 0.05:
        cc = _mix(who.skin, (215, 95, 95), min(0.35, 0.25 * e["cheek"]))
        for sgn in (-1, 1):
            f.poly(_ellipse(sgn * 0.47, who.nose_y + 0.05 - 0.05 * e["cheek"], 0.2, 0.13), cc)


def _forehead_and_glabella_lines(f: FacePainter, who: Identity, e: dict) -> None:
    if e["forehead"] > 0.3:
        for k in range(int(min(3, 1 + e["forehead"] * 2))):
            y = who.eye_y - 0.48 - 0.09 * k - 0.05 * e["brow"]
            xs = np.linspace(-0.42, 0.42, 9)
            f.line(np.stack([xs, y + 0.04 * (xs / 0.42) ** 2], 1), who.shade, 0.018)
    if e["glabella"] > 0.3:
        for sgn in (-1, 1):
            f.line([(sgn * 0.045, who.eye_y - 0.22), (sgn * 0.06, who.eye_y - 0.08)], who.shade,
                   0.02 + 0.01 * e["glabella"])


def _eyes(rng: np.random.Generator, f: FacePainter, who: Identity, e: dict) -> None:
    """Whites, iris and pupil (10-point black polygons: facebench finds the eyes by them), lids."""
    eye_w, eye_h0 = who.eye_w, who.eye_h0
    open_ = float(np.clip(1.0 + e["eye"], 0.25, 1.9))
    lower = float(np.clip(e["lower"], -0.3, 1.0))
    gaze = rng.normal(0, 0.02, 2)
    for sgn in (-1, 1):
        ex, ey = sgn * who.eye_x, who.eye_y
        up_h = eye_h0 * open_
        lo_h = eye_h0 * 0.8 * (1.0 - 0.6 * lower)
        tt = np.linspace(0, math.pi, 12)
        upper = np.stack([ex + eye_w * np.cos(tt), ey - up_h * np.sin(tt)], 1)
        lowr = np.stack([ex - eye_w * np.cos(tt), ey + lo_h * np.sin(tt)], 1)
        f.poly(np.concatenate([upper, lowr]), (238, 236, 230))
        ir = min(0.075, 0.95 * (up_h + lo_h) / 2 + 0.01)
        icy = ey + (lo_h - up_h) / 2 * 0.5 + gaze[1]
        irx = 0.075 if up_h > 0.075 else 0.07
        f.poly(_ellipse(ex + gaze[0], icy, irx, ir, 16), who.iris_c)
        f.poly(_ellipse(ex + gaze[0], icy, 0.03, min(0.03, ir), 10), (10, 10, 10))
        f.line(upper, who.dark, 0.028)  # upper lid
        f.line(lowr, who.shade, 0.014)
        if lower > 0.35:  # cheek push under the eye
            f.line(np.stack([ex - eye_w * 0.8 * np.cos(tt), ey + lo_h + 0.05 + 0.02 * np.sin(tt)], 1),
                   who.shade, 0.012)


def _brows(f: FacePainter, who: Identity, e: dict) -> None:
    """Quadratic curves from the inner end through a raised middle (arch) to the outer end."""
    for sgn in (-1, 1):
        by = who.eye_y - 0.2 - 0.11 * e["brow"]
        inner_y = by - 0.09 * e["inner"]
        outer_y = by + 0.03 * e["inner"] - 0.02 * e["brow"]
        mid_y = (inner_y + outer_y) / 2 - 0.06 * (1 + e["arch"])
        xi = sgn * (who.brow_gap / 2 + 0.06 - 0.04 * max(0.0, -e["inner"]))
        xo = sgn * (who.eye_x + who.eye_w + 0.05)
        xm = (xi + xo) / 2
        tt = np.linspace(0, 1, 9)
        bx = (1 - tt) ** 2 * xi + 2 * (1 - tt) * tt * xm + tt ** 2 * xo
        by_ = (1 - tt) ** 2 * inner_y + 2 * (1 - tt) * tt * mid_y + tt ** 2 * outer_y
        f.line(np.stack([bx, by_], 1), who.browc, who.brow_t)


def _nose(f: FacePainter, who: Identity, e: dict) -> float:
    """Bridge, tip and nostrils (the last 10-point polygons but the pupils: facebench's nose),
    wrinkles; returns the nose half-width, where the nasolabial folds start."""
    eye_y, nose_y = who.eye_y, who.nose_y
    nw = who.nose_w * (1 + 0.25 * max(e["wrinkle"], 0))
    f.line([(-0.05, eye_y + 0.05), (-0.07, nose_y - 0.05)], who.shade, 0.015)
    f.line(_ellipse(0, nose_y - 0.02, nw, 0.07, 12, 0.15 * math.pi, 0.85 * math.pi), who.dark, 0.02)
    for sgn in (-1, 1):
        f.poly(_ellipse(sgn * nw * 0.45, nose_y + 0.02, 0.035, 0.02, 10), who.dark)
    if e["wrinkle"] > 0.3:
        for k in range(int(min(3, 1 + 2 * e["wrinkle"]))):
            y = eye_y + 0.06 + 0.06 * k
            f.line([(-0.1, y), (0.0, y - 0.02), (0.1, y)], who.dark, 0.016)
    return nw


def _mouth(f: FacePainter, who: Identity, e: dict, name: str, teeth: bool, nw: float) -> float:
    """Lips (17 points; the first 17-point line is the upper lip, whose ends facebench takes as
    the mouth corners), the open mouth and teeth, nasolabial folds; returns the mouth
    half-width (the moustache's)."""
    lipc, lip_t = who.lipc, who.lip_t
    mw = who.mouth_w0 * float(np.clip(1 + e["width"], 0.5, 1.6))
    smile = float(np.clip(e["smile"], -1.2, 1.3))
    op = float(np.clip(e["open"], 0.0, 1.4))
    s = np.linspace(-1, 1, 17)
    yc = who.mouth_y - 0.12 * smile * s ** 2 + 0.04 * smile
    if name == "surprise":
        shape = np.sqrt(np.clip(1 - s ** 2, 0, 1))  # round O
    elif name == "fear":
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
            f.poly(np.concatenate([np.stack([xs * 0.9, up], 1), np.stack([xs[::-1] * 0.9, tb[::-1]], 1)]),
                   (235, 232, 220))
        f.line(np.stack([xs, up], 1), lipc, lip_t * 1.2)
        f.line(np.stack([xs, lo], 1), lipc, lip_t * 1.6)
    else:
        if name == "sadness":  # lower lip pushed up
            f.line(np.stack([xs * 0.6, lo + 0.03 - 0.02 * np.clip(e["smile"], -1, 0)], 1), lipc, lip_t * 1.5)
        f.line(np.stack([xs, up - 0.01], 1), lipc, lip_t * (1.0 if name != "anger" else 0.6))
        f.line(np.stack([xs, (up + lo) / 2], 1), (90, 35, 40), 0.018)
        f.line(np.stack([xs, lo + 0.01], 1), lipc, lip_t * (1.3 if name != "anger" else 0.7))
    if abs(smile) > 0.4 or e["lip"] > 0.4:  # nasolabial folds
        for sgn in (-1, 1):
            f.line([(sgn * (nw + 0.05), who.nose_y), (sgn * (mw + 0.06), yc[0] - 0.05 * np.sign(smile))],
                   who.shade, 0.016)
    return mw


# --------------------------------------------------------------------------- on and over the face


def _accessories(rng: np.random.Generator, f: FacePainter, who: Identity, mw: float) -> None:
    """A moustache, glasses."""
    eye_x, eye_y, eye_w, mouth_y = who.eye_x, who.eye_y, who.eye_w, who.mouth_y
    if rng.random() < 0.12:  # moustache
        f.poly([(-mw - 0.02, mouth_y - 0.06), (0, mouth_y - 0.13), (mw + 0.02, mouth_y - 0.06),
                (mw, mouth_y - 0.03), (0, mouth_y - 0.07), (-mw, mouth_y - 0.03)], who.hair)
    if rng.random() < 0.15:  # glasses
        gc = _clip(rng.uniform(0, 120, 3))
        for sgn in (-1, 1):
            f.line(_ellipse(sgn * eye_x, eye_y, eye_w + 0.07, 0.13, 20), gc, 0.022)
        f.line([(-eye_x + eye_w + 0.07, eye_y), (eye_x - eye_w - 0.07, eye_y)], gc, 0.022)


def _occlusion(rng: np.random.Generator, f: FacePainter, who: Identity, sfew: bool) -> None:
    """Sometimes one thing in front of the face: a hand, sunglasses, a hair strand, an object."""
    u = rng.uniform
    eye_x, eye_y, eye_w = who.eye_x, who.eye_y, who.eye_w
    if rng.random() < (0.3 if sfew else 0.2):
        kind = int(rng.integers(4))
        if kind == 0:  # hand / fingers from below
            hx0 = u(-0.9, 0.9)
            f.poly(_ellipse(hx0, u(0.9, 1.3), u(0.3, 0.5), u(0.35, 0.55)), _clip(np.array(who.skin) * u(0.9, 1.1)))
        elif kind == 1:  # sunglasses
            for sgn in (-1, 1):
                f.poly(_ellipse(sgn * eye_x, eye_y, eye_w + 0.06, 0.12, 16), (15, 15, 20))
            f.line([(-eye_x, eye_y), (eye_x, eye_y)], (15, 15, 20), 0.03)
        elif kind == 2:  # hair strand across one side
            sgn = rng.choice([-1, 1])
            f.poly([(sgn * 0.15, -1.3), (sgn * 1.1, -1.1), (sgn * 1.0, u(0.0, 0.8)),
                    (sgn * u(0.3, 0.7), u(-0.2, 0.4))], who.hair)
        else:  # an object entering from an edge
            col = _clip(rng.uniform(0, 255, 3))
            x0 = u(-1.6, 0.6)
            y0 = u(-1.2, 0.8)
            f.poly([(x0, y0), (x0 + u(0.4, 1.0), y0), (x0 + u(0.4, 1.0), y0 + u(0.3, 0.8)),
                    (x0, y0 + u(0.3, 0.8))], col)


def _finish(rng: np.random.Generator, img: Image.Image, out_size: int, sfew: bool) -> Image.Image:
    """The camera: downsample, blur, directional light, gain, colour cast, gamma, sensor noise."""
    u = rng.uniform
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
