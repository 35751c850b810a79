"""TFDS builders `lld` (full: COCO + YOLO, sparse) and `txl_pbc` (full, sparse) built into tmp dirs."""

import shutil
from pathlib import Path

import numpy as np
import pytest

tf = pytest.importorskip('tensorflow')
tfds = pytest.importorskip('tensorflow_datasets')

from configs import synthetic_demo  # pylint: disable=g-import-not-at-top
from lld_jax import input_pipeline
from tfds_lld import parsers as P
from tfds_lld import synthetic
from tfds_lld.lld import lld_dataset_builder as lld_b
from tfds_lld.txl_pbc import txl_pbc_dataset_builder as txl_b
import lld_download_helpers as H

TXL_ROOT = H.txl_pbc_root() or Path('shared/data/txl_pbc')
N_TXL = 10  # images per split copied from the real TXL-PBC


def _build(builder_cls, config, data_dir, manual_dir, **kwargs):
  builder = builder_cls(config=config, data_dir=str(data_dir), **kwargs)
  builder.download_and_prepare(download_config=tfds.download.DownloadConfig(manual_dir=str(manual_dir)))
  return builder


def _examples(builder, split):
  return list(tfds.as_numpy(builder.as_dataset(split=split, shuffle_files=False)))


def _decode_str(x):
  return x.decode() if isinstance(x, bytes) else x


@pytest.fixture(scope='module')
def lld_download(tmp_path_factory):
  root = tmp_path_factory.mktemp('lld_download')
  common = dict(patients=2, images_per_patient=2, seed=0)
  synthetic.generate(str(root), 'coco', subsets=['H_100x_C1'], **common)
  synthetic.generate(str(root), 'yolo', subsets=['L_40x_C2'], **common)
  synthetic.generate(str(root), 'sparse', subsets=['H_40x_C1'], **common)
  # A sparse subset (lower-case name) whose last train image has an empty label file: no annotated region.
  H.write_yolo_subset(root, 'lcm_10x_c1', splits=('train',), n_images=2, row=H.SPARSE_ROW, empty_last=True)
  return root


@pytest.fixture(scope='module')
def lld_full(lld_download, tmp_path_factory):
  return _build(lld_b.Builder, 'full', tmp_path_factory.mktemp('data_full'), lld_download)


@pytest.fixture(scope='module')
def lld_sparse(lld_download, tmp_path_factory):
  return _build(lld_b.Builder, 'sparse', tmp_path_factory.mktemp('data_sparse'), lld_download)


def _records(root, layouts):
  return {r.key: r for r in P.parse_lld(root, layouts)[0]}


def test_lld_full(lld_full, lld_download):
  records = _records(lld_download, P.FULL_LAYOUTS)
  assert set(lld_full.info.splits) == {'train', 'test'}
  n = {s: lld_full.info.splits[s].num_examples for s in ('train', 'test')}
  assert n == {s: sum(r.split == s for r in records.values()) for s in ('train', 'test')}
  assert n['train'] + n['test'] == 8  # 2 subsets x 2 patients x 2 images.
  features = lld_full.info.features
  seen_subsets = set()
  for split in ('train', 'test'):
    for ex in _examples(lld_full, split):
      subset = _decode_str(ex['domain']['subset'])
      fname = _decode_str(ex['image/filename'])
      rec = records[f'{subset}/{split}/{fname}']
      seen_subsets.add((subset, rec.layout))
      assert ex['image'].shape == (640, 640, 3)
      assert ex['annotation_mask'].shape == (640, 640, 1) and (ex['annotation_mask'] == 1).all()
      np.testing.assert_allclose(ex['annotated_regions'], [[0, 0, 1, 1]])
      bbox = ex['objects']['bbox']
      assert bbox.shape == (len(rec.labels), 4) and ((bbox >= 0) & (bbox <= 1)).all()
      np.testing.assert_allclose(bbox * 640, rec.boxes[:, [1, 0, 3, 2]], atol=1e-3)
      np.testing.assert_array_equal(ex['objects']['label'], rec.labels)
      np.testing.assert_array_equal(ex['objects']['attributes'], rec.attributes)
      assert ex['objects']['attributes'].dtype == np.int32
      assert ((ex['objects']['attributes'] >= -1) & (ex['objects']['attributes'] <= 2)).all()
      d = ex['domain']
      assert (features['domain']['microscope'].int2str(d['microscope']) + '_'
              + features['domain']['magnification'].int2str(d['magnification']) + '_'
              + features['domain']['camera'].int2str(d['camera'])) == subset
      assert _decode_str(ex['patient']) == rec.patient
      assert features['leukemia_type'].int2str(ex['leukemia_type']) == rec.leukemia_type != 'unknown'
  assert seen_subsets == {('H_100x_C1', P.COCO), ('L_40x_C2', P.YOLO)}


def test_lld_full_tfds_load(lld_full):
  ds = tfds.load('lld/full', split='train', data_dir=lld_full.data_dir.split('/lld/')[0], download=False)
  ex = next(iter(ds))
  assert ex['image'].dtype == tf.uint8 and ex['objects']['attributes'].shape[-1] == 7


