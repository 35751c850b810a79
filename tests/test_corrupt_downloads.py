"""A corpus of broken downloads, each made by damaging a valid one: synthetic LLD in its three layouts, and real
TXL-PBC images. Every case must either stop the build with an error naming the damaged file and the fault, or,
under `on_error='skip'`, be skipped and counted while every undamaged image still arrives.
"""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from tfds_lld import parsers as P
from tfds_lld import synthetic
import lld_download_helpers as H

TXL_SOURCE = H.txl_pbc_root()
SUBSETS = {'coco': 'H_100x_C1', 'yolo': 'L_40x_C2', 'sparse': 'H_10x_C1'}


@pytest.fixture(scope='module')
def pristine(tmp_path_factory):
  """One valid download per layout (4 patients x 2 images: 6 train, 2 test), and a small TXL-PBC copy."""
  root = tmp_path_factory.mktemp('pristine')
  for layout, subset in SUBSETS.items():
    synthetic.generate(str(root / layout), layout, [subset], patients=4, images_per_patient=2, seed=3)
  if TXL_SOURCE is None:
    return root  # the TXL-PBC cases skip
  txl = root / 'txl'
  (txl / 'labels').mkdir(parents=True)
  shutil.copy(TXL_SOURCE / 'data.yaml', txl / 'data.yaml')
  for split, count in (('train', 4), ('val', 2)):
    (txl / 'images' / split).mkdir(parents=True)
    (txl / 'labels' / split).mkdir(parents=True)
    labelled = [p for p in sorted((TXL_SOURCE / 'labels' / split).glob('*.txt')) if p.read_text().count('\n') >= 2]
    for label in labelled[:count]:
      image = next((TXL_SOURCE / 'images' / split).glob(label.stem + '.*'))
      shutil.copy(image, txl / 'images' / split / image.name)
      shutil.copy(label, txl / 'labels' / split / label.name)
  return root


def _parse(root, layout, on_error):
  if layout == 'txl':
    records, report, _ = P.parse_txl_pbc(root, on_error=on_error)
  else:
    records, report, _ = P.parse_lld(root, on_error=on_error)
  return {f'{r.split}/{r.filename}' for r in records}, report


# Each damage function gets the layout's root and returns (file whose name the error must carry, the images
# [split/name] that may be lost with it). They pick their victims from whatever the valid download holds.


def _subset_dir(root):
  return next(p for p in root.iterdir() if p.is_dir())


def _label_with_rows(folder, split='train', rows=2):
  return next(p for p in sorted((folder / 'labels' / split).glob('*.txt')) if p.read_text().count('\n') >= rows)


def _image_of(label):
  return next((label.parent.parent.parent / 'images' / label.parent.name).glob(label.stem + '.*'))


def _rewrite_row(row_index, edit):
  """Damages row `row_index` of a label file holding enough rows; `edit` maps the list of fields."""
  def damage(root):
    folder = root if (root / 'data.yaml').exists() else _subset_dir(root)
    label = _label_with_rows(folder, rows=row_index + 1)
    lines = label.read_text().splitlines()
    lines[row_index] = ' '.join(edit(lines[row_index].split()))
    label.write_text('\n'.join(lines) + '\n')
    return label.name, {f'train/{_image_of(label).name}'}
  return damage


def _region_in_normalized_units(root):
  """Every row's region divided by the field's side: the labelled cells then lie outside it."""
  label = _label_with_rows(_subset_dir(root), rows=1)
  rows = [line.split() for line in label.read_text().splitlines() if line.strip()]
  for fields in rows:
    fields[5:9] = [f'{float(v) / 640:.4f}' for v in fields[5:9]]
  label.write_text('\n'.join(' '.join(fields) for fields in rows) + '\n')
  return label.name, {f'train/{_image_of(label).name}'}


def _remove_labels_of_split(root):
  folder = _subset_dir(root)
  shutil.rmtree(folder / 'labels' / 'train')
  return str(Path('images') / 'train'), {f'train/{p.name}' for p in (folder / 'images' / 'train').iterdir()}


