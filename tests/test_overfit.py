"""Learning: a tiny detector overfits two synthetic fields, classes, boxes and attributes."""

import functools

import jax
import numpy as np
import pytest

from configs import synthetic_demo
from lld_jax import evaluate
from lld_jax import input_pipeline
from lld_jax import metrics as metrics_lib
from lld_jax import postprocess
from lld_jax import sharding
from lld_jax import train_step
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
  step = jax.pmap(functools.partial(train_step.train_step, model=model, tx=tx, config=config),
                  axis_name=train_step.AXIS, devices=device)
  replicated = sharding.replicate(state, device)
  batch_on_device = sharding.shard(batch, device)
  for _ in range(STEPS):
    replicated, metrics = step(replicated, batch_on_device)
  final = sharding.unreplicate(replicated)
  outputs = jax.jit(functools.partial(train_step.predict_step, model=model))(
      train_step.model_variables(final, use_ema=False), {k: batch[k][0] for k in ('image', 'image_mask')})
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
