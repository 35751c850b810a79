"""Preemption, damaged checkpoints, numerical faults and the errors raised before training starts, on the tiny
config with 2 simulated devices.

Killed runs are separate processes (`python -m lld_jax.train`), stopped with SIGTERM or SIGKILL once their first
checkpoint exists; they resume here and must end with exactly the parameters and the logged losses and
evaluation metrics of an uninterrupted run.
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
from tfds_lld import synthetic
from tiny_training import tiny_config

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TOTAL_STEPS = 16


def _config(root, **overrides):
  c = tiny_config(root / 'download', root / 'tfds')
  c.total_steps = TOTAL_STEPS
  c.log_every_steps = 1  # a logging window cut by an interruption would average fewer steps
  c.checkpoint_every_steps = 2
  c.eval_every_steps = TOTAL_STEPS
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for name in parents:
      node = node[name]
    node[leaf] = value
  return c


@pytest.fixture(scope='module')
def data(tmp_path_factory):
  root = tmp_path_factory.mktemp('reliability')
  synthetic.generate(str(root / 'download'), 'coco', subsets=('H_100x_C1',), patients=3, images_per_patient=2,
                     seed=2)
  return root


@pytest.fixture(scope='module')
def uninterrupted(data):
  workdir = data / 'uninterrupted'
  state = train.train_and_evaluate(_config(data), str(workdir))
  assert int(state.step) == TOTAL_STEPS
  return workdir, state


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


def _assert_same_run(workdir, reference):
  reference_dir, reference_state = reference
  _, state = evaluate.restore_for_inference(_config(workdir.parent), str(workdir), 14)
  assert int(state.step) == TOTAL_STEPS
  for name in ('params', 'ema_params', 'opt_state'):
    for a, b in zip(jax.tree_util.tree_leaves(getattr(state, name)),
                    jax.tree_util.tree_leaves(getattr(reference_state, name))):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b), err_msg=name)
  logged, expected = _comparable(_logged_scalars(workdir)), _comparable(_logged_scalars(reference_dir))
  assert ('eval/mAP50', TOTAL_STEPS) in expected and ('loss', TOTAL_STEPS) in expected
  assert logged == expected


def _write_config_file(data, path):
  path.write_text(
      'import sys\n'
      f'sys.path.insert(0, {os.path.join(REPO_ROOT, "tests")!r})\n'
      'import pathlib\n'
      'import test_reliability\n\n\n'
      'def get_config():\n'
      f'  return test_reliability._config(pathlib.Path({str(data)!r}))\n')


def _start_and_interrupt(data, workdir, signum):
  """Runs the trainer in a child process and sends `signum` once its first checkpoint is complete."""
  config_file = workdir.parent / f'{workdir.name}_config.py'
  _write_config_file(data, config_file)
  env = dict(os.environ, JAX_COMPILATION_CACHE_DIR=jax.config.jax_compilation_cache_dir,
             JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0.5')
  child = subprocess.Popen([sys.executable, '-m', 'lld_jax.train', f'--config={config_file}',
                            f'--workdir={workdir}'], cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL,
                           stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 600
  while not os.path.isdir(workdir / 'checkpoints' / '2'):
    if child.poll() is not None:
      raise AssertionError(f'trainer exited early with {child.returncode}:\n{child.stderr.read()[-3000:]}')
    assert time.time() < deadline, 'no checkpoint after 10 minutes'
    time.sleep(0.02)
  child.send_signal(signum)
  _, stderr = child.communicate(timeout=300)
  return child.returncode, stderr


@pytest.mark.parametrize('signum', [signal.SIGTERM, signal.SIGKILL], ids=['sigterm', 'sigkill'])
def test_interrupted_run_resumes_to_the_uninterrupted_result(data, uninterrupted, signum):
  workdir = data / f'interrupted_{signal.Signals(signum).name}'
  returncode, stderr = _start_and_interrupt(data, workdir, signum)
  saved = sorted(int(os.path.basename(p)) for p in glob.glob(str(workdir / 'checkpoints' / '[0-9]*')))
  assert saved and max(saved) < TOTAL_STEPS, saved  # really interrupted
  if signum == signal.SIGTERM:
    assert returncode == 0 and 'SIGTERM: saving step' in stderr, stderr[-2000:]
  else:
    assert returncode == -signal.SIGKILL
  train.train_and_evaluate(_config(data), str(workdir))
  _assert_same_run(workdir, uninterrupted)


def test_half_written_checkpoint_falls_back_to_the_previous_one(data, uninterrupted):
  workdir = data / 'damaged'
  shutil.copytree(uninterrupted[0], workdir)
  checkpoints = workdir / 'checkpoints'
  assert sorted(os.listdir(checkpoints)) == [str(TOTAL_STEPS - 2), str(TOTAL_STEPS)]
  # The newest checkpoint lost its array data (a write cut short), and a later save never finished.
  for data_file in glob.glob(str(checkpoints / str(TOTAL_STEPS) / 'default' / '**' / 'd' / '*'), recursive=True):
    os.remove(data_file)
  partial = checkpoints / f'{TOTAL_STEPS + 2}.orbax-checkpoint-tmp-1234'
  shutil.copytree(checkpoints / str(TOTAL_STEPS - 2), partial)
  model_state, _ = train.create_train_state(train.create_model(_config(data), 14), _config(data),
                                            jax.random.PRNGKey(0), load_pretrained=False)
  manager, _ = train.checkpoint_managers(str(workdir), _config(data))
  restored = train.restore_latest(manager, model_state)
  assert int(restored.step) == TOTAL_STEPS - 2
  # Training resumes from it and redoes the last steps exactly.
  shutil.rmtree(partial)
  shutil.rmtree(checkpoints / str(TOTAL_STEPS))
  for path in glob.glob(str(workdir / 'events.out.tfevents.*')):
    os.remove(path)  # the logs of the redone steps are compared below, not the old ones
  state = train.train_and_evaluate(_config(data), str(workdir))
  for a, b in zip(jax.tree_util.tree_leaves(state.params), jax.tree_util.tree_leaves(uninterrupted[1].params)):
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
def test_non_finite_steps_stop_at_the_last_good_checkpoint(data, monkeypatch, policy):
  monkeypatch.setattr(train.input_pipeline, 'train_dataset', _poison_images_from(5))  # from the 6th step
  config = _config(data, **{'nonfinite.policy': policy, 'nonfinite.max_consecutive': 3})
  workdir = data / f'nan_{policy}'
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


def test_config_that_does_not_match_the_checkpoint(data, uninterrupted):
  workdir = data / 'mismatch'
  shutil.copytree(uninterrupted[0], workdir)
  config = _config(data, **{'model.hidden_dim': 48})
  with pytest.raises(ValueError, match=r'does not match this config.*checkpoint \(32,\) vs config \(48,\)'):
    train.train_and_evaluate(config, str(workdir))


def test_errors_before_any_training(data, tmp_path, monkeypatch):
  blocker = tmp_path / 'a_file'
  blocker.write_text('not a folder')
  with pytest.raises(OSError, match='is not writable'):
    train.train_and_evaluate(_config(data), str(blocker / 'workdir'))

  missing = _config(data, **{'dataset.manual_dir': str(tmp_path / 'no_download'),
                             'dataset.data_dir': str(tmp_path / 'no_tfds')})
  with pytest.raises(FileNotFoundError, match='no_download'):
    train.train_and_evaluate(missing, str(tmp_path / 'missing'))
  assert not os.path.exists(tmp_path / 'missing' / 'checkpoints')

  monkeypatch.setattr(train.shutil, 'disk_usage', lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 10**5, 10**5))
  with pytest.raises(OSError, match='MiB free, but its checkpoints need'):
    train.train_and_evaluate(_config(data), str(tmp_path / 'full'))
  assert not os.path.exists(tmp_path / 'full' / 'checkpoints')
