"""Detections from model outputs: per-class non-maximum suppression against a greedy numpy reference."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lld_jax import metrics
from lld_jax import postprocess


def _greedy_nms_reference(boxes, scores, labels, iou_threshold):
  order = list(np.argsort(-scores, kind='stable'))
  kept = []
  while order:
    best = order.pop(0)
    kept.append(best)
    overlaps = metrics.box_iou(boxes[best][None], boxes[order])[0] if order else np.zeros(0)
    order = [i for i, iou in zip(order, overlaps) if labels[i] != labels[best] or iou <= iou_threshold]
  return np.asarray(kept, np.int64)


@pytest.mark.parametrize('iou_threshold', [0.3, 0.7])
def test_per_class_nms_matches_greedy_reference(iou_threshold):
  rng = np.random.default_rng(0)
  centres = rng.uniform(20, 200, (30, 2))
  sizes = rng.uniform(10, 40, (30, 2))
  boxes = np.concatenate([centres - sizes / 2, centres + sizes / 2], -1)
  boxes = np.concatenate([boxes, boxes + rng.normal(0, 2, boxes.shape)])  # near-duplicates, as early DETRs give
  scores = rng.permutation(np.linspace(0.05, 0.95, 60))  # distinct: the greedy order is unambiguous
  labels = rng.integers(0, 3, 60)
  kept = postprocess.per_class_nms(boxes, scores, labels, iou_threshold, max_output=60)
  expected = _greedy_nms_reference(boxes, scores, labels, iou_threshold)
  assert 0 < len(expected) < 60  # the case suppresses something and keeps something
  np.testing.assert_array_equal(kept, expected)
  np.testing.assert_array_equal(postprocess.per_class_nms(boxes, scores, labels, iou_threshold, max_output=5),
                                expected[:5])


def _duplicated_cell_outputs():
  """Three queries on one cell (two say class 0, one class 1), one query on another cell (class 0)."""
  boxes = np.array([[0.30, 0.30, 0.20, 0.20], [0.31, 0.30, 0.20, 0.20], [0.30, 0.31, 0.20, 0.20],
                    [0.70, 0.70, 0.20, 0.20]], np.float32)
  logits = np.full((4, 2), -8.0, np.float32)
  logits[0, 0], logits[1, 0], logits[2, 1], logits[3, 0] = 3.0, 2.0, 1.0, 0.0
  attribute_logits = np.zeros((4, 7, 3), np.float32)
  return logits, boxes, attribute_logits


def test_to_detections_suppresses_same_class_duplicates_only():
  logits, boxes, attribute_logits = _duplicated_cell_outputs()
  found = postprocess.to_detections(logits, boxes, attribute_logits, 100, 1.0, (100, 100), max_detections=3,
                                    score_threshold=0.01, nms_iou_threshold=0.7)
  # Query 1 repeats query 0's class on its box and goes; query 2's other class stays; the truncation to three
  # detections then reaches the second cell instead of the duplicate.
  assert found.labels.tolist() == [0, 1, 0]
  np.testing.assert_allclose(found.boxes[2], [60, 60, 80, 80], atol=1e-4)
  without = postprocess.to_detections(logits, boxes, attribute_logits, 100, 1.0, (100, 100), max_detections=3,
                                      score_threshold=0.01, nms_iou_threshold=1.0)
  assert without.labels.tolist() == [0, 0, 1]
  np.testing.assert_allclose(without.scores, 1 / (1 + np.exp(-np.array([3.0, 2.0, 1.0]))), rtol=1e-6)


def test_cell_classifier_scores_rank_classes_by_the_classifier():
  logits, boxes, attribute_logits = _duplicated_cell_outputs()
  logits[3, 1] = -0.5  # the decoder leans to class 0 for the second cell (0.5 against 0.38)...
  cell_class_logits = np.zeros((4, 2), np.float32)
  cell_class_logits[3] = [0.0, np.log(3.0)]  # ...the classifier to class 1, with probability 0.75
  scores = postprocess.class_scores(logits, cell_class_logits)
  decoder = 1 / (1 + np.exp(-logits[3].astype(np.float64)))
  np.testing.assert_allclose(scores[3], np.sqrt(decoder * [0.25, 0.75]), rtol=1e-6)
  np.testing.assert_allclose(scores[0], np.sqrt(1 / (1 + np.exp(-logits[0].astype(np.float64))) * 0.5), rtol=1e-6)
  found = postprocess.to_detections(logits, boxes, attribute_logits, 100, 1.0, (100, 100), max_detections=8,
                                    score_threshold=0.3, nms_iou_threshold=0.7, cell_class_logits=cell_class_logits)
  on_second_cell = np.isclose(found.boxes[:, 0], 60, atol=1e-3)
  assert found.labels[on_second_cell].tolist() == [1, 0]  # best first: the classifier's class wins
  np.testing.assert_allclose(found.scores[on_second_cell], scores[3, [1, 0]], rtol=1e-6)


def test_class_scores_on_jax_arrays_inside_jit_match_numpy():
  """The pseudo-label teacher scores its detections inside the train step with the evaluation's rule."""
  rng = np.random.default_rng(0)
  logits, cell_class_logits = rng.normal(0, 3, (2, 5, 4)), rng.normal(0, 3, (2, 5, 4))
  for cell in (None, cell_class_logits):
    jitted = jax.jit(postprocess.class_scores)(jnp.asarray(logits, jnp.float32),
                                               None if cell is None else jnp.asarray(cell, jnp.float32))
    assert jitted.dtype == jnp.float32
    np.testing.assert_allclose(np.asarray(jitted), postprocess.class_scores(logits, cell), rtol=1e-5, atol=1e-7)


