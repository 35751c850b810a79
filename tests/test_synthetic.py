"""Tests of the synthetic LLD download generator (tfds_lld.synthetic)."""

import json
import os

import numpy as np
import pytest
from PIL import Image

from tfds_lld import lld_format as F
from tfds_lld import synthetic

KW = dict(patients=3, images_per_patient=2, seed=3)


@pytest.fixture(scope='module')
def coco_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('coco'))
  summary = synthetic.generate(out, 'coco', subsets=['H_100x_C1', 'l_10x_c2'], **KW)
  return out, summary


@pytest.fixture(scope='module')
def yolo_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('yolo'))
  summary = synthetic.generate(out, 'yolo', subsets=['H_100x_C1'], **KW)
  return out, summary


@pytest.fixture(scope='module')
def sparse_dir(tmp_path_factory):
  out = str(tmp_path_factory.mktemp('sparse'))
  summary = synthetic.generate(out, 'sparse', subsets=['H_40x_C1'], patients=3, images_per_patient=3, seed=5)
  return out, summary


def _stems(folder):
  return sorted(f[:-4] for f in os.listdir(folder))


def _patients(stems):
  return {F.parse_image_filename(s)[0] for s in stems}


def test_coco_layout(coco_dir):
  out, summary = coco_dir
  assert sorted(os.listdir(out)) == ['H_100x_C1', 'L_10x_C2']
  for subset, mag in (('H_100x_C1', '1000'), ('L_10x_C2', '100')):
    assert sorted(os.listdir(os.path.join(out, subset, 'json_labels'))) == ['test.json', 'train.json']
    for split in ('train', 'test'):
      folder = os.path.join(out, subset, 'Images', split)
      files = sorted(os.listdir(folder))
      assert files and all(f.endswith('.png') for f in files)
      for f in files:
        patient, ltype = F.parse_image_filename(f[:-4])
        assert f[:-4].split('_')[2] == mag
        assert ltype in F.LEUKEMIA_TYPES
        assert summary['leukemia_types'][int(patient)] == ltype
      with open(os.path.join(out, subset, 'json_labels', split + '.json')) as fh:
        coco = json.load(fh)
      assert sorted(im['file_name'] for im in coco['images']) == files
      assert all(im['width'] == 640 and im['height'] == 640 for im in coco['images'])
      assert summary['subsets'][subset][split]['images'] == len(files)
      assert summary['subsets'][subset][split]['cells'] == len(coco['annotations'])


def test_coco_annotations(coco_dir):
  out, _ = coco_dir
  with open(os.path.join(out, 'H_100x_C1', 'json_labels', 'train.json')) as fh:
    coco = json.load(fh)
  names = {c['id']: c['name'] for c in coco['categories']}
  assert min(names) == 1 and sorted(names.values()) == sorted(F.CLASS_NAMES)
  image_ids = {im['id'] for im in coco['images']}
  keys = ('cell_size', 'nuclear_chromatio', 'nuclear_shape', 'nucleolus', 'cytoplasm', 'cytoplasmic_basophilia',
          'cytoplasmic_vacuoles')
  assert coco['annotations']
  for ann in coco['annotations']:
    assert ann['image_id'] in image_ids
    assert 'nuclear_chromatin' not in ann
    values = [ann[k] for k in keys]
    assert all(isinstance(v, int) for v in values)
    name = names[ann['category_id']]
    if name == 'None':
      assert values == [4] * 7
    else:
      assert 0 <= values[0] <= 2 and all(v in (0, 1) for v in values[1:])
    x, y, w, h = ann['bbox']
    assert w > 0 and h > 0 and x >= 0 and y >= 0 and x + w <= 640 and y + h <= 640
    assert ann['iscrowd'] == 0 and ann['area'] == pytest.approx(w * h, rel=1e-2)


def _read_rows(path):
  with open(path) as fh:
    return [line.split() for line in fh.read().splitlines() if line.strip()]


