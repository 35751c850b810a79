r"""Evaluation: `python -m lld_jax.evaluate --workdir=DIR [--config=configs/NAME.py ...] [--split=test]`.

Restores the best checkpoint of DIR (else the latest), predicts on the split and writes
DIR/eval/<split>/metrics.json (COCO mAP via pycocotools, attribute metrics under the strict and the paper
protocol, per-domain mAP) with precision-recall, attribute-confusion and per-domain plots beside it, and the
scored detections in predictions.json. Without --config, the run's own DIR/config.json is used.
Images with an annotation mask are scored only inside it.
"""

import functools
import json
import os

from absl import app
from absl import flags
from absl import logging
import jax
from ml_collections import config_flags
import numpy as np
import tensorflow_datasets as tfds

from lld_jax import class_context
from lld_jax import input_pipeline
from lld_jax import metrics as metrics_lib
from lld_jax import plots
from lld_jax import postprocess
from lld_jax import sharding
from tfds_lld import lld_format


def ground_truth(builder, split) -> list[metrics_lib.ImageTruth]:
  """The split's annotations in original pixels, in the same order as `input_pipeline.eval_dataset`, with each
  field's patient where the dataset names one."""
  truths = []
  ds = builder.as_dataset(split=split, shuffle_files=False)
  for index, example in enumerate(tfds.as_numpy(ds)):
    height, width = example['image'].shape[:2]
    ymin, xmin, ymax, xmax = np.asarray(example['objects']['bbox'], np.float64).reshape(-1, 4).T
    boxes = np.stack([xmin * width, ymin * height, xmax * width, ymax * height], -1)
    mask = example['annotation_mask'][..., 0] > 0
    truths.append(metrics_lib.ImageTruth(
        image_id=str(index), domain=example['domain']['subset'].decode(), height=height, width=width,
        boxes=boxes, labels=example['objects']['label'].astype(np.int64),
        attributes=example['objects']['attributes'].reshape(len(boxes), -1).astype(np.int64),
        annotation_mask=None if mask.all() else mask, patient=example.get('patient', b'').decode()))
  return truths


ATTRIBUTE_COUNTS_FILE = 'attribute_counts.json'


def write_attribute_counts(counts, path):
  """{attribute: {value: count}} of the training cells, what `lld_jax.predict` reads to decide the attributes."""
  table = {name: {value: int(counts[a][v]) for v, value in enumerate(lld_format.ATTRIBUTE_VALUES[a])}
           for a, name in enumerate(lld_format.ATTRIBUTE_NAMES)}
  with open(f'{path}.tmp', 'w') as f:  # a run stopped while writing leaves the last whole file for its resumption
    json.dump(table, f, indent=1)
  os.replace(f'{path}.tmp', path)


def read_attribute_counts(path) -> np.ndarray:
  """The [A, V] counts that `write_attribute_counts` wrote."""
  with open(path) as f:
    table = json.load(f)
  if not isinstance(table, dict):
    raise ValueError(f'{path}: expected {{attribute: {{value: count}}}}, got a JSON {type(table).__name__}')
  counts = np.zeros((lld_format.NUM_ATTRIBUTES, max(lld_format.NUM_ATTRIBUTE_VALUES)), np.int64)
  for a, name in enumerate(lld_format.ATTRIBUTE_NAMES):
    values = table.get(name)
    if not isinstance(values, dict) or set(values) != set(lld_format.ATTRIBUTE_VALUES[a]):
      raise ValueError(f'{path}: attribute {name!r} needs counts of exactly {list(lld_format.ATTRIBUTE_VALUES[a])}, '
                       f'got {values!r}')
    for v, value in enumerate(lld_format.ATTRIBUTE_VALUES[a]):
      if not isinstance(values[value], int) or values[value] < 0:
        raise ValueError(f'{path}: {name}/{value}: the count {values[value]!r} is not a non-negative integer')
      counts[a, v] = values[value]
  return counts


def attribute_logit_adjustment(config) -> float:
  """`eval.attribute_logit_adjustment`; 0 (the plain argmax) in the config of a run from before the option."""
  return float(config.get('eval', {}).get('attribute_logit_adjustment', 0.0))


def attribute_logit_offsets(config, attribute_counts):
  """`postprocess.attribute_offsets` for the config; None for the plain argmax."""
  strength = attribute_logit_adjustment(config)
  if not strength:
    return None
  return postprocess.attribute_offsets(attribute_counts, lld_format.NUM_ATTRIBUTE_VALUES, strength)


