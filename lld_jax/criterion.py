"""The training objective: per-layer Hungarian matching plus class, box, attribute, denoising and two-stage losses.

`detection_loss` is a pure function of the model outputs and the targets, callable inside the pmapped step.
Box and class sums are divided by the mean number of real boxes per device (`axis_name`), so a device with
an empty image does not blow up its gradient.
"""

import jax
import jax.numpy as jnp

from lld_jax import boxes as box_ops
from lld_jax import dense_assignment
from lld_jax import losses
from lld_jax import matching


# 'one_to_one': the selected proposals matched like a decoder layer (RT-DETR); 'one_to_one_tokens': every token
# a prediction, matched one-to-one (Deformable DETR); 'one_to_many': every token, task-aligned assignment (YOLOv8).
ENCODER_LOSSES = ('one_to_one', 'one_to_one_tokens', 'one_to_many')


def _global_count(count, axis_name):
  if axis_name is not None:
    count = jax.lax.psum(count, axis_name) / jax.lax.psum(1, axis_name)
  return jnp.maximum(count, 1.0)


def _match_stacked(logits, boxes, targets, weights: matching.CostWeights, attribute_logits=None):
  """Hungarian matching of S prediction sets at once: logits [S, B, Q, K], boxes [S, B, Q, 4].

  One vmapped assignment for every decoder layer and the encoder proposals, so the step runs one while loop
  instead of one per set (each loop iteration is a device round of tiny kernels on accelerators).
  Returns query_for_target [S, B, T] and query_in_region [S, B, Q].
  """
  restricted = ~targets['is_pseudo'] if 'is_pseudo' in targets else None
  per_set = lambda l, b, a: matching.batched_match(
      l, b, targets['labels'], targets['boxes'], targets['weight'] > 0, targets['annotation_mask'], weights, a,
      targets['attributes'] if a is not None else None, restricted)
  return jax.vmap(per_set)(logits, boxes, attribute_logits)


def _matched_losses(logits, boxes, query_for_target, query_in_region, targets, weights, loss_config, num_boxes,
                    background_below, usable=None):
  """Class and box losses of one set of predictions [B, Q, ...] under a given assignment; `usable` [B, Q] (default
  all) marks the predictions that may be negatives."""
  background = losses.background_weight(query_in_region, logits, background_below,
                                        targets.get('region_negative_weight'))
  if usable is not None:
    background = jnp.where(usable, background, 0.0)
  query_labels, query_boxes, query_weight, is_matched = losses.matched_query_targets(
      query_for_target, targets['labels'], targets['boxes'], targets['weight'], background, logits.shape[1])
  quality = box_ops.iou(box_ops.cxcywh_to_xyxy(boxes), box_ops.cxcywh_to_xyxy(query_boxes))
  quality = jnp.where(is_matched, quality, 0.0)
  class_sum = losses.class_loss(logits, query_labels, quality, query_weight, loss_config.class_loss,
                                weights.focal_alpha, weights.focal_gamma)
  matched_boxes = losses.gather_queries(boxes, query_for_target)
  l1_sum, giou_sum = losses.box_losses(matched_boxes, targets['boxes'], targets['weight'])
  return {'class': class_sum / num_boxes, 'l1': l1_sum / num_boxes, 'giou': giou_sum / num_boxes}


def _matched_token_losses(outputs, targets, weights, loss_config, num_boxes, background_below):
  """Every encoder token as a prediction, each cell matched one-to-one to the best of them (Deformable DETR's
  two-stage loss): a cell whose tokens the query selection passes over still gets a positive token, so a rare or
  faint kind of cell is not left below the selection for good. Padding tokens are neither positive nor negative."""
  query_for_target, in_region = _match_stacked(outputs['token_logits'][None], outputs['token_boxes'][None], targets,
                                               weights)
  return {f'{term}/tokens': value for term, value in _matched_losses(
      outputs['token_logits'], outputs['token_boxes'], query_for_target[0], in_region[0], targets, weights,
      loss_config, num_boxes, background_below, outputs['token_usable']).items()}


