"""The one-to-many (task-aligned) token assignment against a plain numpy reference, and its rules."""

import jax
import numpy as np

from lld_jax import dense_assignment

_FAST = {'xla_backend_optimization_level': 0}
_assign = jax.jit(dense_assignment.task_aligned_assignment, static_argnames=('top_k',), compiler_options=_FAST)
_losses = jax.jit(dense_assignment.dense_losses, static_argnames=('top_k',), compiler_options=_FAST)


def _xyxy(b):
  return np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)


def _iou(a, b):
  a, b = _xyxy(a), _xyxy(b)
  w = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
  h = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
  inter = w * h
  union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
  return inter / (union + 1e-7)


def _reference(logits, boxes, centres, labels, target_boxes, valid, top_k, alpha=0.5, beta=6.0):
  """Loops: each valid target takes its top_k inside tokens by alignment (nearest to the centre on ties);
  a token taken twice keeps the target it overlaps most."""
  n, t = logits.shape[0], labels.shape[0]
  scores = 1 / (1 + np.exp(-logits.astype(np.float64)))
  overlaps = np.array([[_iou(boxes[i], target_boxes[j]) for j in range(t)] for i in range(n)])
  chosen = np.zeros((n, t), bool)
  alignment = np.zeros((n, t))
  for j in range(t):
    if not valid[j]:
      continue
    x1, y1, x2, y2 = _xyxy(target_boxes[j])
    inside = [i for i in range(n) if x1 < centres[i, 0] < x2 and y1 < centres[i, 1] < y2]
    for i in inside:
      alignment[i, j] = scores[i, labels[j]] ** alpha * overlaps[i, j] ** beta
    centrality = lambda i: 1 - min(1.0, np.max(np.abs(centres[i] - target_boxes[j, :2]) / (target_boxes[j, 2:] / 2)))
    ranked = sorted(inside, key=lambda i: (alignment[i, j], centrality(i)), reverse=True)
    chosen[ranked[:top_k], j] = True
  index = np.full(n, -1)
  quality = np.zeros(n)
  for i in range(n):
    if chosen[i].any():
      j = max(np.flatnonzero(chosen[i]), key=lambda j: overlaps[i, j])
      best_alignment = alignment[chosen[:, j], j].max()
      best_iou = overlaps[chosen[:, j], j].max()
      index[i] = j
      quality[i] = alignment[i, j] / (best_alignment + 1e-12) * best_iou
  return index, quality


def _case(seed, n=64, t=5, k=4):
  rng = np.random.default_rng(seed)
  side = int(np.sqrt(n))
  ys, xs = np.meshgrid((np.arange(side) + 0.5) / side, (np.arange(side) + 0.5) / side, indexing='ij')
  centres = np.stack([xs.ravel(), ys.ravel()], -1).astype(np.float32)
  target_boxes = np.concatenate([rng.uniform(0.25, 0.75, (t, 2)), rng.uniform(0.15, 0.4, (t, 2))], -1)
  boxes = np.concatenate([centres + rng.normal(0, 0.02, (n, 2)), rng.uniform(0.1, 0.4, (n, 2))], -1)
  logits = rng.normal(0, 2, (n, k))
  labels = rng.integers(0, k, t)
  valid = np.array([True] * (t - 1) + [False])
  return [x.astype(np.float32) if x.dtype.kind == 'f' else x.astype(np.int32) if x.dtype.kind == 'i' else x
          for x in (logits, boxes, centres, labels, target_boxes, valid)]


def test_assignment_matches_numpy_reference():
  for seed in range(3):
    case = _case(seed)
    index, quality = _assign(*case, top_k=6)
    expected_index, expected_quality = _reference(*case, top_k=6)
    np.testing.assert_array_equal(np.asarray(index), expected_index)
    np.testing.assert_allclose(np.asarray(quality), expected_quality, rtol=1e-3, atol=1e-6)
    assert (expected_index >= 0).sum() > 6  # several targets, each with several positives


def test_assignment_rules():
  logits, boxes, centres, labels, target_boxes, valid = _case(7)
  index, quality = (np.asarray(x) for x in _assign(logits, boxes, centres, labels, target_boxes, valid, top_k=3))
  positives = index >= 0
  assert not (index == len(valid) - 1).any()  # a padded target takes nothing
  for j in np.flatnonzero(valid):
    taken = np.flatnonzero(index == j)
    assert len(taken) <= 3
    x1, y1, x2, y2 = _xyxy(target_boxes[j])
    assert ((centres[taken, 0] > x1) & (centres[taken, 0] < x2) & (centres[taken, 1] > y1)
            & (centres[taken, 1] < y2)).all()
  assert ((quality[positives] >= 0) & (quality[positives] <= 1)).all() and (quality[~positives] == 0).all()


def test_dense_losses_ignore_unweighted_tokens_and_pull_boxes_to_targets():
  logits, boxes, centres, labels, target_boxes, valid = _case(3)
  weight = valid.astype(np.float32)
  token_weight = np.ones(len(centres), np.float32)
  grad = jax.jit(jax.grad(lambda l, b, w: sum(dense_assignment.dense_losses(
      l, b, centres, w, labels, target_boxes, weight, top_k=6)[:3]), argnums=(0, 1)), compiler_options=_FAST)
  index, _ = _assign(logits, boxes, centres, labels, target_boxes, valid, top_k=6)
  index = np.asarray(index)
  token_weight[index < 0] = 0.0
  token_weight[:: 2] = np.where(index[:: 2] >= 0, 1.0, 0.0)
  logit_grad, box_grad = (np.asarray(g) for g in grad(logits, boxes, token_weight))
  ignored = (token_weight == 0) & (index < 0)
  assert ignored.any() and np.abs(logit_grad[ignored]).sum() == 0  # unlabelled area: no class signal
  assert np.abs(box_grad[index < 0]).sum() == 0  # negatives get no box gradient
  assert np.abs(box_grad[index >= 0]).sum() > 0
  # A small step against the gradient moves the positives' boxes towards their targets.
  ones = np.ones_like(token_weight)
  _, l1_sum, giou_sum, quality_sum = _losses(logits, boxes, centres, ones, labels, target_boxes, weight, top_k=6)
  _, step_grad = (np.asarray(g) for g in grad(logits, boxes, ones))
  _, l1_after, giou_after, _ = _losses(logits, boxes - 1e-3 * step_grad, centres, ones, labels, target_boxes,
                                       weight, top_k=6)
  assert float(quality_sum) > 0 and float(l1_sum) > 0
  assert float(l1_after) + float(giou_after) < float(l1_sum) + float(giou_sum)
