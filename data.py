"""GV-D-mini and GV-B-mini: a procedural world of textured scenes, real-data readers, loaders.

INTERN learns from many supervisory signals (captions, image labels, boxes, masks) gathered from
many sources, then is judged on *other* tasks with 10 % of their data. We cannot ship GV-D and may
download nothing, so the embedded default is a procedural world: a textured background (a slanted
plane in depth) with 1-6 shapes in front of it, drawn far-to-near so nearer shapes occlude farther
ones, and a little haze that grows with distance (the cue a depth probe can learn from). From one
scene every signal is derived: image label(s), a caption from a varied grammar, boxes, a semantic
mask and a depth map. Real data flows through the same sample dicts (`idx:`, `folder:`, `coco:`).

    build_dataset(spec, split, img_size=64, seed=0) -> Dataset of sample dicts (DESIGN 4.4)

| spec          | task    | what is labelled                              | classes | train | test |
|---------------|---------|-----------------------------------------------|---------|-------|------|
| gvd/caption   | caption | a caption of 1-4 shapes on a texture          | 0       | 5000  | 500  |
| gvd/shape     | cls     | shape of the large front object (+ multi-hot) | 10      | 4000  | 500  |
| gvd/attr      | cls     | fill + colour of the large front object       | 24      | 4000  | 500  |
| gvd/det       | det     | boxes of 1-5 shapes                           | 10      | 3000  | 500  |
| gvd/seg       | seg     | semantic mask of 1-5 shapes (+ background)    | 11      | 3000  | 500  |
| gvb/shape     | cls     | 4 held-out + 4 seen shapes, unseen world      | 8       | 2000  | 500  |
| gvb/count     | cls     | number of shapes, 1-6 (6 never seen upstream) | 6       | 2000  | 500  |
| gvb/texture   | cls     | background texture family (all unseen)        | 6       | 2000  | 500  |
| gvb/det       | det     | boxes of 2-6 shapes of the gvb/shape set      | 8       | 1000  | 500  |
| gvb/seg       | seg     | semantic mask, gvb/shape set (+ background)   | 9       | 1000  | 500  |
| gvb/depth     | depth   | depth map (no upstream source: unseen task)   | 0       | 1000  | 500  |

Upstream (gvd) scenes use UP_SHAPES, UP_COLORS and UP_TEXTURES; downstream (gvb) scenes use
DOWN_COLORS, DOWN_TEXTURES, more saturated backgrounds and, for shape tasks, GVB_SHAPES (four
shapes no upstream source ever draws). Every gvd sample carries a `caption`; only gvd/shape
carries `labels` (multi-hot of the shapes present).

Sample keys: `image` float32 (3,H,W) in [0,1]; `label` int64 scalar tensor; `labels` float32
(C,); `caption` str; `boxes` float32 (K,4) xyxy in pixels of the resized image (a box covers
pixels x1..x2-1, i.e. the tight box of the *visible* part of an object, COCO style) + `box_labels`
int64 (K,); `seg` int64 (H,W) with 0 = background, 255 = ignore; `depth` float32 (H,W) in metres
of a virtual camera (objects 2-6.5 m, background plane 6.7-14.3 m; larger = farther).

Determinism: sample i of (spec, split, seed) is a pure function of those four values (a
`random.Random` seeded by all of them; no global RNG), so it is the same in any process, rank
or order, and train and test scenes come from disjoint seeds. `__getitem__` is unaugmented;
augmentation goes through `Augmented(dataset, fn, seed)`, which hands `fn` a generator seeded by
(seed, epoch, index). The texture banks and shape masks are caches seeded by constants.

Real data (`img_size` applies to all; images are resized to a square, grey becomes RGB):
- `idx:DIR`    MNIST-family IDX files `train-images-idx3-ubyte[.gz]`, `train-labels-idx1-ubyte[.gz]`,
               `t10k-*` for test. A bad magic number or a truncated body raises ValueError.
- `folder:DIR` ImageFolder: DIR/train/<class>/* and DIR/test/<class>/* (or DIR/val), else
               DIR/<class>/* with every 5th file of a class (sorted by name) held out as test.
               Unreadable images are skipped with ONE warning that counts them (`.skipped` lists
               them) -- a broken file in a big folder should not stop a run.
- `coco:ANN.json[:IMAGE_DIR]` boxes + polygon masks (task "det"; `seg_classes` names the seg
               ids). RLE and crowd regions become 255 (ignore) inside their box. A `{split}` in
               ANN is replaced by the split; else every 5th image (by id) is test. IMAGE_DIR
               defaults to the json's folder.

`ds.render(i, ALL_SIGNALS)` renders every signal of a synthetic scene (for plots and tests) and
`ds.scene(i)` returns its description (objects with shape, colour, position, depth...).

Throughput, `throughput(spec)` = ds[i] per CPU-second of one process after the caches are warm
(`python data.py --bench`; bench.py calls it). Measured at 64 px on a shared 2-core CI box:
3,700-5,500 samples/s/core for every source (gvb/texture 11,500), ~1,000 at 224 px. The first
~1,000 samples of a process also fill the shape-mask cache (~0.5 s, once per image size).

CLI: `python data.py --show gvd/det --out grid.png` (SPEC may be a comma list or `all`).
"""
import argparse
import colorsys
import gzip
import json
import math
import os
import random
import struct
import sys
import time
import warnings
import zlib

import numpy as np
import torch
import torch.distributed as dist
import torch.nn.functional as F
from PIL import Image, ImageDraw, ImageFont
from torch.utils.data import DataLoader, Dataset, DistributedSampler, RandomSampler, SequentialSampler


# ----------------------------------------------------------------------------- the world's vocabulary

def _ngon(n, r=1.0, phase=-math.pi / 2):
    """n points on a circle of radius r, the first one pointing up (image y grows downwards)."""
    t = phase + 2 * np.pi * np.arange(n) / n
    return np.stack([r * np.cos(t), r * np.sin(t)], 1)


def _star(n=5, r_in=0.42):
    pts = _ngon(2 * n)
    pts[1::2] *= r_in
    return pts


def _heart():
    t = np.linspace(0, 2 * np.pi, 60, endpoint=False)
    x = 16 * np.sin(t) ** 3
    y = -(13 * np.cos(t) - 5 * np.cos(2 * t) - 2 * np.cos(3 * t) - np.cos(4 * t))
    pts = np.stack([x, y + 2.5], 1)
    return pts / np.abs(pts).max()


# name -> (polygons in unit coordinates (fits the unit circle), fill 1 = paint / 0 = cut out),
#         rotational symmetry in degrees (0 = any angle looks the same)
SHAPES = {
    "circle": ([(_ngon(48), 1)], 0),
    "square": ([(_ngon(4, phase=-math.pi / 4), 1)], 90),
    "triangle": ([(_ngon(3), 1)], 120),
    "star": ([(_star(), 1)], 72),
    "ring": ([(_ngon(48), 1), (_ngon(48, 0.55), 0)], 0),
    "cross": ([(np.array([[-.3, -.95], [.3, -.95], [.3, -.3], [.95, -.3], [.95, .3], [.3, .3], [.3, .95],
                          [-.3, .95], [-.3, .3], [-.95, .3], [-.95, -.3], [-.3, -.3]]), 1)], 90),
    "hexagon": ([(_ngon(6), 1)], 60),
    "diamond": ([(np.array([[0, -1], [.6, 0], [0, 1], [-.6, 0]]), 1)], 180),
    "heart": ([(_heart(), 1)], 360),
    "ellipse": ([(_ngon(48) * [1, .55], 1)], 180),
    # held out: no upstream source ever draws these
    "pentagon": ([(_ngon(5), 1)], 72),
    "crescent": ([(_ngon(48), 1), (_ngon(48, .82) + [.42, -.12], 0)], 360),
    "arrow": ([(np.array([[-1, -.22], [.15, -.22], [.15, -.6], [1, 0], [.15, .6], [.15, .22], [-1, .22]]), 1)], 360),
    "trapezoid": ([(np.array([[-.45, -.45], [.45, -.45], [.9, .45], [-.9, .45]]), 1)], 360),
}
UP_SHAPES = ["circle", "square", "triangle", "star", "ring", "cross", "hexagon", "diamond", "heart", "ellipse"]
HELDOUT_SHAPES = ["pentagon", "crescent", "arrow", "trapezoid"]
GVB_SHAPES = HELDOUT_SHAPES + ["circle", "square", "triangle", "star"]
ALL_SHAPES = UP_SHAPES + HELDOUT_SHAPES

