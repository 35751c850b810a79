r"""A markdown report of a run: `python -m lld_jax.report --workdir=DIR --out=REPORT.md [--predict_dir=P]`.

Reads the TensorBoard scalars of DIR (training curves), DIR/eval/<split>/metrics.json and the overlays of a
prediction folder, and writes them as one page with pictures beside it.
"""

import glob
import json
import os
import shutil

from absl import app
from absl import flags
import tensorflow as tf

from lld_jax import plots
from tfds_lld import lld_format

tf.config.set_visible_devices([], 'GPU')


def read_scalars(workdir) -> dict[str, list[tuple[int, float]]]:
  """Every scalar series in the run's TensorBoard event files, sorted by step."""
  history = {}
  for path in sorted(glob.glob(os.path.join(workdir, 'events.out.tfevents.*'))):
    for event in tf.compat.v1.train.summary_iterator(path):
      for value in event.summary.value:
        if value.HasField('tensor') and value.tensor.dtype in (tf.float32.as_datatype_enum,
                                                               tf.float64.as_datatype_enum):
          array = tf.make_ndarray(value.tensor)
          if array.size != 1:  # histograms and hyperparameter tables are not curves
            continue
          number = float(array.reshape(()))
        elif value.HasField('simple_value'):
          number = float(value.simple_value)
        else:
          continue
        history.setdefault(value.tag, []).append((int(event.step), number))
  return {tag: sorted(points) for tag, points in history.items()}


def _fmt(value):
  if value is None:
    return '—'
  return value if isinstance(value, str) else f'{value:.3f}'


def metrics_section(metrics) -> list[str]:
  lines = ['| metric | value |', '|---|---|']
  for key in ('mAP50', 'mAP50_95', 'cells/AP50', 'attributes/mean_f1_strict', 'attributes/mean_f1_paper',
              'attributes/logit_adjustment', 'class_context', 'num_images', 'num_truths'):
    if key in metrics:
      lines.append(f'| {key} | {_fmt(metrics[key])} |')
  lines += ['', '| attribute | strict acc | strict F1 | paper acc | paper F1 |', '|---|---|---|---|---|']
  for name in lld_format.ATTRIBUTE_NAMES:
    row = [metrics.get(f'attributes/{p}/{name}/{m}') for p in ('strict', 'paper') for m in ('accuracy', 'f1')]
    lines.append(f'| {name} | ' + ' | '.join(_fmt(v) for v in row) + ' |')
  classes = sorted(k for k in metrics if k.startswith('per_class/') and k.endswith('/AP50'))
  if classes:
    lines += ['', '| class | AP50 |', '|---|---|']
    lines += [f'| {k.split("/")[1]} | {_fmt(metrics[k])} |' for k in classes]
  domains = sorted(k for k in metrics if k.startswith('domains/') and k.endswith('/mAP50'))
  if domains:
    lines += ['', '| domain | mAP50 |', '|---|---|']
    lines += [f'| {k.split("/")[1]} | {_fmt(metrics[k])} |' for k in domains]
  return lines


def write_report(workdir, out, predict_dir=None, wall_seconds=None, split='test'):
  out_dir = os.path.dirname(os.path.abspath(out))
  asset_dir = os.path.join(out_dir, 'report_assets')
  os.makedirs(asset_dir, exist_ok=True)
  lines = ['# lld-jax run report', '', f'Run directory: `{workdir}`']
  if wall_seconds is not None:
    lines.append(f'Wall time (set-up to report): {wall_seconds / 60:.1f} min')
  config_path = os.path.join(workdir, 'config.json')
  if os.path.exists(config_path):
    with open(config_path) as f:
      config = json.load(f)
    lines.append(f"Config: {config.get('total_steps')} steps, image size {config.get('image_size')}, "
                 f"backbone {config.get('model', {}).get('backbone')}")
  metrics_path = os.path.join(workdir, 'eval', split, 'metrics.json')
  if os.path.exists(metrics_path):
    with open(metrics_path) as f:
      metrics = json.load(f)
    lines += ['', f'## Metrics ({split} split)', ''] + metrics_section(metrics)
    for name in ('pr_curves.png', 'attribute_confusions.png', 'domain_map.png'):
      source = os.path.join(workdir, 'eval', split, name)
      if os.path.exists(source):
        shutil.copy(source, os.path.join(asset_dir, name))
        lines += ['', f'![{name}](report_assets/{name})']
  history = read_scalars(workdir)
  curves = {k: v for k, v in history.items()
            if k in ('loss', 'eval/mAP50', 'eval/attributes/mean_f1_strict', 'grad_norm', 'steps_per_sec')}
  if curves:
    plots.plot_training_curves(curves, os.path.join(asset_dir, 'training_curves.png'))
    lines += ['', '## Training curves', '', '![training curves](report_assets/training_curves.png)']
  if predict_dir and os.path.isdir(os.path.join(predict_dir, 'overlays')):
    lines += ['', '## Predictions', '']
    for path in sorted(glob.glob(os.path.join(predict_dir, 'overlays', '*.png'))):
      target = os.path.join(asset_dir, 'overlay_' + os.path.basename(path))
      shutil.copy(path, target)
      lines.append(f'![{os.path.basename(path)}](report_assets/{os.path.basename(target)})')
  with open(out, 'w') as f:
    f.write('\n'.join(lines) + '\n')
  return out


FLAGS = flags.FLAGS


def _define_flags():
  flags.DEFINE_string('workdir', None, 'Training directory.')
  flags.DEFINE_string('out', None, 'Markdown file to write.')
  flags.DEFINE_string('predict_dir', None, 'Output folder of lld_jax.predict (overlays).')
  flags.DEFINE_string('split', 'test', 'Evaluated split to report.')
  flags.DEFINE_integer('wall_seconds', None, 'Wall time of the whole run, for the report.')


def main(argv):
  del argv
  print('wrote', write_report(FLAGS.workdir, FLAGS.out, FLAGS.predict_dir, FLAGS.wall_seconds, FLAGS.split))


if __name__ == '__main__':
  _define_flags()
  flags.mark_flags_as_required(['workdir', 'out'])
  app.run(main)
