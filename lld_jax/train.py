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

from absl import app
from absl import flags
from absl import logging
from clu import metric_writers
from clu import periodic_actions
import flax
import jax
from ml_collections import config_flags
import numpy as np
import orbax.checkpoint as ocp

from lld_jax import input_pipeline
from lld_jax import sharding
from lld_jax.train_step import AXIS
from lld_jax.train_step import TrainState  # noqa: F401  (re-exported for callers of this module)
from lld_jax.train_step import create_model
from lld_jax.train_step import create_train_state
from lld_jax.train_step import model_variables  # noqa: F401
from lld_jax.train_step import predict_step  # noqa: F401
from lld_jax.train_step import train_step

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
