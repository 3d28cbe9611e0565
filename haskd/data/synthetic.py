"""Synthetic indoor rooms in ScanNet-20 classes, with RGB-D frames ray-cast from the same analytic scene.

A room is an axis-aligned box (floor, four walls, ceiling) furnished with axis-aligned boxes (composite furniture,
doors, wall objects, clutter). Every surface has a procedural texture, a pure function of the surface position, so
the colours sampled at the points and the colours rendered into the images agree exactly (up to JPEG and sensor
noise). Frames are rendered by exact ray casting (vectorised slab tests over all pixels), not by splatting.

The point of the benchmark (see docs/data.md): the :data:`HARD_CLASSES` (picture, window) are thin wall objects
with 0.8-2 cm relief whose texture is a high-contrast, nearly zero-mean pattern around the wall colour. In the
full-resolution images they are plain; in voxelized points only weak cues remain (small relief, small shift of the
mean colour, higher local colour variance), and boundary labels are noisy. A point-only network can learn them,
but better supervision (the multi-modal teacher) should help most there.

Output of :func:`make_room` (dict)::

    name           str
    coord          (N, 3) float32, metres, room corner at the origin, z up
    color          (N, 3) uint8
    normal         (N, 3) float32, unit, pointing into the room
    segment        (N,)   int64 ScanNet-20 ids, -1 = ignore (ceiling, clutter); includes boundary label noise
    segment_clean  (N,)   int64 the same labels before boundary noise (for clean evaluation)
    instance       (N,)   int64 object id, -1 for the ceiling
    frames         list of SynthFrame(color (H,W,3) uint8, depth (H,W) float32 metres (z-depth),
                   pose (4,4) float64 camera-to-world (OpenCV axes: x right, y down, z forward), K (3,3))
    room_size      (3,) float64 (W, D, H) metres
    objects        list of dicts: {"class", "label", "instance", "boxes": [(lo(3,), hi(3,))], "relief" (m or None)}
"""
from __future__ import annotations

import json
from collections import namedtuple
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import numpy as np

from ..classes import SCANNET20_CLASSES
from ..errors import HaskdError

SynthFrame = namedtuple("SynthFrame", ["color", "depth", "pose", "K"])

CLS = {name: i for i, name in enumerate(SCANNET20_CLASSES)}
IGNORE = -1
HARD_CLASSES = ("picture", "window")
HARD_LABELS = tuple(CLS[c] for c in HARD_CLASSES)

# Room planes are primitives 0..5; boxes follow. Order: wall y=0, wall x=W, wall y=D, wall x=0, floor, ceiling.
_WALL0, _WALL1, _WALL2, _WALL3, _FLOOR, _CEIL = range(6)
# Brightness per face axis (x, y, z): a fixed, normal-only "lighting" applied identically to points and pixels, so
# faces of one box read differently in images without breaking point/pixel colour agreement.
_AXIS_LIGHT = np.array([0.90, 0.82, 1.0])


@dataclass
class _Tex:
    """Procedural texture: colour = light(axis) * (base + low-frequency drift + speckle + pattern)."""
    base: np.ndarray                         # (3,) float RGB
    low_amp: float = 4.0                     # smooth brightness drift amplitude
    low_freq: np.ndarray = field(default_factory=lambda: np.zeros((2, 2)))  # (2, 2) cycles/m for (u, v)
    low_phase: np.ndarray = field(default_factory=lambda: np.zeros(2))
    speck_amp: float = 0.0                   # fine texture (a few cm) on walls: real walls are not flat colour
    speck_freq: np.ndarray = field(default_factory=lambda: np.zeros((2, 2)))
    kind: str = "plain"                      # plain | wood | stripes | checker | panes
    amp: float = 0.0                         # pattern amplitude (colour levels)
    period: float = 0.04                     # pattern period, metres
    angle: float = 0.0
    phase: float = 0.0
    cdir: np.ndarray = field(default_factory=lambda: np.ones(3))  # colour direction of the pattern


@dataclass
class _Box:
    lo: np.ndarray       # (3,)
    hi: np.ndarray       # (3,)
    label: int
    instance: int
    tex: _Tex


def _uv(p: np.ndarray, axis: np.ndarray):
    """In-surface coordinates of points p (M,3) on faces whose normal is along ``axis`` (M,)."""
    rows = np.arange(len(p))
    return p[rows, (axis + 1) % 3], p[rows, (axis + 2) % 3]


def _square(x: np.ndarray) -> np.ndarray:
    # +-1 square wave with zero mean over a period: the pattern adds contrast but (almost) no mean colour.
    return np.where(np.sin(x) >= 0, 1.0, -1.0)


def shade(tex: _Tex, p: np.ndarray, axis: np.ndarray) -> np.ndarray:
    """Texture colour (M,3) float in 0..255 at surface points p (M,3) with face normal axis (M,) int."""
    u, v = _uv(p, axis)
    two_pi = 2 * np.pi
    low = (np.sin(two_pi * (tex.low_freq[0, 0] * u + tex.low_freq[0, 1] * v) + tex.low_phase[0])
           + np.sin(two_pi * (tex.low_freq[1, 0] * u + tex.low_freq[1, 1] * v) + tex.low_phase[1]))
    val = tex.low_amp * 0.5 * low
    if tex.speck_amp:
        sp = (np.sin(two_pi * (tex.speck_freq[0, 0] * u + tex.speck_freq[0, 1] * v))
              * np.sin(two_pi * (tex.speck_freq[1, 0] * u + tex.speck_freq[1, 1] * v)))
        val = val + tex.speck_amp * sp
    col = tex.base[None, :] + val[:, None]
    if tex.kind != "plain":
        k = two_pi / tex.period
        if tex.kind == "wood":
            # planks along u with a wavy grain; smooth, so it survives voxel averaging (floor is an easy class)
            s = np.sin(k * v + 1.5 * np.sin(k * u / 7.0) + tex.phase)
        elif tex.kind == "stripes":
            s = _square(k * (u * np.cos(tex.angle) + v * np.sin(tex.angle)) + tex.phase)
        elif tex.kind == "checker":
            s = _square(k * u + tex.phase) * _square(k * v + tex.angle)
        elif tex.kind == "panes":
            # window-like: bright panes, dark mullions; duty cycle 1/2 keeps the mean at the base colour
            # (pane area fraction 0.707^2 = 0.5, so the +-1 pattern has zero mean)
            pane = (((u / tex.period + tex.phase) % 1.0) < 0.7071) & (((v / tex.period + tex.angle) % 1.0) < 0.7071)
            s = np.where(pane, 1.0, -1.0)
        else:  # pragma: no cover - internal
            raise ValueError(tex.kind)
        col = col + tex.amp * s[:, None] * tex.cdir[None, :]
    col = col * _AXIS_LIGHT[axis][:, None]
    return np.clip(col, 0, 255)


