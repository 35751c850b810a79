"""A stream of true-cell crops from the whole training split, for the cell classifier.

Each training step shows the detector a few fields, hence a few dozen cells; the cell classifier (a small CNN on
each cell's own pixels, `detector.CellClassifier`) learns from those alone and stays far below what the same CNN
reaches on crops of the true boxes in the same time (docs/results.md, session 20). `build_pool` crops every
annotated cell of the split once, as the model sees it (the field resized to the canvas, no augmentation), with
some context around the crop; `sample` then draws `cell_crop_batch_size` of them per device and step, each shifted
by up to `augment.cell_crop_shift` of its side (a box that is a little off; at most the context, an eighth of the
side), flipped, and with each colour channel scaled by 0.85-1.15 (stains vary), then made what the cell encoder
reads (`detector.cell_encoder_crops`: the normalized pixels, or their optical density against the field's
background, which the pool keeps for each cell; its colour is scaled with the crop's, as another lamp's would be,
so the density does not move). The draws depend on the seed, the process and the step only, so a resumed run sees
the same crops. Each drawn cell comes with its class, its attributes and its box's size in its image's own pixels
(for `detector.CellAttributeClassifier`).
"""

import dataclasses

from absl import logging
import jax
import numpy as np

from lld_jax import input_pipeline
from lld_jax import optical_density
from lld_jax.models import detector

_CHANNEL_JITTER = 0.15


@dataclasses.dataclass
class CellCropPool:
  crops: np.ndarray  # [N, P, P, 3] uint8 pixels, P = crop_size + 2 * shift
  labels: np.ndarray  # [N] int32 class ids
  crop_size: int  # S: what the model's cell encoder reads
  num_truncated: int  # cells of the split left out because their field held more than max_objects
  pixels: str = 'intensity'  # model.cell_crop_pixels
  background: np.ndarray | None = None  # [N, 3] float32: the field's background at each cell (optical_density)
  attributes: np.ndarray | None = None  # [N, A] int32 attribute values (-1: not applicable)
  box_pixels: np.ndarray | None = None  # [N, 2] float32 each cell's width and height in its image's own pixels
  max_shift: int | None = None  # the largest shift `sample` draws, in pixels (None: the whole context)
  draw_probabilities: np.ndarray | None = None  # [N] how likely `sample` draws each cell (None: all alike)

  @property
  def shift(self):
    return (self.crops.shape[1] - self.crop_size) // 2


def context_margin(crop_size, shift):
  """The box margin whose crop of side crop_size + 2 * shift holds, at its centre, exactly the model's crop of
  side crop_size (margin detector.CELL_CROP_MARGIN): both grids have the same pitch and centre."""
  side = (1 + 2 * detector.CELL_CROP_MARGIN) * (crop_size + 2 * shift) / crop_size
  return (side - 1) / 2