def test_yolo_layout(yolo_dir):
  out, _ = yolo_dir
  n_rows = 0
  for split in ('train', 'test'):
    images = _stems(os.path.join(out, 'H_100x_C1', 'images', split))
    labels = _stems(os.path.join(out, 'H_100x_C1', 'labels', split))
    assert images == labels and images
    for stem in labels:
      for row in _read_rows(os.path.join(out, 'H_100x_C1', 'labels', split, stem + '.txt')):
        n_rows += 1
        assert len(row) == 12
        cls = int(row[0])
        assert 0 <= cls < F.NUM_CLASSES
        xc, yc, w, h = map(float, row[1:5])
        assert all(len(t.split('.')[1]) == 6 for t in row[1:5])
        assert 0 < w <= 1 and 0 < h <= 1
        assert xc - w / 2 >= -1e-5 and xc + w / 2 <= 1 + 1e-5 and yc - h / 2 >= -1e-5 and yc + h / 2 <= 1 + 1e-5
        attrs = [int(t) for t in row[5:]]
        if cls == 0:
          assert attrs == [F.YOLO_SIZE_NOT_APPLICABLE] + [F.YOLO_BINARY_NOT_APPLICABLE] * 6
        else:
          assert attrs[0] in (0, 1, 2) and all(a in (0, 1) for a in attrs[1:])
  assert n_rows > 0


def test_sparse_layout(sparse_dir):
  out, summary = sparse_dir
  root = os.path.join(out, 'H_40x_C1')
  n_train_rows = 0
  for split in ('train', 'test'):
    stems = _stems(os.path.join(root, 'images', split))
    assert stems == _stems(os.path.join(root, 'labels', split))
    for stem in stems:
      assert stem.split('_')[2] == '400'
      rows = _read_rows(os.path.join(root, 'labels', split, stem + '.txt'))
      regions = {tuple(int(t) for t in r[5:9]) for r in rows}
      assert len(regions) <= 1
      for row in rows:
        assert len(row) == 16
        rx1, ry1, rx2, ry2 = map(int, row[5:9])
        if split == 'test':
          assert (rx1, ry1, rx2, ry2) == (0, 0, 640, 640)
        else:
          n_train_rows += 1
          area = (rx2 - rx1) * (ry2 - ry1) / 640 ** 2
          assert 0.15 <= area <= 0.25
          xc, yc = float(row[1]) * 640, float(row[2]) * 640
          assert rx1 <= xc <= rx2 and ry1 <= yc <= ry2
  train = summary['subsets']['H_40x_C1']['train']
  test = summary['subsets']['H_40x_C1']['test']
  assert n_train_rows == train['labelled_cells'] < train['cells']
  assert test['labelled_cells'] == test['cells']


def test_sparse_region():
  rng = np.random.default_rng(0)
  for _ in range(200):
    x1, y1, x2, y2 = synthetic.sparse_region(rng)
    assert 0 <= x1 < x2 <= 640 and 0 <= y1 < y2 <= 640
    assert 0.15 <= (x2 - x1) * (y2 - y1) / 640 ** 2 <= 0.25


def test_patient_disjoint_split(coco_dir, yolo_dir):
  for out, subset, images in ((coco_dir[0], 'H_100x_C1', 'Images'), (yolo_dir[0], 'H_100x_C1', 'images')):
    train = _patients(_stems(os.path.join(out, subset, images, 'train')))
    test = _patients(_stems(os.path.join(out, subset, images, 'test')))
    assert train and test and not train & test
  split = synthetic.split_patients(0, 10, 0.3)
  assert len(split['test']) == 3 and not set(split['train']) & set(split['test'])


def test_images_are_640_rgb(coco_dir):
  out, _ = coco_dir
  folder = os.path.join(out, 'L_10x_C2', 'Images', 'test')
  for f in os.listdir(folder):
    with Image.open(os.path.join(folder, f)) as im:
      assert im.size == (640, 640) and im.mode == 'RGB' and im.format == 'PNG'


def _files(root):
  out = {}
  for dirpath, _, names in os.walk(root):
    for n in names:
      with open(os.path.join(dirpath, n), 'rb') as fh:
        out[os.path.relpath(os.path.join(dirpath, n), root)] = fh.read()
  return out


def test_determinism(tmp_path):
  kw = dict(subsets=['L_100x_C2'], patients=2, images_per_patient=1)
  a = synthetic.generate(str(tmp_path / 'a'), 'coco', seed=1, **kw)
  b = synthetic.generate(str(tmp_path / 'b'), 'coco', seed=1, **kw)
  c = synthetic.generate(str(tmp_path / 'c'), 'coco', seed=2, **kw)
  assert a['subsets'] == b['subsets']
  fa, fb, fc = _files(tmp_path / 'a'), _files(tmp_path / 'b'), _files(tmp_path / 'c')
  assert fa == fb
  assert fa != fc


