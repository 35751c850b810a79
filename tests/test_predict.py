"""Tests for lld_jax.predict: resizing and box round trip, bad files, outputs and overlays (tiny model)."""

from __future__ import annotations

import json
import os
import re
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from PIL import Image

from lld_jax import metrics
from lld_jax import postprocess
from lld_jax import predict
from lld_jax import train
from lld_jax.default_config import base_config
from tfds_lld import lld_format

IMAGE_SIZE = 64


def tiny_config():
  """configs/synthetic_demo.py, shrunk."""
  c = base_config()
  c.per_device_batch_size = 2
  c.image_size = IMAGE_SIZE
  c.max_objects = 4
  c.dataset.name = 'lld'
  c.dataset.config = 'full'
  m = c.model
  m.backbone = 'resnet18'
  m.backbone_norm = 'group_norm'
  m.backbone_width = 8
  m.hidden_dim = 32
  m.num_heads = 2
  m.ffn_dim = 64
  m.num_decoder_layers = 1
  m.num_queries = 8
  m.denoising_groups = 1
  c.optimizer.ema_decay = 0.999
  c.eval.max_detections = 5
  return c


def _fill(path, leaf, rng):
  """Deterministic stand-in weights (no jax.random, whose compile per shape is slow on CPU)."""
  last = path[-1] if path else None
  name = str(getattr(last, 'key', getattr(last, 'name', '')))
  if np.issubdtype(leaf.dtype, np.integer) or leaf.dtype == np.uint32:
    return np.zeros(leaf.shape, leaf.dtype)
  if name == 'scale' or 'var' in name:
    return np.ones(leaf.shape, leaf.dtype)
  if name == 'bias' or 'mean' in name:
    return np.zeros(leaf.shape, leaf.dtype)
  return (rng.standard_normal(leaf.shape) * 0.05).astype(leaf.dtype)


def _write_workdir(directory, config, seed):
  """A workdir as train.py leaves it: config.json and a step-0 checkpoint of stand-in weights."""
  model = train.create_model(config, lld_format.NUM_CLASSES)
  abstract = jax.eval_shape(lambda r: train.create_train_state(model, config, r)[0], jax.random.PRNGKey(0))
  rng = np.random.default_rng(seed)
  state = jax.tree_util.tree_map_with_path(lambda path, leaf: _fill(path, leaf, rng), abstract)
  latest, _ = train.checkpoint_managers(directory, config)
  latest.save(0, args=ocp.args.StandardSave(state))
  latest.wait_until_finished()
  with open(directory / 'config.json', 'w') as f:
    f.write(config.to_json_best_effort(indent=2))
  return directory


@pytest.fixture(scope='module')
def workdir(tmp_path_factory):
  return _write_workdir(tmp_path_factory.mktemp('workdir'), tiny_config(), seed=0)


@pytest.fixture(scope='module')
def predicted(workdir, tmp_path_factory):
  images = tmp_path_factory.mktemp('images')
  rng = np.random.default_rng(1)
  Image.fromarray(rng.integers(0, 256, (180, 300, 3), np.uint8)).save(images / 'a_landscape.png')
  Image.fromarray(rng.integers(0, 256, (300, 180), np.uint8)).save(images / 'b_portrait_grey.jpg')
  Image.fromarray(rng.integers(0, 256, (50, 40, 4), np.uint8)).save(images / 'c_rgba.png')
  good = (images / 'a_landscape.png').read_bytes()
  (images / 'd_truncated.png').write_bytes(good[:300])
  (images / 'e_text.tif').write_text('not an image')
  (images / 'notes.txt').write_text('ignored: not an image extension')
  out = tmp_path_factory.mktemp('out')
  summary = predict.run(workdir, str(images), str(out), score_threshold=0.0, batch_size=2)
  return summary, out


# --------------------------------------------------------------------------------------- resizing and round trip


