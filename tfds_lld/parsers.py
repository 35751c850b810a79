"""Pure-Python readers from an LLD (or TXL-PBC) download folder to a list of example records.

No TensorFlow here: the TFDS builders (`tfds_lld/lld`, `tfds_lld/txl_pbc`) turn the records into examples.

Layouts (facts in `shared/docs/lld.md`):
  * COCO JSON: `{subset}/json_labels/{split}.json` (older: `Annotations/{split}.json`) with images in
    `Images/{split}/` (older: `Train_Images/`, `Test_Images/`, `Val_Images/`).
  * YOLO, 12 columns: `{subset}/images/{split}/*.png` + `{subset}/labels/{split}/*.txt`.
  * Sparse YOLO, 16 columns: as YOLO with the annotated region `rx1 ry1 rx2 ry2` (absolute px of the 640x640 image).
  * TXL-PBC: YOLO, 5 columns, class names in `data.yaml`.

Every record keeps boxes in absolute pixels (x1, y1, x2, y2), labels as class ids, attributes as int [n, 7] with
-1 = not applicable, and the annotated regions (x1, y1, x2, y2 px; the whole image when fully annotated, an empty
list when no region is known: nothing annotated).

Bad input raises `DatasetFormatError` (a `ValueError`) naming the file, the line or annotation id and the fault.
With `on_error='skip'` the offending image (or file) is skipped instead and counted in a `SkipReport`.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import math
import os
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
from PIL import Image

from tfds_lld import lld_format as F

IMAGE_EXTENSIONS = ('.png', '.jpg', '.jpeg', '.bmp', '.tif', '.tiff')
SPLIT_ALIASES = {'train': 'train', 'test': 'test', 'val': 'val', 'valid': 'val', 'validation': 'val'}
SPLITS = ('train', 'val', 'test')
# Layout names.
COCO, YOLO, SPARSE = 'coco', 'yolo', 'sparse'
FULL_LAYOUTS = (COCO, YOLO)
BOX_TOL_PX = 1.0
BOX_TOL_NORM = 1e-3
ON_ERROR_CHOICES = ('raise', 'skip')

# Fault kinds (keys of SkipReport.counts).
K_MISSING_IMAGE = 'missing_image'
K_UNREADABLE_IMAGE = 'unreadable_image'
K_ORPHAN_LABEL = 'label_without_image'
K_COLUMNS = 'wrong_column_count'
K_NON_NUMERIC = 'non_numeric_field'
K_ENCODING = 'not_utf8_text'
K_CLASS = 'class_id_out_of_range'
K_BOX = 'bad_box'
K_ATTRIBUTE = 'bad_attribute'
K_REGION = 'bad_region'
K_DUPLICATE = 'duplicate_file_name'
K_NOT_COCO = 'not_coco_json'
K_MISSING_IMAGE_ID = 'annotation_image_id_missing'
K_CATEGORY = 'unknown_category'
K_IMAGE_SIZE = 'wrong_image_size'
K_MIXED = 'mixed_layout'
K_LAYOUT = 'bad_layout'
K_YAML = 'bad_data_yaml'
K_NAME = 'name_without_diagnosis'  # a note: the file name gives no patient or no known leukemia type
K_MAGNIFICATION = 'magnification_not_the_subsets'  # a note: the name's magnification is another subset's
K_UNREAD_FOLDER = 'folder_not_read'  # a note: a folder that looks like part of the download but is not a subset
K_NO_LABEL_FILE = 'image_without_label_file'  # a note: YOLO writes no file for a field without objects


class DatasetFormatError(ValueError):
  """Malformed input. The message names the file (and line / annotation id) and the fault."""

  def __init__(self, message: str, kind: str = K_LAYOUT):
    super().__init__(message)
    self.kind = kind


@dataclasses.dataclass
class ExampleRecord:
  image_path: str
  filename: str            # base name of the image file
  subset: str              # canonical LLD subset (e.g. 'H_100x_C1') or the TXL-PBC source name
  split: str               # 'train' | 'val' | 'test'
  width: int
  height: int
  boxes: np.ndarray        # float32 [n, 4] absolute px x1, y1, x2, y2
  labels: np.ndarray       # int64 [n]
  attributes: np.ndarray   # int32 [n, 7], -1 = not applicable
  regions: list            # list of (x1, y1, x2, y2) px; [] = nothing annotated
  domain: F.Domain | None = None
  patient: str = ''
  leukemia_type: str = 'unknown'
  layout: str = ''

  @property
  def key(self) -> str:
    return f'{self.subset}/{self.split}/{self.filename}'

  @property
  def fully_annotated(self) -> bool:
    return len(self.regions) == 1 and tuple(self.regions[0]) == (0.0, 0.0, float(self.width), float(self.height))


@dataclasses.dataclass
class SkipReport:
  """What `on_error='skip'` left out, by fault kind, plus the first messages. Also carries notes."""
  counts: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  messages: list = dataclasses.field(default_factory=list)
  notes: collections.Counter = dataclasses.field(default_factory=collections.Counter)
  note_messages: list = dataclasses.field(default_factory=list)
  max_messages: int = 10

  def add(self, error: DatasetFormatError) -> None:
    self.counts[error.kind] += 1
    if len(self.messages) < self.max_messages:
      self.messages.append(str(error))

  def note(self, kind: str, message: str) -> None:
    self.notes[kind] += 1
    if len(self.note_messages) < self.max_messages:
      self.note_messages.append(message)

  def merge(self, other: 'SkipReport') -> None:
    self.counts.update(other.counts)
    self.notes.update(other.notes)
    self.messages.extend(other.messages[:max(0, self.max_messages - len(self.messages))])
    self.note_messages.extend(other.note_messages[:max(0, self.max_messages - len(self.note_messages))])

  @property
  def total(self) -> int:
    return sum(self.counts.values())

  def summary(self) -> str:
    lines = []
    if self.counts:
      lines.append(f'Skipped {self.total} bad input item(s) (on_error=skip):')
      lines += [f'  {k}: {v}' for k, v in sorted(self.counts.items())]
      lines.append('  first messages:')
      lines += [f'    - {m}' for m in self.messages]
    else:
      lines.append('No input skipped.')
    if self.notes:
      lines.append('Notes:')
      lines += [f'  {k}: {v}' for k, v in sorted(self.notes.items())]
      lines += [f'    - {m}' for m in self.note_messages]
    return '\n'.join(lines)


def _check_on_error(on_error: str) -> None:
  if on_error not in ON_ERROR_CHOICES:
    raise ValueError(f'on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}')


class _Policy:
  """Runs a unit of parsing; on DatasetFormatError raises or records the skip."""

  def __init__(self, on_error: str, report: SkipReport):
    if on_error not in ON_ERROR_CHOICES:
      raise ValueError(f'on_error must be one of {ON_ERROR_CHOICES}, got {on_error!r}')
    self.on_error = on_error
    self.report = report

  def handle(self, error: DatasetFormatError) -> None:
    if self.on_error == 'raise':
      raise error
    self.report.add(error)

  def run(self, fn: Callable[[], Any]) -> Any:
    try:
      return fn()
    except DatasetFormatError as e:
      self.handle(e)
      return None


@dataclasses.dataclass
class SubsetInfo:
  path: Path
  domain: F.Domain
  layout: str                 # COCO | YOLO | SPARSE
  splits: tuple = ()


# ----------------------------------------------------------------------------------------------------------------
# Small helpers.


def _child(parent: Path, *names: str) -> Path | None:
  """First child dir of `parent` whose name matches one of `names` case-insensitively."""
  if not parent.is_dir():
    return None
  lower = {n.lower() for n in names}
  for p in sorted(parent.iterdir()):
    if p.is_dir() and p.name.lower() in lower:
      return p
  return None


def _split_name(name: str) -> str | None:
  return SPLIT_ALIASES.get(name.lower())


def _image_files(folder: Path) -> list[Path]:
  return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


# What TensorFlow's image decoder, which reads the stored bytes in training, can decode.
_DECODABLE_FORMATS = ('PNG', 'JPEG', 'BMP', 'GIF')
_PNG_END = b'\x00\x00\x00\x00IEND\xaeB`\x82'  # the empty IEND chunk and its CRC that close every PNG


def read_image_size(path: Path) -> tuple[int, int]:
  """(width, height) of an image that training will be able to decode; raises DatasetFormatError if it is
  missing, unreadable, cut short, or in a format TensorFlow cannot decode.

  A PNG's chunks are checked against their CRCs, and its closing IEND chunk must be there (a download cut off in
  its last bytes passes the CRCs); the other formats carry no checksums, so they are decoded whole."""
  if not path.is_file():
    raise DatasetFormatError(f'{path}: image file is missing', K_MISSING_IMAGE)
  try:
    with Image.open(path) as im:
      size, image_format = im.size, im.format
      im.verify()
    if image_format not in _DECODABLE_FORMATS:
      raise DatasetFormatError(f'{path}: {image_format} images cannot be decoded in training (TensorFlow reads '
                               f'{", ".join(_DECODABLE_FORMATS)}); convert it to PNG', K_UNREADABLE_IMAGE)
    if image_format == 'PNG':
      with open(path, 'rb') as f:  # some writers append bytes after IEND: look near the end, not at it
        f.seek(max(path.stat().st_size - 4096, 0))
        if _PNG_END not in f.read():
          raise OSError('no IEND chunk at the end: the file was cut short')
    else:
      with Image.open(path) as im:
        im.load()
  except DatasetFormatError:
    raise
  except Exception as e:  # PIL raises many types.
    raise DatasetFormatError(f'{path}: image is unreadable ({type(e).__name__}: {e})', K_UNREADABLE_IMAGE) from e
  if size[0] <= 0 or size[1] <= 0:
    raise DatasetFormatError(f'{path}: image has size {size}', K_UNREADABLE_IMAGE)
  return size


def _number(token: str, where: str, what: str) -> float:
  try:
    value = float(token)
  except ValueError:
    raise DatasetFormatError(f'{where}: non-numeric {what} {token!r}', K_NON_NUMERIC) from None
  if not math.isfinite(value):
    raise DatasetFormatError(f'{where}: non-finite {what} {token!r}', K_NON_NUMERIC)
  return value


def _integer(value: Any, where: str, what: str, kind: str) -> int:
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value != int(value):
    raise DatasetFormatError(f'{where}: {what} {value!r} is not an integer', kind)
  return int(value)


def _class_id(value: Any, num_classes: int, where: str) -> int:
  cid = _integer(value, where, 'class id', K_CLASS)
  if not 0 <= cid < num_classes:
    raise DatasetFormatError(f'{where}: class id {cid} out of range [0, {num_classes - 1}]', K_CLASS)
  return cid


def _attribute(value: Any, index: int, na_code: int, where: str) -> int:
  name = F.ATTRIBUTE_NAMES[index]
  v = _integer(value, where, f'attribute {name} value', K_ATTRIBUTE)
  if v == na_code:
    return F.NOT_APPLICABLE
  if not 0 <= v < F.NUM_ATTRIBUTE_VALUES[index]:
    allowed = list(range(F.NUM_ATTRIBUTE_VALUES[index])) + [na_code]
    raise DatasetFormatError(f'{where}: attribute {name} value {v} not allowed (allowed {allowed}, '
                             f'{na_code} = not applicable)', K_ATTRIBUTE)
  return v


def _check_box_px(x1, y1, x2, y2, width, height, where, tol=BOX_TOL_PX, kind=K_BOX, what='box'):
  """Clips a px box to the image within `tol`; raises if outside beyond tol or not positive in size."""
  if not (x2 > x1 and y2 > y1):
    raise DatasetFormatError(f'{where}: {what} size not positive ({x1:g}, {y1:g}, {x2:g}, {y2:g})', kind)
  if x1 < -tol or y1 < -tol or x2 > width + tol or y2 > height + tol:
    raise DatasetFormatError(f'{where}: {what} ({x1:g}, {y1:g}, {x2:g}, {y2:g}) outside the {width}x{height} image',
                             kind)
  x1, y1 = max(0.0, x1), max(0.0, y1)
  x2, y2 = min(float(width), x2), min(float(height), y2)
  if not (x2 > x1 and y2 > y1):
    raise DatasetFormatError(f'{where}: {what} empty after clipping to the image', kind)
  return x1, y1, x2, y2


def _yolo_box(values, width, height, where):
  xc, yc, w, h = values
  if not (w > 0 and h > 0):
    raise DatasetFormatError(f'{where}: box size not positive (w={w:g}, h={h:g})', K_BOX)
  x1, y1, x2, y2 = xc - w / 2, yc - h / 2, xc + w / 2, yc + h / 2
  t = BOX_TOL_NORM
  if x1 < -t or y1 < -t or x2 > 1 + t or y2 > 1 + t:
    raise DatasetFormatError(f'{where}: normalised box (xc={xc:g}, yc={yc:g}, w={w:g}, h={h:g}) outside the image',
                             K_BOX)
  x1, y1, x2, y2 = max(0.0, x1), max(0.0, y1), min(1.0, x2), min(1.0, y2)
  return x1 * width, y1 * height, x2 * width, y2 * height


def _patient_type(path: Path, domain: F.Domain, report: SkipReport) -> tuple[str, str]:
  """(patient, leukemia type) from an LLD file name; ('', 'unknown') and a note when the name does not give them
  (LLD tells a field's diagnosis by its name alone). A name whose magnification is not its subset's is noted too
  (a field filed under the wrong subset is scored in the wrong domain)."""
  parsed = F.parse_image_filename(path.stem)
  if parsed is None:
    report.note(K_NAME, f'{path}: not named {{patient}}_{{image}}_{{magnification}}_{{type}}; patient and leukemia '
                        'type unknown')
    return '', 'unknown'
  magnification = F.image_filename_magnification(path.stem)
  if magnification != domain.magnification:
    report.note(K_MAGNIFICATION, f'{path}: named as a {magnification} field in the {domain.magnification} subset '
                                 f'{domain.subset}; read as {domain.subset}')
  patient, ltype = parsed
  if ltype not in F.LEUKEMIA_TYPES:
    report.note(K_NAME, f'{path}: leukemia type {ltype!r} is not one of {list(F.LEUKEMIA_TYPES)}; type unknown')
    return patient, 'unknown'
  return patient, ltype


def _check_cells_touch_region(boxes, line_numbers, region, label_file):
  """Only the cells inside a sparse field's region are labelled. A cell on its border may stick out of it, but a
  labelled cell wholly outside it means the region's coordinates are not the absolute pixels they should be (or
  not this field's)."""
  x1, y1, x2, y2 = region
  for lineno, (bx1, by1, bx2, by2) in zip(line_numbers, boxes):
    if bx2 < x1 - BOX_TOL_PX or bx1 > x2 + BOX_TOL_PX or by2 < y1 - BOX_TOL_PX or by1 > y2 + BOX_TOL_PX:
      raise DatasetFormatError(
          f'{label_file}:{lineno}: the labelled cell ({bx1:.1f}, {by1:.1f}, {bx2:.1f}, {by2:.1f}) px lies wholly '
          f'outside the annotated region ({x1:g}, {y1:g}, {x2:g}, {y2:g}); the region must be in absolute pixels of '
          f'the {F.LLD_IMAGE_SIZE}x{F.LLD_IMAGE_SIZE} field', K_REGION)


def _arrays(boxes, labels, attrs):
  return (np.asarray(boxes, np.float32).reshape(-1, 4), np.asarray(labels, np.int64).reshape(-1),
          np.asarray(attrs, np.int32).reshape(-1, F.NUM_ATTRIBUTES))


def _full_region(width, height):
  return [(0.0, 0.0, float(width), float(height))]


def _check_duplicates(paths: Iterable[Path], where: str, policy: _Policy) -> list[Path]:
  """Drops (or raises on) images whose stems collide (a.png + a.jpg, A.png + a.png) within one split folder."""
  by_stem = collections.defaultdict(list)
  for p in paths:
    by_stem[p.stem.lower()].append(p)
  keep = []
  for stem, group in by_stem.items():
    if len(group) > 1:
      for p in group:
        policy.handle(DatasetFormatError(
            f'{p}: duplicate file name in {where} (also {", ".join(q.name for q in group if q != p)})', K_DUPLICATE))
      continue
    keep.append(group[0])
  return sorted(keep)


# ----------------------------------------------------------------------------------------------------------------
# Subset discovery.


def _label_files(folder: Path) -> dict[str, list[Path]]:
  """{split: label txt files} of a YOLO-style folder (labels/{split}/*.txt), classes.txt excluded."""
  out = {}
  labels = _child(folder, 'labels')
  if labels is None:
    return out
  for d in sorted(labels.iterdir()):
    split = _split_name(d.name) if d.is_dir() else None
    if split:
      out[split] = sorted(p for p in d.iterdir() if p.is_file() and p.suffix.lower() == '.txt'
                          and p.name.lower() != 'classes.txt')
  return out


def _column_counts(path: Path) -> dict[int, int]:
  """{column count: first line number} over the non-empty lines of a text file."""
  counts = {}
  with open(path, encoding='utf-8-sig', errors='replace') as f:
    for lineno, line in enumerate(f, 1):
      n = len(line.split())
      if n and n not in counts:
        counts[n] = lineno
  return counts


def _coco_json_dir(folder: Path) -> Path | None:
  """The subset's COCO label folder (json_labels/ or, in older copies, Annotations/) that holds JSON files; None
  if neither does. Both holding JSON is an error: which one is the download's is not ours to guess."""
  found = [d for d in sorted(folder.iterdir()) if d.is_dir() and d.name.lower() in ('json_labels', 'annotations')
           and any(p.is_file() and p.suffix.lower() == '.json' for p in d.iterdir())]
  if len(found) > 1:
    raise DatasetFormatError(f'{folder}: two COCO label folders with JSON files ({", ".join(d.name for d in found)}); '
                             f'keep one', K_LAYOUT)
  return found[0] if found else None


def detect_layout(folder: Path, on_error: str = 'raise', report: SkipReport | None = None) -> str:
  """COCO if a json label dir is present, else YOLO (12 columns) or SPARSE (16 columns) from the label files."""
  if _coco_json_dir(folder) is not None:
    return COCO
  label_files = _label_files(folder)
  if not label_files and _child(folder, 'images') is None:
    raise DatasetFormatError(f'{folder}: no COCO json dir (json_labels/ or Annotations/) and no YOLO '
                             f'images/ + labels/ folders', K_LAYOUT)
  seen = {}  # column count -> (file, line)
  for files in label_files.values():
    for p in files:
      for n, lineno in _column_counts(p).items():
        seen.setdefault(n, (p, lineno))
  layouts = {12: YOLO, 16: SPARSE}
  valid = {n: v for n, v in seen.items() if n in layouts}
  if len(valid) > 1:
    (p12, l12), (p16, l16) = valid[12], valid[16]
    err = DatasetFormatError(f'{folder}: mix of 12-column (YOLO) and 16-column (sparse) label files in one subset: '
                             f'{p12}:{l12} has 12 columns, {p16}:{l16} has 16', K_MIXED)
    if on_error == 'raise':
      raise err
    # Keep the majority layout; files with the other count are skipped as wrong column count later.
    n12 = sum(1 for fs in label_files.values() for p in fs if 12 in _column_counts(p))
    n16 = sum(1 for fs in label_files.values() for p in fs if 16 in _column_counts(p))
    if report is not None:
      report.note(K_MIXED, str(err))
    return YOLO if n12 >= n16 else SPARSE
  if valid:
    return layouts[next(iter(valid))]
  if seen:
    n, (p, lineno) = next(iter(seen.items()))
    raise DatasetFormatError(f'{p}:{lineno}: wrong column count {n} (expected 12 for YOLO or 16 for sparse YOLO)',
                             K_COLUMNS)
  return YOLO  # Only empty label files (or none): fully annotated images without cells.


def _holds_data(folder: Path) -> bool:
  return any(_child(folder, name) is not None for name in ('images', 'labels', 'json_labels', 'annotations'))


def _note_unread_folders(root: Path, subsets: list[Path], report: SkipReport) -> None:
  """Notes the folders beside or above the subsets read that hold images or labels, or subset folders of their
  own, and so look like part of the download: a subset misnamed or unpacked one level too deep."""
  if root in subsets:
    return
  levels = {root} | {p.parent for p in subsets}
  read_from = ', '.join(sorted({str(p.parent) for p in subsets})) or 'none'
  for level in sorted(levels):
    for folder in sorted(p for p in level.iterdir() if p.is_dir() and p not in subsets and p not in levels):
      nested = [p.name for p in sorted(folder.iterdir()) if p.is_dir() and F.parse_subset_name(p.name) is not None]
      if nested:
        report.note(K_UNREAD_FOLDER, f'{folder}: holds subset folders ({", ".join(nested)}) that are not read (the '
                                     f'subsets read are the ones in {read_from})')
      elif _holds_data(folder):
        report.note(K_UNREAD_FOLDER, f'{folder}: holds images or labels, but {folder.name!r} is not the name of an '
                                     f'LLD subset (such as H_100x_C1 or L_40x_C2); not read')


def find_subsets(root: str | os.PathLike, on_error: str = 'raise',
                 report: SkipReport | None = None) -> list[SubsetInfo]:
  """LLD subset folders under `root` (or `root` itself if it is one), each with its own layout."""
  root = Path(root).expanduser()
  if not root.is_dir():
    raise DatasetFormatError(f'{root}: download folder does not exist or is not a directory', K_LAYOUT)
  candidates = []
  if F.parse_subset_name(root.name) is not None:
    candidates = [root]
  else:
    candidates = [p for p in sorted(root.iterdir()) if p.is_dir() and F.parse_subset_name(p.name) is not None]
    if not candidates:  # An archive often unpacks into one wrapper folder: look one level further down.
      candidates = [p for d in sorted(root.iterdir()) if d.is_dir() for p in sorted(d.iterdir())
                    if p.is_dir() and F.parse_subset_name(p.name) is not None]
  out, seen = [], {}
  policy = _Policy(on_error, report if report is not None else SkipReport())
  _note_unread_folders(root, candidates, policy.report)
  for folder in candidates:
    domain = F.parse_subset_name(folder.name)
    if domain.subset in seen:
      policy.handle(DatasetFormatError(f'{folder}: subset {domain.subset} given twice (also {seen[domain.subset]})',
                                       K_DUPLICATE))
      continue
    layout = policy.run(lambda: detect_layout(folder, on_error, policy.report))
    if layout is None:
      continue
    seen[domain.subset] = folder
    out.append(SubsetInfo(folder, domain, layout))
  return out


# ----------------------------------------------------------------------------------------------------------------
# COCO JSON.


def _coco_image_dir(folder: Path, split: str) -> Path | None:
  images = _child(folder, 'images')
  if images is not None:
    names = [k for k, v in SPLIT_ALIASES.items() if v == split]
    d = _child(images, *names)
    if d is not None:
      return d
  names = [f'{k}_images' for k, v in SPLIT_ALIASES.items() if v == split]
  return _child(folder, *names)


def _require(cond: bool, message: str, kind: str = K_NOT_COCO):
  if not cond:
    raise DatasetFormatError(message, kind)


def _load_coco(path: Path) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      data = json.load(f)
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise DatasetFormatError(f'{path}: not a COCO JSON file (invalid JSON: {e})', K_NOT_COCO) from e
  _require(isinstance(data, dict), f'{path}: not a COCO JSON file (top level is {type(data).__name__}, not an object)')
  for key in ('images', 'annotations', 'categories'):
    _require(key in data, f'{path}: not a COCO JSON file (missing "{key}")')
    _require(isinstance(data[key], list), f'{path}: not a COCO JSON file ("{key}" is {type(data[key]).__name__}, '
                                          f'not a list)')
  for i, im in enumerate(data['images']):
    _require(isinstance(im, dict) and 'id' in im and isinstance(im.get('file_name'), str),
             f'{path}: not a COCO JSON file (images[{i}] lacks "id" or a string "file_name")')
  for i, cat in enumerate(data['categories']):
    _require(isinstance(cat, dict) and 'id' in cat and isinstance(cat.get('name'), str),
             f'{path}: not a COCO JSON file (categories[{i}] lacks "id" or a string "name")')
  for i, ann in enumerate(data['annotations']):
    _require(isinstance(ann, dict) and 'image_id' in ann and 'category_id' in ann and 'bbox' in ann,
             f'{path}: not a COCO JSON file (annotations[{i}] lacks "image_id", "category_id" or "bbox")')
  return data


def parse_coco_file(json_path: Path, image_dir: Path | None, subset: F.Domain, split: str,
                    policy: _Policy) -> list[ExampleRecord]:
  data = policy.run(lambda: _load_coco(json_path))
  if data is None:
    return []
  name_to_class = {n.lower(): i for i, n in enumerate(F.CLASS_NAMES)}
  cat_map, bad_cats, names, unknown_names = {}, {}, {}, set()
  for cat in data['categories']:
    cid = _class_id_key(cat['id'])
    cls = name_to_class.get(cat['name'].strip().lower())
    if cid in names and names[cid].strip().lower() != cat['name'].strip().lower():
      # Which name the annotations mean is not ours to guess: their cells would silently change class.
      err = DatasetFormatError(f'{json_path}: category id {cat["id"]} is named twice ({names[cid]!r} and '
                               f'{cat["name"]!r})', K_CATEGORY)
      policy.handle(err)
      cat_map.pop(cid, None)
      bad_cats[cid] = err
      continue
    names[cid] = cat['name']
    if cls is None:  # an error for the annotations that use it; a note if none does (an export's super-category)
      unknown_names.add(cid)
      bad_cats[cid] = DatasetFormatError(f'{json_path}: category id {cat["id"]}: unknown category name '
                                         f'{cat["name"]!r} (expected one of {list(F.CLASS_NAMES)})', K_CATEGORY)
    elif cid not in bad_cats:
      cat_map[cid] = cls
  used = {_class_id_key(ann['category_id']) for ann in data['annotations']}
  for cid in sorted(unknown_names - used):
    policy.report.note(K_CATEGORY, f'{bad_cats[cid]}; no annotation uses it, ignored')

  images, bad_images, seen_names = {}, {}, {}
  for im in data['images']:
    iid = _class_id_key(im['id'])
    fname = os.path.basename(im['file_name'])
    if iid in images or iid in bad_images:
      policy.handle(DatasetFormatError(f'{json_path}: image id {im["id"]} listed twice', K_DUPLICATE))
      bad_images[iid] = None
      images.pop(iid, None)
      continue
    if fname.lower() in seen_names:
      policy.handle(DatasetFormatError(f'{json_path}: image id {im["id"]}: duplicate file name {fname!r} '
                                       f'(also image id {seen_names[fname.lower()]})', K_DUPLICATE))
      bad_images[iid] = None
      other = _class_id_key(seen_names[fname.lower()])
      if other in images:
        images.pop(other)
        bad_images[other] = None
      continue
    seen_names[fname.lower()] = im['id']
    images[iid] = im
  anns = collections.defaultdict(list)
  for index, ann in enumerate(data['annotations']):
    ann_name = f'annotation id {ann["id"]}' if 'id' in ann else f'annotations[{index}] (no id)'
    iid = _class_id_key(ann['image_id'])
    if iid not in images and iid not in bad_images:
      policy.handle(DatasetFormatError(f'{json_path}: {ann_name}: image_id {ann["image_id"]} not among the images',
                                       K_MISSING_IMAGE_ID))
      continue
    anns[iid].append((ann_name, ann))

  records = []
  files = _image_files(image_dir) if image_dir is not None else []
  on_disk = {p.name.lower(): p for p in files}
  for iid, im in images.items():
    fname = os.path.basename(im['file_name'])

    def one(iid=iid, im=im, fname=fname):
      if image_dir is None:
        raise DatasetFormatError(f'{json_path}: image id {im["id"]}: image {fname!r} missing (no image folder '
                                 f'for split {split!r} under {json_path.parent.parent})', K_MISSING_IMAGE)
      path = image_dir / fname
      if not path.is_file():  # the JSON's 'a.png' for a copy's 'a.PNG', as the YOLO layouts and the listing check
        path = on_disk.get(fname.lower(), path)
      try:
        width, height = read_image_size(path)
      except DatasetFormatError as e:
        raise DatasetFormatError(f'{json_path}: image id {im["id"]}: {e}', e.kind) from None
      for key, actual in (('width', width), ('height', height)):
        if key in im and im[key] is not None and im[key] != actual:
          raise DatasetFormatError(f'{json_path}: image id {im["id"]}: {key} {im[key]!r} differs from the file '
                                   f'{path} ({actual})', K_IMAGE_SIZE)
      boxes, labels, attrs = [], [], []
      for ann_name, ann in anns.get(iid, []):
        where = f'{json_path}: {ann_name}'
        cat = _class_id_key(ann['category_id'])
        if cat in bad_cats:
          raise DatasetFormatError(f'{where}: {bad_cats[cat]}', K_CATEGORY)
        if cat not in cat_map:
          raise DatasetFormatError(f'{where}: unknown category id {ann["category_id"]} (not in "categories")',
                                   K_CATEGORY)
        bbox = ann['bbox']
        if not isinstance(bbox, (list, tuple)) or len(bbox) != 4:
          raise DatasetFormatError(f'{where}: bbox {bbox!r} is not [x, y, w, h]', K_BOX)
        for v in bbox:
          if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
            raise DatasetFormatError(f'{where}: non-numeric bbox value {v!r}', K_NON_NUMERIC)
        x, y, w, h = (float(v) for v in bbox)
        if not (w > 0 and h > 0):
          raise DatasetFormatError(f'{where}: box size not positive (w={w:g}, h={h:g})', K_BOX)
        boxes.append(_check_box_px(x, y, x + w, y + h, width, height, where))
        labels.append(cat_map[cat])
        row = []
        for a, attr_name in enumerate(F.ATTRIBUTE_NAMES):
          keys = F.COCO_ATTRIBUTE_KEYS[attr_name]
          key = next((k for k in keys if k in ann), None)
          if key is None:
            raise DatasetFormatError(f'{where}: attribute {attr_name} missing (key {" or ".join(keys)})',
                                     K_ATTRIBUTE)
          row.append(_attribute(ann[key], a, F.COCO_NOT_APPLICABLE, where))
        attrs.append(row)
      b, l, a = _arrays(boxes, labels, attrs)
      patient, ltype = _patient_type(path, subset, policy.report)
      return ExampleRecord(str(path), fname, subset.subset, split, width, height, b, l, a,
                           _full_region(width, height), subset, patient, ltype, COCO)

    rec = policy.run(one)
    if rec is not None:
      records.append(rec)
  if image_dir is not None:
    all_listed = {os.path.basename(i['file_name']).lower() for i in data['images']}
    for p in files:
      if p.name.lower() not in all_listed:
        policy.report.note('image_not_in_json', f'{p}: image not listed in {json_path}; ignored')
  return records


def _class_id_key(value):
  """JSON ids may be int or str; compare them as str of the int when integral."""
  if isinstance(value, float) and value.is_integer():
    value = int(value)
  return str(value)


def parse_coco_subset(info: SubsetInfo, policy: _Policy) -> list[ExampleRecord]:
  json_dir = _coco_json_dir(info.path)
  records, labelled = [], set()
  for jp in sorted(json_dir.iterdir()):
    if not (jp.is_file() and jp.suffix.lower() == '.json'):
      continue
    split = _split_name(jp.stem)
    if split is None:
      policy.report.note('unknown_split_file', f'{jp}: not a split name (train/val/test); ignored')
      continue
    records += parse_coco_file(jp, _coco_image_dir(info.path, split), info.domain, split, policy)
    labelled.add(split)
  for split in (s for s in SPLITS if s not in labelled):
    image_dir = _coco_image_dir(info.path, split)
    images = _image_files(image_dir) if image_dir is not None else []
    if images:
      policy.report.note(K_UNREAD_FOLDER, f'{image_dir}: {len(images)} images of split {split} but no {split}.json '
                                          f'in {json_dir}; not read')
  return records


# ----------------------------------------------------------------------------------------------------------------
# YOLO text layouts (12-column LLD, 16-column sparse LLD, 5-column TXL-PBC).


def _read_rows(path: Path, ncols: int, kind_hint: str):
  """Yields (line number, list of floats) of the non-empty lines, checking the column count."""
  try:
    lines = path.read_bytes().decode('utf-8-sig').splitlines()  # a byte-order mark, as Windows editors write, is fine
  except UnicodeDecodeError as e:
    raise DatasetFormatError(f'{path}: not UTF-8 text ({e}); save it as UTF-8', K_ENCODING) from None
  for lineno, line in enumerate(lines, 1):
    tokens = line.split()
    if not tokens:
      continue
    where = f'{path}:{lineno}'
    if len(tokens) != ncols:
      raise DatasetFormatError(f'{where}: wrong column count {len(tokens)} (expected {ncols} for {kind_hint})',
                               K_COLUMNS)
    yield lineno, [_number(t, where, f'field {i + 1}') for i, t in enumerate(tokens)]


def _yolo_split_pairs(folder: Path, policy: _Policy, where: str) -> dict[str, list[tuple[Path, Path | None]]]:
  """{split: [(image, label file or None)]}; raises/skips labels without images and duplicate names."""
  images_root = _child(folder, 'images')
  labels_root = _child(folder, 'labels')
  splits = {}
  for root in (images_root, labels_root):
    if root is None:
      continue
    for d in sorted(root.iterdir()):
      if d.is_dir() and _split_name(d.name):
        splits.setdefault(_split_name(d.name), None)
  out = {}
  for split in SPLITS:
    if split not in splits:
      continue
    names = [k for k, v in SPLIT_ALIASES.items() if v == split]
    img_dir = _child(images_root, *names) if images_root else None
    lab_dir = _child(labels_root, *names) if labels_root else None
    images = _image_files(img_dir) if img_dir else []
    images = _check_duplicates(images, f'{where} split {split}', policy)
    if images and lab_dir is None:  # a layout misread or a download without its labels: never cell-free fields
      policy.handle(DatasetFormatError(
          f'{img_dir}: {len(images)} images of split {split} but no labels/{img_dir.name} folder for them (and no '
          f'COCO json_labels/ or Annotations/ folder with JSON files in {folder})', K_LAYOUT))
      out[split] = []
      continue
    labels = {}
    if lab_dir:
      for p in sorted(lab_dir.iterdir()):
        if p.is_file() and p.suffix.lower() == '.txt' and p.name.lower() != 'classes.txt':
          labels[p.stem.lower()] = p
    stems = {p.stem.lower() for p in images}
    dup_stems = set()
    for p in (list(img_dir.iterdir()) if img_dir else []):
      if p.suffix.lower() in IMAGE_EXTENSIONS and p.stem.lower() not in stems:
        dup_stems.add(p.stem.lower())
    for stem, lp in sorted(labels.items()):
      if stem not in stems and stem not in dup_stems:
        policy.handle(DatasetFormatError(f'{lp}: label file for a missing image (no image named {lp.stem}.* in '
                                         f'{img_dir or "the images folder"})', K_ORPHAN_LABEL))
    for p in images:
      if p.stem.lower() not in labels:
        policy.report.note(K_NO_LABEL_FILE, f'{p}: no label file in {lab_dir}; read as a field without labelled '
                                            'cells')
    out[split] = [(p, labels.get(p.stem.lower())) for p in images]
  return out


def parse_yolo_subset(info: SubsetInfo, policy: _Policy) -> list[ExampleRecord]:
  """12-column (fully annotated) or 16-column (sparse) LLD YOLO subset."""
  sparse = info.layout == SPARSE
  ncols = 16 if sparse else 12
  hint = 'sparse YOLO' if sparse else 'YOLO'
  records = []
  for split, pairs in _yolo_split_pairs(info.path, policy, str(info.path)).items():
    for img, lab in pairs:
      def one(img=img, lab=lab, split=split):
        width, height = read_image_size(img)
        if sparse and (width, height) != (F.LLD_IMAGE_SIZE, F.LLD_IMAGE_SIZE):
          raise DatasetFormatError(f'{img}: image is {width}x{height}; the sparse layout needs '
                                   f'{F.LLD_IMAGE_SIZE}x{F.LLD_IMAGE_SIZE} for its region coordinates', K_IMAGE_SIZE)
        boxes, labels, attrs, region, line_numbers = [], [], [], None, []
        if lab is not None:
          for lineno, v in _read_rows(lab, ncols, hint):
            where = f'{lab}:{lineno}'
            line_numbers.append(lineno)
            labels.append(_class_id(v[0], F.NUM_CLASSES, where))
            boxes.append(_yolo_box(v[1:5], width, height, where))
            a = v[9:16] if sparse else v[5:12]
            attrs.append([_attribute(a[0], 0, F.YOLO_SIZE_NOT_APPLICABLE, where)] +
                         [_attribute(a[i], i, F.YOLO_BINARY_NOT_APPLICABLE, where) for i in range(1, 7)])
            if sparse:
              r = tuple(v[5:9])
              if region is None:
                region = (r, lineno)
              elif r != region[0]:
                raise DatasetFormatError(f'{where}: region {r} differs from line {region[1]} ({region[0]}); '
                                         f'the region must be identical on all rows', K_REGION)
        if sparse:
          if region is None:
            regions = []  # Empty / missing label file: nothing known to be annotated.
          else:
            regions = [_check_box_px(*region[0], width, height, f'{lab}:{region[1]}', kind=K_REGION, what='region')]
            _check_cells_touch_region(boxes, line_numbers, regions[0], lab)
        else:
          regions = _full_region(width, height)
        b, l, a = _arrays(boxes, labels, attrs)
        patient, ltype = _patient_type(img, info.domain, policy.report)
        return ExampleRecord(str(img), img.name, info.domain.subset, split, width, height, b, l, a, regions,
                             info.domain, patient, ltype, info.layout)

      rec = policy.run(one)
      if rec is not None:
        records.append(rec)
  return records


def parse_subset(info: SubsetInfo, on_error: str = 'raise',
                 report: SkipReport | None = None) -> list[ExampleRecord]:
  policy = _Policy(on_error, report if report is not None else SkipReport())
  if info.layout == COCO:
    return parse_coco_subset(info, policy)
  return parse_yolo_subset(info, policy)


def parse_lld(root: str | os.PathLike, layouts: Iterable[str] = (COCO, YOLO, SPARSE), on_error: str = 'raise',
              ) -> tuple[list[ExampleRecord], SkipReport, list[SubsetInfo]]:
  """All records of the subsets under `root` whose layout is in `layouts`; also the report and all subsets found."""
  _check_on_error(on_error)
  report = SkipReport()
  subsets = find_subsets(root, on_error, report)
  records = []
  for info in subsets:
    if info.layout in layouts:
      records += parse_subset(info, on_error, report)
  return records, report, subsets


# ----------------------------------------------------------------------------------------------------------------
# TXL-PBC.

TXL_SOURCES = ('Raabin-WBC', 'PBC', 'BCD', 'BCCD', 'other')
# (width, height) -> source; both orientations accepted since the README gives sizes without an axis order.
_TXL_SIZES = {(575, 575): 'Raabin-WBC', (360, 363): 'PBC', (366, 369): 'PBC', (416, 416): 'BCD', (640, 480): 'BCCD'}


def txl_source(width: int, height: int) -> str:
  return _TXL_SIZES.get((width, height)) or _TXL_SIZES.get((height, width)) or 'other'


def read_data_yaml(path: Path) -> list[str]:
  """Class names from a YOLO data.yaml (`names:` list or {id: name} mapping, `nc:` checked if present)."""
  import yaml  # PyYAML comes with TensorFlow's dependencies.
  try:
    with open(path, encoding='utf-8') as f:
      data = yaml.safe_load(f)
  except (OSError, yaml.YAMLError) as e:
    raise DatasetFormatError(f'{path}: unreadable data.yaml ({e})', K_YAML) from e
  if not isinstance(data, dict) or 'names' not in data:
    raise DatasetFormatError(f'{path}: data.yaml has no "names"', K_YAML)
  names = data['names']
  if isinstance(names, dict):
    try:
      names = [names[k] for k in sorted(names, key=int)]
    except (TypeError, ValueError) as e:
      raise DatasetFormatError(f'{path}: "names" mapping keys are not integers', K_YAML) from e
  if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
    raise DatasetFormatError(f'{path}: "names" is not a non-empty list of strings', K_YAML)
  if 'nc' in data and data['nc'] != len(names):
    raise DatasetFormatError(f'{path}: nc={data["nc"]} but {len(names)} names', K_YAML)
  return names


def parse_txl_pbc(root: str | os.PathLike, on_error: str = 'raise',
                  ) -> tuple[list[ExampleRecord], SkipReport, list[str]]:
  """TXL-PBC YOLO 5-column download: records of every split present, the report and the class names."""
  _check_on_error(on_error)
  root = Path(root).expanduser()
  if not root.is_dir():
    raise DatasetFormatError(f'{root}: TXL-PBC folder does not exist or is not a directory', K_LAYOUT)
  yaml_path = root / 'data.yaml'
  if not yaml_path.is_file():
    raise DatasetFormatError(f'{yaml_path}: data.yaml missing (the folder should hold data.yaml, images/, labels/)',
                             K_YAML)
  names = read_data_yaml(yaml_path)
  report = SkipReport()
  policy = _Policy(on_error, report)
  records = []
  for split, pairs in _yolo_split_pairs(root, policy, str(root)).items():
    for img, lab in pairs:
      def one(img=img, lab=lab, split=split):
        width, height = read_image_size(img)
        boxes, labels = [], []
        if lab is not None:
          for lineno, v in _read_rows(lab, 5, 'TXL-PBC YOLO'):
            where = f'{lab}:{lineno}'
            labels.append(_class_id(v[0], len(names), where))
            boxes.append(_yolo_box(v[1:5], width, height, where))
        b, l, a = _arrays(boxes, labels, np.full((len(labels), F.NUM_ATTRIBUTES), F.NOT_APPLICABLE))
        return ExampleRecord(str(img), img.name, txl_source(width, height), split, width, height, b, l, a,
                             _full_region(width, height), None, '', 'unknown', 'txl')
      rec = policy.run(one)
      if rec is not None:
        records.append(rec)
  if not records and not report.total:
    raise DatasetFormatError(f'{root}: no images found under images/{{train,val,test}}/', K_LAYOUT)
  return records, report, names


# ----------------------------------------------------------------------------------------------------------------
# Helpers the builders share (no TensorFlow needed).


def normalized_yxyx(boxes_xyxy: np.ndarray, width: int, height: int) -> np.ndarray:
  """px (x1, y1, x2, y2) -> TFDS BBox order (ymin, xmin, ymax, xmax) normalised and clipped to [0, 1]."""
  b = np.asarray(boxes_xyxy, np.float64).reshape(-1, 4)
  out = np.stack([b[:, 1] / height, b[:, 0] / width, b[:, 3] / height, b[:, 2] / width], axis=1)
  return np.clip(out, 0.0, 1.0).astype(np.float32)


def region_mask(regions, width: int, height: int) -> np.ndarray:
  """uint8 [H, W, 1]: 1 on pixels whose centre lies in one of the px regions, 0 elsewhere."""
  mask = np.zeros((height, width, 1), np.uint8)
  for x1, y1, x2, y2 in regions:
    # Pixel (i, j) has centre (j + 0.5, i + 0.5).
    c1, c2 = int(math.ceil(x1 - 0.5)), int(math.ceil(x2 - 0.5))
    r1, r2 = int(math.ceil(y1 - 0.5)), int(math.ceil(y2 - 0.5))
    mask[max(0, r1):min(height, r2), max(0, c1):min(width, c2)] = 1
  return mask


_PNG_CACHE: dict = {}


def region_mask_png(regions, width: int, height: int) -> bytes:
  """PNG bytes (8-bit grey) of `region_mask`; cached since most masks are all ones."""
  import io
  key = (tuple(tuple(float(v) for v in r) for r in regions), width, height)
  png = _PNG_CACHE.get(key)
  if png is None:
    buf = io.BytesIO()
    Image.fromarray(region_mask(regions, width, height)[:, :, 0]).save(buf, format='PNG')
    png = buf.getvalue()
    if len(_PNG_CACHE) < 256:
      _PNG_CACHE[key] = png
  return png


def on_error_from_env(default: str = 'raise') -> str:
  """The skip policy from the LLD_ON_ERROR environment variable ('raise' or 'skip')."""
  value = os.environ.get('LLD_ON_ERROR', default).strip().lower() or default
  if value not in ON_ERROR_CHOICES:
    raise ValueError(f'LLD_ON_ERROR must be one of {ON_ERROR_CHOICES}, got {value!r}')
  return value


def simulate_sparse(record: ExampleRecord, area_fraction: float = 0.2) -> ExampleRecord:
  """A copy of `record` annotated only inside one rectangle of about `area_fraction` of the image.

  Deterministic: the rectangle is drawn from a generator seeded by a hash of the file name. Cells whose centre
  falls outside the rectangle are removed; `regions` is the rectangle.
  """
  import hashlib
  seed = int.from_bytes(hashlib.sha256(record.filename.encode('utf-8')).digest()[:8], 'little')
  rng = np.random.default_rng(seed)
  w, h = record.width, record.height
  aspect = float(np.exp(rng.uniform(np.log(0.6), np.log(1 / 0.6))))  # rectangle width / height, relative
  fw = min(1.0, math.sqrt(area_fraction * aspect))
  fh = min(1.0, area_fraction / fw)
  rw, rh = fw * w, fh * h
  x1 = float(rng.uniform(0, w - rw)) if w > rw else 0.0
  y1 = float(rng.uniform(0, h - rh)) if h > rh else 0.0
  region = (round(x1), round(y1), round(min(w, x1 + rw)), round(min(h, y1 + rh)))
  region = tuple(float(v) for v in region)
  b = record.boxes
  cx, cy = (b[:, 0] + b[:, 2]) / 2, (b[:, 1] + b[:, 3]) / 2
  keep = (cx >= region[0]) & (cx < region[2]) & (cy >= region[1]) & (cy < region[3])
  return dataclasses.replace(record, boxes=b[keep], labels=record.labels[keep], attributes=record.attributes[keep],
                             regions=[region])
