"""Preemption, damaged checkpoints, numerical faults and the errors raised before training starts, on the tiny
config with 2 simulated devices.

Interrupted runs are separate processes (`python -m lld_jax.train`): the first is stopped with SIGTERM once its
first checkpoint exists, the second resumes and is killed with SIGKILL after its next checkpoint, and the run is
finished here. It must end with exactly the parameters and the logged losses and evaluation metrics of an
uninterrupted run.
"""

import glob
import os
import shutil
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest
import tensorflow as tf

from lld_jax import evaluate
from lld_jax import train
from repo import REPO_ROOT
from tiny_training import TOTAL_STEPS
from tiny_training import tiny_config


def _logged_scalars(workdir):
  """{(tag, step): value} from every TensorBoard event file in `workdir` (a resumed run adds files)."""
  values = {}
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField('tensor') and value.metadata.plugin_data.plugin_name == 'scalars':
          values[(value.tag, event.step)] = float(tf.make_ndarray(value.tensor))
  return values


def _comparable(scalars):
  """Losses and evaluation metrics; timing scalars (steps/s, uptime) differ between runs by nature."""
  return {k: v for k, v in scalars.items() if k[0].startswith(('loss', 'eval/', 'grad_norm', 'nonfinite'))}


def _assert_same_fields(state, reference_state, names):
  for name in names:
    for a, b in zip(jax.tree_util.tree_leaves(getattr(state, name)),
                    jax.tree_util.tree_leaves(getattr(reference_state, name))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)


def _assert_same_run(workdir, reference):
  reference_dir, reference_state = reference
  config = tiny_config(workdir.parent)
  abstract = train.abstract_train_state(train.create_model(config, 14), config)
  # The whole train state, optimizer included (inference would read only the weights).
  state = train.restore_latest(evaluate.checkpoint_manager(str(workdir), config), abstract)
  assert int(state.step) == TOTAL_STEPS
  _assert_same_fields(state, reference_state, ('params', 'ema_params', 'opt_state'))
  logged, expected = _comparable(_logged_scalars(workdir)), _comparable(_logged_scalars(reference_dir))
  assert ('eval/mAP50', TOTAL_STEPS) in expected and ('loss', TOTAL_STEPS) in expected
  assert ('loss/cell_class/crops', TOTAL_STEPS) in expected  # the true-cell crop stream resumed with the rest
  assert logged == expected