@pytest.mark.parametrize('height, width', [(160, 256), (256, 160), (180, 300), (300, 180)])
def test_prepare_matches_eval_pipeline(height, width):
  """`prepare` gives the eval branch of input_pipeline.preprocess: same canvas, mask and scale."""
  import tensorflow as tf
  from lld_jax import input_pipeline
  image = np.random.default_rng(0).integers(0, 256, (height, width, 3), np.uint8)
  canvas, mask, scale = predict.prepare(image, IMAGE_SIZE)
  example = {'image': tf.constant(image), 'annotation_mask': tf.ones([height, width, 1], tf.uint8),
             'objects': {'bbox': tf.zeros([0, 4]), 'label': tf.zeros([0], tf.int64),
                         'attributes': tf.zeros([0, lld_format.NUM_ATTRIBUTES], tf.int32)}}
  ref = input_pipeline.preprocess(example, 0, image_size=IMAGE_SIZE, max_objects=4, train=False, seed=0,
                                  augment=base_config().augment)
  np.testing.assert_allclose(canvas, ref['image'].numpy(), atol=1e-5)
  np.testing.assert_array_equal(mask, ref['image_mask'].numpy())
  assert scale == float(ref['scale'].numpy())
  new_h, new_w = round(height * IMAGE_SIZE / max(height, width)), round(width * IMAGE_SIZE / max(height, width))
  assert mask[:new_h, :new_w].all() and mask.sum() == new_h * new_w
  padding = (0 - np.asarray(input_pipeline.IMAGENET_MEAN)) / np.asarray(input_pipeline.IMAGENET_STD)
  np.testing.assert_allclose(canvas[-1, -1] if (new_h < IMAGE_SIZE or new_w < IMAGE_SIZE) else padding, padding,
                             rtol=1e-6)


def _round_trip(height, width, canvas_xyxy):
  image = np.zeros((height, width, 3), np.uint8)
  _, _, scale = predict.prepare(image, IMAGE_SIZE)
  x0, y0, x1, y1 = np.asarray(canvas_xyxy, np.float64) / IMAGE_SIZE
  boxes = np.zeros((3, 4), np.float32)
  boxes[1] = [(x0 + x1) / 2, (y0 + y1) / 2, x1 - x0, y1 - y0]
  logits = np.full((3, 2), -10.0, np.float32)
  logits[1, 1] = 5.0
  attribute_logits = np.zeros((3, lld_format.NUM_ATTRIBUTES, 3), np.float32)
  found = postprocess.to_detections(logits, boxes, attribute_logits, IMAGE_SIZE, scale, (height, width),
                                    max_detections=1)
  assert found.labels.tolist() == [1]
  return scale, found.boxes[0]


@pytest.mark.parametrize('height, width, canvas_box, expected', [
    # Landscape 256 x 160 (W x H): scale 0.25, content 64 x 40 at the top left of the canvas.
    (160, 256, (8, 4, 24, 36), (32, 16, 96, 144)),
    # Portrait 160 x 256: scale 0.25, content 40 x 64.
    (256, 160, (4, 8, 36, 56), (16, 32, 144, 224)),
    # A box reaching into the padding is clipped to the original image.
    (160, 256, (48, 30, 64, 50), (192, 120, 256, 160)),
])
def test_box_round_trip_exact(height, width, canvas_box, expected):
  scale, box = _round_trip(height, width, canvas_box)
  assert scale == 0.25
  np.testing.assert_array_equal(box, expected)


@pytest.mark.parametrize('height, width', [(180, 300), (300, 180)])
def test_box_round_trip_non_dyadic(height, width):
  """300 x 180 and 180 x 300: a canvas box maps back to canvas / scale with scale = 64 / 300."""
  scale, box = _round_trip(height, width, (10, 5, 30, 25))
  assert scale == pytest.approx(IMAGE_SIZE / 300, rel=1e-7)
  np.testing.assert_allclose(box, np.array([10, 5, 30, 25]) * 300 / IMAGE_SIZE, rtol=1e-6)


# ------------------------------------------------------------------------------------------- loading and files


def test_load_image_conversions_and_errors(tmp_path):
  Image.fromarray(np.full((7, 5), 200, np.uint8)).save(tmp_path / 'grey.png')
  rgba = np.zeros((4, 6, 4), np.uint8)
  rgba[..., 0] = 255
  rgba[0, 0, 3] = 255  # one opaque red pixel, the rest transparent (-> white)
  Image.fromarray(rgba).save(tmp_path / 'rgba.png')
  Image.fromarray(np.full((3, 3), 4000, np.uint16)).save(tmp_path / 'deep.png')
  grey = predict.load_image(tmp_path / 'grey.png')
  assert grey.shape == (7, 5, 3) and grey.dtype == np.uint8 and (grey == 200).all()
  out = predict.load_image(tmp_path / 'rgba.png')
  assert out.shape == (4, 6, 3) and out[0, 0].tolist() == [255, 0, 0] and out[1, 1].tolist() == [255, 255, 255]
  assert predict.load_image(tmp_path / 'deep.png').shape == (3, 3, 3)
  (tmp_path / 'bad.png').write_bytes(b'\x89PNG\r\n\x1a\n garbage')
  with pytest.raises(predict.ImageLoadError, match='bad.png'):
    predict.load_image(tmp_path / 'bad.png')
  with pytest.raises(predict.ImageLoadError, match='missing.png'):
    predict.load_image(tmp_path / 'missing.png')


