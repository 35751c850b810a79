r"""Is a difference between trained runs more than the luck of the test images? A paired bootstrap of mAP50.

  python scripts/paired_bootstrap.py --runs=OUT/b_sparse_as_background,OUT/c_region_restricted [--split=test] \
      [--resamples=2000] [--seed=0] [--out=FILE.json]

Each run's final evaluation left `eval/<split>/predictions.json` (`python -m lld_jax.evaluate --workdir=RUN ...`
writes it again for an older run). Every run is scored on the same resamples of the split's images, drawn with
replacement (`metrics.resampled_ap50`), so a test image that is easy or hard for all runs alike moves all of them
together. For each run: mAP50 and cells AP50 with a 95 % percentile interval; for each later run against the
first: the difference, its interval, the share of resamples in which the later run is ahead, and the ratio (later
over first, e.g. a sparse setting over full labels) with its interval. The ground truth is read from each run's
config.json (dataset name, config and data_dir); all runs must have scored the same images. The interval covers
the test set's sampling only, not the training seed's spread: run seeds for that.
"""

import argparse
import json
import os
import sys

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

METRICS = ('mAP50', 'cells/AP50')


def interval(samples):
  low, high = np.percentile(samples, [2.5, 97.5])
  return float(low), float(high)


def compare(values, samples, names):
  """Rows of the table: each run's value and interval, then each later run minus the first, paired by resample.
  values: {run: {metric: value on the whole split}}; samples: {run: {metric: [S] resampled values}}."""
  rows = []
  for name in names:
    rows.append({'run': name, **{m: {'value': values[name][m], 'interval': interval(samples[name][m])}
                                 for m in METRICS}})
  first = names[0]
  for name in names[1:]:
    rows.append({'run': f'{name} - {first}', **{
        m: {'value': values[name][m] - values[first][m],
            'interval': interval(samples[name][m] - samples[first][m]),
            'share_ahead': float(np.mean(samples[name][m] > samples[first][m])),
            'ratio': values[name][m] / values[first][m],
            'ratio_interval': interval(samples[name][m] / samples[first][m])} for m in METRICS}})
  return rows


def table_lines(rows):
  lines = ['| run | mAP50 [95 % interval] | cells AP50 [95 % interval] | resamples ahead (mAP50 / cells) | '
           'ratio in mAP50 [95 % interval] |', '|---|---|---|---|---|']
  for row in rows:
    compared = 'share_ahead' in row['mAP50']
    sign = '+' if compared else ''
    cells = [f'{row[m]["value"]:{sign}.3f} [{row[m]["interval"][0]:{sign}.3f}, {row[m]["interval"][1]:{sign}.3f}]'
             for m in METRICS]
    ahead = ' / '.join(f'{row[m]["share_ahead"]:.0%}' for m in METRICS) if compared else ''
    ratio = ''
    if compared:
      low, high = row['mAP50']['ratio_interval']
      ratio = f'{row["mAP50"]["ratio"]:.3f} [{low:.3f}, {high:.3f}]'
    lines.append(f'| {row["run"]} | {cells[0]} | {cells[1]} | {ahead} | {ratio} |')
  return lines


def _same_truth(a, b):
  return len(a) == len(b) and all(
      np.array_equal(x.labels, y.labels) and np.allclose(x.boxes, y.boxes) for x, y in zip(a, b))


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('--runs', required=True, help='comma-separated training directories; the first is the base')
  parser.add_argument('--split', default=None, help="default: the first run's dataset.eval_split")
  parser.add_argument('--resamples', type=int, default=2000)
  parser.add_argument('--seed', type=int, default=0)
  parser.add_argument('--out', default=None, help='also write the rows as JSON here')
  args = parser.parse_args(argv)
  from lld_jax import evaluate
  from lld_jax import input_pipeline
  from lld_jax import metrics
  from lld_jax import predict
  from tfds_lld import lld_format

  runs = [r for r in args.runs.split(',') if r]
  if len(runs) < 2:
    parser.error('--runs needs two runs or more')
  names = [os.path.basename(os.path.normpath(r)) for r in runs]
  if len(set(names)) < len(names):
    names = [os.path.normpath(r) for r in runs]
  configs = [predict.load_config(r) for r in runs]
  split = args.split or configs[0].dataset.eval_split
  truths, class_names, predictions = None, None, {}
  truths_by_dataset = {}  # runs of one benchmark share their data: decode each split once
  for run, name, config in zip(runs, names, configs):
    path = os.path.join(run, 'eval', split, 'predictions.json')
    if not os.path.exists(path):
      raise FileNotFoundError(f'{path} does not exist: evaluate the run again with `python -m lld_jax.evaluate '
                              f'--workdir={run} --split={split}` (older runs did not write it)')
    dataset = (config.dataset.name, config.dataset.config, config.dataset.data_dir or None)
    if dataset not in truths_by_dataset:
      builder = input_pipeline.load_builder(*dataset)
      truths_by_dataset[dataset] = evaluate.ground_truth(builder, split), input_pipeline.dataset_info(builder)
    run_truths, info = truths_by_dataset[dataset]
    if truths is None:
      truths, class_names = run_truths, info.class_names
    elif not _same_truth(truths, run_truths):
      raise ValueError(f'{run} was scored on other {split} images than {runs[0]} ({config.dataset.name}/'
                       f'{config.dataset.config} in {config.dataset.data_dir})')
    predictions[name] = evaluate.read_predictions(path)
  rng = np.random.default_rng(args.seed)
  rows_of_images = rng.integers(0, len(truths), (args.resamples, len(truths)))
  max_dets = evaluate.max_dets(configs[0])
  whole = np.arange(len(truths))[None]
  values, samples = {}, {}
  for name in names:
    score = lambda rows: metrics.resampled_ap50(truths, predictions[name], class_names, lld_format.ATTRIBUTE_NAMES,
                                                rows, max_dets=max_dets)
    values[name] = {m: float(v[0]) for m, v in score(whole).items()}
    samples[name] = score(rows_of_images)
  rows = compare(values, samples, names)
  print(f'{split}: {len(truths)} images, {sum(len(t.boxes) for t in truths)} cells, {args.resamples} paired '
        f'resamples (seed {args.seed})')
  print('\n'.join(table_lines(rows)))
  if args.out:
    with open(args.out, 'w') as f:
      json.dump({'split': split, 'runs': runs, 'resamples': args.resamples, 'seed': args.seed, 'rows': rows}, f,
                indent=2)


if __name__ == '__main__':
  main()
