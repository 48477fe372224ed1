"""Drawing the synthetic catalogue's products (see :mod:`kaleido_bert.data.synth`): silhouettes as lists of
:class:`Op` polygons, lines and dots in unit coordinates, patterns clipped to the garment, and one view rendered
as an RGB image (supersampled, on a near-white background) with the pixel boxes of every named part.
"""

from __future__ import annotations

import io
import itertools
import math
import random
from typing import Any, NamedTuple

import numpy as np
from PIL import Image, ImageDraw

from kaleido_bert.data.synth_vocabulary import (
    DETAILS,
    FIT_SCALE,
    HEMS,
    JPEG_QUALITY,
    RGB,
    ROLES,
    SUPERSAMPLE,
    Pt,
    Spec,
)


class Op(NamedTuple):
    """One drawing primitive in unit object coordinates; ``tag`` names the attribute whose box it extends."""

    kind: str  # "fabric" (colour + pattern, clipped to the polygon), "poly", "line" or "dot"
    pts: list[Pt]
    fill: Any = "base"  # an RGB or a role: base, trim, contrast, dark, metal, inner, sole, rubber, s<k>
    tag: str | None = None
    width: float = 0.0  # line width or dot radius (unit coordinates)
    when: str | None = None  # "a|b": drawn if detail a or b is chosen, "!a": if a is not (default: the tag)


def _mix(a: RGB, b: RGB, t: float) -> RGB:
    return tuple(int(x + (y - x) * t) for x, y in zip(a, b, strict=True))  # type: ignore[return-value]


def tone(c: RGB, k: float) -> RGB:
    """Darker (k < 1, towards black) or lighter (k > 1, towards white) version of a colour."""
    return _mix(c, (0, 0, 0), 1 - k) if k < 1 else _mix(c, (255, 255, 255), k - 1)


def _ell(cx: float, cy: float, rx: float, ry: float, a0: float = 0, a1: float = 360, n: int = 24) -> list[Pt]:
    ts = [math.radians(a0 + (a1 - a0) * i / (n - 1)) for i in range(n)]
    return [(cx + rx * math.cos(t), cy + ry * math.sin(t)) for t in ts]


def _rect(x1: float, y1: float, x2: float, y2: float) -> list[Pt]:
    return [(x1, y1), (x2, y1), (x2, y2), (x1, y2)]


def _mirror(pts: list[Pt]) -> list[Pt]:
    return [(1 - x, y) for x, y in pts]


def _both(*ops: Op) -> list[Op]:
    """Each op and its mirror image about the vertical centre line (sleeves, pockets, collar flaps)."""
    return [o for op in ops for o in (op, op._replace(pts=_mirror(op.pts)))]


def _buckle(cx: float, cy: float, s: float) -> list[Op]:
    return [Op("poly", _rect(cx - s, cy - s, cx + s, cy + s), "metal", "buckle"),
            Op("poly", _rect(cx - s / 2, cy - s / 2, cx + s / 2, cy + s / 2), "s0.8", "buckle")]


def _logo(x1: float, y1: float, x2: float, y2: float) -> list[Op]:
    ym, dx = (y1 + y2) / 2, (x2 - x1) / 4
    return [Op("poly", _rect(x1, y1, x2, y2), "contrast", "logo"),
            Op("line", [(x1 + dx, ym), (x2 - dx, ym)], "s0.9", "logo", (y2 - y1) / 4)]


def _zip(x1: float, y1: float, x2: float, y2: float) -> list[Op]:
    return [Op("line", [(x1, y1), (x2, y2)], "metal", "zip", 0.012),
            Op("poly", _rect(x1 - 0.012, y1, x1 + 0.012, y1 + 0.045), "metal", "zip")]


