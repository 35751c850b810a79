"""Synthetic stand-in for a Large Leukemia Dataset (LLD) download.

Writes fake peripheral-blood-film fields in exactly the on-disk layouts described in `shared/docs/lld.md`, so that
the dataset builders, the training pipeline and the demo can be exercised without the real release:

* ``coco``:   ``{out}/{subset}/json_labels/{train,test}.json`` + ``{out}/{subset}/Images/{train,test}/*.png``
* ``yolo``:   ``{out}/{subset}/images/{train,test}/*.png`` + ``{out}/{subset}/labels/{train,test}/*.txt`` (12 columns)
* ``sparse``: as ``yolo`` with 16 columns (``rx1 ry1 rx2 ry2`` after the box). Train images are labelled only inside a
  random rectangle of about one fifth of the field; test images are fully labelled with the region ``0 0 640 640``.

Images are 640x640 RGB PNG named ``{patient}_{image}_{mag}_{type}.png``; train and test are disjoint by patient.
The same seed gives byte-identical files. Every white cell is drawn from its class and its seven attribute values
so that the attributes are visible (size, chromatin texture, nuclear shape, nucleoli, cytoplasm width, cytoplasm
colour, vacuoles).

Usage::

  python -m tfds_lld.synthetic --out /tmp/lld_fake --layout coco --subsets H_100x_C1,L_40x_C2 [--workers 2]

Every field is seeded on its own, so `--workers` (processes drawing fields in parallel) does not change a byte.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import math
import multiprocessing
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image, ImageFilter
from scipy import ndimage, signal

from tfds_lld import lld_format as F

LAYOUTS = ('coco', 'yolo', 'sparse')
SPLITS = ('train', 'test')
SIZE = F.LLD_IMAGE_SIZE
# Real fields were squashed to 640x640: every cell is about this much taller than wide.
ASPECT = 1.72
MAG_SCALE = {'100x': 1.0, '40x': 0.4, '10x': 0.1}
PNG_COMPRESS_LEVEL = 1  # noisy fields compress poorly anyway; level 1 is several times faster

# ----------------------------------------------------------------------------------------------------------------
# Class tables.
# Attribute probabilities per class: (size probs small/medium/large, then P(value=1) for chromatin coarse,
# shape irregular, nucleolus prominent, cytoplasm abundant, basophilia moderate, vacuoles prominent).
_ATTRIBUTE_TABLE = {
    'Myeloblast': ((0.10, 0.50, 0.40), 0.10, 0.25, 0.80, 0.35, 0.60, 0.15),
    'Lymphoblast': ((0.50, 0.45, 0.05), 0.10, 0.15, 0.60, 0.05, 0.60, 0.10),
    'Neutrophil': ((0.10, 0.70, 0.20), 0.95, 0.97, 0.02, 0.95, 0.05, 0.10),
    'Atypical lymphocyte': ((0.20, 0.50, 0.30), 0.60, 0.40, 0.15, 0.60, 0.75, 0.15),
    'Promonocyte': ((0.05, 0.40, 0.55), 0.25, 0.80, 0.40, 0.70, 0.60, 0.35),
    'Monoblast': ((0.05, 0.35, 0.60), 0.10, 0.30, 0.80, 0.75, 0.70, 0.30),
    'Lymphocyte': ((0.85, 0.15, 0.00), 0.95, 0.08, 0.03, 0.05, 0.35, 0.03),
    'Myelocyte': ((0.10, 0.60, 0.30), 0.80, 0.20, 0.10, 0.90, 0.25, 0.05),
    'Abnormal promyelocyte': ((0.05, 0.50, 0.45), 0.30, 0.75, 0.40, 0.80, 0.50, 0.10),
    'Monocyte': ((0.02, 0.28, 0.70), 0.55, 0.90, 0.05, 0.95, 0.55, 0.55),
    'Metamyelocyte': ((0.10, 0.70, 0.20), 0.85, 0.90, 0.05, 0.90, 0.15, 0.05),
    'Eosinophil': ((0.05, 0.65, 0.30), 0.90, 0.90, 0.02, 0.95, 0.05, 0.05),
    'Basophil': ((0.30, 0.60, 0.10), 0.85, 0.60, 0.05, 0.70, 0.50, 0.10),
}

# Class mix per leukemia type (weights over the 14 classes, in CLASS_NAMES order).
_CLASS_MIX = {
    #       None  MyB   LyB   Neu   AtL   PrM   MoB   Lym   Myc   APr   Mon   Met   Eos   Bas
    'ALL': (0.08, 0.03, 0.55, 0.08, 0.06, 0.01, 0.01, 0.12, 0.01, 0.00, 0.02, 0.01, 0.01, 0.01),
    'AML': (0.08, 0.40, 0.02, 0.07, 0.02, 0.12, 0.12, 0.05, 0.03, 0.01, 0.06, 0.01, 0.005, 0.005),
    'CLL': (0.10, 0.01, 0.02, 0.07, 0.15, 0.00, 0.00, 0.58, 0.01, 0.00, 0.03, 0.01, 0.01, 0.01),
    'CML': (0.06, 0.04, 0.00, 0.28, 0.01, 0.01, 0.00, 0.05, 0.18, 0.01, 0.04, 0.16, 0.08, 0.08),
    'APML': (0.08, 0.12, 0.00, 0.06, 0.01, 0.02, 0.01, 0.04, 0.03, 0.58, 0.02, 0.01, 0.01, 0.01),
}

# Cell width (px at 100x) per size value; height is ASPECT times that. Real fields: 39 / 50 / 66 px (p10/p50/p90).
_SIZE_WIDTH = (40.0, 52.0, 66.0)

# Per-class drawing style: cytoplasm tint (multiplies the optical density per channel), nucleus/cell radius ratio
# for scanty/abundant cytoplasm, nucleus darkness, irregular-nucleus style, granules.
_STYLE = {
    'Myeloblast': dict(tint=(1.0, 1.0, 1.0), nc=((0.76, 0.84), (0.58, 0.68)), dark=0.95, irr='cleft', gran=None),
    'Lymphoblast': dict(tint=(1.15, 1.0, 0.9), nc=((0.82, 0.88), (0.64, 0.72)), dark=1.0, irr='cleft', gran=None),
    'Neutrophil': dict(tint=(0.6, 0.85, 0.9), nc=((0.70, 0.78), (0.60, 0.70)), dark=1.15, irr='lobed4', gran='fine'),
    'Atypical lymphocyte': dict(tint=(1.25, 1.0, 0.85), nc=((0.74, 0.82), (0.50, 0.60)), dark=1.0, irr='kidney',
                                gran=None),
    'Promonocyte': dict(tint=(0.95, 1.0, 1.0), nc=((0.74, 0.82), (0.55, 0.65)), dark=0.9, irr='fold', gran='dust'),
    'Monoblast': dict(tint=(1.0, 0.95, 1.0), nc=((0.76, 0.84), (0.56, 0.66)), dark=0.85, irr='cleft', gran=None),
    'Lymphocyte': dict(tint=(1.2, 1.0, 0.9), nc=((0.82, 0.9), (0.66, 0.74)), dark=1.25, irr='cleft', gran=None),
    'Myelocyte': dict(tint=(0.7, 1.0, 1.05), nc=((0.70, 0.78), (0.50, 0.60)), dark=1.05, irr='kidney',
                      gran='pink'),
    'Abnormal promyelocyte': dict(tint=(0.8, 1.0, 1.0), nc=((0.70, 0.78), (0.52, 0.62)), dark=0.95, irr='bilobed',
                                  gran='heavy'),
    'Monocyte': dict(tint=(1.0, 0.9, 0.85), nc=((0.72, 0.80), (0.55, 0.64)), dark=0.9, irr='fold', gran='dust'),
    'Metamyelocyte': dict(tint=(0.7, 0.95, 1.0), nc=((0.66, 0.74), (0.50, 0.60)), dark=1.1, irr='kidneydeep',
                          gran='fine'),
    'Eosinophil': dict(tint=(0.5, 0.9, 1.0), nc=((0.66, 0.74), (0.56, 0.66)), dark=1.1, irr='lobed2',
                       gran='orange'),
    'Basophil': dict(tint=(0.9, 1.0, 1.0), nc=((0.70, 0.78), (0.56, 0.66)), dark=1.0, irr='lobed2',
                     gran='purple'),
}

# Optical densities relative to the background for target colours on a (160, 160, 150) background.
_BG = np.array([160.0, 160.0, 150.0], np.float32)


def _od(rgb, bg=_BG):
  return np.log(np.asarray(bg, np.float32) / np.asarray(rgb, np.float32)).astype(np.float32)


_OD_NUCLEUS = _od((68, 71, 120))
_OD_CYTO_SLIGHT = _od((150, 136, 156))  # pale lilac
_OD_CYTO_MODERATE = _od((104, 118, 152))  # blue-grey
_OD_GRANULE = {
    'fine': _od((140, 112, 140)),
    'dust': _od((130, 110, 135)),
    'pink': _od((150, 90, 120)),
    'orange': _od((196, 128, 92)),
    'purple': _od((55, 35, 95)),
    'heavy': _od((105, 40, 95)),
}


# ----------------------------------------------------------------------------------------------------------------
# Small drawing helpers. Shapes live in "unit" coordinates of a cell: u = dx / rx, v = dy / ry, the cell body is
# the unit disc (perturbed); signed distances are in those units and turned into soft edges with px_per_unit.


def _soft(sdf, px_per_unit):
  return np.clip(0.5 - sdf * px_per_unit, 0.0, 1.0).astype(np.float32)


def _harmonics(rng, ks, amp):
  return [(k, amp * rng.uniform(0.4, 1.0), rng.uniform(0.0, 2.0 * np.pi)) for k in ks]


def _radius(theta, harm):
  r = np.ones_like(theta)
  for k, a, p in harm:
    r += a * np.cos(k * theta + p)
  return r


def _noise(rng, h, w, period):
  """Smooth standard-normal-ish noise of shape (h, w) with features about `period` pixels wide."""
  gh, gw = max(2, int(math.ceil(h / period)) + 1), max(2, int(math.ceil(w / period)) + 1)
  grid = rng.standard_normal((gh, gw)).astype(np.float32)
  img = Image.fromarray(grid, mode='F').resize((w, h), Image.BILINEAR)
  out = np.asarray(img, np.float32)
  return out / (out.std() + 1e-6)


def _capsule_sdf(u, v, a, b, r):
  pa_u, pa_v = u - a[0], v - a[1]
  ba_u, ba_v = b[0] - a[0], b[1] - a[1]
  h = np.clip((pa_u * ba_u + pa_v * ba_v) / (ba_u * ba_u + ba_v * ba_v + 1e-9), 0.0, 1.0)
  return np.hypot(pa_u - ba_u * h, pa_v - ba_v * h) - r


def _dots(rng, mask, count, sigma):
  """A map of `count` soft dots placed at random pixels where `mask` is true (peak about 1)."""
  ys, xs = np.nonzero(mask)
  out = np.zeros(mask.shape, np.float32)
  if len(ys) == 0 or count <= 0:
    return out
  idx = rng.integers(0, len(ys), size=count)
  np.add.at(out, (ys[idx], xs[idx]), 1.0)
  if sigma > 0:
    out = ndimage.gaussian_filter(out, sigma) * (2.0 * np.pi * sigma * sigma)
  return np.minimum(out, 1.6)


# ----------------------------------------------------------------------------------------------------------------
# Stain, scene and cell sampling.


def _patient_stain(seed: int, patient: int) -> dict:
  rng = np.random.default_rng([seed, 7, patient])
  pink = rng.random() < 0.25
  bg = _BG * (1.0 + rng.normal(0.0, 0.035, 3))
  if pink:
    rbc = _od((150, 110, 138), (172, 164, 166))
    bg = np.array([172.0, 164.0, 166.0]) * (1.0 + rng.normal(0.0, 0.03, 3))
  else:
    rbc = _od((110, 112, 136))
  return dict(
      bg=bg.astype(np.float32),
      rbc=(rbc * rng.uniform(0.8, 1.2) * (1.0 + rng.normal(0.0, 0.06, 3))).astype(np.float32),
      nucleus=(_OD_NUCLEUS * rng.uniform(0.85, 1.15) * (1.0 + rng.normal(0.0, 0.06, 3))).astype(np.float32),
      cyto=float(rng.uniform(0.85, 1.2)),
      crenated=float(rng.uniform(0.0, 0.35)),
  )


def _sample_attributes(rng, cls: int) -> tuple[int, ...]:
  if cls == 0:
    return (F.NOT_APPLICABLE,) * F.NUM_ATTRIBUTES
  size_p, *binary = _ATTRIBUTE_TABLE[F.CLASS_NAMES[cls]]
  size = int(rng.choice(3, p=np.asarray(size_p) / np.sum(size_p)))
  return (size,) + tuple(int(rng.random() < p) for p in binary)


def _render_wbc(rng, cls: int, attrs, stain: dict, scale: float):
  """Draws one white cell on its own patch.

  Returns (od patch (h, w, 3), alpha (h, w), tight box (x0, y0, x1, y1) in patch pixels) where the box is the
  tight box of the drawn cell (alpha > 0.5).
  """
  if cls == 0:
    width = rng.uniform(38.0, 75.0)
  else:
    width = _SIZE_WIDTH[attrs[0]] * rng.normal(1.0, 0.05)
  width *= scale
  height = width * ASPECT * rng.uniform(0.95, 1.05)
  rx, ry = width / 2.0, height / 2.0
  ppu = max(rx, 0.6)  # pixels per unit for soft edges (horizontal)

  if cls == 0:
    body_harm = _harmonics(rng, (2, 3, 4, 5, 7), 0.09)
  elif F.CLASS_NAMES[cls] in ('Monocyte', 'Atypical lymphocyte', 'Promonocyte'):
    body_harm = _harmonics(rng, (2, 3, 5, 7), 0.035)
  else:
    body_harm = _harmonics(rng, (2, 3, 4), 0.02)
  max_r = 1.0 + sum(a for _, a, _ in body_harm) + 0.05
  pad = 3
  hw, hh = int(math.ceil(rx * max_r)) + pad, int(math.ceil(ry * max_r)) + pad
  xs = (np.arange(2 * hw + 1, dtype=np.float32) - hw) / rx
  ys = (np.arange(2 * hh + 1, dtype=np.float32) - hh) / ry
  u, v = np.meshgrid(xs, ys)
  r = np.hypot(u, v)
  theta = np.arctan2(v, u)
  body_sdf = r - _radius(theta, body_harm)
  h, w = u.shape

  if cls == 0:
    od, alpha = _render_none(rng, u, v, r, theta, body_sdf, ppu, stain, scale)
  else:
    od, alpha = _render_classified(rng, cls, attrs, u, v, r, theta, body_sdf, ppu, stain, scale)

  ys_on, xs_on = np.nonzero(alpha > 0.5)
  if len(ys_on) == 0:
    box = (hw - 1.0, hh - 1.0, hw + 1.0, hh + 1.0)
  else:
    box = (float(xs_on.min()), float(ys_on.min()), float(xs_on.max() + 1), float(ys_on.max() + 1))
  return od, alpha, box


def _render_classified(rng, cls, attrs, u, v, r, theta, body_sdf, ppu, stain, scale):
  name = F.CLASS_NAMES[cls]
  style = _STYLE[name]
  size, coarse, irregular, nucleolus, abundant, moderate, vacuoles = attrs
  h, w = u.shape
  cell_a = _soft(body_sdf, ppu)

  # Nucleus.
  lo, hi = style['nc'][abundant]
  rn = rng.uniform(lo, hi)
  slack = max(0.0, 0.93 - rn)
  ang = rng.uniform(0, 2 * np.pi)
  off = slack * rng.uniform(0.3, 1.0)
  ox, oy = off * math.cos(ang), off * math.sin(ang)
  nu, nv = u - ox, v - oy
  ea = rng.uniform(0.9, 1.12)
  nr = np.hypot(nu / ea, nv * ea)
  nth = np.arctan2(nv, nu)
  style_irr = style['irr'] if irregular else 'round'
  if style_irr in ('lobed4', 'lobed2', 'bilobed'):
    if style_irr == 'lobed4':
      k = int(rng.integers(3, 5))
      rl, rho, spread = rng.uniform(0.2, 0.24), 0.42, rng.uniform(3.4, 4.4)
    elif style_irr == 'lobed2':
      k = 2
      rl, rho, spread = rng.uniform(0.27, 0.32), 0.34, rng.uniform(2.2, 2.8)
    else:
      k = 2
      rl, rho, spread = rng.uniform(0.33, 0.38), 0.26, rng.uniform(2.4, 3.0)
    start = rng.uniform(0, 2 * np.pi)
    angles = start + np.linspace(0.0, spread, k)
    centres = [(rho * math.cos(a), rho * math.sin(a)) for a in angles]
    nuc_sdf = None
    for c in centres:
      rj = rl * rng.uniform(0.88, 1.1)
      d = np.hypot(u - c[0], v - c[1]) - rj
      nuc_sdf = d if nuc_sdf is None else np.minimum(nuc_sdf, d)
    for a_, b_ in zip(centres[:-1], centres[1:]):
      nuc_sdf = np.minimum(nuc_sdf, _capsule_sdf(u, v, a_, b_, 0.06 if style_irr != 'bilobed' else 0.14))
  else:
    harm = _harmonics(rng, (2, 3), 0.03)
    if style_irr == 'fold':
      harm += _harmonics(rng, (3, 4, 5), 0.07)
    nuc_sdf = nr - rn * _radius(nth, harm)
    if style_irr in ('kidney', 'kidneydeep', 'fold', 'cleft'):
      bite_r = {'kidney': (0.4, 0.5), 'kidneydeep': (0.5, 0.62), 'fold': (0.35, 0.5), 'cleft': (0.22, 0.3)}
      br = rn * rng.uniform(*bite_r[style_irr])
      bd = rn * (1.0 + (0.05 if style_irr != 'kidneydeep' else -0.1))
      ba = rng.uniform(0, 2 * np.pi)
      bite = np.hypot(nu - bd * math.cos(ba), nv - bd * math.sin(ba)) - br
      nuc_sdf = np.maximum(nuc_sdf, -bite)
  nuc_sdf = np.maximum(nuc_sdf, body_sdf + 0.04)
  nuc_a = _soft(nuc_sdf, ppu)

  # Chromatin texture: open = fine and smooth, coarse = clumped dark blotches.
  nuc_od = stain['nucleus'] * style['dark']
  if coarse:
    clumps = _noise(rng, h, w, max(1.0, 4.0 * scale)) + 0.5 * _noise(rng, h, w, max(1.0, 2.0 * scale))
    clumps = np.clip((clumps - 0.2) * 1.1, 0.0, 1.0)
    shade = 0.72 + 0.7 * clumps
    nuc_od = nuc_od * 1.12
  else:
    shade = 0.96 + 0.06 * _noise(rng, h, w, max(1.0, 2.0 * scale))
  shade = shade.astype(np.float32)
  if nucleolus and scale > 0.2:
    inside = nuc_sdf < -0.14
    ys, xs = np.nonzero(inside)
    if len(ys):
      for _ in range(int(rng.integers(1, 4))):
        j = rng.integers(len(ys))
        cu, cv = u[ys[j], xs[j]], v[ys[j], xs[j]]
        rad = rng.uniform(0.08, 0.13)
        spot = _soft(np.hypot(u - cu, (v - cv)) - rad, ppu)
        ring = _soft(np.abs(np.hypot(u - cu, v - cv) - rad - 0.02) - 0.015, ppu)
        shade = shade * (1.0 - 0.6 * spot) + 0.25 * ring
  elif nucleolus:
    shade = shade * 0.85

  # Cytoplasm.
  cyto_od = (_OD_CYTO_MODERATE if moderate else _OD_CYTO_SLIGHT) * np.asarray(style['tint'], np.float32)
  cyto_od = cyto_od * stain['cyto']
  cyto_shade = 1.0 + 0.06 * _noise(rng, h, w, max(1.0, 4.0 * scale))
  if moderate:  # darker blue rim
    cyto_shade = cyto_shade + 0.35 * np.clip((r - 0.75) / 0.25, 0.0, 1.0)
  od = cyto_od[None, None, :] * cyto_shade[..., None]

  cyto_only = (body_sdf < -0.06) & (nuc_sdf > 0.04)
  vac = None
  if vacuoles:
    # Punched-out holes a few pixels across (at 100x), inside the cytoplasm: large enough to survive the
    # downscaling a detector applies. Granules are not drawn over them.
    vac = np.zeros((h, w), np.float32)
    for _ in range(int(rng.integers(3, 7))):
      rad = rng.uniform(0.09, 0.15)
      room = cyto_only & (body_sdf < -rad) & (nuc_sdf > 0.5 * rad)
      ys, xs = np.nonzero(room if room.any() else cyto_only)
      if not len(ys):
        break
      j = rng.integers(len(ys))
      cu, cv = u[ys[j], xs[j]], v[ys[j], xs[j]]
      vac = np.maximum(vac, _soft(np.hypot(u - cu, v - cv) - rad, ppu))
    od = od * (1.0 - 0.95 * vac[..., None]) - 0.04 * vac[..., None]

  # Granules.
  gran = style['gran']
  gran_map = None
  if gran is not None:
    sig = {'fine': 0.6, 'dust': 0.6, 'pink': 0.8, 'orange': 1.1, 'purple': 1.3, 'heavy': 0.9}[gran] * scale
    count = {'fine': 120, 'dust': 40, 'pink': 80, 'orange': 170, 'purple': 45, 'heavy': 220}[gran]
    strength = {'fine': 0.5, 'dust': 0.5, 'pink': 0.7, 'orange': 1.0, 'purple': 1.1, 'heavy': 0.9}[gran]
    where = (body_sdf < -0.04) if gran in ('purple', 'heavy') else (cyto_only | ((body_sdf < -0.04) & (nuc_sdf > -0.02)))
    if scale >= 0.3:
      gran_map = _dots(rng, where, int(count * scale * scale) + 3, max(sig, 0.5)) * strength
    else:
      gran_map = where.astype(np.float32) * 0.25 * strength
    if gran == 'orange':  # eosinophil: granules pack the whole cytoplasm
      od = od * 0.6 + 0.3 * _OD_GRANULE[gran][None, None, :] * cyto_only[..., None]

  nuc_full = nuc_od[None, None, :] * shade[..., None]
  od = od * (1.0 - nuc_a[..., None]) + nuc_full * nuc_a[..., None]
  if gran_map is not None:
    if vac is not None:
      gran_map = gran_map * (1.0 - vac)
    od = od + gran_map[..., None] * _OD_GRANULE[gran][None, None, :]
  # Faint membrane.
  od = od + (4.0 * cell_a * (1.0 - cell_a))[..., None] * (0.15 * cyto_od[None, None, :])
  return od.astype(np.float32), cell_a


def _render_none(rng, u, v, r, theta, body_sdf, ppu, stain, scale):
  """Class None: smudge cells, broken cells and bare nuclei (attributes not applicable)."""
  h, w = u.shape
  kind = rng.choice(['smudge', 'broken', 'bare'], p=[0.5, 0.3, 0.2])
  cell_a = _soft(body_sdf, ppu)
  streak = _noise(rng, h, max(2, w), max(1.0, 5.0 * scale))
  if kind == 'smudge':
    strength = rng.uniform(0.35, 0.6)
    shade = strength * (0.8 + 0.35 * streak) * np.clip(1.2 - 0.6 * r, 0.3, 1.0)
    od = stain['nucleus'][None, None, :] * shade[..., None]
    return od.astype(np.float32), cell_a
  if kind == 'broken':
    frag = _soft(body_sdf + 0.12 * np.clip(streak, -1.0, 2.0), ppu)
    nuc_a = _soft(r - rng.uniform(0.45, 0.6) * _radius(theta, _harmonics(rng, (3, 5, 7), 0.12)), ppu)
    od = (_OD_CYTO_SLIGHT * 0.8)[None, None, :] * frag[..., None]
    od = od * (1.0 - nuc_a[..., None]) + stain['nucleus'][None, None, :] * (0.7 + 0.2 * streak)[..., None] * nuc_a[
        ..., None]
    alpha = np.maximum(frag, nuc_a)
    return od.astype(np.float32), alpha
  # Bare, pyknotic nucleus.
  nuc_a = _soft(r - 0.7 * _radius(theta, _harmonics(rng, (2, 3, 5), 0.08)), ppu)
  od = stain['nucleus'][None, None, :] * (1.15 + 0.15 * streak)[..., None]
  return od.astype(np.float32), nuc_a


def _draw_rbc(od, rng, cx, cy, rx, ry, stain, crenated, weight=None):
  H, W = od.shape[:2]
  ext = 1.15
  x0, x1 = max(0, int(cx - rx * ext) - 1), min(W, int(cx + rx * ext) + 2)
  y0, y1 = max(0, int(cy - ry * ext) - 1), min(H, int(cy + ry * ext) + 2)
  if x0 >= x1 or y0 >= y1:
    return
  u = ((np.arange(x0, x1, dtype=np.float32) - cx) / rx)[None, :]
  v = ((np.arange(y0, y1, dtype=np.float32) - cy) / ry)[:, None]
  r = np.hypot(u, v)
  theta = np.arctan2(v, u)
  p1, p2 = rng.uniform(0.0, 2.0 * np.pi, 2)
  a2, a3 = rng.uniform(0.01, 0.03, 2)
  bound = 1.0 + a2 * np.cos(2.0 * theta + p1) + a3 * np.cos(3.0 * theta + p2)
  if crenated:
    bound = bound + rng.uniform(0.04, 0.07) * np.cos(int(rng.integers(9, 15)) * theta + p1)
  a = np.clip(0.5 - (r - bound) * rx, 0.0, 1.0)
  pallor = rng.uniform(0.25, 0.6)
  r2 = r * r
  prof = 1.0 - pallor * np.exp(r2 * (-1.0 / 0.18)) + 0.18 * np.exp((r - 0.82) ** 2 * (-1.0 / 0.02))
  colour = stain['rbc'] * (rng.uniform(0.85, 1.15) if weight is None else weight)
  od[y0:y1, x0:x1] += (a * prof)[..., None] * colour[None, None, :]


def _paste(od, sprite, x, y):
  """od[y:y+h, x:x+w] += sprite, clipped to the image (x, y may be negative)."""
  H, W = od.shape[:2]
  h, w = sprite.shape[:2]
  sx0, sy0 = max(0, -x), max(0, -y)
  sx1, sy1 = min(w, W - x), min(h, H - y)
  if sx0 >= sx1 or sy0 >= sy1:
    return
  od[y + sy0:y + sy1, x + sx0:x + sx1] += sprite[sy0:sy1, sx0:sx1]


def _draw_blob(od, cx, cy, rx, ry, colour_od):
  H, W = od.shape[:2]
  x0, x1 = max(0, int(cx - rx) - 1), min(W, int(cx + rx) + 2)
  y0, y1 = max(0, int(cy - ry) - 1), min(H, int(cy + ry) + 2)
  if x0 >= x1 or y0 >= y1:
    return
  u = (np.arange(x0, x1, dtype=np.float32) - cx) / rx
  v = (np.arange(y0, y1, dtype=np.float32) - cy) / ry
  r = np.hypot(u[None, :], v[:, None])
  a = _soft(r - 1.0, max(rx, 0.7))
  od[y0:y1, x0:x1] += a[..., None] * colour_od[None, None, :]


def _inside_boxes(x, y, boxes, margin=0.0):
  if not boxes:
    return np.zeros(np.shape(x), bool)
  b = np.asarray(boxes, np.float32)
  x = np.asarray(x, np.float32)[..., None]
  y = np.asarray(y, np.float32)[..., None]
  return np.any((x > b[:, 0] - margin) & (x < b[:, 2] + margin) & (y > b[:, 1] - margin) & (y < b[:, 3] + margin),
                axis=-1)


def _iou(a, b):
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = ix * iy
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / union if union > 0 else 0.0


def _rbc_layer_sprites(od, rng, count, scale, stain, wbc_boxes):
  """Many tiny red cells (10x fields): a few sprites stamped at integer positions by FFT convolution."""
  H, W = od.shape[:2]
  xs = rng.uniform(0, W, count)
  ys = rng.uniform(0, H, count)
  keep = ~_inside_boxes(xs, ys, wbc_boxes, margin=1.0)
  xs, ys = xs[keep].astype(np.int64), ys[keep].astype(np.int64)
  n_var = 2
  group = rng.integers(0, n_var, size=len(xs))
  total = np.zeros((H, W), np.float32)
  for g in range(n_var):
    rx = rng.uniform(13.0, 17.0) * scale
    ry = rx * ASPECT * rng.uniform(0.95, 1.1)
    hw, hh = int(math.ceil(rx * 1.2)) + 1, int(math.ceil(ry * 1.2)) + 1
    sprite = np.zeros((2 * hh + 1, 2 * hw + 1, 3), np.float32)
    _draw_rbc(sprite, rng, hw + rng.uniform(-0.5, 0.5), hh + rng.uniform(-0.5, 0.5), rx, ry,
              dict(rbc=np.ones(3, np.float32)), False)
    sel = group == g
    counts = np.bincount(ys[sel] * W + xs[sel], minlength=H * W).reshape(H, W).astype(np.float32)
    total += signal.fftconvolve(counts, sprite[..., 0], mode='same').astype(np.float32)
  od += total[..., None] * stain['rbc'][None, None, :]


_NOISE_BANK = []


def _sensor_noise(rng):
  """A (640, 640, 3) standard-normal noise field: a random window of a fixed bank (fast, deterministic)."""
  if not _NOISE_BANK:
    _NOISE_BANK.append(np.random.default_rng(20240601).standard_normal((SIZE + 384, SIZE + 384, 3), np.float32))
  oy, ox = (int(t) for t in rng.integers(0, 385, size=2))
  return _NOISE_BANK[0][oy:oy + SIZE, ox:ox + SIZE]


def _pick_counts(rng, mag):
  if mag == '100x':
    return int(rng.integers(1, 7)), int(rng.integers(30, 81))
  if mag == '40x':
    return int(rng.integers(3, 16)), int(rng.integers(190, 420))
  return int(rng.integers(5, 41)), int(rng.integers(3000, 7000))


def render_field(seed: int, subset: str, patient: int, image: int, leukemia_type: str):
  """Renders one field. Returns (uint8 image (640, 640, 3), cells) with cells a list of dicts:

  `box` (x0, y0, x1, y1) in pixels, `cls` (int), `attrs` (7 ints, -1 = not applicable).
  """
  domain = F.parse_subset_name(subset)
  if domain is None:
    raise ValueError(f'not an LLD subset name: {subset!r}')
  subset_idx = F.SUBSETS.index(domain.subset)
  rng = np.random.default_rng([seed, subset_idx, patient, image])
  stain = _patient_stain(seed, patient)
  scale = MAG_SCALE[domain.magnification]
  H = W = SIZE
  od = np.zeros((H, W, 3), np.float32)

  n_wbc, n_rbc = _pick_counts(rng, domain.magnification)
  mix = np.asarray(_CLASS_MIX[leukemia_type], np.float64)
  mix = mix / mix.sum()

  # White cells: rendered on their own patches, placed with at most 0.1 IoU between each other.
  placed = []  # (x, y, od, alpha, box)
  boxes = []
  for _ in range(n_wbc):
    cls = int(rng.choice(F.NUM_CLASSES, p=mix))
    attrs = _sample_attributes(rng, cls)
    p_od, p_a, pbox = _render_wbc(rng, cls, attrs, stain, scale)
    ph, pw = p_a.shape
    if ph >= H or pw >= W:
      continue
    for _try in range(40):
      x = int(rng.integers(0, W - pw + 1))
      y = int(rng.integers(0, H - ph + 1))
      box = (x + pbox[0], y + pbox[1], x + pbox[2], y + pbox[3])
      if all(_iou(box, b) <= 0.1 for b in boxes):
        placed.append((x, y, p_od, p_a))
        boxes.append(box)
        cells_cls_attrs = (cls, attrs)
        placed[-1] = placed[-1] + (cells_cls_attrs,)
        break

  # Red cells, avoiding the white cells' centres region; then platelets and debris.
  if scale >= 0.3:
    crenated_p = stain['crenated']
    sprites = None
    if scale < 0.9:  # 40x: a few pre-drawn red cells pasted many times (much faster than drawing each)
      sprites = []
      for k in range(8):
        rx = rng.uniform(12.5, 17.5) * scale
        ry = rx * ASPECT * rng.uniform(0.95, 1.12)
        hw, hh = int(math.ceil(rx * 1.2)) + 1, int(math.ceil(ry * 1.2)) + 1
        spr = np.zeros((2 * hh + 1, 2 * hw + 1, 3), np.float32)
        _draw_rbc(spr, rng, hw + rng.uniform(-0.5, 0.5), hh + rng.uniform(-0.5, 0.5), rx, ry, stain,
                  rng.random() < crenated_p, weight=1.0)
        sprites.append((spr, hw, hh))
    n_done = 0
    for _ in range(n_rbc * 2):
      if n_done >= n_rbc:
        break
      cx, cy = rng.uniform(-10, W + 10), rng.uniform(-10, H + 10)
      m = -6 * scale
      if any(b[0] - m < cx < b[2] + m and b[1] - m < cy < b[3] + m for b in boxes):
        continue
      if sprites is not None:
        spr, hw, hh = sprites[int(rng.integers(len(sprites)))]
        _paste(od, spr * np.float32(rng.uniform(0.85, 1.15)), int(cx) - hw, int(cy) - hh)
      else:
        rx = rng.uniform(12.5, 17.5) * scale
        ry = rx * ASPECT * rng.uniform(0.95, 1.12)
        _draw_rbc(od, rng, cx, cy, rx, ry, stain, rng.random() < crenated_p)
      n_done += 1
    n_plt = int(rng.integers(3, 14) / (scale * scale) ** 0.5)
    plt_od = _od((110, 70, 130))
    for _ in range(n_plt):
      cx, cy = rng.uniform(0, W), rng.uniform(0, H)
      for _k in range(int(rng.integers(1, 4))):
        prx = rng.uniform(3.0, 6.0) * scale
        _draw_blob(od, cx + rng.normal(0, 6 * scale), cy + rng.normal(0, 10 * scale), prx, prx * ASPECT,
                   plt_od * rng.uniform(0.5, 1.0))
    for _ in range(int(rng.integers(5, 20))):
      prx = rng.uniform(0.8, 2.0) * max(scale, 0.5)
      _draw_blob(od, rng.uniform(0, W), rng.uniform(0, H), prx, prx * ASPECT, _od((60, 60, 70)) * rng.uniform(0.3, 1))
  else:
    _rbc_layer_sprites(od, rng, n_rbc, scale, stain, boxes)
    for _ in range(int(rng.integers(10, 40))):
      _draw_blob(od, rng.uniform(0, W), rng.uniform(0, H), 0.7, 1.1, _od((70, 60, 90)) * rng.uniform(0.3, 1))

  cells = []
  for (x, y, p_od, p_a, (cls, attrs)), box in zip(placed, boxes):
    ph, pw = p_a.shape
    sl = od[y:y + ph, x:x + pw]
    sl *= (1.0 - p_a)[..., None]
    sl += p_od * p_a[..., None]
    cells.append(dict(box=box, cls=cls, attrs=tuple(F.NOT_APPLICABLE if a < 0 else a for a in attrs)))

  # Illumination: stained background, low-frequency unevenness, microscope cast and vignetting.
  yy = (np.arange(H, dtype=np.float32) / H - 0.5)[:, None]
  xx = (np.arange(W, dtype=np.float32) / W - 0.5)[None, :]
  gx, gy, q = rng.normal(0, 0.06), rng.normal(0, 0.06), rng.normal(0, 0.05)
  light = 1.0 + gx * xx + gy * yy + q * (xx * xx - yy * yy) + 0.03 * _noise(rng, H, W, 160.0)
  if domain.microscope == 'L':
    cast = np.array([1.06, 1.0, 0.84], np.float32) * (1.0 + rng.normal(0, 0.02, 3)).astype(np.float32)
    vig = rng.uniform(0.5, 0.8)
    blur = 1.6 * max(scale, 0.5)
  else:
    cast = np.ones(3, np.float32)
    vig = rng.uniform(0.05, 0.15)
    blur = 0.0
  light = light * (1.0 - vig * (xx * xx + yy * yy) * 2.0)
  bg = stain['bg'] * cast
  img = (light[..., None] * bg[None, None, :]) * np.exp(-od)

  # Camera.
  if domain.camera == 'C2':
    img = img * np.array([0.97, 1.0, 1.05], np.float32) + 5.0 * _sensor_noise(rng)[..., :1]
    img += 3.0 * _sensor_noise(rng)
  else:
    img += 1.5 * _sensor_noise(rng)
  pil = Image.fromarray(np.clip(img + 0.5, 0, 255).astype(np.uint8), 'RGB')
  if blur > 0:
    pil = pil.filter(ImageFilter.GaussianBlur(blur))
  if domain.camera == 'C2':
    buf = io.BytesIO()
    pil.save(buf, format='JPEG', quality=40)
    buf.seek(0)
    pil = Image.open(buf).convert('RGB')
  out = np.asarray(pil, np.uint8)

  # Registration noise on boxes carried to 40x / 10x.
  if domain.magnification != '100x':
    for c in cells:
      x0, y0, x1, y1 = c['box']
      bw, bh = x1 - x0, y1 - y0
      dx, dy = rng.normal(0, 0.08 * bw), rng.normal(0, 0.08 * bh)
      sw, sh = math.exp(rng.normal(0, 0.06)), math.exp(rng.normal(0, 0.06))
      cx, cy = (x0 + x1) / 2 + dx, (y0 + y1) / 2 + dy
      bw, bh = bw * sw, bh * sh
      c['box'] = (max(0.0, cx - bw / 2), max(0.0, cy - bh / 2), min(float(W), cx + bw / 2), min(float(H), cy + bh / 2))
  return out, cells


# ----------------------------------------------------------------------------------------------------------------
# Writing the download.


def _leukemia_type(seed: int, patient: int) -> str:
  offset = int(np.random.default_rng([seed, 11]).integers(len(F.LEUKEMIA_TYPES)))
  return F.LEUKEMIA_TYPES[(patient - 1 + offset) % len(F.LEUKEMIA_TYPES)]


def split_patients(seed: int, patients: int, test_fraction: float) -> dict[str, list[int]]:
  ids = np.arange(1, patients + 1)
  perm = np.random.default_rng([seed, 13]).permutation(ids)
  n_test = int(round(test_fraction * patients))
  if patients >= 2:
    n_test = min(max(n_test, 1), patients - 1)
  else:
    n_test = 0
  return {'train': sorted(int(p) for p in perm[n_test:]), 'test': sorted(int(p) for p in perm[:n_test])}


def sparse_region(rng) -> tuple[int, int, int, int]:
  """A random rectangle of about one fifth of the field (x1, y1, x2, y2), integer pixels."""
  area = rng.uniform(0.17, 0.23) * SIZE * SIZE
  aspect = math.exp(rng.uniform(-0.6, 0.6))  # w / h
  w = min(SIZE, int(round(math.sqrt(area * aspect))))
  h = min(SIZE, int(round(area / w)))
  x1 = int(rng.integers(0, SIZE - w + 1))
  y1 = int(rng.integers(0, SIZE - h + 1))
  return x1, y1, x1 + w, y1 + h


def _save_png(array, path):
  Image.fromarray(array, 'RGB').save(path, format='PNG', compress_level=PNG_COMPRESS_LEVEL)


def _yolo_attrs(attrs):
  out = []
  for i, a in enumerate(attrs):
    if a == F.NOT_APPLICABLE:
      out.append(F.YOLO_SIZE_NOT_APPLICABLE if i == 0 else F.YOLO_BINARY_NOT_APPLICABLE)
    else:
      out.append(int(a))
  return out


def _yolo_row(cell, region=None):
  x0, y0, x1, y1 = cell['box']
  xc, yc, w, h = (x0 + x1) / 2 / SIZE, (y0 + y1) / 2 / SIZE, (x1 - x0) / SIZE, (y1 - y0) / SIZE
  parts = [str(cell['cls'])] + [f'{min(max(t, 0.0), 1.0):.6f}' for t in (xc, yc, w, h)]
  if region is not None:
    parts += [str(int(t)) for t in region]
  parts += [str(a) for a in _yolo_attrs(cell['attrs'])]
  return ' '.join(parts)


def _draw_field(task) -> list[dict]:
  """Renders one field, writes its PNG and returns its cells (a worker process's unit of work)."""
  seed, subset, patient, image, leukemia_type, path = task
  pixels, cells = render_field(seed, subset, patient, image, leukemia_type)
  _save_png(pixels, path)
  return cells


def _coco_categories():
  return [{'id': i + 1, 'name': name, 'supercategory': 'cell'} for i, name in enumerate(F.CLASS_NAMES)]


def generate(out_dir: str,
             layout: str = 'coco',
             subsets: Sequence[str] = ('H_100x_C1',),
             patients: int = 6,
             images_per_patient: int = 4,
             seed: int = 0,
             test_fraction: float = 0.25,
             workers: int = 1,
             test_images_per_patient: int | None = None) -> dict:
  """Writes a synthetic LLD download under `out_dir` and returns a summary dict.

  Summary: {'layout', 'out_dir', 'seed', 'patients': {'train': [...], 'test': [...]}, 'leukemia_types':
  {patient: type}, 'subsets': {subset: {split: {'images': n, 'cells': n, 'labelled_cells': n}}}}.
  `cells` counts every white cell drawn; `labelled_cells` those written to the labels (differs only for the
  sparse train split). `workers` > 1 draws the fields in that many processes (the same files).
  `test_images_per_patient` (default `images_per_patient`) sets the test patients' fields apart: a field is drawn
  from (seed, subset, patient, image number) alone, so a test split of fewer fields is the first of the same ones.
  """
  if workers < 1:
    raise ValueError(f'workers must be at least 1, got {workers}')
  fields_per_patient = {'train': images_per_patient,
                        'test': images_per_patient if test_images_per_patient is None else test_images_per_patient}
  for split_name, n in fields_per_patient.items():
    if n < 1:
      raise ValueError(f'{split_name} images per patient must be at least 1, got {n}')
  if layout not in LAYOUTS:
    raise ValueError(f'layout must be one of {LAYOUTS}, got {layout!r}')
  if isinstance(subsets, str):
    subsets = [s for s in subsets.split(',') if s]
  canon = []
  for s in subsets:
    d = F.parse_subset_name(s)
    if d is None:
      raise ValueError(f'not an LLD subset name: {s!r}')
    canon.append(d.subset)
  split = split_patients(seed, patients, test_fraction)
  types = {p: _leukemia_type(seed, p) for p in range(1, patients + 1)}
  summary = dict(layout=layout, out_dir=str(out_dir), seed=seed, patients=split, leukemia_types=types, subsets={})
  # Spawned, not forked: a caller may have started threads (JAX does), and a forked child can deadlock on their locks.
  pool = (concurrent.futures.ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context('spawn'))
          if workers > 1 else None)
  try:
    for subset in canon:
      summary['subsets'][subset] = _write_subset(out_dir, layout, subset, split, types, fields_per_patient, seed,
                                                 pool)
  finally:
    if pool is not None:
      pool.shutdown()
  return summary


