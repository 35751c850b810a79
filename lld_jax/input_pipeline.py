"""From a TFDS split to per-device batches [devices, per_device_batch, ...] for pmap.

Every example is resized to fit a square canvas of `image_size` keeping its aspect ratio, and padded at the
bottom and right; `image_mask` marks the real pixels. Boxes are normalized cxcywh relative to the canvas.
Augmentations (flips, large-scale jitter with a random crop, colour jitter) move the boxes and the annotation
mask together. A cell cut by the crop to less than half its area is removed from the targets *and* from the
annotation mask, so the model is never told that a visible part of a cell is background.

Randomness is stateless, seeded by (seed, example counter), so a pipeline is reproducible from its seed.
Evaluation batches keep every image: the last batch is padded and `example_valid` marks the real ones.
"""

import dataclasses
import os

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from lld_jax.matching import MASK_STRIDE
from lld_jax.models.resnet import IMAGENET_MEAN
from lld_jax.models.resnet import IMAGENET_STD
from tfds_lld import lld_format

tf.config.set_visible_devices([], 'GPU')  # TensorFlow only feeds data; the accelerators belong to JAX.


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  num_classes: int
  class_names: tuple[str, ...]
  num_examples: dict[str, int]


def load_builder(name, config, data_dir=None, manual_dir=None):
  """The TFDS builder for `name/config`, built from `manual_dir` first if it is not prepared yet."""
  import tfds_lld.lld  # noqa: F401  (registers the builders)
  import tfds_lld.txl_pbc  # noqa: F401
  builder = tfds.builder(f'{name}/{config}', data_dir=data_dir)
  if not builder.is_prepared():
    if not manual_dir:
      raise FileNotFoundError(
          f'dataset {name}/{config} is not built in {builder.data_dir} and no dataset.manual_dir was given: '
          f'run `tfds build tfds_lld/{name} --config={config} --manual_dir=DIR` or set '
          f'--config.dataset.manual_dir to the folder holding the download')
    if not os.path.isdir(manual_dir):
      raise FileNotFoundError(f'dataset {name}/{config} is not built in {builder.data_dir}, and '
                              f'dataset.manual_dir={manual_dir} is not a folder: point it at the download')
    builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=manual_dir))
  return builder


def dataset_info(builder) -> DatasetInfo:
  label = builder.info.features['objects']['label']
  return DatasetInfo(label.num_classes, tuple(label.names),
                     {name: split.num_examples for name, split in builder.info.splits.items()})


def _stateless_seed(seed, counter, salt):
  return tf.stack([tf.cast(seed, tf.int64) * 1000003 + salt, tf.cast(counter, tf.int64)])


def _resize_and_place(image, mask, boxes_px, out_size, scale, offset):
  """Scales image [H, W, 3], annotation mask [H, W, 1] and pixel boxes by `scale`, then pastes the window that
  starts at `offset` (y, x) of the scaled image onto an out_size x out_size canvas."""
  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  new_h = tf.maximum(tf.cast(tf.round(height * scale), tf.int32), 1)
  new_w = tf.maximum(tf.cast(tf.round(width * scale), tf.int32), 1)
  image = tf.image.resize(tf.cast(image, tf.float32), [new_h, new_w], antialias=True)
  mask = tf.image.resize(tf.cast(mask, tf.float32), [new_h, new_w], method='nearest')
  oy, ox = offset[0], offset[1]
  crop_h = tf.minimum(new_h - oy, out_size)
  crop_w = tf.minimum(new_w - ox, out_size)
  image = image[oy:oy + crop_h, ox:ox + crop_w]
  mask = mask[oy:oy + crop_h, ox:ox + crop_w]
  valid = tf.ones([crop_h, crop_w, 1], tf.float32)
  pad = [[0, out_size - crop_h], [0, out_size - crop_w], [0, 0]]
  image, mask, valid = tf.pad(image, pad), tf.pad(mask, pad), tf.pad(valid, pad)
  sx = tf.cast(new_w, tf.float32) / width
  sy = tf.cast(new_h, tf.float32) / height
  shift = tf.cast(tf.stack([ox, oy, ox, oy]), tf.float32)
  boxes_px = boxes_px * tf.stack([sx, sy, sx, sy]) - shift
  window = tf.cast(tf.stack([crop_w, crop_h, crop_w, crop_h]), tf.float32)
  return image, mask[..., 0], valid[..., 0], boxes_px, window


