"""The model, optimizer, train state and the per-device step functions, free of any input-pipeline import.

`train_step` runs per device inside `jax.pmap` with named-axis collectives only (axis `AXIS`); the same functions
serve training (lld_jax.train), evaluation, prediction and the benchmark, which can then run where TensorFlow is
not installed.
"""

import functools
from typing import Any

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from lld_jax import criterion
from lld_jax import losses
from lld_jax import matching
from lld_jax import param_groups
from lld_jax import postprocess
from lld_jax import pseudo_labels
from lld_jax import sharding
from lld_jax.models import detector as detector_lib
from lld_jax.models import resnet
from tfds_lld import lld_format

AXIS = sharding.AXIS


@flax.struct.dataclass
class TrainState:
  step: jnp.ndarray
  params: Any
  model_state: Any  # non-trained variables (frozen BatchNorm statistics)
  opt_state: Any
  ema_params: Any
  rng: jnp.ndarray
  nonfinite_in_a_row: jnp.ndarray
  nonfinite_total: jnp.ndarray


def backbone_depth(name: str) -> int:
  depths = {'resnet18': 18, 'resnet34': 34, 'resnet50': 50}
  if name not in depths:
    raise ValueError(f'model.backbone={name!r}: expected one of {sorted(depths)}')
  return depths[name]


def create_model(config, num_classes) -> detector_lib.Detector:
  m = config.model
  most_targets = config.max_objects + (config.pseudo_labels.max_per_image if config.pseudo_labels.enabled else 0)
  if m.num_queries < most_targets:
    raise ValueError(f'model.num_queries={m.num_queries} is below the most targets an image can have '
                     f'({most_targets} = max_objects + pseudo-label slots): every target needs a query')
  return detector_lib.Detector(
      num_classes=num_classes, attribute_values=lld_format.NUM_ATTRIBUTE_VALUES,
      backbone_depth=backbone_depth(m.backbone), backbone_norm=m.backbone_norm, backbone_width=m.backbone_width,
      hidden_dim=m.hidden_dim, num_heads=m.num_heads, ffn_dim=m.ffn_dim, num_encoder_layers=m.num_encoder_layers,
      fusion_depth=m.fusion_depth,
      num_decoder_layers=m.num_decoder_layers, num_queries=m.num_queries, num_points=m.num_points,
      two_stage=m.two_stage, denoising_groups=m.denoising_groups, label_noise=m.label_noise,
      box_noise=m.box_noise, attribute_head=m.attribute_head, roi_size=m.roi_size, input_stride=m.input_stride,
      cell_crop_size=m.cell_crop_size, cell_class_refinement=m.cell_class_refinement,
      dn_cells_at_true_boxes=m.dn_cells_at_true_boxes,
      # A run saved before these options existed (its config.json lacks the keys) is evaluated as trained.
      cell_class_flips=m.get('cell_class_flips', False), attribute_box_size=m.get('attribute_box_size', False),
      cell_crop_pixels=m.get('cell_crop_pixels', 'intensity'),
      cell_attribute_classifier=m.get('cell_attribute_classifier', False),
      cell_attribute_branch_widths=tuple(m.get('cell_attribute_branch_widths', ())),
      cell_attribute_branch_stage=m.get('cell_attribute_branch_stage', 2),
      dtype=jnp.dtype(m.dtype))


def warmup_cosine(base_rate, warmup_steps, total_steps):
  """Linear warm-up from 0 over `warmup_steps`, then cosine decay to 1 % of `base_rate` at `total_steps`."""
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=base_rate, warmup_steps=max(warmup_steps, 1),
      decay_steps=max(total_steps, warmup_steps + 1), end_value=base_rate * 0.01)


def learning_rate_schedule(config, base_rate):
  return warmup_cosine(base_rate, config.optimizer.warmup_steps, config.total_steps)


def gradient_clipping(config):
  grad_clip = config.optimizer.grad_clip
  return optax.clip_by_global_norm(grad_clip) if grad_clip > 0 else optax.identity()


