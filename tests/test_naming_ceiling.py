"""scripts/naming_ceiling.py on a hand-made split: two cells, found by boxes whose classes are wrong."""

import numpy as np
import pytest

from lld_jax import metrics
from repo import load_script

naming_ceiling = load_script('naming_ceiling')


def test_true_names_lift_found_cells_and_duplicates_collapse_per_box():
  truth = metrics.ImageTruth('0', 'H_100x_C1', 100, 100, boxes=np.array([[10., 10, 30, 30], [60, 60, 80, 80]]),
                             labels=np.array([0, 1]), attributes=np.zeros((2, 7), np.int64))
  boxes = np.array([[11., 10, 30, 31], [11, 10, 30, 31], [60, 61, 80, 80], [0, 70, 10, 90]])
  # The first box answers class 1 then class 0 (two detections of one query); the second cell is called
  # class 0; the last box finds nothing.
  prediction = metrics.ImagePrediction('0', boxes, scores=np.array([0.9, 0.5, 0.8, 0.7]), labels=np.array([1, 0, 0, 1]),
                                       attributes=np.zeros((4, 7), np.int64),
                                       cell_scores=np.array([0.9, 0.9, 0.8, 0.7]))
  result = naming_ceiling.naming_ceiling([truth], [prediction], ['a', 'b'])
  assert result['cells'] == 2 and result['found_at_iou_0.5'] == 1.0
  # As scored: class a ranks its cell behind a detection on the other cell (AP 0.5); class b never names its
  # cell (AP 0).
  assert result['mAP50'] == pytest.approx(0.25)
  # ...with the overlapped cells' names, each class ranks its cell first.
  assert result['mAP50_with_true_names'] == pytest.approx(1.0)
  # One detection per box: both cells ranked above the box that finds nothing.
  assert result['one_per_box_AP50'] == pytest.approx(1.0)