def test_lld_sparse(lld_sparse, lld_download, capsys):
  records = _records(lld_download, (P.SPARSE,))
  assert {s: lld_sparse.info.splits[s].num_examples for s in lld_sparse.info.splits} == {'train': 4, 'test': 2}
  no_region = []
  for split in ('train', 'test'):
    for ex in _examples(lld_sparse, split):
      subset = _decode_str(ex['domain']['subset'])
      rec = records[f'{subset}/{split}/{_decode_str(ex["image/filename"])}']
      mask = ex['annotation_mask'][..., 0]
      np.testing.assert_array_equal(mask, P.region_mask(rec.regions, 640, 640)[..., 0])
      np.testing.assert_allclose(ex['annotated_regions'] * 640,
                                 np.asarray(rec.regions, np.float32).reshape(-1, 4)[:, [1, 0, 3, 2]], atol=1e-3)
      if not rec.regions:
        no_region.append(rec.image_path)
        assert mask.sum() == 0 and ex['annotated_regions'].shape == (0, 4)
      elif split == 'test':
        assert mask.all()  # Synthetic sparse test split: region = the whole image.
      else:
        x1, y1, x2, y2 = rec.regions[0]
        assert 0 < mask.sum() == (round(x2) - round(x1)) * (round(y2) - round(y1)) < 640 * 640
        b = ex['objects']['bbox'] * 640  # Labelled cells have their centre in the region.
        cy, cx = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
        assert ((cx >= x1 - 1) & (cx <= x2 + 1) & (cy >= y1 - 1) & (cy <= y2 + 1)).all()
  # Without a region are exactly the images whose label file is empty or missing: the one emptied on purpose, and
  # any synthetic field whose random region caught no cell (the generator then writes no row to carry it).
  def label_file(image_path):
    image_path = Path(image_path)
    return image_path.parents[2] / 'labels' / image_path.parent.name / (image_path.stem + '.txt')
  assert any('lcm_10x_c1' in path for path in no_region)
  for path in no_region:
    assert not label_file(path).exists() or not label_file(path).read_text().strip(), path
  labelled_sparse = [r for r in records.values() if r.regions]
  assert all(label_file(r.image_path).read_text().strip() for r in labelled_sparse)
  assert lld_sparse.skip_report.notes['sparse_image_without_region'] == len(no_region)