# ---------------------------------------------------------------------------------------------------------------
# Scene layout


class _Layout:
    """Random room: planes + boxes, placed with rejection sampling so that objects do not intersect."""

    def __init__(self, rng: np.random.Generator, hard_relief, hard_shift, hard_amp, picture_period=(0.02, 0.05)):
        self.rng = rng
        W, D = rng.uniform(4.0, 7.0, size=2)
        H = rng.uniform(2.6, 3.0)
        self.size = np.array([W, D, H])
        self.boxes: list = []
        self.objects: list = []
        self.keepout: list = []      # (lo, hi) regions nothing else may use (door swing, chair space)
        self.hard_relief, self.hard_shift, self.hard_amp = hard_relief, hard_shift, hard_amp
        self.picture_period = picture_period
        self.wall_tex = _Tex(base=rng.uniform(125, 200) + rng.uniform(-12, 12, 3), low_amp=rng.uniform(3, 7),
                             low_freq=rng.uniform(-0.8, 0.8, (2, 2)), low_phase=rng.uniform(0, 6.3, 2),
                             speck_amp=rng.uniform(4, 9), speck_freq=rng.uniform(8, 25, (2, 2)))
        fb = np.array(self._pick([(150, 110, 70), (120, 85, 60), (170, 160, 150), (95, 95, 100)]), float)
        fb = fb + rng.uniform(-15, 15, 3)
        self.floor_tex = _Tex(base=fb, low_amp=5, low_freq=rng.uniform(-0.5, 0.5, (2, 2)),
                              low_phase=rng.uniform(0, 6.3, 2), kind="wood", amp=rng.uniform(8, 18),
                              period=rng.uniform(0.12, 0.25), phase=rng.uniform(0, 6.3), cdir=np.array([1.0, 0.9, 0.7]))
        self.ceil_tex = _Tex(base=np.full(3, rng.uniform(200, 235)), low_amp=3)
        self.plane_tex = [self.wall_tex] * 4 + [self.floor_tex, self.ceil_tex]
        self.plane_label = [CLS["wall"]] * 4 + [CLS["floor"], IGNORE]
        self.plane_instance = [0, 1, 2, 3, 4, -1]
        self.next_instance = 5

    # -- helpers
    def _pick(self, seq):
        return seq[int(self.rng.integers(len(seq)))]

    def _tex(self, anchors, jitter=18.0, amp=0.0, kind="plain"):
        r = self.rng
        return _Tex(base=np.array(self._pick(anchors), float) + r.uniform(-jitter, jitter, 3), low_amp=r.uniform(3, 8),
                    low_freq=r.uniform(-1.5, 1.5, (2, 2)), low_phase=r.uniform(0, 6.3, 2), kind=kind, amp=amp,
                    period=r.uniform(0.05, 0.12), phase=r.uniform(0, 6.3), cdir=np.array([1.0, 0.85, 0.7]))

    def _to_world(self, parts, wall: Optional[int], s: float, origin=None, quarter: int = 0):
        """Map local boxes (x along the wall, y away from it, z up) to world AABBs.

        ``wall`` in 0..3 puts local y=0 on that wall at offset ``s`` along it; ``wall=None`` uses ``origin`` (x, y)
        and ``quarter`` turns of 90 degrees (free-standing objects).
        """
        W, D, _ = self.size
        if wall is not None:
            quarter = wall
            origin = [(s, 0.0), (W, s), (W - s, D), (0.0, D - s)][wall]
        c, sn = [(1, 0), (0, 1), (-1, 0), (0, -1)][quarter % 4]
        R = np.array([[c, -sn, 0], [sn, c, 0], [0, 0, 1]], float)
        t = np.array([origin[0], origin[1], 0.0])
        out = []
        for lo, hi in parts:
            a, b = R @ np.asarray(lo, float) + t, R @ np.asarray(hi, float) + t
            out.append((np.minimum(a, b), np.maximum(a, b)))
        return out

    def _fits(self, boxes, margin=0.02, extra_keepout=(), allow=()):
        """True when ``boxes`` lie in the room and clear every box and keep-out region (except those in ``allow``);
        ``extra_keepout`` (the new object's own free space) must not hold any existing box either."""
        lo = np.min([b[0] for b in boxes], 0)
        hi = np.max([b[1] for b in boxes], 0)
        if (lo < -1e-9).any() or (hi > self.size + 1e-9).any():
            return False
        others = [(b.lo, b.hi) for b in self.boxes] + [k for k in self.keepout if not any(k is a for a in allow)]
        for olo, ohi in others:
            if (lo < ohi + margin).all() and (olo - margin < hi).all():
                return False
        for klo, khi in extra_keepout:
            for olo, ohi in others:
                if (klo < ohi).all() and (olo < khi).all():
                    return False
        return True

    def _add(self, name, label, boxes, texs, relief=None, keepout=()):
        inst = self.next_instance
        self.next_instance += 1
        for (lo, hi), tex in zip(boxes, texs):
            self.boxes.append(_Box(lo, hi, label, inst, tex))
        self.keepout.extend(keepout)
        self.objects.append({"class": name, "label": label, "instance": inst,
                             "boxes": [(lo.copy(), hi.copy()) for lo, hi in boxes], "relief": relief,
                             "keepout": list(keepout)})

    def _try(self, build, tries=30):
        for _ in range(tries):
            if build():
                return True
        return False

    # -- wall objects
    def wall_object(self, name):
        r = self.rng
        W, D, H = self.size

        def build():
            wall = int(r.integers(4))
            L = (W, D)[wall % 2]
            if name == "door":
                w, h, rel = r.uniform(0.8, 0.95), r.uniform(2.0, 2.1), r.uniform(0.03, 0.045)
                z0 = 0.0
            elif name == "window":
                w, h, rel = r.uniform(0.8, 1.6), r.uniform(0.9, 1.3), r.uniform(*self.hard_relief)
                z0 = r.uniform(0.8, 1.0)
            else:  # picture: small frames up to whiteboard-sized boards
                w, h, rel = r.uniform(0.35, 1.6), r.uniform(0.3, 1.0), r.uniform(*self.hard_relief)
                z0 = r.uniform(1.0, 1.5)
            if w > L - 0.4 or z0 + h > H - 0.2:
                return False
            s = r.uniform(0.2, L - w - 0.2)
            boxes = self._to_world([((0, 0, z0), (w, rel, z0 + h))], wall, s)
            keep = self._to_world([((0, 0, 0), (w, 0.9, 2.1))], wall, s) if name == "door" else []
            if not self._fits(boxes, extra_keepout=keep):
                return False
            if name == "door":
                tex = self._tex([(140, 95, 60), (200, 195, 185), (110, 70, 45)], kind="wood", amp=10)
            else:
                tex = self._hard_tex(name)
            self._add(name, CLS[name], boxes, [tex], relief=float(rel), keepout=keep)
            return True

        return self._try(build)

    def _hard_tex(self, name):
        r = self.rng
        shift = r.uniform(*self.hard_shift) * r.choice([-1.0, 1.0]) * _unit(r.normal(size=3) + 1.5)
        base = self.wall_tex.base + shift
        amp = r.uniform(*self.hard_amp)
        # keep the pattern inside 0..255: clipping would move its mean away from the designed small shift
        amp = float(min(amp, 250 - base.max(), base.min() - 5))
        kind = "panes" if name == "window" else self._pick(["stripes", "checker", "stripes"])
        cdir = np.ones(3) if r.random() < 0.5 else np.clip(_unit(r.uniform(0.2, 1.0, 3)) * 1.6, 0.2, 1.0)
        return _Tex(base=base, low_amp=2.0, low_freq=r.uniform(-1, 1, (2, 2)), low_phase=r.uniform(0, 6.3, 2),
                    kind=kind, amp=amp,
                    period=r.uniform(*self.picture_period) if kind != "panes" else r.uniform(0.08, 0.2),
                    angle=r.uniform(0, np.pi), phase=r.uniform(0, 6.3), cdir=cdir)

    # -- furniture (local frame: x along the wall, y into the room, z up)
    def furniture(self, name):
        r = self.rng
        W, D, H = self.size
        wood = [(150, 105, 65), (110, 75, 50), (190, 160, 120), (225, 225, 220), (70, 65, 60)]

        def build():
            parts, texs, keep = _furniture_parts(name, r, wood, self._tex)
            if parts is None:
                return False
            wlen = max(p[1][0] for p in parts)
            dep = max(p[1][1] for p in parts)
            if name in ("table",):
                q = int(r.integers(4))
                cx, cy = r.uniform(0.9, W - 0.9), r.uniform(0.9, D - 0.9)
                # centre the group on (cx, cy)
                off = np.array([wlen / 2, dep / 2, 0])
                parts = [(np.asarray(a) - off, np.asarray(b) - off) for a, b in parts]
                keep = [(np.asarray(a) - off, np.asarray(b) - off) for a, b in keep]
                boxes = self._to_world(parts, None, 0, origin=(cx, cy), quarter=q)
                kboxes = self._to_world(keep, None, 0, origin=(cx, cy), quarter=q)
            else:
                wall = int(r.integers(4))
                L = (W, D)[wall % 2]
                if wlen > L - 0.1:
                    return False
                s = r.uniform(0.05, L - wlen - 0.05)
                boxes = self._to_world(parts, wall, s)
                kboxes = self._to_world(keep, wall, s)
            if not self._fits(boxes, extra_keepout=kboxes):
                return False
            self._add(name, CLS.get(name, IGNORE), boxes, texs, keepout=kboxes)
            return True

        return self._try(build)

    def chairs_around_tables(self):
        """Chairs in the keep-out space left around tables/desks, added as separate chair instances."""
        r = self.rng
        for obj in list(self.objects):
            if obj["class"] not in ("table", "desk"):
                continue
            lo = np.min([b[0] for b in obj["boxes"]], 0)
            hi = np.max([b[1] for b in obj["boxes"]], 0)
            n = int(r.integers(1, 5 if obj["class"] == "table" else 2))
            for _ in range(n):
                # which side of the top: -x, +x, -y, +y (desks: only the sides not against a wall are free)
                side = int(r.integers(4))
                seat = r.uniform(0.42, 0.5)
                along = 0 if side >= 2 else 1
                span = (lo[along] + 0.05, hi[along] - seat - 0.05)
                if span[1] <= span[0]:
                    continue
                a = r.uniform(*span)
                o = np.zeros(3)
                o[along] = a
                across = 1 - along
                gap = r.uniform(0.0, 0.15)
                o[across] = (lo[across] - gap - seat) if side % 2 == 0 else (hi[across] + gap)
                parts, texs = _chair_parts(r, seat, self._tex)
                # chair back away from the table: local y=0 is the back side
                quarter = {0: 3, 1: 1, 2: 0, 3: 2}[side] if along == 1 else {0: 0, 1: 2, 2: 0, 3: 2}[side]
                boxes = _place_square(parts, seat, o, quarter)
                if not self._fits(boxes, margin=0.01, allow=obj["keepout"]):
                    continue
                self._add("chair", CLS["chair"], boxes, texs)

    def clutter(self, n):
        """Small ignore-labelled boxes (NYU 'otherprop') on tops and on the floor."""
        r = self.rng
        tops = [o for o in self.objects if o["class"] in ("table", "desk", "cabinet")]
        for _ in range(n):
            sz = r.uniform(0.08, 0.3, 3)
            if tops and r.random() < 0.7:
                o = tops[int(r.integers(len(tops)))]
                lo = np.min([b[0] for b in o["boxes"]], 0)
                hi = np.max([b[1] for b in o["boxes"]], 0)
                if (hi[:2] - lo[:2] < sz[:2] + 0.05).any():
                    continue
                x, y = r.uniform(lo[0], hi[0] - sz[0]), r.uniform(lo[1], hi[1] - sz[1])
                z = hi[2]
            else:
                x = r.uniform(0.05, self.size[0] - sz[0] - 0.05)
                y, z = r.uniform(0.05, self.size[1] - sz[1] - 0.05), 0.0
            box = (np.array([x, y, z]), np.array([x, y, z]) + sz)
            others = [(b.lo, b.hi) for b in self.boxes]
            # may touch the top it stands on, never cut into anything
            if any((box[0] < ohi - 1e-6).all() and (olo + 1e-6 < box[1]).all() for olo, ohi in others):
                continue
            self._add("clutter", IGNORE, [box], [self._tex([(200, 40, 40), (40, 90, 180), (230, 200, 60),
                                                             (60, 160, 80), (240, 240, 240)], jitter=30)])


