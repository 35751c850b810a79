"""One-to-many (task-aligned) assignment of encoder tokens to targets, for the dense encoder loss.

One-to-one Hungarian matching gives each cell a single positive query per step, which is why DETRs need long
schedules. Here every encoder token is a prediction, as in a one-stage detector, and each target takes the
`top_k` tokens inside its box whose predictions best align with it (TOOD's task-aligned assigner, the one YOLOv8
trains with): alignment = score^alpha * IoU^beta. Many positives per cell train the backbone and encoder quickly,
and the two-stage query selection then starts the decoder from good proposals; the decoder keeps one-to-one
matching, so the detector stays free of NMS. An option (`loss.encoder_loss='one_to_many'`), not the default: on
the synthetic demo it converged more slowly than one-to-one matching of the proposals (docs/results.md).

All functions take one image (no batch axis) and have static shapes.
"""

import jax
import jax.numpy as jnp

from lld_jax import boxes as box_ops

_TIE_BREAK = 1e-9  # before the predictions mean anything, the tokens nearest the box centre are taken


def task_aligned_assignment(logits, boxes, token_centres, target_labels, target_boxes, target_valid,
                            top_k=10, alpha=0.5, beta=6.0):
  """Assigns tokens to targets.

  logits [N, K] (sigmoid class logits), boxes [N, 4] predicted cxcywh, token_centres [N, 2] (x, y);
  targets: labels [T], boxes [T, 4] cxcywh, valid [T].
  Returns (target_index [N] int32, -1 for negatives; quality [N] in [0, 1], the soft class target: each
  target's alignment normalized so that its best token gets that target's best IoU).
  """
  num_tokens = logits.shape[0]
  target_xyxy = box_ops.cxcywh_to_xyxy(target_boxes)
  overlaps = box_ops.pairwise_iou(box_ops.cxcywh_to_xyxy(boxes), target_xyxy)  # [N, T]
  scores = jnp.take(jax.nn.sigmoid(logits), target_labels, axis=1)  # [N, T]
  x, y = token_centres[:, 0:1], token_centres[:, 1:2]
  inside = ((x > target_xyxy[None, :, 0]) & (x < target_xyxy[None, :, 2]) & (y > target_xyxy[None, :, 1])
            & (y < target_xyxy[None, :, 3]) & target_valid[None, :])
  offset = jnp.abs(token_centres[:, None, :] - target_boxes[None, :, :2]) / (target_boxes[None, :, 2:] / 2 + 1e-7)
  centrality = 1.0 - jnp.clip(offset.max(-1), 0.0, 1.0)
  alignment = scores**alpha * overlaps**beta
  metric = jnp.where(inside, alignment + _TIE_BREAK * (centrality + 1e-3), 0.0)
  top_values, top_index = jax.lax.top_k(metric.T, min(top_k, num_tokens))  # [T, k]
  chosen = jnp.zeros((target_labels.shape[0], num_tokens), bool)
  chosen = chosen.at[jnp.arange(target_labels.shape[0])[:, None], top_index].set(top_values > 0).T  # [N, T]
  # A token claimed by several targets keeps the one its box overlaps most.
  best = jnp.argmax(jnp.where(chosen, overlaps + _TIE_BREAK * centrality, -1.0), axis=1)
  positive = chosen.any(axis=1)
  aligned = jnp.where(chosen, alignment, 0.0)
  normalized = aligned / (aligned.max(axis=0, keepdims=True) + 1e-12) * jnp.where(chosen, overlaps, 0.0).max(
      axis=0, keepdims=True)
  quality = jnp.take_along_axis(normalized, best[:, None], axis=1)[:, 0]
  return jnp.where(positive, best, -1).astype(jnp.int32), jnp.where(positive, quality, 0.0)


def dense_losses(logits, boxes, token_centres, token_weight, target_labels, target_boxes, target_weight,
                 top_k=10, alpha=0.5, beta=6.0):
  """Sums of the dense encoder losses of one image, and their normalizer.

  Class: binary cross-entropy against the soft targets (quality at the assigned class, 0 elsewhere), over the
  tokens with nonzero `token_weight` [N] (padding and unlabelled areas have 0) and every positive token.
  Boxes: L1 and 1 - GIoU of the positives, weighted by quality. Returns (class_sum, l1_sum, giou_sum,
  quality_sum); the caller divides by the quality sum over devices (YOLOv8's normalization).
  """
  target_labels, target_boxes, target_weight = (jnp.asarray(x) for x in (target_labels, target_boxes, target_weight))
  target_index, quality = jax.lax.stop_gradient(task_aligned_assignment(
      jax.lax.stop_gradient(logits), jax.lax.stop_gradient(boxes), token_centres, target_labels, target_boxes,
      target_weight > 0, top_k, alpha, beta))
  positive = target_index >= 0
  safe = jnp.clip(target_index, 0)
  # Pseudo-labels carry their own (small) weight; a real target's positives get weight 1.
  positive_weight = jnp.where(positive, target_weight[safe], 0.0)
  labels = jnp.where(positive, target_labels[safe], -1)
  soft_targets = jax.nn.one_hot(labels, logits.shape[-1]) * quality[:, None]
  logits = logits.astype(jnp.float32)
  cross_entropy = -(soft_targets * jax.nn.log_sigmoid(logits) + (1 - soft_targets) * jax.nn.log_sigmoid(-logits))
  class_weight = jnp.where(positive, positive_weight, token_weight)
  class_sum = (cross_entropy.sum(-1) * class_weight).sum()
  box_weight = quality * positive_weight
  matched = target_boxes[safe]
  pred = boxes.astype(jnp.float32)
  l1_sum = (jnp.abs(pred - matched).sum(-1) * box_weight).sum()
  giou = box_ops.generalized_iou(box_ops.cxcywh_to_xyxy(pred), box_ops.cxcywh_to_xyxy(matched))
  giou_sum = ((1 - giou) * box_weight).sum()
  return class_sum, l1_sum, giou_sum, (quality * positive_weight).sum()