# The per-cell heads: the CNN over each cell's pixels, the cell classifier on it, and the attribute head that
# reads it (attributes, class refinement). Trained from scratch on a few crops per image, they want a higher rate
# than the set-prediction decoder tolerates (docs/results.md, session 7).
CELL_HEAD_MODULES = ('cell_encoder', 'cell_classifier', 'cell_attribute_classifier', 'attribute_head')


def _rate_group(top_module):
  if top_module == 'backbone':
    return 'backbone'
  return 'cell_head' if top_module in CELL_HEAD_MODULES else 'head'


def is_decayed(leaf) -> bool:
  """Weight decay for kernels and embeddings; not for biases and normalization scales."""
  return leaf.ndim > 1


def optimizer_groups(params) -> param_groups.ParamGroups:
  """The parameters by optimizer hyperparameters: backbone, cell head or head (learning rate), decayed or not
  (`is_decayed`)."""
  return param_groups.ParamGroups(
      params, lambda path, leaf: _rate_group(path[0]) + ('/decay' if is_decayed(leaf) else '/no_decay'))


def create_optimizer(config, params):
  """AdamW with warmup + cosine decay, a lower rate for the backbone and a rate of their own for the cell heads,
  and global-norm gradient clipping, on the flat group vectors of `optimizer_groups(params)` ({group name:
  vector}, see lld_jax.param_groups)."""
  o = config.optimizer
  adamw = lambda rate, decay: optax.adamw(learning_rate_schedule(config, rate),
                                          weight_decay=o.weight_decay if decay else 0.0)
  rates = {'backbone': o.learning_rate * o.backbone_lr_factor, 'cell_head': o.learning_rate * o.cell_head_lr_factor,
           'head': o.learning_rate}
  names = optimizer_groups(params).members
  return optax.chain(
      gradient_clipping(config),
      optax.multi_transform({name: adamw(rates[name.split('/')[0]], name.endswith('/decay')) for name in names},
                            {name: name for name in names}))


def initial_variables(model, config, rng):
  size = config.image_size
  dummy_targets = {'labels': jnp.zeros((1, config.max_objects), jnp.int32),
                   'boxes': jnp.full((1, config.max_objects, 4), 0.5),
                   'weight': jnp.ones((1, config.max_objects))}
  params_rng, dn_rng = jax.random.split(rng)
  init = jax.jit(functools.partial(model.init, train=True, pixel_scale=np.ones((1,), np.float32)))
  args = ({'params': params_rng, 'denoise': dn_rng}, jnp.zeros((1, size, size, 3)), jnp.ones((1, size, size)),
          dummy_targets)
  if jax.default_backend() == 'cpu' and not isinstance(rng, jax.core.Tracer):  # not under jax.eval_shape
    # Runs once, and its program is one random initializer per parameter: XLA's CPU optimizations would only
    # lengthen the compilation (about 40 % at level 1).
    return init.lower(*args).compile({'xla_backend_optimization_level': 0})(*args)
  return init(*args)


def create_train_state(model, config, rng, load_pretrained=True) -> tuple[TrainState, Any]:
  """A fresh state; `load_pretrained=False` skips the ImageNet backbone (a checkpoint will overwrite it)."""
  init_rng, state_rng = jax.random.split(rng)
  variables = dict(initial_variables(model, config, init_rng))
  params = variables.pop('params')
  if load_pretrained and config.model.backbone_norm == 'frozen_bn' and not config.model.pretrained:
    raise ValueError('model.backbone_norm=frozen_bn needs ImageNet weights (model.pretrained): without them the '
                     'frozen statistics are the identity and the backbone has no normalization at all. '
                     'Pass --config.model.pretrained=PATH, or train from scratch with '
                     '--config.model.backbone_norm=group_norm')
  if load_pretrained and config.model.pretrained:
    from lld_jax.models import pretrained
    backbone_params, frozen = pretrained.load_torchvision_resnet(
        config.model.pretrained, backbone_depth(config.model.backbone), config.model.backbone_norm,
        config.model.backbone_width)
    params = pretrained.merge_pretrained(params, backbone_params, 'backbone')
    if frozen:
      variables[resnet.FROZEN_COLLECTION] = pretrained.merge_pretrained(
          variables[resnet.FROZEN_COLLECTION], frozen, 'backbone')
  tx = create_optimizer(config, params)
  state = TrainState(step=jnp.array(0, jnp.int32), params=params, model_state=variables,
                     opt_state=tx.init(optimizer_groups(params).ravel(params)), ema_params=params, rng=state_rng,
                     nonfinite_in_a_row=jnp.array(0, jnp.int32), nonfinite_total=jnp.array(0, jnp.int32))
  return state, tx