UP_COLORS = {"red": (.86, .14, .12), "green": (.15, .66, .2), "blue": (.14, .3, .88), "yellow": (.96, .86, .12),
             "purple": (.55, .18, .72), "orange": (.98, .55, .08), "white": (.97, .97, .97), "black": (.06, .06, .07)}
DOWN_COLORS = {"pink": (.98, .55, .76), "teal": (.05, .58, .58), "brown": (.5, .29, .1), "olive": (.5, .52, .08),
               "navy": (.07, .1, .45), "lime": (.66, .96, .2), "grey": (.55, .55, .55), "gold": (.86, .7, .22)}
FILLS = ["plain", "striped", "dotted", "checkered"]
UP_TEXTURES = ["plain", "gradient", "stripes", "checker", "dots", "noise"]
DOWN_TEXTURES = ["waves", "grid", "cells", "zigzag", "bricks", "marble"]
SIZES = {"small": (.2, .28), "medium": (.3, .4), "large": (.44, .56)}     # side of the shape's box / img
COUNT_WORDS = ["zero", "one", "two", "three", "four", "five", "six", "seven"]

# Synonym groups, canonical word first. Captions use the canonical word ~75 % of the time, so a
# zero-shot prompt "a photo of a {shape}" meets the same word the text tower was trained on.
SYNONYMS = {
    "circle": ["disc", "disk"], "square": ["tile", "block"], "triangle": ["wedge"], "star": ["pentagram"],
    "ring": ["hoop", "donut"], "cross": ["plus"], "hexagon": ["hex"], "diamond": ["rhombus", "lozenge"],
    "heart": ["valentine"], "ellipse": ["oval"], "crescent": ["moon"],
    "arrow": ["pointer"], "trapezoid": ["trapezium"],
    "red": ["crimson", "scarlet"], "green": ["emerald"], "blue": ["azure", "cobalt"], "yellow": ["lemon"],
    "purple": ["violet"], "orange": ["amber"], "white": ["ivory"], "black": ["ebony"],
    "small": ["little", "tiny"], "large": ["big", "huge"], "medium": ["mid-sized"],
    "striped": ["banded", "lined"], "dotted": ["spotted"], "checkered": ["checked", "chequered"],
    "above": ["over"], "below": ["under", "beneath"], "background": ["backdrop"],
}
TEXTURE_WORDS = {"plain": ["plain", "blank"], "gradient": ["gradient", "fading"], "stripes": ["striped", "lined"],
                 "checker": ["checkered", "chequered"], "dots": ["dotted", "polka-dot"], "noise": ["cloudy", "mottled"],
                 "waves": ["wavy"], "grid": ["grid"], "cells": ["cellular"], "zigzag": ["zigzag"],
                 "bricks": ["brick"], "marble": ["marbled"]}
_SYN_GROUP = {w: [k] + v for k, v in SYNONYMS.items() for w in [k] + v}     # any member -> its group

FOG_RGB = (.78, .8, .84)                                      # haze colour
FOG = np.array(FOG_RGB, np.float32).reshape(3, 1, 1)
FOG_PER_M = 0.035                                             # haze fraction per metre beyond 1 m

# source presets: task, which world, what is labelled, object count range, sizes, sample counts
WORLDS = {
    "up": dict(shapes=UP_SHAPES, colors=UP_COLORS, textures=UP_TEXTURES, bg_sat=(0.0, 0.3)),
    "down": dict(shapes=GVB_SHAPES, colors=DOWN_COLORS, textures=DOWN_TEXTURES, bg_sat=(0.35, 0.75)),
}
SOURCES = {
    "gvd/caption": dict(task="caption", world="up", count=(1, 4), n=(5000, 500)),
    "gvd/shape": dict(task="cls", world="up", label="shape", count=(1, 3), n=(4000, 500)),
    "gvd/attr": dict(task="cls", world="up", label="attr", count=(1, 3), n=(4000, 500)),
    "gvd/det": dict(task="det", world="up", count=(1, 5), n=(3000, 500)),
    "gvd/seg": dict(task="seg", world="up", count=(1, 5), n=(3000, 500)),
    "gvb/shape": dict(task="cls", world="down", label="shape", count=(1, 2), n=(2000, 500)),
    "gvb/count": dict(task="cls", world="down", label="count", count=(1, 6), n=(2000, 500),
                      shapes=ALL_SHAPES, sizes=("small",), scale=0.75, overlap=0.0),
    "gvb/texture": dict(task="cls", world="down", label="texture", count=(0, 2), n=(2000, 500), sizes=("small",)),
    "gvb/det": dict(task="det", world="down", count=(2, 6), n=(1000, 500), sizes=("small", "medium")),
    "gvb/seg": dict(task="seg", world="down", count=(2, 6), n=(1000, 500), sizes=("small", "medium")),
    "gvb/depth": dict(task="depth", world="down", count=(1, 5), n=(1000, 500), shapes=ALL_SHAPES),
}
REAL_FORMS = ["idx:DIR", "folder:DIR", "coco:ANNOTATIONS.json[:IMAGE_DIR]"]
ALL_SIGNALS = ("label", "labels", "caption", "boxes", "seg", "depth")
_TASK_SIGNALS = {"caption": ("caption",), "cls": ("label",), "det": ("boxes",), "seg": ("seg",), "depth": ("depth",)}


# ----------------------------------------------------------------------------- caches: masks, textures, fills

_MASKS, _TEX, _FILL, _GRID = {}, {}, {}, {}
ANGLE_STEP = 30   # degrees per rotation bucket: 12 orientations keep the mask cache small


def _shape_mask(shape, m, b):
    """(alpha (m,m) float32 in [0,1], solid = alpha > 0.5, (x1, y1, x2, y2) box of solid) of `shape`
    rotated b*ANGLE_STEP degrees in an m x m window.

    Rasterised once per key with pillow at 4x and box-filtered down: anti-aliased edges for free.
    """
    key = (shape, m, b)
    hit = _MASKS.get(key)
    if hit is None:
        ss = 4 * m
        canvas = Image.new("L", (ss, ss), 0)
        draw = ImageDraw.Draw(canvas)
        t = math.radians(b * ANGLE_STEP)
        rot = np.array([[math.cos(t), math.sin(t)], [-math.sin(t), math.cos(t)]])   # row-vector rotation
        for poly, fill in SHAPES[shape][0]:
            pts = poly @ rot * (0.48 * ss) + ss / 2                                  # (P,2) canvas pixels
            draw.polygon([tuple(p) for p in pts.tolist()], fill=255 * fill)
        alpha = np.asarray(canvas.resize((m, m), Image.BOX), np.float32) / 255
        solid = alpha > 0.5
        cols, rows = np.flatnonzero(solid.any(0)), np.flatnonzero(solid.any(1))
        hit = _MASKS[key] = (alpha, solid, (int(cols[0]), int(rows[0]), int(cols[-1]) + 1, int(rows[-1]) + 1))
    return hit


def _soft(v, k):
    return 0.5 + 0.5 * np.tanh(k * v)


