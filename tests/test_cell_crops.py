"""The true-cell crop stream: what `sample` draws from a pool (the pool's crops themselves are checked against
the model's own crops in test_overfit, which builds a dataset)."""

import dataclasses

import numpy as np
import pytest

from lld_jax import cell_crops
from lld_jax import default_config
from lld_jax import input_pipeline
from lld_jax import optical_density
from lld_jax.models import detector

# Uniform crops, so that a shift or a flip leaves them as they are; neighbouring values differ by more than the
# channel jitter can bridge (a factor of 1.15 / 0.85), so each drawn crop still tells which cell it came from.
VALUES = np.array([10, 40, 90, 160, 250])
LABELS = np.array([3, 1, 4, 0, 2], np.int32)


def _pool(crop_size=8, shift=1):
  side = crop_size + 2 * shift
  crops = np.broadcast_to(VALUES[:, None, None, None], (len(VALUES), side, side, 3)).astype(np.uint8)
  return cell_crops.CellCropPool(np.ascontiguousarray(crops), LABELS, crop_size, num_truncated=0)


def _pixels(normalized):
  return (normalized * input_pipeline.IMAGENET_STD + input_pipeline.IMAGENET_MEAN) * 255.0


@pytest.mark.parametrize('augment', [False, True])
def test_each_crop_keeps_its_label(augment):
  drawn = cell_crops.sample(_pool(), step=3, seed=0, num_devices=2, per_device=16, augment=augment)
  assert drawn['cell_crops'].shape == (2, 16, 8, 8, 3) and drawn['cell_crops'].dtype == np.float32
  assert drawn['cell_crop_labels'].shape == (2, 16)
  pixels = _pixels(drawn['cell_crops']).reshape(32, -1, 3)
  source = np.abs(np.log(pixels.mean(1))[..., None] - np.log(VALUES)).argmin(-1)  # [32 crops, 3 channels]
  assert (source == source[:, :1]).all()  # every channel points at the same cell
  np.testing.assert_array_equal(LABELS[source[:, 0]], drawn['cell_crop_labels'].ravel())
  if not augment:
    np.testing.assert_allclose(pixels, np.broadcast_to(VALUES[source[:, :1], None], pixels.shape), atol=1e-3)
  assert len(set(source[:, 0])) > 1


def test_attributes_and_sizes_travel_with_their_cells():
  attributes = np.stack([LABELS % 3, LABELS % 2, -np.ones_like(LABELS)], -1).astype(np.int32)
  box_pixels = np.stack([10.0 * LABELS + 5, 20.0 * LABELS + 7], -1).astype(np.float32)
  pool = dataclasses.replace(_pool(), attributes=attributes, box_pixels=box_pixels)
  drawn = cell_crops.sample(pool, step=2, seed=0, num_devices=2, per_device=16)
  labels = drawn['cell_crop_labels']
  assert drawn['cell_crop_attributes'].shape == (2, 16, 3) and drawn['cell_crop_box_pixels'].shape == (2, 16, 2)
  np.testing.assert_array_equal(drawn['cell_crop_attributes'],
                                np.stack([labels % 3, labels % 2, -np.ones_like(labels)], -1))
  np.testing.assert_array_equal(drawn['cell_crop_box_pixels'], np.stack([10.0 * labels + 5, 20.0 * labels + 7], -1))
  assert 'cell_crop_attributes' not in cell_crops.sample(_pool(), step=2, seed=0, num_devices=1, per_device=4)


def test_draws_depend_on_seed_step_and_stream_only():
  pool = _pool()
  rng = np.random.default_rng(0)
  pool.crops[:] = rng.integers(0, 256, pool.crops.shape)  # texture, so that shifts and flips show
  first = cell_crops.sample(pool, step=5, seed=1, num_devices=1, per_device=8)
  again = cell_crops.sample(pool, step=5, seed=1, num_devices=1, per_device=8)
  for key in first:
    np.testing.assert_array_equal(first[key], again[key])
  assert not np.array_equal(first['cell_crops'], cell_crops.sample(pool, 6, 1, 1, 8)['cell_crops'])
  assert not np.array_equal(first['cell_crops'], cell_crops.sample(pool, 5, 2, 1, 8)['cell_crops'])
  # The warm-up's stream (lld_jax.cell_head_warmup) draws other crops for the same step.
  assert not np.array_equal(first['cell_crops'], cell_crops.sample(pool, 5, 1, 1, 8, stream=1)['cell_crops'])
  np.testing.assert_array_equal(first['cell_crops'], cell_crops.sample(pool, 5, 1, 1, 8, stream=0)['cell_crops'])


def test_unaugmented_draw_is_the_pools_centre():
  pool = _pool(crop_size=8, shift=2)
  pool.crops[:] = np.random.default_rng(1).integers(0, 256, pool.crops.shape)
  drawn = cell_crops.sample(pool, step=0, seed=0, num_devices=1, per_device=4, augment=False)
  pixels = _pixels(drawn['cell_crops'][0])
  sources = [int(np.flatnonzero(LABELS == label)[0]) for label in drawn['cell_crop_labels'][0]]
  np.testing.assert_allclose(pixels, pool.crops[sources, 2:10, 2:10].astype(np.float64), atol=1e-3)


