r"""How far can classification go when the boxes are perfect? A ceiling for a dataset's detection metrics.

  python scripts/oracle_boxes.py --config=configs/synthetic_demo.py --steps=600 \
      --config.dataset.manual_dir=demo_run/download --config.dataset.data_dir=demo_run/tfds

Crops every ground-truth cell of the train split (from the image resized as the config's model sees it, with
`--source_size` to change that) and trains a CNN on the crops alone: class and attribute cross-entropy. It then
scores the eval split with the same metrics as `lld_jax.evaluate`, giving each true box one detection per class
(score = that class's probability, attributes = the most likely values). So the boxes are exact and only the
classifier can be wrong: the mAP50 and attribute F1 it reaches bound what a detector can expect from the same
pixels and a similar training budget. Writes the metrics as JSON to `--out` (default: stdout only).
`--trained_attributes` and `--class_loss=false` leave heads out of the loss, to see what learning one attribute
alone reaches against learning it with the others (session 24: vacuoles 0.86 alone, 0.37 with the rest);
`--attribute_branch_widths` gives each attribute its own branch of the CNN (session 25: vacuoles 0.66-0.70).
"""

import functools
import json
import time

from absl import app
from absl import flags
import flax.linen as nn
import jax
import jax.numpy as jnp
from ml_collections import config_flags
import numpy as np
import optax
import tensorflow as tf
import tensorflow_datasets as tfds

from lld_jax import evaluate
from lld_jax import input_pipeline
from lld_jax import metrics as metrics_lib
from lld_jax import optical_density
from lld_jax import postprocess
from lld_jax.models import detector
from tfds_lld import lld_format

MARGIN = 0.1


def cell_crops(builder, split, source_size, crop_size, pixels='intensity'):
  """Crops [N, S, S, 3] in [0, 1] of every annotated cell (`pixels='optical_density'`: their optical density
  against the field's background, lld_jax.optical_density), with labels [N] and attributes [N, A]."""
  crop = jax.jit(functools.partial(detector.crop_cells, crop_size=crop_size, margin=MARGIN))
  background_at = jax.jit(optical_density.background_at)
  crops, labels, attributes = [], [], []
  for example in tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)):
    image = example['image']
    height, width = image.shape[:2]
    scale = source_size / max(height, width)
    # TensorFlow's resize, as the input pipeline's (and no recompilation per image size).
    resized = tf.image.resize(image, (max(round(height * scale), 1), max(round(width * scale), 1)),
                              antialias=True).numpy() / 255.0
    ymin, xmin, ymax, xmax = np.asarray(example['objects']['bbox'], np.float32).reshape(-1, 4).T
    if not len(ymin):
      continue
    boxes = np.stack([(xmin + xmax) / 2, (ymin + ymax) / 2, xmax - xmin, ymax - ymin], -1)
    cut = crop(resized[None], boxes[None])
    if pixels == 'optical_density':
      cut = optical_density.optical_density(cut, background_at(resized[None], boxes[None, :, :2])[:, :, None, None])
    crops.append(np.asarray(cut)[0])
    labels.append(example['objects']['label'])
    attributes.append(example['objects']['attributes'].reshape(len(boxes), -1))
  return np.concatenate(crops), np.concatenate(labels), np.concatenate(attributes)