def _write_subset(out_dir, layout, subset, split, types, fields_per_patient, seed, pool) -> dict:
  """Writes one subset's images and labels ({split: fields per patient}); returns its {split: counts}."""
  mag_code = F.MAGNIFICATION_FILE_CODE[F.parse_subset_name(subset).magnification]
  root = os.path.join(out_dir, subset)
  sub_summary = {}
  for split_name in SPLITS:
    if layout == 'coco':
      img_dir = os.path.join(root, 'Images', split_name)
      os.makedirs(os.path.join(root, 'json_labels'), exist_ok=True)
    else:
      img_dir = os.path.join(root, 'images', split_name)
      lbl_dir = os.path.join(root, 'labels', split_name)
      os.makedirs(lbl_dir, exist_ok=True)
    os.makedirs(img_dir, exist_ok=True)
    fields = [(patient, image, f'{patient}_{image}_{mag_code}_{types[patient]}')
              for patient in split[split_name] for image in range(1, fields_per_patient[split_name] + 1)]
    tasks = [(seed, subset, patient, image, types[patient], os.path.join(img_dir, stem + '.png'))
             for patient, image, stem in fields]
    drawn = pool.map(_draw_field, tasks, chunksize=4) if pool is not None else map(_draw_field, tasks)
    coco = dict(info={'description': 'synthetic LLD (tfds_lld.synthetic)', 'version': '1.0'}, images=[],
                annotations=[], categories=_coco_categories())
    n_images = n_cells = n_labelled = 0
    for (patient, image, stem), cells in zip(fields, drawn):
      n_images += 1
      n_cells += len(cells)
      if layout == 'coco':
        image_id = len(coco['images']) + 1
        coco['images'].append(dict(id=image_id, file_name=stem + '.png', width=SIZE, height=SIZE))
        for cell in cells:
          x0, y0, x1, y1 = cell['box']
          w, h = x1 - x0, y1 - y0
          ann = dict(id=len(coco['annotations']) + 1, image_id=image_id, category_id=cell['cls'] + 1,
                     bbox=[round(x0, 2), round(y0, 2), round(w, 2), round(h, 2)], area=round(w * h, 2),
                     iscrowd=0)
          for name, value in zip(F.ATTRIBUTE_NAMES, cell['attrs']):
            key = F.COCO_ATTRIBUTE_KEYS[name][0]
            ann[key] = F.COCO_NOT_APPLICABLE if value == F.NOT_APPLICABLE else int(value)
          coco['annotations'].append(ann)
        n_labelled += len(cells)
      else:
        region = None
        rows_cells = cells
        if layout == 'sparse':
          if split_name == 'train':
            region = sparse_region(np.random.default_rng([seed, 17, F.SUBSETS.index(subset), patient, image]))
            rows_cells = [c for c in cells if region[0] <= (c['box'][0] + c['box'][2]) / 2 < region[2]
                          and region[1] <= (c['box'][1] + c['box'][3]) / 2 < region[3]]
          else:
            region = (0, 0, SIZE, SIZE)
        rows = [_yolo_row(c, region) for c in rows_cells]
        n_labelled += len(rows)
        with open(os.path.join(lbl_dir, stem + '.txt'), 'w') as f:
          f.write(''.join(row + '\n' for row in rows))
    if layout == 'coco':
      with open(os.path.join(root, 'json_labels', split_name + '.json'), 'w') as f:
        json.dump(coco, f)
    sub_summary[split_name] = dict(images=n_images, cells=n_cells, labelled_cells=n_labelled)
  return sub_summary


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out', required=True, help='output folder (the fake download root)')
  parser.add_argument('--layout', choices=LAYOUTS, default='coco')
  parser.add_argument('--subsets', default='H_100x_C1', help='comma-separated subset names, e.g. H_100x_C1,L_40x_C2')
  parser.add_argument('--patients', type=int, default=6)
  parser.add_argument('--images-per-patient', type=int, default=4)
  parser.add_argument('--test-images-per-patient', type=int, default=None,
                      help='fields per test patient (default: --images-per-patient)')
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--test-fraction', type=float, default=0.25)
  parser.add_argument('--workers', type=int, default=1, help='processes drawing fields in parallel (same files)')
  args = parser.parse_args(argv)
  summary = generate(args.out, args.layout, subsets=args.subsets.split(','), patients=args.patients,
                     images_per_patient=args.images_per_patient, seed=args.seed, test_fraction=args.test_fraction,
                     workers=args.workers, test_images_per_patient=args.test_images_per_patient)
  print(json.dumps(summary['subsets'], indent=1))
  print('patients:', json.dumps(summary['patients']))


if __name__ == '__main__':
  main()
