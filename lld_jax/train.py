r"""Training: `python -m lld_jax.train --config=configs/NAME.py --workdir=DIR [--config.key=value ...]`.

Data-parallel over all local devices with `jax.pmap` (one program per device, named-axis collectives only);
multi-host ready (`--config.distributed.initialize=True` calls `jax.distributed.initialize`, each process reads
its own shard of the data). Checkpoints (orbax) are saved every `checkpoint_every_steps`, on SIGTERM, and at the
end; a run restarts from the latest one in DIR, with the same data order, so a resumed run reaches the same
parameters as an uninterrupted one. The best checkpoint by validation mAP50 is kept in DIR/best.
"""

import concurrent.futures
import functools
import itertools
import json
import os
import shutil
import signal
import time

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

from lld_jax import cell_crops
from lld_jax import cell_head_warmup
from lld_jax import class_context
from lld_jax import input_pipeline
from lld_jax import sharding
from lld_jax.train_step import AXIS
from lld_jax.train_step import TrainState  # noqa: F401  (re-exported for callers of this module)
from lld_jax.train_step import abstract_train_state  # noqa: F401
from lld_jax.train_step import create_model
from lld_jax.train_step import create_train_state
from lld_jax.train_step import model_variables  # noqa: F401
from lld_jax.train_step import PREDICT_INPUTS  # noqa: F401
from lld_jax.train_step import predict_step  # noqa: F401
from lld_jax.train_step import train_step

def checkpoint_managers(workdir, config):
  # The handler is named so that a new process can read a checkpoint's metadata before restoring it.
  latest = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'checkpoints'), item_handlers=ocp.StandardCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(max_to_keep=config.keep_checkpoints, create=True))
  best = ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), 'best'), item_handlers=ocp.StandardCheckpointHandler(),
      options=ocp.CheckpointManagerOptions(max_to_keep=1, create=True, best_fn=lambda m: m['mAP50'],
                                           best_mode='max'))
  return latest, best


def _shapes_by_path(tree):
  flat = flax.traverse_util.flatten_dict(tree, sep='/') if tree else {}
  return {path: tuple(leaf.shape) for path, leaf in flat.items() if hasattr(leaf, 'shape')}


def check_matches_config(saved_tree, abstract_state, where):
  """Raises a ValueError naming the first parameters whose shapes differ between a checkpoint and the config."""
  if not saved_tree.get('params'):
    logging.warning('checkpoint %s has no parameter metadata; its shapes are checked on restore only', where)
    return
  saved = _shapes_by_path(saved_tree['params'])
  expected = _shapes_by_path(flax.core.unfreeze(abstract_state.params))
  problems = [f'{k}: checkpoint {saved[k]} vs config {expected[k]}' for k in sorted(saved.keys() & expected.keys())
              if saved[k] != expected[k]]
  problems += [f'{k}: in the config, not in the checkpoint' for k in sorted(expected.keys() - saved.keys())]
  problems += [f'{k}: in the checkpoint, not in the config' for k in sorted(saved.keys() - expected.keys())]
  if problems:
    shown = '; '.join(problems[:5]) + (f'; and {len(problems) - 5} more' if len(problems) > 5 else '')
    raise ValueError(f'checkpoint {where} does not match this config (a different model or number of classes?): '
                     f'{len(problems)} parameter(s) differ: {shown}')


def _set_aside(manager, where, error):
  """Renames a damaged checkpoint out of the way of the step's next save, keeping it for inspection."""
  aside = f'{where}.damaged-{int(time.time())}'
  if jax.process_index() == 0:  # one host renames; the others only skip it
    os.rename(where, aside)
  manager.reload()
  logging.warning('checkpoint %s is damaged or half-written (%s: %s); moved to %s, trying the one before it',
                  where, type(error).__name__, error, aside)


# The TrainState fields inference needs: `restore_latest(..., fields=WEIGHT_FIELDS)`.
WEIGHT_FIELDS = ('params', 'ema_params', 'model_state')


def _restore_fields(path, abstract, fields):
  """`abstract` with only the named TrainState fields read from the checkpoint item at `path`."""
  wanted = {name: getattr(abstract, name) for name in fields}
  restored = ocp.PyTreeCheckpointer().restore(path, args=ocp.args.PyTreeRestore(
      item=wanted, restore_args=ocp.checkpoint_utils.construct_restore_args(wanted), partial_restore=True))
  return abstract.replace(**restored)