def predict_split(model, state, builder, split, config, attribute_counts=None, class_counts=None,
                  patients=None) -> list[metrics_lib.ImagePrediction]:
  """Detections for every image of the split (EMA weights when the config keeps an EMA).

  attribute_counts [A, V]: the training split's (`input_pipeline.count_attribute_values`), counted here when not
  given and `eval.attribute_logit_adjustment` needs them; class_counts (counts [T, K], type names): the training
  cells of each leukemia type (`input_pipeline.count_classes_by_type`), counted here when not given and
  `eval.class_context` needs them; patients: each image's patient id in the split's order (`ground_truth`'s), which
  `eval.class_context` needs."""
  if attribute_counts is None and attribute_logit_adjustment(config):
    attribute_counts = input_pipeline.count_attribute_values(builder, config.dataset.train_split)
  offsets = attribute_logit_offsets(config, attribute_counts)
  mode = class_context.mode_of(config)
  if mode != 'none' and patients is None:
    raise ValueError(f'eval.class_context={mode} needs the patient of each image of {split} (evaluate.ground_truth\'s)')
  if mode == 'patient' and 'patient' not in builder.info.features:
    raise ValueError(f'eval.class_context=patient: the fields of {builder.name} carry no patient id')
  from lld_jax import train  # the train module owns the step functions and state layout
  variables = train.model_variables(state, use_ema=config.optimizer.ema_decay > 0)
  p_predict = jax.pmap(functools.partial(train.predict_step, model=model), axis_name=train.AXIS)
  replicated = sharding.replicate(variables)
  num_devices = jax.local_device_count()
  raw = {}  # every image's outputs first: the class context reads the other fields of a film
  for batch in sharding.prefetch_to_devices(
      input_pipeline.eval_dataset(builder, split, config, num_devices).as_numpy_iterator()):
    outputs = jax.device_get(p_predict(replicated, {k: batch[k] for k in train.PREDICT_INPUTS}))
    meta = jax.device_get({k: batch[k] for k in ('index', 'scale', 'original_size', 'example_valid')})
    for d in range(num_devices):
      for b in range(config.per_device_batch_size):
        if meta['example_valid'][d, b]:
          raw[int(meta['index'][d, b])] = ({k: v[d, b] for k, v in outputs.items()}, float(meta['scale'][d, b]),
                                           meta['original_size'][d, b])
  order = sorted(raw)
  cell_class_logits = [postprocess.cell_classifier_logits(raw[i][0], config.eval.class_scores) for i in order]
  if mode != 'none':
    if len(patients) != len(order):
      raise ValueError(f'eval.class_context={mode} needs the patient of each of the {len(order)} images of {split}, '
                       f'got {len(patients)}')
    if class_counts is None:
      class_counts = input_pipeline.count_classes_by_type(builder, config.dataset.train_split)[:2]
    cell_class_logits, alone = class_context.in_context(
        cell_class_logits, [raw[i][0]['logits'] for i in order], [patients[i] for i in order], mode,
        class_context.type_mix(*class_counts))
    if alone:
      logging.warning('eval.class_context=patient: %d of %d images of %s name no patient; each is its own film',
                      alone, len(order), split)
  predictions = []
  for index, cell_logits in zip(order, cell_class_logits):
    outputs, scale, original_size = raw[index]
    found = postprocess.to_detections(
        outputs['logits'], outputs['boxes'], outputs['attribute_logits'], config.image_size, scale, original_size,
        config.eval.max_detections, config.eval.score_threshold, config.eval.nms_iou_threshold, cell_logits,
        offsets)
    predictions.append(metrics_lib.ImagePrediction(
        image_id=str(index), boxes=found.boxes, scores=found.scores, labels=found.labels,
        attributes=found.attributes, cell_scores=found.cell_scores))
  return predictions


def evaluate_split(model, state, builder, split, config, attribute_counts=None,
                   class_counts=None) -> metrics_lib.EvaluationResult:
  truths = ground_truth(builder, split)
  predictions = predict_split(model, state, builder, split, config, attribute_counts, class_counts,
                              [truth.patient for truth in truths])
  if len(predictions) != len(truths):
    raise RuntimeError(f'evaluation lost images: {len(truths)} in {split}, {len(predictions)} predicted')
  return score_predictions(truths, predictions, input_pipeline.dataset_info(builder).class_names, config)


def max_dets(config):
  """COCOeval's maxDets for the config: AP reads the last, which must not cut the detections the config keeps."""
  return (1, 10, max(100, config.eval.max_detections))


def score_predictions(truths, predictions, class_names, config) -> metrics_lib.EvaluationResult:
  result = metrics_lib.evaluate_full(truths, predictions, class_names, lld_format.ATTRIBUTE_NAMES,
                                     attribute_score_threshold=config.eval.attribute_score_threshold,
                                     max_dets=max_dets(config))
  # The rules the attribute values and the classes were decided by: two runs compare only under the same rules.
  result.metrics['attributes/logit_adjustment'] = attribute_logit_adjustment(config)
  result.metrics['class_context'] = class_context.mode_of(config)
  return result


