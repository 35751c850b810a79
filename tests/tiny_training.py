"""The tiny training setup shared by the end-to-end and reliability tests: one synthetic download, one config,
and one uninterrupted reference run per test session (seconds of training on a CPU; the compiled programs are
shared through the persistent compilation cache, also with the trainer processes the tests start)."""

import pytest

from configs import synthetic_demo
from lld_jax import train
from tfds_lld import synthetic

TOTAL_STEPS = 16


def tiny_config(root, **overrides):
  """The config for the download under `root` (see `tiny_download`); overrides are dotted keys."""
  c = synthetic_demo.get_config()
  c.total_steps = TOTAL_STEPS
  c.per_device_batch_size = 1
  c.image_size = 64
  c.max_objects = 8
  c.log_every_steps = 1  # a logging window cut by an interruption would average fewer steps
  c.eval_every_steps = TOTAL_STEPS
  c.checkpoint_every_steps = 2
  c.shuffle_buffer = 8
  c.cell_crop_batch_size = 4  # the crop stream must resume exactly too
  c.cell_crop_warmup_steps = 2  # a fresh run only: a resumed run must not warm the cell heads up again
  c.dataset.manual_dir = str(root / 'download')
  c.dataset.data_dir = str(root / 'tfds')
  c.model.backbone_width = 8
  c.model.hidden_dim = 32
  c.model.num_heads = 2
  c.model.ffn_dim = 64
  c.model.num_decoder_layers = 1
  c.model.num_queries = 8
  c.model.denoising_groups = 1
  c.model.roi_size = 3
  c.eval.max_detections = 8
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split('.')
    for name in parents:
      node = node[name]
    node[leaf] = value
  return c


@pytest.fixture(scope='session')
def tiny_download(tmp_path_factory):
  root = tmp_path_factory.mktemp('tiny_lld')
  synthetic.generate(str(root / 'download'), 'coco', subsets=('H_100x_C1',), patients=3, images_per_patient=2,
                     seed=1)
  return root


@pytest.fixture(scope='session')
def uninterrupted_run(tiny_download):
  """(workdir, final host state) of the tiny config trained without interruption."""
  workdir = tiny_download / 'uninterrupted'
  state = train.train_and_evaluate(tiny_config(tiny_download), str(workdir))
  assert int(state.step) == TOTAL_STEPS
  return workdir, state
