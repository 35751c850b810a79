r"""Training: `python -m lld_jax.train --config=configs/NAME.py --workdir=DIR [--config.key=value ...]`.

Data-parallel over all local devices with `jax.pmap` (one program per device, named-axis collectives only);
multi-host ready (`--config.distributed.initialize=True` calls `jax.distributed.initialize`, each process reads
its own shard of the data). Checkpoints (orbax) are saved every `checkpoint_every_steps`, on SIGTERM, and at the
end; a run restarts from the latest one in DIR, with the same data order, so a resumed run reaches the same
parameters as an uninterrupted one. The best checkpoint by validation mAP50 is kept in DIR/best.
"""

import functools
import json
import os
import signal
import time
from typing import Any

from absl import app
from absl import flags
from absl import logging
from clu import metric_writers
from clu import periodic_actions
import flax
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax
import orbax.checkpoint as ocp

from lld_jax import criterion
from lld_jax import input_pipeline
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
  return detector_lib.Detector(
      num_classes=num_classes, attribute_values=lld_format.NUM_ATTRIBUTE_VALUES,
      backbone_depth=backbone_depth(m.backbone), backbone_norm=m.backbone_norm, backbone_width=m.backbone_width,
      hidden_dim=m.hidden_dim, num_heads=m.num_heads, ffn_dim=m.ffn_dim, num_encoder_layers=m.num_encoder_layers,
      num_decoder_layers=m.num_decoder_layers, num_queries=m.num_queries, num_points=m.num_points,
      two_stage=m.two_stage, denoising_groups=m.denoising_groups, label_noise=m.label_noise,
      box_noise=m.box_noise, attribute_head=m.attribute_head, roi_size=m.roi_size,
      dtype=jnp.dtype(m.dtype))


def learning_rate_schedule(config, base_rate):
  o = config.optimizer
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=base_rate, warmup_steps=max(o.warmup_steps, 1),
      decay_steps=max(config.total_steps, o.warmup_steps + 1), end_value=base_rate * 0.01)


def create_optimizer(config, params):
  """AdamW with warmup + cosine decay, a lower rate for the backbone, and global-norm gradient clipping.
  Biases and normalization scales are not decayed."""
  o = config.optimizer
  is_backbone = flax.traverse_util.path_aware_map(lambda path, _: 'backbone' if path[0] == 'backbone' else 'head',
                                                  params)
  decay_mask = flax.traverse_util.path_aware_map(lambda path, x: x.ndim > 1, params)
  adamw = lambda rate: optax.adamw(learning_rate_schedule(config, rate), weight_decay=o.weight_decay,
                                   mask=decay_mask)
  return optax.chain(
      optax.clip_by_global_norm(o.grad_clip) if o.grad_clip > 0 else optax.identity(),
      optax.multi_transform({'backbone': adamw(o.learning_rate * o.backbone_lr_factor),
                             'head': adamw(o.learning_rate)}, is_backbone))


def initial_variables(model, config, rng):
  size = config.image_size
  dummy_targets = {'labels': jnp.zeros((1, config.max_objects), jnp.int32),
                   'boxes': jnp.full((1, config.max_objects, 4), 0.5),
                   'weight': jnp.ones((1, config.max_objects))}
  params_rng, dn_rng = jax.random.split(rng)
  return jax.jit(functools.partial(model.init, train=True))(
      {'params': params_rng, 'denoise': dn_rng}, jnp.zeros((1, size, size, 3)), jnp.ones((1, size, size)),
      dummy_targets)


def create_train_state(model, config, rng) -> tuple[TrainState, Any]:
  init_rng, state_rng = jax.random.split(rng)
  variables = dict(initial_variables(model, config, init_rng))
  params = variables.pop('params')
  if config.model.pretrained:
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
                     opt_state=tx.init(params), ema_params=params, rng=state_rng,
                     nonfinite_in_a_row=jnp.array(0, jnp.int32), nonfinite_total=jnp.array(0, jnp.int32))
  return state, tx


def model_variables(state: TrainState, use_ema: bool):
  return {'params': state.ema_params if use_ema else state.params, **state.model_state}


def _all_finite(tree):
  leaves = jax.tree_util.tree_leaves(tree)
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in leaves]))


