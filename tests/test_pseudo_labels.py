"""Pseudo-labels: only outside the annotated region, never over a labelled cell, with the configured weight,
and none during the warm-up."""

import jax
import jax.numpy as jnp
import numpy as np

from lld_jax import pseudo_labels

K, A, V = 3, 7, 3


def _scene(seed=0, num_queries=40, num_targets=4):
  rng = np.random.default_rng(seed)
  centres = rng.uniform(0.05, 0.95, (1, num_queries, 2))
  sizes = rng.uniform(0.03, 0.1, (1, num_queries, 2))
  teacher_boxes = np.concatenate([centres, sizes], -1).astype(np.float32)
  teacher_logits = rng.normal(0, 4, (1, num_queries, K)).astype(np.float32)
  teacher_attributes = rng.normal(0, 1, (1, num_queries, A, V)).astype(np.float32)
  mask = np.zeros((1, 16, 16), np.float32)
  mask[:, :, :8] = 1.0  # left half annotated
  # Labelled cells inside the region; the first one also copied as a confident teacher box.
  target_boxes = np.array([[[0.2, 0.3, 0.08, 0.08], [0.3, 0.7, 0.08, 0.08], [0.1, 0.5, 0.05, 0.05],
                            [0, 0, 0, 0]]], np.float32)[:, :num_targets]
  targets = {'labels': np.array([[0, 1, 2, 0]], np.int32), 'boxes': target_boxes,
             'attributes': np.full((1, num_targets, A), -1, np.int32),
             'weight': np.array([[1, 1, 1, 0]], np.float32), 'annotation_mask': mask}
  # A confident teacher box that straddles the region border over a labelled cell (centre outside, overlaps).
  teacher_boxes[0, 0] = [0.52, 0.3, 0.2, 0.1]
  targets['boxes'][0, 0] = [0.45, 0.3, 0.12, 0.1]
  teacher_logits[0, 0] = [9.0, -9.0, -9.0]
  return teacher_logits, teacher_boxes, teacher_attributes, targets


def _select(step, seed=0, **overrides):
  logits, boxes, attributes, targets = _scene(seed)
  kwargs = dict(threshold=0.9, weight=0.1, warmup_steps=100, max_pseudo=8)
  kwargs.update(overrides)
  out = jax.jit(lambda l, b, a, t, s: pseudo_labels.select(l, b, a, t, s, **kwargs))(
      logits, boxes, attributes, targets, jnp.asarray(step))
  return jax.device_get(out), targets, logits, boxes


def test_pseudo_labels_only_outside_region_and_off_labelled_cells():
  for seed in range(5):
    out, targets, logits, _ = _select(step=1000, seed=seed)
    num_real = targets['labels'].shape[1]
    chosen = out['is_pseudo'][0, num_real:]
    assert chosen.any(), 'the scene has confident detections outside the region'
    pseudo_boxes = out['boxes'][0, num_real:][chosen]
    # Centre x >= 0.5 is outside the annotated left half.
    assert np.all(pseudo_boxes[:, 0] >= 0.5)
    # The straddling box over the labelled cell is never used.
    assert not np.any(np.all(np.isclose(pseudo_boxes, [0.52, 0.3, 0.2, 0.1]), axis=-1))
    # Real targets are untouched.
    np.testing.assert_array_equal(out['boxes'][0, :num_real], targets['boxes'][0])
    assert not out['is_pseudo'][0, :num_real].any()


def test_pseudo_labels_have_the_configured_weight_and_score():
  out, targets, logits, boxes = _select(step=1000, weight=0.25)
  num_real = targets['labels'].shape[1]
  chosen = out['is_pseudo'][0, num_real:]
  np.testing.assert_allclose(out['weight'][0, num_real:][chosen], 0.25)
  np.testing.assert_array_equal(out['weight'][0, num_real:][~chosen], 0.0)
  # Every chosen label is the teacher's confident class (score above the threshold).
  scores = 1 / (1 + np.exp(-logits[0]))
  for box, label in zip(out['boxes'][0, num_real:][chosen], out['labels'][0, num_real:][chosen]):
    query = np.argmin(np.abs(boxes[0] - box).sum(-1))
    assert scores[query].max() > 0.9 and scores[query].argmax() == label
  # Attributes stay "not applicable" unless asked for.
  assert np.all(out['attributes'][0, num_real:] == -1)


def test_no_pseudo_labels_during_warmup():
  out, targets, _, _ = _select(step=99)
  assert not out['is_pseudo'].any()
  assert np.all(out['weight'][0, targets['labels'].shape[1]:] == 0)