def _second_coco_label_folder(root):
  folder = _subset_dir(root)
  shutil.copytree(folder / 'json_labels', folder / 'Annotations')
  everything = {f'{split}/{p.name}' for split in ('train', 'test') for p in (folder / 'Images' / split).iterdir()}
  return folder.name, everything


def _label_in_utf16(root):
  label = _label_with_rows(_subset_dir(root), rows=1)
  label.write_bytes(label.read_text().encode('utf-16'))
  return label.name, {f'train/{_image_of(label).name}'}


def _set(index, value):
  return lambda fields: fields[:index] + [value] + fields[index + 1:]


def _damage_image(how):
  def damage(root):
    folder = root if (root / 'data.yaml').exists() else _subset_dir(root)
    image = sorted((folder / 'images' / 'train').iterdir())[0]
    if how == 'truncate':
      image.write_bytes(image.read_bytes()[:300])
    elif how == 'halve':  # a JPEG has no checksum: only decoding it finds the cut
      image.write_bytes(image.read_bytes()[:image.stat().st_size // 2])
    elif how == 'tiff':
      from PIL import Image
      with Image.open(image) as im:
        im.save(image.with_suffix('.tif'))
      image.unlink()
      return image.stem + '.tif', {f'train/{image.name}'}
    elif how == 'garbage':
      image.write_bytes(b'this is not an image')
    elif how == 'empty':
      image.write_bytes(b'')
    elif how == 'delete':
      image.unlink()
    return image.stem, {f'train/{image.name}'}
  return damage


def _orphan_label(root):
  folder = root if (root / 'data.yaml').exists() else _subset_dir(root)
  label = _label_with_rows(folder, rows=1)
  (label.parent / ('orphan_' + label.name)).write_text(label.read_text())
  return 'orphan_' + label.name, set()


def _coco_json(edit, lose='image'):
  """Edits train.json; `lose` is 'image' (the edited annotation's image), 'split' or 'nothing'."""
  def damage(root):
    path = _subset_dir(root) / 'json_labels' / 'train.json'
    data = json.loads(path.read_text())
    annotation = data['annotations'][0]
    image_name = next(i['file_name'] for i in data['images'] if i['id'] == annotation['image_id'])
    everything = {f'train/{i["file_name"]}' for i in data['images']}
    edit(data)
    path.write_text(json.dumps(data))
    return 'train.json', {'image': {f'train/{image_name}'}, 'split': everything, 'nothing': set()}[lose]
  return damage


def _coco_text(text):
  def damage(root):
    path = _subset_dir(root) / 'json_labels' / 'train.json'
    everything = {f'train/{i["file_name"]}' for i in json.loads(path.read_text())['images']}
    path.write_text(text)
    return 'train.json', everything
  return damage


def _coco_image(how):
  def damage(root):
    folder = _subset_dir(root)
    image = sorted((folder / 'Images' / 'train').iterdir())[0]
    if how == 'delete':
      image.unlink()
    elif how == 'last_byte':  # every chunk's CRC still holds: only the missing IEND end tells
      image.write_bytes(image.read_bytes()[:-1])
    else:
      image.write_bytes(image.read_bytes()[:300] if how == 'truncate' else b'GIF89a')
    return image.name, {f'train/{image.name}'}
  return damage


def _annotation(**fields):
  return lambda d: d['annotations'][0].update(**fields)


def _resize_image(root):
  folder = _subset_dir(root)
  label = _label_with_rows(folder, rows=1)
  image = _image_of(label)
  from PIL import Image
  Image.new('RGB', (320, 640), (200, 150, 160)).save(image)
  return image.name, {f'train/{image.name}'}


def _remove_yaml(root):
  (root / 'data.yaml').unlink()
  return 'data.yaml', None  # nothing to skip to: the download is unusable


CASES = {
    # COCO JSON layout
    'coco/not_json': (_coco_text('{"images": [}'), P.K_NOT_COCO),
    'coco/top_level_list': (_coco_text('[]'), P.K_NOT_COCO),
    'coco/empty_file': (_coco_text(''), P.K_NOT_COCO),
    'coco/no_annotations_key': (_coco_json(lambda d: d.pop('annotations'), 'split'), P.K_NOT_COCO),
    'coco/images_not_list': (_coco_json(lambda d: d.update(images={}), 'split'), P.K_NOT_COCO),
    'coco/annotation_of_unknown_image': (_coco_json(_annotation(image_id=9999), 'nothing'), P.K_MISSING_IMAGE_ID),
    'coco/unknown_category_id': (_coco_json(_annotation(category_id=99)), P.K_CATEGORY),
    'coco/box_outside_image': (_coco_json(_annotation(bbox=[630, 10, 80, 80])), P.K_BOX),
    'coco/box_zero_width': (_coco_json(_annotation(bbox=[10, 10, 0, 30])), P.K_BOX),
    'coco/box_text': (_coco_json(_annotation(bbox=[10, 'ten', 30, 30])), P.K_NON_NUMERIC),
    'coco/attribute_out_of_range': (_coco_json(_annotation(nucleolus=5)), P.K_ATTRIBUTE),
    'coco/attribute_missing': (_coco_json(lambda d: d['annotations'][0].pop('cytoplasm')), P.K_ATTRIBUTE),
    'coco/wrong_image_size': (_coco_json(lambda d: [i.update(width=1000) for i in d['images']
                                                    if i['id'] == d['annotations'][0]['image_id']]),
                              P.K_IMAGE_SIZE),
    'coco/image_missing': (_coco_image('delete'), P.K_MISSING_IMAGE),
    'coco/image_truncated': (_coco_image('truncate'), P.K_UNREADABLE_IMAGE),
    'coco/image_not_png': (_coco_image('garbage'), P.K_UNREADABLE_IMAGE),
    'coco/image_cut_in_its_last_byte': (_coco_image('last_byte'), P.K_UNREADABLE_IMAGE),
    'coco/two_label_folders': (_second_coco_label_folder, P.K_LAYOUT),
    # YOLO, 12 columns
    'yolo/too_few_columns': (_rewrite_row(1, lambda f: f[:-1]), P.K_COLUMNS),
    'yolo/text_field': (_rewrite_row(1, _set(2, 'abc')), P.K_NON_NUMERIC),
    'yolo/nan_field': (_rewrite_row(0, _set(3, 'nan')), P.K_NON_NUMERIC),
    'yolo/class_out_of_range': (_rewrite_row(1, _set(0, '14')), P.K_CLASS),
    'yolo/class_not_integer': (_rewrite_row(0, _set(0, '2.5')), P.K_CLASS),
    'yolo/box_outside': (_rewrite_row(1, _set(1, '1.4')), P.K_BOX),
    'yolo/box_negative_size': (_rewrite_row(0, _set(3, '-0.1')), P.K_BOX),
    'yolo/attribute_out_of_range': (_rewrite_row(1, _set(6, '7')), P.K_ATTRIBUTE),
    'yolo/image_truncated': (_damage_image('truncate'), P.K_UNREADABLE_IMAGE),
    'yolo/image_empty': (_damage_image('empty'), P.K_UNREADABLE_IMAGE),
    'yolo/image_missing': (_damage_image('delete'), P.K_ORPHAN_LABEL),
    'yolo/label_without_image': (_orphan_label, P.K_ORPHAN_LABEL),
    'yolo/labels_of_a_split_missing': (_remove_labels_of_split, P.K_LAYOUT),
    'yolo/image_tiff': (_damage_image('tiff'), P.K_UNREADABLE_IMAGE),
    'yolo/label_in_utf16': (_label_in_utf16, P.K_ENCODING),
    # sparse, 16 columns
    'sparse/region_differs_between_rows': (_rewrite_row(1, _set(7, '600')), P.K_REGION),
    'sparse/region_outside_image': (_rewrite_row(0, _set(7, '700')), P.K_REGION),
    'sparse/region_empty': (_rewrite_row(0, lambda f: f[:7] + [f[5]] + f[8:]), P.K_REGION),
    'sparse/fifteen_columns': (_rewrite_row(1, lambda f: f[:-1]), P.K_COLUMNS),
    'sparse/attribute_out_of_range': (_rewrite_row(0, _set(15, '3')), P.K_ATTRIBUTE),
    'sparse/image_not_640': (_resize_image, P.K_IMAGE_SIZE),
    'sparse/region_in_normalized_units': (_region_in_normalized_units, P.K_REGION),
    # TXL-PBC, 5 columns
    'txl/class_out_of_range': (_rewrite_row(1, _set(0, '3')), P.K_CLASS),
    'txl/six_columns': (_rewrite_row(0, lambda f: f + ['1']), P.K_COLUMNS),
    'txl/text_field': (_rewrite_row(1, _set(4, 'wide')), P.K_NON_NUMERIC),
    'txl/box_outside': (_rewrite_row(0, _set(2, '-0.5')), P.K_BOX),
    'txl/image_garbage': (_damage_image('garbage'), P.K_UNREADABLE_IMAGE),
    'txl/jpeg_cut_in_half': (_damage_image('halve'), P.K_UNREADABLE_IMAGE),
    'txl/label_without_image': (_orphan_label, P.K_ORPHAN_LABEL),
    'txl/data_yaml_missing': (_remove_yaml, P.K_YAML),
}


def test_the_corpus_covers_every_layout_with_thirty_cases_or_more():
  assert len(CASES) >= 30
  assert {name.split('/')[0] for name in CASES} == {'coco', 'yolo', 'sparse', 'txl'}


@pytest.mark.parametrize('case', sorted(CASES))
def test_broken_download(pristine, tmp_path, case):
  layout = case.split('/')[0]
  if layout == 'txl' and TXL_SOURCE is None:
    pytest.skip('the real TXL-PBC images are not beside this checkout')
  root = tmp_path / layout
  shutil.copytree(pristine / layout, root)
  everything, _ = _parse(root, layout, 'raise')
  damage, kind = CASES[case]
  named_file, lost = damage(root)

  with pytest.raises(P.DatasetFormatError) as error:
    _parse(root, layout, 'raise')
  assert named_file in str(error.value), str(error.value)
  assert error.value.kind == kind, str(error.value)

  if lost is None:  # structural: no policy can skip it
    with pytest.raises(P.DatasetFormatError):
      _parse(root, layout, 'skip')
    return
  arrived, report = _parse(root, layout, 'skip')
  assert report.counts[kind] >= 1 and report.total >= 1, report.summary()
  assert named_file in report.summary()
  assert arrived == everything - lost, (sorted(everything - arrived), sorted(lost))


def test_an_image_without_a_label_file_is_read_without_cells_and_noted(pristine, tmp_path):
  root = tmp_path / 'yolo'
  shutil.copytree(pristine / 'yolo', root)
  label = _label_with_rows(_subset_dir(root), rows=1)
  image = _image_of(label)
  label.unlink()
  records, report, _ = P.parse_lld(root, on_error='raise')
  record = next(r for r in records if r.filename == image.name)
  assert len(record.labels) == 0 and report.total == 0
  assert report.notes[P.K_NO_LABEL_FILE] == 1 and image.name in report.summary()


def test_names_that_give_no_diagnosis_are_noted(pristine, tmp_path):
  root = tmp_path / 'yolo'
  shutil.copytree(pristine / 'yolo', root)
  labels = sorted((_subset_dir(root) / 'labels' / 'train').glob('*.txt'))[:2]
  renamed = {}
  for label, new_stem in zip(labels, ('field (1)', labels[1].stem.rsplit('_', 1)[0] + '_APL')):
    image = _image_of(label)
    image.rename(image.with_name(new_stem + image.suffix))
    label.rename(label.with_name(new_stem + '.txt'))
    renamed[new_stem + image.suffix] = label.stem.split('_')[0]
  records, report, _ = P.parse_lld(root, on_error='raise')
  by_name = {r.filename: r for r in records}
  assert by_name['field (1).png'].patient == '' and by_name['field (1).png'].leukemia_type == 'unknown'
  apl = next(name for name in renamed if name.endswith('_APL.png'))
  assert by_name[apl].patient == renamed[apl] and by_name[apl].leukemia_type == 'unknown'
  assert report.notes[P.K_NAME] == 2 and report.total == 0
  assert 'field (1).png' in report.summary() and "'APL'" in report.summary()
  assert all(r.leukemia_type != 'unknown' for r in records if r.filename not in renamed)


def test_folders_that_look_like_part_of_the_download_but_are_not_read_are_noted(pristine, tmp_path):
  root = tmp_path / 'yolo'
  shutil.copytree(pristine / 'yolo', root)
  subset = _subset_dir(root)
  shutil.copytree(subset, root / (subset.name + '_v2'))  # misnamed: not one of LLD's subsets
  (root / 'LLD').mkdir()
  shutil.copytree(subset, root / 'LLD' / 'H_100x_C2')  # unpacked one level deeper than the others
  (root / 'notes').mkdir()  # holds nothing of the download: no note
  records, report, subsets = P.parse_lld(root, on_error='raise')
  assert [s.path for s in subsets] == [subset]
  assert report.notes[P.K_UNREAD_FOLDER] == 2 and report.total == 0
  summary = report.summary()
  assert subset.name + '_v2' in summary and 'H_100x_C2' in summary and str(root / 'notes') not in summary


def test_a_label_file_with_a_byte_order_mark_reads_as_without(pristine, tmp_path):
  root = tmp_path / 'yolo'
  shutil.copytree(pristine / 'yolo', root)
  clean, _, _ = P.parse_lld(root, on_error='raise')
  label = _label_with_rows(_subset_dir(root), rows=1)
  label.write_bytes(b'\xef\xbb\xbf' + label.read_bytes().replace(b'\n', b'\r\n'))  # as a Windows editor saves it
  records, report, _ = P.parse_lld(root, on_error='raise')
  assert report.total == 0
  for before, after in zip(clean, records):
    assert before.filename == after.filename
    np.testing.assert_array_equal(before.boxes, after.boxes)
    np.testing.assert_array_equal(before.attributes, after.attributes)


def test_coco_images_of_a_split_without_its_json_are_noted(pristine, tmp_path):
  root = tmp_path / 'coco'
  shutil.copytree(pristine / 'coco', root)
  folder = _subset_dir(root)
  shutil.copytree(folder / 'Images' / 'test', folder / 'Images' / 'val')
  records, report, _ = P.parse_lld(root, on_error='raise')
  assert {r.split for r in records} == {'train', 'test'} and report.total == 0
  assert report.notes[P.K_UNREAD_FOLDER] == 1 and 'no val.json' in report.summary()


def test_a_name_whose_magnification_is_another_subsets_is_noted(pristine, tmp_path):
  root = tmp_path / 'yolo'
  shutil.copytree(pristine / 'yolo', root)
  subset = _subset_dir(root)
  assert '_40x_' in subset.name
  label = _label_with_rows(subset, rows=1)
  image = _image_of(label)
  patient, number, magnification, leukemia_type = label.stem.split('_')
  assert magnification == '400'
  new_stem = f'{patient}_{number}_1000_{leukemia_type}'
  image.rename(image.with_name(new_stem + image.suffix))
  label.rename(label.with_name(new_stem + '.txt'))
  records, report, _ = P.parse_lld(root, on_error='raise')
  moved = next(r for r in records if r.filename == new_stem + image.suffix)
  assert moved.subset == subset.name and moved.patient == patient and moved.leukemia_type == leukemia_type
  assert report.notes[P.K_MAGNIFICATION] == 1 and report.total == 0 and new_stem in report.summary()


def test_a_sparse_cell_sticking_out_of_its_region_is_kept(pristine, tmp_path):
  root = tmp_path / 'sparse'
  shutil.copytree(pristine / 'sparse', root)
  label = _label_with_rows(_subset_dir(root), rows=1)
  fields = label.read_text().splitlines()[0].split()  # its first cell alone
  xc, yc, w, h = (float(v) * 640 for v in fields[1:5])
  region = (xc + w / 4, max(yc - h / 2 - 20, 0), min(xc + w / 2 + 20, 640), yc + h / 2)
  fields[5:9] = [f'{v:.2f}' for v in region]
  label.write_text(' '.join(fields) + '\n')  # the region's left edge right of the cell's centre
  records, report, _ = P.parse_lld(root, on_error='raise')
  kept = next(r for r in records if r.filename == _image_of(label).name)
  assert len(kept.labels) == 1 and report.total == 0