def _start_and_interrupt(root, workdir, signum, after_checkpoint):
  """Runs the trainer in a child process and sends `signum` once checkpoint `after_checkpoint` is complete."""
  config_file = workdir.parent / f'{workdir.name}_config.py'
  config_file.write_text(
      'import pathlib\nimport sys\n'
      f'sys.path.insert(0, {os.path.join(REPO_ROOT, "tests")!r})\n'
      'from tiny_training import tiny_config\n\n\n'
      'def get_config():\n'
      f'  return tiny_config(pathlib.Path({str(root)!r}))\n')
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=str(jax.config.jax_persistent_cache_min_compile_time_secs))
  child = subprocess.Popen([sys.executable, '-m', 'lld_jax.train', f'--config={config_file}',
                            f'--workdir={workdir}'], cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while not os.path.isdir(workdir / 'checkpoints' / str(after_checkpoint)):
    if child.poll() is not None:
      raise AssertionError(f'trainer exited early with {child.returncode}:\n{child.stderr.read()[-3000:]}')
    assert time.time() < deadline, 'no checkpoint after 10 minutes'
    time.sleep(0.02)
  child.send_signal(signum)
  _, stderr = child.communicate(timeout=300)
  return child.returncode, stderr


def _saved_steps(workdir):
  return sorted(int(os.path.basename(p)) for p in glob.glob(str(workdir / 'checkpoints' / '[0-9]*'))
                if os.path.basename(p).isdigit())


def test_sigterm_then_sigkill_resumes_to_the_uninterrupted_result(tiny_download, uninterrupted_run):
  workdir = tiny_download / 'preempted'
  returncode, stderr = _start_and_interrupt(tiny_download, workdir, signal.SIGTERM, after_checkpoint=2)
  assert returncode == 0 and 'SIGTERM: saving step' in stderr, stderr[-2000:]
  after_sigterm = max(_saved_steps(workdir))
  assert after_sigterm < TOTAL_STEPS  # really interrupted
  next_checkpoint = after_sigterm + 2 - after_sigterm % 2
  returncode, _ = _start_and_interrupt(tiny_download, workdir, signal.SIGKILL, after_checkpoint=next_checkpoint)
  assert returncode == -signal.SIGKILL
  assert max(_saved_steps(workdir)) < TOTAL_STEPS
  train.train_and_evaluate(tiny_config(tiny_download), str(workdir))
  _assert_same_run(workdir, uninterrupted_run)


def test_half_written_checkpoint_falls_back_to_the_previous_one(tiny_download, uninterrupted_run):
  workdir = tiny_download / 'damaged'
  shutil.copytree(uninterrupted_run[0], workdir)
  checkpoints = workdir / 'checkpoints'
  assert sorted(os.listdir(checkpoints)) == [str(TOTAL_STEPS - 2), str(TOTAL_STEPS)]
  # The newest checkpoint lost its array data (a write cut short), and a later save never finished.
  for data_file in glob.glob(str(checkpoints / str(TOTAL_STEPS) / 'default' / '**' / 'd' / '*'), recursive=True):
    os.remove(data_file)
  partial = checkpoints / f'{TOTAL_STEPS + 2}.orbax-checkpoint-tmp-1234'
  shutil.copytree(checkpoints / str(TOTAL_STEPS - 2), partial)
  config = tiny_config(tiny_download)
  model_state, _ = train.create_train_state(train.create_model(config, 14), config, jax.random.PRNGKey(0),
                                            load_pretrained=False)
  manager, _ = train.checkpoint_managers(str(workdir), config)
  restored = train.restore_latest(manager, model_state)
  assert int(restored.step) == TOTAL_STEPS - 2
  assert len(glob.glob(str(checkpoints / f'{TOTAL_STEPS}.damaged-*'))) == 1  # set aside, not deleted
  # Training resumes from it and redoes the last steps exactly.
  state = train.train_and_evaluate(config, str(workdir))
  assert int(state.step) == TOTAL_STEPS
  for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(uninterrupted_run[1].params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def _poison_images_from(step):
  """The trainer's input pipeline, with NaN images from batch `step` on (the compiled step stays the same)."""
  original = train.input_pipeline.train_dataset

  class Poisoned:
    def __init__(self, dataset, start_batch):
      self.dataset, self.start_batch = dataset, start_batch

    def as_numpy_iterator(self):
      for index, batch in enumerate(self.dataset.as_numpy_iterator(), start=self.start_batch):
        if index >= step:
          batch = dict(batch, image=np.full_like(batch['image'], np.nan))
        yield batch

  def poisoned(*args, start_batch=0, **kwargs):
    return Poisoned(original(*args, start_batch=start_batch, **kwargs), start_batch)
  return poisoned


@pytest.mark.parametrize('policy', ['skip', 'stop'])
def test_non_finite_steps_stop_at_the_last_good_checkpoint(tiny_download, monkeypatch, policy):
  monkeypatch.setattr(train.input_pipeline, 'train_dataset', _poison_images_from(5))  # from the 6th step
  config = tiny_config(tiny_download, **{'nonfinite.policy': policy, 'nonfinite.max_consecutive': 3})
  workdir = tiny_download / f'nan_{policy}'
  with pytest.raises(FloatingPointError) as error:
    train.train_and_evaluate(config, str(workdir))
  stopped_at = 8 if policy == 'skip' else 6  # 3 bad steps in a row, or the first one
  message = str(error.value)
  assert f'up to step {stopped_at}' in message and 'last good checkpoint is step 4' in message, message
  manager, _ = train.checkpoint_managers(str(workdir), config)
  assert manager.all_steps() == [2, 4]  # step 6 followed a bad step, and was not saved
  state, _ = train.create_train_state(train.create_model(config, 14), config, jax.random.PRNGKey(0),
                                      load_pretrained=False)
  restored = train.restore_latest(manager, state)
  assert int(restored.nonfinite_total) == 0
  assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree_util.tree_leaves(restored.params))


def test_every_logging_window_reports_its_input_wait(uninterrupted_run):
  """The share of a window spent waiting for the input pipeline, the check that the step is not input-bound."""
  workdir, _ = uninterrupted_run
  waits = {step: v for (tag, step), v in _logged_scalars(str(workdir)).items() if tag == 'input_wait_fraction'}
  assert sorted(waits) == list(range(1, TOTAL_STEPS + 1))  # log_every_steps = 1
  assert all(0.0 <= v <= 1.0 for v in waits.values())


def test_config_that_does_not_match_the_checkpoint(tiny_download, uninterrupted_run):
  workdir = tiny_download / 'mismatch'
  shutil.copytree(uninterrupted_run[0], workdir)
  config = tiny_config(tiny_download, **{'model.hidden_dim': 48})
  with pytest.raises(ValueError, match=r'does not match this config.*checkpoint \(32,\) vs config \(48,\)'):
    train.train_and_evaluate(config, str(workdir))


def test_errors_before_any_training(tiny_download, tmp_path, monkeypatch):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  with pytest.raises(OSError, match='is not writable'):
    train.train_and_evaluate(tiny_config(tiny_download), str(blocker / 'workdir'))

  missing = tiny_config(tiny_download, **{'dataset.manual_dir': str(tmp_path / 'no_download'),
                             'dataset.data_dir': str(tmp_path / 'no_tfds')})
  with pytest.raises(FileNotFoundError, match='no_download'):
    train.train_and_evaluate(missing, str(tmp_path / 'missing'))
  assert not os.path.exists(tmp_path / 'missing' / 'checkpoints')

  monkeypatch.setattr(train.shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10**5, 10**5))
  with pytest.raises(OSError, match='MiB free, but its checkpoints need'):
    train.train_and_evaluate(tiny_config(tiny_download), str(tmp_path / 'full'))
  assert not os.path.exists(tmp_path / 'full' / 'checkpoints')


def test_inference_reads_the_weights_of_a_checkpoint_whose_optimizer_layout_changed(tiny_download,
                                                                                   uninterrupted_run):
  """A checkpoint written before the optimizer state's layout changed still evaluates and predicts: inference
  reads only the weights. Resuming training from it stays an error (its optimizer state cannot be restored)."""
  workdir, finished = uninterrupted_run
  config = tiny_config(tiny_download)
  current = train.abstract_train_state(train.create_model(config, 14), config)
  changed = current.replace(opt_state={'some_other_layout': current.step})
  manager, _ = train.checkpoint_managers(str(workdir), config)
  with pytest.raises(ValueError, match='could not be restored'):
    train.restore_latest(manager, changed)
  restored = train.restore_latest(manager, changed, fields=train.WEIGHT_FIELDS)
  _assert_same_fields(restored, finished, ('params', 'ema_params'))
  assert isinstance(restored.opt_state['some_other_layout'], jax.ShapeDtypeStruct)  # not read