def write_evaluation(result, out_dir):
  """metrics.json, the plots, and predictions.json (what was scored, for `scripts/paired_bootstrap.py`)."""
  os.makedirs(out_dir, exist_ok=True)
  clean = {k: (None if isinstance(v, float) and not np.isfinite(v) else v) for k, v in result.metrics.items()}
  with open(os.path.join(out_dir, 'metrics.json'), 'w') as f:
    json.dump(clean, f, indent=2, sort_keys=True)
  write_predictions(result.predictions, os.path.join(out_dir, 'predictions.json'))
  plots.write_evaluation_plots(result, out_dir)


PREDICTION_FIELDS = ('boxes', 'scores', 'labels', 'attributes', 'cell_scores')


def write_predictions(predictions, path):
  """One record per image: its id (the position in the split) and its detections, boxes xyxy in original pixels."""
  records = [{'image_id': p.image_id, **{k: None if getattr(p, k) is None else np.asarray(getattr(p, k)).tolist()
                                         for k in PREDICTION_FIELDS}} for p in predictions]
  with open(path, 'w') as f:
    json.dump(records, f)


def read_predictions(path) -> list[metrics_lib.ImagePrediction]:
  """What `write_predictions` wrote."""
  with open(path) as f:
    records = json.load(f)
  as_array = lambda value, dtype, shape: np.zeros(shape, dtype) if not value else np.asarray(value, dtype)
  predictions = []
  for record in records:
    missing = {'image_id', *PREDICTION_FIELDS} - set(record)
    if missing:
      raise ValueError(f'{path}: image {record.get("image_id")!r} lacks {sorted(missing)}')
    predictions.append(metrics_lib.ImagePrediction(
        image_id=record['image_id'], boxes=as_array(record['boxes'], np.float64, (0, 4)),
        scores=as_array(record['scores'], np.float64, (0,)), labels=as_array(record['labels'], np.int64, (0,)),
        attributes=np.asarray(record['attributes'], np.int64),
        cell_scores=None if record['cell_scores'] is None else np.asarray(record['cell_scores'], np.float64)))
  return predictions


def checkpoint_manager(workdir, config):
  """The manager of DIR/best when it holds a checkpoint, else that of DIR/checkpoints."""
  from lld_jax import train
  latest, best = train.checkpoint_managers(workdir, config)
  manager = best if best.latest_step() is not None else latest
  if manager.latest_step() is None:
    raise FileNotFoundError(f'no checkpoint in {workdir}/best or {workdir}/checkpoints: train first')
  return manager


def restore_for_inference(config, workdir, num_classes):
  """Model and train state from DIR/best when it exists, else the latest checkpoint in DIR/checkpoints.

  The target state is built abstractly (jax.eval_shape): no initialization is compiled or run, and no pretrained
  backbone file is needed, since the checkpoint holds every weight. Only the weights are read (the optimizer state
  and counters stay abstract), so a checkpoint from before a change of the optimizer's layout still evaluates.
  """
  from lld_jax import train
  model = train.create_model(config, num_classes)
  return model, train.restore_latest(checkpoint_manager(workdir, config), train.abstract_train_state(model, config),
                                     fields=train.WEIGHT_FIELDS)


FLAGS = flags.FLAGS


def _define_flags():
  config_flags.DEFINE_config_file('config', None, 'Configuration file used for training (default: the config the '
                                  'run saved in DIR/config.json).', lock_config=True)
  flags.DEFINE_string('workdir', None, 'Training directory with checkpoints.')
  flags.DEFINE_string('split', None, 'Split to evaluate (default: config.dataset.eval_split).')


def main(argv):
  del argv
  config = FLAGS.config
  if config is None:
    from lld_jax import predict
    config = predict.load_config(FLAGS.workdir)
  split = FLAGS.split or config.dataset.eval_split
  builder = input_pipeline.load_builder(config.dataset.name, config.dataset.config,
                                        config.dataset.data_dir or None, config.dataset.manual_dir or None)
  model, state = restore_for_inference(config, FLAGS.workdir, input_pipeline.dataset_info(builder).num_classes)
  result = evaluate_split(model, state, builder, split, config)
  out_dir = os.path.join(FLAGS.workdir, 'eval', split)
  write_evaluation(result, out_dir)
  m = result.metrics
  print(json.dumps({k: m[k] for k in ('mAP50', 'mAP50_95', 'cells/AP50', 'attributes/mean_f1_strict',
                                      'attributes/mean_f1_paper') if k in m}, indent=2))
  print(f'wrote {out_dir}/metrics.json')


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['workdir'])
  app.run(main)
