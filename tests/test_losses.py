"""Losses: focal/varifocal formulas, the annotated-region rule on the class loss, attribute masking, and the full
`criterion.detection_loss` on hand-made model outputs (empty image, full image, perfect vs shifted)."""

import functools

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import synthetic_demo
from lld_jax import criterion
from lld_jax import losses
from lld_jax import matching
from lld_jax import sharding
from lld_jax import train_step
from lld_jax.default_config import base_config
from lld_jax.models import detector
from tfds_lld import lld_format

# Small fixed shapes shared by the criterion tests (one compile per output structure).
L, B, Q, K, T, MASK = 2, 2, 6, 3, 3, 8
NUM_VALUES = (3, 2, 2, 2, 2, 2, 2)  # attribute 0 has 3 values, the other six have 2
A, V = len(NUM_VALUES), max(NUM_VALUES)


def _sigmoid(x):
  return 1 / (1 + np.exp(-x))


def test_sigmoid_focal_loss_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (4, 5))
  targets = (rng.uniform(size=(4, 5)) < 0.4).astype(np.float64)
  alpha, gamma = 0.25, 2.0
  p = _sigmoid(logits)
  expected = np.where(targets == 1, -alpha * (1 - p)**gamma * np.log(p), -(1 - alpha) * p**gamma * np.log(1 - p))
  got = losses.sigmoid_focal_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(targets, jnp.float32), alpha, gamma)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)


def test_varifocal_loss_matches_numpy():
  rng = np.random.default_rng(1)
  logits = rng.normal(0, 3, (4, 5))
  quality = np.where(rng.uniform(size=(4, 5)) < 0.5, rng.uniform(0.05, 1.0, (4, 5)), 0.0)
  alpha, gamma = 0.75, 2.0
  p = _sigmoid(logits)
  bce = -(quality * np.log(p) + (1 - quality) * np.log(1 - p))
  # Positives: BCE against the IoU, weighted by the IoU; negatives: alpha * p^gamma * -log(1 - p).
  expected = np.where(quality > 0, quality * bce, alpha * p**gamma * -np.log(1 - p))
  got = losses.varifocal_loss(jnp.asarray(logits, jnp.float32), jnp.asarray(quality, jnp.float32), alpha, gamma)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-6)
  # The weight is a constant for the gradient (RT-DETR): d/dlogit = weight * (p - quality).
  grad = jax.grad(lambda x: losses.varifocal_loss(x, jnp.asarray(quality, jnp.float32), alpha, gamma).sum())(
      jnp.asarray(logits, jnp.float32))
  weight = np.where(quality > 0, quality, alpha * p**gamma)
  np.testing.assert_allclose(grad, weight * (p - quality), rtol=1e-3, atol=1e-6)


@pytest.mark.parametrize('loss_type', ['focal', 'varifocal'])
def test_class_loss_sums_weighted_queries(loss_type):
  logits = jnp.array([[[2.0, -1.0], [0.5, 0.3], [-3.0, 4.0]]])
  labels = jnp.array([[0, -1, 1]])
  quality = jnp.array([[0.7, 0.0, 0.4]])
  weight = jnp.array([[1.0, 0.0, 0.5]])
  one_hot = jax.nn.one_hot(labels, 2)
  if loss_type == 'focal':
    per_class = losses.sigmoid_focal_loss(logits, one_hot)
  else:
    per_class = losses.varifocal_loss(logits, one_hot * quality[..., None])
  expected = (per_class.sum(-1) * weight).sum()
  np.testing.assert_allclose(losses.class_loss(logits, labels, quality, weight, loss_type), expected, rtol=1e-6)
  with pytest.raises(ValueError, match='unknown class loss'):
    losses.class_loss(logits, labels, quality, weight, 'softmax')


