"""scripts/sparse_benchmark.py: each setting trains what its name says, on both datasets' configs."""

import os
import subprocess
import sys

import pytest

from config_parsing import parse_train_config
from repo import REPO_ROOT
from repo import load_script

sparse_benchmark = load_script('sparse_benchmark')

DOWNLOADS = {'full': '/data/full', 'sparse': '/data/sparse'}
# (dataset.config, loss.region_restricted, pseudo_labels.enabled, loss.unlabelled_background_below,
# loss.unlabelled_background_relative, loss.region_negative_weight_max) that each setting must train with.
EXPECTED = {
    'a_full': ('full', True, False, 0.0, False, 1.0),
    'b_sparse_as_background': ('sparse', False, False, 0.0, False, 1.0),
    'c_region_restricted': ('sparse', True, False, 0.0, False, 1.0),
    'd_region_restricted_pseudo': ('sparse', True, True, 0.0, False, 1.0),
    'e_region_restricted_unsure_as_background': ('sparse', True, False, 0.4, False, 1.0),
    'f_region_restricted_relatively_unsure_as_background': ('sparse', True, False, 0.4, True, 1.0),
    'h_region_restricted_negatives_reweighted': ('sparse', True, False, 0.0, False, 6.0),
}


def _arguments(name, config, overrides=()):
  return sparse_benchmark.train_arguments(
      name, config=config, workdir=f'/runs/{name}', steps=321, downloads=DOWNLOADS, data_dir='/runs/tfds',
      split='val', pseudo_threshold=0.7, pseudo_warmup_steps=107, unlabelled_background_below=0.4,
      region_negative_weight_max=6.0, overrides=overrides)


@pytest.mark.parametrize('config_file', ['configs/txl_pbc.py', 'configs/synthetic_demo.py'])
def test_settings_configure_what_they_name(config_file):
  assert set(sparse_benchmark.SETTINGS) == set(EXPECTED)
  for name, (dataset_config, region_restricted, pseudo, background_below, relative, negative_weight_max) in (
      EXPECTED.items()):
    config = parse_train_config(_arguments(name, config_file))
    assert config['dataset']['config'] == dataset_config, name
    assert config['dataset']['manual_dir'] == DOWNLOADS[dataset_config], name
    assert config['loss']['region_restricted'] is region_restricted, name
    assert config['pseudo_labels']['enabled'] is pseudo, name
    assert config['loss']['unlabelled_background_below'] == background_below, name
    assert config['loss']['unlabelled_background_relative'] is relative, name
    assert config['loss']['region_negative_weight_max'] == negative_weight_max, name
    # One budget for every setting, evaluated once at its end on the fully annotated split.
    assert config['total_steps'] == 321 and config['eval_every_steps'] == 321, name
    assert config['dataset']['eval_split'] == 'val' and config['dataset']['data_dir'] == '/runs/tfds', name
    if pseudo:
      assert config['pseudo_labels']['threshold'] == 0.7
      assert config['pseudo_labels']['warmup_steps'] == 107
      assert config['pseudo_labels']['on_images_without_region'] is False  # trained on (c)'s images


def test_bootstrap_compares_with_the_plain_detector_first():
  order = sparse_benchmark.bootstrap_order(['a_full', 'c_region_restricted', 'b_sparse_as_background'])
  assert order == ['b_sparse_as_background', 'a_full', 'c_region_restricted']
  assert sparse_benchmark.bootstrap_order(['d_region_restricted_pseudo', 'c_region_restricted']) == [
      'c_region_restricted', 'd_region_restricted_pseudo']
  assert sparse_benchmark.bootstrap_order(['c_region_restricted']) == []


def test_user_overrides_come_last_and_win():
  config = parse_train_config(_arguments('d_region_restricted_pseudo', 'configs/txl_pbc.py',
                                         ['--config.seed=3', '--config.pseudo_labels.threshold=0.9']))
  assert config['seed'] == 3 and config['pseudo_labels']['threshold'] == 0.9


def test_table_lines():
  rows = {'a_full': {'mAP50': 0.9081, 'mAP50_95': 0.685, 'cells/AP50': 0.95, 'attributes/mean_f1_strict': None,
                     'pseudo_labels_per_step': None},
          'd_region_restricted_pseudo': {'pseudo_labels_per_step': 10.04, 'mAP50': 0.79, 'mAP50_95': 0.5852,
                                         'attributes/mean_f1_strict': 0.25}}
  lines = sparse_benchmark.table_lines(rows)
  assert len(lines) == 4 and lines[0].count('|') == lines[1].count('|') == lines[2].count('|') == 7
  assert lines[0].startswith('| setting | mAP50 | mAP50:95 | cells AP50')
  assert lines[2] == '| a_full | 0.908 | 0.685 | 0.950 | - | - |'
  # Columns follow COLUMNS whatever the order of a row's keys; a key the row lacks is shown as missing.
  assert lines[3] == '| d_region_restricted_pseudo | 0.790 | 0.585 | - | 0.250 | 10.040 |'


@pytest.mark.parametrize('argv, message', [
    (['--settings=c_region_restricted,f_unknown'], "unknown ['f_unknown']"),
    (['--config_seed=1'], 'only --config.key=value overrides pass through'),
])
def test_bad_arguments_are_refused_before_training(tmp_path, argv, message):
  command = [sys.executable, sparse_benchmark.__file__, '--dataset=txl_pbc', '--steps=10', f'--out={tmp_path}/out']
  result = subprocess.run(command + argv, capture_output=True, text=True, cwd=REPO_ROOT, check=False)
  assert result.returncode == 2 and message in result.stderr
  assert not os.path.exists(tmp_path / 'out')
