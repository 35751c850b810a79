"""Renders a small synthetic LLD download and plots it: docs/synthetic_grid.png and docs/synthetic_sparse.png.

  .venv/bin/python scripts/plot_synthetic.py [--out-dir docs] [--seed 0]

The labels are read back from the written files (COCO JSON and 16-column sparse YOLO text), so the figures also
show that the files say what the pixels show.
"""

import argparse
import json
import os
import sys
import tempfile

import matplotlib

matplotlib.use('Agg')
import matplotlib.patches as mpatches  # noqa: E402
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), '..'))
from tfds_lld import lld_format as F  # noqa: E402
from tfds_lld import synthetic  # noqa: E402

GRID_SUBSETS = ('H_100x_C1', 'H_100x_C2', 'L_100x_C1', 'L_100x_C2', 'H_40x_C1', 'H_10x_C1')
SHORT = (
    ('small', 'med', 'large'),
    ('open', 'coarse'),
    ('reg', 'irreg'),
    ('nucl-', 'nucl+'),
    ('scanty', 'abund'),
    ('slight', 'mod'),
    ('vac-', 'vac+'),
)
COLOURS = ('#7f7f7f', '#d62728', '#ff7f0e', '#2ca02c', '#9467bd', '#8c564b', '#e377c2', '#17becf', '#bcbd22',
           '#1f77b4', '#393b79', '#637939', '#e6550d', '#6b6ecf')


def _attr_words(values):
  return ' '.join(SHORT[i][v] for i, v in enumerate(values) if v != F.COCO_NOT_APPLICABLE)


def _best_image(coco, k):
  counts = {}
  for ann in coco['annotations']:
    counts[ann['image_id']] = counts.get(ann['image_id'], 0) + 1
  images = sorted(coco['images'], key=lambda im: im['file_name'])
  images = images[k % len(images):] + images[:k % len(images)]  # a different patient in each panel
  best = max(images[:2], key=lambda im: min(counts.get(im['id'], 0), 4))
  return best, [a for a in coco['annotations'] if a['image_id'] == best['id']]


def plot_grid(root, path):
  fig, axes = plt.subplots(2, 3, figsize=(14, 9.6), dpi=100)
  keys = [F.COCO_ATTRIBUTE_KEYS[n][0] for n in F.ATTRIBUTE_NAMES]
  for k, (ax, subset) in enumerate(zip(axes.flat, GRID_SUBSETS)):
    with open(os.path.join(root, subset, 'json_labels', 'train.json')) as fh:
      coco = json.load(fh)
    names = {c['id']: c['name'] for c in coco['categories']}
    image, anns = _best_image(coco, 2 * k)
    pixels = np.asarray(Image.open(os.path.join(root, subset, 'Images', 'train', image['file_name'])))
    ax.imshow(pixels)
    small = not subset.split('_')[1] == '100x'
    for ann in anns:
      x, y, w, h = ann['bbox']
      cls = [i for i, n in enumerate(F.CLASS_NAMES) if n == names[ann['category_id']]][0]
      colour = COLOURS[cls]
      ax.add_patch(mpatches.Rectangle((x, y), w, h, fill=False, lw=1.2, ec=colour))
      label = names[ann['category_id']]
      if not small:
        label += '\n' + _attr_words([ann[k] for k in keys])
      ax.text(x, y - 2, label, fontsize=6 if not small else 4.5, color='white', va='bottom',
              bbox=dict(facecolor=colour, alpha=0.6, pad=0.4, lw=0), clip_on=True)
    ax.set_title(f'{subset}   {image["file_name"]}', fontsize=9)
    ax.set_xticks([])
    ax.set_yticks([])
  fig.suptitle('Synthetic LLD fields (tfds_lld.synthetic): boxes, class, attributes', fontsize=11)
  fig.subplots_adjust(left=0.01, right=0.99, top=0.94, bottom=0.01, wspace=0.03, hspace=0.08)
  fig.savefig(path)
  plt.close(fig)


def plot_sparse(root, subset, path):
  folder = os.path.join(root, subset)
  stems = sorted(f[:-4] for f in os.listdir(os.path.join(folder, 'labels', 'train')))
  best = None
  for stem in stems:
    with open(os.path.join(folder, 'labels', 'train', stem + '.txt')) as fh:
      rows = [line.split() for line in fh.read().splitlines() if line.strip()]
    if best is None or len(rows) > len(best[1]):
      best = (stem, rows)
  stem, rows = best
  pixels = np.asarray(Image.open(os.path.join(folder, 'images', 'train', stem + '.png')))
  fig, ax = plt.subplots(figsize=(8, 8.3), dpi=100)
  ax.imshow(pixels)
  if rows:
    rx1, ry1, rx2, ry2 = map(int, rows[0][5:9])
    ax.add_patch(mpatches.Rectangle((rx1, ry1), rx2 - rx1, ry2 - ry1, fill=False, lw=2, ls='--', ec='yellow'))
    ax.text(rx1, ry2 + 4, 'annotated region', color='yellow', fontsize=8, va='top')
  for row in rows:
    cls = int(row[0])
    xc, yc, w, h = (float(t) * 640 for t in row[1:5])
    ax.add_patch(mpatches.Rectangle((xc - w / 2, yc - h / 2), w, h, fill=False, lw=1.2, ec=COLOURS[cls]))
    ax.text(xc - w / 2, yc - h / 2 - 1, F.CLASS_NAMES[cls], fontsize=6, color='white', va='bottom',
            bbox=dict(facecolor=COLOURS[cls], alpha=0.75, pad=0.5, lw=0))
  ax.set_title(f'{subset} sparse train field {stem}: {len(rows)} labelled cells inside the region; '
               'cells outside it are unlabelled', fontsize=8)
  ax.set_xticks([])
  ax.set_yticks([])
  fig.tight_layout()
  fig.savefig(path)
  plt.close(fig)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--out-dir', default=os.path.join(os.path.dirname(os.path.abspath(__file__)), '..', 'docs'))
  parser.add_argument('--seed', type=int, default=0)
  args = parser.parse_args()
  os.makedirs(args.out_dir, exist_ok=True)
  with tempfile.TemporaryDirectory() as tmp:
    synthetic.generate(os.path.join(tmp, 'coco'), 'coco', subsets=GRID_SUBSETS, patients=7, images_per_patient=1,
                       seed=args.seed, test_fraction=0.15)
    plot_grid(os.path.join(tmp, 'coco'), os.path.join(args.out_dir, 'synthetic_grid.png'))
    synthetic.generate(os.path.join(tmp, 'sparse'), 'sparse', subsets=['H_40x_C1'], patients=3, images_per_patient=2,
                       seed=args.seed, test_fraction=0.34)
    plot_sparse(os.path.join(tmp, 'sparse'), 'H_40x_C1', os.path.join(args.out_dir, 'synthetic_sparse.png'))
  for name in ('synthetic_grid.png', 'synthetic_sparse.png'):
    path = os.path.join(args.out_dir, name)
    print(path, f'{os.path.getsize(path) / 1e6:.2f} MB')


if __name__ == '__main__':
  main()
