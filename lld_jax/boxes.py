"""Box formats, areas, IoU and generalized IoU, batched over leading axes (jnp); a static-shape NMS."""

import jax
import jax.numpy as jnp

_EPS = 1e-7


def cxcywh_to_xyxy(boxes):
  cx, cy, w, h = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2], axis=-1)


def xyxy_to_cxcywh(boxes):
  x1, y1, x2, y2 = jnp.moveaxis(boxes, -1, 0)
  return jnp.stack([(x1 + x2) / 2, (y1 + y2) / 2, x2 - x1, y2 - y1], axis=-1)


def area(boxes_xyxy):
  return jnp.clip(boxes_xyxy[..., 2] - boxes_xyxy[..., 0], 0) * jnp.clip(boxes_xyxy[..., 3] - boxes_xyxy[..., 1], 0)


def _intersection_and_union(a, b):
  """a [..., 4] and b [..., 4] xyxy, broadcast against each other."""
  top_left = jnp.maximum(a[..., :2], b[..., :2])
  bottom_right = jnp.minimum(a[..., 2:], b[..., 2:])
  wh = jnp.clip(bottom_right - top_left, 0)
  intersection = wh[..., 0] * wh[..., 1]
  union = area(a) + area(b) - intersection
  return intersection, union


def _giou_from_parts(a, b, iou, union):
  enclosing_wh = jnp.clip(jnp.maximum(a[..., 2:], b[..., 2:]) - jnp.minimum(a[..., :2], b[..., :2]), 0)
  enclosing = enclosing_wh[..., 0] * enclosing_wh[..., 1]
  return iou - (enclosing - union) / (enclosing + _EPS)


def iou(a, b):
  """Element-wise IoU of xyxy boxes a [..., 4] and b [..., 4]."""
  intersection, union = _intersection_and_union(a, b)
  return intersection / (union + _EPS)


def generalized_iou(a, b):
  """Element-wise generalized IoU (Rezatofighi et al., 2019) of xyxy boxes."""
  intersection, union = _intersection_and_union(a, b)
  return _giou_from_parts(a, b, intersection / (union + _EPS), union)


def pairwise_iou(a, b):
  """IoU matrix [..., N, M] of xyxy boxes a [..., N, 4] and b [..., M, 4]."""
  return iou(a[..., :, None, :], b[..., None, :, :])


def pairwise_generalized_iou(a, b):
  """Generalized IoU matrix [..., N, M] of xyxy boxes a [..., N, 4] and b [..., M, 4]."""
  return generalized_iou(a[..., :, None, :], b[..., None, :, :])


def inverse_sigmoid(x, eps=1e-5):
  x = jnp.clip(x, eps, 1 - eps)
  return jnp.log(x / (1 - x))


def nms_keep_mask(boxes_xyxy, scores, valid, iou_threshold):
  """Greedy non-maximum suppression with static shapes (jit- and vmap-safe): a [N] bool mask.

  Among the `valid` boxes [N, 4], best score first, a box is kept unless it overlaps an already kept box by
  IoU > `iou_threshold` (as TensorFlow's non_max_suppression). Invalid boxes are never kept nor suppress others.
  """
  n = boxes_xyxy.shape[0]
  order = jnp.argsort(-jnp.where(valid, scores, -jnp.inf))
  overlaps = pairwise_iou(boxes_xyxy[order], boxes_xyxy[order]) > iou_threshold
  valid_sorted = valid[order]

  def visit(i, kept):
    suppressed = (kept & overlaps[i]).any()  # only boxes before i can be kept yet
    return kept.at[i].set(valid_sorted[i] & ~suppressed)

  kept_sorted = jax.lax.fori_loop(0, n, visit, jnp.zeros([n], bool))
  return jnp.zeros([n], bool).at[order].set(kept_sorted)
