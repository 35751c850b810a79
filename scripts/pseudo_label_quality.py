r"""How good would a trained teacher's pseudo-labels be, threshold by threshold?

  python scripts/pseudo_label_quality.py --workdir=runs/sparse_synthetic/c_region_restricted \
      --full_manual_dir=runs/sparse_synthetic/download_full [--thresholds=0.3,0.4,0.45,0.5,0.6]

For a run trained on sparse labels, whose images also exist fully labelled (the synthetic benchmark writes both
layouts from one seed): the teacher (EMA weights) predicts on every sparse train image, and each query that
`lld_jax.pseudo_labels` could turn into a target (box centre outside the annotated region, no overlap with a
labelled cell) is checked against the full labels. Per threshold and score rule (the decoder's sigmoids, and
the run's `eval.class_scores`): how many queries pass, the share whose box hits an unlabelled cell (IoU >= 0.5),
the share that also has that cell's class, and how many distinct unlabelled cells they reach. It reads the
hidden labels of the train split, so it is for choosing and explaining a threshold, not for training.
"""

import functools
import json

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from lld_jax import boxes as box_ops
from lld_jax import evaluate
from lld_jax import input_pipeline
from lld_jax import postprocess
from lld_jax import pseudo_labels
from lld_jax import train

_WORKDIR = flags.DEFINE_string('workdir', None, 'a run trained with dataset.config=sparse')
_FULL = flags.DEFINE_string('full_manual_dir', None, 'the fully labelled download of the same images')
_THRESHOLDS = flags.DEFINE_list('thresholds', ['0.3', '0.4', '0.45', '0.5', '0.6'], 'teacher score thresholds')
_OUT = flags.DEFINE_string('out', '', 'write the table as JSON here')


def _candidates(outputs, allowed, sparse, full, i, rules):
  """The queries of example i that could become pseudo-labels (`allowed` [B, Q] from
  `pseudo_labels.allowed_places`; each: its score and class under each rule, and the unlabelled true cell its
  box hits, an index into the full labels or -1), and the number of unlabelled cells."""
  labelled = sparse['weight'][i] > 0
  real = full['weight'][i] > 0
  labelled_xyxy = np.asarray(box_ops.cxcywh_to_xyxy(sparse['boxes'][i][labelled]))
  true_xyxy = np.asarray(box_ops.cxcywh_to_xyxy(full['boxes'][i][real]))
  unlabelled = np.ones(len(true_xyxy), bool)
  if len(labelled_xyxy):
    same = np.asarray(box_ops.pairwise_iou(true_xyxy, labelled_xyxy)).max(-1) > 0.99
    if same.sum() != len(labelled_xyxy):
      raise ValueError(f'example {int(sparse["index"][i])}: the sparse labels are not a subset of the full '
                       'ones: are the two downloads of the same seed?')
    unlabelled = ~same
  query_xyxy = np.asarray(box_ops.cxcywh_to_xyxy(outputs['boxes'][i]))
  iou = np.asarray(box_ops.pairwise_iou(query_xyxy, true_xyxy)) if len(true_xyxy) else np.zeros((len(query_xyxy), 0))
  nearest = iou.argmax(-1) if iou.shape[1] else np.full(len(query_xyxy), -1)
  hit = (nearest >= 0) & (iou.max(-1, initial=0.0) >= 0.5)
  hit &= unlabelled[np.maximum(nearest, 0)] if len(unlabelled) else False
  scores = {rule: postprocess.class_scores(outputs['logits'][i], cell) for rule, cell in rules.items()}
  true_labels = full['labels'][i][real]
  return [{'score': {r: float(s[q].max()) for r, s in scores.items()},
           'label': {r: int(s[q].argmax()) for r, s in scores.items()},
           'cell': int(nearest[q]) if hit[q] else -1,
           'truth': int(true_labels[nearest[q]]) if hit[q] else -1}
          for q in np.flatnonzero(allowed[i])], int(unlabelled.sum())


def main(argv):
  del argv
  with open(f'{_WORKDIR.value}/config.json') as f:
    config = ml_collections.ConfigDict(json.load(f))
  d = config.dataset
  if d.config != 'sparse':
    raise ValueError(f'{_WORKDIR.value} was trained with dataset.config={d.config!r}, not sparse')
  sparse = input_pipeline.load_builder(d.name, 'sparse', d.data_dir or None, d.manual_dir or None)
  full = input_pipeline.load_builder(d.name, 'full', d.data_dir or None, _FULL.value)
  model, state = evaluate.restore_for_inference(config, _WORKDIR.value, input_pipeline.dataset_info(sparse).num_classes)
  variables = train.model_variables(state, use_ema=config.optimizer.ema_decay > 0)
  predict = jax.jit(functools.partial(train.predict_step, variables, model=model))
  candidates, num_unlabelled = [], 0
  full_batches = input_pipeline.eval_dataset(full, 'train', config, 1).as_numpy_iterator()
  for sparse_batch in input_pipeline.eval_dataset(sparse, 'train', config, 1).as_numpy_iterator():
    sparse_batch = {k: v[0] for k, v in sparse_batch.items()}  # one device
    full_batch = {k: v[0] for k, v in next(full_batches).items()}
    outputs = jax.device_get(predict({k: sparse_batch[k] for k in train.PREDICT_INPUTS}))
    rules = {'detector': None,
             config.eval.class_scores: postprocess.cell_classifier_logits(outputs, config.eval.class_scores)}
    # Where the training step's selection would allow a pseudo-label (its default overlap rule).
    allowed = np.asarray(pseudo_labels.allowed_places(outputs['boxes'], sparse_batch))
    for i in np.flatnonzero(sparse_batch['example_valid']):
      found, unlabelled = _candidates(outputs, allowed, sparse_batch, full_batch, i,
                                      {r: None if c is None else c[i] for r, c in rules.items()})
      candidates += [(int(sparse_batch['index'][i]), c) for c in found]
      num_unlabelled += unlabelled
  table = {'unlabelled_cells': num_unlabelled, 'candidate_queries': len(candidates), 'rules': {}}
  for rule in dict.fromkeys(['detector', config.eval.class_scores]):
    rows = []
    for threshold in map(float, _THRESHOLDS.value):
      passed = [(image, c) for image, c in candidates if c['score'][rule] > threshold]
      hits = [(image, c) for image, c in passed if c['cell'] >= 0]
      rows.append({'threshold': threshold, 'queries': len(passed),
                   'box_hit': len(hits) / max(len(passed), 1),
                   'class_right': sum(c['label'][rule] == c['truth'] for _, c in hits) / max(len(passed), 1),
                   'distinct_cells': len({(image, c['cell']) for image, c in hits})})
    table['rules'][rule] = rows
  print(json.dumps(table, indent=1))
  if _OUT.value:
    with open(_OUT.value, 'w') as f:
      json.dump(table, f, indent=1)


if __name__ == '__main__':
  flags.mark_flags_as_required(['workdir', 'full_manual_dir'])
  app.run(main)