def _left_half_mask():
  mask = np.zeros((1, MASK, MASK), np.float32)
  mask[:, :, :MASK // 2] = 1
  return mask


@pytest.mark.parametrize('loss_type', ['focal', 'varifocal'])
def test_region_rule_on_class_loss(loss_type):
  """A confident query without a target is free outside the annotated region, penalised inside it."""
  target_boxes = np.array([[[0.25, 0.5, 0.1, 0.1], [0, 0, 0, 0]]], np.float32)  # one real target, one padded
  targets = dict(labels=np.array([[1, 0]]), boxes=target_boxes, weight=np.array([[1.0, 0.0]], np.float32))
  mask = _left_half_mask()
  per_query = {}
  for where, centre_x in [('outside', 0.75), ('inside', 0.4)]:
    logits = np.full((1, 3, K), -10.0, np.float32)
    logits[0, 0, 1] = 5.0  # query 0 sits on the target
    logits[0, 1, 0] = 5.0  # query 1: confident, no target
    boxes = np.array([[[0.25, 0.5, 0.1, 0.1], [centre_x, 0.5, 0.1, 0.1], [0.9, 0.9, 0.05, 0.05]]], np.float32)
    in_region = matching.points_in_mask(boxes[0, :, :2], mask[0])[None]
    np.testing.assert_array_equal(in_region[0], [True, where == 'inside', False])
    # The assignment the matcher makes here (tests/test_matching.py covers the matcher itself): the real target
    # takes query 0, the padded one query 2.
    query_for_target = jnp.array([[0, 2]], jnp.int32)
    labels, query_boxes, weight, is_matched = losses.matched_query_targets(
        query_for_target, targets['labels'], targets['boxes'], targets['weight'], in_region, 3)
    np.testing.assert_array_equal(is_matched[0], [True, False, False])  # the padded target matches nothing
    np.testing.assert_array_equal(labels[0], [1, -1, -1])
    np.testing.assert_allclose(query_boxes[0, 0], target_boxes[0, 0])
    # Query 0 is matched (weight 1); query 1 counts only inside; query 2 (outside, unsure) never counts.
    np.testing.assert_allclose(weight[0], [1.0, 1.0 if where == 'inside' else 0.0, 0.0])
    quality = jnp.where(is_matched, 1.0, 0.0)
    per_query[where] = float(losses.class_loss(logits, labels, quality, weight * jnp.array([[0.0, 1.0, 0.0]]),
                                               loss_type))
    total = float(losses.class_loss(logits, labels, quality, weight, loss_type))
    np.testing.assert_allclose(total, per_query[where] + float(losses.class_loss(
        logits, labels, quality, weight * jnp.array([[1.0, 0.0, 0.0]]), loss_type)), rtol=1e-5)
  assert per_query['outside'] == 0.0
  assert per_query['inside'] > 0.1


def test_counts_as_background_matches_numpy():
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 3, (2, 5, K)).astype(np.float32)
  in_region = rng.random((2, 5)) < 0.5
  best = _sigmoid(logits).max(-1)
  for below in (0.0, 0.3, 0.7, 1.01):
    expected = in_region | (best < below)
    np.testing.assert_array_equal(losses.counts_as_background(in_region, logits, below), expected)
  np.testing.assert_array_equal(losses.counts_as_background(in_region, logits, 0.0), in_region)
  assert np.asarray(losses.counts_as_background(in_region, logits, 1.01)).all()


def test_labelled_cell_score_matches_numpy():
  rng = np.random.default_rng(8)
  logits = rng.normal(0, 2, (2, 5, K)).astype(np.float32)
  query_for_target = np.array([[3, 0, 1], [4, 2, 0]], np.int32)
  targets = dict(labels=np.array([[2, 0, 1], [1, 1, 0]], np.int32), weight=np.array([[1, 1, 0.1], [1, 0, 0]],
                                                                                     np.float32),
                 is_pseudo=np.array([[False, False, True], [False, False, False]]))
  probability = _sigmoid(logits)
  expected = np.mean([probability[0, 3, 2], probability[0, 0, 0], probability[1, 4, 1]])  # no pseudo, no padding
  np.testing.assert_allclose(losses.labelled_cell_score(logits, query_for_target, targets), expected, rtol=1e-6)
  no_cells = dict(targets, weight=np.zeros((2, 3), np.float32))
  assert float(losses.labelled_cell_score(logits, query_for_target, no_cells)) == 1.0


def test_attribute_loss_ignores_not_applicable():
  rng = np.random.default_rng(0)
  logits = rng.normal(size=(2, 3, A, V)).astype(np.float32)
  logits[..., 1:, 2] = -1e9
  attributes = rng.integers(-1, 2, (2, 3, A)).astype(np.int32)
  attributes[0, 0] = -1  # one object with no known attribute
  weight = np.ones((2, 3), np.float32)
  total, count = losses.attribute_loss(logits, attributes, weight)
  assert float(count) == (attributes >= 0).sum()
  log_probs = np.asarray(jax.nn.log_softmax(logits, -1))
  known = attributes >= 0
  expected = -np.take_along_axis(log_probs, np.clip(attributes, 0, None)[..., None], -1)[..., 0][known].sum()
  np.testing.assert_allclose(total, expected, rtol=1e-5)
  # Changing the logits of N/A attributes changes nothing.
  changed = np.where((~known)[..., None], logits + rng.normal(0, 5, logits.shape).astype(np.float32), logits)
  total2, count2 = losses.attribute_loss(changed, attributes, weight)
  np.testing.assert_allclose(total2, total, rtol=1e-6)
  assert float(count2) == float(count)
  # A padded object (weight 0) neither adds loss nor count.
  weight[1, 2] = 0.0
  total3, count3 = losses.attribute_loss(changed, attributes, weight)
  assert float(count3) == known.sum() - known[1, 2].sum()
  assert float(total3) <= float(total)


