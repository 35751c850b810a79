r"""Recall and precision per class of `lld_jax.predict`'s detections at cell-score thresholds, against YOLO labels.

  python -m lld_jax.predict --workdir=RUN --images='../shared/data/txl_pbc/images/val/*' --out=PRED \
      --score_threshold=0.3
  python scripts/recall_at_threshold.py --predict_dir=PRED --labels_dir=../shared/data/txl_pbc/labels/val \
      --class_names=WBC,RBC,Platelets [--thresholds=0.3,0.5]

mAP ranks the detections and ignores their scores; a user keeps those above a score. This says what that leaves:
per class, each threshold's detections are matched one-to-one to the labels at IoU >= 0.5, highest score first
(`lld_jax.metrics.match_strict`). Labels: one `<image stem>.txt` per image, rows `class xc yc w h ...` normalized
(the YOLO layouts of TXL-PBC and LLD); a missing file means no cells. Thresholds below predict's own
`--score_threshold` see only what predict kept.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lld_jax import metrics  # pylint: disable=g-import-not-at-top


def yolo_boxes(path, width, height):
  """Labels [n] and xyxy pixel boxes [n, 4] of one YOLO label file (none when it does not exist)."""
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      rows = [line.split() for line in f if line.strip()]
  labels = np.array([int(r[0]) for r in rows], np.int64)
  xc, yc, w, h = np.array([[float(v) for v in r[1:5]] for r in rows], np.float64).reshape(-1, 4).T
  return labels, np.stack([(xc - w / 2) * width, (yc - h / 2) * height, (xc + w / 2) * width,
                           (yc + h / 2) * height], 1)


def counts(detections, images, labels_dir, num_classes, threshold):
  """True positives, detections and labels per class, over every image predict processed."""
  tp, found, truth = (np.zeros(num_classes, np.int64) for _ in range(3))
  by_image = {}
  for d in detections:
    if d['cell_score'] >= threshold:
      by_image.setdefault(d['image_id'], []).append(d)
  for image_id, info in images.items():
    stem = os.path.splitext(os.path.basename(info['file_name']))[0]
    labels, boxes = yolo_boxes(os.path.join(labels_dir, stem + '.txt'), info['width'], info['height'])
    kept = sorted(by_image.get(int(image_id), []), key=lambda d: -d['score'])
    for k in range(num_classes):
      mine = [d for d in kept if d['category_id'] - 1 == k]
      xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in (d['bbox'] for d in mine)]).reshape(-1, 4)
      tp[k] += int((metrics.match_strict(boxes[labels == k], xyxy) >= 0).sum())
      found[k] += len(mine)
      truth[k] += int((labels == k).sum())
  return tp, found, truth


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--predict_dir', required=True, help='the --out of lld_jax.predict')
  parser.add_argument('--labels_dir', required=True, help='YOLO label files of the same images')
  parser.add_argument('--class_names', required=True, help='comma-separated, in class-index order')
  parser.add_argument('--thresholds', default='0.3,0.5')
  args = parser.parse_args()
  names = args.class_names.split(',')
  with open(os.path.join(args.predict_dir, 'detections.json')) as f:
    detections = json.load(f)
  with open(os.path.join(args.predict_dir, 'images.json')) as f:
    images = json.load(f)
  table = {}
  for threshold in map(float, args.thresholds.split(',')):
    tp, found, truth = counts(detections, images, args.labels_dir, len(names), threshold)
    table[threshold] = {name: {'recall': tp[k] / max(truth[k], 1), 'precision': tp[k] / max(found[k], 1),
                               'labels': int(truth[k]), 'detections': int(found[k])}
                        for k, name in enumerate(names)}
    rows = table[threshold].items()
    print(f'cell score >= {threshold:g}: ' + ', '.join(
        f'{name} recall {row["recall"]:.2f} precision {row["precision"]:.2f}' for name, row in rows))
  print(json.dumps(table, indent=1))


if __name__ == '__main__':
  main()