def _unit(v):
    return v / max(np.linalg.norm(v), 1e-9)


def _chair_parts(r, seat, tex):
    sh = r.uniform(0.43, 0.48)
    leg = 0.04
    back_h = r.uniform(0.35, 0.5)
    parts = [((0, 0, sh - 0.05), (seat, seat, sh)),                 # seat
             ((0, 0, sh), (seat, 0.04, sh + back_h))]                # back (at local y = 0)
    for x in (0, seat - leg):
        for y in (0, seat - leg):
            parts.append(((x, y, 0), (x + leg, y + leg, sh - 0.05)))
    t = tex([(60, 60, 65), (150, 105, 65), (40, 70, 140), (170, 40, 40), (200, 200, 195)])
    return parts, [t] * len(parts)


def _place_square(parts, seat, origin, quarter):
    """Rotate a seat x seat footprint object about its own centre by quarter turns, then move its corner to origin."""
    c, s = [(1, 0), (0, 1), (-1, 0), (0, -1)][quarter % 4]
    R = np.array([[c, -s, 0], [s, c, 0], [0, 0, 1]], float)
    half = np.array([seat / 2, seat / 2, 0])
    out = []
    for lo, hi in parts:
        a = R @ (np.asarray(lo, float) - half) + half + origin
        b = R @ (np.asarray(hi, float) - half) + half + origin
        out.append((np.minimum(a, b), np.maximum(a, b)))
    return out