def _value_noise(rng, size, cells):
    g = rng.random((cells, cells)).astype(np.float32)
    return np.clip(np.asarray(Image.fromarray(g).resize((size, size), Image.BICUBIC)), 0, 1)


def _rotated(rng, x, y):
    t = rng.uniform(0, np.pi)
    return x * np.cos(t) + y * np.sin(t), -x * np.sin(t) + y * np.cos(t)


def _tex_plain(rng, x, y):
    return 0.25 * _value_noise(rng, x.shape[0], 3)


def _tex_gradient(rng, x, y):
    u, _ = _rotated(rng, x, y)
    return (u - u.min()) / np.ptp(u)


def _tex_stripes(rng, x, y):
    u, _ = _rotated(rng, x, y)
    return _soft(np.sin(2 * np.pi * u / rng.uniform(.08, .18)), 4)


def _tex_checker(rng, x, y):
    u, v = _rotated(rng, x, y)
    c = rng.uniform(.08, .16)
    return (np.floor(u / c) + np.floor(v / c)) % 2


def _tex_dots(rng, x, y):
    u, v = _rotated(rng, x, y)
    g = rng.uniform(.1, .18)
    d = np.hypot(u / g % 1 - .5, v / g % 1 - .5)            # distance to the nearest lattice point
    return _soft(rng.uniform(.2, .35) - d, 12)


def _tex_noise(rng, x, y):
    n = x.shape[0]
    return .6 * _value_noise(rng, n, rng.integers(6, 11)) + .4 * _value_noise(rng, n, rng.integers(16, 25))


def _tex_waves(rng, x, y):
    u, v = _rotated(rng, x, y)
    a, lam, p = rng.uniform(.03, .08), rng.uniform(.2, .4), rng.uniform(.08, .15)
    return _soft(np.sin(2 * np.pi * (v + a * np.sin(2 * np.pi * u / lam)) / p), 3)


def _tex_grid(rng, x, y):
    u, v = _rotated(rng, x, y)
    g, w = rng.uniform(.1, .2), rng.uniform(.08, .15)
    d = np.maximum(np.abs(u / g % 1 - .5), np.abs(v / g % 1 - .5))  # 0.5 on a grid line
    return (d > .5 - w).astype(np.float32)


def _tex_cells(rng, x, y):
    n_pts = int(x.max() * y.max() * rng.uniform(14, 24)) + 4
    pts = rng.random((n_pts, 2)) * [x.max(), y.max()]
    d = np.hypot(x[..., None] - pts[:, 0], y[..., None] - pts[:, 1])   # (T,T,P)
    d.partition(1, axis=-1)
    return np.clip((d[..., 1] - d[..., 0]) / .04, 0, 1)                 # 0 on cell borders


def _tex_zigzag(rng, x, y):
    u, v = _rotated(rng, x, y)
    p, lam = rng.uniform(.1, .18), rng.uniform(.1, .2)
    tri = 2 * np.abs(u / lam % 1 - .5)
    return _soft(np.sin(2 * np.pi * (v + rng.uniform(.5, 1) * p * tri) / p), 4)


def _tex_bricks(rng, x, y):
    h = rng.uniform(.07, .12)
    w = h * rng.uniform(2, 2.6)
    row = np.floor(y / h)
    xs = x + (row % 2) * w / 2
    col = np.floor(xs / w)
    shade = (np.sin(row * 12.9898 + col * 78.233) * 43758.5453) % 1          # per-brick hash
    mortar = (y / h % 1 < .14) | (xs / w % 1 < .14 * h / w)
    return np.where(mortar, 1.0, .1 + .3 * shade)


def _tex_marble(rng, x, y):
    u, _ = _rotated(rng, x, y)
    n = x.shape[0]
    turb = _value_noise(rng, n, 4) + .5 * _value_noise(rng, n, 9)
    return (.5 + .5 * np.sin(2 * np.pi * (u / rng.uniform(.2, .35) + 1.5 * turb))) ** 2


_TEXTURES = {"plain": _tex_plain, "gradient": _tex_gradient, "stripes": _tex_stripes, "checker": _tex_checker,
             "dots": _tex_dots, "noise": _tex_noise, "waves": _tex_waves, "grid": _tex_grid, "cells": _tex_cells,
             "zigzag": _tex_zigzag, "bricks": _tex_bricks, "marble": _tex_marble}
TEX_VARIANTS = 4


def _texture_bank(family, S):
    """(4, T, T) float32 in [0,1], T = 1.5 S: four variants of a family; a sample crops an S x S window."""
    key = (family, S)
    bank = _TEX.get(key)
    if bank is None:
        T = S + S // 2
        rng = np.random.default_rng([zlib.crc32(family.encode()), S])
        y, x = np.mgrid[0:T, 0:T].astype(np.float32) / S          # coordinates in image widths
        bank = np.stack([_TEXTURES[family](rng, x, y) for _ in range(TEX_VARIANTS)])
        bank = _TEX[key] = np.clip(bank, 0, 1).astype(np.float32)
    return bank


def _fill_bank(fill, S):
    """(4, S, S) float32 brightness multipliers in [0.5, 1] for an object's fill pattern."""
    key = (fill, S)
    bank = _FILL.get(key)
    if bank is None:
        y, x = np.mgrid[0:S, 0:S].astype(np.float32)
        out = []
        for t in (0, 45, 90, 135):
            c, s = math.cos(math.radians(t)), math.sin(math.radians(t))
            u, v = x * c + y * s, -x * s + y * c
            if fill == "striped":
                on = np.sin(2 * np.pi * u / max(4.0, .1 * S)) > 0
            elif fill == "dotted":
                g = max(4.0, .1 * S)
                on = np.hypot(u / g % 1 - .5, v / g % 1 - .5) < .3
            else:  # checkered
                g = max(2.0, .06 * S)
                on = (np.floor(u / g) + np.floor(v / g)) % 2 > 0
            out.append(np.where(on, .5, 1.0))
        bank = _FILL[key] = np.stack(out).astype(np.float32)
    return bank


def _basis(S):
    """(3, S*S) float32 rows 1, x - 1/2, y - 1/2 at pixel centres (x, y in [0,1]): a plane is c @ basis."""
    g = _GRID.get(S)
    if g is None:
        c = (np.arange(S, dtype=np.float32) + .5) / S - .5
        g = _GRID[S] = np.stack([np.ones(S * S, np.float32), np.tile(c, S), np.repeat(c, S)])
    return g


# ----------------------------------------------------------------------------- scenes

def _hsv(h, s, v):
    return colorsys.hsv_to_rgb(h % 1.0, min(max(s, 0.0), 1.0), min(max(v, 0.0), 1.0))


def _overlap(a, b):
    """Intersection of two (x0, y0, m) squares over the smaller one's area."""
    iw = min(a[0] + a[2], b[0] + b[2]) - max(a[0], b[0])
    ih = min(a[1] + a[2], b[1] + b[2]) - max(a[1], b[1])
    return 0.0 if iw <= 0 or ih <= 0 else iw * ih / min(a[2], b[2]) ** 2