def draw_upper(spec: Spec, a: dict[str, Any]) -> list[Op]:
    """Tops, dresses and outerwear: torso, sleeves, neckline and every candidate detail."""
    o, fm, sl, neck = spec.opts, FIT_SCALE[a["fit"]], a["sleeves"], a["neck"]
    yn, ys, nw = 0.12, 0.16, 0.07
    sh, wc = (0.13 if sl == "sleeveless" else 0.17) * fm, 0.17 * fm + 0.01
    hem, flare = o.get("hem") or HEMS["upper"][a["length"]], o.get("flare", 0.0) + o.get("dress", 0.0)
    waist = 0.42 if "dress" in o else ys + 0.32
    left = [(0.5 - nw, yn), (0.5 - sh, ys), (0.5 - wc, ys + 0.12)] + [(0.53 - wc, waist)] * ("dress" in o)
    torso = Op("fabric", [*left, (0.5 - wc - flare, hem), (0.5 + wc + flare, hem), *_mirror(left[::-1])])
    ops = [Op("fabric", _ell(0.5, yn - 0.01, 0.13, 0.14), tag="neck")] if neck == "hood" else []
    ax, ay, bx, by = 0.5 - sh, ys, 0.51 - wc, ys + 0.12
    if sl == "sleeveless":
        arm = [(ax, ay), (ax + 0.025, ay + 0.07), (bx, by)]
        ops += [torso, *_both(Op("line", arm, "dark", "sleeves", 0.01))]
    else:
        c, e = ((ax - 0.15, ay + 0.46), (ax - 0.06, ay + 0.49)) if sl == "long" else \
            ((ax - 0.11, ay + 0.15), (ax - 0.035, ay + 0.2))
        cuff = [(ax + (c[0] - ax) * 0.94, ay + (c[1] - ay) * 0.94),
                (bx + (e[0] - bx) * 0.94, by + (e[1] - by) * 0.94)]
        ops += [*_both(Op("fabric", [(ax, ay), c, e, (bx, by)], tag="sleeves")), torso,
                *_both(Op("line", cuff, "trim", "trim", 0.02))]
    if o.get("rib"):
        ops.append(Op("poly", _rect(0.505 - wc, hem - 0.05, 0.495 + wc, hem), "s0.85"))
    gap = [(0.5 - nw, yn), (0.5 + nw, yn), (0.5, yn + {"v-neck": 0.14, "lapels": 0.24}.get(neck, 0.06))]
    flap = [(0.5 - nw - 0.012, yn - 0.015), (0.498, yn + 0.06), (0.425, yn + 0.11)]
    lapel = [(0.5 - nw, yn), (0.46 - nw, yn + 0.1), (0.505 - nw, yn + 0.12), (0.5, yn + 0.25)]
    ops += {"crew": [Op("poly", _ell(0.5, yn, nw, 0.05, 0, 180, 12), "dark", "neck")],
            "v-neck": [Op("poly", gap, "dark", "neck")],
            "collar": [Op("poly", gap, "dark", "neck"), *_both(Op("poly", flap, "s1.25", "neck"))],
            "hood": [Op("poly", _ell(0.5, yn - 0.03, 0.085, 0.1), "dark", "neck"),
                     *_both(Op("line", [(0.46, yn + 0.02), (0.46, yn + 0.13)], "inner", "neck", 0.008))],
            "lapels": [Op("poly", gap, "inner", "neck"), *_both(Op("poly", lapel, "s0.8", "neck"))]}[neck]
    start = gap[2][1] + (0.02 if neck == "lapels" else 0.0)
    if o.get("outer"):
        ops.append(Op("line", [(0.5, start), (0.5, hem)], "s0.55", None, 0.005, "!zip"))
    py = (waist + hem) / 2 if "dress" in o else max(hem - 0.17, ys + 0.2)
    kangaroo = [(0.38, hem - 0.2), (0.62, hem - 0.2), (0.66, hem - 0.05), (0.34, hem - 0.05)]
    ops += {"hood": [Op("poly", kangaroo, "s0.9", "pocket")],
            "hip": _both(Op("poly", _rect(0.53 - wc, py, 0.63 - wc, py + 0.08), "s0.88", "pocket")),
            "upper": [Op("poly", _rect(0.56, ys + 0.08, 0.65, ys + 0.18), "s0.9", "pocket")]}[
        o.get("pocket", "upper")]
    n = 4 if hem - start < 0.4 else 6
    ops.append(Op("line", [(0.5, start), (0.5, hem - 0.02)], "s0.7", "buttons", 0.006))
    ops += [Op("dot", [(0.5, start + 0.03 + (hem - start - 0.08) * i / (n - 1))], "contrast", "buttons",
               0.012) for i in range(n)]
    band = _rect(0.505 - wc, waist - 0.018, 0.495 + wc, waist + 0.018)
    hem_line = [(0.51 - wc - flare, hem - 0.016), (0.49 + wc + flare, hem - 0.016)]
    return ops + _zip(0.5, start, 0.5, hem - 0.01) + _logo(0.37, ys + 0.09, 0.44, ys + 0.14) + [
        Op("poly", band, "s0.75", "strap", 0, "strap|buckle"), *_buckle(0.5, waist, 0.03),
        Op("line", hem_line, "trim", "trim", 0.022)]