class CropClassifier(nn.Module):
  """Class and attribute logits from one CNN; with `branch_widths`, each attribute has its own branch of them
  that goes on from the CNN's feature map after `branch_stage` convolutions (0: from the pixels, a CNN of its
  own), as `detector.CellAttributeClassifier`'s branches do."""
  num_classes: int
  attribute_values: tuple[int, ...]
  widths: tuple[int, ...]  # one 3x3 convolution each, the first at stride 1, the others at stride 2
  branch_widths: tuple[int, ...] = ()
  branch_stage: int = 0

  @nn.compact
  def __call__(self, crops):
    x = stage = crops
    for i, width in enumerate(self.widths):
      stride = 1 if i == 0 else 2
      x = nn.silu(nn.GroupNorm(8)(nn.Conv(width, (3, 3), (stride, stride))(x)))
      if i + 1 == self.branch_stage:
        stage = x
    x = x.mean((1, 2))
    num_attributes, max_values = len(self.attribute_values), max(self.attribute_values)
    if not self.branch_widths:
      attributes = nn.Dense(num_attributes * max_values)(x).reshape(-1, num_attributes, max_values)
      return nn.Dense(self.num_classes)(x), attributes
    attributes = []
    for _ in range(num_attributes):
      y = stage
      for i, width in enumerate(self.branch_widths):
        stride = 1 if i + self.branch_stage == 0 else 2
        y = nn.silu(nn.GroupNorm(2)(nn.Conv(width, (3, 3), (stride, stride))(y)))
      attributes.append(nn.Dense(max_values)(y.mean((1, 2))))
    return nn.Dense(self.num_classes)(x), jnp.stack(attributes, 1)


def _stain_jitter(x, rng, kind):
  """'channel': each colour channel scaled by 0.85-1.15. 'film': brightness, contrast and saturation as the
  input pipeline's colour jitter at strength 1 (augment.colour). 'stain': the optical density (the amount
  of stain; the white background keeps its colour) scaled by 0.8-1.2 and each channel's by a further
  exp(N(0, 0.08)), the usual stain augmentation of histology. 'none': no colour augmentation."""
  n = len(x)
  if kind == 'none':
    return x
  if kind == 'stain':
    density = -np.log(np.clip(x, 1 / 255, 1.0))
    scale = rng.uniform(0.8, 1.2, (n, 1, 1, 1)) * np.exp(rng.normal(0.0, 0.08, (n, 1, 1, 3)))
    return np.exp(-density * scale)
  if kind == 'channel':
    return x * rng.uniform(0.85, 1.15, (n, 1, 1, 3))
  x = x + rng.uniform(-0.2, 0.2, (n, 1, 1, 1))
  mean = x.mean((1, 2, 3), keepdims=True)
  x = (x - mean) * rng.uniform(0.7, 1.3, (n, 1, 1, 1)) + mean
  grey = x.mean(-1, keepdims=True)
  return np.clip((x - grey) * rng.uniform(0.7, 1.3, (n, 1, 1, 1)) + grey, 0.0, 1.0)


def train_classifier(crops, labels, attributes, num_classes, steps, batch_size, seed, learning_rate, widths,
                     stain_jitter, class_loss=True, trained_attributes=lld_format.ATTRIBUTE_NAMES, branch_widths=(),
                     branch_stage=0):
  """A CNN trained on the crops; `class_loss` and `trained_attributes` choose what its loss holds (the heads
  left out stay as initialized); `branch_widths` and `branch_stage` as `CropClassifier`'s."""
  values = lld_format.NUM_ATTRIBUTE_VALUES
  trained = jnp.asarray([name in trained_attributes for name in lld_format.ATTRIBUTE_NAMES])
  model = CropClassifier(num_classes, values, tuple(widths), tuple(branch_widths), branch_stage)
  mean, std = crops.mean((0, 1, 2)), crops.std((0, 1, 2)) + 1e-6
  params = model.init(jax.random.PRNGKey(seed), jnp.zeros((1,) + crops.shape[1:]))
  tx = optax.adamw(optax.cosine_decay_schedule(learning_rate, steps), weight_decay=1e-4)
  opt_state = tx.init(params)

  def loss_fn(p, x, c, a):
    class_logits, attribute_logits = model.apply(p, (x - mean) / std)
    attribute_logits = detector.allowed_values_only(attribute_logits, values)
    scored = (a >= 0) & (a < jnp.asarray(values)) & trained
    per_attribute = optax.softmax_cross_entropy_with_integer_labels(attribute_logits, jnp.where(scored, a, 0))
    class_term = optax.softmax_cross_entropy_with_integer_labels(class_logits, c).mean() if class_loss else 0.0
    return class_term + (per_attribute * scored).sum() / jnp.maximum(scored.sum(), 1)

  @jax.jit
  def step(p, o, x, c, a):
    loss, grads = jax.value_and_grad(loss_fn)(p, x, c, a)
    updates, o = tx.update(grads, o, p)
    return optax.apply_updates(p, updates), o, loss

  rng = np.random.default_rng(seed)
  start = time.time()
  for i in range(steps):
    index = rng.integers(0, len(crops), batch_size)
    x = crops[index]
    x = np.where((rng.random(batch_size) < 0.5)[:, None, None, None], x[:, :, ::-1], x)
    x = np.where((rng.random(batch_size) < 0.5)[:, None, None, None], x[:, ::-1], x)
    x = _stain_jitter(x, rng, stain_jitter)  # stains vary
    params, opt_state, loss = step(params, opt_state, x, labels[index], attributes[index])
    if i % 100 == 0 or i == steps - 1:
      print(f'step {i}: loss {float(loss):.3f} ({time.time() - start:.0f} s)', flush=True)

  @jax.jit
  def predict(x):
    class_logits, attribute_logits = model.apply(params, (x - mean) / std)
    return jax.nn.softmax(class_logits), detector.allowed_values_only(attribute_logits, values)
  return predict