def _furniture_parts(name, r, wood, tex):
    """Local parts [(lo, hi)], textures and keep-out boxes of one furniture piece."""
    keep = []
    if name == "cabinet":
        w, d, h = r.uniform(0.5, 1.3), r.uniform(0.4, 0.6), r.uniform(0.6, 1.0)
        parts = [((0, 0, 0), (w, d, h))]
        t = tex(wood)
        return parts, [t], keep
    if name == "bookshelf":
        w, d, h = r.uniform(0.6, 1.2), r.uniform(0.28, 0.4), r.uniform(1.4, 2.0)
        th = 0.025
        parts = [((0, 0, 0), (w, 0.02, h)), ((0, 0, 0), (th, d, h)), ((w - th, 0, 0), (w, d, h)),
                 ((0, 0, h - th), (w, d, h))]
        n = int(r.integers(3, 6))
        for z in np.linspace(0.05, h - 0.3, n):
            parts.append(((th, 0.02, z), (w - th, d, z + th)))
        t = tex(wood)
        return parts, [t] * len(parts), keep
    if name == "desk":
        w, d, h = r.uniform(1.0, 1.6), r.uniform(0.55, 0.8), r.uniform(0.72, 0.78)
        parts = [((0, 0, h - 0.03), (w, d, h)), ((0, 0, 0), (0.03, d, h - 0.03)), ((w - 0.03, 0, 0), (w, d, h - 0.03))]
        if r.random() < 0.6:  # drawer block
            parts.append(((w - 0.45, 0, h - 0.2), (w - 0.03, d, h - 0.03)))
        keep = [((0, d, 0), (w, d + 0.75, 0.01))]   # room for a chair
        t = tex(wood)
        return parts, [t] * len(parts), keep
    if name == "table":
        w, d, h = r.uniform(0.8, 1.8), r.uniform(0.7, 1.0), r.uniform(0.7, 0.78)
        leg = 0.05
        parts = [((0, 0, h - 0.04), (w, d, h))]
        for x in (0.03, w - leg - 0.03):
            for y in (0.03, d - leg - 0.03):
                parts.append(((x, y, 0), (x + leg, y + leg, h - 0.04)))
        keep = [((-0.7, -0.7, 0), (w + 0.7, d + 0.7, 0.01))]  # chairs go here
        t = tex(wood)
        return parts, [t] * len(parts), keep
    if name == "bed":
        w, L = r.uniform(0.9, 1.8), r.uniform(1.9, 2.1)
        hb = r.uniform(0.4, 0.55)
        parts = [((0, 0.06, 0), (w, L, hb)), ((0, 0, 0), (w, 0.06, r.uniform(0.85, 1.1)))]
        return parts, [tex([(235, 235, 230), (170, 190, 220), (200, 170, 170)]), tex(wood)], keep
    if name == "sofa":
        w, d = r.uniform(1.5, 2.2), r.uniform(0.8, 0.95)
        sh = r.uniform(0.38, 0.45)
        parts = [((0.15, 0.2, 0), (w - 0.15, d, sh)), ((0, 0, 0), (w, 0.2, r.uniform(0.75, 0.9))),
                 ((0, 0.2, 0), (0.15, d, 0.6)), ((w - 0.15, 0.2, 0), (w, d, 0.6))]
        t = tex([(90, 90, 95), (120, 60, 50), (60, 80, 110), (180, 170, 150)])
        return parts, [t] * len(parts), keep
    if name == "otherfurniture":
        w, d, h = r.uniform(0.3, 0.7), r.uniform(0.3, 0.6), r.uniform(0.3, 0.7)
        return [((0, 0, 0), (w, d, h))], [tex([(100, 130, 90), (160, 120, 160), (210, 180, 90)], jitter=30)], keep
    raise ValueError(name)  # pragma: no cover