def draw_bottom(spec: Spec, a: dict[str, Any]) -> list[Op]:
    """Jeans, trousers, shorts and skirts: waistband, legs or skirt panel and every candidate detail."""
    o, fm = spec.opts, FIT_SCALE[a["fit"]]
    ww, y1, y2, hem = 0.19 * fm, 0.06, 0.13, HEMS[spec.shape][a["length"]]
    if spec.shape == "skirt":
        fl = (hem - y2) * (0.1 if a["fit"] == "slim" else 0.3)
        ops = [Op("fabric", [(0.5 - ww, y2), (0.5 + ww, y2), (0.5 + ww + fl, hem), (0.5 - ww - fl, hem)]),
               *[Op("dot", [(0.5, y2 + 0.05 + (hem - y2 - 0.1) * i / 3)], "contrast", "buttons", 0.012)
                 for i in range(4)],
               Op("line", [(0.5 - ww - fl, hem - 0.012), (0.5 + ww + fl, hem - 0.012)], "trim", "trim",
                  0.024)]
    else:
        gap, leg, crotch = o["gap"], o["leg"] * fm, min(0.36, y2 + (hem - y2) * 0.6)
        ops = [Op("fabric", [(0.5 - ww, y2), (0.5 + ww, y2), (0.5 + gap + leg, hem), (0.5 + gap, hem),
                             (0.5, crotch), (0.5 - gap, hem), (0.5 - gap - leg, hem)])]
        if o.get("crease"):
            crease = [(0.5 - ww / 2, y2 + 0.05), (0.5 - gap - leg / 2, hem - 0.02)]
            ops += _both(Op("line", crease, "s0.7", None, 0.004))
        ops += _both(Op("line", [(0.512 - ww, y2), (0.512 - gap - leg, hem)], "trim", "trim", 0.018))
    ops += [Op("fabric", _rect(0.5 - ww, y1, 0.5 + ww, y2)),
            Op("dot", [(0.5, (y1 + y2) / 2)], "metal", "buttons", 0.016),
            *_both(Op("poly", [(0.502 - ww, y2), (0.59 - ww, y2), (0.51 - ww, y2 + 0.1)], "s0.78", "pocket"))]
    return ops + _zip(0.52, y2, 0.52, 0.28) + _logo(0.4 + ww, y1 + 0.012, 0.47 + ww, y2 - 0.012)


_SOLE = [(0.04, 0.79), (0.97, 0.79), (0.96, 0.86), (0.9, 0.89), (0.08, 0.89), (0.04, 0.86)]
_BRIM = [(0.62, 0.64), (0.96, 0.7), (0.97, 0.745), (0.63, 0.73)]
_FRINGE = [(x0 + (x1 - x0) * i / 8, y0 + (y1 - y0) * i / 8, dy) for (x0, y0, x1, y1, dy) in
           ((0.25, 0.06, 0.5, 0.02, -0.05), (0.5, 0.96, 0.75, 0.92, 0.05)) for i in range(9)]
