"""scripts/recall_at_threshold.py on a hand-made case."""

import importlib.util
import os

import numpy as np

_PATH = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), 'scripts', 'recall_at_threshold.py')
_spec = importlib.util.spec_from_file_location('recall_at_threshold', _PATH)
recall_at_threshold = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(recall_at_threshold)


def _detection(image_id, label, xywh, score):
  return {'image_id': image_id, 'category_id': label + 1, 'bbox': list(xywh), 'score': score, 'cell_score': score}


def test_counts_by_class_and_threshold(tmp_path):
  # Image 0 (200 x 100): class 0 at x 20-60, y 10-50; class 1 at x 100-140, y 50-90. Image 1 has no label file.
  (tmp_path / 'a.txt').write_text('0 0.2 0.3 0.2 0.4\n1 0.6 0.7 0.2 0.4 1 2 3\n')
  images = {'0': {'file_name': 'dir/a.png', 'width': 200, 'height': 100},
            '1': {'file_name': 'b.jpg', 'width': 50, 'height': 50}}
  detections = [
      _detection(0, 0, (20, 10, 40, 40), 0.9),   # the class-0 cell
      _detection(0, 0, (22, 12, 40, 40), 0.8),   # its duplicate: a false positive
      _detection(0, 1, (100, 50, 40, 40), 0.4),  # the class-1 cell, below 0.5
      _detection(0, 1, (20, 10, 40, 40), 0.95),  # class 1 on the class-0 cell: a false positive
      _detection(1, 0, (5, 5, 10, 10), 0.7),     # nothing there
  ]
  tp, found, truth = recall_at_threshold.counts(detections, images, str(tmp_path), 2, 0.3)
  np.testing.assert_array_equal(tp, [1, 1])
  np.testing.assert_array_equal(found, [3, 2])
  np.testing.assert_array_equal(truth, [1, 1])
  tp, found, truth = recall_at_threshold.counts(detections, images, str(tmp_path), 2, 0.5)
  np.testing.assert_array_equal(tp, [1, 0])
  np.testing.assert_array_equal(found, [3, 1])
  np.testing.assert_array_equal(truth, [1, 1])


def test_yolo_boxes_in_pixels_and_missing_file(tmp_path):
  (tmp_path / 'a.txt').write_text('2 0.5 0.5 0.5 0.25\n')
  labels, boxes = recall_at_threshold.yolo_boxes(str(tmp_path / 'a.txt'), 400, 200)
  np.testing.assert_array_equal(labels, [2])
  np.testing.assert_allclose(boxes, [[100, 75, 300, 125]])
  labels, boxes = recall_at_threshold.yolo_boxes(str(tmp_path / 'missing.txt'), 400, 200)
  assert labels.shape == (0,) and boxes.shape == (0, 4)