def build_layout(rng, hard_relief=(0.008, 0.02), hard_shift=(4.0, 10.0), hard_amp=(30.0, 50.0),
                 picture_period=(0.02, 0.05)) -> _Layout:
    """Random furnished room. Hard wall objects are placed first so that every room has at least one of each."""
    lay = _Layout(rng, hard_relief, hard_shift, hard_amp, picture_period)
    lay.wall_object("door")
    for name in HARD_CLASSES:
        lay.wall_object(name)
    for _ in range(int(rng.integers(0, 3))):
        lay.wall_object(lay._pick(HARD_CLASSES))
    plan = ["bed", "sofa", "desk", "table", "bookshelf", "cabinet", "cabinet", "otherfurniture", "otherfurniture"]
    for name in plan:
        if name in ("bed", "sofa") and rng.random() < 0.5:
            continue
        if name in ("otherfurniture", "bookshelf") and rng.random() < 0.4:
            continue
        lay.furniture(name)
    lay.chairs_around_tables()
    lay.clutter(int(rng.integers(2, 7)))
    return lay


# ---------------------------------------------------------------------------------------------------------------
# Points


def _sample_points(lay: _Layout, rng, density, ceiling_density):
    """Uniform random samples on every visible surface. Returns coord, axis (normal axis), sign, prim ids."""
    W, D, H = lay.size
    chunks = []

    def face(prim, axis, value, sign, lo2, hi2, dens):
        a1, a2 = (axis + 1) % 3, (axis + 2) % 3
        area = (hi2[0] - lo2[0]) * (hi2[1] - lo2[1])
        n = rng.poisson(area * dens)
        if n == 0:
            return
        p = np.empty((n, 3))
        p[:, axis] = value
        p[:, a1] = rng.uniform(lo2[0], hi2[0], n)
        p[:, a2] = rng.uniform(lo2[1], hi2[1], n)
        chunks.append((p, np.full(n, axis), np.full(n, sign), np.full(n, prim)))

    # planes: (prim, axis, value, inward sign)
    planes = [(_WALL0, 1, 0.0, 1), (_WALL1, 0, W, -1), (_WALL2, 1, D, -1), (_WALL3, 0, 0.0, 1), (_FLOOR, 2, 0.0, 1),
              (_CEIL, 2, H, -1)]
    for prim, axis, value, sign in planes:
        a1, a2 = (axis + 1) % 3, (axis + 2) % 3
        face(prim, axis, value, sign, (0, 0), (lay.size[a1], lay.size[a2]),
             density * (ceiling_density if prim == _CEIL else 1.0))
    for j, b in enumerate(lay.boxes):
        for axis in range(3):
            a1, a2 = (axis + 1) % 3, (axis + 2) % 3
            for sign, value in ((-1, b.lo[axis]), (1, b.hi[axis])):
                if value <= 1e-9 or value >= lay.size[axis] - 1e-9:
                    continue  # lies on the floor/wall/ceiling: never visible
                face(6 + j, axis, value, sign, (b.lo[a1], b.lo[a2]), (b.hi[a1], b.hi[a2]), density)
    coord = np.concatenate([c[0] for c in chunks])
    axis = np.concatenate([c[1] for c in chunks])
    sign = np.concatenate([c[2] for c in chunks])
    prim = np.concatenate([c[3] for c in chunks])
    # Drop samples hidden inside (or flush behind) another box: floor under furniture, wall behind pictures,
    # leg tops inside table tops. eps keeps faces that merely touch from being kept twice.
    keep = np.ones(len(coord), bool)
    eps = 1e-6
    for j, b in enumerate(lay.boxes):
        keep &= ~(np.all(coord > b.lo - eps, 1) & np.all(coord < b.hi + eps, 1) & (prim != 6 + j))
    return coord[keep], axis[keep], sign[keep], prim[keep]


def _prim_info(lay: _Layout, prim: np.ndarray):
    label = np.empty(len(prim), np.int64)
    inst = np.empty(len(prim), np.int64)
    for k in np.unique(prim):
        m = prim == k
        if k < 6:
            label[m], inst[m] = lay.plane_label[k], lay.plane_instance[k]
        else:
            label[m], inst[m] = lay.boxes[k - 6].label, lay.boxes[k - 6].instance
    return label, inst


def _shade_prims(lay: _Layout, p, axis, prim) -> np.ndarray:
    col = np.empty((len(p), 3))
    for k in np.unique(prim):
        m = prim == k
        tex = lay.plane_tex[k] if k < 6 else lay.boxes[k - 6].tex
        col[m] = shade(tex, p[m], axis[m])
    return col