FIXED: dict[str, list[Op]] = {
    "sneaker": [
        Op("fabric", [(0.06, 0.8), (0.07, 0.52), (0.14, 0.47), (0.25, 0.49), (0.33, 0.56), (0.55, 0.6),
                      (0.78, 0.66), (0.92, 0.72), (0.95, 0.8)]), Op("poly", _SOLE, "sole"),
        *[Op("line", [(0.34 + 0.07 * i, 0.555 + 0.018 * i), (0.38 + 0.07 * i, 0.595 + 0.018 * i)], "inner",
             None, 0.01, "!strap") for i in range(4)],
        Op("poly", [(0.4, 0.575), (0.52, 0.595), (0.5, 0.79), (0.38, 0.79)], "s0.75", "strap"),
        Op("poly", _ell(0.62, 0.72, 0.09, 0.03), "contrast", "logo"),
        Op("poly", [(0.06, 0.79), (0.07, 0.56), (0.13, 0.56), (0.15, 0.79)], "trim", "trim")],
    "boot": [
        Op("fabric", [(0.1, 0.82), (0.12, 0.1), (0.44, 0.1), (0.46, 0.52), (0.6, 0.6), (0.85, 0.67),
                      (0.93, 0.74), (0.94, 0.82)]),
        Op("poly", [(0.08, 0.81), (0.96, 0.81), (0.96, 0.88), (0.3, 0.88), (0.28, 0.95), (0.1, 0.95)],
           "rubber"), *_zip(0.39, 0.14, 0.39, 0.55),
        Op("poly", _rect(0.115, 0.44, 0.46, 0.49), "s0.7", "strap", 0, "strap|buckle"),
        *_buckle(0.28, 0.465, 0.035), Op("poly", _rect(0.12, 0.1, 0.44, 0.15), "trim", "trim")],
    "sandal": [
        Op("poly", [(0.04, 0.76), (0.96, 0.74), (0.97, 0.8), (0.05, 0.82)], "s0.6"),
        *[Op("fabric", _ell(cx, 0.76, rx, ry, 180, 360, 14) + _ell(cx, 0.76, rx - 0.04, ry - 0.04, 360, 180,
                                                                    14))
          for cx, rx, ry in ((0.72, 0.14, 0.17), (0.48, 0.1, 0.24))],
        Op("fabric", _rect(0.1, 0.4, 0.16, 0.76)),
        Op("fabric", _rect(0.1, 0.4, 0.38, 0.45), tag="strap", when=""), *_buckle(0.3, 0.425, 0.035),
        Op("poly", [(0.04, 0.74), (0.2, 0.74), (0.2, 0.8), (0.05, 0.82)], "trim", "trim")],
    "tote": [
        Op("line", _ell(0.5, 0.37, 0.29, 0.4, 180, 360), "s0.65", None, 0.014, "strap"),
        *_both(Op("poly", _rect(0.19, 0.34, 0.25, 0.45), "s0.55", "strap")),
        Op("line", _ell(0.5, 0.37, 0.16, 0.25, 180, 360), "s0.65", None, 0.03),
        Op("fabric", [(0.2, 0.36), (0.8, 0.36), (0.87, 0.93), (0.13, 0.93)]),
        Op("poly", _rect(0.33, 0.57, 0.67, 0.82), "s0.88", "pocket"), *_logo(0.43, 0.46, 0.57, 0.51),
        *_zip(0.22, 0.39, 0.78, 0.39), Op("line", [(0.14, 0.89), (0.86, 0.89)], "trim", "trim", 0.04)],
    "backpack": [
        Op("line", _ell(0.5, 0.16, 0.08, 0.08, 180, 360, 10), "s0.65", None, 0.025),
        Op("fabric", _ell(0.5, 0.26, 0.3, 0.12, 180, 360, 12) + [(0.8, 0.9), (0.2, 0.9)]),
        Op("poly", _rect(0.3, 0.58, 0.7, 0.84), "s0.88", "pocket"), *_logo(0.44, 0.42, 0.56, 0.48),
        *_zip(0.3, 0.22, 0.7, 0.22),
        *[Op("line", [(x, 0.52), (x, 0.68)], "s0.65", "buckle", 0.025) for x in (0.38, 0.62)],
        *_buckle(0.38, 0.66, 0.025), *_buckle(0.62, 0.66, 0.025),
        Op("line", [(0.21, 0.87), (0.79, 0.87)], "trim", "trim", 0.04)],
    "clutch": [
        Op("line", _ell(0.88, 0.62, 0.1, 0.2, -90, 90, 12), "s0.65", "strap", 0.016),
        Op("fabric", _rect(0.06, 0.38, 0.94, 0.76)), *_zip(0.25, 0.41, 0.75, 0.41),
        Op("poly", [(0.06, 0.38), (0.94, 0.38), (0.5, 0.62)], "s0.82", None, 0, "!zip"),
        *_buckle(0.5, 0.6, 0.03), *_logo(0.72, 0.67, 0.84, 0.72)],
    "cap": [
        Op("fabric", _ell(0.42, 0.7, 0.3, 0.36, 180, 360)),
        *[Op("line", _ell(cx, 0.7, 0.12, 0.35, 250, 330, 8), "s0.7", None, 0.005) for cx in (0.36, 0.5)],
        Op("poly", _BRIM, "s0.8", None, 0, "!trim"), Op("poly", _BRIM, "trim", "trim"),
        Op("dot", [(0.42, 0.345)], "s0.7", "buttons", 0.022), *_logo(0.5, 0.5, 0.62, 0.58),
        Op("poly", _rect(0.12, 0.63, 0.24, 0.69), "s0.7", "strap", 0, "strap|buckle"),
        *_buckle(0.18, 0.66, 0.022)],
    "belt": [
        Op("fabric", [(0.1, 0.45), (0.92, 0.45), (0.98, 0.5), (0.92, 0.55), (0.1, 0.55)]),
        *[Op("dot", [(0.7 + 0.05 * i, 0.5)], "s0.4", None, 0.008) for i in range(4)],
        Op("poly", _rect(0.3, 0.43, 0.35, 0.57), "trim", "trim"),
        *_logo(0.18, 0.465, 0.27, 0.535), Op("poly", _rect(0.02, 0.4, 0.13, 0.6), "metal", "buckle"),
        Op("poly", _rect(0.04, 0.43, 0.11, 0.57), "s0.8", "buckle"),
        Op("line", [(0.04, 0.5), (0.13, 0.5)], "metal", "buckle", 0.01)],
    "scarf": [
        Op("fabric", [(0.25, 0.06), (0.5, 0.02), (0.75, 0.92), (0.5, 0.96)]),
        *[Op("line", [(0.33 + 0.5 * t, 0.06 + 0.86 * t), (0.5 + 0.25 * t, 0.02 + 0.94 * t)], "s0.75", None,
             0.005) for t in (0.3, 0.6)],
        *[Op("line", [(x, y), (x - 0.01, y + dy)], "trim", "trim", 0.008) for x, y, dy in _FRINGE],
        *_logo(0.56, 0.8, 0.64, 0.85)]}