def test_find_images(tmp_path):
  for name in ('b.PNG', 'a.jpg', 'c.tiff', 'x.txt'):
    (tmp_path / name).write_bytes(b'')
  (tmp_path / 'sub').mkdir()
  (tmp_path / 'sub' / 'd.png').write_bytes(b'')
  paths, root = predict.find_images(str(tmp_path))
  assert [os.path.basename(p) for p in paths] == ['a.jpg', 'b.PNG', 'c.tiff'] and root == str(tmp_path)
  paths, _ = predict.find_images(str(tmp_path / '**' / '*.png'))
  assert [os.path.basename(p) for p in paths] == ['d.png']
  assert predict.find_images(str(tmp_path / 'a.jpg'))[0] == [str(tmp_path / 'a.jpg')]


def test_short_attributes():
  attrs = dict(zip(lld_format.ATTRIBUTE_NAMES, ('large', 'open', 'irregular', 'prominent', 'scanty', 'moderate',
                                                'absent')))
  assert predict.short_attributes(attrs) == 'large, open, irregular, nucleolus+, scanty, moderate, vac-'


# --------------------------------------------------------------------------------------------- end to end (tiny)


def test_bad_files_reported_rest_processed(predicted, capsys):
  summary, out = predicted
  assert summary['num_inputs'] == 5  # notes.txt is not an image extension: not an input
  assert summary['num_images'] == 3
  skipped = json.loads((out / 'skipped.json').read_text())
  assert [os.path.basename(s['file']) for s in skipped] == ['d_truncated.png', 'e_text.tif']
  assert [s['image_id'] for s in skipped] == [3, 4]
  assert 'truncated' in skipped[0]['reason'] and 'cannot identify' in skipped[1]['reason']
  assert summary['skipped'] == skipped


def test_detections_are_coco_results(predicted):
  summary, out = predicted
  detections = json.loads((out / 'detections.json').read_text())
  images = json.loads((out / 'images.json').read_text())
  assert images == {'0': {'file_name': 'a_landscape.png', 'width': 300, 'height': 180},
                    '1': {'file_name': 'b_portrait_grey.jpg', 'width': 180, 'height': 300},
                    '2': {'file_name': 'c_rgba.png', 'width': 40, 'height': 50}}
  assert len(detections) == summary['num_detections']
  for image_id in range(3):  # threshold 0: every cell among the top max_detections (5) pairs, each cell once
    found = [d for d in detections if d['image_id'] == image_id]
    assert 1 <= len(found) <= 5
    xyxy = np.array([[x, y, x + w, y + h] for x, y, w, h in (d['bbox'] for d in found)])
    overlap = metrics.box_iou(xyxy, xyxy)
    assert (overlap[~np.eye(len(found), dtype=bool)] <= 0.7 + 1e-6).all()
    assert all(0 <= d['cell_score'] <= 1 for d in found)
  for d in detections:
    assert isinstance(d['image_id'], int) and str(d['image_id']) in images
    assert d['file_name'] == images[str(d['image_id'])]['file_name']
    assert 1 <= d['category_id'] <= lld_format.NUM_CLASSES
    assert d['category_name'] == lld_format.CLASS_NAMES[d['category_id'] - 1]
    x, y, w, h = d['bbox']
    size = images[str(d['image_id'])]
    assert 0 <= x and 0 <= y and w >= 0 and h >= 0
    assert x + w <= size['width'] + 0.01 and y + h <= size['height'] + 0.01
    assert 0 <= d['score'] <= 1
    assert set(d['attributes']) == set(lld_format.ATTRIBUTE_NAMES) == set(d['attribute_scores'])
    for a, name in enumerate(lld_format.ATTRIBUTE_NAMES):
      assert d['attributes'][name] in lld_format.ATTRIBUTE_VALUES[a]
      assert 1 / len(lld_format.ATTRIBUTE_VALUES[a]) - 1e-3 <= d['attribute_scores'][name] <= 1
  scores = [d['score'] for d in detections if d['image_id'] == 0]
  assert scores == sorted(scores, reverse=True)


