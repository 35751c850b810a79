"""Box conversions, IoU and generalized IoU against a plain numpy reference."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lld_jax import boxes as box_ops

# Jitted (with little optimization) the functions compile once per shape; run eagerly, every primitive
# compiles on its own, which is several times slower on a small CPU.
_jit = functools.partial(jax.jit, compiler_options={'xla_backend_optimization_level': 0})
iou, generalized_iou = _jit(box_ops.iou), _jit(box_ops.generalized_iou)
pairwise_iou, pairwise_generalized_iou = _jit(box_ops.pairwise_iou), _jit(box_ops.pairwise_generalized_iou)


def _random_xyxy(rng, n):
  top_left = rng.uniform(0, 0.8, (n, 2))
  wh = rng.uniform(0.01, 0.4, (n, 2))
  return np.concatenate([top_left, top_left + wh], -1).astype(np.float32)


def _reference_iou_giou(a, b):
  """IoU and GIoU of single xyxy boxes a, b, written out the textbook way."""
  ix = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  iy = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  intersection = ix * iy
  area_a = (a[2] - a[0]) * (a[3] - a[1])
  area_b = (b[2] - b[0]) * (b[3] - b[1])
  union = area_a + area_b - intersection
  enclosing = (max(a[2], b[2]) - min(a[0], b[0])) * (max(a[3], b[3]) - min(a[1], b[1]))
  iou = intersection / union
  return iou, iou - (enclosing - union) / enclosing


def test_conversions_round_trip():
  rng = np.random.default_rng(0)
  xyxy = _random_xyxy(rng, 20).reshape(4, 5, 4)
  cxcywh = box_ops.xyxy_to_cxcywh(xyxy)
  np.testing.assert_allclose(box_ops.cxcywh_to_xyxy(cxcywh), xyxy, atol=1e-6)
  np.testing.assert_allclose(cxcywh[..., 2:], xyxy[..., 2:] - xyxy[..., :2], atol=1e-6)
  np.testing.assert_allclose(cxcywh[..., :2], (xyxy[..., 2:] + xyxy[..., :2]) / 2, atol=1e-6)
  back = box_ops.xyxy_to_cxcywh(box_ops.cxcywh_to_xyxy(cxcywh))
  np.testing.assert_allclose(back, cxcywh, atol=1e-6)
  np.testing.assert_allclose(box_ops.cxcywh_to_xyxy(jnp.array([0.5, 0.5, 0.2, 0.4])), [0.4, 0.3, 0.6, 0.7],
                             atol=1e-6)


def test_area():
  np.testing.assert_allclose(box_ops.area(jnp.array([[0.1, 0.2, 0.4, 0.6], [0.5, 0.5, 0.4, 0.6]])),
                             [0.12, 0.0], atol=1e-6)  # an inverted box has zero area


@pytest.mark.parametrize('seed', [0, 1])
def test_pairwise_iou_and_giou_match_reference(seed):
  rng = np.random.default_rng(seed)
  a, b = _random_xyxy(rng, 7), _random_xyxy(rng, 5)
  ref = np.array([[_reference_iou_giou(x, y) for y in b] for x in a])  # [7, 5, 2]
  assert (ref[..., 0] > 0).any() and (ref[..., 0] == 0).any()  # both overlapping and disjoint pairs
  iou = pairwise_iou(jnp.asarray(a), jnp.asarray(b))
  giou = pairwise_generalized_iou(jnp.asarray(a), jnp.asarray(b))
  assert iou.shape == giou.shape == (7, 5)
  np.testing.assert_allclose(iou, ref[..., 0], atol=1e-5)
  np.testing.assert_allclose(giou, ref[..., 1], atol=1e-5)
  # Leading batch axes broadcast.
  batched = pairwise_generalized_iou(jnp.stack([a, a]), jnp.stack([b, b]))
  assert batched.shape == (2, 7, 5)
  np.testing.assert_allclose(batched[1], ref[..., 1], atol=1e-5)


@pytest.mark.parametrize('seed', [0, 1])
def test_elementwise_iou_and_giou_match_reference(seed):
  rng = np.random.default_rng(seed)
  a, b = _random_xyxy(rng, 12), _random_xyxy(rng, 12)
  b[:4] = a[:4]  # a few identical pairs
  ref = np.array([_reference_iou_giou(x, y) for x, y in zip(a, b)])
  np.testing.assert_allclose(iou(jnp.asarray(a), jnp.asarray(b)), ref[:, 0], atol=1e-5)
  np.testing.assert_allclose(generalized_iou(jnp.asarray(a), jnp.asarray(b)), ref[:, 1], atol=1e-5)
  # Symmetric, and IoU <= 1, GIoU in (-1, 1].
  np.testing.assert_allclose(generalized_iou(b, a), generalized_iou(a, b), atol=1e-6)
  giou = np.asarray(generalized_iou(a, b))
  assert (giou > -1).all() and (giou <= 1 + 1e-6).all()


def test_identical_boxes_have_iou_one():
  rng = np.random.default_rng(3)
  a = jnp.asarray(_random_xyxy(rng, 6))
  # The 1e-7 epsilon in the denominators costs up to ~1e-7 / area (boxes here have area >= 1e-4).
  np.testing.assert_allclose(iou(a, a), 1.0, atol=1e-3)
  np.testing.assert_allclose(generalized_iou(a, a), 1.0, atol=1e-3)
  np.testing.assert_allclose(jnp.diag(pairwise_iou(a, a)), 1.0, atol=1e-3)
  big = jnp.array([[0.1, 0.1, 0.6, 0.7]])
  np.testing.assert_allclose(iou(big, big), 1.0, atol=1e-6)


def test_disjoint_boxes_have_negative_giou():
  a = jnp.array([[0.0, 0.0, 0.2, 0.2], [0.1, 0.1, 0.2, 0.2]])
  b = jnp.array([[0.5, 0.5, 0.7, 0.7], [0.2, 0.1, 0.3, 0.2]])  # far apart; touching edges
  np.testing.assert_allclose(iou(a, b), 0.0, atol=1e-7)
  giou = generalized_iou(a, b)
  assert giou[0] < 0
  # enclosing 0.7 x 0.7, union 0.08
  np.testing.assert_allclose(giou[0], -(0.49 - 0.08) / 0.49, atol=1e-5)
  np.testing.assert_allclose(giou[1], 0.0, atol=1e-5)  # touching boxes: enclosing == union


def test_inverse_sigmoid():
  x = jnp.array([0.1, 0.5, 0.9])
  np.testing.assert_allclose(1 / (1 + jnp.exp(-box_ops.inverse_sigmoid(x))), x, atol=1e-5)
  assert jnp.isfinite(box_ops.inverse_sigmoid(jnp.array([0.0, 1.0]))).all()


@pytest.mark.parametrize('seed', range(3))
def test_nms_keep_mask_matches_tensorflow(seed):
  import tensorflow as tf
  rng = np.random.default_rng(seed)
  # Clusters of near-duplicate boxes, as a detector's queries give on one cell.
  centres = _random_xyxy(rng, 8)
  boxes = np.repeat(centres, 5, 0) + rng.normal(0, 0.02, (40, 4)).astype(np.float32)
  boxes = np.concatenate([np.minimum(boxes[:, :2], boxes[:, 2:]), np.maximum(boxes[:, :2], boxes[:, 2:])], -1)
  scores = rng.uniform(0, 1, 40).astype(np.float32)
  valid = rng.uniform(size=40) < 0.8
  keep = np.asarray(_jit(box_ops.nms_keep_mask, static_argnums=3)(boxes, scores, valid, 0.5))
  candidates = np.flatnonzero(valid)
  expected = candidates[tf.image.non_max_suppression(boxes[candidates][:, [1, 0, 3, 2]], scores[candidates], 40,
                                                     iou_threshold=0.5).numpy()]
  np.testing.assert_array_equal(np.flatnonzero(keep), np.sort(expected))
  assert 8 <= keep.sum() < valid.sum(), 'every cluster keeps at least one box and loses its duplicates'