"""Shoes, bags and accessories: every candidate part; :func:`resolve_parts` keeps those of the chosen details."""


def resolve_parts(ops: list[Op], details: list[str], colours: dict[str, RGB]) -> list[Op]:
    """Keep the parts of the chosen details, untag shared parts of unchosen ones, turn fill roles into RGB."""
    out = []
    for op in ops:
        when = op.when if op.when is not None else (op.tag if op.tag in DETAILS else "")
        if when and not any(c[1:] not in details if c[0] == "!" else c in details for c in when.split("|")):
            continue
        fill = op.fill if not isinstance(op.fill, str) else colours.get(op.fill) or ROLES.get(op.fill) or \
            tone(colours["base"], float(op.fill[1:]))
        tag = None if op.tag in DETAILS and op.tag not in details else op.tag
        out.append(Op(op.kind, op.pts, fill, tag, op.width, ""))
    return out


def apply_pattern(kind: str, base: RGB, ops: list[Op], rng: random.Random) -> list[Op]:
    """Pattern primitives covering the garment area (unit coordinates); drawn clipped to the fabric parts."""
    pts = [p for op in ops if op.kind == "fabric" for p in op.pts]
    x1, y1 = min(x for x, _ in pts) - 0.05, min(y for _, y in pts) - 0.05
    x2, y2 = max(x for x, _ in pts) + 0.05, max(y for _, y in pts) + 0.05
    acc = tone(base, 1.75) if sum(base) < 360 else tone(base, 0.4)
    p = rng.uniform(0.05, 0.09) if kind in ("stripes", "dots") else rng.uniform(0.08, 0.12)
    xs = [x1 + i * p for i in range(int((x2 - x1) / p) + 2)]
    ys = [y1 + j * p for j in range(int((y2 - y1) / p) + 2)]
    t, mid = p * rng.uniform(0.3, 0.5), _mix(base, acc, 0.5)
    if kind == "stripes":
        return [Op("poly", _rect(x1, y, x2, y + t), acc) for y in ys]
    if kind == "checks":
        return ([Op("poly", _rect(x1, y, x2, y + t), mid) for y in ys]
                + [Op("poly", _rect(x, y1, x + t, y2), mid) for x in xs]
                + [Op("poly", _rect(x, y, x + t, y + t), acc) for x in xs for y in ys])
    if kind == "dots":
        return [Op("dot", [(x + (j % 2) * p / 2, y)], acc, width=p * 0.22)
                for j, y in enumerate(ys) for x in xs]
    if kind != "print":
        return []
    second = _mix(acc, (200, 60, 60) if sum(base) > 360 else (250, 210, 80), 0.5)
    motifs = [((rng.uniform(x1, x2), rng.uniform(y1, y2)), rng.uniform(0.012, 0.03))
              for _ in range(int((x2 - x1) * (y2 - y1) * rng.uniform(70, 120)))]
    return [Op("dot", [c], col, width=r * k) for c, r in motifs for col, k in ((acc, 1.0), (second, 0.4))]