def restore_latest(manager, state, fields=None):
  """The newest readable checkpoint, or `state` when there is none.

  A checkpoint cut short while being written is skipped with a warning and the one before it is used: orbax
  never lists its unfinished temporary folders, and a listed step whose files are damaged fails to read its
  metadata (it is renamed aside). A checkpoint of another model (different shapes) is an error, not something
  to skip, and so is one whose metadata reads but whose state does not restore.
  With `fields` (TrainState field names), only those are read and the others stay as in `state`: inference
  needs the weights, not the optimizer state, whose layout may have changed since the checkpoint was written.
  """
  abstract = jax.tree_util.tree_map(ocp.utils.to_shape_dtype_struct, state)
  for step in sorted(manager.all_steps(), reverse=True):
    where = f'{manager.directory}/{step}'
    try:
      metadata = manager.item_metadata(step)
      saved = getattr(metadata, 'tree', metadata)
    except Exception as error:  # pylint: disable=broad-except
      _set_aside(manager, where, error)
      continue
    check_matches_config(saved if isinstance(saved, dict) else {}, abstract, where)
    try:
      if fields is not None:  # the manager's one item is stored under 'default'
        return _restore_fields(os.path.join(where, 'default'), abstract, fields)
      return manager.restore(step, args=ocp.args.StandardRestore(abstract))
    except Exception as error:  # pylint: disable=broad-except
      # Readable metadata with matching parameters: the rest of the state differs (another optimizer config?)
      # or its arrays are damaged. Either way a person should look, rather than a run silently start over.
      raise ValueError(f'checkpoint {where} could not be restored ({type(error).__name__}: {error}); if it is '
                       'damaged, move it aside to resume from the one before it') from error
  if manager.all_steps():
    logging.warning('no readable checkpoint in %s: starting from scratch', manager.directory)
  return state


def check_workdir(workdir, state=None, config=None):
  """Fails before any training time is spent when `workdir` is not writable, or lacks the space for the
  checkpoints (`keep_checkpoints` + the best one + one being written) of `state`."""
  probe = os.path.join(workdir, '.write_probe')
  try:
    os.makedirs(workdir, exist_ok=True)
    with open(probe, 'w') as f:
      f.write('x' * 1024)
    os.remove(probe)
  except OSError as error:
    raise OSError(f'workdir {workdir} is not writable: {error}') from error
  if state is not None:
    state_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree_util.tree_leaves(state) if hasattr(x, 'size'))
    needed = state_bytes * (config.keep_checkpoints + 2)
    free = shutil.disk_usage(workdir).free
    if free < needed:
      raise OSError(f'workdir {workdir} has {free / 2**20:.1f} MiB free, but its checkpoints need about '
                    f'{needed / 2**20:.1f} MiB ({config.keep_checkpoints} kept + best + one being written, '
                    f'{state_bytes / 2**20:.1f} MiB each): free some space or choose another --workdir')


class _SigtermFlag:
  """Turns SIGTERM (preemption) into a flag the loop checks between steps, so it can save first."""

  def __init__(self):
    self.raised = False
    signal.signal(signal.SIGTERM, self._handle)

  def _handle(self, signum, frame):
    del signum, frame
    self.raised = True


def images_without_region_add_no_loss(config) -> bool:
  """Whether an image with no annotated region gives no loss at all: with region-restricted matching its whole field
  is unlabelled, and nothing there is a target or a negative unless pseudo-labels (where
  `pseudo_labels.on_images_without_region` allows them) or `loss.unlabelled_background_below` make it one."""
  pseudo_labels_on_it = config.pseudo_labels.enabled and config.pseudo_labels.on_images_without_region
  return (config.loss.region_restricted and not pseudo_labels_on_it
          and config.loss.unlabelled_background_below == 0)


def should_skip_images_without_region(builder, config, writer, step) -> bool:
  """Whether to skip the training images without an annotated region; counts and reports them when it does."""
  if not (config.dataset.skip_images_without_region and images_without_region_add_no_loss(config)):
    return False
  with_region, total = input_pipeline.count_images_with_region(builder, config.dataset.train_split)
  if with_region == total:
    return False
  if with_region == 0:
    raise ValueError(
        f'dataset {config.dataset.name}/{config.dataset.config}, split {config.dataset.train_split}: none of the '
        f'{total} images has an annotated region, so region-restricted matching has nothing to learn from; train '
        'with pseudo-labels on them (pseudo_labels.on_images_without_region), loss.region_restricted=False or a '
        'dataset with annotated regions')
  logging.warning('training on the %d of %d images of split %s that have an annotated region: the other %d add no '
                  'loss with region-restricted matching and no pseudo-labels on them '
                  '(dataset.skip_images_without_region=False keeps them)',
                  with_region, total, config.dataset.train_split, total - with_region)
  writer.write_scalars(step, {'data/train_images_used': with_region,
                              'data/train_images_skipped_without_region': total - with_region})
  return True


