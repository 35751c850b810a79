"""Set-prediction losses as pure functions of arrays.

Each function returns a *sum*; callers divide by the mean number of real boxes per device, so that every
device's gradient has the same scale (DETR's normalization).

Per-query class targets use -1 for "no object". The per-query weight carries three rules at once: 1 for a real
target, the pseudo-label weight for a pseudo target, a "no object" weight where `counts_as_background` says so
(`background_weight`: 1, or more inside a small annotated region) and 0 elsewhere (by default the unlabelled area
is neither positive nor negative).
"""

import jax
import jax.numpy as jnp

from lld_jax import boxes as box_ops
from lld_jax import matching


def sigmoid_focal_loss(logits, targets, alpha=0.25, gamma=2.0):
  """Element-wise focal loss (Lin et al., 2017) on sigmoid logits with {0, 1} targets."""
  prob = jax.nn.sigmoid(logits)
  cross_entropy = -(targets * jax.nn.log_sigmoid(logits) + (1 - targets) * jax.nn.log_sigmoid(-logits))
  p_t = prob * targets + (1 - prob) * (1 - targets)
  alpha_t = alpha * targets + (1 - alpha) * (1 - targets)
  return alpha_t * (1 - p_t) ** gamma * cross_entropy


def varifocal_loss(logits, quality, alpha=0.75, gamma=2.0):
  """Element-wise varifocal loss (Zhang et al., 2021): positives regress their IoU, negatives are focal."""
  prob = jax.nn.sigmoid(logits)
  is_positive = (quality > 0).astype(logits.dtype)
  weight = alpha * prob**gamma * (1 - is_positive) + quality * is_positive
  cross_entropy = -(quality * jax.nn.log_sigmoid(logits) + (1 - quality) * jax.nn.log_sigmoid(-logits))
  return jax.lax.stop_gradient(weight) * cross_entropy


def class_loss(logits, query_labels, query_quality, query_weight, loss_type='varifocal', alpha=0.25, gamma=2.0):
  """Weighted sum of the class loss. logits [..., Q, K]; query_labels [..., Q] (-1 = no object);
  query_quality [..., Q] in [0, 1] (IoU with the target, used by varifocal); query_weight [..., Q]."""
  num_classes = logits.shape[-1]
  one_hot = jax.nn.one_hot(query_labels, num_classes, dtype=logits.dtype)  # -1 -> all zeros
  logits = logits.astype(jnp.float32)
  if loss_type == 'focal':
    per_class = sigmoid_focal_loss(logits, one_hot, alpha, gamma)
  elif loss_type == 'varifocal':
    per_class = varifocal_loss(logits, one_hot * jax.lax.stop_gradient(query_quality)[..., None], 0.75, gamma)
  else:
    raise ValueError(f'unknown class loss {loss_type!r}; expected focal or varifocal')
  return (per_class.sum(-1) * query_weight).sum()


def box_losses(pred_boxes, target_boxes, weight):
  """Weighted sums of L1 and (1 - GIoU) over paired cxcywh boxes [..., N, 4] with weight [..., N]."""
  pred_boxes = pred_boxes.astype(jnp.float32)
  l1 = (jnp.abs(pred_boxes - target_boxes).sum(-1) * weight).sum()
  giou = box_ops.generalized_iou(box_ops.cxcywh_to_xyxy(pred_boxes), box_ops.cxcywh_to_xyxy(target_boxes))
  return l1, ((1 - giou) * weight).sum()


def attribute_loss(attribute_logits, attributes, weight):
  """Weighted cross-entropy sum and the weighted count of known attribute labels.

  attribute_logits [..., N, A, V]; attributes [..., N, A] with -1 = not applicable (masked out);
  weight [..., N] per object.
  """
  log_probs = jax.nn.log_softmax(attribute_logits.astype(jnp.float32), axis=-1)
  known = (attributes >= 0).astype(jnp.float32) * weight[..., None]
  picked = jnp.take_along_axis(log_probs, jnp.clip(attributes, 0)[..., None], axis=-1)[..., 0]
  return -(picked * known).sum(), known.sum()


def gather_queries(values, query_index):
  """values [B, Q, ...] gathered at query_index [B, T] -> [B, T, ...]."""
  return jax.vmap(lambda v, i: v[i])(values, query_index)