def place_view(ops: list[Op], rng: random.Random, size: int, first: bool) -> tuple[tuple[float, ...], float, dict]:
    """A random view (mirror, squash, slight rotation, object 38–72% of the side, off-centre offset): the
    affine map (x' = t0·x + t1·y + t2, y' = t3·x + t4·y + t5) from unit coordinates to pixels, its scale and
    its record."""
    xs, ys = [x for op in ops for x, _ in op.pts], [y for op in ops for _, y in op.pts]
    cx, cy = (min(xs) + max(xs)) / 2, (min(ys) + max(ys)) / 2
    hw, hh = (max(xs) - min(xs)) / 2, (max(ys) - min(ys)) / 2
    rot = rng.uniform(-3, 3) if first else rng.uniform(-8, 8)
    m, sx = (1.0, 1.0) if first else (rng.choice((-1.0, 1.0)), rng.uniform(0.85, 1.0))
    co, si = math.cos(math.radians(rot)), math.sin(math.radians(rot))
    ew, eh = abs(co * sx * hw) + abs(si * hh), abs(si * sx * hw) + abs(co * hh)
    s, margin = rng.uniform(0.38, 0.72) * size / (2 * max(ew, eh)), 0.04 * size
    ox = rng.uniform(margin + ew * s, size - margin - ew * s)
    oy = rng.uniform(margin + eh * s, size - margin - eh * s)
    a, b, c, d = s * co * m * sx, -s * si, s * si * m * sx, s * co
    record = {"mirrored": m < 0, "rotation": round(rot, 2)}
    return (a, b, ox - a * cx - b * cy, c, d, oy - c * cx - d * cy), s, record


def _tf(t: tuple[float, ...], pts: list[Pt], k: float = 1.0) -> list[Pt]:
    return [(k * (t[0] * x + t[1] * y + t[2]), k * (t[3] * x + t[4] * y + t[5])) for x, y in pts]


def _background(size: int, nrng: np.random.Generator) -> Image.Image:
    """Near-white studio background (RGB 240–255): a faint linear gradient, a slight tint and pixel noise."""
    lin = np.linspace(-0.5, 0.5, size, dtype=np.float32)
    gx, gy = nrng.uniform(-5, 5, 2).astype(np.float32)
    level = (gx * lin[None, :] + gy * lin[:, None] + nrng.uniform(245, 250)).astype(np.int16)
    level = np.clip(level + nrng.integers(-2, 3, (size, size), dtype=np.int16), 241, 254)
    tint = nrng.integers(-1, 2, 3, dtype=np.int16)
    return Image.fromarray((level[..., None] + tint).astype(np.uint8), "RGB")


