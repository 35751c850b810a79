"""scripts/paired_bootstrap.py: the paired comparison of resampled metrics, and its refusals."""

import numpy as np
import pytest

from repo import load_script

paired_bootstrap = load_script('paired_bootstrap')


def test_differences_are_paired_by_resample():
  rng = np.random.default_rng(0)
  # Both runs move together with the resample (a shared image difficulty); b is ahead by 0.02 +- 0.005.
  shared = rng.normal(0.5, 0.05, 1000)
  lead = rng.normal(0.02, 0.005, 1000)
  samples = {'a': {'mAP50': shared, 'cells/AP50': shared + 0.3},
             'b': {'mAP50': shared + lead, 'cells/AP50': shared + 0.3 - lead}}
  values = {'a': {'mAP50': 0.5, 'cells/AP50': 0.8}, 'b': {'mAP50': 0.52, 'cells/AP50': 0.78}}
  rows = paired_bootstrap.compare(values, samples, ['a', 'b'])
  assert [r['run'] for r in rows] == ['a', 'b', 'b - a']
  assert rows[0]['mAP50']['interval'] == pytest.approx(tuple(np.percentile(shared, [2.5, 97.5])))
  difference = rows[2]['mAP50']
  assert difference['value'] == pytest.approx(0.02)
  assert difference['interval'] == pytest.approx(tuple(np.percentile(lead, [2.5, 97.5])))
  # Paired, the lead is clear although each run's own interval (about +-0.1) is far wider than it.
  assert 0.005 < difference['interval'][0] < difference['interval'][1] < 0.035
  assert difference['share_ahead'] == pytest.approx(np.mean(lead > 0)) and difference['share_ahead'] > 0.99
  assert rows[2]['cells/AP50']['share_ahead'] < 0.01
  assert difference['ratio'] == pytest.approx(0.52 / 0.5)
  assert difference['ratio_interval'] == pytest.approx(
      tuple(np.percentile((shared + lead) / shared, [2.5, 97.5])))
  lines = paired_bootstrap.table_lines(rows)
  assert len(lines) == 5 and '+0.020' in lines[4] and '-0.020' in lines[4]


def test_needs_two_runs_and_their_predictions(tmp_path, capsys):
  with pytest.raises(SystemExit):
    paired_bootstrap.main(['--runs=only_one'])
  assert 'two runs' in capsys.readouterr().err
  for name in ('a', 'b'):
    (tmp_path / name).mkdir()
    (tmp_path / name / 'config.json').write_text(
        '{"dataset": {"name": "lld", "config": "full", "data_dir": "", "eval_split": "test"}}')
  with pytest.raises(FileNotFoundError, match='predictions.json'):
    paired_bootstrap.main([f'--runs={tmp_path / "a"},{tmp_path / "b"}'])