def test_context_margin_puts_the_models_crop_at_the_centre():
  """A crop with context, cut to its centre, samples the image where the model's own crop of the box does."""
  rng = np.random.default_rng(2)
  image = rng.normal(size=(1, 48, 48, 3)).astype(np.float32)
  boxes = np.array([[[0.45, 0.5, 0.3, 0.4], [0.6, 0.4, 0.25, 0.2]]], np.float32)
  crop_size, shift = 8, 1
  model_crop = np.asarray(detector.crop_cells(image, boxes, crop_size))
  wide = np.asarray(detector.crop_cells(image, boxes, crop_size + 2 * shift,
                                        cell_crops.context_margin(crop_size, shift)))
  np.testing.assert_allclose(wide[:, :, shift:-shift, shift:-shift], model_crop, atol=1e-5)


def test_optical_density_draws_do_not_move_with_the_channel_jitter():
  """The pool keeps each cell's background colour and scales it with the crop's channels, as another lamp would:
  the optical density the encoder reads is the same drawn with or without the jitter (the crops are uniform, so
  shifts and flips leave them alone)."""
  pool = dataclasses.replace(_pool(), pixels='optical_density',
                             background=np.full((len(VALUES), 3), 0.99, np.float32))
  plain = cell_crops.sample(pool, step=3, seed=0, num_devices=1, per_device=16, augment=False)
  jittered = cell_crops.sample(pool, step=3, seed=0, num_devices=1, per_device=16, augment=True)
  np.testing.assert_array_equal(plain['cell_crop_labels'], jittered['cell_crop_labels'])
  np.testing.assert_allclose(jittered['cell_crops'], plain['cell_crops'], atol=1e-4)
  uniform = np.broadcast_to(VALUES[:, None, None, None] / 255.0, (len(VALUES), 1, 1, 3))
  expected = np.asarray(optical_density.encoder_input(uniform, np.full((len(VALUES), 3), 0.99)))[:, 0, 0]
  first = [int(np.flatnonzero(LABELS == label)[0]) for label in plain['cell_crop_labels'][0]]
  np.testing.assert_allclose(plain['cell_crops'][0, :, 0, 0], expected[first], rtol=1e-5)


def _offsets_of_draws(pool, drawn):
  """For each drawn crop, the set of (dy, dx) windows of its pool crop that it is (up to flips and a per-channel
  scale): the pool's texture makes the window unique."""
  size, context = pool.crop_size, pool.shift
  offsets = []
  for crop, label in zip(_pixels(drawn['cell_crops'][0]), drawn['cell_crop_labels'][0]):
    source = pool.crops[int(np.flatnonzero(LABELS == label)[0])].astype(np.float64)
    found = set()
    for dy in range(2 * context + 1):
      for dx in range(2 * context + 1):
        window = source[dy:dy + size, dx:dx + size]
        for flipped in (crop, crop[:, ::-1], crop[::-1], crop[::-1, ::-1]):
          ratio = flipped / window
          if np.allclose(ratio, ratio.mean((0, 1)), rtol=1e-3):
            found.add((dy - context, dx - context))
    offsets.append(found)
  return offsets


@pytest.mark.parametrize('max_shift', [0, 1, 3])
def test_shifts_stay_within_the_configured_limit(max_shift):
  pool = dataclasses.replace(_pool(crop_size=8, shift=3), max_shift=max_shift)
  pool.crops[:] = np.random.default_rng(3).integers(20, 200, pool.crops.shape)  # the jitter never clips them
  drawn = cell_crops.sample(pool, step=1, seed=0, num_devices=1, per_device=32, augment=True)
  offsets = _offsets_of_draws(pool, drawn)
  assert all(len(found) == 1 for found in offsets)
  shifts = np.array([next(iter(found)) for found in offsets])
  assert np.abs(shifts).max() == max_shift  # reached, never passed


def test_shift_beyond_the_pools_context_is_refused():
  config = default_config.base_config()
  config.model.cell_crop_size, config.model.cell_class_refinement = 32, True
  config.augment.cell_crop_shift = 0.2
  with pytest.raises(ValueError, match='augment.cell_crop_shift=0.2'):
    cell_crops.build_pool(None, 'train', config)


@pytest.mark.parametrize('balance, expected_share', [(0.0, 0.1), (0.5, 1 / 4), (1.0, 0.5)])
def test_class_balance_draws_a_rare_class_as_configured(balance, expected_share):
  # 90 cells of class 0, 10 of class 1: shares drawn go with count ** (1 - balance).
  labels = np.array([0] * 90 + [1] * 10, np.int32)
  crops = np.zeros((len(labels), 10, 10, 3), np.uint8)
  pool = cell_crops.CellCropPool(crops, labels, 8, num_truncated=0,
                                 draw_probabilities=cell_crops.class_balanced_probabilities(labels, balance))
  drawn = np.concatenate([cell_crops.sample(pool, step, seed=0, num_devices=1, per_device=100)['cell_crop_labels']
                          for step in range(40)])
  assert abs((drawn == 1).mean() - expected_share) < 0.03
  if balance:  # within a class, every cell alike
    np.testing.assert_allclose(pool.draw_probabilities[labels == 1], pool.draw_probabilities[90])


def test_class_balance_outside_zero_to_one_is_refused():
  with pytest.raises(ValueError, match='cell_crop_class_balance=1.5'):
    cell_crops.class_balanced_probabilities(np.array([0, 1]), 1.5)