def abstract_train_state(model, config) -> TrainState:
  """The shapes and dtypes of a fresh state (jax.eval_shape: nothing compiled or run, no pretrained file read),
  the target a checkpoint is restored into."""
  return jax.eval_shape(lambda rng: create_train_state(model, config, rng, load_pretrained=False)[0],
                        jax.random.PRNGKey(0))


def model_variables(state: TrainState, use_ema: bool):
  return {'params': state.ema_params if use_ema else state.params, **state.model_state}


def train_step(state: TrainState, batch, *, model, tx, config):
  """One data-parallel step; runs per device inside pmap (axis name 'batch')."""
  step_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(AXIS))
  targets = {k: batch[k] for k in ('labels', 'boxes', 'attributes', 'weight', 'annotation_mask')}
  if not config.loss.region_restricted:  # ablation: the unlabelled area counts as background
    targets['annotation_mask'] = jnp.ones_like(targets['annotation_mask'])
  elif config.loss.region_negative_weight_max > 1:
    targets['region_negative_weight'] = losses.region_negative_weight(
        targets['annotation_mask'], batch['image_mask'], config.loss.region_negative_weight_max)
  pseudo = config.pseudo_labels
  if pseudo.enabled:
    teacher = model.apply({'params': state.ema_params, **state.model_state}, batch['image'], batch['image_mask'],
                          train=False, pixel_scale=batch['scale'])
    teacher_scores = postprocess.class_scores(
        teacher['pred_logits'][-1], postprocess.cell_classifier_logits(teacher, config.eval.class_scores))
    targets = pseudo_labels.select(
        teacher_scores, teacher['pred_boxes'][-1], teacher['attribute_logits'], targets, state.step,
        threshold=pseudo.threshold, weight=pseudo.weight, warmup_steps=pseudo.warmup_steps,
        max_pseudo=pseudo.max_per_image, with_attributes=pseudo.attributes, duplicate_iou=pseudo.duplicate_iou,
        on_images_without_region=pseudo.on_images_without_region)

  cell_crops = crop_box_pixels = None
  if 'cell_crops' in batch:  # [N, S, S, 3] true cells from across the training split, for the cell classifier
    cell_crops = batch['cell_crops'][None]
    targets['crop_labels'] = batch['cell_crop_labels'][None]
    if config.model.get('cell_attribute_classifier', False):  # ... and the cell attribute classifier
      targets['crop_attributes'] = batch['cell_crop_attributes'][None]
      crop_box_pixels = batch['cell_crop_box_pixels'][None]

  def loss_fn(params):
    outputs = model.apply({'params': params, **state.model_state}, batch['image'], batch['image_mask'], targets,
                          train=True, rngs={'denoise': step_rng}, cell_crops=cell_crops, pixel_scale=batch['scale'],
                          cell_crop_box_pixels=crop_box_pixels)
    loss, terms = criterion.detection_loss(outputs, targets, config.loss, axis_name=AXIS)
    return loss, terms

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  # The update runs on a few flat vectors (see lld_jax.param_groups): a few operations and collectives instead of
  # some per parameter array.
  groups = optimizer_groups(state.params)
  grads = jax.lax.pmean(groups.ravel(grads), AXIS)
  loss = jax.lax.pmean(loss, AXIS)
  # Every device sees the same pmean'd values, so all take the same branch. The norm is finite only if every
  # gradient element is (or it overflowed, which is no step to take either).
  grad_norm = optax.tree.norm(grads)
  finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)
  params = groups.ravel(state.params)
  updates, new_opt_state = tx.update(grads, state.opt_state, params)
  keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_flat_params = keep(optax.apply_updates(params, updates), params)
  new_opt_state = keep(new_opt_state, state.opt_state)
  new_params = groups.unravel(new_flat_params)
  o = config.optimizer
  if o.ema_decay > 0:
    decay = o.ema_decay * (1 - jnp.exp(-(state.step + 1.0) / max(o.ema_warmup_steps, 1)))
    ema = groups.unravel(jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p,
                                                groups.ravel(state.ema_params), new_flat_params))
  else:
    ema = new_params
  new_state = state.replace(
      step=state.step + 1, params=new_params, opt_state=new_opt_state, ema_params=ema,
      nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
  metrics = {'loss': loss, **{f'loss/{k}': jax.lax.pmean(v, AXIS) for k, v in terms.items()},
             'grad_norm': grad_norm, 'nonfinite_step': (~finite).astype(jnp.float32),
             'num_targets': jax.lax.psum(batch['weight'].sum(), AXIS),
             'num_truncated_targets': jax.lax.psum(batch['num_truncated'].sum(), AXIS)}
  if pseudo.enabled:
    metrics['num_pseudo_labels'] = jax.lax.psum(targets['is_pseudo'].sum(), AXIS)
  return new_state, metrics


# What predict_step reads of a batch: the canvas, its mask and the scale (canvas pixels per original pixel), which
# model.attribute_box_size needs.
PREDICT_INPUTS = ('image', 'image_mask', 'scale')


def predict_step(variables, batch, *, model):
  """batch: `PREDICT_INPUTS` (scale only needed for model.attribute_box_size)."""
  outputs = model.apply(variables, batch['image'], batch['image_mask'], train=False, pixel_scale=batch.get('scale'))
  found = {'logits': outputs['pred_logits'][-1], 'boxes': outputs['pred_boxes'][-1],
           'attribute_logits': outputs['attribute_logits']}
  if 'cell_class_logits' in outputs:
    found['cell_class_logits'] = outputs['cell_class_logits']
  return found


def random_batch(config, num_devices, num_classes, seed=0):
  """Host batch [devices, per_device_batch, ...] shaped like input_pipeline.train_dataset's."""
  rng = np.random.default_rng(seed)
  lead = (num_devices, config.per_device_batch_size)
  size, t = config.image_size, config.max_objects
  centre = rng.uniform(0.2, 0.8, lead + (t, 2))
  wh = rng.uniform(0.02, 0.2, lead + (t, 2))
  attributes = np.stack([rng.integers(0, v, lead + (t,)) for v in lld_format.NUM_ATTRIBUTE_VALUES], -1)
  crops = {}
  if config.cell_crop_batch_size:  # lld_jax.cell_crops
    crop_lead, crop = (num_devices, config.cell_crop_batch_size), config.model.cell_crop_size
    crops = {'cell_crops': rng.standard_normal(crop_lead + (crop, crop, 3), dtype=np.float32),
             'cell_crop_labels': rng.integers(0, num_classes, crop_lead).astype(np.int32),
             'cell_crop_attributes': np.stack([rng.integers(0, v, crop_lead) for v in lld_format.NUM_ATTRIBUTE_VALUES],
                                              -1).astype(np.int32),
             'cell_crop_box_pixels': rng.uniform(20, 80, crop_lead + (2,)).astype(np.float32)}
  return {
      'image': rng.standard_normal(lead + (size, size, 3), dtype=np.float32),
      'image_mask': np.ones(lead + (size, size), np.float32),
      'boxes': np.concatenate([centre, wh], -1).astype(np.float32),
      'labels': rng.integers(0, num_classes, lead + (t,)).astype(np.int32),
      'attributes': attributes.astype(np.int32),
      'weight': np.ones(lead + (t,), np.float32),
      'annotation_mask': np.ones(lead + (size // matching.MASK_STRIDE,) * 2, np.float32),
      'num_truncated': np.zeros(lead, np.int32),
      'scale': np.ones(lead, np.float32),
      **crops,
  }
