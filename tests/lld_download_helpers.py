"""Writes tiny but valid LLD downloads (640x640 PNGs + labels) for the parser and builder tests."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image

SIZE = 640


def write_png(path: Path, size=(SIZE, SIZE), seed: int = 0) -> Path:
  path.parent.mkdir(parents=True, exist_ok=True)
  rng = np.random.default_rng(seed)
  arr = rng.integers(0, 255, (size[1] // 16, size[0] // 16, 3), dtype=np.uint8)
  Image.fromarray(arr).resize(size, Image.NEAREST).save(path)
  return path


def image_name(patient: int, image: int, mag: str = '1000', ltype: str = 'ALL') -> str:
  return f'{patient}_{image}_{mag}_{ltype}.png'


# One cell: class 1, box x=100..160, y=200..300 px; attributes: size 1, chromatin N/A, others 0/1.
COCO_ANN = {'category_id': 1, 'bbox': [100, 200, 60, 100], 'cell_size': 1, 'nuclear_chromatio': 4,
            'nuclear_shape': 1, 'nucleolus': 0, 'cytoplasm': 1, 'cytoplasmic_basophilia': 0, 'cytoplasmic_vacuoles': 1}


def write_coco_subset(root: Path, subset: str = 'H_100x_C1', splits=('train', 'test'), n_images: int = 2,
                      cat_offset: int = 0, chromatin_key: str = 'nuclear_chromatio', old_layout: bool = False,
                      anns_per_image: int = 1) -> Path:
  """COCO subset; category ids = class id + cat_offset. Each image holds `anns_per_image` copies of COCO_ANN."""
  from tfds_lld import lld_format as F
  folder = root / subset
  for s, split in enumerate(splits):
    img_dir = folder / (f'{split.capitalize()}_Images' if old_layout else f'Images/{split}')
    images, anns = [], []
    for i in range(n_images):
      name = image_name(i + 1, s * 100 + i + 1, ltype=['ALL', 'AML'][i % 2])
      write_png(img_dir / name, seed=i)
      images.append({'id': i + 1, 'file_name': name, 'width': SIZE, 'height': SIZE})
      for k in range(anns_per_image):
        ann = dict(COCO_ANN)
        ann['nuclear_chromatin' if chromatin_key == 'nuclear_chromatin' else 'nuclear_chromatio'] = ann.pop(
            'nuclear_chromatio')
        ann['category_id'] = COCO_ANN['category_id'] + cat_offset
        ann.update(id=len(anns) + 1, image_id=i + 1, area=6000, iscrowd=0)
        anns.append(ann)
    cats = [{'id': c + cat_offset, 'name': n} for c, n in enumerate(F.CLASS_NAMES)]
    label_dir = folder / ('Annotations' if old_layout else 'json_labels')
    label_dir.mkdir(parents=True, exist_ok=True)
    (label_dir / f'{split}.json').write_text(json.dumps({'images': images, 'annotations': anns, 'categories': cats}))
  return folder


# YOLO 12-col row: class 2, centre (0.5, 0.25), size (0.1, 0.2); size N/A (3), chromatin N/A (2), rest 0/1.
YOLO_ROW = '2 0.5 0.25 0.1 0.2 3 2 0 1 0 1 0'
# Sparse 16-col row: same cell, region (64, 32, 384, 352) px.
SPARSE_ROW = '2 0.5 0.25 0.1 0.2 64 32 384 352 1 0 2 1 0 1 0'


def write_yolo_subset(root: Path, subset: str = 'L_40x_C2', splits=('train', 'val', 'test'), n_images: int = 2,
                      row: str = YOLO_ROW, rows_per_image: int = 1, empty_last: bool = False,
                      missing_last: bool = False) -> Path:
  """YOLO subset (12- or 16-column rows). `empty_last` / `missing_last`: last image's label file empty / absent."""
  folder = root / subset
  for s, split in enumerate(splits):
    for i in range(n_images):
      name = image_name(i + 1, s * 100 + i + 1, mag='400', ltype='CLL')
      write_png(folder / 'images' / split / name, seed=i)
      lab = folder / 'labels' / split / name.replace('.png', '.txt')
      lab.parent.mkdir(parents=True, exist_ok=True)
      last = i == n_images - 1
      if last and missing_last:
        continue
      lab.write_text('' if (last and empty_last) else '\n'.join([row] * rows_per_image) + '\n')
  return folder


def txl_pbc_root() -> Path | None:
  """The real TXL-PBC folder (data.yaml, images/, labels/) beside the checkout, or None when it is absent."""
  repo = Path(__file__).resolve().parents[1]
  for candidate in (Path('/work/shared/data/txl_pbc'), repo.parent / 'shared/data/txl_pbc',
                    repo / 'shared/data/txl_pbc'):
    if (candidate / 'data.yaml').is_file():
      return candidate
  return None