def counts_as_background(in_region, logits, below=0.0):
  """[..., Q] whether an unmatched prediction is a "no object" negative: inside the annotated region always;
  outside it only when its own best class probability (detached) is under `below`.

  below = 0 is pure region restriction; below > 1 makes the whole unlabelled area background. In between, the
  unlabelled area keeps its many right negatives (red cells, and the rare overlapping pairs that look like white
  cells) while a confident prediction there, likely a cell nobody labelled, is left alone. Losses for missing
  annotations (e.g. the background recalibration loss, Zhang et al., 2020) likewise stop pushing down the
  background where the model is confident; here such a prediction simply gets no class loss.
  in_region [..., Q] bool, logits [..., Q, K] sigmoid class logits.
  """
  probability = jax.nn.sigmoid(jax.lax.stop_gradient(logits).astype(jnp.float32)).max(-1)
  return in_region | (probability < below)


def region_negative_weight(annotation_mask, image_mask, max_weight):
  """[B] weight of each image's "no object" negatives inside its annotated region: the field's area over the
  region's, at most `max_weight` (and at least 1).

  With region restriction the model sees only the negatives that lie in the region, a sample of the field's: on
  a field annotated over a fifth of its area, a fifth of the red cells, and of the rare look-alikes of a white
  cell. Weighting each by the inverse of the sampled share makes their sum an unbiased estimate of the whole
  field's negative loss (what a fully annotated field would give), without calling any unlabelled cell background.
  annotation_mask [B, h, w] and image_mask [B, H, W] (1 on the field, 0 on padding) may differ in resolution.
  """
  field = image_mask.astype(jnp.float32).mean((1, 2))
  region = annotation_mask.astype(jnp.float32).mean((1, 2))
  ratio = field / jnp.maximum(region, 1e-6)
  return jnp.clip(ratio, 1.0, max(float(max_weight), 1.0))


def background_weight(in_region, logits, below=0.0, in_region_weight=None):
  """[..., Q] the "no object" weight of each unmatched prediction: `counts_as_background`, times
  `in_region_weight` [...] (see `region_negative_weight`) inside the region when given."""
  weight = counts_as_background(in_region, logits, below).astype(jnp.float32)
  if in_region_weight is None:
    return weight
  return weight * jnp.where(in_region, in_region_weight[..., None], 1.0)


def labelled_cell_score(logits, query_for_target, targets, axis_name=None):
  """Mean probability (detached) that the queries matched to labelled cells give their cell's class: how sure the
  model is of the cells it was shown. logits [B, Q, K]; query_for_target [B, T]; targets: labels [B, T],
  weight [B, T], optionally is_pseudo [B, T] (pseudo-labels are not counted). Averaged over all devices of
  `axis_name`; 1 where no cell is labelled."""
  probability = jax.nn.sigmoid(jax.lax.stop_gradient(logits).astype(jnp.float32))
  matched = gather_queries(probability, query_for_target)  # [B, T, K]
  own_class = jnp.take_along_axis(matched, targets['labels'][..., None], -1)[..., 0]
  labelled = targets['weight'] > 0
  if 'is_pseudo' in targets:
    labelled &= ~targets['is_pseudo']
  total, count = (own_class * labelled).sum(), labelled.sum().astype(jnp.float32)
  if axis_name is not None:
    total, count = jax.lax.psum(total, axis_name), jax.lax.psum(count, axis_name)
  return jnp.where(count > 0, total / jnp.maximum(count, 1.0), 1.0)


def matched_query_targets(query_for_target, target_labels, target_boxes, target_weight, query_background_weight,
                          num_queries):
  """Per-query class label (-1 = none), target box, and class weight after a matching; an unmatched query weighs
  `query_background_weight` [B, Q] (bool or float: see `background_weight`).

  Returns (query_labels [B, Q], query_boxes [B, Q, 4], query_weight [B, Q], is_matched [B, Q]).
  """
  target_for_query = jax.vmap(lambda q, v: matching.queries_to_targets(q, v, num_queries))(
      query_for_target, target_weight > 0)
  is_matched = target_for_query >= 0
  safe = jnp.clip(target_for_query, 0)
  query_labels = jnp.where(is_matched, gather_queries(target_labels, safe), -1)
  query_boxes = gather_queries(target_boxes, safe)
  matched_weight = gather_queries(target_weight, safe)
  query_weight = jnp.where(is_matched, matched_weight, query_background_weight.astype(jnp.float32))
  return query_labels, query_boxes, query_weight, is_matched
