r"""The sparse-annotation benchmark: the paper's four settings and two variants, one budget, evaluated on full labels.

  python scripts/sparse_benchmark.py --dataset=synthetic --steps=2000 --out=runs/sparse_synthetic
  python scripts/sparse_benchmark.py --dataset=txl_pbc --steps=2000 --out=runs/sparse_txl [--config.key=value ...]

Settings: (a) full labels; (b) sparse labels with the unlabelled area as background; (c) region-restricted matching;
(d) (c) + pseudo-labels; (e) (c), with the unlabelled area's unsure predictions (own score under
`--unlabelled_background_below`) as background (`loss.unlabelled_background_below`); (f) as (e), the threshold a
fraction of the labelled cells' mean score (`loss.unlabelled_background_relative`); (h) (c), with the negatives inside
the region weighted by the field's area over the region's, at most `--region_negative_weight_max`
(`loss.region_negative_weight_max`). (c) and (h) train only on the images that have an annotated region: the others
add no loss there (`dataset.skip_images_without_region`, counted in the training log); so does (d), whose
pseudo-labels go only on the images with a region (`pseudo_labels.on_images_without_region=False`), so that it is
(c)'s training plus pseudo-labels. For `synthetic`, one synthetic download is written in the YOLO layout (full) and
one in the sparse layout from the same seed (the same images; 20 patients of 10 fields unless
`--synthetic_patients` and `--synthetic_images_per_patient` say otherwise; downloads already in OUT are used as
they are), and every setting is evaluated on the fully annotated test split. For `txl_pbc`, the `sparse` builder
config simulates the sparse train split and every setting is evaluated on the fully annotated val split.
Pseudo-labels start after a third of the budget (`--pseudo_warmup_fraction`), at the score threshold
`--pseudo_threshold`. Writes OUT/table.md and OUT/table.json: mAP, the detections' AP as one class
(`cells/AP50`: finding the cells, whatever they are named), attribute F1, and the mean number of pseudo-labels per
step in (d) after its warm-up. When OUT holds two evaluated settings or more (from this call or earlier ones),
OUT/bootstrap.md and .json compare each with (b), paired over resamples of the evaluated images
(`scripts/paired_bootstrap.py`): a difference and its 95 % interval.
"""

import argparse
import json
import os
import subprocess
import sys

import numpy as np

SETTINGS = {
    'a_full': ['--config.dataset.config=full'],
    'b_sparse_as_background': ['--config.dataset.config=sparse', '--config.loss.region_restricted=False'],
    'c_region_restricted': ['--config.dataset.config=sparse'],
    'd_region_restricted_pseudo': ['--config.dataset.config=sparse', '--config.pseudo_labels.enabled=True',
                                   '--config.pseudo_labels.on_images_without_region=False'],
    'e_region_restricted_unsure_as_background': ['--config.dataset.config=sparse'],
    'f_region_restricted_relatively_unsure_as_background': ['--config.dataset.config=sparse',
                                                            '--config.loss.unlabelled_background_relative=True'],
    'h_region_restricted_negatives_reweighted': ['--config.dataset.config=sparse'],
}


def _run(args):
  print('+', ' '.join(args), flush=True)
  subprocess.run(args, check=True)


def _logged(workdir, tag):
  """Every (step, value) the trainer logged for scalar `tag`, by step."""
  import glob
  import tensorflow as tf
  found = {}
  for path in glob.glob(os.path.join(workdir, 'events.out.tfevents.*')):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.tag == tag:
          found[event.step] = float(np.asarray(tf.make_ndarray(value.tensor)))
  return sorted(found.items())


def train_arguments(name, *, config, workdir, steps, downloads, data_dir, split, pseudo_threshold,
                    pseudo_warmup_steps, unlabelled_background_below=0.5, region_negative_weight_max=10.0,
                    overrides=()):
  """The `lld_jax.train` arguments of setting `name`: one budget for all, evaluated once at its end on `split`.
  `downloads` maps 'full' and 'sparse' to the download each setting reads; `overrides` come last, so they win."""
  kind = 'full' if name == 'a_full' else 'sparse'
  arguments = [f'--config={config}', f'--workdir={workdir}', f'--config.total_steps={steps}',
               f'--config.eval_every_steps={steps}', f'--config.dataset.manual_dir={downloads[kind]}',
               f'--config.dataset.data_dir={data_dir}', f'--config.dataset.eval_split={split}'] + SETTINGS[name]
  if name.startswith('d_'):
    arguments += [f'--config.pseudo_labels.threshold={pseudo_threshold}',
                  f'--config.pseudo_labels.warmup_steps={pseudo_warmup_steps}']
  if name.startswith(('e_', 'f_')):
    arguments.append(f'--config.loss.unlabelled_background_below={unlabelled_background_below}')
  if name.startswith('h_'):
    arguments.append(f'--config.loss.region_negative_weight_max={region_negative_weight_max}')
  return arguments + list(overrides)


# (heading, key of a row): the keys read from metrics.json, then the pseudo-label count the script adds.
METRIC_COLUMNS = (('mAP50', 'mAP50'), ('mAP50:95', 'mAP50_95'), ('cells AP50 (any class)', 'cells/AP50'),
                  ('attribute mean F1 (strict)', 'attributes/mean_f1_strict'))
COLUMNS = METRIC_COLUMNS + (('pseudo-labels per step after warm-up (mean)', 'pseudo_labels_per_step'),)


