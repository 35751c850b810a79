r"""Is a run's mAP lost in finding the cells or in naming them?

  python scripts/naming_ceiling.py --workdir=RUN [--split=test]

Reads the detections the run's evaluation scored (`RUN/eval/<split>/predictions.json`) and scores them twice
more with the same metrics: once with each detection's class replaced by that of the true cell it overlaps most
(when that IoU is at least 0.5), so only finding and ranking the boxes can still fail (the naming ceiling); and
once as one class with one detection per box (a query's several class answers share its box), ranked by the
cell score. Also prints the share of true cells that some detection overlaps by IoU >= 0.5, and each class's AP50
as scored and with the true names (where a class loses AP: its naming or its finding).
"""

import argparse
import json
import os

import numpy as np


def naming_ceiling(truths, predictions, class_names, max_dets=(1, 10, 100)) -> dict:
  """The numbers of the module docstring for metrics.ImageTruth / ImagePrediction lists of one split."""
  from lld_jax import metrics
  from tfds_lld import lld_format
  renamed, per_box, found, cells = [], [], 0, 0
  for truth, prediction in zip(truths, predictions):
    labels = prediction.labels.copy()
    if len(truth.boxes) and len(prediction.boxes):
      overlap = metrics.box_iou(prediction.boxes, truth.boxes)  # [detections, cells]
      labels = np.where(overlap.max(1) >= 0.5, truth.labels[overlap.argmax(1)], labels)
      found += int((overlap.max(0) >= 0.5).sum())
    cells += len(truth.boxes)
    renamed.append(metrics.ImagePrediction(prediction.image_id, prediction.boxes, prediction.scores, labels,
                                           prediction.attributes, prediction.cell_scores))
    _, first = np.unique(prediction.boxes, axis=0, return_index=True)
    first = np.sort(first)
    cell_scores = prediction.scores if prediction.cell_scores is None else prediction.cell_scores
    per_box.append(metrics.ImagePrediction(prediction.image_id, prediction.boxes[first], cell_scores[first],
                                           np.zeros(len(first), np.int64), prediction.attributes[first],
                                           cell_scores[first]))
  one_class = [metrics.ImageTruth(**{**t.__dict__, 'labels': np.zeros_like(t.labels)}) for t in truths]
  score = lambda t, p, names: metrics.evaluate(t, p, names, lld_format.ATTRIBUTE_NAMES, max_dets=max_dets)
  as_scored, ceiling = score(truths, predictions, class_names), score(truths, renamed, class_names)
  per_class = {name: [as_scored[f'per_class/{name}/AP50'], ceiling[f'per_class/{name}/AP50']]
               for name in class_names if f'per_class/{name}/AP50' in as_scored}
  return {'cells': cells, 'found_at_iou_0.5': found / max(cells, 1), 'mAP50': as_scored['mAP50'],
          'cells/AP50': as_scored['cells/AP50'], 'mAP50_with_true_names': ceiling['mAP50'],
          'one_per_box_AP50': score(one_class, per_box, ['cell'])['mAP50'],
          'per_class_AP50_as_scored_and_with_true_names': per_class}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--workdir', required=True, help='a training directory with an evaluation')
  parser.add_argument('--split', default=None, help="default: the run's dataset.eval_split")
  args = parser.parse_args(argv)
  from lld_jax import evaluate
  from lld_jax import input_pipeline
  from lld_jax import predict

  config = predict.load_config(args.workdir)
  split = args.split or config.dataset.eval_split
  builder = input_pipeline.load_builder(config.dataset.name, config.dataset.config, config.dataset.data_dir or None)
  predictions = evaluate.read_predictions(os.path.join(args.workdir, 'eval', split, 'predictions.json'))
  result = naming_ceiling(evaluate.ground_truth(builder, split), predictions,
                          input_pipeline.dataset_info(builder).class_names, evaluate.max_dets(config))
  print(json.dumps({'split': split, **result}, indent=2))


if __name__ == '__main__':
  main()