def build_pool(builder, split, config) -> CellCropPool:
  """Every annotated cell of `split` (at most config.max_objects a field), cropped as `detector.crop_cells` does
  from the field the model sees, with `crop_size // 8` pixels of context on each side."""
  crop_size = config.model.cell_crop_size
  if not (crop_size and config.model.cell_class_refinement):
    raise ValueError(f'cell_crop_batch_size={config.cell_crop_batch_size} needs the cell classifier: '
                     'model.cell_crop_size > 0 and model.cell_class_refinement=True')
  shift = max(crop_size // 8, 1)
  side = crop_size + 2 * shift
  shift_fraction = config.augment.cell_crop_shift
  if not 0 <= shift_fraction <= 0.125:
    raise ValueError(f'augment.cell_crop_shift={shift_fraction}: the pool holds context for shifts of 0 to 0.125 '
                     'of the crop side')
  optical = config.model.cell_crop_pixels == 'optical_density'

  @jax.jit
  def crop_with_background(images, boxes, scale):
    linear = detector.input_intensities(images)
    crops = detector.crop_cells(linear, boxes, side, context_margin(crop_size, shift))
    background = optical_density.background_at(linear, boxes[..., :2]) if optical else None
    return crops, background, detector.original_box_pixels(boxes, images.shape[2], scale)

  crops, backgrounds, labels, attributes, box_pixels, truncated = [], [], [], [], [], 0
  for batch in input_pipeline.eval_dataset(builder, split, config, 1).as_numpy_iterator():
    cut = {k: v[0] for k, v in batch.items()}  # one device
    pixels, background, sizes = jax.device_get(crop_with_background(cut['image'], cut['boxes'], cut['scale']))
    keep = (cut['weight'] > 0) & cut['example_valid'][:, None]
    crops.append(np.clip(np.round(pixels[keep] * 255.0), 0, 255).astype(np.uint8))
    if optical:
      backgrounds.append(background[keep].astype(np.float32))
    labels.append(cut['labels'][keep].astype(np.int32))
    attributes.append(cut['attributes'][keep].astype(np.int32))
    box_pixels.append(sizes[keep].astype(np.float32))
    truncated += int(cut['num_truncated'][cut['example_valid']].sum())
  pool = CellCropPool(np.concatenate(crops), np.concatenate(labels), crop_size, truncated,
                      config.model.cell_crop_pixels, np.concatenate(backgrounds) if optical else None,
                      np.concatenate(attributes), np.concatenate(box_pixels),
                      min(int(round(shift_fraction * crop_size)), shift))
  if not len(pool.labels):
    raise ValueError(f'cell_crop_batch_size={config.cell_crop_batch_size}: the {split} split has no annotated cell')
  pool.draw_probabilities = class_balanced_probabilities(pool.labels, config.cell_crop_class_balance)
  logging.info('cell crop pool: %d cells of %s (%d left out: fields with more than max_objects=%d cells)',
               len(pool.labels), split, truncated, config.max_objects)
  return pool


def class_balanced_probabilities(labels, balance):
  """[N] the probability of drawing each cell: proportional to (its class's share of `labels`) ** -balance; None
  for 0 (every cell alike)."""
  if not 0 <= balance <= 1:
    raise ValueError(f'cell_crop_class_balance={balance}: expected 0 (the split\'s mix) to 1 (every class alike)')
  if not balance:
    return None
  counts = np.bincount(labels)
  weights = (counts[labels] / len(labels)) ** -float(balance)
  return weights / weights.sum()


def sample(pool: CellCropPool, step, seed, num_devices, per_device, augment=True, stream=0):
  """{'cell_crops': [D, n, S, S, 3] normalized as the model's input, 'cell_crop_labels': [D, n]} for `step`, and
  when the pool has them 'cell_crop_attributes' [D, n, A] and 'cell_crop_box_pixels' [D, n, 2]; another `stream`
  draws other crops for the same step (the training steps draw stream 0)."""
  rng = np.random.default_rng([seed, jax.process_index(), step] + ([stream] if stream else []))
  count = num_devices * per_device
  if pool.draw_probabilities is None:
    index = rng.integers(0, len(pool.labels), count)
  else:
    index = rng.choice(len(pool.labels), count, p=pool.draw_probabilities)
  shift, size = pool.shift, pool.crop_size
  max_shift = shift if pool.max_shift is None else pool.max_shift
  dy, dx = (rng.integers(shift - max_shift, shift + max_shift + 1, (2, count)) if augment
            else np.full((2, count), shift))
  rows = dy[:, None] + np.arange(size)  # [n, S]
  cols = dx[:, None] + np.arange(size)
  crops = pool.crops[index[:, None, None], rows[:, :, None], cols[:, None, :]].astype(np.float32) / 255.0
  optical = pool.pixels == 'optical_density'
  background = pool.background[index] if optical else None
  if augment:
    flip_h, flip_v = rng.random((2, count)) < 0.5
    crops[flip_h] = crops[flip_h, :, ::-1]
    crops[flip_v] = crops[flip_v, ::-1]
    channel_scale = rng.uniform(1 - _CHANNEL_JITTER, 1 + _CHANNEL_JITTER, (count, 3))
    crops *= channel_scale[:, None, None]
    if optical:  # the crop and its background scaled alike: the jitter leaves the density as it was
      background = background * channel_scale
  if optical:
    crops = optical_density.encoder_input(crops, background)
  else:
    crops = (np.clip(crops, 0, 1) - input_pipeline.IMAGENET_MEAN) / input_pipeline.IMAGENET_STD
  drawn = {'cell_crops': crops.astype(np.float32).reshape((num_devices, per_device, size, size, 3)),
           'cell_crop_labels': pool.labels[index].reshape(num_devices, per_device)}
  if pool.attributes is not None:
    drawn['cell_crop_attributes'] = pool.attributes[index].reshape(num_devices, per_device, -1)
    drawn['cell_crop_box_pixels'] = pool.box_pixels[index].reshape(num_devices, per_device, 2)
  return drawn


def with_crops(batches, pool, start_step, seed, num_devices, per_device, augment=True):
  """The host batches of `batches` (from step `start_step` on), each with its step's crops."""
  for step, batch in enumerate(batches, start_step):
    yield {**batch, **sample(pool, step, seed, num_devices, per_device, augment)}