def oracle_predictions(truths, predict, builder, split, source_size, crop_size, attribute_offsets=None,
                       pixels='intensity'):
  """Detections at every true box, and the classifier's top-1 accuracy on them. The attribute values are decided
  as `lld_jax.evaluate` decides them (`attribute_offsets`: `evaluate.attribute_logit_offsets`)."""
  crops, labels, _ = cell_crops(builder, split, source_size, crop_size, pixels)
  probabilities, attribute_logits = (np.asarray(x, np.float64) for x in predict(crops))
  attributes = postprocess.attribute_values(attribute_logits, attribute_offsets)
  predictions, start = [], 0
  for truth in truths:
    n = len(truth.boxes)
    k = probabilities.shape[1]
    predictions.append(metrics_lib.ImagePrediction(
        image_id=truth.image_id, boxes=np.repeat(truth.boxes, k, 0), scores=probabilities[start:start + n].ravel(),
        labels=np.tile(np.arange(k), n), attributes=np.repeat(attributes[start:start + n], k, 0)))
    start += n
  return predictions, float((probabilities.argmax(-1) == labels).mean())


_CONFIG = config_flags.DEFINE_config_file('config', None, 'config file, e.g. configs/synthetic_demo.py',
                                          lock_config=True)
_STEPS = flags.DEFINE_integer('steps', 600, 'classifier training steps')
_BATCH = flags.DEFINE_integer('batch_size', 64, 'crops per step')
_SOURCE = flags.DEFINE_integer('source_size', 0, 'image size the crops come from (0: the config\'s image_size)')
_SEED = flags.DEFINE_integer('seed', 0, 'seed')
_LEARNING_RATE = flags.DEFINE_float('learning_rate', 2e-3, 'peak learning rate (cosine decay)')
_CROP_SIZE = flags.DEFINE_integer('crop_size', 48, 'crop side in pixels')
_WIDTHS = flags.DEFINE_list('widths', ['32', '64', '96', '128', '160'], 'CNN widths, one 3x3 conv each')
_STAIN_JITTER = flags.DEFINE_enum('stain_jitter', 'channel', ['channel', 'film', 'stain', 'none'],
                                   'colour augmentation')
_PIXELS = flags.DEFINE_enum('pixels', 'intensity', list(detector.CELL_CROP_PIXELS),
                            'what the CNN reads: the crop\'s intensities, or its optical density against the field\'s '
                            'background (then a channel scaling is no augmentation: use --stain_jitter=none)')
