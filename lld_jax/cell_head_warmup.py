"""Warm-up of the cell classifier on true-cell crops, before the detector's first step.

The cell classifier (`detector.CellCropEncoder` and `detector.CellClassifier`, a small CNN on each cell's own
pixels) names the cells the detector finds. In a short run it is what limits mAP: the decoder finds nearly every
cell, the classifier names too few of them right (docs/results.md, sessions 20-21). On its own, on crops of the
true cells (`lld_jax.cell_crops`), a step takes a tenth of the detector's (about 65 ms against 700 on the
demo's 2-core CPU): so it first learns alone for `cell_crop_warmup_steps` steps, then the detector trains with a
classifier (and crop encoder, whose tokens the attribute queries read) that already tells the cells apart. With
`model.cell_attribute_classifier` the cell attribute classifier learns the cells' attributes alongside.

The warm-up is part of a fresh run only: its draws depend on the seed, so a run resumed from a checkpoint (which
holds the warmed weights) never repeats it, and a run stopped before its first checkpoint repeats it exactly.
"""

import functools

from absl import logging
import jax
import numpy as np
import optax

from lld_jax import cell_crops
from lld_jax import criterion
from lld_jax import sharding
from lld_jax import train_step
from lld_jax.models import detector
from tfds_lld import lld_format

AXIS = train_step.AXIS
HEADS = ('cell_encoder', 'cell_classifier')
# The crops' draws for the warm-up: another stream than the training steps' (lld_jax.cell_crops.sample).
_STREAM = 1


def _optimizer(config, steps):
  """The trainer's rule for the cell heads (their rate, warm-up and cosine decay, clipping, which parameters
  decay), over `steps`."""
  o = config.optimizer
  schedule = train_step.warmup_cosine(o.learning_rate * o.cell_head_lr_factor, max(steps // 10, 1), steps)
  decayed = lambda params: jax.tree_util.tree_map(train_step.is_decayed, params)
  return optax.chain(train_step.gradient_clipping(config),
                     optax.adamw(schedule, weight_decay=o.weight_decay, mask=decayed))


def _step(heads, opt_state, drawn, encoder, classifier, attribute_classifier, attribute_weight, read_box_size, tx):
  def loss_fn(heads):
    tokens, attribute_features = detector.tokens_and_attribute_features(
        encoder.apply({'params': heads['cell_encoder']}, drawn['cell_crops'][None]), encoder.branch_stage)
    logits = classifier.apply({'params': heads['cell_classifier']}, tokens)
    loss = criterion.crop_cross_entropy(logits, drawn['cell_crop_labels'][None], AXIS)
    if attribute_classifier is not None:
      box_size = detector.size_features_of(drawn['cell_crop_box_pixels'][None]) if read_box_size else None
      attribute_logits = attribute_classifier.apply({'params': heads['cell_attribute_classifier']}, attribute_features,
                                                  box_size)
      loss = loss + attribute_weight * criterion.crop_attribute_cross_entropy(
          attribute_logits, drawn['cell_crop_attributes'][None], AXIS)
    return loss

  loss, grads = jax.value_and_grad(loss_fn)(heads)
  grads = jax.lax.pmean(grads, AXIS)
  updates, opt_state = tx.update(grads, opt_state, heads)
  return optax.apply_updates(heads, updates), opt_state, jax.lax.pmean(loss, AXIS)


def check_config(config):
  if config.cell_crop_warmup_steps and not config.cell_crop_batch_size:
    raise ValueError(f'cell_crop_warmup_steps={config.cell_crop_warmup_steps} trains on the true-cell crops: '
                     'set cell_crop_batch_size > 0')


def warm_up(params, pool: cell_crops.CellCropPool, config, num_classes):
  """`params` with the cell encoder and classifier (and the cell attribute classifier) trained for
  `config.cell_crop_warmup_steps` steps of `config.cell_crop_batch_size` crops per device; returns (params, [mean
  loss of each tenth of the steps])."""
  check_config(config)
  steps, per_device = config.cell_crop_warmup_steps, config.cell_crop_batch_size
  model = train_step.create_model(config, num_classes)  # the heads as the detector builds them
  dtype = model.dtype
  encoder = detector.CellCropEncoder(model.hidden_dim, branch_stage=model.cell_encoder_branch_stage, dtype=dtype)
  classifier = detector.CellClassifier(num_classes, dtype)
  attribute_classifier, names = None, HEADS
  if model.cell_attribute_classifier:
    attribute_classifier = detector.CellAttributeClassifier(lld_format.NUM_ATTRIBUTE_VALUES,
                                                            model.cell_attribute_branch_widths, dtype)
    names = HEADS + ('cell_attribute_classifier',)
  tx = _optimizer(config, steps)
  heads = {name: params[name] for name in names}
  p_step = jax.pmap(functools.partial(_step, encoder=encoder, classifier=classifier,
                                      attribute_classifier=attribute_classifier,
                                      attribute_weight=config.loss.attribute_weight,
                                      read_box_size=config.model.attribute_box_size, tx=tx),
                    axis_name=AXIS, donate_argnums=(0, 1))
  replicated = sharding.replicate((heads, tx.init(heads)))
  num_devices = jax.local_device_count()
  losses = []
  for step in range(steps):
    drawn = cell_crops.sample(pool, step, config.seed, num_devices, per_device, config.augment.enabled,
                              stream=_STREAM)
    *replicated, loss = p_step(*replicated, drawn)
    losses.append(loss[0])
  losses = np.asarray(jax.device_get(losses))
  tenths = [float(part.mean()) for part in np.array_split(losses, min(10, steps))]
  logging.info('cell head warm-up: %d steps of %d crops per device, loss %.3f -> %.3f', steps, per_device,
               tenths[0], tenths[-1])
  return {**params, **sharding.unreplicate(replicated[0])}, tenths