def table_lines(rows):
  """Markdown table of {setting: {key: value or None}}, one column per `COLUMNS` entry ('-' where missing)."""
  lines = ['| setting | ' + ' | '.join(heading for heading, _ in COLUMNS) + ' |', '|---' * (len(COLUMNS) + 1) + '|']
  for name, row in rows.items():
    values = [row.get(key) for _, key in COLUMNS]
    lines.append(f'| {name} | ' + ' | '.join('-' if v is None else f'{v:.3f}' for v in values) + ' |')
  return lines


def main():
  parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--dataset', choices=('synthetic', 'txl_pbc'), required=True)
  parser.add_argument('--steps', type=int, required=True)
  parser.add_argument('--out', required=True)
  parser.add_argument('--txl_dir', default='../shared/data/txl_pbc')
  parser.add_argument('--pseudo_threshold', type=float, default=0.95, help='teacher score for a pseudo-label')
  parser.add_argument('--unlabelled_background_below', type=float, default=0.5,
                      help='(e): outside the annotated region, a prediction scored under this is background; '
                      '(f): under this fraction of the mean score of the labelled cells')
  parser.add_argument('--region_negative_weight_max', type=float, default=10.0,
                      help='(h): the most a negative inside the annotated region may weigh')
  parser.add_argument('--settings', default=','.join(SETTINGS),
                      help='comma-separated settings to run (default: all of them)')
  parser.add_argument('--synthetic_patients', type=int, default=20,
                      help='synthetic download: patients of subset H_100x_C1 (the splits are drawn by patient)')
  parser.add_argument('--synthetic_images_per_patient', type=int, default=10)
  parser.add_argument('--pseudo_warmup_fraction', type=float, default=1 / 3,
                      help='share of the budget trained before pseudo-labels start')
  args, overrides = parser.parse_known_args()
  wrong = [o for o in overrides if not o.startswith('--config.')]
  if wrong:
    parser.error(f'unrecognized arguments (only --config.key=value overrides pass through): {wrong}')
  args.overrides = overrides
  settings = [s for s in args.settings.split(',') if s]
  unknown = sorted(set(settings) - set(SETTINGS))
  if unknown:
    parser.error(f'--settings: unknown {unknown}; expected some of {list(SETTINGS)}')
  py = sys.executable
  os.makedirs(args.out, exist_ok=True)
  if args.dataset == 'synthetic':
    config = 'configs/synthetic_demo.py'
    downloads = {'full': os.path.join(args.out, 'download_full'), 'sparse': os.path.join(args.out, 'download_sparse')}
    for layout, path in (('yolo', downloads['full']), ('sparse', downloads['sparse'])):
      if not os.path.isdir(path):
        _run([py, '-m', 'tfds_lld.synthetic', '--out', path, '--layout', layout, '--subsets', 'H_100x_C1',
              '--patients', str(args.synthetic_patients), '--images-per-patient',
              str(args.synthetic_images_per_patient), '--seed', '0', '--workers', str(os.cpu_count())])
    split = 'test'
  else:
    config = 'configs/txl_pbc.py'
    downloads = {'full': args.txl_dir, 'sparse': args.txl_dir}
    split = 'val'
  rows = {}
  warmup_steps = int(args.steps * args.pseudo_warmup_fraction)
  for name in settings:
    workdir = os.path.join(args.out, name)
    _run([py, '-m', 'lld_jax.train'] + train_arguments(  # ends by evaluating the split into WORKDIR/eval/<split>/
        name, config=config, workdir=workdir, steps=args.steps, downloads=downloads,
        data_dir=os.path.join(args.out, 'tfds'), split=split, pseudo_threshold=args.pseudo_threshold,
        pseudo_warmup_steps=warmup_steps, unlabelled_background_below=args.unlabelled_background_below,
        region_negative_weight_max=args.region_negative_weight_max,
        overrides=args.overrides))
    with open(os.path.join(workdir, 'eval', split, 'metrics.json')) as f:
      metrics = json.load(f)
    rows[name] = {key: metrics.get(key) for _, key in METRIC_COLUMNS}
    # Pseudo-labels exist only after the warm-up: their mean over the logging windows from then on.
    counts = [v for step, v in _logged(workdir, 'num_pseudo_labels') if step > warmup_steps]
    rows[name]['pseudo_labels_per_step'] = float(np.mean(counts)) if counts else None
  with open(os.path.join(args.out, 'table.json'), 'w') as f:
    json.dump(rows, f, indent=2)
  lines = table_lines(rows)
  with open(os.path.join(args.out, 'table.md'), 'w') as f:
    f.write('\n'.join(lines) + '\n')
  print('\n'.join(lines))
  evaluated = [name for name in SETTINGS  # this call's and earlier calls' in OUT
               if os.path.exists(os.path.join(args.out, name, 'eval', split, 'predictions.json'))]
  compared = bootstrap_order(evaluated)
  if compared:  # is each setting's lead over (b) more than the luck of the test images?
    result = subprocess.run(
        [py, os.path.join(os.path.dirname(os.path.abspath(__file__)), 'paired_bootstrap.py'), f'--split={split}',
         '--runs=' + ','.join(os.path.join(args.out, name) for name in compared),
         f'--out={os.path.join(args.out, "bootstrap.json")}'], check=True, stdout=subprocess.PIPE, text=True)
    with open(os.path.join(args.out, 'bootstrap.md'), 'w') as f:
      f.write(result.stdout)
    print(result.stdout)


def bootstrap_order(settings):
  """The settings for `paired_bootstrap.py`, the baseline first: (b), the plain detector, when it ran, else the
  first in SETTINGS order. Empty for fewer than two settings."""
  ran = [name for name in SETTINGS if name in settings]
  if len(ran) < 2:
    return []
  base = 'b_sparse_as_background' if 'b_sparse_as_background' in ran else ran[0]
  return [base] + [name for name in ran if name != base]


if __name__ == '__main__':
  main()