def _sample_scene(src, r, S):
    """Everything random about one scene, drawn from r = random.Random(...): a dict of plain values.

    The label is decided first and the scene is built around it, so `targets` never renders.
    Objects: shape, color, fill, size, m (side of its square, px), b (rotation bucket), x0, y0
    (top-left, px), z (depth, m), rgb, fill_variant, fill_off. They come back sorted far to near.
    """
    world = WORLDS[src["world"]]
    shapes, colors, textures = src.get("shapes", world["shapes"]), world["colors"], world["textures"]
    color_names = list(colors)
    u = r.random
    lo, hi = src["count"]
    n = lo + int(u() * (hi - lo + 1))
    kind, label, main = src.get("label"), None, None
    if kind == "shape":                                   # main = forced attributes of object 0
        label = int(u() * len(shapes))
        main = dict(shape=shapes[label], size="medium" if u() < .5 else "large")
    elif kind == "attr":
        label = int(u() * len(color_names) * 3)
        main = dict(color=color_names[label // 3], fill=FILLS[label % 3], size="medium" if u() < .5 else "large")
    elif kind == "texture":
        label = int(u() * len(textures))
    texture = textures[label] if kind == "texture" else textures[int(u() * len(textures))]

    # background: two colours mixed by the texture, on a plane slanted in depth
    h, s = u(), world["bg_sat"][0] + u() * (world["bg_sat"][1] - world["bg_sat"][0])
    v0 = .3 + .5 * u()
    v1 = v0 + (.15 + .2 * u()) * (1 if v0 < .55 else -1)
    phi, g = 2 * math.pi * u(), 4 * u()
    scene = dict(texture=texture, tex_variant=int(u() * TEX_VARIANTS), tex_off=(u(), u()),
                 bg=(_hsv(h, s, v0), _hsv(h + .16 * u() - .08, s * (.6 + .6 * u()), v1)),
                 plane=(9.5 + 2.5 * u(), g * math.cos(phi), g * math.sin(phi)), label=label, objects=[])

    sizes = src.get("sizes", ("small", "medium", "large"))
    scale, max_overlap = src.get("scale", 1.0) * S, src.get("overlap", 0.25)
    objects, placed = scene["objects"], []
    for k in range(n):
        o = dict(shape=shapes[int(u() * len(shapes))], color=color_names[int(u() * len(color_names))],
                 fill=FILLS[0] if u() < .45 else FILLS[1 + int(u() * 3)], size=sizes[int(u() * len(sizes))])
        if main:                                          # the labelled object: big and in front;
            o.update(main if k == 0 else dict(size="small"))   # distractors stay small
        lo_f, hi_f = SIZES[o["size"]]
        o["m"] = m = max(5, round((lo_f + (hi_f - lo_f) * u()) * scale))
        period, turns = SHAPES[o["shape"]][1], 360 // ANGLE_STEP
        o["b"] = 0 if period == 0 else int(u() * turns) % (period // ANGLE_STEP if period % ANGLE_STEP == 0 else turns)
        o["z"] = 2.0 + .6 * u() if main and k == 0 else 2.8 + 3.7 * u()   # metres; the main object in front
        o["rgb"] = tuple(min(max(c + .1 * (u() - .5), 0.0), 1.0) for c in colors[o["color"]])
        o["fill_variant"], o["fill_off"] = int(u() * 4), (u(), u())
        for _ in range(30):                               # rejection-sample a position that keeps occlusion mild
            sq = (int(u() * (S - m + 1)), int(u() * (S - m + 1)), m)
            if all(_overlap(sq, p) <= max_overlap for p in placed):
                o["x0"], o["y0"] = sq[0], sq[1]
                objects.append(o)
                placed.append(sq)
                break
    if kind == "count":
        scene["label"] = len(objects) - lo                # what was placed is what is counted
    objects.sort(key=lambda o: -o["z"])                   # draw order: far to near
    return scene


# ----------------------------------------------------------------------------- rendering

def _render(scene, S, class_of, signals):
    """Image (3,S,S) float32 + the requested signals of one scene. numpy compositing, channels first.

    Background with haze in one matmul: pixel = c0 (1-f) + (c1-c0) p (1-f) + FOG f, where p is the
    texture and f = FOG_PER_M (depth - 1) the haze of the depth plane, linear in x and y.
    """
    bank = _texture_bank(scene["texture"], S)
    T = bank.shape[1]
    oy, ox = int(scene["tex_off"][0] * (T - S + 1)), int(scene["tex_off"][1] * (T - S + 1))
    p = bank[scene["tex_variant"], oy:oy + S, ox:ox + S]                     # (S,S) view
    basis = _basis(S)                                                        # (3, S*S)
    zc, gx, gy = scene["plane"]
    a = FOG_PER_M
    M = np.empty((3, S * S), np.float32)
    M[0::2] = np.array([[1 - a * (zc - 1), -a * gx, -a * gy], [a * (zc - 1), a * gx, a * gy]], np.float32) @ basis
    np.multiply(p, M[0].reshape(S, S), out=M[1].reshape(S, S))               # rows: 1-f, p(1-f), f
    (r0, g0, b0), (r1, g1, b1) = scene["bg"]
    C = np.array([[r0, r1 - r0, FOG_RGB[0]], [g0, g1 - g0, FOG_RGB[1]], [b0, b1 - b0, FOG_RGB[2]]], np.float32)
    img = (C @ M).reshape(3, S, S)

    objs = scene["objects"]
    owner = np.zeros((S, S), np.uint8)                                       # 0 = background, k = object k
    for k, o in enumerate(objs, 1):
        alpha, solid, _ = _shape_mask(o["shape"], o["m"], o["b"])
        m, x0, y0 = o["m"], o["x0"], o["y0"]
        f = a * (o["z"] - 1.0)
        rgb = np.array(o["rgb"], np.float32).reshape(3, 1, 1) * (1 - f)
        if o["fill"] != "plain":
            fy, fx = int(o["fill_off"][0] * (S - m + 1)), int(o["fill_off"][1] * (S - m + 1))
            rgb = rgb * _fill_bank(o["fill"], S)[o["fill_variant"], fy:fy + m, fx:fx + m]   # (3,m,m)
        rgb = rgb + FOG * f
        win = img[:, y0:y0 + m, x0:x0 + m]                                   # (3,m,m) view
        win += alpha * (rgb - win)
        owner[y0:y0 + m, x0:x0 + m][solid] = k
    np.clip(img, 0, 1, out=img)

    out = {"image": torch.from_numpy(img)}
    if "boxes" in signals:
        boxes, labels = [], []
        for k, o in enumerate(objs, 1):
            m, x0, y0 = o["m"], o["x0"], o["y0"]
            box = _shape_mask(o["shape"], m, o["b"])[2]
            if any(_overlap((x0, y0, m), (q["x0"], q["y0"], q["m"])) > 0 for q in objs[k:]):
                vis = owner[y0:y0 + m, x0:x0 + m] == k                       # nearer objects cut into it
                cols, rows = np.flatnonzero(vis.any(0)), np.flatnonzero(vis.any(1))
                if not cols.size:
                    continue
                box = (cols[0], rows[0], cols[-1] + 1, rows[-1] + 1)
            boxes.append((x0 + box[0], y0 + box[1], x0 + box[2], y0 + box[3]))
            labels.append(class_of[o["shape"]])
        out["boxes"] = torch.from_numpy(np.array(boxes, np.float32).reshape(-1, 4))
        out["box_labels"] = torch.from_numpy(np.array(labels, np.int64))
    if "seg" in signals:
        lut = np.array([0] + [class_of[o["shape"]] + 1 for o in objs], np.int64)
        out["seg"] = torch.from_numpy(lut.take(owner))
    if "depth" in signals:
        plane = (np.array([zc, gx, gy], np.float32) @ basis).reshape(S, S)      # metres
        zs = np.array([0.0] + [o["z"] for o in objs], np.float32)
        out["depth"] = torch.from_numpy(np.where(owner > 0, zs.take(owner), plane))
    return out


# ----------------------------------------------------------------------------- captions

def _word(w, r, keep=0.75):
    alts = SYNONYMS.get(w)
    return w if not alts or r.random() < keep else alts[int(r.random() * len(alts))]


def _with_article(phrase):
    return ("an " if phrase[0] in "aeiou" else "a ") + phrase


# How often a noun phrase names the object's fill and colour. Every phrase names the shape. At
# 0.85 / 0.9 (the first grammar) colour + fill alone told almost every caption of a batch of 32
# apart, so image-text InfoNCE never needed shape and learned none of it (gradient starvation:
# the image tower's shape probe stayed at the untrained level). Naming them less often, as
# people do, leaves captions that only the shapes separate.
P_FILL_WORD, P_COLOR_WORD = 0.4, 0.4


def _noun_phrase(o, r):
    words = []
    if o["size"] != "medium" and r.random() < .7:
        words.append(_word(o["size"], r))
    if o["fill"] != "plain" and r.random() < P_FILL_WORD:
        words.append(_word(o["fill"], r))
    if r.random() < P_COLOR_WORD:
        words.append(_word(o["color"], r))
    words.append(_word(o["shape"], r))
    return _with_article(" ".join(words))


def _relation(a, b, r):
    """How a relates to b: in depth when their boxes overlap (sometimes), else by the dominant axis."""
    if _overlap((a["x0"], a["y0"], a["m"]), (b["x0"], b["y0"], b["m"])) > 0 and r.random() < .6:
        return "in front of" if a["z"] < b["z"] else "behind"
    dx = (a["x0"] + a["m"] / 2) - (b["x0"] + b["m"] / 2)
    dy = (a["y0"] + a["m"] / 2) - (b["y0"] + b["m"] / 2)
    if abs(dy) >= abs(dx):
        return _word("above" if dy < 0 else "below", r, .6)
    return "to the left of" if dx < 0 else "to the right of"


def _where(o, S):
    cx, cy = (o["x0"] + o["m"] / 2) / S, (o["y0"] + o["m"] / 2) / S
    v = "top" if cy < 1 / 3 else "bottom" if cy > 2 / 3 else ""
    h = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else ""
    return f"{v} {h}".strip() or "centre"


def _join(phrases):
    return phrases[0] if len(phrases) == 1 else ", ".join(phrases[:-1]) + " and " + phrases[-1]


def _caption(scene, r, S):
    """A caption from a small grammar: noun phrases with synonyms, a relation, a count, a background."""
    objs = sorted(scene["objects"], key=lambda o: o["z"]) if scene["label"] is not None else list(scene["objects"])
    if scene["label"] is None:
        r.shuffle(objs)
    bg = f"{TEXTURE_WORDS[scene['texture']][int(r.random() * len(TEXTURE_WORDS[scene['texture']]))]} " \
         f"{_word('background', r, .7)}"
    if not objs:
        return f"a {bg}"
    nps = [_noun_phrase(o, r) for o in objs]
    t = r.random()
    if len(objs) == 1:
        text = nps[0] if t < .25 else f"a photo of {nps[0]}" if t < .5 else \
            f"{nps[0]} in the {_where(objs[0], S)}" if t < .7 else f"{nps[0]} on a {bg}"
    else:
        rel = f"{nps[0]} {_relation(objs[0], objs[1], r)} {nps[1]}"
        rest = nps[2:]
        if t < .6 and not rest:
            text = rel
        elif t < .3:
            text = f"{rel}, and {_join(rest)}"
        elif t < .6:
            text = f"{rel}, with {_join(rest)} nearby"
        else:
            text = f"{COUNT_WORDS[len(objs)]} shapes: {_join(nps)}"
        if r.random() < .35:
            text += f", on a {bg}"
    return text


# ----------------------------------------------------------------------------- the synthetic dataset

class SyntheticDataset(Dataset):
    """One GV-D-mini / GV-B-mini source. Item i = render(scene(i)); unaugmented and deterministic."""

    def __init__(self, spec, split, img_size=64, seed=0):
        self.spec, self.split, self.img_size, self.seed = spec, split, img_size, seed
        self.src = src = SOURCES[spec]
        self.task = src["task"]
        self.world = src["world"]
        shapes = src.get("shapes", WORLDS[src["world"]]["shapes"])
        self.shape_names = list(shapes)                   # what box_labels and seg ids (-1) index
        self._class_of = {s: k for k, s in enumerate(shapes)}
        kind = src.get("label")
        if kind == "shape":
            self.classes = list(shapes)
        elif kind == "attr":
            self.classes = [f"{f} {c}" for c in WORLDS["up"]["colors"] for f in FILLS[:3]]
        elif kind == "count":
            self.classes = COUNT_WORDS[src["count"][0]:src["count"][1] + 1]
        elif kind == "texture":
            self.classes = list(WORLDS[src["world"]]["textures"])
        elif self.task == "det":
            self.classes = list(shapes)
        elif self.task == "seg":
            self.classes = ["background"] + list(shapes)
        else:
            self.classes = []
        self.num_classes = len(self.classes)
        self._n = src["n"][0 if split == "train" else 1]
        # one integer names (seed, spec, split, index): a random.Random seeded by it owns sample i
        self._key = ((seed % 2 ** 32) << 80) | (zlib.crc32(spec.encode()) << 48) | ((split == "test") << 40)
        self._targets = None

    def __len__(self):
        return self._n

    def _rng(self, i):
        if not -self._n <= i < self._n:
            raise IndexError(f"{self.spec} {self.split}: index {i} out of range for {self._n} samples")
        return random.Random(self._key | (i % self._n))

    def scene(self, i):
        """The scene description of sample i (objects in draw order, far to near): for tests and plots."""
        return _sample_scene(self.src, self._rng(i), self.img_size)

    @property
    def targets(self):
        if self.task != "cls":
            raise AttributeError(f"{self.spec} is a {self.task} source: only cls sources have targets")
        if self._targets is None:
            self._targets = [self.scene(i)["label"] for i in range(self._n)]
        return self._targets

    def render(self, i, signals=None):
        """Sample i with the given signals (default: the source's own; ALL_SIGNALS: everything)."""
        r = self._rng(i)
        scene = _sample_scene(self.src, r, self.img_size)
        if signals is None:
            signals = _TASK_SIGNALS[self.task] + (("caption",) if self.world == "up" else ()) \
                + (("labels",) if self.spec == "gvd/shape" else ())
        out = _render(scene, self.img_size, self._class_of, signals)
        if "label" in signals and scene["label"] is not None:
            out["label"] = torch.tensor(scene["label"], dtype=torch.int64)
        if "labels" in signals:
            hot = torch.zeros(len(self._class_of), dtype=torch.float32)
            hot[[self._class_of[o["shape"]] for o in scene["objects"]]] = 1.0
            out["labels"] = hot
        if "caption" in signals:
            out["caption"] = _caption(scene, r, self.img_size)
        return out

    def __getitem__(self, i):
        return self.render(i)


# ----------------------------------------------------------------------------- real data: IDX (MNIST family)

_IDX_DTYPES = {0x08: np.uint8, 0x09: np.int8, 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path):
    """An IDX file (optionally gzipped) as an ndarray. Raises ValueError on a bad magic or short body."""
    with open(path, "rb") as fh:
        raw = fh.read()
    if raw[:2] == b"\x1f\x8b":
        try:
            raw = gzip.decompress(raw)
        except (EOFError, OSError, zlib.error) as e:
            raise ValueError(f"{path}: truncated or corrupt gzip stream ({e})") from None
    if len(raw) < 4 or raw[:2] != b"\0\0" or raw[2] not in _IDX_DTYPES:
        raise ValueError(f"{path}: not an IDX file: magic number 0x{raw[:4].hex()} (expected 0x0000TTNN, "
                         f"TT a type code in {[hex(t) for t in _IDX_DTYPES]}, NN the number of dims)")
    ndim, dtype = raw[3], np.dtype(_IDX_DTYPES[raw[2]])
    if len(raw) < 4 + 4 * ndim:
        raise ValueError(f"{path}: truncated IDX header ({len(raw)} bytes for {ndim} dims)")
    dims = struct.unpack(f">{ndim}I", raw[4:4 + 4 * ndim])
    want, have = math.prod(dims) * dtype.itemsize, len(raw) - 4 - 4 * ndim
    if have != want:
        raise ValueError(f"{path}: {'truncated' if have < want else 'oversized'} IDX body: header says "
                         f"{dims} x {dtype.itemsize} B = {want} B, file holds {have} B")
    return np.frombuffer(raw, dtype, offset=4 + 4 * ndim).reshape(dims)


def _find(root, prefix):
    names = sorted(f for f in os.listdir(root) if f.startswith(prefix))
    if not names:
        raise FileNotFoundError(f"idx:{root}: no file starting with '{prefix}' (expected MNIST-family names "
                                "train-images-idx3-ubyte[.gz], train-labels-idx1-ubyte[.gz], t10k-...)")
    return os.path.join(root, names[0])


def _to_image(pil, S):
    """PIL image -> float32 (3,S,S) in [0,1]; grey becomes RGB."""
    arr = np.asarray(pil.convert("RGB").resize((S, S), Image.BILINEAR), np.float32) / 255
    return torch.from_numpy(np.ascontiguousarray(arr.transpose(2, 0, 1)))


class IdxDataset(Dataset):
    task = "cls"

    def __init__(self, root, split, img_size=64):
        self.spec, self.split, self.img_size = f"idx:{root}", split, img_size
        prefix = "train" if split == "train" else "t10k"
        self.images = read_idx(_find(root, f"{prefix}-images"))
        labels = read_idx(_find(root, f"{prefix}-labels"))
        if self.images.dtype != np.uint8 or self.images.ndim not in (3, 4):
            raise ValueError(f"{self.spec}: images must be unsigned bytes (N,H,W[,C]), got {self.images.dtype} "
                             f"{self.images.shape}")
        if labels.ndim != 1 or len(labels) != len(self.images):
            raise ValueError(f"{self.spec}: {len(labels)} labels for {len(self.images)} images")
        self.targets = labels.astype(np.int64).tolist()
        self.classes = [str(c) for c in range(int(labels.max()) + 1)]
        self.num_classes = len(self.classes)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        return {"image": _to_image(Image.fromarray(self.images[i]), self.img_size),
                "label": torch.tensor(self.targets[i], dtype=torch.int64)}


# ----------------------------------------------------------------------------- real data: ImageFolder

IMG_EXTS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".ppm", ".pgm", ".tif", ".tiff", ".webp")


class FolderDataset(Dataset):
    task = "cls"

    def __init__(self, root, split, img_size=64):
        self.spec, self.split, self.img_size = f"folder:{root}", split, img_size
        if not os.path.isdir(root):
            raise FileNotFoundError(f"folder:{root}: no such directory")
        sub = [os.path.join(root, d) for d in ((split,) if split == "train" else ("test", "val"))]
        sub = [d for d in sub if os.path.isdir(d)]
        base = sub[0] if sub else root
        held_out = not sub                      # flat layout: every 5th file of a class is test
        if held_out and os.path.isdir(os.path.join(root, "train")):
            raise FileNotFoundError(f"folder:{root}: has train/ but no test/ or val/ for split '{split}'")
        self.classes = sorted(d for d in os.listdir(base) if os.path.isdir(os.path.join(base, d)))
        if not self.classes:
            raise ValueError(f"{self.spec}: no class folders in {base} (ImageFolder layout: DIR/<class>/<image>)")
        self.num_classes = len(self.classes)
        self.files, self.targets, self.skipped = [], [], []
        for c, name in enumerate(self.classes):
            files = sorted(f for f in os.listdir(os.path.join(base, name)) if f.lower().endswith(IMG_EXTS))
            if held_out:
                files = [f for j, f in enumerate(files) if (j % 5 == 4) == (split == "test")]
            for f in files:
                path = os.path.join(base, name, f)
                try:
                    with Image.open(path) as im:
                        im.verify()                 # reads the file; cheap next to a training step
                except Exception as e:  # noqa: BLE001 -- pillow raises many types for broken files
                    self.skipped.append((path, f"{type(e).__name__}: {e}"))
                    continue
                self.files.append(path)
                self.targets.append(c)
        if self.skipped:
            warnings.warn(f"{self.spec} ({split}): skipped {len(self.skipped)} unreadable image(s), first: "
                          f"{self.skipped[0][0]} ({self.skipped[0][1]}); see .skipped", stacklevel=3)
        if not self.files:
            raise ValueError(f"{self.spec}: no readable images for split '{split}'")

    def __len__(self):
        return len(self.files)

    def __getitem__(self, i):
        with Image.open(self.files[i]) as im:
            image = _to_image(im, self.img_size)
        return {"image": image, "label": torch.tensor(self.targets[i], dtype=torch.int64)}


# ----------------------------------------------------------------------------- real data: COCO json

class CocoDataset(Dataset):
    """COCO-format boxes and polygon masks; seg ids are category index + 1 (`seg_classes`)."""
    task = "det"

    def __init__(self, ann, image_dir, split, img_size=64):
        self.spec, self.split, self.img_size = f"coco:{ann}", split, img_size
        path = ann.replace("{split}", split)
        with open(path) as fh:
            data = json.load(fh)
        for k in ("images", "annotations", "categories"):
            if k not in data:
                raise ValueError(f"{path}: not a COCO annotation file (no '{k}' list)")
        self.image_dir = image_dir or os.path.dirname(os.path.abspath(path))
        cats = sorted(data["categories"], key=lambda c: c["id"])
        self._cat = {c["id"]: k for k, c in enumerate(cats)}       # COCO ids are not contiguous
        self.classes = [c["name"] for c in cats]
        self.num_classes = len(self.classes)
        self.seg_classes = ["background"] + self.classes
        images = sorted(data["images"], key=lambda im: im["id"])
        if "{split}" not in ann:
            images = [im for j, im in enumerate(images) if (j % 5 == 4) == (split == "test")]
        self.images = images
        self._anns = {im["id"]: [] for im in images}
        for a in data["annotations"]:
            if a["image_id"] in self._anns:
                self._anns[a["image_id"]].append(a)

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        info, S = self.images[i], self.img_size
        path = os.path.join(self.image_dir, info["file_name"])
        if not os.path.exists(path):
            raise FileNotFoundError(f"{self.spec}: image {path} not found (give the folder as coco:ANN.json:IMAGE_DIR)")
        with Image.open(path) as im:
            sx, sy = S / im.width, S / im.height
            image = _to_image(im, S)
        seg = Image.new("I", (S, S), 0)
        draw = ImageDraw.Draw(seg)
        boxes, labels = [], []
        for a in sorted(self._anns[info["id"]], key=lambda a: -a.get("area", 0)):   # small ones drawn last
            x, y, w, h = a["bbox"]
            xyxy = [x * sx, y * sy, (x + w) * sx, (y + h) * sy]
            polys = a.get("segmentation")
            if a.get("iscrowd", 0) or isinstance(polys, dict):
                draw.rectangle([xyxy[0], xyxy[1], xyxy[2] - 1, xyxy[3] - 1], fill=255)     # RLE/crowd: ignore
                continue
            boxes.append(xyxy)
            labels.append(self._cat[a["category_id"]])
            for poly in polys or []:
                pts = [(px * sx, py * sy) for px, py in zip(poly[0::2], poly[1::2])]
                if len(pts) >= 3:
                    draw.polygon(pts, fill=labels[-1] + 1)
        return {"image": image, "boxes": torch.tensor(boxes, dtype=torch.float32).reshape(-1, 4),
                "box_labels": torch.tensor(labels, dtype=torch.int64),
                "seg": torch.from_numpy(np.asarray(seg, np.int64).copy())}


# ----------------------------------------------------------------------------- build_dataset

def build_dataset(spec, split, img_size=64, seed=0):
    """The dataset named by spec: a key of SOURCES, or idx:DIR, folder:DIR, coco:ANN.json[:IMAGE_DIR]."""
    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    if int(img_size) != img_size or img_size < 16:
        raise ValueError(f"img_size must be an integer >= 16, got {img_size!r}")
    img_size = int(img_size)
    if spec in SOURCES:
        return SyntheticDataset(spec, split, img_size, seed)
    kind, _, rest = str(spec).partition(":")
    if kind == "idx" and rest:
        return IdxDataset(rest, split, img_size)
    if kind == "folder" and rest:
        return FolderDataset(rest, split, img_size)
    if kind == "coco" and rest:
        if ".json" not in rest:
            raise ValueError(f"coco spec needs a .json annotation file: coco:ANNOTATIONS.json[:IMAGE_DIR], got {spec!r}")
        ann, _, image_dir = rest.partition(".json")
        return CocoDataset(ann + ".json", image_dir.lstrip(":") or None, split, img_size)
    raise ValueError(f"unknown data spec {spec!r}; valid: {', '.join(SOURCES)}, or real data as "
                     f"{', '.join(REAL_FORMS)}")


# ----------------------------------------------------------------------------- percentage-shot subsets

class Subset(torch.utils.data.Subset):
    """torch Subset that forwards .task/.classes/... and subsets .targets."""

    def __getattr__(self, name):
        if name.startswith("__") or name in ("dataset", "indices"):
            raise AttributeError(name)
        if name == "targets":
            t = self.dataset.targets
            return [t[i] for i in self.indices]
        return getattr(self.dataset, name)


def percent_subset(dataset, percent, seed=0):
    """A fixed-seed `percent` % of a training set (0 < percent <= 100; 10 means 10 %).

    Classification (task "cls" with .targets): per class, round(percent % of that class), at least 1,
    so the class proportions survive. Every other task: round(percent % of the images), at least 1.
    """
    if not 0 < percent <= 100:
        raise ValueError(f"percent must be in (0, 100] (10 means 10 %), got {percent}")
    rng = np.random.default_rng(seed)
    n = len(dataset)
    if getattr(dataset, "task", None) == "cls":
        targets = np.asarray(dataset.targets)
        keep = []
        for c in np.unique(targets):
            idx = np.flatnonzero(targets == c)
            k = max(1, round(len(idx) * percent / 100))
            keep.append(rng.permutation(idx)[:k])
        keep = np.concatenate(keep)
    else:
        keep = rng.permutation(n)[:max(1, round(n * percent / 100))]
    return Subset(dataset, np.sort(keep).tolist())


# ----------------------------------------------------------------------------- augmentation

class Augmented(Dataset):
    """Item i = fn(dataset[i], rng), rng = np.random.default_rng([seed, epoch, i]): rank- and order-free."""

    def __init__(self, dataset, fn, seed=0):
        self.dataset, self.fn, self.seed, self.epoch = dataset, fn, seed, 0

    def set_epoch(self, epoch):
        self.epoch = epoch

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, i):
        return self.fn(self.dataset[i], np.random.default_rng([self.seed, self.epoch, i]))

    def __getattr__(self, name):
        if name.startswith("__") or name in ("dataset", "fn", "seed", "epoch"):
            raise AttributeError(name)
        return getattr(self.dataset, name)


def _crop_box(rng, H, W, scale, ratio):
    """torchvision's RandomResizedCrop box: (top, left, h, w), ten tries, then the whole image."""
    for _ in range(10):
        area = H * W * rng.uniform(*scale)
        ar = math.exp(rng.uniform(math.log(ratio[0]), math.log(ratio[1])))
        w, h = round(math.sqrt(area * ar)), round(math.sqrt(area / ar))
        if 0 < w <= W and 0 < h <= H:
            return int(rng.integers(0, H - h + 1)), int(rng.integers(0, W - w + 1)), h, w
    return 0, 0, H, W


def random_resized_crop_flip(image, rng, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3), flip=0.5):
    """Random crop of (C,H,W), resized back to (H,W) bilinearly, mirrored with probability `flip`."""
    H, W = image.shape[-2:]
    top, left, h, w = _crop_box(rng, H, W, scale, ratio)
    out = F.interpolate(image[None, :, top:top + h, left:left + w], size=(H, W), mode="bilinear",
                        align_corners=False)[0]
    return out.flip(-1) if rng.random() < flip else out


