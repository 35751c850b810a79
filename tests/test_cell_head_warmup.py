"""The cell classifier's warm-up on true-cell crops: it learns the pool's classes on two devices, touches nothing
but the cell heads, and repeats exactly."""

import dataclasses

import jax
import numpy as np
import optax
import pytest

from configs import synthetic_demo
from lld_jax import cell_crops
from lld_jax import cell_head_warmup
from lld_jax.models import detector
from tfds_lld import lld_format

CROP, SHIFT, PER_CLASS = 8, 1, 12
GREYS = (40, 130, 220)  # one grey level per class, apart by more than the channel jitter and the noise can bridge


def _pool():
  rng = np.random.default_rng(0)
  side = CROP + 2 * SHIFT
  labels = np.repeat(np.arange(len(GREYS)), PER_CLASS).astype(np.int32)
  crops = np.asarray(GREYS)[labels, None, None, None] + rng.normal(0, 8, (len(labels), side, side, 3))
  return cell_crops.CellCropPool(np.clip(crops, 0, 255).astype(np.uint8), labels, CROP, num_truncated=0)


def _attributed_pool():
  """The pool, with one attribute the grey level tells (dark or not) and one it cannot (the cell's size)."""
  pool = _pool()
  dark = (pool.labels == 0).astype(np.int32)
  size = np.arange(len(pool.labels)) % 3
  attributes = np.stack([size, dark] + [np.full_like(dark, -1)] * 5, -1).astype(np.int32)
  box_pixels = np.stack([np.asarray([20.0, 64.0, 200.0])[size]] * 2, -1).astype(np.float32)
  return dataclasses.replace(pool, attributes=attributes, box_pixels=box_pixels)


def _config(**overrides):
  c = synthetic_demo.get_config()
  c.model.cell_attribute_classifier = False  # the cell classifier's warm-up; the attributes' has a test of its own
  c.cell_crop_batch_size = 8
  c.cell_crop_warmup_steps = 40
  c.model.cell_crop_size = CROP
  c.model.hidden_dim = 16
  c.update(overrides)
  return c


def _params(config):
  crops = np.zeros((1, 1, CROP, CROP, 3), np.float32)
  encoder = detector.CellCropEncoder(config.model.hidden_dim)
  encoder_params = encoder.init(jax.random.PRNGKey(0), crops)['params']
  tokens = encoder.apply({'params': encoder_params}, crops)
  classifier_params = detector.CellClassifier(len(GREYS)).init(jax.random.PRNGKey(1), tokens)['params']
  return {'cell_encoder': encoder_params, 'cell_classifier': classifier_params, 'backbone': {'kernel': np.ones(3)}}


def _accuracy(params, pool, config):
  drawn = cell_crops.sample(pool, 0, seed=5, num_devices=1, per_device=64, augment=False)
  tokens = detector.CellCropEncoder(config.model.hidden_dim).apply({'params': params['cell_encoder']},
                                                                   drawn['cell_crops'])
  logits = detector.CellClassifier(len(GREYS)).apply({'params': params['cell_classifier']}, tokens)
  return float((np.asarray(logits).argmax(-1) == drawn['cell_crop_labels']).mean())


def test_warm_up_learns_the_cells_and_only_touches_the_cell_heads():
  assert jax.local_device_count() == 2
  config, pool = _config(), _pool()
  params = _params(config)
  warmed, tenths = cell_head_warmup.warm_up(params, pool, config, num_classes=len(GREYS))
  assert len(tenths) == 10 and tenths[-1] < 0.2 * tenths[0]
  assert _accuracy(params, pool, config) < 0.7 and _accuracy(warmed, pool, config) >= 0.99
  assert warmed['backbone'] is params['backbone']
  again, _ = cell_head_warmup.warm_up(params, pool, config, num_classes=len(GREYS))
  for a, b in zip(jax.tree_util.tree_leaves(warmed), jax.tree_util.tree_leaves(again)):
    np.testing.assert_array_equal(a, b)
  other_seed, _ = cell_head_warmup.warm_up(params, pool, _config(seed=1), num_classes=len(GREYS))
  assert not np.array_equal(other_seed['cell_classifier']['dense']['kernel'],
                            warmed['cell_classifier']['dense']['kernel'])


@pytest.mark.parametrize('branch_widths', [(), (8, 8)])
def test_warm_up_learns_the_attributes_with_the_cell_attribute_classifier(branch_widths):
  """The size comes from each cell's box in pixels (the crops all look alike in size), the darkness from its
  pixels; the cell attribute classifier learns both, with the classes (on the crop tokens, or each attribute in
  its own branch of the crop encoder)."""
  config, pool = _config(cell_crop_warmup_steps=150), _attributed_pool()
  config.model.cell_attribute_classifier = True
  config.model.cell_attribute_branch_widths = branch_widths
  config.model.attribute_box_size = True
  config.optimizer.learning_rate = 5e-3  # a size from the box is one weight away; let it move in 150 steps
  params = _params(config)
  encoder = detector.CellCropEncoder(config.model.hidden_dim, branch_stage=2 if branch_widths else 0)
  classifier = detector.CellAttributeClassifier(lld_format.NUM_ATTRIBUTE_VALUES, branch_widths)

  def attribute_features(encoder_params, crops):
    return detector.tokens_and_attribute_features(encoder.apply({'params': encoder_params}, crops),
                                                  encoder.branch_stage)[1]

  crops = np.zeros((1, 1, CROP, CROP, 3), np.float32)
  sizes = np.zeros((1, 1, 2), np.float32)
  params['cell_attribute_classifier'] = classifier.init(
      jax.random.PRNGKey(2), attribute_features(params['cell_encoder'], crops), sizes)['params']
  warmed, tenths = cell_head_warmup.warm_up(params, pool, config, num_classes=len(GREYS))
  assert tenths[-1] < 0.1 * tenths[0]
  drawn = cell_crops.sample(pool, 0, seed=5, num_devices=1, per_device=64, augment=False)
  logits = classifier.apply({'params': warmed['cell_attribute_classifier']},
                            attribute_features(warmed['cell_encoder'], drawn['cell_crops']),
                            detector.size_features_of(drawn['cell_crop_box_pixels']))
  predicted = np.asarray(logits).argmax(-1)
  np.testing.assert_array_equal(predicted[..., :2], drawn['cell_crop_attributes'][..., :2])
  assert (predicted < np.asarray(lld_format.NUM_ATTRIBUTE_VALUES)).all()  # only each attribute's own values


def test_warm_up_needs_the_crop_stream():
  with pytest.raises(ValueError, match='cell_crop_batch_size > 0'):
    cell_head_warmup.check_config(_config(cell_crop_batch_size=0))


def test_warm_up_decays_what_the_trainer_decays():
  """Kernels decay towards zero under zero gradients; biases and normalization scales, as in the trainer, do not."""
  config = _config()
  config.optimizer.weight_decay = 0.5
  params = _params(config)
  tx = cell_head_warmup._optimizer(config, steps=10)
  state, moved = tx.init(params), params
  zeros = jax.tree_util.tree_map(np.zeros_like, params)
  for _ in range(3):
    updates, state = tx.update(zeros, state, moved)
    moved = optax.apply_updates(moved, updates)
  for (path, before), after in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree_util.tree_leaves(moved)):
    changed = not np.allclose(before, after)
    assert changed == (np.ndim(before) > 1), jax.tree_util.keystr(path)