def train_step(state: TrainState, batch, *, model, tx, config):
  """One data-parallel step; runs per device inside pmap (axis name 'batch')."""
  step_rng = jax.random.fold_in(jax.random.fold_in(state.rng, state.step), jax.lax.axis_index(AXIS))
  targets = {k: batch[k] for k in ('labels', 'boxes', 'attributes', 'weight', 'annotation_mask')}

  def loss_fn(params):
    outputs = model.apply({'params': params, **state.model_state}, batch['image'], batch['image_mask'], targets,
                          train=True, rngs={'denoise': step_rng})
    loss, terms = criterion.detection_loss(outputs, targets, config.loss, axis_name=AXIS)
    return loss, terms

  (loss, terms), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
  grads = jax.lax.pmean(grads, AXIS)
  loss = jax.lax.pmean(loss, AXIS)
  # Every device sees the same pmean'd values, so all take the same branch.
  finite = jnp.isfinite(loss) & _all_finite(grads)
  updates, new_opt_state = tx.update(grads, state.opt_state, state.params)
  new_params = optax.apply_updates(state.params, updates)
  keep = lambda new, old: jax.tree_util.tree_map(lambda n, o: jnp.where(finite, n, o), new, old)
  new_params = keep(new_params, state.params)
  new_opt_state = keep(new_opt_state, state.opt_state)
  o = config.optimizer
  if o.ema_decay > 0:
    decay = o.ema_decay * (1 - jnp.exp(-(state.step + 1.0) / max(o.ema_warmup_steps, 1)))
    ema = jax.tree_util.tree_map(lambda e, p: decay * e + (1 - decay) * p, state.ema_params, new_params)
  else:
    ema = new_params
  new_state = state.replace(
      step=state.step + 1, params=new_params, opt_state=new_opt_state, ema_params=ema,
      nonfinite_in_a_row=jnp.where(finite, 0, state.nonfinite_in_a_row + 1),
      nonfinite_total=state.nonfinite_total + (~finite).astype(jnp.int32))
  metrics = {'loss': loss, **{f'loss/{k}': jax.lax.pmean(v, AXIS) for k, v in terms.items()},
             'grad_norm': optax.global_norm(grads), 'nonfinite_step': (~finite).astype(jnp.float32),
             'num_targets': jax.lax.psum(batch['weight'].sum(), AXIS),
             'num_truncated_targets': jax.lax.psum(batch['num_truncated'].sum(), AXIS)}
  return new_state, metrics


def predict_step(variables, batch, *, model):
  outputs = model.apply(variables, batch['image'], batch['image_mask'], train=False)
  return {'logits': outputs['pred_logits'][-1], 'boxes': outputs['pred_boxes'][-1],
          'attribute_logits': outputs['attribute_logits']}


def checkpoint_managers(workdir, config):
  latest = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True))
  best = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'best'),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True, best_fn=lambda m: m['mAP50'],
                                           best_mode='max'))
  return latest, best


def restore_latest(manager, state):
  """The latest complete checkpoint (orbax skips unfinished ones), or `state` when there is none."""
  step = manager.latest_step()
  if step is None:
    return state
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
  try:
    return manager.restore(step, args=ocp.args.StandardRestore(abstract))
  except (ValueError, KeyError, TypeError) as error:
    raise ValueError(f'checkpoint {manager.directory}/{step} does not match this config (different model or '
                     f'number of classes?): {error}') from error


def check_workdir(workdir):
  os.makedirs(workdir, exist_ok=True)
  probe = os.path.join(workdir, '.write_probe')
  try:
    with open(probe, 'w') as f:
      f.write('x' * 1024)
    os.remove(probe)
  except OSError as error:
    raise OSError(f'workdir {workdir} is not writable: {error}') from error


class _SigtermFlag:
  """Turns SIGTERM (preemption) into a flag the loop checks between steps, so it can save first."""

  def __init__(self):
    self.raised = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True