def crop_flip_sample(sample, rng, scale=(0.4, 1.0), ratio=(3 / 4, 4 / 3), flip=0.5):
    """random_resized_crop_flip applied alike to image, seg/depth (nearest) and boxes (clipped)."""
    H, W = sample["image"].shape[-2:]
    top, left, h, w = _crop_box(rng, H, W, scale, ratio)
    mirror = rng.random() < flip
    out = dict(sample)
    img = F.interpolate(sample["image"][None, :, top:top + h, left:left + w], size=(H, W), mode="bilinear",
                        align_corners=False)[0]
    out["image"] = img.flip(-1) if mirror else img
    ys = top + ((torch.arange(H) + .5) * h / H).long()                 # nearest source row per output row
    xs = left + ((torch.arange(W) + .5) * w / W).long()
    if mirror:
        xs = xs.flip(0)
    for k in ("seg", "depth"):
        if k in sample:
            out[k] = sample[k][ys][:, xs]
    if "boxes" in sample:
        b = sample["boxes"].clone()
        b[:, 0::2] = ((b[:, 0::2] - left) * W / w).clamp(0, W)
        b[:, 1::2] = ((b[:, 1::2] - top) * H / h).clamp(0, H)
        if mirror:
            b = torch.stack([W - b[:, 2], b[:, 1], W - b[:, 0], b[:, 3]], 1)
        keep = ((b[:, 2] - b[:, 0]) >= 1) & ((b[:, 3] - b[:, 1]) >= 1)
        out["boxes"], out["box_labels"] = b[keep], sample["box_labels"][keep]
    return out