def _denoising_losses(outputs, layer, targets, loss_config, num_boxes, background_below):
  """Denoising queries know their target: positives regress it, negatives are "no object"."""
  logits, boxes = outputs['dn_logits'][layer], outputs['dn_boxes'][layer]
  target_index, valid, positive = outputs['dn_target_index'], outputs['dn_valid'], outputs['dn_is_positive']
  target_boxes = losses.gather_queries(targets['boxes'], target_index)
  target_weight = losses.gather_queries(targets['weight'], target_index)
  in_region = jax.vmap(matching.points_in_mask)(boxes[..., :2], targets['annotation_mask'])
  background = losses.background_weight(in_region, logits, background_below, targets.get('region_negative_weight'))
  query_weight = jnp.where(positive, target_weight, jnp.where(valid, background, 0.0))
  quality = jnp.where(positive & valid, box_ops.iou(box_ops.cxcywh_to_xyxy(boxes),
                                                   box_ops.cxcywh_to_xyxy(target_boxes)), 0.0)
  labels = jnp.where(valid, outputs['dn_labels'], -1)
  # Each group holds a positive and a negative copy of every target slot (a static count).
  num_groups = max(positive.shape[1] // max(2 * targets['labels'].shape[1], 1), 1)
  normalizer = num_boxes * num_groups
  class_sum = losses.class_loss(logits, labels, quality, query_weight, loss_config.class_loss)
  box_weight = jnp.where(positive, target_weight, 0.0)
  l1_sum, giou_sum = losses.box_losses(boxes, target_boxes, box_weight)
  return {'class': class_sum / normalizer, 'l1': l1_sum / normalizer, 'giou': giou_sum / normalizer}


def _token_losses(outputs, targets, loss_config, axis_name, background_below):
  """One-to-many losses of every encoder token (see dense_assignment): usable tokens are negatives unless assigned
  with `losses.background_weight`; elsewhere they count only where a (pseudo) target takes them."""
  in_region = jax.vmap(matching.points_in_mask)(outputs['token_centres'], targets['annotation_mask'])
  background = losses.background_weight(in_region, outputs['token_logits'], background_below,
                                        targets.get('region_negative_weight'))
  token_weight = jnp.where(outputs['token_usable'], background, 0.0)
  per_image = jax.vmap(lambda *a: dense_assignment.dense_losses(*a, top_k=loss_config.dense_top_k))(
      outputs['token_logits'], outputs['token_boxes'], outputs['token_centres'], token_weight, targets['labels'],
      targets['boxes'], targets['weight'])
  class_sum, l1_sum, giou_sum, quality_sum = (x.sum() for x in per_image)
  normalizer = _global_count(quality_sum, axis_name)
  return {'class/tokens': class_sum / normalizer, 'l1/tokens': l1_sum / normalizer,
          'giou/tokens': giou_sum / normalizer}


def _cell_cross_entropy(logits, dn_logits, values, final_assignment, outputs, targets, axis_name):
  """Mean cross-entropy of per-cell categorical labels (attributes, or the class as one more) [B, T, A]: read
  from the final layer's matched queries (logits [B, Q, A, V]) and from the positive denoising copies the model
  reads them for (dn_logits [B, D, A, V], one per target slot, laid out first)."""
  total, count = losses.attribute_loss(losses.gather_queries(logits, final_assignment), values, targets['weight'])
  if dn_logits is not None:
    num_read = dn_logits.shape[1]
    target_index = outputs['dn_target_index'][:, :num_read]
    dn_weight = jnp.where(outputs['dn_is_positive'][:, :num_read] & outputs['dn_valid'][:, :num_read],
                          losses.gather_queries(targets['weight'], target_index), 0.0)
    dn_total, dn_count = losses.attribute_loss(dn_logits, losses.gather_queries(values, target_index), dn_weight)
    total, count = total + dn_total, count + dn_count
  return total / _global_count(count, axis_name)


def crop_cross_entropy(logits, labels, axis_name=None):
  """Mean cross-entropy of the cell classifier on true-cell crops (lld_jax.cell_crops): logits [B, N, K], labels
  [B, N], the mean over every device's crops."""
  return crop_attribute_cross_entropy(logits[:, :, None, :], labels[:, :, None], axis_name)


def crop_attribute_cross_entropy(logits, values, axis_name=None):
  """Mean cross-entropy of per-crop categorical labels: logits [B, N, A, V], values [B, N, A] (-1: not
  applicable, left out), the mean over every device's known values."""
  total, count = losses.attribute_loss(logits, values, jnp.ones(values.shape[:2], jnp.float32))
  return total / _global_count(count, axis_name)


def detection_loss(outputs, targets, loss_config, axis_name=None):
  """Total weighted loss and a dict of its terms.

  targets: labels [B, T], boxes [B, T, 4] normalized cxcywh, attributes [B, T, A] (-1 = n/a), weight [B, T]
  (1 real, pseudo-label weight, 0 padding), annotation_mask [B, h, w], optionally is_pseudo [B, T] and
  region_negative_weight [B] (`losses.region_negative_weight`: the weight of the negatives inside the region).
  loss_config: class_loss, class/l1/giou/attribute weights, aux_loss, matcher cost weights, and the rule for
  predictions in the unlabelled area (unlabelled_background_below, unlabelled_background_relative).
  """
  weights = matching.CostWeights(
      class_weight=loss_config.cost_class, l1_weight=loss_config.cost_l1, giou_weight=loss_config.cost_giou,
      attribute_weight=loss_config.cost_attribute)
  num_boxes = _global_count(targets['weight'].sum(), axis_name)
  term_weights = {'class': loss_config.class_weight, 'l1': loss_config.l1_weight, 'giou': loss_config.giou_weight}
  terms = {}
  num_layers = outputs['pred_logits'].shape[0]
  # The prediction sets to match: the decoder layers (all with aux_loss, else the last) and the proposals.
  matched_layers = [i for i in range(num_layers) if loss_config.aux_loss or i == num_layers - 1]
  names = [f'layer{i}' for i in matched_layers]
  logits = [outputs['pred_logits'][i] for i in matched_layers]
  boxes = [outputs['pred_boxes'][i] for i in matched_layers]
  if loss_config.encoder_loss not in ENCODER_LOSSES:
    raise ValueError(f'loss.encoder_loss={loss_config.encoder_loss!r}: expected one of {ENCODER_LOSSES}')
  if loss_config.encoder_loss in ('one_to_many', 'one_to_one_tokens') and 'token_logits' not in outputs:
    raise ValueError(f'loss.encoder_loss={loss_config.encoder_loss} needs the per-token outputs of a train-mode '
                     'forward pass')
  if loss_config.encoder_loss == 'one_to_one' and 'enc_logits' in outputs:
    names.append('encoder')
    logits.append(outputs['enc_logits'])
    boxes.append(outputs['enc_boxes'])
  final = names.index(f'layer{num_layers - 1}')
  # The attribute cost exists for the final layer only, which is then matched on its own.
  with_attributes = bool(weights.attribute_weight)
  batched = [i for i in range(len(names)) if not (with_attributes and i == final)]
  assignments, in_region = [None] * len(names), [None] * len(names)
  stacked = _match_stacked(jnp.stack([logits[i] for i in batched]), jnp.stack([boxes[i] for i in batched]),
                           targets, weights)
  for j, i in enumerate(batched):
    assignments[i], in_region[i] = stacked[0][j], stacked[1][j]
  if with_attributes:
    single = _match_stacked(logits[final][None], boxes[final][None], targets, weights,
                            outputs['attribute_logits'][None])
    assignments[final], in_region[final] = single[0][0], single[1][0]
  final_assignment = assignments[final]
  background_below = loss_config.unlabelled_background_below
  if loss_config.unlabelled_background_relative:
    background_below *= losses.labelled_cell_score(logits[final], final_assignment, targets, axis_name)
  if loss_config.encoder_loss == 'one_to_many':
    terms.update(_token_losses(outputs, targets, loss_config, axis_name, background_below))
  if loss_config.encoder_loss == 'one_to_one_tokens':
    terms.update(_matched_token_losses(outputs, targets, weights, loss_config, num_boxes, background_below))
  for i, name in enumerate(names):
    for term, value in _matched_losses(logits[i], boxes[i], assignments[i], in_region[i], targets, weights,
                                       loss_config, num_boxes, background_below).items():
      terms[f'{term}/{name}'] = value
  if 'dn_logits' in outputs:
    for layer in matched_layers:
      for term, value in _denoising_losses(outputs, layer, targets, loss_config, num_boxes,
                                           background_below).items():
        terms[f'dn_{term}/layer{layer}'] = value

  terms['attributes'] = _cell_cross_entropy(outputs['attribute_logits'], outputs.get('dn_attribute_logits'),
                                            targets['attributes'], final_assignment, outputs, targets, axis_name)
  if 'cell_class_logits' in outputs and loss_config.cell_class_weight:
    as_one_attribute = lambda x: None if x is None else x[:, :, None, :]
    terms['cell_class'] = _cell_cross_entropy(
        as_one_attribute(outputs['cell_class_logits']), as_one_attribute(outputs.get('dn_cell_class_logits')),
        targets['labels'][:, :, None], final_assignment, outputs, targets, axis_name)
  if 'crop_class_logits' in outputs and loss_config.cell_class_weight:
    terms['cell_class/crops'] = crop_cross_entropy(outputs['crop_class_logits'], targets['crop_labels'], axis_name)
  if 'crop_attribute_logits' in outputs:
    terms['attributes/crops'] = crop_attribute_cross_entropy(outputs['crop_attribute_logits'],
                                                             targets['crop_attributes'], axis_name)

  term_weights.update(attributes=loss_config.attribute_weight, cell_class=loss_config.cell_class_weight)
  total = 0.0
  for name, value in terms.items():
    weight = term_weights[name.split('/')[0].removeprefix('dn_')]
    total = total + weight * value
  return total, terms