def _scan_colors(lay: _Layout, p, axis, prim, blur: float, rng, samples: int = 16) -> np.ndarray:
    """Point colours as a reconstructed scan holds them: the texture averaged over a Gaussian footprint of std
    ``blur`` metres in the surface plane (Monte Carlo, ``samples`` draws per point). Real scans fuse many frames
    into mesh vertex colours, which low-passes fine texture; the frames themselves stay sharp. ``blur`` 0: the exact
    texture at the point (generator version 1)."""
    if blur <= 0:
        return _shade_prims(lay, p, axis, prim)
    col = np.zeros((len(p), 3))
    rows = np.arange(len(p))
    for _ in range(samples):
        q = p.copy()
        off = rng.normal(0.0, blur, (len(p), 2))
        q[rows, (axis + 1) % 3] += off[:, 0]
        q[rows, (axis + 2) % 3] += off[:, 1]
        col += _shade_prims(lay, q, axis, prim)
    return col / samples


def boundary_label_noise(coord, segment, rng, band=0.04, prob=0.5, k=8) -> np.ndarray:
    """Swap labels near class boundaries, as human annotation of over-segmented meshes does.

    A point whose nearest differently-labelled neighbour (among its ``k`` nearest) lies within ``band`` metres takes
    that neighbour's label with probability ``prob``. Returns a new (N,) int64 array.
    """
    from scipy.spatial import cKDTree

    seg = np.asarray(segment, np.int64)
    if len(seg) < 2 or prob <= 0:
        return seg.copy()
    k = min(k, len(seg) - 1)
    dist, nb = cKDTree(coord).query(coord, k=k + 1)
    dist, nb = dist[:, 1:], nb[:, 1:]
    nb_lab = seg[nb]
    diff = (nb_lab != seg[:, None]) & (dist < band)
    first = np.argmax(diff, 1)
    flip = diff.any(1) & (rng.random(len(seg)) < prob)
    out = seg.copy()
    out[flip] = nb_lab[np.arange(len(seg)), first][flip]
    return out


# ---------------------------------------------------------------------------------------------------------------
# Cameras and ray casting


def intrinsics(image_size) -> np.ndarray:
    """3x3 pinhole K for (H, W): focal 0.9*W (about ScanNet's 58 degree horizontal field of view).

    Pixel (row v, column u) is the ray through image coordinates (u, v): integer coordinates are pixel centres, the
    convention of ``u = fx * x / z + cx`` followed by rounding.
    """
    H, W = image_size
    f = 0.9 * W
    return np.array([[f, 0, (W - 1) / 2.0], [0, f, (H - 1) / 2.0], [0, 0, 1.0]])


def look_pose(position, yaw, pitch) -> np.ndarray:
    """Camera-to-world 4x4 (OpenCV axes: x right, y down, z forward) at ``position`` looking along yaw/pitch."""
    f = np.array([np.cos(yaw) * np.cos(pitch), np.sin(yaw) * np.cos(pitch), np.sin(pitch)])
    right = _unit(np.cross(f, [0.0, 0.0, 1.0]))
    down = np.cross(f, right)
    T = np.eye(4)
    T[:3, 0], T[:3, 1], T[:3, 2], T[:3, 3] = right, down, f, position
    return T


def camera_path(lay: _Layout, rng, num_frames: int) -> list:
    """Poses on a loop around the room centre, 1.3-1.6 m high, each looking outwards at a wall, slightly down."""
    W, D, _ = lay.size
    poses = []
    yaw0 = rng.uniform(0, 2 * np.pi)
    for i in range(num_frames):
        yaw = yaw0 + 2 * np.pi * i / max(num_frames, 1) + rng.uniform(-0.2, 0.2)
        z = rng.uniform(1.3, 1.6)
        for shrink in (1.0, 0.7, 0.45, 0.2, 0.0):
            # stand on the far side of the centre so the viewed wall is 2-4 m away
            pos = np.array([W / 2 - shrink * 0.3 * W * np.cos(yaw), D / 2 - shrink * 0.3 * D * np.sin(yaw), z])
            if not any(np.all(pos > b.lo - 0.15) and np.all(pos < b.hi + 0.15) for b in lay.boxes):
                break
        poses.append(look_pose(pos, yaw, -rng.uniform(0.15, 0.45)))
    return poses


def _pixel_window(b: _Box, R, o, K, H, W):
    """Pixel rows/columns (slices) that can see box b, or None when it is out of view.

    Projects the 8 corners; a box straddling the camera plane keeps the whole image (rare, and still exact).
    """
    corners = np.array([[x, y, z] for x in (b.lo[0], b.hi[0]) for y in (b.lo[1], b.hi[1]) for z in (b.lo[2], b.hi[2])])
    cam = (corners - o) @ R
    if (cam[:, 2] <= 1e-6).all():
        return None
    if (cam[:, 2] <= 1e-3).any():
        return slice(0, H), slice(0, W)
    u = K[0, 0] * cam[:, 0] / cam[:, 2] + K[0, 2]
    v = K[1, 1] * cam[:, 1] / cam[:, 2] + K[1, 2]
    c0, c1 = max(int(np.floor(u.min())) - 1, 0), min(int(np.ceil(u.max())) + 2, W)
    r0, r1 = max(int(np.floor(v.min())) - 1, 0), min(int(np.ceil(v.max())) + 2, H)
    if c0 >= c1 or r0 >= r1:
        return None
    return slice(r0, r1), slice(c0, c1)