def caption_variant(caption, rng, p_drop=0.1, p_syn=0.3):
    """Another wording of a caption: clause reorder, synonym swap, word dropout (articles repaired)."""
    clauses = caption.split(", ")
    if len(clauses) > 1 and rng.random() < 0.5:
        clauses = [clauses[j] for j in rng.permutation(len(clauses))]
    words = " , ".join(clauses).split()
    out = []
    for w in words:
        group = _SYN_GROUP.get(w)
        if group and rng.random() < p_syn:
            w = group[int(rng.integers(len(group)))]
        if w not in (",", "a", "an") and rng.random() < p_drop:
            continue
        out.append(w)
    for j in range(len(out) - 1):                                      # "a oval" -> "an oval"
        if out[j] in ("a", "an"):
            out[j] = "an" if out[j + 1][0] in "aeiou" else "a"
    text = " ".join(out).replace(" ,", ",")
    return text if text.strip(" ,") else caption


# ----------------------------------------------------------------------------- loaders

# Per-channel mean / std of GV-D-mini's upstream images (64 px, 1,000 samples over the five
# gvd sources). Samples stay in [0, 1] (pictures, augmentation); what a model sees is
# normalize(image), applied by collate() to IMAGE_KEYS -- the timm convention. Without it the
# demo ViTs trained from scratch barely move (inputs with std 0.14 around 0.6).
MEAN = (0.593, 0.587, 0.590)
STD = (0.144, 0.136, 0.153)
IMAGE_KEYS = ("image", "view1", "view2")