def _cut_boxes(boxes_px, window, min_visible=0.5):
  """Clips boxes to the window [w, h, w, h]; returns clipped boxes and which keep enough of their area."""
  clipped = tf.clip_by_value(boxes_px, 0.0, window)
  area = lambda b: tf.maximum(b[:, 2] - b[:, 0], 0.0) * tf.maximum(b[:, 3] - b[:, 1], 0.0)
  keep = area(clipped) >= min_visible * tf.maximum(area(boxes_px), 1e-6)
  return clipped, keep


def _erase_boxes(mask, boxes_px):
  """Sets the annotation mask to 0 inside the given pixel boxes (cells we no longer supervise)."""
  height, width = tf.shape(mask)[0], tf.shape(mask)[1]
  ys = tf.cast(tf.range(height), tf.float32)[None, :, None] + 0.5
  xs = tf.cast(tf.range(width), tf.float32)[None, None, :] + 0.5
  b = boxes_px[:, :, None, None]
  inside = (xs >= b[:, 0]) & (xs <= b[:, 2]) & (ys >= b[:, 1]) & (ys <= b[:, 3])
  return mask * (1.0 - tf.cast(tf.reduce_any(inside, axis=0), tf.float32))


def _colour_jitter(image, seed, strength):
  """Brightness, contrast, saturation and hue jitter on a [0, 255] float image (stains vary by patient)."""
  image = image / 255.0
  seeds = [seed + i for i in range(4)]
  image = tf.image.stateless_random_brightness(image, 0.2 * strength, seeds[0])
  image = tf.image.stateless_random_contrast(image, 1 - 0.3 * strength, 1 + 0.3 * strength, seeds[1])
  image = tf.image.stateless_random_saturation(image, 1 - 0.3 * strength, 1 + 0.3 * strength, seeds[2])
  image = tf.image.stateless_random_hue(image, 0.04 * strength, seeds[3])
  return tf.clip_by_value(image, 0.0, 1.0) * 255.0