def _prim(draw: ImageDraw.ImageDraw, op: Op, q: list[Pt], w: float, outline: Any = None, lw: int = 0) -> None:
    """Draw a poly, line or dot (``w``: line width or dot radius in canvas pixels)."""
    fill = (*op.fill, 255)
    if op.kind == "poly":
        draw.polygon(q, fill=fill, outline=outline, width=lw)
    elif op.kind == "line":
        if outline and w >= 3:  # outlined, so that light lines stay visible on the white background
            draw.line(q, fill=outline, width=round(w) + 2 * lw, joint="curve")
        draw.line(q, fill=fill, width=max(1, round(w)), joint="curve")
    else:
        (x, y), *_ = q
        draw.ellipse([x - w, y - w, x + w, y + w], fill=fill, outline=outline, width=lw)


def render_view(d: dict[str, Any], t: tuple[float, ...], s: float, size: int,
            nrng: np.random.Generator) -> tuple[bytes, dict[str, list[tuple[float, ...]]]]:
    """Draw one view supersampled, composite it on the background; return JPEG bytes and per-tag op boxes."""
    k, base = SUPERSAMPLE, d["base"]
    side, lw = size * k, max(1, round(0.6 * k))
    layer = Image.new("RGBA", (side, side), (0, 0, 0, 0))
    draw, fabric, extents = ImageDraw.Draw(layer), None, {}
    for op in d["ops"]:
        pts = _tf(t, op.pts)
        q = [(x * k, y * k) for x, y in pts]
        pad = {"dot": op.width * s, "line": op.width * s / 2}.get(op.kind, 0.5)
        box = (min(x for x, _ in pts) - pad, min(y for _, y in pts) - pad, max(x for x, _ in pts) + pad,
               max(y for _, y in pts) + pad)
        for tag in ("object", op.tag, "fabric" if op.kind == "fabric" else None):
            if tag:
                extents.setdefault(tag, []).append(box)
        if op.kind != "fabric":
            _prim(draw, op, q, op.width * s * k, (*tone(op.fill, 0.6), 255), lw)
            continue
        if fabric is None:  # colour and pattern over the whole canvas, pasted through each fabric part
            fabric = Image.new("RGBA", (side, side), (*base, 255))
            for p in d["pattern"]:
                _prim(ImageDraw.Draw(fabric), p, _tf(t, p.pts, k), p.width * s * k)
        x0, y0 = max(0, int(box[0] * k)), max(0, int(box[1] * k))
        x1, y1 = min(side, int(box[2] * k) + 2), min(side, int(box[3] * k) + 2)
        mask = Image.new("L", (x1 - x0, y1 - y0), 0)
        ImageDraw.Draw(mask).polygon([(x - x0, y - y0) for x, y in q], fill=255)
        layer.paste(fabric.crop((x0, y0, x1, y1)), (x0, y0), mask)
        draw.polygon(q, outline=(*tone(base, 0.55), 255), width=lw)
    image, small, buf = _background(size, nrng), layer.reduce(k), io.BytesIO()
    image.paste(small, (0, 0), small)
    image.save(buf, "JPEG", quality=JPEG_QUALITY)
    return buf.getvalue(), extents


def bounding_box(bs: list[tuple[float, ...]], size: int) -> list[int]:
    """The pixel box around float boxes, clipped to the image."""
    return [max(0, math.floor(min(b[0] for b in bs))), max(0, math.floor(min(b[1] for b in bs))),
            min(size, math.ceil(max(b[2] for b in bs))), min(size, math.ceil(max(b[3] for b in bs)))]


def part_boxes(bs: list[tuple[float, ...]], size: int, gap: float = 2.0) -> list[list[int]]:
    """Boxes of the separate pieces of an attribute (two sleeves, two pockets, hem and cuff trims)."""
    parts = [tuple(b) for b in bs]
    merged = True
    while merged:
        merged = False
        for i, j in itertools.combinations(range(len(parts)), 2):
            p, q = parts[i], parts[j]
            if p[0] <= q[2] + gap and q[0] <= p[2] + gap and p[1] <= q[3] + gap and q[1] <= p[3] + gap:
                parts[i] = (min(p[0], q[0]), min(p[1], q[1]), max(p[2], q[2]), max(p[3], q[3]))
                del parts[j]
                merged = True
                break
    return sorted(bounding_box([p], size) for p in parts)