def normalize(images: torch.Tensor) -> torch.Tensor:
    """(..., 3, H, W) in [0, 1] -> zero-mean, unit-variance per channel (GV-D-mini statistics)."""
    mean = torch.tensor(MEAN, dtype=images.dtype, device=images.device).view(3, 1, 1)
    std = torch.tensor(STD, dtype=images.dtype, device=images.device).view(3, 1, 1)
    return (images - mean) / std


def collate(batch):
    """Stack fixed-size keys (images in IMAGE_KEYS normalised for the model); captions ->
    list[str]; boxes padded with 0, box_labels with -1, + num_boxes."""
    out = {}
    for k in batch[0]:
        vals = [b[k] for b in batch]
        if isinstance(vals[0], str):
            out[k] = vals
        elif k in ("boxes", "box_labels"):
            K = max(len(v) for v in vals)
            pad = torch.full((len(vals), K, 4) if k == "boxes" else (len(vals), K), 0.0 if k == "boxes" else -1,
                             dtype=torch.float32 if k == "boxes" else torch.int64)
            for j, v in enumerate(vals):
                pad[j, :len(v)] = v
            out[k] = pad
        elif k in IMAGE_KEYS:
            out[k] = normalize(torch.stack(vals))
        else:
            out[k] = torch.stack([torch.as_tensor(v) for v in vals])
    if "boxes" in out:
        out["num_boxes"] = torch.tensor([len(b["boxes"]) for b in batch], dtype=torch.int64)
    return out