def test_cell_classifier_logits_rule():
  outputs = {'logits': np.zeros((1, 4, 2)), 'cell_class_logits': np.ones((1, 4, 2))}
  assert postprocess.cell_classifier_logits(outputs, 'detector') is None
  assert postprocess.cell_classifier_logits(outputs, 'cell_classifier') is outputs['cell_class_logits']
  with pytest.raises(ValueError, match='needs a model with a cell classifier'):
    postprocess.cell_classifier_logits({'logits': outputs['logits']}, 'cell_classifier')
  with pytest.raises(ValueError, match="eval.class_scores='crops'"):
    postprocess.cell_classifier_logits(outputs, 'crops')


def test_one_per_cell_keeps_each_cell_once_with_its_best_class():
  logits, boxes, attribute_logits = _duplicated_cell_outputs()
  found = postprocess.to_detections(logits, boxes, attribute_logits, 100, 1.0, (100, 100), max_detections=8,
                                    score_threshold=0.0, nms_iou_threshold=0.7)
  cells = postprocess.one_per_cell(found, min_cell_score=0.3)
  # Query 0 answers the first cell (its duplicates 1 and 2 go, whatever their class); query 3 the second.
  assert cells.queries.tolist() == [0, 3] and cells.labels.tolist() == [0, 0]
  np.testing.assert_allclose(cells.cell_scores, 1 / (1 + np.exp(-np.array([3.0, 0.0]))), rtol=1e-6)
  assert postprocess.one_per_cell(found, min_cell_score=0.6).queries.tolist() == [0]
  # Without the class-agnostic step, the duplicate with another class stays (the per-class NMS removed query 1).
  assert postprocess.one_per_cell(found, min_cell_score=0.3, iou_threshold=1.0).queries.tolist() == [0, 2, 3]


def test_attribute_offsets_are_minus_strength_log_smoothed_prior():
  counts = np.array([[6, 2, 0], [9, 1, 5]])  # the second attribute is binary: its third slot is padding
  offsets = postprocess.attribute_offsets(counts, (3, 2), strength=0.5)
  expected = np.array([[-0.5 * np.log(7 / 11), -0.5 * np.log(3 / 11), -0.5 * np.log(1 / 11)],
                       [-0.5 * np.log(10 / 12), -0.5 * np.log(2 / 12), 0.0]])
  np.testing.assert_allclose(offsets, expected, rtol=1e-12)
  np.testing.assert_array_equal(postprocess.attribute_offsets(counts, (3, 2), strength=0.0), np.zeros((2, 3)))


def test_attribute_offsets_turn_a_close_call_to_the_rare_value_and_keep_its_probability():
  logits, boxes, attribute_logits = _duplicated_cell_outputs()
  attribute_logits[:, :, 2] = -1e9  # every attribute binary here: the third slot is padding, as the model pads it
  attribute_logits[:, 0, 0], attribute_logits[:, 0, 1] = 0.5, 0.0  # the common value, barely
  attribute_logits[:, 1, 0], attribute_logits[:, 1, 1] = 3.0, 0.0  # the common value, surely
  counts = np.zeros((7, 3), np.int64)
  counts[:, 0], counts[:, 1] = 88, 12  # the second value is rare, as prominent vacuoles are
  offsets = postprocess.attribute_offsets(counts, (2,) * 7, strength=1.0)
  plain = postprocess.to_detections(logits, boxes, attribute_logits, 100, 1.0, (100, 100), max_detections=3)
  adjusted = postprocess.to_detections(logits, boxes, attribute_logits, 100, 1.0, (100, 100), max_detections=3,
                                       attribute_logit_offsets=offsets)
  assert (plain.attributes[:, :2] == 0).all()
  assert (adjusted.attributes[:, 0] == 1).all()  # log(89/13) = 1.92 outweighs a margin of 0.5
  assert (adjusted.attributes[:, 1] == 0).all()  # but not one of 3
  np.testing.assert_allclose(adjusted.attribute_confidence[:, 0], 1 / (1 + np.exp(0.5)), rtol=1e-9)
  np.testing.assert_allclose(plain.attribute_confidence[:, 0], 1 / (1 + np.exp(-0.5)), rtol=1e-9)
  np.testing.assert_array_equal(adjusted.labels, plain.labels)
  np.testing.assert_array_equal(adjusted.scores, plain.scores)
