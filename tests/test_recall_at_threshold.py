"""scripts/recall_at_threshold.py on a hand-made TXL-PBC download."""

import numpy as np
from PIL import Image
import pytest

from repo import load_script

recall_at_threshold = load_script('recall_at_threshold')


def _download(root, labels):
  """A TXL-PBC folder with classes A, B and 200 x 100 val images {stem: YOLO label text or None (no file)}."""
  (root / 'images' / 'val').mkdir(parents=True)
  (root / 'labels' / 'val').mkdir(parents=True)
  (root / 'data.yaml').write_text("train: ./images/train/\nval: ./images/val/\nnc: 2\nnames: ['A', 'B']\n")
  for stem, text in labels.items():
    Image.new('RGB', (200, 100)).save(root / 'images' / 'val' / f'{stem}.png')
    if text is not None:
      (root / 'labels' / 'val' / f'{stem}.txt').write_text(text)


def _detection(image_id, label, xywh, score):
  return {'image_id': image_id, 'category_id': label + 1, 'bbox': list(xywh), 'score': score, 'cell_score': score}


def test_counts_by_class_and_threshold(tmp_path):
  # a: class 0 at x 20-60, y 10-50; class 1 at x 100-140, y 50-90. b: no label file, so no cells.
  _download(tmp_path, {'a': '0 0.2 0.3 0.2 0.4\n1 0.6 0.7 0.2 0.4\n', 'b': None})
  records, names = recall_at_threshold.labelled_images('txl_pbc', str(tmp_path), 'val')
  assert names == ['A', 'B'] and sorted(records) == ['a.png', 'b.png']
  images = {'0': {'file_name': 'some/dir/a.png', 'width': 200, 'height': 100},
            '1': {'file_name': 'b.png', 'width': 200, 'height': 100},
            '2': {'file_name': 'elsewhere.png', 'width': 50, 'height': 50}}
  detections = [
      _detection(0, 0, (20, 10, 40, 40), 0.9),   # the class-0 cell
      _detection(0, 0, (22, 12, 40, 40), 0.8),   # its duplicate: a false positive
      _detection(0, 1, (100, 50, 40, 40), 0.4),  # the class-1 cell, below 0.5
      _detection(0, 1, (20, 10, 40, 40), 0.95),  # class 1 on the class-0 cell: a false positive
      _detection(1, 0, (5, 5, 10, 10), 0.7),     # nothing there
      _detection(2, 0, (5, 5, 10, 10), 0.9),     # an image without labels: not scored
  ]
  tp, found, truth, unlabelled = recall_at_threshold.counts(detections, images, records, 2, 0.3)
  np.testing.assert_array_equal(tp, [1, 1])
  np.testing.assert_array_equal(found, [3, 2])
  np.testing.assert_array_equal(truth, [1, 1])
  assert unlabelled == ['elsewhere.png']
  tp, found, truth, _ = recall_at_threshold.counts(detections, images, records, 2, 0.5)
  np.testing.assert_array_equal(tp, [1, 0])
  np.testing.assert_array_equal(found, [3, 1])
  np.testing.assert_array_equal(truth, [1, 1])


def test_bad_label_row_names_the_file_and_line(tmp_path):
  _download(tmp_path, {'a': '0 0.2 0.3 0.2 0.4\n0 0.2 0.3 0.2\n'})
  with pytest.raises(ValueError, match=r'a\.txt:2: wrong column count 4'):
    recall_at_threshold.labelled_images('txl_pbc', str(tmp_path), 'val')


def test_split_without_images(tmp_path):
  _download(tmp_path, {'a': '0 0.2 0.3 0.2 0.4\n'})
  with pytest.raises(ValueError, match='no test images'):
    recall_at_threshold.labelled_images('txl_pbc', str(tmp_path), 'test')
