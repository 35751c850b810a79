r"""Recall and precision per class of `lld_jax.predict`'s detections at cell-score thresholds, against the labels.

  python -m lld_jax.predict --workdir=RUN --images='../shared/data/txl_pbc/images/val/*' --out=PRED \
      --score_threshold=0.3
  python scripts/recall_at_threshold.py --predict_dir=PRED --dataset=txl_pbc --root=../shared/data/txl_pbc \
      --split=val [--thresholds=0.3,0.5]

mAP ranks the detections and ignores their scores; a user keeps those above a score. This says what that leaves:
per class, each threshold's detections are matched one-to-one to the labels at IoU >= 0.5, highest score first
(`lld_jax.metrics.match_strict`). The labels come from the download itself, read and checked by the dataset
builders' parsers (`--dataset=lld`: every LLD layout; `txl_pbc`), and are joined to the predicted images by file
name within `--split`. Predicted images without labels there are counted and named, not scored. Thresholds below
predict's own `--score_threshold` see only what predict kept.
"""

import argparse
import collections
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from lld_jax import metrics  # pylint: disable=g-import-not-at-top
from tfds_lld import lld_format  # pylint: disable=g-import-not-at-top
from tfds_lld import parsers  # pylint: disable=g-import-not-at-top


def labelled_images(dataset, root, split):
  """{image file name: parsers.ExampleRecord} of `split`, and the class names."""
  if dataset == 'txl_pbc':
    records, _, names = parsers.parse_txl_pbc(root)
  else:
    records, names = parsers.parse_lld(root)[0], list(lld_format.CLASS_NAMES)
  records = [r for r in records if r.split == split]
  if not records:
    raise ValueError(f'{root}: no {split} images')
  repeated = [n for n, c in collections.Counter(r.filename for r in records).items() if c > 1]
  if repeated:
    raise ValueError(f'{root}: {len(repeated)} {split} file names occur more than once (e.g. {repeated[0]}), so '
                     'predicted images cannot be joined to their labels by name')
  return {r.filename: r for r in records}, names


def counts(detections, images, records, num_classes, threshold):
  """True positives, detections and labels per class over the predicted images that have labels, and the names
  of those that have none."""
  tp, found, truth = (np.zeros(num_classes, np.int64) for _ in range(3))
  by_image = collections.defaultdict(list)
  for d in detections:
    if d['cell_score'] >= threshold:
      by_image[d['image_id']].append(d)
  unlabelled = []
  for image_id, info in images.items():
    record = records.get(os.path.basename(info['file_name']))
    if record is None:
      unlabelled.append(info['file_name'])
      continue
    kept = sorted(by_image[int(image_id)], key=lambda d: -d['score'])
    for k in range(num_classes):
      mine = [d for d in kept if d['category_id'] - 1 == k]
      xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in (d['bbox'] for d in mine)]).reshape(-1, 4)
      truth_boxes = record.boxes[record.labels == k]
      tp[k] += int((metrics.match_strict(truth_boxes, xyxy) >= 0).sum())
      found[k] += len(mine)
      truth[k] += len(truth_boxes)
  return tp, found, truth, unlabelled


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--predict_dir', required=True, help='the --out of lld_jax.predict')
  parser.add_argument('--dataset', choices=('lld', 'txl_pbc'), required=True)
  parser.add_argument('--root', required=True, help='the download the predicted images come from')
  parser.add_argument('--split', default='val')
  parser.add_argument('--thresholds', default='0.3,0.5')
  args = parser.parse_args()
  records, names = labelled_images(args.dataset, args.root, args.split)
  with open(os.path.join(args.predict_dir, 'detections.json')) as f:
    detections = json.load(f)
  with open(os.path.join(args.predict_dir, 'images.json')) as f:
    images = json.load(f)
  table = {}
  for threshold in map(float, args.thresholds.split(',')):
    tp, found, truth, unlabelled = counts(detections, images, records, len(names), threshold)
    table[threshold] = {name: {'recall': tp[k] / max(truth[k], 1), 'precision': tp[k] / max(found[k], 1),
                               'labels': int(truth[k]), 'detections': int(found[k])}
                        for k, name in enumerate(names)}
    rows = table[threshold].items()
    print(f'cell score >= {threshold:g}: ' + ', '.join(
        f'{name} recall {row["recall"]:.2f} precision {row["precision"]:.2f}' for name, row in rows))
  if unlabelled:
    print(f'{len(unlabelled)} of {len(images)} predicted images have no labels in the {args.split} split of '
          f'{args.root} and are not scored, e.g. {unlabelled[0]}', file=sys.stderr)
  print(json.dumps(table, indent=1))


if __name__ == '__main__':
  main()