@pytest.mark.parametrize('layout', ['coco', 'sparse'])
def test_worker_processes_write_the_same_files(tmp_path, layout):
  kw = dict(subsets=['H_100x_C1', 'L_10x_C2'], patients=3, images_per_patient=2, seed=5)
  one = synthetic.generate(str(tmp_path / 'one'), layout, workers=1, **kw)
  three = synthetic.generate(str(tmp_path / 'three'), layout, workers=3, **kw)
  assert one['subsets'] == three['subsets']
  files = _files(tmp_path / 'one')
  assert len(files) == 2 * (3 * 2 + (2 if layout == 'coco' else 3 * 2))  # images and labels of both subsets
  assert files == _files(tmp_path / 'three')
  with pytest.raises(ValueError, match='workers'):
    synthetic.generate(str(tmp_path / 'none'), layout, workers=0, **kw)


def test_fewer_test_fields_are_the_first_of_the_same_ones(tmp_path):
  kw = dict(subsets=['H_100x_C1'], patients=4, images_per_patient=3, seed=2)
  full = synthetic.generate(str(tmp_path / 'full'), 'coco', **kw)
  short = synthetic.generate(str(tmp_path / 'short'), 'coco', test_images_per_patient=1, **kw)
  test_patients = len(full['patients']['test'])
  assert short['subsets']['H_100x_C1']['train'] == full['subsets']['H_100x_C1']['train']
  assert (full['subsets']['H_100x_C1']['test']['images'], short['subsets']['H_100x_C1']['test']['images']) == (
      3 * test_patients, test_patients)
  full_files, short_files = _files(tmp_path / 'full'), _files(tmp_path / 'short')
  images = [name for name in short_files if name.endswith('.png')]
  assert {name for name in images if '/test/' in name} == {
      name for name in full_files if '/test/' in name and name.split('/')[-1].split('_')[1] == '1'}
  assert all(short_files[name] == full_files[name] for name in images)
  assert short_files['H_100x_C1/json_labels/train.json'] == full_files['H_100x_C1/json_labels/train.json']
  with pytest.raises(ValueError, match='test images per patient'):
    synthetic.generate(str(tmp_path / 'none'), 'coco', test_images_per_patient=0, **kw)


def test_render_field_cells():
  for subset in ('H_100x_C1', 'H_10x_C1'):
    for image in (1, 2):
      pixels, cells = synthetic.render_field(0, subset, 1, image, 'CML')
      assert pixels.shape == (640, 640, 3) and pixels.dtype == np.uint8
      boxes = [c['box'] for c in cells]
      for c in cells:
        x0, y0, x1, y1 = c['box']
        assert 0 <= x0 < x1 <= 640 and 0 <= y0 < y1 <= 640
        if c['cls'] == 0:
          assert c['attrs'] == (F.NOT_APPLICABLE,) * 7
        else:
          assert all(a >= 0 for a in c['attrs'])
      if subset == 'H_100x_C1':  # exact boxes: white cells never overlap much
        for i in range(len(boxes)):
          for j in range(i + 1, len(boxes)):
            assert synthetic._iou(boxes[i], boxes[j]) <= 0.1
      # Looks like a blood film: grey-ish background, not blank.
      assert 100 < pixels.mean() < 200 and pixels.std() > 5


def test_bad_arguments(tmp_path):
  with pytest.raises(ValueError):
    synthetic.generate(str(tmp_path), 'voc')
  with pytest.raises(ValueError):
    synthetic.generate(str(tmp_path), 'coco', subsets=['X_100x_C1'])


def test_command_line(tmp_path, capsys):
  synthetic.main(['--out', str(tmp_path), '--layout', 'yolo', '--subsets', 'H_100x_C1', '--patients', '2',
                  '--images-per-patient', '2', '--test-images-per-patient', '1', '--seed', '4',
                  '--test-fraction', '0.5'])
  assert 'H_100x_C1' in capsys.readouterr().out
  for split, fields in (('train', 2), ('test', 1)):
    assert len(os.listdir(tmp_path / 'H_100x_C1' / 'images' / split)) == fields
    assert len(os.listdir(tmp_path / 'H_100x_C1' / 'labels' / split)) == fields