def preprocess(example, counter, *, image_size, max_objects, train, seed, augment):
  """One TFDS example -> fixed-shape model inputs and targets."""
  image = example['image']
  height = tf.cast(tf.shape(image)[0], tf.float32)
  width = tf.cast(tf.shape(image)[1], tf.float32)
  mask = tf.cast(example['annotation_mask'], tf.float32)
  objects = example['objects']
  ymin, xmin, ymax, xmax = tf.unstack(tf.reshape(objects['bbox'], [-1, 4]), axis=1)
  boxes_px = tf.stack([xmin * width, ymin * height, xmax * width, ymax * height], axis=1)
  labels = tf.cast(objects['label'], tf.int32)
  attributes = tf.cast(tf.reshape(objects['attributes'], [tf.shape(labels)[0], -1]), tf.int32)
  fit_scale = float(image_size) / tf.maximum(height, width)
  offset = tf.zeros([2], tf.int32)
  scale = fit_scale
  if train and augment.enabled:
    s = lambda salt: _stateless_seed(seed, counter, salt)
    flip_h = tf.random.stateless_uniform([], s(1)) < 0.5
    flip_v = tf.random.stateless_uniform([], s(2)) < 0.5 * augment.vertical_flip
    image = tf.cond(flip_h, lambda: image[:, ::-1], lambda: image)
    mask = tf.cond(flip_h, lambda: mask[:, ::-1], lambda: mask)
    boxes_px = tf.cond(flip_h, lambda: tf.stack(
        [width - boxes_px[:, 2], boxes_px[:, 1], width - boxes_px[:, 0], boxes_px[:, 3]], 1), lambda: boxes_px)
    image = tf.cond(flip_v, lambda: image[::-1], lambda: image)
    mask = tf.cond(flip_v, lambda: mask[::-1], lambda: mask)
    boxes_px = tf.cond(flip_v, lambda: tf.stack(
        [boxes_px[:, 0], height - boxes_px[:, 3], boxes_px[:, 2], height - boxes_px[:, 1]], 1), lambda: boxes_px)
    scale = fit_scale * tf.random.stateless_uniform([], s(3), augment.min_scale, augment.max_scale)
    scaled = tf.cast(tf.round(tf.stack([height, width]) * scale), tf.int32)
    room = tf.maximum(scaled - image_size, 0)
    offset = tf.cast(tf.floor(tf.random.stateless_uniform([2], s(4)) * tf.cast(room + 1, tf.float32)), tf.int32)
    offset = tf.minimum(offset, room)
  image, mask, valid, boxes_px, window = _resize_and_place(image, mask, boxes_px, image_size, scale, offset)
  clipped, keep = _cut_boxes(boxes_px, window)
  # A cell mostly cut away is neither a target nor background: unmark it in the annotation mask.
  mask = _erase_boxes(mask, tf.boolean_mask(clipped, ~keep))
  if train and augment.enabled and augment.colour > 0:
    image = _colour_jitter(image, _stateless_seed(seed, counter, 5), augment.colour)
  image = (image / 255.0 - IMAGENET_MEAN) / IMAGENET_STD
  boxes = tf.boolean_mask(clipped, keep) / float(image_size)
  labels = tf.boolean_mask(labels, keep)
  attributes = tf.boolean_mask(attributes, keep)
  num_objects = tf.shape(labels)[0]
  num_truncated = tf.maximum(num_objects - max_objects, 0)
  boxes, labels, attributes = boxes[:max_objects], labels[:max_objects], attributes[:max_objects]
  cxcywh = tf.stack([(boxes[:, 0] + boxes[:, 2]) / 2, (boxes[:, 1] + boxes[:, 3]) / 2,
                     boxes[:, 2] - boxes[:, 0], boxes[:, 3] - boxes[:, 1]], axis=1)
  pad = max_objects - tf.shape(labels)[0]
  mask_size = image_size // MASK_STRIDE
  # Anything annotated at a stride-8 cell counts (a cell centre lands in that cell).
  small_mask = tf.nn.max_pool2d(mask[None, :, :, None], MASK_STRIDE, MASK_STRIDE, 'VALID')[0, :, :, 0]
  return {
      'image': tf.ensure_shape(tf.cast(image, tf.float32), [image_size, image_size, 3]),
      'image_mask': tf.ensure_shape(valid, [image_size, image_size]),
      'boxes': tf.ensure_shape(tf.pad(cxcywh, [[0, pad], [0, 0]]), [max_objects, 4]),
      'labels': tf.ensure_shape(tf.pad(labels, [[0, pad]]), [max_objects]),
      'attributes': tf.pad(attributes, [[0, pad], [0, 0]], constant_values=-1),
      'weight': tf.ensure_shape(tf.pad(tf.ones_like(labels, tf.float32), [[0, pad]]), [max_objects]),
      'annotation_mask': tf.ensure_shape(small_mask, [mask_size, mask_size]),
      'num_truncated': num_truncated,
      'scale': tf.cast(scale, tf.float32),
      'original_size': tf.stack([height, width]),
      'index': tf.cast(counter, tf.int32),
      'example_valid': tf.constant(True),
  }


def _to_device_batches(ds, num_devices, per_device_batch):
  ds = ds.batch(per_device_batch, drop_remainder=True)
  ds = ds.batch(num_devices, drop_remainder=True)
  return ds


def _has_region(example):
  return tf.reduce_any(example['annotation_mask'] > 0)


def count_images_with_region(builder, split) -> tuple[int, int]:
  """(images with an annotated region, all images) of this process's share of `split`, without decoding images."""
  ds = builder.as_dataset(split=tfds.split_for_jax_process(split), decoders={'image': tfds.decode.SkipDecoding()})
  flags = ds.map(_has_region, num_parallel_calls=tf.data.AUTOTUNE)
  counts = flags.reduce((0, 0), lambda total, has: (total[0] + tf.cast(has, tf.int32), total[1] + 1))
  return int(counts[0]), int(counts[1])


def _without_pixels():
  """TFDS decoders that leave an example's image and annotation mask as encoded bytes."""
  return {'image': tfds.decode.SkipDecoding(), 'annotation_mask': tfds.decode.SkipDecoding()}