def _counted_once(workdir, file_name, resumed, count, write, read):
  """count() on a fresh start, written to WORKDIR/file_name (by process 0) for `lld_jax.predict`; a resumed run
  reads it back there instead of reading the whole training split again."""
  path = os.path.join(workdir, file_name)
  if resumed and os.path.exists(path):
    return read(path)
  counts = count()
  if jax.process_index() == 0:
    write(counts, path)
  return counts


def training_attribute_counts(builder, config, workdir, resumed):
  """The training split's attribute counts [A, V], by which evaluation and prediction decide the attribute values
  (`eval.attribute_logit_adjustment`; None when it is off, and nothing is read), in WORKDIR/attribute_counts.json
  (`_counted_once`)."""
  from lld_jax import evaluate  # evaluation pulls in pycocotools and matplotlib
  if not evaluate.attribute_logit_adjustment(config):
    return None
  return _counted_once(workdir, evaluate.ATTRIBUTE_COUNTS_FILE, resumed,
                       lambda: input_pipeline.count_attribute_values(builder, config.dataset.train_split),
                       evaluate.write_attribute_counts, evaluate.read_attribute_counts)


def training_class_counts(builder, config, workdir, resumed):
  """(counts [T, K], type names): the training cells of each leukemia type, by which evaluation and prediction put
  each cell in its film's context (`eval.class_context`; None when it is off), in WORKDIR/class_context.json
  (`_counted_once`)."""
  mode = class_context.mode_of(config)
  if mode == 'none':
    return None
  class_names = input_pipeline.dataset_info(builder).class_names

  def count():
    counts, types, unknown = input_pipeline.count_classes_by_type(builder, config.dataset.train_split)
    if unknown:
      logging.warning('eval.class_context: %d fields of %s have no leukemia type in their name and are not counted',
                      unknown, config.dataset.train_split)
    try:  # fail now, not at the first evaluation, when the types cannot be learnt
      class_context.type_mix(counts, types)
    except ValueError as error:
      raise ValueError(f'eval.class_context={mode} on {config.dataset.train_split} of {builder.name}: {error}; '
                       f'eval.class_context=none classifies each cell alone') from None
    return counts, types

  return _counted_once(workdir, class_context.COUNTS_FILE, resumed, count,
                       lambda value, path: class_context.write_counts(*value, class_names, path),
                       lambda path: class_context.read_counts(path, class_names))


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
  check_workdir(workdir, state, config)
  latest_manager, best_manager = checkpoint_managers(workdir, config)
  state = restore_latest(latest_manager, state)
  start_step = int(state.step)
  logging.info('starting at step %d of %d', start_step, config.total_steps)
  attribute_counts = training_attribute_counts(builder, config, workdir, resumed=start_step > 0)
  class_counts = training_class_counts(builder, config, workdir, resumed=start_step > 0)
  writer = metric_writers.create_default_writer(workdir, just_logging=jax.process_index() > 0)
  if start_step == 0:
    writer.write_hparams({k: v for k, v in flatten_config(config).items()})

  num_devices = jax.local_device_count()
  train_ds = input_pipeline.train_dataset(
      builder, config.dataset.train_split, config, num_devices, config.seed, start_batch=start_step,
      skip_images_without_region=should_skip_images_without_region(builder, config, writer, start_step))
  host_batches = train_ds.as_numpy_iterator()
  cell_head_warmup.check_config(config)
  if config.cell_crop_batch_size:
    pool = cell_crops.build_pool(builder, config.dataset.train_split, config)
    writer.write_scalars(start_step, {'cell_crop_pool/cells': len(pool.labels),
                                      'cell_crop_pool/left_out': pool.num_truncated})
    host_batches = cell_crops.with_crops(host_batches, pool, start_step, config.seed, num_devices,
                                         config.cell_crop_batch_size, config.augment.enabled)
  p_train_step = jax.pmap(functools.partial(train_step, model=model, tx=tx, config=config), axis_name=AXIS,
                          donate_argnums=(0,))
  compiling = None
  if start_step < config.total_steps:  # a finished run compiles nothing
    # The train step compiles on another thread while the cell heads warm up: on a CPU each takes a minute or more.
    first_batch = next(host_batches)
    host_batches = itertools.chain([first_batch], host_batches)
    shapes = (sharding.shapes_on_devices(state, replicated=True),
              sharding.shapes_on_devices(first_batch, replicated=False))
    compiler = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix='compile_train_step')
    compiling = compiler.submit(lambda: p_train_step.lower(*shapes).compile())
    compiler.shutdown(wait=False)  # its one task still runs; the thread ends with it
  if config.cell_crop_batch_size and config.cell_crop_warmup_steps and start_step == 0:
    params, tenths = cell_head_warmup.warm_up(state.params, pool, config, info.num_classes)
    state = state.replace(params=params, ema_params=params)
    writer.write_scalars(0, {'cell_head_warmup/first_loss': tenths[0], 'cell_head_warmup/last_loss': tenths[-1]})
  train_iter = sharding.prefetch_to_devices(host_batches)
  replicated = sharding.replicate(state)
  if compiling is not None:
    p_train_step = compiling.result()
  sigterm = _SigtermFlag()
  progress = periodic_actions.ReportProgress(num_train_steps=config.total_steps, writer=writer)
  pending = []
  input_wait_s, window_start = 0.0, time.perf_counter()
  step = start_step

  def save(step, replicated):
    latest_manager.save(step, args=ocp.args.StandardSave(sharding.unreplicate(replicated)))

  def write_pending(step, pending, input_wait_fraction):
    host = jax.device_get([jax.tree_util.tree_map(lambda x: x[0], m) for m in pending])
    scalars = {k: float(np.mean([m[k] for m in host])) for k in host[0]}
    scalars['nonfinite_steps'] = float(sum(m['nonfinite_step'] for m in host))
    del scalars['nonfinite_step']
    # Share of the window's wall time the loop spent waiting for the next batch: about 0 when the input
    # pipeline keeps ahead of the step.
    scalars['input_wait_fraction'] = input_wait_fraction
    writer.write_scalars(step, scalars)

  def window_input_wait():
    nonlocal input_wait_s, window_start
    now = time.perf_counter()
    fraction = input_wait_s / max(now - window_start, 1e-9)
    input_wait_s, window_start = 0.0, now
    return fraction

  while step < config.total_steps:
    wait_start = time.perf_counter()
    batch = next(train_iter)
    input_wait_s += time.perf_counter() - wait_start
    replicated, metrics = p_train_step(replicated, batch)
    step += 1
    pending.append(metrics)
    progress(step)
    is_last = step == config.total_steps
    if step % config.log_every_steps == 0 or is_last:
      write_pending(step, pending, window_input_wait())
      pending = []
      in_a_row = int(replicated.nonfinite_in_a_row[0])
      if in_a_row and (config.nonfinite.policy == 'stop' or in_a_row >= config.nonfinite.max_consecutive):
        latest_manager.wait_until_finished()
        raise FloatingPointError(
            f'training stopped: {in_a_row} steps in a row had a non-finite loss or gradient (up to step {step}, '
            f'nonfinite.policy={config.nonfinite.policy}, max_consecutive={config.nonfinite.max_consecutive}); '
            f'their updates were skipped, and the last good checkpoint is step {latest_manager.latest_step()} in '
            f'{workdir}: lower the learning rate or check the data, then rerun to resume from it')
    if sigterm.raised or step == stop_at_step:
      logging.warning('%s: saving step %d and exiting', 'SIGTERM' if sigterm.raised else 'stop_at_step', step)
      save(step, replicated)
      if pending:  # the metrics of an unfinished logging window are not lost
        write_pending(step, pending, window_input_wait())
      latest_manager.wait_until_finished()
      writer.flush()
      return sharding.unreplicate(replicated)
    if step % config.checkpoint_every_steps == 0 or is_last:
      in_a_row = int(replicated.nonfinite_in_a_row[0])
      if in_a_row:  # keep the last good checkpoint the newest one
        logging.warning('step %d: checkpoint not saved, the last %d steps were non-finite', step, in_a_row)
      else:
        save(step, replicated)
    if step % config.eval_every_steps == 0 or is_last:
      from lld_jax import evaluate  # evaluation pulls in pycocotools and matplotlib
      with progress.timed('eval'):
        result = evaluate.evaluate_split(model, sharding.unreplicate(replicated), builder,
                                         config.dataset.eval_split, config, attribute_counts, class_counts)
      scalars = {f'eval/{k}': v for k, v in result.metrics.items()
                 if isinstance(v, (int, float, np.number)) and np.isfinite(v)}
      writer.write_scalars(step, scalars)
      if is_last:  # what `lld_jax.evaluate` would write for this split, without evaluating twice
        evaluate.write_evaluation(result, os.path.join(workdir, 'eval', config.dataset.eval_split))
      best_manager.save(step, args=ocp.args.StandardSave(sharding.unreplicate(replicated)),
                        metrics={'mAP50': float(np.nan_to_num(result.metrics['mAP50']))})
      window_input_wait()  # the evaluation's time is not the input pipeline's
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