def train_and_evaluate(config, workdir, stop_at_step=None):
  """Trains (resuming from `workdir`), evaluates periodically and returns the final host state.

  `stop_at_step` ends the run early after saving a checkpoint there (a time-sliced job); the schedule still
  follows `config.total_steps`, so a later call continues exactly where this one stopped.
  """
  if config.distributed.initialize:
    kwargs = {}
    if config.distributed.coordinator_address:
      kwargs = dict(coordinator_address=config.distributed.coordinator_address,
                    num_processes=config.distributed.num_processes, process_id=config.distributed.process_id)
    jax.distributed.initialize(**kwargs)
  check_workdir(workdir)
  builder = input_pipeline.load_builder(config.dataset.name, config.dataset.config,
                                        config.dataset.data_dir or None, config.dataset.manual_dir or None)
  info = input_pipeline.dataset_info(builder)
  with open(os.path.join(workdir, 'config.json'), 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  with open(os.path.join(workdir, 'class_names.json'), 'w') as f:
    json.dump(list(info.class_names), f)
  model = create_model(config, info.num_classes)
  state, tx = create_train_state(model, config, jax.random.PRNGKey(config.seed))
  latest_manager, best_manager = checkpoint_managers(workdir, config)
  state = restore_latest(latest_manager, state)
  start_step = int(state.step)
  logging.info('starting at step %d of %d', start_step, config.total_steps)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in flatten_config(config).items()})

  num_devices = jax.local_device_count()
  train_ds = input_pipeline.train_dataset(builder, config.dataset.train_split, config, num_devices, config.seed,
                                          start_batch=start_step)
  train_iter = sharding.prefetch_to_devices(train_ds.as_numpy_iterator())
  p_train_step = jax.pmap(functools.partial(train_step, model=model, tx=tx, config=config), axis_name=AXIS,
                          donate_argnums=(0,))
  replicated = sharding.replicate(state)
  sigterm = _SigtermFlag()
  progress = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer)
  pending = []
  step = start_step

  def save(step, replicated):
    latest_manager.save(step, args=ocp.args.StandardSave(sharding.unreplicate(replicated)))

  while step < config.total_steps:
    batch = next(train_iter)
    replicated, metrics = p_train_step(replicated, batch)
    step += 1
    pending.append(metrics)
    progress(step)
    is_last = step == config.total_steps
    if step % config.log_every_steps == 0 or is_last:
      host = jax.device_get([jax.tree_util.tree_map(lambda x: x[0], m) for m in pending])
      scalars = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
      scalars['nonfinite_steps'] = float(sum(m['nonfinite_step'] for m in host))
      del scalars['nonfinite_step']
      writer.write_scalars(step, scalars)
      pending = []
      in_a_row = int(replicated.nonfinite_in_a_row[0])
      if in_a_row and (config.nonfinite.policy == 'stop' or in_a_row >= config.nonfinite.max_consecutive):
        latest_manager.wait_until_finished()
        raise FloatingPointError(
            f'{in_a_row} steps in a row had a non-finite loss or gradient (up to step {step}); their updates were '
            f'skipped and the last good checkpoint is step {latest_manager.latest_step()} in {workdir}')
    if sigterm.raised or step == stop_at_step:
      logging.warning('%s: saving step %d and exiting', 'SIGTERM' if sigterm.raised else 'stop_at_step', step)
      save(step, replicated)
      latest_manager.wait_until_finished()
      writer.flush()
      return sharding.unreplicate(replicated)
    if step % config.checkpoint_every_steps == 0 or is_last:
      save(step, replicated)
    if step % config.eval_every_steps == 0 or is_last:
      from lld_jax import evaluate  # evaluation pulls in pycocotools and matplotlib
      with progress.timed('eval'):
        result = evaluate.evaluate_split(model, sharding.unreplicate(replicated), builder,
                                         config.dataset.eval_split, config)
      scalars = {f'eval/{k}': v for k, v in result.metrics.items() if np.isscalar(v) and np.isfinite(v)}
      writer.write_scalars(step, scalars)
      best_manager.save(step, args=ocp.args.StandardSave(sharding.unreplicate(replicated)),
                        metrics={'mAP50': float(np.nan_to_num(result.metrics['mAP50']))})
  latest_manager.wait_until_finished()
  best_manager.wait_until_finished()
  writer.flush()
  return sharding.unreplicate(replicated)


def flatten_config(config):
  return {'.'.join(k): v for k, v in flax.traverse_util.flatten_dict(config.to_dict()).items()
          if isinstance(v, (int, float, str, bool))}


FLAGS = flags.FLAGS


def _define_flags():
  config_flags.DEFINE_config_file('config', None, 'Training configuration file.', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Directory for checkpoints, logs and evaluations.')


def main(argv):
  del argv
  train_and_evaluate(FLAGS.config, FLAGS.workdir)


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
