"""Learning: a tiny detector overfits two synthetic fields, classes, boxes and attributes."""

import functools

import jax
import numpy as np
import pytest

from configs import synthetic_demo
from lld_jax import cell_crops
from lld_jax import evaluate
from lld_jax import input_pipeline
from lld_jax import metrics as metrics_lib
from lld_jax import optical_density
from lld_jax import postprocess
from lld_jax import sharding
from lld_jax import train_step
from lld_jax.models import detector
from tfds_lld import lld_format
from tfds_lld import synthetic

STEPS = 300


def _config():
  c = synthetic_demo.get_config()
  c.image_size = 128
  c.max_objects = 8
  c.per_device_batch_size = 2
  c.total_steps = STEPS
  c.augment.enabled = False
  c.model.backbone_width = 16
  c.model.hidden_dim = 64
  c.model.num_heads = 4
  c.model.ffn_dim = 128
  c.model.num_decoder_layers = 2
  c.model.num_queries = 12
  c.model.denoising_groups = 2
  c.model.roi_size = 5
  c.optimizer.learning_rate = 1e-3
  c.optimizer.warmup_steps = 20
  c.optimizer.ema_decay = 0.0
  c.optimizer.grad_clip = 1.0
  return c


@pytest.fixture(scope='module')
def two_images(tmp_path_factory):
  root = tmp_path_factory.mktemp('overfit')
  synthetic.generate(str(root / 'download'), 'coco', subsets=('H_100x_C1',), patients=2, images_per_patient=1,
                     seed=5, test_fraction=0.5)
  builder = input_pipeline.load_builder('lld', 'full', str(root / 'tfds'), str(root / 'download'))
  return builder


def test_tiny_model_overfits_two_images(two_images):
  builder = two_images
  config = _config()
  # Both images in one batch, no augmentation: the eval pipeline gives exactly that.
  single = config.copy_and_resolve_references()
  single.per_device_batch_size = 1
  assert builder.info.splits['train'].num_examples == builder.info.splits['test'].num_examples == 1
  halves = [next(input_pipeline.eval_dataset(builder, s, single, 1).as_numpy_iterator()) for s in ('train', 'test')]
  batch = {k: np.concatenate([halves[0][k], halves[1][k]], axis=1) for k in halves[0]}  # [1 device, 2, ...]
  model = train_step.create_model(config, lld_format.NUM_CLASSES)
  state, tx = train_step.create_train_state(model, config, jax.random.PRNGKey(0))
  device = jax.local_devices()[:1]
  replicated = sharding.replicate(state, device)
  batch_on_device = sharding.shard(batch, device)
  # Unlike the suite's other programs (conftest: XLA level 0, for short runs where compiling dominates), this one
  # runs 300 steps: full optimization compiles 12 s longer and halves the step time.
  step = jax.pmap(functools.partial(train_step.train_step, model=model, tx=tx, config=config),
                  axis_name=train_step.AXIS, devices=device).lower(replicated, batch_on_device).compile(
                      compiler_options={'xla_backend_optimization_level': 2})
  for _ in range(STEPS):
    replicated, metrics = step(replicated, batch_on_device)
  final = sharding.unreplicate(replicated)
  outputs = jax.jit(functools.partial(train_step.predict_step, model=model))(
      train_step.model_variables(final, use_ema=False), {k: batch[k][0] for k in train_step.PREDICT_INPUTS})
  outputs = jax.device_get(outputs)
  truths = evaluate.ground_truth(builder, 'train') + evaluate.ground_truth(builder, 'test')
  predictions = []
  for i, truth in enumerate(truths):
    found = postprocess.to_detections(outputs['logits'][i], outputs['boxes'][i], outputs['attribute_logits'][i],
                                      config.image_size, float(batch['scale'][0, i]),
                                      batch['original_size'][0, i], max_detections=12)
    truths[i] = metrics_lib.ImageTruth(**{**truth.__dict__, 'image_id': str(i)})
    predictions.append(metrics_lib.ImagePrediction(str(i), found.boxes, found.scores, found.labels,
                                                   found.attributes))
  result = metrics_lib.evaluate(truths, predictions, lld_format.CLASS_NAMES, lld_format.ATTRIBUTE_NAMES,
                                attribute_score_threshold=0.3)
  assert result['mAP50'] > 0.9, result['mAP50']
  assert result['attributes/mean_f1_strict'] > 0.9, result['attributes/mean_f1_strict']


@pytest.mark.parametrize('pixels', detector.CELL_CROP_PIXELS)
def test_crop_pool_holds_each_training_cell_as_the_model_reads_it(two_images, pixels):
  """The crop stream's pool (lld_jax.cell_crops) holds every cell of the split; cut to its centre, each is what
  the model's cell encoder itself reads at the cell's true box (detector.cell_encoder_crops, as Detector calls
  it), up to the rounding of its uint8 pixels."""
  builder = two_images
  config = _config()
  config.per_device_batch_size = 1
  config.model.cell_crop_pixels = pixels
  pool = cell_crops.build_pool(builder, 'train', config)
  batch = next(input_pipeline.eval_dataset(builder, 'train', config, 1).as_numpy_iterator())
  batch = {k: v[0] for k, v in batch.items()}
  num_cells = int(batch['weight'].sum())
  assert len(pool.labels) == num_cells > 0 and pool.num_truncated == 0
  assert pool.max_shift == round(config.augment.cell_crop_shift * config.model.cell_crop_size)
  np.testing.assert_array_equal(pool.labels, batch['labels'][0, :num_cells])
  read_by_model = np.asarray(detector.cell_encoder_crops(batch['image'], batch['boxes'],
                                                         config.model.cell_crop_size, pixels))
  drawn = cell_crops.sample(pool, 0, 0, 1, 64, augment=False)
  if pixels == 'intensity':
    step = 1 / 255 / min(input_pipeline.IMAGENET_STD)  # one uint8 level, normalized
  else:  # one uint8 level of the darkest pixel, in optical density, as the encoder reads it
    step = 1 / 255 / (pool.crops.min() / 255) / optical_density._ENCODER_SCALE
  for crop, label in zip(drawn['cell_crops'][0], drawn['cell_crop_labels'][0]):
    same_label = np.flatnonzero(pool.labels == label)
    assert np.abs(read_by_model[0, same_label] - crop).max(axis=(1, 2, 3)).min() <= step / 2 + 1e-5