def test_overlays_for_each_good_image(predicted):
  summary, out = predicted
  names = sorted(os.listdir(out / 'overlays'))
  assert names == ['a_landscape.png', 'b_portrait_grey.png', 'c_rgba.png']
  with Image.open(out / 'overlays' / 'c_rgba.png') as overlay:
    assert max(overlay.size) >= 1024  # small images are drawn upscaled
  assert len(summary['overlays']) == 3


def test_threshold_and_exit_status(workdir, tmp_path):
  (tmp_path / 'broken.png').write_bytes(b'nope')
  summary = predict.run(workdir, str(tmp_path / 'broken.png'), str(tmp_path / 'out'))
  assert summary['num_images'] == 0 and len(summary['skipped']) == 1
  assert json.loads((tmp_path / 'out' / 'detections.json').read_text()) == []
  with pytest.raises(FileNotFoundError, match='no image files'):
    predict.run(workdir, str(tmp_path / 'nothing*.png'), str(tmp_path / 'out2'))


def test_model_trained_without_attributes_reports_none(workdir, tmp_path):
  images = tmp_path / 'images'
  images.mkdir()
  Image.fromarray(np.random.default_rng(2).integers(0, 256, (120, 200, 3), np.uint8)).save(images / 'field.png')
  no_attributes = tiny_config()
  no_attributes.loss.attribute_weight = 0.0  # as configs/txl_pbc.py: the attribute head never trained
  runs = {name: predict.run(workdir, str(images), str(tmp_path / name), config=config, score_threshold=0.0)
          for name, config in (('with', None), ('without', no_attributes))}
  found = {name: json.loads((tmp_path / name / 'detections.json').read_text()) for name in runs}
  assert found['with'] and all('attributes' in d and 'attribute_scores' in d for d in found['with'])
  assert not any('attributes' in d or 'attribute_scores' in d for d in found['without'])
  assert runs['without']['attribute_decisions'].startswith('none')
  # The same detections otherwise.
  strip = lambda d: {k: v for k, v in d.items() if k not in ('attributes', 'attribute_scores')}
  assert [strip(d) for d in found['with']] == found['without']
  # The overlay's legend lists no attribute words (and no attribute key), so it is narrower.
  widths = {}
  for name, summary in runs.items():
    with Image.open(summary['overlays'][0]) as overlay:
      widths[name] = overlay.size[0]
  assert widths['without'] < widths['with']


def test_attributes_decided_with_the_runs_training_counts(workdir, predicted, tmp_path):
  from lld_jax import evaluate
  assert 'missing' in predicted[0]['attribute_decisions']  # the fixture's workdir has no counts: plain argmax
  images = tmp_path / 'images'
  images.mkdir()
  Image.fromarray(np.random.default_rng(3).integers(0, 256, (120, 200, 3), np.uint8)).save(images / 'field.png')
  vacuoles = lld_format.ATTRIBUTE_NAMES.index('cytoplasmic_vacuoles')
  for common, rare in (('absent', 'prominent'), ('prominent', 'absent')):
    run = tmp_path / f'run_{rare}'
    shutil.copytree(workdir, run)
    counts = (np.arange(3)[None, :] < np.array(lld_format.NUM_ATTRIBUTE_VALUES)[:, None]).astype(np.int64)
    counts[vacuoles, lld_format.ATTRIBUTE_VALUES[vacuoles].index(common)] = 10**9
    evaluate.write_attribute_counts(counts, run / evaluate.ATTRIBUTE_COUNTS_FILE)
    np.testing.assert_array_equal(evaluate.read_attribute_counts(run / evaluate.ATTRIBUTE_COUNTS_FILE), counts)
    summary = predict.run(run, str(images), str(tmp_path / f'out_{rare}'), score_threshold=0.0)
    assert summary['attribute_decisions'].startswith('logit adjustment 1')
    detections = json.loads((tmp_path / f'out_{rare}' / 'detections.json').read_text())
    # A prior of 1e-9 moves the untrained model's near-even logits to the rare value on every cell.
    assert detections and all(d['attributes']['cytoplasmic_vacuoles'] == rare for d in detections)