_CLASS_LOSS = flags.DEFINE_bool('class_loss', True, 'train the class head (off: the attributes alone)')
_TRAINED_ATTRIBUTES = flags.DEFINE_list('trained_attributes', list(lld_format.ATTRIBUTE_NAMES),
                                        'the attributes whose cross-entropy is in the loss (the others are scored '
                                        'untrained)')
_BRANCH_WIDTHS = flags.DEFINE_list('attribute_branch_widths', [],
                                    'each attribute in its own branch of the CNN, of these widths (at stride 2)')
_BRANCH_STAGE = flags.DEFINE_integer('attribute_branch_stage', 0, 'the branches go on from the CNN\'s feature map '
                                     'after this many convolutions (0: from the pixels, a CNN for each attribute)')
_OUT = flags.DEFINE_string('out', '', 'write the summary JSON here')


def main(argv):
  del argv
  config = _CONFIG.value
  unknown = set(_TRAINED_ATTRIBUTES.value) - set(lld_format.ATTRIBUTE_NAMES)
  if unknown:
    raise ValueError(f'--trained_attributes: unknown {sorted(unknown)}; expected some of {lld_format.ATTRIBUTE_NAMES}')
  source_size = _SOURCE.value or config.image_size
  d = config.dataset
  builder = input_pipeline.load_builder(d.name, d.config, d.data_dir or None, d.manual_dir or None)
  info = input_pipeline.dataset_info(builder)
  crops, labels, attributes = cell_crops(builder, d.train_split, source_size, _CROP_SIZE.value, _PIXELS.value)
  print(f'{len(crops)} training cells; per class {np.bincount(labels, minlength=info.num_classes).tolist()}',
        flush=True)
  predict = train_classifier(crops, labels, attributes, info.num_classes, _STEPS.value, _BATCH.value, _SEED.value,
                             _LEARNING_RATE.value, [int(w) for w in _WIDTHS.value], _STAIN_JITTER.value,
                             _CLASS_LOSS.value, tuple(_TRAINED_ATTRIBUTES.value),
                             [int(w) for w in _BRANCH_WIDTHS.value], _BRANCH_STAGE.value)
  truths = evaluate.ground_truth(builder, d.eval_split)
  offsets = evaluate.attribute_logit_offsets(config, input_pipeline.count_attribute_values(builder, d.train_split))
  predictions, accuracy = oracle_predictions(truths, predict, builder, d.eval_split, source_size, _CROP_SIZE.value,
                                             offsets, _PIXELS.value)
  result = metrics_lib.evaluate(truths, predictions, info.class_names, lld_format.ATTRIBUTE_NAMES,
                                max_dets=(1, 10, 100 * info.num_classes))
  keys = ['mAP50', 'mAP50_95', 'attributes/mean_f1_strict', 'attributes/mean_f1_paper']
  keys += sorted(k for k in result if k.startswith('per_class/') and k.endswith('/AP50'))
  keys += sorted(k for k in result if k.startswith('attributes/strict/') and k.split('/')[-1] in (
      'f1', 'precision', 'recall'))
  summary = {'source_size': source_size, 'steps': _STEPS.value, 'batch_size': _BATCH.value,
             'learning_rate': _LEARNING_RATE.value, 'crop_size': _CROP_SIZE.value, 'widths': _WIDTHS.value,
             'stain_jitter': _STAIN_JITTER.value, 'pixels': _PIXELS.value, 'class_loss': _CLASS_LOSS.value,
             'trained_attributes': _TRAINED_ATTRIBUTES.value, 'attribute_branch_widths': _BRANCH_WIDTHS.value,
             'attribute_branch_stage': _BRANCH_STAGE.value,
             'attribute_logit_adjustment': evaluate.attribute_logit_adjustment(config),
             'class_accuracy': accuracy, **{k: result[k] for k in keys}}
  print(json.dumps(summary, indent=1))
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(summary, f, indent=1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['config'])
  app.run(main)