def seed_worker(worker_id):
    """Seed numpy and random in a loader worker from torch's per-worker seed (user fns may use them)."""
    s = torch.initial_seed() % 2 ** 32
    np.random.seed(s)
    random.seed(s)


def build_loader(dataset, batch_size, shuffle=True, seed=0, epoch=0, workers=0, drop_last=True):
    """A DataLoader whose order is a pure function of (seed, epoch) and the world size.

    Distributed: DistributedSampler (batch_size is per rank). Single process: a RandomSampler on a
    generator seeded with seed + epoch -- the very permutation DistributedSampler shares between
    ranks, so global batch k on R ranks holds the samples of batch k on 1 rank with R x the batch.
    Build one loader per epoch (or call set_epoch on both sampler and dataset yourself).
    """
    if hasattr(dataset, "set_epoch"):
        dataset.set_epoch(epoch)
    if dist.is_available() and dist.is_initialized():
        sampler = DistributedSampler(dataset, shuffle=shuffle, seed=seed, drop_last=drop_last)
        sampler.set_epoch(epoch)
    elif shuffle:
        sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed + epoch))
    else:
        sampler = SequentialSampler(dataset)
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=workers, collate_fn=collate,
                      drop_last=drop_last, worker_init_fn=seed_worker,
                      generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- throughput and the sample grid

def throughput(spec, n=2000, img_size=64, split="train", warm=1000):
    """Samples/s of ds[i] per CPU-second of this process (one core), after `warm` samples have filled
    the mask and texture caches (a one-off ~0.5 s per process and image size)."""
    ds = build_dataset(spec, split, img_size)
    warm = min(len(ds), warm)
    for i in range(warm):
        ds[i]
    t0 = time.process_time()                # CPU seconds of this process: fair on a shared machine
    for i in range(n):
        ds[(warm + i) % len(ds)]
    return n / (time.process_time() - t0)


def palette(k):
    """A distinct colour for class k: (r, g, b) floats in [0,1] (golden-ratio hue steps)."""
    return _hsv(k * 0.618, .75, .95)


def depth_rgb(d, lo=2.0, hi=14.5):
    """(H,W) depth in metres -> (H,W,3) uint8: inverse depth on a five-stop ramp, near = yellow,
    far = dark purple, on a fixed scale so that images compare."""
    stops = np.array([[253, 231, 37], [94, 201, 98], [33, 145, 140], [59, 82, 139], [68, 1, 84]], np.float32)
    t = np.clip((1 / lo - 1 / np.maximum(d, 1e-3)) / (1 / lo - 1 / hi), 0, 1) * (len(stops) - 1)
    i = np.minimum(t.astype(int), len(stops) - 2)
    f = (t - i)[..., None]
    return (stops[i] * (1 - f) + stops[i + 1] * f).astype(np.uint8)


_palette, _depth_rgb = palette, depth_rgb        # older names (probe.py uses them)


def _rgb255(k):
    return tuple(int(255 * c) for c in palette(k))


def show(specs, out, n=6, img_size=64, split="train", seed=0, zoom=3):
    """A PNG grid: per sample the image with boxes, its seg mask, its depth map and its caption/label."""
    font = ImageFont.load_default(size=11)
    cell, text_h = img_size * zoom, 40
    rows = []
    for spec in specs:
        ds = build_dataset(spec, split, img_size, seed)
        samples = [ds.render(i, ALL_SIGNALS) if isinstance(ds, SyntheticDataset) else ds[i]
                   for i in range(min(n, len(ds)))]
        panels = 1 + ("seg" in samples[0]) + ("depth" in samples[0])
        row = Image.new("RGB", (len(samples) * (panels * cell + 8), cell + text_h + 18), (250, 250, 250))
        ImageDraw.Draw(row).text((4, 2), f"{spec} ({ds.task}, {len(ds)} {split} samples)", fill=(0, 0, 0), font=font)
        for j, s in enumerate(samples):
            x = j * (panels * cell + 8)
            img = Image.fromarray((s["image"].permute(1, 2, 0).numpy() * 255).astype(np.uint8))
            img = img.resize((cell, cell), Image.NEAREST)
            d = ImageDraw.Draw(img)
            names = getattr(ds, "shape_names", None) or ds.classes
            for b, lab in zip(s.get("boxes", []), s.get("box_labels", [])):
                b = (b * zoom).tolist()
                d.rectangle([b[0], b[1], b[2] - 1, b[3] - 1], outline=_rgb255(int(lab) + 1), width=2)
                name = names[int(lab)]
                d.text((b[0] + 2, b[1] + 1), name, fill=(255, 255, 255), font=font, stroke_width=1,
                       stroke_fill=(0, 0, 0))
            row.paste(img, (x, 16))
            px = x + cell
            if "seg" in s:
                seg = s["seg"].numpy()
                col = np.array([(0, 0, 0)] + [_rgb255(k) for k in range(1, 256)], np.uint8)[seg]
                grey = s["image"].mean(0, keepdim=True).permute(1, 2, 0).numpy() * 90     # dim background
                over = np.where(seg[..., None] > 0, col, grey).astype(np.uint8)
                row.paste(Image.fromarray(over).resize((cell, cell), Image.NEAREST), (px, 16))
                px += cell
            if "depth" in s:
                row.paste(Image.fromarray(depth_rgb(s["depth"].numpy())).resize((cell, cell), Image.NEAREST), (px, 16))
            text = s.get("caption", "")
            if "label" in s and getattr(ds, "classes", None):
                text = f"[{ds.classes[int(s['label'])]}] " + text
            words, lines = text.split(), [""]
            for w in words:                                     # greedy wrap to the sample's width
                if font.getlength(lines[-1] + " " + w) > panels * cell - 4 and lines[-1]:
                    lines.append(w)
                else:
                    lines[-1] = (lines[-1] + " " + w).strip()
            ImageDraw.Draw(row).multiline_text((x + 2, 18 + cell), "\n".join(lines[:3]), fill=(20, 20, 20),
                                               font=font, spacing=1)
        rows.append(row)
    W = max(r.width for r in rows)
    grid = Image.new("RGB", (W, sum(r.height for r in rows)), (250, 250, 250))
    y = 0
    for r in rows:
        grid.paste(r, (0, y))
        y += r.height
    grid.save(out)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--show", help="spec, comma list of specs, or 'all' (every synthetic source)")
    ap.add_argument("--out", default="grid.png")
    ap.add_argument("--n", type=int, default=6, help="samples per spec")
    ap.add_argument("--img-size", type=int, default=64)
    ap.add_argument("--split", default="train")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--bench", action="store_true", help="samples/s/core of every synthetic source")
    args = ap.parse_args(argv)
    if args.bench:
        for spec in SOURCES:
            print(f"{spec:12s} {throughput(spec, img_size=args.img_size):8.0f} samples/s/core")
    if args.show:
        specs = list(SOURCES) if args.show == "all" else args.show.split(",")
        print(show(specs, args.out, args.n, args.img_size, args.split, args.seed))
    if not (args.bench or args.show):
        ap.print_help()


if __name__ == "__main__":
    sys.exit(main())
