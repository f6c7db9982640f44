"""Synthetic "phantom" left-hand radiographs, so that every part of the project runs without real data.

A teaching/demo phantom, NOT anatomy: bones are drawn as ellipses and tapered shafts placed on
a rough left-hand (PA view, thumb on the right) layout. What changes with bone age mimics the
signs radiologists read, coarsely:

* the hand and every bone grow; cartilage gaps between the bones shrink;
* carpal bones ossify one by one (capitate, hamate, triquetrum, lunate, trapezium, trapezoid,
  scaphoid, pisiform: 0 visible at birth, all 8 by ~11-12 years) and grow;
* epiphyses appear (radius ~1 y, phalanges/metacarpals ~1.5-3 y, ulna ~7 y) and widen;
* growth plates narrow, then close between ~14 and ~17.5 years, distal phalanges first and
  the radius last; the thumb sesamoid appears at puberty;
* girls mature ~10 % earlier (closure ~1.5 years earlier), as in reality.

Nuisance: background brightness and gradient, film noise, soft-tissue halo, rotation, shift,
scale and an occasional 'L' side marker. Everything is drawn from the ``rng`` it is given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pandas as pd

from boneage.data.rsna import write_labels
from boneage.errors import BoneAgeError

FEMALE_MATURITY = 1.1  # girls' skeletal events happen at (male age) / 1.1
FIRST_ID = 100000
JOINT_GAP = 0.25  # cm between neighbouring adult bones

# Carpals in order of appearance: name, ossification (male years), centre (cm), radii (cm), angle.
CARPALS: tuple[tuple[str, float, tuple[float, float], tuple[float, float], float], ...] = (
    ("capitate", 0.15, (0.05, 2.15), (0.55, 0.85), 0.0),
    ("hamate", 0.35, (-1.05, 2.25), (0.52, 0.72), -10.0),
    ("triquetrum", 2.5, (-1.15, 1.1), (0.48, 0.42), 15.0),
    ("lunate", 3.8, (0.05, 0.85), (0.52, 0.46), 0.0),
    ("trapezium", 5.0, (2.0, 2.0), (0.5, 0.48), 20.0),
    ("trapezoid", 5.6, (1.08, 2.35), (0.38, 0.5), 0.0),
    ("scaphoid", 6.2, (1.25, 0.95), (0.42, 0.75), -40.0),
    ("pisiform", 11.5, (-1.45, 0.7), (0.3, 0.3), 0.0),
)
# Epiphyses: ossification, closure start, closure end (male years).
EPIPHYSES = {
    "radius": (1.0, 16.3, 17.6),
    "ulna": (7.0, 16.0, 17.2),
    "mc": (1.8, 15.2, 16.4),
    "mc1": (2.8, 15.0, 16.2),
    "pp": (1.6, 15.0, 16.2),
    "mp": (2.4, 14.6, 15.8),
    "dp": (2.6, 14.0, 15.2),
}
SESAMOID_YEARS = 13.5


@dataclass(frozen=True)
class _Ray:
    """One digit: metacarpal base (cm), angle from vertical (deg, + toward the thumb), bones."""

    base: tuple[float, float]
    angle: float
    finger_angle: float
    bones: tuple[tuple[str, float, float], ...]  # (epiphysis kind, length cm, shaft width cm)


RAYS = (
    _Ray((1.9, 2.45), 35.0, 27.0, (("mc1", 4.4, 0.95), ("pp", 3.0, 0.85), ("dp", 2.2, 0.72))),
    _Ray((1.05, 3.2), 9.0, 11.0, (("mc", 6.6, 0.85), ("pp", 3.9, 0.8), ("mp", 2.3, 0.68), ("dp", 1.6, 0.56))),
    _Ray((0.05, 3.3), 0.0, 0.0, (("mc", 6.3, 0.85), ("pp", 4.4, 0.82), ("mp", 2.8, 0.7), ("dp", 1.8, 0.58))),
    _Ray((-0.9, 3.1), -8.0, -10.0, (("mc", 5.7, 0.76), ("pp", 4.1, 0.76), ("mp", 2.7, 0.66), ("dp", 1.75, 0.55))),
    _Ray((-1.75, 2.8), -17.0, -21.0, (("mc", 5.2, 0.72), ("pp", 3.3, 0.68), ("mp", 1.9, 0.58), ("dp", 1.55, 0.5))),
)


def _clip01(x: float) -> float:
    return min(1.0, max(0.0, x))


def _unit(angle_deg: float) -> np.ndarray:
    a = math.radians(angle_deg)
    return np.array([math.sin(a), math.cos(a)])


def _ellipse(centre: np.ndarray, rx: float, ry: float, angle_deg: float, n: int = 24) -> np.ndarray:
    t = np.linspace(0, 2 * np.pi, n, endpoint=False)
    a = math.radians(angle_deg)
    x, y = rx * np.cos(t), ry * np.sin(t)
    return np.stack([x * math.cos(a) - y * math.sin(a), x * math.sin(a) + y * math.cos(a)], 1) + centre


def _shaft(p0: np.ndarray, p1: np.ndarray, half_widths: tuple[float, ...], cap: float) -> np.ndarray:
    """Outline of a bone from p0 to p1 with the given half-widths along it and rounded ends."""
    u = (p1 - p0) / max(np.linalg.norm(p1 - p0), 1e-6)
    n = np.array([-u[1], u[0]])
    ts = np.linspace(0.0, 1.0, len(half_widths))
    centres = p0 + np.outer(ts, p1 - p0)
    hw = np.asarray(half_widths)[:, None]
    phi = np.linspace(0.0, np.pi, 9)[1:-1, None]
    end = p1 + np.cos(phi) * half_widths[-1] * n + np.sin(phi) * cap * u
    start = p0 - np.cos(phi) * half_widths[0] * n - np.sin(phi) * cap * u
    return np.concatenate([centres + hw * n, end, (centres - hw * n)[::-1], start])


class _Painter:
    """Draws hand-frame shapes (cm, y up) into uint8 layers through one similarity transform."""

    def __init__(self, size: tuple[int, int], origin: tuple[float, float], ppc: float, angle_deg: float):
        self.bone = np.zeros(size, np.uint8)
        self.tissue = np.zeros(size, np.uint8)
        a = math.radians(angle_deg)
        self.matrix = ppc * np.array([[math.cos(a), -math.sin(a)], [-math.sin(a), -math.cos(a)]])
        self.origin = np.asarray(origin)

    def fill(self, layer: np.ndarray, pts: np.ndarray, value: int) -> None:
        px = pts @ self.matrix.T + self.origin
        cv2.fillPoly(layer, [np.round(px * 16).astype(np.int32)], int(value), cv2.LINE_AA, shift=4)


def _long_bone(p: _Painter, p0: np.ndarray, p1: np.ndarray, width: float, kind: str, epi_distal: bool,
               m: float, immature: float) -> None:
    """One long bone between joint points p0 (proximal) and p1 (distal) with its epiphysis."""
    appear, close0, close1 = EPIPHYSES[kind]
    length = float(np.linalg.norm(p1 - p0))
    u = (p1 - p0) / length
    w_met = 1.25 * width
    epi_h = (0.33 if kind in ("radius", "pp", "mp", "dp") else 0.55) * w_met
    g0, gmin = 0.5 * w_met, 0.25 * w_met
    if m < close0:
        gap = gmin + (g0 - gmin) * _clip01(1 - (m - appear) / (close0 - appear))
    else:
        gap = gmin * (1 - _clip01((m - close0) / (close1 - close0)))
    cartilage = 0.3 * width * immature
    d_epi = JOINT_GAP / 2 + epi_h + gap + cartilage
    d_other = JOINT_GAP / 2 + 0.5 * cartilage
    epi_joint, other_joint = (p1, p0) if epi_distal else (p0, p1)
    toward = -u if epi_distal else u  # from the epiphyseal joint into the bone
    cap = 0.12 * width  # rounded ends stay inside [a, b]
    a = epi_joint + toward * (d_epi + cap)
    b = other_joint - toward * (d_other + cap)
    shaft_len = float(np.linalg.norm(b - a))
    if shaft_len <= 0.05:
        return
    far_end = 0.95 * width if kind == "dp" and not epi_distal else 1.1 * width
    profile = (w_met, 0.9 * width, 0.78 * width, 0.8 * width, far_end)
    hw = tuple(0.5 * v for v in profile)
    p.fill(p.bone, _shaft(a, b, hw, cap), 250)
    inset = 0.2 * shaft_len
    if shaft_len > 3 * width:
        inner = tuple(0.42 * v for v in hw[1:-1])
        p.fill(p.bone, _shaft(a + toward * inset, b - toward * inset, inner, cap), 200)
    if m >= appear:
        grow = _clip01((m - appear) / (11.5 - appear))
        ew = w_met * (0.35 + 0.75 * grow)
        eh = epi_h * (0.45 + 0.55 * grow)
        centre = a - toward * (cap + gap + eh / 2)
        tilt = math.degrees(math.atan2(u[0], u[1]))
        p.fill(p.bone, _ellipse(centre, ew / 2, eh / 2, -tilt), 235)


def render_phantom(age_months: float, male: bool, rng: np.random.Generator,
                   size: tuple[int, int] = (320, 256)) -> np.ndarray:
    """A uint8 (H, W) phantom radiograph of a left hand of bone age ``age_months`` (see module doc)."""
    h, w = size
    years = max(float(age_months), 0.0) / 12.0
    m = years * (1.0 if male else FEMALE_MATURITY)  # male-equivalent maturity, years
    immature = 1.0 - _clip01(m / 14.0)
    growth = (1.0 - 0.6 * math.exp(-m / 5.0)) * (1.03 if male else 0.95)  # physical hand size, adult = 1
    ppc = 0.034 * h * growth ** -0.45 * rng.uniform(0.93, 1.07)  # pixels per cm: small hands framed closer
    origin = (w * rng.uniform(0.42, 0.52), h * rng.uniform(0.74, 0.8))
    p = _Painter((h, w), origin, ppc, rng.uniform(-10.0, 10.0))
    g = growth
    width_scale = g * (0.8 + 0.2 * (1 - immature))

    # soft tissue: forearm, palm (convex hull around the metacarpals), fingers
    p.fill(p.tissue, np.array([[-2.9, 0.8], [2.7, 0.8], [3.2, -16], [-3.4, -16]]) * g, 255)
    palm = [np.array([-2.7, 0.2]) * g, np.array([2.5, 0.2]) * g]
    finger_lines = []
    for ray in RAYS:
        base = np.asarray(ray.base) * g
        mc_len = ray.bones[0][1] * g
        head = base + _unit(ray.angle) * mc_len
        n = np.array([-_unit(ray.angle)[1], _unit(ray.angle)[0]])
        pad = 0.75 * g
        palm += [base + n * pad, base - n * pad, head + n * pad, head - n * pad]
        tip = head + _unit(ray.finger_angle) * sum(b[1] for b in ray.bones[1:]) * g
        finger_lines.append((head, tip, (ray.bones[1][2] + 0.95) * g))
    hull = cv2.convexHull(np.asarray(palm, np.float32)).reshape(-1, 2)
    p.fill(p.tissue, hull.astype(float), 255)
    for head, tip, fw in finger_lines:
        p.fill(p.tissue, _shaft(head, tip, (fw / 2, 0.46 * fw, 0.4 * fw), 0.35 * fw), 255)

    # forearm bones, with their distal epiphyses
    _long_bone(p, np.array([0.55, -16.0]) * g, np.array([0.55, -0.1]) * g, 1.9 * width_scale,
               "radius", True, m, immature)
    _long_bone(p, np.array([-1.6, -16.0]) * g, np.array([-1.6, -0.45]) * g, 1.0 * width_scale,
               "ulna", True, m, immature)

    # carpals, in order of appearance, each growing after it ossifies
    for _, appear, centre, (rx, ry), angle in CARPALS:
        if m < appear:
            continue
        s = g * (0.3 + 0.7 * _clip01((m - appear) / 7.0))
        c = np.asarray(centre) * g
        p.fill(p.bone, _ellipse(c, rx * s, ry * s, angle), 225)
        p.fill(p.bone, _ellipse(c, 0.6 * rx * s, 0.6 * ry * s, angle), 200)

    # metacarpals and phalanges
    for ray in RAYS:
        joint = np.asarray(ray.base) * g
        for i, (kind, length, width) in enumerate(ray.bones):
            direction = _unit(ray.angle if i == 0 else ray.finger_angle)
            nxt = joint + direction * length * g
            _long_bone(p, joint, nxt, width * width_scale, kind, kind == "mc", m, immature)
            joint = nxt
    if m >= SESAMOID_YEARS:
        thumb = RAYS[0]
        head = np.asarray(thumb.base) * g + _unit(thumb.angle) * (thumb.bones[0][1] - 0.3) * g
        s = 0.12 + 0.1 * _clip01((m - SESAMOID_YEARS) / 2.0)
        p.fill(p.bone, _ellipse(head + np.array([-0.35, 0.1]) * g, s * g, s * g, 0.0), 240)

    return _expose(p, rng, immature)


def _expose(p: _Painter, rng: np.random.Generator, immature: float) -> np.ndarray:
    """Turn the drawn layers into a film: halo, densities, background, marker, noise."""
    h, w = p.bone.shape
    tissue = p.tissue.astype(np.float32) / 255.0
    tissue = 0.75 * cv2.GaussianBlur(tissue, (0, 0), 1.2) + 0.25 * cv2.GaussianBlur(tissue, (0, 0), 7.0)
    bone = cv2.GaussianBlur(p.bone.astype(np.float32) / 255.0, (0, 0), 0.7)
    density = 0.7 + 0.3 * (1.0 - immature)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    gx, gy = rng.uniform(-12, 12, size=2)
    background = rng.uniform(5, 45) + gx * (xx / w - 0.5) + gy * (yy / h - 0.5)
    film = background + rng.uniform(35, 65) * tissue + rng.uniform(95, 135) * density * bone
    if rng.random() < 0.4:
        film = np.maximum(film, _marker((h, w), rng))
    mottle = cv2.resize(rng.normal(0, 1, (h // 32 + 2, w // 32 + 2)).astype(np.float32), (w, h),
                        interpolation=cv2.INTER_CUBIC)
    film += rng.uniform(1, 4) * mottle + rng.normal(0, rng.uniform(1.5, 4.0), (h, w)).astype(np.float32)
    return np.clip(film, 0, 255).astype(np.uint8)


def _marker(size: tuple[int, int], rng: np.random.Generator) -> np.ndarray:
    """A bright boxed 'L' side marker in one of the top corners (float32 layer)."""
    h, w = size
    layer = np.zeros(size, np.uint8)
    box = int(0.09 * h)
    x0 = int(rng.uniform(0.03, 0.08) * w) if rng.random() < 0.5 else int(w - box - rng.uniform(0.03, 0.08) * w)
    y0 = int(rng.uniform(0.03, 0.1) * h)
    cv2.rectangle(layer, (x0, y0), (x0 + box, y0 + box), 255, max(1, box // 12))
    cv2.putText(layer, "L", (x0 + box // 5, y0 + int(box * 0.82)), cv2.FONT_HERSHEY_SIMPLEX, box / 36.0, 255,
                max(1, box // 10), cv2.LINE_AA)
    return layer.astype(np.float32) * float(rng.uniform(200, 255) / 255.0)


def make_synth_dataset(out_dir: str | Path, n: int, seed: int = 0, size: tuple[int, int] = (320, 256)) -> Path:
    """Write ``n`` phantoms to ``out_dir/images/<id>.png`` and ``out_dir/labels.csv``; return ``out_dir``.

    Ids are ``100000, 100001, ...``; ages are uniform over 1-228 months, sex is a fair coin.
    Image ``i`` depends only on (seed, i), so a larger ``n`` extends a smaller set.
    """
    if n < 1:
        raise BoneAgeError(f"the number of phantoms must be at least 1, got {n}")
    out = Path(out_dir)
    images = out / "images"
    images.mkdir(parents=True, exist_ok=True)
    rows = []
    for i in range(n):
        rng = np.random.default_rng([seed, i])
        age = float(rng.integers(1, 229))
        male = bool(rng.random() < 0.5)
        ident = str(FIRST_ID + i)
        if not cv2.imwrite(str(images / f"{ident}.png"), render_phantom(age, male, rng, size)):
            raise BoneAgeError(f"{images / (ident + '.png')}: could not write the image; check that the "
                               "folder is writable and the disk not full")
        rows.append({"id": ident, "boneage": age, "male": male})
    write_labels(pd.DataFrame(rows), out / "labels.csv")
    return out
