"""The input pipeline: fixed shapes, boxes and annotation mask moved with the pixels, determinism, and no image
lost in evaluation."""

import json

import ml_collections
import numpy as np
import pytest
import tensorflow as tf

from lld_jax import cell_crops
from lld_jax import input_pipeline
from lld_jax import train_step
from tfds_lld import lld_format
from tfds_lld import synthetic

IMAGE_SIZE = 64


def _config(augment=True, per_device_batch=2):
  return ml_collections.ConfigDict(dict(
      image_size=IMAGE_SIZE, max_objects=4, per_device_batch_size=per_device_batch, shuffle_buffer=8,
      augment=dict(enabled=augment, vertical_flip=1.0, min_scale=0.6, max_scale=1.6, colour=0.0)))


def _example(height=120, width=90, box=(20, 30, 60, 90)):
  """An image that is dark except for a bright rectangle at `box` (x1, y1, x2, y2 pixels), labelled there, with
  the annotation mask set exactly on that rectangle."""
  x1, y1, x2, y2 = box
  image = np.zeros((height, width, 3), np.uint8)
  image[y1:y2, x1:x2] = 255
  mask = np.zeros((height, width, 1), np.uint8)
  mask[y1:y2, x1:x2] = 1
  bbox = np.array([[y1 / height, x1 / width, y2 / height, x2 / width]], np.float32)
  return {'image': tf.constant(image), 'annotation_mask': tf.constant(mask),
          'objects': {'bbox': tf.constant(bbox), 'label': tf.constant([3], tf.int64),
                      'attributes': tf.constant([[0, 1, 0, 1, 0, 1, 0]], tf.int32)}}


def _bright_box(image):
  """Normalized xyxy box of the bright pixels of a preprocessed image."""
  pixels = image * np.array(input_pipeline.IMAGENET_STD) + np.array(input_pipeline.IMAGENET_MEAN)
  ys, xs = np.nonzero(pixels.mean(-1) > 0.5)
  return np.array([xs.min(), ys.min(), xs.max() + 1, ys.max() + 1]) / IMAGE_SIZE


@pytest.mark.parametrize('counter', range(12))
def test_boxes_and_mask_follow_the_pixels_under_augmentation(counter):
  out = input_pipeline.preprocess(_example(), tf.constant(counter, tf.int64), image_size=IMAGE_SIZE,
                                  max_objects=4, train=True, seed=3, augment=_config().augment)
  out = {k: v.numpy() for k, v in out.items()}
  if out['weight'][0] == 0:
    # The crop cut the cell to under half its area: it is no target, and no longer marked as annotated.
    assert out['annotation_mask'].sum() == 0
    return
  cx, cy, w, h = out['boxes'][0]
  target = np.array([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2])
  np.testing.assert_allclose(_bright_box(out['image']), target, atol=2.5 / IMAGE_SIZE)
  # The stride-8 annotation mask is on where the box is, and off far from it.
  rows, cols = np.nonzero(out['annotation_mask'] > 0)
  stride = input_pipeline.MASK_STRIDE / IMAGE_SIZE
  assert cols.min() * stride <= target[0] + stride and (cols.max() + 1) * stride >= target[2] - stride
  assert rows.min() * stride <= target[1] + stride and (rows.max() + 1) * stride >= target[3] - stride
  assert out['labels'][0] == 3 and list(out['attributes'][0]) == [0, 1, 0, 1, 0, 1, 0]
  assert np.all(out['attributes'][1:] == -1) and np.all(out['weight'][1:] == 0)


def test_evaluation_resize_keeps_aspect_and_marks_padding():
  out = input_pipeline.preprocess(_example(height=120, width=60, box=(10, 20, 40, 80)), tf.constant(0, tf.int64),
                                  image_size=IMAGE_SIZE, max_objects=4, train=False, seed=0,
                                  augment=_config().augment)
  scale = float(out['scale'])
  assert scale == pytest.approx(IMAGE_SIZE / 120)
  mask = out['image_mask'].numpy()
  assert mask[:, :32].all() and not mask[:, 32:].any()  # 60 px wide at half scale
  cx, cy, w, h = out['boxes'].numpy()[0]
  np.testing.assert_allclose([cx - w / 2, cy - h / 2, cx + w / 2, cy + h / 2],
                             np.array([10, 20, 40, 80]) * scale / IMAGE_SIZE, atol=1e-6)


@pytest.fixture(scope='module')
def root(tmp_path_factory):
  root = tmp_path_factory.mktemp('pipeline')
  synthetic.generate(str(root / 'download'), 'coco', subsets=('H_100x_C1',), patients=3, images_per_patient=3,
                     seed=2)
  return root