def render(lay: _Layout, pose, K, image_size):
    """Ray-cast one RGB-D frame. Returns color (H,W,3) uint8, depth (H,W) float32 z-depth in metres.

    Rays leave the camera through every pixel; the nearest hit among the room's inner walls (exit of the room box)
    and all furniture boxes (slab test) wins. Each box is tested only on the pixels of its projected bounding
    rectangle; per-axis arrays avoid numpy's slow reductions over length-3 rows.
    """
    H, W = image_size
    v, u = np.mgrid[0:H, 0:W].astype(np.float64)
    R, o = np.asarray(pose[:3, :3], float), np.asarray(pose[:3, 3], float)
    dc = ((u - K[0, 2]) / K[0, 0], (v - K[1, 2]) / K[1, 1], np.ones((H, W)))
    # world directions with unit z-component in the camera, so the ray parameter t is the z-depth
    d = [R[i, 0] * dc[0] + R[i, 1] * dc[1] + R[i, 2] * dc[2] for i in range(3)]
    d = [np.where(np.abs(x) < 1e-12, 1e-12, x) for x in d]
    inv = [1.0 / x for x in d]
    # room interior: the ray leaves through the nearest far slab
    t_exit = [np.where(d[i] > 0, lay.size[i] - o[i], -o[i]) * inv[i] for i in range(3)]
    axis = np.where(t_exit[0] <= t_exit[1], 0, 1)
    t_best = np.minimum(t_exit[0], t_exit[1])
    axis = np.where(t_exit[2] < t_best, 2, axis)
    t_best = np.minimum(t_best, t_exit[2])
    pos = np.choose(axis, d) > 0
    prim = np.select([(axis == 0) & pos, axis == 0, (axis == 1) & pos, axis == 1, pos],
                     [_WALL1, _WALL3, _WALL2, _WALL0, _CEIL], _FLOOR)
    for j, b in enumerate(lay.boxes):
        win = _pixel_window(b, R, o, K, H, W)
        if win is None:
            continue
        tn = tf = None
        ax = None
        for i in range(3):
            iv = inv[i][win]
            t1, t2 = (b.lo[i] - o[i]) * iv, (b.hi[i] - o[i]) * iv
            lo_t, hi_t = np.minimum(t1, t2), np.maximum(t1, t2)
            if tn is None:
                tn, tf, ax = lo_t, hi_t, np.zeros(lo_t.shape, np.int64)
            else:
                ax = np.where(lo_t > tn, i, ax)   # entry face = the slab entered last
                tn, tf = np.maximum(tn, lo_t), np.minimum(tf, hi_t)
        tb = t_best[win]
        hit = (tn <= tf) & (tn > 1e-6) & (tn < tb)
        if hit.any():
            tb[hit] = tn[hit]
            prim[win][hit] = 6 + j
            axis[win][hit] = ax[hit]
    p = np.stack([o[i] + t_best * d[i] for i in range(3)], -1).reshape(-1, 3)
    col = _shade_prims(lay, p, axis.reshape(-1), prim.reshape(-1))
    color = np.round(col).astype(np.uint8).reshape(H, W, 3)
    return color, t_best.astype(np.float32)


# ---------------------------------------------------------------------------------------------------------------
# Public API


def make_room(seed: int, points_per_m2: float = 400.0, num_frames: int = 12, image_size=(240, 320),
              ceiling_density: float = 0.25, color_noise: float = 5.0, position_noise: float = 0.002,
              label_noise_band: float = 0.04, label_noise_prob: float = 0.5, hard_relief=(0.008, 0.02),
              hard_color_shift=(4.0, 10.0), hard_texture_amp=(30.0, 50.0), scan_blur: float = 0.0,
              picture_period=(0.02, 0.05), name: Optional[str] = None, poses: Optional[list] = None) -> dict:
    """One synthetic room, fully determined by ``seed`` (see the module docstring for the returned keys).

    ``poses``: camera-to-world 4x4 matrices to render instead of the default camera path (the room itself does
    not depend on them, so the same seed gives the same room seen from elsewhere).

    ``points_per_m2`` sets the surface sampling density (400 gives roughly 30-60k points); ``hard_*`` control how
    weakly the hard classes show in the points: relief (m), mean colour shift (levels) and pattern amplitude.
    ``scan_blur`` (m): the points' colours are the texture blurred over that footprint, as a fused scan's are; the
    frames stay sharp (see :func:`_scan_colors`; 0 = exact colours, generator version 1). ``picture_period`` (m):
    the range of the picture pattern's period (stripes, checker).
    """
    rng = np.random.default_rng(seed)
    lay = build_layout(rng, hard_relief, hard_color_shift, hard_texture_amp, tuple(picture_period))
    coord, axis, sign, prim = _sample_points(lay, rng, points_per_m2, ceiling_density)
    # texture at the exact surface point (blurred as a scan's colours are when scan_blur > 0); the blur draws from
    # its own stream, so the rest of the room is the same with and without it
    color = _scan_colors(lay, coord, axis, prim, scan_blur, np.random.default_rng([seed, 7]))
    normal = np.zeros_like(coord)
    normal[np.arange(len(coord)), axis] = sign
    # sensor noise after shading: the images see the noise-free surface, as a real camera sees the real surface
    coord = coord + normal * rng.normal(0, position_noise, (len(coord), 1))
    color = np.clip(np.round(color + rng.normal(0, color_noise, color.shape)), 0, 255).astype(np.uint8)
    label, inst = _prim_info(lay, prim)
    noisy = boundary_label_noise(coord, label, rng, band=label_noise_band, prob=label_noise_prob)
    K = intrinsics(image_size)
    frames = []
    path = camera_path(lay, rng, num_frames)
    for pose in (path if poses is None else [np.asarray(p, np.float64) for p in poses]):
        c, dep = render(lay, pose, K, image_size)
        frames.append(SynthFrame(c, dep, pose, K.copy()))
    return {
        "name": name or f"synth_{seed:06d}",
        "coord": coord.astype(np.float32),
        "color": color,
        "normal": normal.astype(np.float32),
        "segment": noisy,
        "segment_clean": label,
        "instance": inst,
        "frames": frames,
        "room_size": lay.size.copy(),
        "objects": lay.objects,
    }


