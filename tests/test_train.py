"""End to end on a tiny config with 2 simulated devices: train, checkpoint, resume, evaluate, predict."""

import json
import os

import jax
import numpy as np
import pytest

from lld_jax import class_context
from lld_jax import evaluate
from lld_jax import input_pipeline
from lld_jax import train
from lld_jax.default_config import base_config
from config_parsing import parse_train_config
from tiny_training import TOTAL_STEPS
from tiny_training import tiny_config


def _leaves_equal(a, b):
  return all(np.array_equal(x, y) for x, y in zip(jax.tree_util.tree_leaves(a), jax.tree_util.tree_leaves(b)))


def test_two_devices_are_simulated():
  assert jax.local_device_count() == 2


def test_modules_sharing_the_training_run_are_one_xdist_group(request):
  """Under `scripts/test.sh` (--dist loadgroup) this module and test_reliability run in one worker, which trains
  the shared uninterrupted run once; pytest 9.2 with xdist 3.8 dropped the groups and trained it in both."""
  if not getattr(request.config.option, 'loadgroup', False):  # set by xdist in its workers
    pytest.skip('runs under --dist loadgroup only')
  assert request.node.nodeid.endswith('@shared_uninterrupted_run')


def test_train_resume_evaluate_predict(tiny_download, uninterrupted_run, tmp_path):
  config = tiny_config(tiny_download)
  _, uninterrupted = uninterrupted_run
  interrupted_dir = str(tmp_path / 'interrupted')
  first_half = train.train_and_evaluate(config, interrupted_dir, stop_at_step=TOTAL_STEPS // 2)
  assert int(first_half.step) == TOTAL_STEPS // 2
  resumed = train.train_and_evaluate(config, interrupted_dir)
  assert int(resumed.step) == TOTAL_STEPS
  assert _leaves_equal(resumed.params, uninterrupted.params)
  assert _leaves_equal(resumed.opt_state, uninterrupted.opt_state)
  assert _leaves_equal(resumed.ema_params, uninterrupted.ema_params)

  # Training ended by evaluating its eval split; evaluate's functions give the same file again.
  assert os.path.exists(os.path.join(interrupted_dir, 'eval', 'test', 'metrics.json'))
  builder = input_pipeline.load_builder('lld', 'full', config.dataset.data_dir)
  model, state = evaluate.restore_for_inference(config, interrupted_dir, 14)
  result = evaluate.evaluate_split(model, state, builder, 'test', config)
  evaluate.write_evaluation(result, os.path.join(interrupted_dir, 'eval', 'test'))
  with open(os.path.join(interrupted_dir, 'eval', 'test', 'metrics.json')) as f:
    metrics = json.load(f)
  assert metrics['num_images'] == builder.info.splits['test'].num_examples
  # The attribute values were decided with the training split's counts, which the run left for predict.
  assert metrics['attributes/logit_adjustment'] == config.eval.attribute_logit_adjustment == 1.0
  np.testing.assert_array_equal(
      evaluate.read_attribute_counts(os.path.join(interrupted_dir, evaluate.ATTRIBUTE_COUNTS_FILE)),
      input_pipeline.count_attribute_values(builder, 'train'))
  # The classes were read in their films' context, with the training split's counts per leukemia type.
  assert metrics['class_context'] == config.eval.class_context == 'patient'
  counts, types = class_context.read_counts(os.path.join(interrupted_dir, class_context.COUNTS_FILE),
                                            input_pipeline.dataset_info(builder).class_names)
  expected_counts, expected_types, unknown = input_pipeline.count_classes_by_type(builder, 'train')
  np.testing.assert_array_equal(counts, expected_counts)
  assert types == expected_types and unknown == 0
  for key in ('mAP50', 'mAP50_95', 'attributes/mean_f1_strict', 'attributes/mean_f1_paper',
              'domains/H_100x_C1/mAP50'):
    assert key in metrics
  # predictions.json holds what was scored: scoring it again gives the same metrics.
  saved = evaluate.read_predictions(os.path.join(interrupted_dir, 'eval', 'test', 'predictions.json'))
  assert [p.image_id for p in saved] == [p.image_id for p in result.predictions]
  truths = evaluate.ground_truth(builder, 'test')
  again = evaluate.score_predictions(truths, saved, result.class_names, config)
  for key in ('mAP50', 'cells/AP50', 'attributes/mean_f1_strict'):
    assert again.metrics[key] == pytest.approx(metrics[key], nan_ok=True)
  # The films the context grouped by: each field's patient, read in the same pass as its annotations.
  test_images = sorted((tiny_download / 'download' / 'H_100x_C1' / 'Images' / 'test').glob('*.png'))
  assert all(truth.patient for truth in truths)
  assert sorted(truth.patient for truth in truths) == sorted(class_context.patient_of(p.name) for p in test_images)
  with pytest.raises(ValueError, match='needs the patient of each image of test'):
    evaluate.predict_split(model, state, builder, 'test', config)

  from lld_jax import predict
  summary = predict.run(interrupted_dir, str(test_images[0]), str(tmp_path / 'predict'), score_threshold=0.0)
  assert os.path.exists(tmp_path / 'predict' / 'detections.json')
  assert summary['attribute_decisions'] == 'logit adjustment 1 by the training prior'
  assert summary['class_decisions'] == 'in the context of its patient'

  from lld_jax import report
  report_path = report.write_report(interrupted_dir, str(tmp_path / 'report.md'), str(tmp_path / 'predict'))
  with open(report_path) as f:
    text = f.read()
  assert '## Metrics (test split)' in text and 'training_curves.png' in text and 'overlay_' in text
  assert '| attributes/logit_adjustment | 1.000 |' in text
  assert '| class_context | patient |' in text


def test_a_finished_run_launched_again_compiles_nothing_and_keeps_its_state(tiny_download, uninterrupted_run,
                                                                            tmp_path, monkeypatch):
  import shutil
  from lld_jax import sharding
  workdir, finished = uninterrupted_run
  again_dir = tmp_path / 'again'
  shutil.copytree(workdir, again_dir)

  def no_compiling(*args, **kwargs):
    raise AssertionError('a finished run compiled its train step')

  monkeypatch.setattr(sharding, 'shapes_on_devices', no_compiling)
  state = train.train_and_evaluate(tiny_config(tiny_download), str(again_dir))
  assert int(state.step) == TOTAL_STEPS
  assert _leaves_equal(state.params, finished.params)


def test_training_attribute_counts_read_back_on_resume_and_skipped_when_off(tiny_download, tmp_path):
  config = tiny_config(tiny_download)
  builder = input_pipeline.load_builder('lld', 'full', config.dataset.data_dir, config.dataset.manual_dir)
  counted = input_pipeline.count_attribute_values(builder, 'train')
  path = tmp_path / evaluate.ATTRIBUTE_COUNTS_FILE
  np.testing.assert_array_equal(train.training_attribute_counts(builder, config, str(tmp_path), False), counted)
  np.testing.assert_array_equal(evaluate.read_attribute_counts(path), counted)
  assert not list(tmp_path.glob('*.tmp'))
  marked = counted.copy()
  marked[0, 0] += 1000
  evaluate.write_attribute_counts(marked, path)
  # A resumed run uses what its first start wrote; a fresh start counts the split again.
  np.testing.assert_array_equal(train.training_attribute_counts(builder, config, str(tmp_path), True), marked)
  np.testing.assert_array_equal(train.training_attribute_counts(builder, config, str(tmp_path), False), counted)
  config.eval.attribute_logit_adjustment = 0.0
  off = tmp_path / 'off'
  off.mkdir()
  assert train.training_attribute_counts(builder, config, str(off), False) is None
  assert not (off / evaluate.ATTRIBUTE_COUNTS_FILE).exists()


def test_training_class_counts_per_type_read_back_on_resume_and_skipped_when_off(tiny_download, tmp_path,
                                                                                 monkeypatch):
  import tensorflow_datasets as tfds
  config = tiny_config(tiny_download)
  builder = input_pipeline.load_builder('lld', 'full', config.dataset.data_dir, config.dataset.manual_dir)
  type_feature = builder.info.features['leukemia_type']
  expected = {}
  for example in tfds.as_numpy(builder.as_dataset(split='train')):
    row = expected.setdefault(type_feature.int2str(int(example['leukemia_type'])), np.zeros(14, np.int64))
    np.add.at(row, example['objects']['label'], 1)
  counts, types = train.training_class_counts(builder, config, str(tmp_path), False)
  assert len(expected) >= 2 and 'unknown' not in expected
  for name, row in zip(types, counts):
    np.testing.assert_array_equal(row, expected.get(name, np.zeros(14, np.int64)))
  class_names = input_pipeline.dataset_info(builder).class_names
  written, written_types = class_context.read_counts(str(tmp_path / class_context.COUNTS_FILE), class_names)
  np.testing.assert_array_equal(written, counts)
  marked = counts.copy()
  marked[0, 0] += 1000
  class_context.write_counts(marked, types, class_names, str(tmp_path / class_context.COUNTS_FILE))
  # A resumed run uses what its first start wrote.
  np.testing.assert_array_equal(train.training_class_counts(builder, config, str(tmp_path), True)[0], marked)
  one_type = tmp_path / 'one_type'
  one_type.mkdir()
  monkeypatch.setattr(input_pipeline, 'count_classes_by_type', lambda *args: (counts[:1], types[:1], 0))
  with pytest.raises(ValueError, match='eval.class_context=patient on train of lld: .*at least two leukemia types.*'
                                       'eval.class_context=none classifies each cell alone'):
    train.training_class_counts(builder, config, str(one_type), False)
  config.eval.class_context = 'none'
  off = tmp_path / 'off'
  off.mkdir()
  assert train.training_class_counts(builder, config, str(off), False) is None
  assert not (off / class_context.COUNTS_FILE).exists()


def test_config_overrides():
  config = parse_train_config(['--config=configs/synthetic_demo.py', '--config.total_steps=7',
                               '--config.model.num_queries=12', '--config.dataset.manual_dir=/data/lld'])
  assert config['total_steps'] == 7 and config['model']['num_queries'] == 12
  assert config['dataset']['manual_dir'] == '/data/lld'


def test_misspelled_override_fails():
  with pytest.raises(ValueError, match='totl_steps'):
    parse_train_config(['--config=configs/synthetic_demo.py', '--config.totl_steps=7'])


def test_images_without_region_are_left_out_only_where_they_add_no_loss():
  config = base_config()
  assert train.images_without_region_add_no_loss(config)  # region-restricted, no pseudo-labels
  for key, value in (('loss.region_restricted', False), ('pseudo_labels.enabled', True),
                     ('loss.unlabelled_background_below', 0.5)):
    changed = base_config()
    changed.update_from_flattened_dict({key: value})
    assert not train.images_without_region_add_no_loss(changed), key
  pseudo_labels_elsewhere = base_config()
  pseudo_labels_elsewhere.pseudo_labels.enabled = True
  pseudo_labels_elsewhere.pseudo_labels.on_images_without_region = False
  assert train.images_without_region_add_no_loss(pseudo_labels_elsewhere)


class _Writer:
  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars[step] = scalars


@pytest.mark.parametrize('counts, skip', [((3, 5), True), ((5, 5), False)])
def test_skipping_images_without_region_is_counted(monkeypatch, counts, skip):
  monkeypatch.setattr(input_pipeline, 'count_images_with_region', lambda builder, split: counts)
  writer = _Writer()
  assert train.should_skip_images_without_region(None, base_config(), writer, 7) is skip
  assert writer.scalars == ({7: {'data/train_images_used': 3, 'data/train_images_skipped_without_region': 2}}
                            if skip else {})
  kept = base_config()
  kept.dataset.skip_images_without_region = False
  assert not train.should_skip_images_without_region(None, kept, writer, 7)


def test_a_split_without_any_region_fails_clearly(monkeypatch):
  monkeypatch.setattr(input_pipeline, 'count_images_with_region', lambda builder, split: (0, 4))
  with pytest.raises(ValueError, match='none of the 4 images has an annotated region'):
    train.should_skip_images_without_region(None, base_config(), _Writer(), 0)
