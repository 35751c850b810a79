"""Pseudo-labels from the unlabelled part of a sparsely annotated field of view (static shapes, jit-safe).

The teacher (the EMA model) predicts on the whole image. Its detections are scored as the evaluation and
prediction score them (`eval.class_scores`: the decoder's sigmoids, or their geometric mean with the cell
classifier), and a detection's class is its best-scoring one. A detection becomes an extra target when its score
passes the threshold, its box centre lies outside the annotated region, it does not overlap a labelled cell, and
the training step is past the warm-up; with `on_images_without_region` False, also only on images that have an
annotated region. Of near-duplicate teacher boxes (class-agnostic IoU > `duplicate_iou`) only the most confident is
kept: a DETR teacher early in training answers one cell with several queries, and two targets on one cell would
teach the student to answer it twice. Extra targets carry a small loss weight; they are
appended to the real targets in `max_pseudo` fixed slots, with weight 0 in the unused ones.
"""

import jax
import jax.numpy as jnp

from lld_jax import boxes as box_ops
from lld_jax import matching


def allowed_places(teacher_boxes, targets, overlap_iou=0.1):
  """[B, Q]: whether each teacher box lies where a pseudo-label may go, whatever its score: its centre outside the
  annotated region, and no IoU above `overlap_iou` with a labelled cell. teacher_boxes [B, Q, 4] normalized
  cxcywh; targets: boxes [B, T, 4], weight [B, T], annotation_mask [B, h, w]."""
  outside = ~jax.vmap(matching.points_in_mask)(teacher_boxes[..., :2], targets['annotation_mask'])
  overlap = box_ops.pairwise_iou(box_ops.cxcywh_to_xyxy(teacher_boxes), box_ops.cxcywh_to_xyxy(targets['boxes']))
  over_labelled = ((overlap > overlap_iou) & (targets['weight'] > 0)[:, None, :]).any(-1)
  return outside & ~over_labelled


def select(teacher_scores, teacher_boxes, teacher_attribute_logits, targets, step, *, threshold, weight,
           warmup_steps, max_pseudo, with_attributes=False, overlap_iou=0.1, duplicate_iou=0.5,
           on_images_without_region=True):
  """Targets with up to `max_pseudo` pseudo-labels appended per image.

  teacher_scores [B, Q, K] in [0, 1] (`postprocess.class_scores`), teacher_boxes [B, Q, 4] (normalized cxcywh),
  teacher_attribute_logits [B, Q, A, V];
  targets: labels [B, T], boxes [B, T, 4], attributes [B, T, A], weight [B, T], annotation_mask [B, h, w].
  The result has T + max_pseudo slots and an `is_pseudo` [B, T + max_pseudo] flag.
  """
  scores = jax.lax.stop_gradient(teacher_scores).astype(jnp.float32)
  teacher_boxes = jax.lax.stop_gradient(teacher_boxes)
  best_score, best_label = scores.max(-1), scores.argmax(-1)
  eligible = ((best_score > threshold) & allowed_places(teacher_boxes, targets, overlap_iou)
              & (step >= warmup_steps))
  if not on_images_without_region:
    eligible &= targets['annotation_mask'].any(axis=(1, 2))[:, None]
  teacher_xyxy = box_ops.cxcywh_to_xyxy(teacher_boxes)
  distinct = jax.vmap(box_ops.nms_keep_mask, in_axes=(0, 0, 0, None))(teacher_xyxy, best_score, eligible,
                                                                       duplicate_iou)
  ranked = jnp.where(distinct, best_score, -1.0)
  top_score, top = jax.lax.top_k(ranked, max_pseudo)
  take = lambda values: jax.vmap(lambda v, i: v[i])(values, top)
  chosen = top_score > 0
  num_attributes = targets['attributes'].shape[-1]
  if with_attributes:
    pseudo_attributes = take(jax.lax.stop_gradient(teacher_attribute_logits).argmax(-1)).astype(jnp.int32)
  else:
    pseudo_attributes = jnp.full(top.shape + (num_attributes,), -1, jnp.int32)
  pseudo_attributes = jnp.where(chosen[..., None], pseudo_attributes, -1)
  extended = dict(targets)
  extended['labels'] = jnp.concatenate([targets['labels'], jnp.where(chosen, take(best_label), 0)], 1)
  extended['boxes'] = jnp.concatenate([targets['boxes'], take(teacher_boxes).astype(targets['boxes'].dtype)], 1)
  extended['attributes'] = jnp.concatenate([targets['attributes'], pseudo_attributes], 1)
  extended['weight'] = jnp.concatenate([targets['weight'], jnp.where(chosen, weight, 0.0)], 1)
  extended['is_pseudo'] = jnp.concatenate([jnp.zeros_like(targets['weight'], bool), chosen], 1)
  return extended