def write_room(room: dict, path, frame_quality: int = 95) -> Path:
    """Write one room from :func:`make_room` as a scene folder (atomic), with ``frames/`` and clean labels."""
    from .frames import write_frame, write_intrinsics
    from .scene import write_scene

    frames = room["frames"]

    def write_frames(d):
        for i, fr in enumerate(frames):
            write_frame(d, f"{i:05d}", fr.color, depth_m=fr.depth, pose=fr.pose, quality=frame_quality)
        # depth is rendered at the colour resolution, so both intrinsics are the same
        write_intrinsics(d, frames[0].K, frames[0].K)

    return write_scene(path, room["coord"], room["color"], segment=room["segment"], normal=room["normal"],
                       instance=room["instance"],
                       extra_files={"segment20_clean.npy": room["segment_clean"].astype(np.int16)},
                       write_frames=write_frames if frames else None)


SPLITS = {"train": 0, "val": 1, "test": 2}

# Generator versions: room settings that differ from make_room's defaults. A dataset records its version, and
# every version stays, so a table made on one can be remade. 2: the points' colours are blurred over a 3 cm
# footprint, as a fused scan's vertex colours are, while the frames stay sharp; the hard classes' fine pattern
# then shows in the images only (docs/data.md). 3: as 2, with the picture pattern's period at 7-10 cm instead of
# 2-5 cm, so that frames of 120x160 (about 1.8 cm a pixel at 3 m) still resolve it while the 3 cm blur keeps at most
# a sixth of its contrast in the points (version 2's pattern was too fine for the small frames: docs/benchmarks.md
# 6c).
VERSIONS = {1: {}, 2: {"scan_blur": 0.03}, 3: {"scan_blur": 0.03, "picture_period": (0.07, 0.10)}}


def _scene_seed(seed: int, split: str, index: int) -> int:
    # disjoint seeds for train, val and test rooms; stable when the number of rooms of any split changes
    return int(np.random.SeedSequence([seed, SPLITS[split], index]).generate_state(1)[0])


def _make_and_write(job):
    seed, name, path, room_kwargs = job
    room = make_room(seed, name=name, **room_kwargs)
    write_room(room, path)
    return int(len(room["coord"]))


def write_dataset(root, num_train: int = 8, num_val: int = 4, seed: int = 0, overwrite: bool = False,
                  progress: bool = True, num_test: int = 0, jobs: int = 1, version: int = 1,
                  **room_kwargs) -> dict:
    """Write ``<root>/{train,val,test}/<scene>/`` scene folders with frames; returns a summary dict.

    ``test`` (``num_test`` rooms, none by default) is a held-out split: nothing in the pipeline reads it, so a
    choice made on ``val`` (experts, presets) can be reported on rooms it never saw (``haskd ablate --split
    test``). Adding test rooms to a root leaves its train and val rooms as they are.
    ``<root>/synthetic.json`` records the generator settings. Scenes already on disk are kept (writes are atomic, so
    they are complete) unless ``overwrite``; a root made with other settings is refused unless ``overwrite``.
    Summary keys: ``root``, ``train`` / ``val`` / ``test`` (scene names), ``written``, ``skipped``, ``num_points``.
    ``jobs`` > 1 makes the rooms in that many processes: every room has its own seed, so the files are the same.
    ``version`` picks the generator settings of :data:`VERSIONS`; ``room_kwargs`` override them.
    """
    from ..progress import progress as progress_bar

    if version not in VERSIONS:
        raise HaskdError(f"synthetic generator version {version}: unknown (known: {sorted(VERSIONS)})")
    room_kwargs = {**VERSIONS[version], **room_kwargs}
    root = Path(root)
    settings = {"generator": "haskd.data.synthetic", "version": version, "seed": seed,
                "room_kwargs": {k: list(v) if isinstance(v, tuple) else v for k, v in sorted(room_kwargs.items())}}
    meta = root / "synthetic.json"
    if meta.is_file() and not overwrite:
        try:
            old = json.loads(meta.read_text())
        except ValueError:
            old = None
        if old is None or {k: old.get(k) for k in settings} != settings:
            raise HaskdError(f"{root}: holds a synthetic dataset made with other settings (see {meta}); "
                             "choose another --out or pass --overwrite")
    rooms = [(split, i) for split, n in (("train", num_train), ("val", num_val), ("test", num_test)) for i in range(n)]
    summary = {"root": str(root), "train": [], "val": [], "test": [], "written": 0, "skipped": 0, "num_points": 0}
    root.mkdir(parents=True, exist_ok=True)
    scenes, todo = [], []
    for split, i in rooms:
        s = _scene_seed(seed, split, i)
        name = f"synth_{split}_{i:04d}"
        path = root / split / name
        summary[split].append(name)
        scenes.append({"split": split, "name": name, "seed": s})
        if path.is_dir() and not overwrite:
            summary["skipped"] += 1
        else:
            todo.append((s, name, path, room_kwargs))
    bar = progress_bar(total=len(todo), desc="synthetic rooms", unit="scene", disable=not progress)
    if jobs > 1 and len(todo) > 1:
        import multiprocessing as mp

        # spawn, not fork: the parent may hold torch's OpenMP threads, which do not survive a fork
        with mp.get_context("spawn").Pool(min(jobs, len(todo))) as pool:
            counts = []
            for n in pool.imap(_make_and_write, todo):
                counts.append(n)
                bar.update()
    else:
        counts = []
        for job in todo:
            counts.append(_make_and_write(job))
            bar.update()
    bar.close()
    summary["written"] = len(counts)
    summary["num_points"] = sum(counts)
    meta.write_text(json.dumps({**settings, "hard_classes": list(HARD_CLASSES), "scenes": scenes}, indent=1))
    return summary