def test_training_can_leave_out_the_sparse_images_without_region(lld_sparse, lld_download):
  train_records = [r for r in _records(lld_download, (P.SPARSE,)).values() if r.split == 'train']
  with_region = sum(bool(r.regions) for r in train_records)
  assert input_pipeline.count_images_with_region(lld_sparse, 'train') == (with_region, len(train_records))
  assert 0 < with_region < len(train_records)
  config = synthetic_demo.get_config()
  config.image_size, config.per_device_batch_size = 64, 2

  def annotated_per_image(skip):  # three passes over the split, in batches of [1 device, 2 images]
    ds = input_pipeline.train_dataset(lld_sparse, 'train', config, 1, 0, skip_images_without_region=skip)
    batches = ds.take(3 * len(train_records) // 2).as_numpy_iterator()
    masks = np.concatenate([b['annotation_mask'][0] for b in batches])
    return masks.reshape(len(masks), -1).max(axis=1) > 0

  assert annotated_per_image(skip=True).all()
  assert not annotated_per_image(skip=False).all()


def test_lld_skip_policy_through_builder(tmp_path, capsys, monkeypatch):
  dl = tmp_path / 'dl'
  folder = H.write_yolo_subset(dl, 'H_10x_C2', splits=('train',), n_images=3)
  (folder / 'labels/train/2_2_400_CLL.txt').write_text('2 0.5 0.25 0.1 0.2 9 2 0 1 0 1 0\n')
  with pytest.raises(P.DatasetFormatError, match=r'2_2_400_CLL.txt:1: attribute cell_size value 9'):
    _build(lld_b.Builder, 'full', tmp_path / 'data_raise', dl)
  monkeypatch.setenv('LLD_ON_ERROR', 'skip')
  builder = _build(lld_b.Builder, 'full', tmp_path / 'data_skip', dl)
  assert builder.info.splits['train'].num_examples == 2
  assert dict(builder.skip_report.counts) == {P.K_ATTRIBUTE: 1}
  out = capsys.readouterr().out
  assert 'Skipped 1 bad input item' in out and 'bad_attribute: 1' in out and '2_2_400_CLL.txt:1' in out


def test_lld_missing_or_wrong_download(tmp_path):
  (tmp_path / 'empty').mkdir()
  with pytest.raises(Exception, match='manual'):
    _build(lld_b.Builder, 'full', tmp_path / 'd1', tmp_path / 'empty')
  H.write_coco_subset(tmp_path / 'coco_only', n_images=1)
  with pytest.raises(FileNotFoundError, match=r"No LLD subset with layout sparse.*H_100x_C1 \(coco\)"):
    _build(lld_b.Builder, 'sparse', tmp_path / 'd2', tmp_path / 'coco_only')


# ------------------------------------------------------------------------------------------------------------------
# TXL-PBC on a small copy of the real data.


@pytest.fixture(scope='module')
def txl_download(tmp_path_factory):
  if not (TXL_ROOT / 'data.yaml').is_file():
    pytest.skip(f'TXL-PBC not found at {TXL_ROOT}')
  root = tmp_path_factory.mktemp('txl')
  shutil.copy(TXL_ROOT / 'data.yaml', root / 'data.yaml')
  for split in ('train', 'val'):
    (root / 'images' / split).mkdir(parents=True)
    (root / 'labels' / split).mkdir(parents=True)
    # One image of each source size first, then the rest in name order.
    images = sorted((TXL_ROOT / 'images' / split).iterdir())
    for img in images[:N_TXL]:
      shutil.copy(img, root / 'images' / split / img.name)
      lab = TXL_ROOT / 'labels' / split / (img.stem + '.txt')
      if lab.exists():
        shutil.copy(lab, root / 'labels' / split / lab.name)
  return root


@pytest.fixture(scope='module')
def txl_full(txl_download, tmp_path_factory):
  return _build(txl_b.Builder, 'full', tmp_path_factory.mktemp('txl_full'), txl_download)


@pytest.fixture(scope='module')
def txl_sparse(txl_download, tmp_path_factory):
  return _build(txl_b.Builder, 'sparse', tmp_path_factory.mktemp('txl_sparse'), txl_download)


def test_txl_full(txl_full, txl_download):
  records = {(r.split, r.filename): r for r in P.parse_txl_pbc(txl_download)[0]}
  assert {s: txl_full.info.splits[s].num_examples for s in txl_full.info.splits} == {'train': N_TXL, 'val': N_TXL}
  feats = txl_full.info.features
  assert feats['objects']['label'].names == ['WBC', 'RBC', 'Platelets']
  for split in ('train', 'val'):
    for ex in _examples(txl_full, split):
      rec = records[(split, _decode_str(ex['image/filename']))]
      h, w = ex['image'].shape[:2]
      assert (w, h) == (rec.width, rec.height)
      assert ex['annotation_mask'].shape == (h, w, 1) and ex['annotation_mask'].all()
      assert (ex['objects']['attributes'] == -1).all() and ex['objects']['attributes'].shape == (len(rec.labels), 7)
      np.testing.assert_array_equal(ex['objects']['label'], rec.labels)
      np.testing.assert_allclose(ex['objects']['bbox'], P.normalized_yxyx(rec.boxes, w, h), atol=1e-6)
      src = feats['domain']['microscope'].int2str(ex['domain']['microscope'])
      assert src == P.txl_source(w, h) == _decode_str(ex['domain']['subset']) != 'other'
      assert feats['leukemia_type'].int2str(ex['leukemia_type']) == 'unknown' and _decode_str(ex['patient']) == ''


def test_txl_sparse(txl_sparse, txl_full):
  full = {(s, _decode_str(e['image/filename'])): e for s in ('train', 'val') for e in _examples(txl_full, s)}
  fractions, kept, total = [], 0, 0
  for split in ('train', 'val'):
    for ex in _examples(txl_sparse, split):
      ref = full[(split, _decode_str(ex['image/filename']))]
      mask = ex['annotation_mask'][..., 0]
      h, w = mask.shape
      if split == 'val':
        assert mask.all()
        np.testing.assert_array_equal(ex['objects']['bbox'], ref['objects']['bbox'])
        continue
      (region,) = ex['annotated_regions']
      ymin, xmin, ymax, xmax = region
      x1, y1, x2, y2 = xmin * w, ymin * h, xmax * w, ymax * h
      np.testing.assert_array_equal(mask, P.region_mask([(x1, y1, x2, y2)], w, h)[..., 0])
      fractions.append(mask.mean())
      b = ex['objects']['bbox']
      cy, cx = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
      assert ((cx >= xmin - 1e-6) & (cx <= xmax + 1e-6) & (cy >= ymin - 1e-6) & (cy <= ymax + 1e-6)).all()
      rb = ref['objects']['bbox']
      rcy, rcx = (rb[:, 0] + rb[:, 2]) / 2, (rb[:, 1] + rb[:, 3]) / 2
      inside = (rcx >= xmin) & (rcx < xmax) & (rcy >= ymin) & (rcy < ymax)
      assert len(b) == int(inside.sum())  # Cells with centre outside removed, those inside kept.
      kept += len(b)
      total += len(rb)
  assert len(fractions) == N_TXL and all(0.12 < f < 0.3 for f in fractions)
  assert 0 < kept < total


def test_txl_tfds_load(txl_sparse):
  data_dir = txl_sparse.data_dir.split('/txl_pbc/')[0]
  ds = tfds.load('txl_pbc/sparse', split='train', data_dir=data_dir, download=False)
  assert sum(1 for _ in ds) == N_TXL