def test_attribute_counts_file_with_other_values_names_the_file_and_attribute(tmp_path):
  from lld_jax import evaluate
  path = tmp_path / evaluate.ATTRIBUTE_COUNTS_FILE
  evaluate.write_attribute_counts(np.ones((lld_format.NUM_ATTRIBUTES, 3), np.int64), path)
  table = json.loads(path.read_text())
  table['nucleolus'] = {'inconspicuous': 5, 'visible': 2}
  path.write_text(json.dumps(table))
  with pytest.raises(ValueError, match=re.escape(f"{path}: attribute 'nucleolus' needs counts of exactly")):
    evaluate.read_attribute_counts(path)
  table['nucleolus'] = {'inconspicuous': 5, 'prominent': -2}
  path.write_text(json.dumps(table))
  with pytest.raises(ValueError, match=re.escape(f'{path}: nucleolus/prominent: the count -2 is not')):
    evaluate.read_attribute_counts(path)
  path.write_text('[]')
  with pytest.raises(ValueError, match=re.escape(f'{path}: expected')):
    evaluate.read_attribute_counts(path)


def test_class_names_fallbacks(tmp_path):
  c = tiny_config()
  assert predict.class_names_for(c, str(tmp_path), lld_format.NUM_CLASSES) == lld_format.CLASS_NAMES
  c.dataset.name = 'not_a_dataset'
  assert predict.class_names_for(c, str(tmp_path), 3) == ('class_0', 'class_1', 'class_2')
  (tmp_path / 'class_names.json').write_text(json.dumps(['WBC', 'RBC', 'Platelets']))
  assert predict.class_names_for(c, str(tmp_path), 3) == ('WBC', 'RBC', 'Platelets')


def test_config_saved_before_flip_averaging_builds_the_model_as_trained(tmp_path):
  saved = tiny_config().to_dict()
  del saved['model']['cell_class_flips']
  (tmp_path / 'config.json').write_text(json.dumps(saved))
  model = train.create_model(predict.load_config(str(tmp_path)), lld_format.NUM_CLASSES)
  assert model.cell_class_flips is False
  flipping = tiny_config()
  flipping.model.cell_class_flips = True
  assert train.create_model(flipping, lld_format.NUM_CLASSES).cell_class_flips is True


def test_classes_decided_in_the_films_context_with_the_runs_counts(tmp_path, capsys):
  """A run with a cell classifier and eval.class_context=patient: predict reads DIR/class_context.json. With
  training counts of two types that hold only lymphoblasts and only myeloblasts, the untrained model's near-even
  classes become one of those two; an image whose name gives no patient is its own film, and says so."""
  from lld_jax import class_context
  config = tiny_config()
  config.model.cell_crop_size = 8
  config.model.cell_class_refinement = True
  config.eval.class_scores = 'cell_classifier'
  config.eval.class_context = 'patient'
  run = tmp_path / 'run'
  run.mkdir()
  _write_workdir(run, config, seed=5)
  rng = np.random.default_rng(5)
  images = tmp_path / 'images'
  images.mkdir()
  for name in ('7_1_1000_AML.png', '7_2_1000_AML.png', 'smear.png'):
    Image.fromarray(rng.integers(0, 256, (120, 200, 3), np.uint8)).save(images / name)

  alone = predict.run(run, str(images), str(tmp_path / 'alone'), score_threshold=0.0)
  assert alone['class_decisions'] == f'each cell alone ({class_context.COUNTS_FILE} missing)'
  classes_alone = {d['category_name'] for d in json.loads((tmp_path / 'alone' / 'detections.json').read_text())}
  assert classes_alone - {'Lymphoblast', 'Myeloblast'}

  counts = np.zeros((2, lld_format.NUM_CLASSES), np.int64)
  counts[0, lld_format.CLASS_NAMES.index('Lymphoblast')] = 10**6
  counts[1, lld_format.CLASS_NAMES.index('Myeloblast')] = 10**6
  class_context.write_counts(counts, ('ALL', 'AML'), lld_format.CLASS_NAMES, str(run / class_context.COUNTS_FILE))
  capsys.readouterr()
  summary = predict.run(run, str(images), str(tmp_path / 'context'), score_threshold=0.0)
  assert summary['class_decisions'] == 'in the context of its patient'
  assert '1 of 3 images name no patient' in capsys.readouterr().err
  detections = json.loads((tmp_path / 'context' / 'detections.json').read_text())
  assert detections and {d['category_name'] for d in detections} <= {'Lymphoblast', 'Myeloblast'}