def count_attribute_values(builder, split) -> np.ndarray:
  """[A, V] how many annotated cells of the whole `split` have each value of each attribute (not-applicable values
  are not counted), read without decoding images or masks. Every process reads the whole split, so all get the
  same counts."""
  ds = builder.as_dataset(split=split, decoders=_without_pixels())
  num_attributes, num_values = lld_format.NUM_ATTRIBUTES, max(lld_format.NUM_ATTRIBUTE_VALUES)

  def per_example(example):
    values = tf.reshape(tf.cast(example['objects']['attributes'], tf.int32), [-1, num_attributes])
    return tf.reduce_sum(tf.one_hot(values, num_values, dtype=tf.int64), 0)  # -1 (not applicable): no count

  counts = ds.map(per_example, num_parallel_calls=tf.data.AUTOTUNE).reduce(
      tf.zeros([num_attributes, num_values], tf.int64), lambda total, count: total + count)
  return counts.numpy()


def count_classes_by_type(builder, split):
  """How many annotated cells of each class the `split`'s fields of each leukemia type hold, read without decoding
  images: (counts [T, K], the T type names, how many fields have no known type and were not counted)."""
  features = builder.info.features
  if 'leukemia_type' not in features:
    raise ValueError(f'{builder.name}: its fields carry no leukemia type')
  type_names = [t for t in features['leukemia_type'].names if t != 'unknown']
  num_classes = features['objects']['label'].num_classes
  counts = np.zeros((len(type_names), num_classes), np.int64)
  unknown = 0
  for example in builder.as_dataset(split=split, decoders=_without_pixels()).as_numpy_iterator():
    name = features['leukemia_type'].int2str(int(example['leukemia_type']))
    if name == 'unknown':
      unknown += 1
      continue
    np.add.at(counts[type_names.index(name)], example['objects']['label'].astype(np.int64), 1)
  return counts, tuple(type_names), unknown


def train_dataset(builder, split, config, num_devices, seed, start_batch=0,
                  skip_images_without_region=False) -> tf.data.Dataset:
  """Endless, shuffled, augmented batches [num_devices, per_device_batch, ...]; sharded per process.

  `start_batch` skips that many batches before any decoding work, so a resumed run sees the same stream.
  `skip_images_without_region` leaves out the images whose annotation mask is all zero (the caller counts them).
  """
  read_config = tfds.ReadConfig(shuffle_seed=seed, interleave_cycle_length=1)
  split = tfds.split_for_jax_process(split)
  ds = builder.as_dataset(split=split, shuffle_files=True, read_config=read_config)
  ds = ds.filter(_has_region) if skip_images_without_region else ds
  ds = ds.cache() if config.get('cache', True) else ds
  ds = ds.repeat().shuffle(config.get('shuffle_buffer', 512), seed=seed).enumerate()
  ds = ds.skip(start_batch * num_devices * config.per_device_batch_size)
  process_seed = seed + 7919 * jax.process_index()
  fn = lambda counter, example: preprocess(
      example, counter, image_size=config.image_size, max_objects=config.max_objects, train=True,
      seed=process_seed, augment=config.augment)
  ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  ds = _to_device_batches(ds, num_devices, config.per_device_batch_size)
  options = tf.data.Options()
  options.deterministic = True
  return ds.with_options(options).prefetch(tf.data.AUTOTUNE)


def eval_dataset(builder, split, config, num_devices) -> tf.data.Dataset:
  """Every example of the split, in order, padded to whole batches with `example_valid` = False."""
  ds = builder.as_dataset(split=split, shuffle_files=False)
  ds = ds.enumerate()
  fn = lambda counter, example: preprocess(
      example, counter, image_size=config.image_size, max_objects=config.max_objects, train=False, seed=0,
      augment=config.augment)
  ds = ds.map(fn, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  global_batch = num_devices * config.per_device_batch_size
  num_examples = builder.info.splits[split].num_examples
  padding = (-num_examples) % global_batch
  if padding:
    filler = ds.take(1).map(lambda x: {**x, 'example_valid': tf.constant(False)}).repeat(padding)
    ds = ds.concatenate(filler)
  return _to_device_batches(ds, num_devices, config.per_device_batch_size).prefetch(tf.data.AUTOTUNE)
