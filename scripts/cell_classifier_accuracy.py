r"""How good is a trained detector's cell classifier, apart from the detector's boxes?

  python scripts/cell_classifier_accuracy.py --config=configs/synthetic_demo.py --workdir=demo_run/train \
      --splits=train,test [--config.key=value ...]

For every annotated cell of each split, prints the top-1 class accuracy of:
- the cell classifier (`model.cell_class_refinement` with `model.cell_crop_size`) on a crop at the *true* box;
- the cell classifier and the decoder's class for the detection that answers the cell: of the queries whose box
  has IoU >= 0.5 with it, the one with the best decoder score.
The first separates what the classifier learned from what the boxes cost; a gap between train and test is
over-fitting. Also prints, per split, the true-box confusions: for each true class, its cells' count and the
classes the classifier gave them. Uses the EMA weights when the config keeps an EMA (as evaluation does),
`--raw_weights` for the trained ones. Writes JSON to `--out` when given.
"""

import functools
import json

from absl import app
from absl import flags
import jax
from ml_collections import config_flags
import numpy as np

from lld_jax import boxes as box_ops
from lld_jax import evaluate
from lld_jax import input_pipeline
from lld_jax import train

_CONFIG = config_flags.DEFINE_config_file('config', None, 'the config the workdir was trained with',
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string('workdir', None, 'training directory with checkpoints')
_SPLITS = flags.DEFINE_list('splits', ['train', 'test'], 'splits to score')
_RAW = flags.DEFINE_bool('raw_weights', False, 'score the trained weights, not their EMA')
_OUT = flags.DEFINE_string('out', '', 'write the accuracies as JSON here')


def main(argv):
  del argv
  config = _CONFIG.value
  if not (config.model.cell_crop_size and config.model.cell_class_refinement):
    raise ValueError('the config has no cell classifier (model.cell_crop_size and model.cell_class_refinement)')
  d = config.dataset
  builder = input_pipeline.load_builder(d.name, d.config, d.data_dir or None, d.manual_dir or None)
  num_classes = input_pipeline.dataset_info(builder).num_classes
  if not config.model.denoising_groups:
    raise ValueError('the true-box accuracy reads the denoising copies: the config has model.denoising_groups=0')
  model, state = evaluate.restore_for_inference(config, _WORKDIR.value, num_classes)
  variables = train.model_variables(state, use_ema=config.optimizer.ema_decay > 0 and not _RAW.value)
  reading_true_boxes = model.clone(dn_cells_at_true_boxes=True)

  @jax.jit
  def classify_at_true_boxes(images, masks, scale, targets):
    # The model's own path: the first denoising group's positive copies read their cells at the true boxes, and
    # their cell-classifier logits depend on nothing else (not on the denoising noise; tests/test_detector.py).
    outputs = reading_true_boxes.apply(variables, images, masks, targets, train=True,
                                       rngs={'denoise': jax.random.PRNGKey(0)}, pixel_scale=scale)
    return outputs['dn_cell_class_logits']

  predict = jax.jit(functools.partial(train.predict_step, variables, model=model))
  class_names = input_pipeline.dataset_info(builder).class_names
  summary = {}
  for split in _SPLITS.value:
    cells = at_true_box = answered = classifier_right = decoder_right = 0
    confusion = np.zeros((num_classes, num_classes), np.int64)  # [true, given] at the true boxes
    for batch in input_pipeline.eval_dataset(builder, split, config, 1).as_numpy_iterator():
      batch = {k: v[0] for k, v in batch.items()}  # one device
      targets = {k: batch[k] for k in ('labels', 'boxes', 'weight')}
      true_box_classes = np.asarray(
          classify_at_true_boxes(batch['image'], batch['image_mask'], batch['scale'], targets)).argmax(-1)
      outputs = jax.device_get(predict({k: batch[k] for k in train.PREDICT_INPUTS}))
      for i in np.flatnonzero(batch['example_valid']):
        real = batch['weight'][i] > 0
        labels = batch['labels'][i][real]
        cells += len(labels)
        at_true_box += int((true_box_classes[i][real] == labels).sum())
        np.add.at(confusion, (labels, true_box_classes[i][real]), 1)
        overlap = np.asarray(box_ops.pairwise_iou(box_ops.cxcywh_to_xyxy(outputs['boxes'][i]),
                                                  box_ops.cxcywh_to_xyxy(batch['boxes'][i][real])))
        query_scores = outputs['logits'][i].max(-1)
        for t, label in enumerate(labels):
          candidates = np.flatnonzero(overlap[:, t] >= 0.5)
          if not len(candidates):
            continue
          query = candidates[query_scores[candidates].argmax()]
          answered += 1
          classifier_right += int(outputs['cell_class_logits'][i][query].argmax() == label)
          decoder_right += int(outputs['logits'][i][query].argmax() == label)
    summary[split] = {'cells': cells, 'classifier_at_true_boxes': at_true_box / max(cells, 1),
                      'cells_with_a_detection_iou50': answered,
                      'classifier_at_detection': classifier_right / max(answered, 1),
                      'decoder_at_detection': decoder_right / max(answered, 1),
                      'true_box_confusions': confusion_by_name(confusion, class_names)}
  print(json.dumps(summary, indent=1))
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(summary, f, indent=1)


def confusion_by_name(confusion, class_names):
  """{true class: {'cells': n, 'given': {class: n, ...}}} from a [true, given] count matrix, the given classes
  most frequent first; classes without cells left out."""
  out = {}
  for t, row in enumerate(confusion):
    if row.sum():
      given = {class_names[g]: int(row[g]) for g in np.argsort(-row, kind='stable') if row[g]}
      out[class_names[t]] = {'cells': int(row.sum()), 'given': given}
  return out


if __name__ == '__main__':
  flags.mark_flags_as_required(['config', 'workdir'])
  app.run(main)
