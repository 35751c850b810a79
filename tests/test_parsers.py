"""Parsers of the LLD layouts (COCO, YOLO 12-column, sparse 16-column) and TXL-PBC: good input and every bad case."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tfds_lld import parsers as P
import lld_download_helpers as H

NA = -1


def _parse(root, layouts=(P.COCO, P.YOLO, P.SPARSE), on_error='raise'):
  records, report, subsets = P.parse_lld(root, layouts, on_error=on_error)
  return records, report, subsets


def _by_name(records):
  return {(r.subset, r.split, r.filename): r for r in records}


# ------------------------------------------------------------------------------------------------------------------
# Good input.


@pytest.mark.parametrize('offset', [0, 1])
@pytest.mark.parametrize('chromatin_key', ['nuclear_chromatio', 'nuclear_chromatin'])
def test_coco_parses(tmp_path, offset, chromatin_key):
  H.write_coco_subset(tmp_path, 'H_100x_C1', cat_offset=offset, chromatin_key=chromatin_key)
  records, report, subsets = _parse(tmp_path)
  assert [(s.domain.subset, s.layout) for s in subsets] == [('H_100x_C1', P.COCO)]
  assert len(records) == 4 and {r.split for r in records} == {'train', 'test'}
  r = sorted(records, key=lambda r: r.key)[0]
  np.testing.assert_allclose(r.boxes, [[100, 200, 160, 300]])
  assert r.labels.tolist() == [1]  # Myeloblast, whatever the id offset.
  assert r.attributes.tolist() == [[1, NA, 1, 0, 1, 0, 1]]  # 4 -> -1.
  assert r.regions == [(0.0, 0.0, 640.0, 640.0)] and r.fully_annotated
  assert (r.width, r.height) == (640, 640)
  assert r.patient in ('1', '2') and r.leukemia_type in ('ALL', 'AML')
  assert report.total == 0


def test_coco_old_layout_and_case_insensitive_subset(tmp_path):
  H.write_coco_subset(tmp_path, 'hcm_40x_c2', splits=('train', 'test', 'val'), old_layout=True)
  records, _, subsets = _parse(tmp_path)
  assert subsets[0].domain.subset == 'H_40x_C2' and subsets[0].layout == P.COCO
  assert {r.split for r in records} == {'train', 'test', 'val'} and len(records) == 6
  assert all(r.subset == 'H_40x_C2' for r in records)


def test_coco_box_clipped_within_tolerance(tmp_path):
  folder = H.write_coco_subset(tmp_path, splits=('train',), n_images=1)
  _edit_json(folder / 'json_labels/train.json', lambda d: d['annotations'][0].update(bbox=[-0.5, 200, 640.8, 100]))
  (r,), _, _ = _parse(tmp_path)
  np.testing.assert_allclose(r.boxes, [[0, 200, 640, 300]])


def test_yolo_parses(tmp_path):
  H.write_yolo_subset(tmp_path, 'l_40x_c2', rows_per_image=2)
  records, report, subsets = _parse(tmp_path)
  assert [(s.domain.subset, s.layout) for s in subsets] == [('L_40x_C2', P.YOLO)]
  assert len(records) == 6 and {r.split for r in records} == {'train', 'val', 'test'}
  r = records[0]
  np.testing.assert_allclose(r.boxes, [[288, 96, 352, 224]] * 2, atol=1e-3)
  assert r.labels.tolist() == [2, 2]
  assert r.attributes.tolist() == [[NA, NA, 0, 1, 0, 1, 0]] * 2  # size 3 and binary 2 -> -1.
  assert r.fully_annotated and r.leukemia_type == 'CLL' and r.patient in ('1', '2')
  assert report.total == 0


def test_yolo_missing_and_empty_label_files_mean_no_cells(tmp_path):
  H.write_yolo_subset(tmp_path, splits=('train',), n_images=3, missing_last=True)
  folder = tmp_path / 'L_40x_C2'
  (folder / 'labels/train' / '1_1_400_CLL.txt').write_text('')
  records, _, _ = _parse(tmp_path)
  assert sorted(len(r.labels) for r in records) == [0, 0, 1]
  assert all(r.fully_annotated for r in records)


def test_sparse_parses_region_and_empty_label(tmp_path):
  H.write_yolo_subset(tmp_path, 'H_40x_C1', splits=('train',), n_images=3, row=H.SPARSE_ROW, rows_per_image=2,
                      empty_last=True)
  # Test split: region = the whole image (fully annotated); plus an image with no label file.
  full_row = '2 0.5 0.25 0.1 0.2 0 0 640 640 1 0 2 1 0 1 0'
  folder = tmp_path / 'H_40x_C1'
  H.write_png(folder / 'images/test/9_9_400_AML.png')
  (folder / 'labels/test').mkdir(parents=True)
  (folder / 'labels/test/9_9_400_AML.txt').write_text(full_row + '\n')
  H.write_png(folder / 'images/test/9_10_400_AML.png')
  records, report, subsets = _parse(tmp_path)
  assert subsets[0].layout == P.SPARSE
  recs = _by_name(records)
  r = recs[('H_40x_C1', 'train', '1_1_400_CLL.png')]
  assert r.regions == [(64.0, 32.0, 384.0, 352.0)] and not r.fully_annotated
  np.testing.assert_allclose(r.boxes, [[288, 96, 352, 224]] * 2, atol=1e-3)
  assert r.attributes.tolist() == [[1, 0, NA, 1, 0, 1, 0]] * 2
  empty = recs[('H_40x_C1', 'train', '3_3_400_CLL.png')]
  assert empty.regions == [] and len(empty.labels) == 0
  assert recs[('H_40x_C1', 'test', '9_9_400_AML.png')].fully_annotated
  assert recs[('H_40x_C1', 'test', '9_10_400_AML.png')].regions == []
  # Layout filter: a sparse subset is not read by the `full` layouts.
  assert _parse(tmp_path, layouts=P.FULL_LAYOUTS)[0] == []


def test_find_subsets_mixed_layouts_and_single_subset_root(tmp_path):
  H.write_coco_subset(tmp_path, 'H_100x_C1', n_images=1)
  H.write_yolo_subset(tmp_path, 'LCM_10x_C1', n_images=1)
  H.write_yolo_subset(tmp_path, 'h_40x_c1', n_images=1, row=H.SPARSE_ROW)
  (tmp_path / 'not_a_subset').mkdir()
  subsets = P.find_subsets(tmp_path)
  assert sorted((s.domain.subset, s.layout) for s in subsets) == [
      ('H_100x_C1', P.COCO), ('H_40x_C1', P.SPARSE), ('L_10x_C1', P.YOLO)]
  single = P.find_subsets(tmp_path / 'LCM_10x_C1')
  assert [(s.domain.subset, s.layout) for s in single] == [('L_10x_C1', P.YOLO)]
  wrapped = tmp_path / 'wrapper'
  H.write_yolo_subset(wrapped / 'LLD', 'L_100x_C2', n_images=1)
  single = P.find_subsets(wrapped)
  assert [(s.domain.subset, s.layout) for s in single] == [('L_100x_C2', P.YOLO)]
  assert P.find_subsets(tmp_path / 'not_a_subset') == []


def test_txl_pbc_parses(tmp_path):
  root = _tiny_txl(tmp_path)
  records, report, names = P.parse_txl_pbc(root)
  assert names == ['WBC', 'RBC', 'Platelets'] and len(records) == 2 and report.total == 0
  r = _by_name(records)[('Raabin-WBC', 'train', 'a.jpg')]
  np.testing.assert_allclose(r.boxes, [[230, 57.5, 345, 172.5]], atol=1e-3)
  assert r.labels.tolist() == [0] and r.attributes.tolist() == [[NA] * 7]
  assert P.txl_source(363, 360) == 'PBC' and P.txl_source(100, 100) == 'other'


def test_simulate_sparse_is_deterministic(tmp_path):
  records, _, _ = P.parse_txl_pbc(_tiny_txl(tmp_path))
  r = records[0]
  a, b = P.simulate_sparse(r), P.simulate_sparse(r)
  assert a.regions == b.regions and len(a.regions) == 1
  x1, y1, x2, y2 = a.regions[0]
  assert 0.12 < (x2 - x1) * (y2 - y1) / (r.width * r.height) < 0.3


# ------------------------------------------------------------------------------------------------------------------
# Bad input: every case raises DatasetFormatError naming the file and the line / annotation id.


def _edit_json(path, fn):
  data = json.loads(path.read_text())
  fn(data)
  path.write_text(json.dumps(data))


def _coco(tmp_path):
  return H.write_coco_subset(tmp_path, 'H_100x_C1', splits=('train',), n_images=2)


def _set_ann(**kw):
  return lambda d: d['annotations'][0].update(**kw)


COCO_CASES = {
    'missing_image': (lambda f: (f / 'Images/train/1_1_1000_ALL.png').unlink(),
                      ['train.json', 'image id 1', '1_1_1000_ALL.png', 'missing'], P.K_MISSING_IMAGE),
    'unreadable_image': (lambda f: (f / 'Images/train/1_1_1000_ALL.png').write_bytes(b'\x89PNG garbage'),
                         ['train.json', 'image id 1', '1_1_1000_ALL.png', 'unreadable'], P.K_UNREADABLE_IMAGE),
    'truncated_image': (lambda f: (f / 'Images/train/1_1_1000_ALL.png').write_bytes(
        (f / 'Images/train/1_1_1000_ALL.png').read_bytes()[:200]), ['1_1_1000_ALL.png', 'unreadable'],
                        P.K_UNREADABLE_IMAGE),
    'not_json': (lambda f: (f / 'json_labels/train.json').write_text('{oops'), ['train.json', 'invalid JSON'],
                 P.K_NOT_COCO),
    'missing_key': (lambda f: _edit_json(f / 'json_labels/train.json', lambda d: d.pop('categories')),
                    ['train.json', 'missing "categories"'], P.K_NOT_COCO),
    'wrong_type': (lambda f: _edit_json(f / 'json_labels/train.json', lambda d: d.update(images={})),
                   ['train.json', '"images" is dict, not a list'], P.K_NOT_COCO),
    'top_level_list': (lambda f: (f / 'json_labels/train.json').write_text('[]'),
                       ['train.json', 'top level is list'], P.K_NOT_COCO),
    'missing_image_id': (lambda f: _edit_json(f / 'json_labels/train.json', _set_ann(image_id=99)),
                         ['train.json', 'annotation id 1', 'image_id 99'], P.K_MISSING_IMAGE_ID),
    'unknown_category_name': (lambda f: _edit_json(f / 'json_labels/train.json',
                                                   lambda d: d['categories'][1].update(name='Blast')),
                              ['train.json', 'category id 1', "unknown category name 'Blast'"], P.K_CATEGORY),
    'category_named_twice': (lambda f: _edit_json(f / 'json_labels/train.json', lambda d: d['categories'].append(
        {'id': d['categories'][1]['id'], 'name': 'Basophil'})), ['train.json', 'is named twice', "'Basophil'"],
                             P.K_CATEGORY),
    'unknown_category_id': (lambda f: _edit_json(f / 'json_labels/train.json', _set_ann(category_id=77)),
                            ['train.json', 'annotation id 1', 'unknown category id 77'], P.K_CATEGORY),
    'box_outside': (lambda f: _edit_json(f / 'json_labels/train.json', _set_ann(bbox=[600, 200, 60, 100])),
                    ['train.json', 'annotation id 1', 'outside'], P.K_BOX),
    'box_of_an_annotation_without_id': (
        lambda f: _edit_json(f / 'json_labels/train.json', lambda d: [d['annotations'][0].pop('id'),
                                                                      d['annotations'][0].update(bbox=[1, 2, 0, 3])]),
        ['train.json', 'annotations[0] (no id)', 'size not positive'], P.K_BOX),
    'box_size': (lambda f: _edit_json(f / 'json_labels/train.json', _set_ann(bbox=[100, 200, 0, 100])),
                 ['train.json', 'annotation id 1', 'size not positive'], P.K_BOX),
    'box_non_numeric': (lambda f: _edit_json(f / 'json_labels/train.json', _set_ann(bbox=[100, 'x', 5, 5])),
                        ['train.json', 'annotation id 1', 'non-numeric'], P.K_NON_NUMERIC),
    'attribute_value': (lambda f: _edit_json(f / 'json_labels/train.json', _set_ann(cell_size=3)),
                        ['train.json', 'annotation id 1', 'cell_size value 3 not allowed'], P.K_ATTRIBUTE),
    'attribute_missing': (lambda f: _edit_json(f / 'json_labels/train.json',
                                               lambda d: d['annotations'][0].pop('nucleolus')),
                          ['train.json', 'annotation id 1', 'nucleolus missing'], P.K_ATTRIBUTE),
    'duplicate_file_name': (lambda f: _edit_json(f / 'json_labels/train.json',
                                                 lambda d: d['images'][1].update(file_name='1_1_1000_ALL.png')),
                            ['train.json', 'image id 2', "duplicate file name '1_1_1000_ALL.png'"], P.K_DUPLICATE),
    'size_mismatch': (lambda f: _edit_json(f / 'json_labels/train.json', lambda d: d['images'][0].update(width=500)),
                      ['train.json', 'image id 1', 'width 500 differs'], P.K_IMAGE_SIZE),
}


def test_coco_image_found_whatever_the_case_of_its_name(tmp_path):
  folder = _coco(tmp_path)
  clean, _, _ = _parse(tmp_path)
  image = folder / 'Images/train/1_1_1000_ALL.png'
  image.rename(image.with_suffix('.PNG'))
  records, report, _ = _parse(tmp_path)
  assert report.total == 0 and len(records) == len(clean)
  assert any(r.image_path.endswith('1_1_1000_ALL.PNG') and r.filename == '1_1_1000_ALL.png' for r in records)


def test_coco_category_no_annotation_uses_is_noted_not_an_error(tmp_path):
  folder = _coco(tmp_path)
  clean, _, _ = _parse(tmp_path)
  _edit_json(folder / 'json_labels/train.json', lambda d: d['categories'].append({'id': 999, 'name': 'leukemia-cells'}))
  records, report, _ = _parse(tmp_path)
  assert report.total == 0 and report.notes[P.K_CATEGORY] == 1 and "'leukemia-cells'" in report.summary()
  assert [r.labels.tolist() for r in records] == [r.labels.tolist() for r in clean]


@pytest.mark.parametrize('case', sorted(COCO_CASES))
def test_coco_bad_input(tmp_path, case):
  mutate, fragments, kind = COCO_CASES[case]
  mutate(_coco(tmp_path))
  with pytest.raises(P.DatasetFormatError) as info:
    _parse(tmp_path)
  for frag in fragments:
    assert frag in str(info.value), (frag, str(info.value))
  assert info.value.kind == kind
  assert isinstance(info.value, ValueError)


def _yolo(tmp_path, row=H.YOLO_ROW, subset='L_40x_C2'):
  return H.write_yolo_subset(tmp_path, subset, splits=('train',), n_images=2, row=row, rows_per_image=2)


def _write_label(line2, row=H.YOLO_ROW):
  return lambda f: (f / 'labels/train/1_1_400_CLL.txt').write_text(f'{row}\n{line2}\n')


YOLO_CASES = {
    'label_without_image': (lambda f: (f / 'labels/train/7_7_400_CLL.txt').write_text(H.YOLO_ROW),
                            ['7_7_400_CLL.txt', 'label file for a missing image'], P.K_ORPHAN_LABEL),
    'missing_image_folder_label': (lambda f: (f / 'images/train/2_2_400_CLL.png').unlink(),
                                   ['2_2_400_CLL.txt', 'label file for a missing image'], P.K_ORPHAN_LABEL),
    'unreadable_image': (lambda f: (f / 'images/train/1_1_400_CLL.png').write_bytes(b'not an image'),
                         ['1_1_400_CLL.png', 'unreadable'], P.K_UNREADABLE_IMAGE),
    'column_count': (_write_label('2 0.5 0.25 0.1 0.2 3 2 0 1 0 1'), ['1_1_400_CLL.txt:2', 'wrong column count 11'],
                     P.K_COLUMNS),
    'non_numeric': (_write_label('2 0.5 abc 0.1 0.2 3 2 0 1 0 1 0'), ['1_1_400_CLL.txt:2', "non-numeric", "'abc'"],
                    P.K_NON_NUMERIC),
    'nan': (_write_label('2 0.5 nan 0.1 0.2 3 2 0 1 0 1 0'), ['1_1_400_CLL.txt:2', 'non-finite'], P.K_NON_NUMERIC),
    'class_out_of_range': (_write_label('14 0.5 0.25 0.1 0.2 3 2 0 1 0 1 0'),
                           ['1_1_400_CLL.txt:2', 'class id 14 out of range'], P.K_CLASS),
    'class_not_integer': (_write_label('1.5 0.5 0.25 0.1 0.2 3 2 0 1 0 1 0'),
                          ['1_1_400_CLL.txt:2', 'class id 1.5 is not an integer'], P.K_CLASS),
    'box_outside': (_write_label('2 0.98 0.25 0.1 0.2 3 2 0 1 0 1 0'), ['1_1_400_CLL.txt:2', 'outside'], P.K_BOX),
    'box_size': (_write_label('2 0.5 0.25 0 0.2 3 2 0 1 0 1 0'), ['1_1_400_CLL.txt:2', 'size not positive'], P.K_BOX),
    'attribute_value': (_write_label('2 0.5 0.25 0.1 0.2 3 3 0 1 0 1 0'),
                        ['1_1_400_CLL.txt:2', 'nuclear_chromatin value 3 not allowed'], P.K_ATTRIBUTE),
    'size_attribute_value': (_write_label('2 0.5 0.25 0.1 0.2 4 0 0 1 0 1 0'),
                             ['1_1_400_CLL.txt:2', 'cell_size value 4 not allowed'], P.K_ATTRIBUTE),
    'duplicate_file_name': (lambda f: H.write_png(f / 'images/train/1_1_400_CLL.jpg'),
                            ['1_1_400_CLL', 'duplicate file name'], P.K_DUPLICATE),
    'mixed_columns': (lambda f: (f / 'labels/train/2_2_400_CLL.txt').write_text(H.SPARSE_ROW + '\n'),
                      ['L_40x_C2', 'mix of 12-column', '2_2_400_CLL.txt:1', '1_1_400_CLL.txt:1'], P.K_MIXED),
    'unknown_column_count': (lambda f: [(f / f'labels/train/{n}.txt').write_text('1 0.5 0.5 0.1 0.1\n')
                                        for n in ('1_1_400_CLL', '2_2_400_CLL')],
                             ['1_1_400_CLL.txt:1', 'wrong column count 5'], P.K_COLUMNS),
}


@pytest.mark.parametrize('case', sorted(YOLO_CASES))
def test_yolo_bad_input(tmp_path, case):
  mutate, fragments, kind = YOLO_CASES[case]
  mutate(_yolo(tmp_path))
  with pytest.raises(P.DatasetFormatError) as info:
    _parse(tmp_path)
  for frag in fragments:
    assert frag in str(info.value), (frag, str(info.value))
  assert info.value.kind == kind


def test_yolo_box_clipped_within_tolerance(tmp_path):
  folder = _yolo(tmp_path)
  (folder / 'labels/train/1_1_400_CLL.txt').write_text('2 0.9505 0.25 0.1 0.2 3 2 0 1 0 1 0\n')
  records, _, _ = _parse(tmp_path)
  r = _by_name(records)[('L_40x_C2', 'train', '1_1_400_CLL.png')]
  np.testing.assert_allclose(r.boxes[0, 2], 640.0)


SPARSE_CASES = {
    'region_differs': (_write_label('2 0.5 0.25 0.1 0.2 64 32 384 353 1 0 2 1 0 1 0', H.SPARSE_ROW),
                       ['1_1_400_CLL.txt:2', 'differs from line 1', 'identical on all rows'], P.K_REGION),
    'region_outside': (lambda f: (f / 'labels/train/1_1_400_CLL.txt').write_text(
        '2 0.5 0.25 0.1 0.2 64 32 700 352 1 0 2 1 0 1 0\n'), ['1_1_400_CLL.txt:1', 'region', 'outside'], P.K_REGION),
    'region_empty': (lambda f: (f / 'labels/train/1_1_400_CLL.txt').write_text(
        '2 0.5 0.25 0.1 0.2 64 32 64 352 1 0 2 1 0 1 0\n'), ['1_1_400_CLL.txt:1', 'region size not positive'],
                     P.K_REGION),
    'not_640': (lambda f: H.write_png(f / 'images/train/1_1_400_CLL.png', size=(320, 640)),
                ['1_1_400_CLL.png', '320x640', 'needs 640x640'], P.K_IMAGE_SIZE),
    'column_count': (_write_label('2 0.5 0.25 0.1 0.2 64 32 384 352 1 0 2 1 0 1', H.SPARSE_ROW),
                     ['1_1_400_CLL.txt:2', 'wrong column count 15', 'sparse'], P.K_COLUMNS),
    'attribute_value': (_write_label('2 0.5 0.25 0.1 0.2 64 32 384 352 1 0 2 1 0 1 5', H.SPARSE_ROW),
                        ['1_1_400_CLL.txt:2', 'cytoplasmic_vacuoles value 5 not allowed'], P.K_ATTRIBUTE),
}


@pytest.mark.parametrize('case', sorted(SPARSE_CASES))
def test_sparse_bad_input(tmp_path, case):
  mutate, fragments, kind = SPARSE_CASES[case]
  mutate(_yolo(tmp_path, row=H.SPARSE_ROW, subset='H_40x_C1'))
  with pytest.raises(P.DatasetFormatError) as info:
    _parse(tmp_path)
  for frag in fragments:
    assert frag in str(info.value), (frag, str(info.value))
  assert info.value.kind == kind


def _tiny_txl(tmp_path):
  root = tmp_path / 'txl'
  (root / 'labels/train').mkdir(parents=True)
  (root / 'labels/val').mkdir(parents=True)
  (root / 'data.yaml').write_text("train: ./images/train/\nval: ./images/val/\nnc: 3\n"
                                  "names: ['WBC', 'RBC', 'Platelets']\n")
  H.write_png(root / 'images/train/a.jpg', size=(575, 575))
  H.write_png(root / 'images/val/b.jpg', size=(640, 480))
  (root / 'labels/train/a.txt').write_text('0 0.5 0.2 0.2 0.2\n')
  (root / 'labels/train/classes.txt').write_text('WBC\nRBC\nPC\n')  # Ignored, as in the release.
  (root / 'labels/val/b.txt').write_text('1 0.5 0.5 0.1 0.1\n2 0.2 0.2 0.05 0.05\n')
  return root


TXL_CASES = {
    'column_count': (lambda r: (r / 'labels/train/a.txt').write_text('0 0.5 0.2 0.2 0.2 1\n'),
                     ['a.txt:1', 'wrong column count 6'], P.K_COLUMNS),
    'class_out_of_range': (lambda r: (r / 'labels/val/b.txt').write_text('1 0.5 0.5 0.1 0.1\n3 0.2 0.2 0.1 0.1\n'),
                           ['b.txt:2', 'class id 3 out of range [0, 2]'], P.K_CLASS),
    'bad_yaml': (lambda r: (r / 'data.yaml').write_text('nc: 2\nnames: [WBC, RBC, Platelets]\n'),
                 ['data.yaml', 'nc=2'], P.K_YAML),
    'orphan_label': (lambda r: (r / 'labels/val/c.txt').write_text('0 0.5 0.5 0.1 0.1\n'),
                     ['c.txt', 'label file for a missing image'], P.K_ORPHAN_LABEL),
}


@pytest.mark.parametrize('case', sorted(TXL_CASES))
def test_txl_bad_input(tmp_path, case):
  mutate, fragments, kind = TXL_CASES[case]
  root = _tiny_txl(tmp_path)
  mutate(root)
  with pytest.raises(P.DatasetFormatError) as info:
    P.parse_txl_pbc(root)
  for frag in fragments:
    assert frag in str(info.value), (frag, str(info.value))
  assert info.value.kind == kind


def test_duplicate_subset(tmp_path):
  H.write_coco_subset(tmp_path, 'H_100x_C1', n_images=1)
  H.write_yolo_subset(tmp_path, 'hcm_100x_c1', n_images=1)
  with pytest.raises(P.DatasetFormatError, match=r'hcm_100x_c1: subset H_100x_C1 given twice'):
    P.find_subsets(tmp_path)


def test_missing_root(tmp_path):
  with pytest.raises(P.DatasetFormatError, match='does not exist'):
    P.find_subsets(tmp_path / 'nope')


# ------------------------------------------------------------------------------------------------------------------
# Skip policy.


def test_skip_policy_counts_and_keeps_valid_images(tmp_path):
  coco = H.write_coco_subset(tmp_path, 'H_100x_C1', splits=('train', 'test'), n_images=3, anns_per_image=2)
  # train: a bad attribute on annotation 3 (image 2) skips image 2 whole; an annotation of a missing image id.
  def edit(d):
    d['annotations'][2]['cytoplasm'] = 7
    d['annotations'].append(dict(d['annotations'][0], id=99, image_id=42))
  _edit_json(coco / 'json_labels/train.json', edit)
  (coco / 'json_labels/test.json').write_text('{"images": []}')  # Not COCO: the whole file is skipped.
  yolo = H.write_yolo_subset(tmp_path, 'L_40x_C2', splits=('train',), n_images=3, rows_per_image=2)
  (yolo / 'labels/train/2_2_400_CLL.txt').write_text(f'{H.YOLO_ROW}\n2 1.5 0.25 0.1 0.2 3 2 0 1 0 1 0\n')
  (yolo / 'labels/train/8_8_400_CLL.txt').write_text(H.YOLO_ROW)
  (yolo / 'images/train/3_3_400_CLL.png').write_bytes(b'broken')

  with pytest.raises(P.DatasetFormatError):
    _parse(tmp_path)
  records, report, _ = _parse(tmp_path, on_error='skip')
  names = {(r.subset, r.filename) for r in records}
  assert names == {('H_100x_C1', '1_1_1000_ALL.png'), ('H_100x_C1', '3_3_1000_ALL.png'),
                   ('L_40x_C2', '1_1_400_CLL.png')}
  assert all(len(r.labels) == 2 for r in records)  # No partial label sets.
  assert dict(report.counts) == {P.K_ATTRIBUTE: 1, P.K_MISSING_IMAGE_ID: 1, P.K_NOT_COCO: 1, P.K_BOX: 1,
                                 P.K_ORPHAN_LABEL: 1, P.K_UNREADABLE_IMAGE: 1}
  assert report.total == 6 and len(report.messages) == 6
  text = report.summary()
  assert 'Skipped 6' in text and 'bad_attribute: 1' in text and 'train.json' in text


def test_on_error_from_env(monkeypatch):
  monkeypatch.setenv('LLD_ON_ERROR', 'skip')
  assert P.on_error_from_env() == 'skip'
  monkeypatch.setenv('LLD_ON_ERROR', 'ignore')
  with pytest.raises(ValueError, match='LLD_ON_ERROR'):
    P.on_error_from_env()
  monkeypatch.delenv('LLD_ON_ERROR')
  assert P.on_error_from_env() == 'raise'


def test_region_mask():
  m = P.region_mask([(64.0, 32.0, 384.0, 352.0)], 640, 640)
  assert m.shape == (640, 640, 1) and m.sum() == 320 * 320
  assert m[32, 64, 0] == 1 and m[31, 64, 0] == 0 and m[351, 383, 0] == 1 and m[352, 383, 0] == 0
  assert P.region_mask([], 10, 20).sum() == 0
  np.testing.assert_allclose(P.normalized_yxyx(np.array([[64, 32, 384, 352]]), 640, 640),
                             [[0.05, 0.1, 0.55, 0.6]])


def test_skip_policy_mixed_columns_keeps_majority(tmp_path):
  folder = H.write_yolo_subset(tmp_path, 'L_40x_C2', splits=('train',), n_images=3)
  (folder / 'labels/train/3_3_400_CLL.txt').write_text(H.SPARSE_ROW + '\n')
  records, report, subsets = _parse(tmp_path, on_error='skip')
  assert subsets[0].layout == P.YOLO
  assert sorted(r.filename for r in records) == ['1_1_400_CLL.png', '2_2_400_CLL.png']
  assert dict(report.counts) == {P.K_COLUMNS: 1} and report.notes[P.K_MIXED] == 1


def test_bad_on_error_value():
  with pytest.raises(ValueError, match='on_error'):
    P.parse_lld('/nonexistent', on_error='ignore')