@pytest.fixture(scope='module')
def builder(root):
  return input_pipeline.load_builder('lld', 'full', str(root / 'tfds'), str(root / 'download'))


def test_train_batches_have_fixed_shapes_and_are_deterministic(builder):
  config = _config()
  take = lambda seed: list(input_pipeline.train_dataset(builder, 'train', config, 2, seed).take(2)
                           .as_numpy_iterator())
  first, again, other = take(0), take(0), take(1)
  batch = first[0]
  assert batch['image'].shape == (2, 2, IMAGE_SIZE, IMAGE_SIZE, 3)
  assert batch['boxes'].shape == (2, 2, 4, 4) and batch['labels'].shape == (2, 2, 4)
  assert batch['attributes'].shape == (2, 2, 4, 7)
  size = IMAGE_SIZE // input_pipeline.MASK_STRIDE
  assert batch['annotation_mask'].shape == (2, 2, size, size)
  for a, b in zip(first, again):
    for key in a:
      np.testing.assert_array_equal(a[key], b[key], err_msg=key)
  assert not np.array_equal(first[0]['image'], other[0]['image'])


def test_random_batch_of_the_benchmarks_has_the_pipelines_format(builder):
  """The GPU benchmark's random batches (no TensorFlow there) stand for real ones: what the train step reads has the
  same shapes and dtypes (the real batch also carries what evaluation reads: original size, index)."""
  config = _config()
  config.cell_crop_batch_size = 3
  config.model = ml_collections.ConfigDict({'cell_crop_size': 8})
  real = next(input_pipeline.train_dataset(builder, 'train', config, 2, 0).as_numpy_iterator())
  # The trainer adds the true-cell crops (lld_jax.cell_crops) to each batch.
  pool = cell_crops.CellCropPool(np.zeros((5, 10, 10, 3), np.uint8), np.arange(5, dtype=np.int32), 8, 0,
                                 attributes=np.zeros((5, lld_format.NUM_ATTRIBUTES), np.int32),
                                 box_pixels=np.ones((5, 2), np.float32))
  real.update(cell_crops.sample(pool, 0, 0, 2, config.cell_crop_batch_size))
  random = train_step.random_batch(config, 2, lld_format.NUM_CLASSES)
  read = {'image', 'scale', 'boxes', 'labels', 'annotation_mask', 'cell_crops'}
  assert set(random) <= set(real) and read <= set(random)
  for key in random:
    assert (random[key].shape, random[key].dtype) == (real[key].shape, real[key].dtype), key


def test_resumed_stream_continues_where_it_stopped(builder):
  config = _config()
  straight = list(input_pipeline.train_dataset(builder, 'train', config, 2, 0).take(3).as_numpy_iterator())
  resumed = list(input_pipeline.train_dataset(builder, 'train', config, 2, 0, start_batch=2)
                 .take(1).as_numpy_iterator())
  np.testing.assert_array_equal(straight[2]['image'], resumed[0]['image'])


def test_evaluation_keeps_every_image(builder):
  config = _config(augment=False)
  num_examples = builder.info.splits['train'].num_examples
  assert num_examples % 4 != 0, 'the split must not fill whole batches for this test'
  batches = list(input_pipeline.eval_dataset(builder, 'train', config, 2).as_numpy_iterator())
  valid = np.concatenate([b['example_valid'].ravel() for b in batches])
  indices = np.concatenate([b['index'].ravel() for b in batches])[valid]
  assert valid.sum() == num_examples
  assert sorted(indices.tolist()) == list(range(num_examples))


def test_attribute_counts_equal_the_annotation_files(root, builder):
  with open(root / 'download' / 'H_100x_C1' / 'json_labels' / 'train.json') as f:
    annotations = json.load(f)['annotations']
  expected = np.zeros((lld_format.NUM_ATTRIBUTES, max(lld_format.NUM_ATTRIBUTE_VALUES)), np.int64)
  for annotation in annotations:
    for a, name in enumerate(lld_format.ATTRIBUTE_NAMES):
      value = next(annotation[k] for k in lld_format.COCO_ATTRIBUTE_KEYS[name] if k in annotation)
      if value != lld_format.COCO_NOT_APPLICABLE:
        expected[a, value] += 1
  counts = input_pipeline.count_attribute_values(builder, 'train')
  assert expected.sum() > 0 and (expected[:, 1] > 0).all()
  np.testing.assert_array_equal(counts, expected)