def _loss_config():
  config = ml_collections.ConfigDict(base_config().loss.to_dict())
  assert config.class_loss == 'varifocal' and config.aux_loss
  config.encoder_loss = 'one_to_one'  # these outputs are hand-made proposals; the token loss is tested below
  return config


def _attribute_logits(rng, shape):
  logits = rng.normal(size=shape + (A, V)).astype(np.float32)
  allowed = np.arange(V)[None, :] < np.array(NUM_VALUES)[:, None]
  return np.where(allowed, logits, -1e9).astype(np.float32)


def _targets(rng, num_real):
  """num_real real objects per image (list of B ints), padded to T like the input pipeline does."""
  labels = np.zeros((B, T), np.int32)
  boxes = np.zeros((B, T, 4), np.float32)
  attributes = np.full((B, T, A), -1, np.int32)
  weight = np.zeros((B, T), np.float32)
  for b, n in enumerate(num_real):
    labels[b, :n] = rng.integers(0, K, n)
    boxes[b, :n] = np.concatenate([rng.uniform(0.15, 0.4, (n, 1)), rng.uniform(0.2, 0.8, (n, 1)),
                                   rng.uniform(0.05, 0.15, (n, 2))], -1)
    attributes[b, :n] = rng.integers(-1, 2, (n, A))
    weight[b, :n] = 1.0
  mask = np.ones((B, MASK, MASK), np.float32)
  mask[:, :, MASK // 2:] = 0  # annotated on the left half only
  return dict(labels=labels, boxes=boxes, attributes=attributes, weight=weight, annotation_mask=mask)


def _outputs(rng, targets, perfect=False, shift=0.0):
  """Model-shaped outputs; with `perfect`, the first T queries predict the targets exactly (plus `shift`)."""
  logits = rng.normal(-3, 1, (L, B, Q, K)).astype(np.float32)
  boxes = np.concatenate([rng.uniform(0.1, 0.9, (L, B, Q, 2)), rng.uniform(0.05, 0.2, (L, B, Q, 2))],
                         -1).astype(np.float32)
  attribute_logits = _attribute_logits(rng, (B, Q))
  enc_logits = rng.normal(-3, 1, (B, Q, K)).astype(np.float32)
  enc_boxes = boxes[0].copy()
  if perfect:
    logits[:] = -8.0
    enc_logits[:] = -8.0
    for b in range(B):
      for t in np.flatnonzero(targets['weight'][b] > 0):
        logits[:, b, t, targets['labels'][b, t]] = 8.0
        enc_logits[b, t, targets['labels'][b, t]] = 8.0
        boxes[:, b, t] = targets['boxes'][b, t] + np.array([shift, shift, 0, 0], np.float32)
        enc_boxes[b, t] = boxes[0, b, t]
        for a in range(A):
          value = targets['attributes'][b, t, a]
          if value >= 0:
            attribute_logits[b, t, a, :NUM_VALUES[a]] = -8.0
            attribute_logits[b, t, a, value] = 8.0
  return dict(pred_logits=logits, pred_boxes=boxes, attribute_logits=attribute_logits, enc_logits=enc_logits,
              enc_boxes=enc_boxes)


_FAST_COMPILE = {'xla_backend_optimization_level': 0}  # compile time dominates these tests on a small CPU
# Eager jax.random compiles per op and shape, slower than one small compile.
_denoising_queries = jax.jit(detector.denoising_queries, static_argnums=(4, 5), compiler_options=_FAST_COMPILE)


def _with_denoising(rng, outputs, targets, groups=2):
  dn_labels, dn_boxes, dn_target, dn_valid, dn_positive = _denoising_queries(
      jax.random.PRNGKey(0), targets['labels'], targets['boxes'], targets['weight'] > 0, groups, K, 0.5, 1.0)
  num_dn = dn_labels.shape[1]
  labels = np.where(dn_positive, np.take_along_axis(targets['labels'], np.asarray(dn_target), 1), -1)
  return dict(outputs, dn_logits=rng.normal(-2, 1, (L, B, num_dn, K)).astype(np.float32),
              dn_boxes=np.broadcast_to(np.asarray(dn_boxes), (L,) + dn_boxes.shape).copy(),
              dn_attribute_logits=_attribute_logits(rng, (B, num_dn)), dn_labels=labels, dn_target_index=dn_target,
              dn_valid=dn_valid, dn_is_positive=dn_positive)


_FLOAT_KEYS = ('pred_logits', 'pred_boxes', 'attribute_logits', 'enc_logits', 'enc_boxes', 'dn_logits', 'dn_boxes',
               'dn_attribute_logits', 'cell_class_logits', 'dn_cell_class_logits')


@functools.partial(jax.jit, static_argnums=2, compiler_options=_FAST_COMPILE)
def _loss_and_grad(outputs, targets, config_items):
  config = ml_collections.ConfigDict(dict(config_items))
  differentiable = {k: v for k, v in outputs.items() if k in _FLOAT_KEYS}
  rest = {k: v for k, v in outputs.items() if k not in _FLOAT_KEYS}

  def loss_fn(diff):
    return criterion.detection_loss({**diff, **rest}, targets, config)

  (total, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(differentiable)
  return total, terms, grads


def _run(outputs, targets, config=None):
  config = config or _loss_config()
  return _loss_and_grad(outputs, targets, tuple(sorted(config.to_dict().items())))


def _assert_finite(total, terms, grads):
  assert np.isfinite(float(total)), total
  for name, value in terms.items():
    assert np.isfinite(float(value)), name
  for name, grad in grads.items():
    assert np.isfinite(np.asarray(grad)).all(), name


# Every criterion test runs the same jitted function on the same structure (with denoising outputs), so the
# three Hungarian matchings (two decoder layers and the encoder) compile once for the whole file.


@pytest.mark.parametrize('num_real', [(0, T), (0, 0)], ids=['empty_and_full', 'both_empty'])
def test_detection_loss_finite_for_empty_and_full_images(num_real):
  rng = np.random.default_rng(0)
  targets = _targets(rng, num_real)
  outputs = _with_denoising(rng, _outputs(rng, targets), targets)
  total, terms, grads = _run(outputs, targets)
  _assert_finite(total, terms, grads)
  expected_terms = {f'{n}/{s}' for n in ('class', 'l1', 'giou') for s in ('layer0', 'layer1', 'encoder')}
  expected_terms |= {f'dn_{n}/{s}' for n in ('class', 'l1', 'giou') for s in ('layer0', 'layer1')}
  assert set(terms) == expected_terms | {'attributes'}
  if sum(num_real) == 0:
    for name in terms:
      if 'class' not in name:
        assert float(terms[name]) == 0.0, name
    assert float(terms['class/layer1']) > 0  # predictions inside the annotated region are still negatives
    assert float(jnp.abs(grads['pred_boxes']).sum()) == 0.0  # no targets, no box gradient
    assert float(jnp.abs(grads['dn_boxes']).sum()) == 0.0
  # The empty image's queries get no attribute or box gradient (nothing is matched there).
  assert float(jnp.abs(grads['attribute_logits'][0]).sum()) == 0.0
  assert float(jnp.abs(grads['pred_boxes'][:, 0]).sum()) == 0.0
  assert float(jnp.abs(grads['dn_boxes'][:, 0]).sum()) == 0.0
  if sum(num_real):
    assert float(jnp.abs(grads['pred_boxes'][:, 1]).sum()) > 0
    assert float(jnp.abs(grads['dn_boxes'][:, 1]).sum()) > 0


def test_perfect_prediction_has_lower_loss_than_shifted():
  targets = _targets(np.random.default_rng(2), (2, T))

  def outputs(**kwargs):
    rng = np.random.default_rng(5)  # same random parts (and denoising outputs) every time
    return _with_denoising(rng, _outputs(rng, targets, **kwargs), targets)

  perfect, perfect_terms, _ = _run(outputs(perfect=True), targets)
  shifted, shifted_terms, _ = _run(outputs(perfect=True, shift=0.05), targets)
  assert float(perfect) < float(shifted)
  for name in ('l1/layer1', 'giou/layer1', 'l1/layer0', 'l1/encoder', 'giou/encoder'):
    assert float(perfect_terms[name]) < 1e-4, name
    assert float(shifted_terms[name]) > 0.01, name
  assert float(perfect_terms['class/layer1']) < float(shifted_terms['class/layer1'])  # varifocal: IoU target
  for name in ('dn_class/layer1', 'dn_l1/layer1', 'attributes'):  # the same in both (dn attributes are random)
    np.testing.assert_allclose(perfect_terms[name], shifted_terms[name], rtol=1e-6)
  random_total, random_terms, _ = _run(outputs(), targets)
  assert float(perfect) < float(random_total)
  assert float(perfect_terms['attributes']) < float(random_terms['attributes'])


def test_unlabelled_area_is_background_only_below_the_threshold():
  """loss.unlabelled_background_below: outside the annotated region an unmatched query is a negative while its
  own score is under the threshold; a confident one stays free, and 0 frees them all."""
  rng = np.random.default_rng(6)
  targets = _targets(rng, (0, T))  # image 0 has no labelled cell: every query of it is unmatched
  outputs = _with_denoising(rng, _outputs(rng, targets), targets)
  inside, outside_confident, outside_unsure = [0, 1, 2], [3], [4, 5]
  outputs['pred_boxes'][:, 0, :, :2] = 0.25
  outputs['pred_boxes'][:, 0, 3:, 0] = 0.75  # the mask annotates the left half
  outputs['pred_logits'][:, 0] = -3.0
  outputs['pred_logits'][:, 0, 3, 1] = 4.0
  gradient_norm = {}
  for below in (0.0, 0.5):
    config = _loss_config()
    config.unlabelled_background_below = below
    _, _, grads = _run(outputs, targets, config)
    gradient_norm[below] = np.abs(np.asarray(grads['pred_logits'])[:, 0]).sum((0, 2))
  for below in (0.0, 0.5):
    assert (gradient_norm[below][inside] > 0).all(), below
    assert (gradient_norm[below][outside_confident] == 0).all(), below
  assert (gradient_norm[0.0][outside_unsure] == 0).all()
  assert (gradient_norm[0.5][outside_unsure] > 0).all()
  # Relative to the labelled cells' scores (image 1's): as unsure as those cells, a query there is left alone;
  # much less sure than them, it is background.
  config = _loss_config()
  config.unlabelled_background_below = 0.5
  config.unlabelled_background_relative = True
  for labelled_logit, counts in ((-3.0, False), (4.0, True)):
    outputs['pred_logits'][:, 1] = labelled_logit
    _, _, grads = _run(outputs, targets, config)
    gradient = np.abs(np.asarray(grads['pred_logits'])[:, 0]).sum((0, 2))
    assert (gradient[outside_unsure] > 0).all() == counts, labelled_logit
    assert (gradient[outside_confident] == 0).all() and (gradient[inside] > 0).all()


def test_region_negative_weight_matches_numpy():
  """The field's area (padding excluded) over the annotated region's, clipped to [1, max_weight]."""
  rng = np.random.default_rng(8)
  annotation_mask = (rng.random((5, 8, 8)) < rng.uniform(0.05, 1.0, (5, 1, 1))).astype(np.float32)
  annotation_mask[3] = 0.0  # no region at all
  annotation_mask[4] = 1.0  # fully annotated
  image_mask = np.ones((5, 32, 32), np.float32)
  image_mask[1, 24:] = 0.0  # a quarter of the canvas is padding
  for max_weight in (0.5, 4.0, 50.0):
    expected = np.clip(image_mask.mean((1, 2)) / np.maximum(annotation_mask.mean((1, 2)), 1e-6), 1.0,
                       max(max_weight, 1.0))
    np.testing.assert_allclose(losses.region_negative_weight(annotation_mask, image_mask, max_weight), expected,
                               rtol=1e-6)
  weight = np.asarray(losses.region_negative_weight(annotation_mask, image_mask, 50.0))
  assert weight[3] == 50.0 and weight[4] == 1.0


def test_region_negative_weight_scales_only_the_negatives_inside_the_region():
  """loss.region_negative_weight_max: unmatched predictions inside the region get w times the class gradient,
  those outside still none, and the labelled cells' own losses stay as they were."""
  rng = np.random.default_rng(9)
  targets = _targets(rng, (0, 2))
  outputs = _with_denoising(rng, _outputs(rng, targets), targets)
  outputs['pred_boxes'][:, 0, :3, 0] = 0.25  # image 0 (no labelled cell): three queries inside the left half
  outputs['pred_boxes'][:, 0, 3:, 0] = 0.75  # and the rest outside
  _, plain_terms, plain = _run(outputs, targets)
  weighted_targets = dict(targets, region_negative_weight=np.array([3.0, 1.0], np.float32))
  _, weighted_terms, weighted = _run(outputs, weighted_targets)
  plain_gradient = np.abs(np.asarray(plain['pred_logits'])[:, 0]).sum((0, 2))
  weighted_gradient = np.abs(np.asarray(weighted['pred_logits'])[:, 0]).sum((0, 2))
  assert (plain_gradient[:3] > 0).all()
  np.testing.assert_allclose(weighted_gradient[:3], 3.0 * plain_gradient[:3], rtol=1e-5)
  assert (weighted_gradient[3:] == 0).all() and (plain_gradient[3:] == 0).all()
  # Image 1's weight is 1: its gradients, and every box loss, do not change.
  np.testing.assert_allclose(np.asarray(weighted['pred_logits'])[:, 1], np.asarray(plain['pred_logits'])[:, 1],
                             rtol=1e-6)
  for name in ('l1/layer1', 'giou/layer1', 'attributes'):
    np.testing.assert_allclose(weighted_terms[name], plain_terms[name], rtol=1e-6)


def test_an_image_without_region_gets_no_gradient_unless_its_unsure_predictions_are_background():
  """Why training may leave such images out (train.images_without_region_add_no_loss): under region-restricted
  matching no output of an image with no annotated region, hence no labelled cell, gets any gradient; with
  loss.unlabelled_background_below its unsure predictions become negatives and it does."""
  rng = np.random.default_rng(13)
  targets = _targets(rng, (0, 2))
  targets['annotation_mask'][0] = 0.0
  outputs = _with_denoising(rng, _outputs(rng, targets), targets)
  layered = ('pred_logits', 'pred_boxes', 'dn_logits', 'dn_boxes')  # [layer, image, ...]; the others [image, ...]
  of_image = lambda grads, name, b: np.asarray(grads[name])[:, b] if name in layered else np.asarray(grads[name])[b]
  _, _, grads = _run(outputs, targets)
  for name in grads:
    assert not of_image(grads, name, 0).any(), name
  assert of_image(grads, 'pred_logits', 1).any() and of_image(grads, 'pred_boxes', 1).any()
  config = _loss_config()
  config.unlabelled_background_below = 0.5  # the random outputs score about 0.05
  _, _, grads = _run(outputs, targets, config)
  assert of_image(grads, 'pred_logits', 0).any() and of_image(grads, 'enc_logits', 0).any()


def test_one_stacked_matching_equals_matching_each_layer_alone():
  """The criterion matches every decoder layer and the proposals in one vmapped assignment; each set's box
  losses must be those of its own independent Hungarian matching."""
  rng = np.random.default_rng(11)
  targets = _targets(rng, (2, T))
  outputs = _with_denoising(rng, _outputs(rng, targets), targets)
  _, terms, _ = _run(outputs, targets)
  weights = matching.CostWeights()
  num_boxes = max(float(targets['weight'].sum()), 1.0)
  sets = {'layer0': (outputs['pred_logits'][0], outputs['pred_boxes'][0]),
          'layer1': (outputs['pred_logits'][1], outputs['pred_boxes'][1]),
          'encoder': (outputs['enc_logits'], outputs['enc_boxes'])}
  assignments = set()
  for name, (logits, boxes) in sets.items():
    query_for_target, _ = jax.jit(functools.partial(matching.batched_match, weights=weights),
                                  compiler_options=_FAST_COMPILE)(
        logits, boxes, targets['labels'], targets['boxes'], targets['weight'] > 0, targets['annotation_mask'])
    l1_sum, giou_sum = losses.box_losses(losses.gather_queries(jnp.asarray(boxes), query_for_target),
                                         targets['boxes'], targets['weight'])
    np.testing.assert_allclose(float(terms[f'l1/{name}']), float(l1_sum) / num_boxes, rtol=1e-5)
    np.testing.assert_allclose(float(terms[f'giou/{name}']), float(giou_sum) / num_boxes, rtol=1e-5)
    assignments.add(tuple(np.asarray(query_for_target).ravel()))
  assert len(assignments) > 1  # the sets really are matched differently


def _with_tokens(rng, outputs, side=8):
  ys, xs = np.meshgrid((np.arange(side) + 0.5) / side, (np.arange(side) + 0.5) / side, indexing='ij')
  centres = np.broadcast_to(np.stack([xs.ravel(), ys.ravel()], -1), (B, side * side, 2)).astype(np.float32)
  boxes = np.concatenate([centres, np.full((B, side * side, 2), 0.15, np.float32)], -1)
  return dict(outputs, token_logits=rng.normal(-3, 1, (B, side * side, K)).astype(np.float32), token_boxes=boxes,
              token_centres=centres, token_usable=np.ones((B, side * side), bool))


def test_one_to_many_encoder_loss_replaces_proposal_matching_and_respects_the_region():
  rng = np.random.default_rng(4)
  targets = _targets(rng, (0, T))
  outputs = _with_tokens(rng, _outputs(rng, targets))
  config = _loss_config()
  config.encoder_loss = 'one_to_many'
  differentiable = lambda o: {k: v for k, v in o.items() if k in _FLOAT_KEYS + ('token_logits', 'token_boxes')}

  def compiled(config):
    @functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
    def run(diff, rest, targets):
      loss = lambda d: criterion.detection_loss({**d, **rest}, targets, config)
      return jax.value_and_grad(loss, has_aux=True)(diff)
    return run

  run = compiled(config)

  rest = {k: v for k, v in outputs.items() if k not in differentiable(outputs)}
  (total, terms), grads = run(differentiable(outputs), rest, targets)
  assert {'class/tokens', 'l1/tokens', 'giou/tokens'} <= set(terms) and 'class/encoder' not in terms
  assert np.isfinite(float(total)) and float(terms['l1/tokens']) > 0
  # Image 0 has no target: with its mask cleared, its tokens get no gradient at all.
  unlabelled = dict(targets, annotation_mask=targets['annotation_mask'].copy())
  unlabelled['annotation_mask'][0] = 0.0
  (_, _), grads = run(differentiable(outputs), rest, unlabelled)
  assert float(jnp.abs(grads['token_logits'][0]).sum()) == 0.0
  assert float(jnp.abs(grads['token_logits'][1]).sum()) > 0.0
  # Unless unsure tokens there count as background: then those of image 0 learn, its confident ones do not.
  config = ml_collections.ConfigDict(config.to_dict())
  config.unlabelled_background_below = 0.5
  diff = differentiable(outputs)
  diff['token_logits'] = diff['token_logits'].copy()
  diff['token_logits'][0, :8, 0] = 4.0
  (_, _), grads = compiled(config)(diff, rest, unlabelled)
  token_gradient = np.abs(np.asarray(grads['token_logits'][0])).sum(-1)
  assert (token_gradient[:8] == 0).all() and (token_gradient[8:] > 0).all()
  with pytest.raises(ValueError, match='per-token outputs'):
    criterion.detection_loss(_outputs(rng, targets), targets, config)


def test_one_to_one_token_loss_matches_each_cell_to_its_best_token_and_skips_padding():
  """`one_to_one_tokens`: every token a prediction, one per cell. With a token exactly at each cell among 64
  random ones, the matched boxes cost nothing; padding tokens learn nothing; the selected proposals are not
  matched again."""
  rng = np.random.default_rng(5)
  targets = _targets(rng, (2, T))
  targets['annotation_mask'][:] = 1.0
  outputs = _with_tokens(rng, _outputs(rng, targets))
  exact = rng.permutation(np.arange(8, 64))[:T]  # tokens 0-7 are padding below
  boxes = outputs['token_boxes'].copy()
  for b in range(B):
    real = np.flatnonzero(targets['weight'][b] > 0)
    boxes[b, exact[:len(real)]] = targets['boxes'][b, real]
  usable = np.ones((B, 64), bool)
  usable[:, :8] = False
  outputs.update(token_boxes=boxes, token_usable=usable)
  config = _loss_config()
  config.encoder_loss = 'one_to_one_tokens'

  @functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
  def run(token_logits, rest):
    loss = lambda l: criterion.detection_loss({**rest, 'token_logits': l}, targets, config)
    return jax.value_and_grad(loss, has_aux=True)(token_logits)

  (total, terms), grads = run(outputs['token_logits'], {k: v for k, v in outputs.items() if k != 'token_logits'})
  assert {'class/tokens', 'l1/tokens', 'giou/tokens'} <= set(terms) and 'class/encoder' not in terms
  assert np.isfinite(float(total)) and float(terms['class/tokens']) > 0
  assert float(terms['l1/tokens']) < 1e-6 and float(terms['giou/tokens']) < 1e-4
  grads = np.asarray(grads)
  assert (grads[:, :8] == 0).all() and (np.abs(grads[:, 8:]).sum(-1) > 0).all()
  for b in range(B):  # the exact tokens are the positives: pushed up on their cell's class
    for t, token in zip(np.flatnonzero(targets['weight'][b] > 0), exact):
      assert grads[b, token, targets['labels'][b, t]] < 0


def _log_softmax(x):
  x = x - x.max(-1, keepdims=True)
  return x - np.log(np.exp(x).sum(-1, keepdims=True))


def test_cell_class_cross_entropy_reads_matched_queries_and_first_denoising_positives():
  """The cell classifier's loss: softmax cross-entropy of the target class, over the final layer's matched queries
  and the positive copies of the first denoising group, whatever the other queries say."""
  rng = np.random.default_rng(7)
  targets = _targets(rng, (2, T))
  outputs = _with_denoising(rng, _outputs(rng, targets), targets)
  num_read = T  # the model reads the first denoising group's positives: one per target slot
  outputs.update(cell_class_logits=rng.normal(0, 2, (B, Q, K)).astype(np.float32),
                 dn_cell_class_logits=rng.normal(0, 2, (B, num_read, K)).astype(np.float32))
  total, terms, grads = _run(outputs, targets)
  _assert_finite(total, terms, grads)

  query_for_target, _ = jax.jit(functools.partial(matching.batched_match, weights=matching.CostWeights()),
                                compiler_options=_FAST_COMPILE)(
      outputs['pred_logits'][-1], outputs['pred_boxes'][-1], targets['labels'], targets['boxes'],
      targets['weight'] > 0, targets['annotation_mask'])
  query_for_target = np.asarray(query_for_target)
  matched_ce, dn_ce = [], []
  for b in range(B):
    for t in np.flatnonzero(targets['weight'][b] > 0):
      label = targets['labels'][b, t]
      matched_ce.append(-_log_softmax(outputs['cell_class_logits'][b, query_for_target[b, t]])[label])
    for slot in range(num_read):
      if outputs['dn_is_positive'][b, slot] and outputs['dn_valid'][b, slot]:
        label = targets['labels'][b, outputs['dn_target_index'][b, slot]]
        dn_ce.append(-_log_softmax(outputs['dn_cell_class_logits'][b, slot])[label])
  assert matched_ce and dn_ce
  expected = (np.sum(matched_ce) + np.sum(dn_ce)) / (len(matched_ce) + len(dn_ce))
  np.testing.assert_allclose(float(terms['cell_class']), expected, rtol=1e-5)
  unmatched = np.ones((B, Q), bool)
  for b in range(B):
    unmatched[b, query_for_target[b, targets['weight'][b] > 0]] = False
  assert float(jnp.abs(grads['cell_class_logits'][unmatched]).sum()) == 0.0  # duplicates are not negatives
  config = _loss_config()
  config.cell_class_weight = 0.0
  _, without, _ = _run(outputs, targets, config)
  assert 'cell_class' not in without


def test_train_step_weighs_the_region_negatives_only_on_sparse_fields():
  """On 2 devices: `loss.region_negative_weight_max` raises the class loss of a field annotated on its left half,
  and leaves a fully annotated field's step exactly as it was."""
  config = synthetic_demo.get_config()
  config.image_size, config.per_device_batch_size, config.max_objects = 64, 1, 4
  config.model.update(backbone_width=8, hidden_dim=32, num_heads=2, ffn_dim=64, num_decoder_layers=1,
                      num_queries=12, denoising_groups=1, roi_size=3)
  # Without the cell-crop classifier, which the region rule does not touch: each of the two steps compiles faster.
  config.cell_crop_batch_size = 0
  config.model.update(cell_crop_size=0, cell_class_refinement=False, cell_attribute_classifier=False,
                      dn_cells_at_true_boxes=False, cell_class_flips=False)
  config.eval.class_scores = 'detector'
  devices = jax.local_devices()
  full = train_step.random_batch(config, len(devices), lld_format.NUM_CLASSES)
  sparse = {k: v.copy() for k, v in full.items()}
  sparse['annotation_mask'][..., config.image_size // 16:] = 0.0  # only the left half is annotated
  sparse['boxes'][..., 0] = np.clip(sparse['boxes'][..., 0] / 2 - 0.1, 0.1, 0.35)  # labelled cells inside it
  model = train_step.create_model(config, lld_format.NUM_CLASSES)
  state, tx = train_step.create_train_state(model, config, jax.random.PRNGKey(0))
  replicated = sharding.replicate(state, devices)
  losses_by = {}
  for max_weight in (1.0, 10.0):
    config.loss.region_negative_weight_max = max_weight
    step = jax.pmap(functools.partial(train_step.train_step, model=model, tx=tx, config=config),
                    axis_name=train_step.AXIS, devices=devices)
    for name, batch in (('full', full), ('sparse', sparse)):
      _, metrics = step(replicated, sharding.shard(batch, devices))
      losses_by[name, max_weight] = {k: float(v[0]) for k, v in metrics.items() if k.startswith('loss')}
  assert losses_by['full', 10.0] == losses_by['full', 1.0]
  sparse_plain, sparse_weighted = losses_by['sparse', 1.0], losses_by['sparse', 10.0]
  # Half the field is annotated: its negatives weigh 2 (the field over the region); at initialization they are a
  # small part of the class loss (varifocal scales a negative by its own score), and the box losses do not move.
  for term in ('loss/class/layer0', 'loss/dn_class/layer0'):
    assert sparse_weighted[term] > (1 + 1e-5) * sparse_plain[term], term
  assert sparse_weighted['loss/l1/layer0'] == pytest.approx(sparse_plain['loss/l1/layer0'], rel=1e-5)


def test_crop_cross_entropy_is_the_mean_over_every_devices_crops():
  rng = np.random.default_rng(3)
  logits = rng.normal(0, 2, (2, 1, 5, K)).astype(np.float32)  # [devices, 1, crops, classes]
  labels = rng.integers(0, K, (2, 1, 5)).astype(np.int32)
  expected = np.mean([-_log_softmax(logits[d, 0, n])[labels[d, 0, n]] for d in range(2) for n in range(5)])
  devices = jax.local_devices()[:2]
  per_device = jax.pmap(functools.partial(criterion.crop_cross_entropy, axis_name='batch'), axis_name='batch',
                        devices=devices)(logits, labels)
  # Each device's loss is its own sum over the mean count; their mean (what the step's pmean of gradients
  # amounts to) is the mean over all crops.
  np.testing.assert_allclose(float(np.mean(per_device)), expected, rtol=1e-5)
  np.testing.assert_allclose(float(criterion.crop_cross_entropy(logits[0], labels[0])),
                             np.mean([-_log_softmax(logits[0, 0, n])[labels[0, 0, n]] for n in range(5)]), rtol=1e-5)


def test_crop_attribute_cross_entropy_is_the_mean_over_known_values():
  rng = np.random.default_rng(4)
  logits = rng.normal(0, 2, (1, 6, 3, 4)).astype(np.float32)  # [1, crops, attributes, values]
  values = rng.integers(0, 4, (1, 6, 3)).astype(np.int32)
  values[0, ::2, 1] = -1  # not applicable: left out of the sum and the count
  known = [(n, a) for n in range(6) for a in range(3) if values[0, n, a] >= 0]
  expected = np.mean([-_log_softmax(logits[0, n, a])[values[0, n, a]] for n, a in known])
  np.testing.assert_allclose(float(criterion.crop_attribute_cross_entropy(logits, values)), expected, rtol=1e-5)
