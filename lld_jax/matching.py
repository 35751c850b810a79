"""Hungarian matching of predictions to targets, restricted to annotated regions.

All functions take one image (no batch axis); `batched_match` vmaps over the batch. The cost follows
Deformable DETR: focal class cost + L1 + generalized IoU, with an optional attribute term.

Region rule: a query whose predicted box centre lies outside the image's annotation mask may not take a real
target (a large but finite penalty keeps the assignment well-defined when too few queries are inside).
Padded targets get one constant cost, so they never change which queries the real targets take.
"""

import dataclasses

import jax
import jax.numpy as jnp
import optax

from lld_jax import boxes as box_ops

# The annotation mask reaches the loss at 1/MASK_STRIDE of the image's side (input_pipeline makes it); the region
# rule reads it wherever a box centre falls, so the stride only sets how finely a region's edge is drawn.
MASK_STRIDE = 8
OUTSIDE_REGION_PENALTY = 1e3
PADDED_TARGET_COST = 0.0


@dataclasses.dataclass(frozen=True)
class CostWeights:
  class_weight: float = 2.0
  l1_weight: float = 5.0
  giou_weight: float = 2.0
  attribute_weight: float = 0.0
  focal_alpha: float = 0.25
  focal_gamma: float = 2.0


def focal_class_cost(logits, labels, alpha=0.25, gamma=2.0):
  """[Q, T] cost of giving query q the label of target t, from sigmoid logits [Q, K] and labels [T]."""
  prob = jax.nn.sigmoid(logits)
  positive = alpha * (1 - prob) ** gamma * -jax.nn.log_sigmoid(logits)
  negative = (1 - alpha) * prob**gamma * -jax.nn.log_sigmoid(-logits)
  return jnp.take(positive - negative, labels, axis=1)


def attribute_cost(attribute_logits, attributes):
  """[Q, T] mean negative log-likelihood of target t's known attributes under query q's predictions.

  attribute_logits [Q, A, V] (values beyond an attribute's range are masked to -inf by the model),
  attributes [T, A] with -1 for "not applicable".
  """
  log_probs = jax.nn.log_softmax(attribute_logits, axis=-1)  # [Q, A, V]
  known = attributes >= 0  # [T, A]
  picked = jnp.take_along_axis(
      log_probs[:, None], jnp.clip(attributes, 0)[None, :, :, None], axis=-1)[..., 0]  # [Q, T, A]
  return -(picked * known[None]).sum(-1) / jnp.maximum(known.sum(-1), 1)[None]


def points_in_mask(points, mask):
  """Whether normalized (x, y) points [Q, 2] fall on a nonzero pixel of mask [h, w]."""
  h, w = mask.shape
  column = jnp.clip(jnp.floor(points[:, 0] * w).astype(jnp.int32), 0, w - 1)
  row = jnp.clip(jnp.floor(points[:, 1] * h).astype(jnp.int32), 0, h - 1)
  inside_image = (points[:, 0] >= 0) & (points[:, 0] <= 1) & (points[:, 1] >= 0) & (points[:, 1] <= 1)
  return (mask[row, column] > 0.5) & inside_image


def matching_cost(pred_logits, pred_boxes, target_labels, target_boxes, target_valid, query_in_region,
                  weights: CostWeights, pred_attribute_logits=None, target_attributes=None, target_restricted=None):
  """[Q, T] cost matrix for one image. Boxes are normalized cxcywh.

  `target_restricted` [T] marks the targets that the region rule applies to (default: all); pseudo-labels,
  which lie outside the annotated region by construction, are exempt.
  """
  cost = weights.class_weight * focal_class_cost(
      pred_logits, target_labels, weights.focal_alpha, weights.focal_gamma)
  cost += weights.l1_weight * jnp.abs(pred_boxes[:, None, :] - target_boxes[None, :, :]).sum(-1)
  cost -= weights.giou_weight * box_ops.pairwise_generalized_iou(
      box_ops.cxcywh_to_xyxy(pred_boxes), box_ops.cxcywh_to_xyxy(target_boxes))
  if weights.attribute_weight and pred_attribute_logits is not None:
    cost += weights.attribute_weight * attribute_cost(pred_attribute_logits, target_attributes)
  # Non-finite predictions must not break the assignment; they are caught by the train step's guard.
  cost = jnp.nan_to_num(cost, nan=OUTSIDE_REGION_PENALTY, posinf=OUTSIDE_REGION_PENALTY,
                        neginf=-OUTSIDE_REGION_PENALTY)
  if target_restricted is None:
    target_restricted = jnp.ones(target_labels.shape, bool)
  cost = jnp.where(query_in_region[:, None] | ~target_restricted[None, :], cost, cost + OUTSIDE_REGION_PENALTY)
  return jnp.where(target_valid[None, :], cost, PADDED_TARGET_COST)


def hungarian_match(cost):
  """For a [Q, T] cost with Q >= T, the query assigned to each target: int32 [T]."""
  num_targets = cost.shape[1]
  if num_targets > cost.shape[0]:
    raise ValueError(f'matching needs at least as many queries ({cost.shape[0]}) as targets ({num_targets})')
  target_index, query_index = optax.assignment.hungarian_algorithm(cost.T)
  return jnp.zeros((num_targets,), jnp.int32).at[target_index].set(query_index.astype(jnp.int32))


def match(pred_logits, pred_boxes, target_labels, target_boxes, target_valid, annotation_mask,
          weights: CostWeights, pred_attribute_logits=None, target_attributes=None, target_restricted=None):
  """Query index per target [T] for one image, and whether each query [Q] lies in the annotated region."""
  query_in_region = points_in_mask(pred_boxes[:, :2], annotation_mask)
  cost = matching_cost(pred_logits, pred_boxes, target_labels, target_boxes, target_valid, query_in_region,
                       weights, pred_attribute_logits, target_attributes, target_restricted)
  return jax.lax.stop_gradient(hungarian_match(jax.lax.stop_gradient(cost))), query_in_region


def batched_match(pred_logits, pred_boxes, target_labels, target_boxes, target_valid, annotation_mask,
                  weights: CostWeights, pred_attribute_logits=None, target_attributes=None, target_restricted=None):
  """`match` over a leading batch axis."""
  arrays = dict(pred_attribute_logits=pred_attribute_logits, target_attributes=target_attributes,
                target_restricted=target_restricted)
  present = {k: v for k, v in arrays.items() if v is not None}

  def one(l, b, tl, tb, tv, m, extra):
    return match(l, b, tl, tb, tv, m, weights, **extra)

  return jax.vmap(one)(pred_logits, pred_boxes, target_labels, target_boxes, target_valid, annotation_mask, present)


def queries_to_targets(query_for_target, target_valid, num_queries):
  """Inverse of the assignment: target index per query [Q], -1 for queries without a real target."""
  targets = jnp.arange(query_for_target.shape[0], dtype=jnp.int32)
  scatter_at = jnp.where(target_valid, query_for_target, num_queries)  # out of range -> dropped
  return jnp.full((num_queries,), -1, jnp.int32).at[scatter_at].set(targets, mode='drop')
