"""TFDS builder for the Large Leukemia Dataset (LLD), from a manual download.

Build from the repository root:

  tfds build tfds_lld/lld --manual_dir=/path/to/LLD --config=full     # COCO and 12-column YOLO subsets
  tfds build tfds_lld/lld --manual_dir=/path/to/LLD --config=sparse   # 16-column sparse YOLO subsets

`--manual_dir` is the folder holding the subset folders (`H_100x_C1/`, `hcm_40x_c2/`, ...) or one subset folder.

Bad input (see `tfds_lld/parsers.py`): by default the build stops at the first malformed file with a
`DatasetFormatError` that names the file, line or annotation id and the fault. To skip bad images/files instead,
set the environment variable `LLD_ON_ERROR=skip` (e.g. `LLD_ON_ERROR=skip tfds build tfds_lld/lld ...`) or pass
`Builder(on_error='skip', ...)` in Python. Every skip is counted per fault kind; the counts and the first messages
are printed (and logged) at the end of the build, and kept in `builder.skip_report`. Sparse images without a known
annotated region (empty or missing label file) are kept with an all-zero `annotation_mask`, and counted in the
report's notes.
"""

from __future__ import annotations

import collections
import logging
import os
import sys
from pathlib import Path

try:  # Hide accelerators from TensorFlow: the builder only needs the CPU.
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
except Exception:  # pylint: disable=broad-except  # TF absent or devices already initialised.
  pass

import numpy as np
import tensorflow_datasets as tfds

_REPO_ROOT = Path(__file__).resolve().parents[2]
if str(_REPO_ROOT) not in sys.path:  # `tfds build tfds_lld/lld` imports this file as `lld.lld_dataset_builder`.
  sys.path.insert(0, str(_REPO_ROOT))

from tfds_lld import lld_format as F  # pylint: disable=g-import-not-at-top
from tfds_lld import parsers as P  # pylint: disable=g-import-not-at-top

_LOG = logging.getLogger(__name__)

_DESCRIPTION = """
The Large Leukemia Dataset (LLD): peripheral blood films of leukemia patients imaged with two microscopes, three
objectives and two cameras (12 domain subsets), with white blood cell boxes (14 classes) and 7 morphological
attributes per cell (-1 = not applicable). Config `full` holds the fully annotated subsets (COCO JSON and 12-column
YOLO layouts); config `sparse` the sparsely annotated ones (16-column YOLO with one annotated rectangle per image,
recorded in `annotated_regions` and `annotation_mask`).
"""

_CITATION = """
@article{lld,
  title={A Large-scale Leukemia Dataset (LLD) with morphological attributes},
  note={See the dataset's public release},
}
"""

MANUAL_DOWNLOAD_INSTRUCTIONS = """
Download the Large Leukemia Dataset yourself and put (or link) the folder that holds its domain subset folders
(`H_100x_C1/`, `L_40x_C2/`, `hcm_10x_c1/` ... any of the 12, any case, `hcm_`/`lcm_` prefixes accepted) in
`~/tensorflow_datasets/downloads/manual/`, or pass that folder with `--manual_dir=/path/to/LLD`
(a single subset folder works too). Each subset is either COCO JSON (`json_labels/{train,test}.json` or
`Annotations/{train,test,val}.json` with images in `Images/{train,test}/` or `Train_Images/`, `Test_Images/`),
YOLO 12-column (`images/{split}/*.png` + `labels/{split}/*.txt`, for config `full`), or sparse YOLO 16-column
(same folders, for config `sparse`).
"""


def _domain_features(microscopes, magnifications, cameras):
  return {
      'microscope': tfds.features.ClassLabel(names=list(microscopes)),
      'magnification': tfds.features.ClassLabel(names=list(magnifications)),
      'camera': tfds.features.ClassLabel(names=list(cameras)),
      'subset': tfds.features.Text(),
  }


def features_dict(class_names, domain_features) -> tfds.features.FeaturesDict:
  """The feature spec shared by `lld` and `txl_pbc` (the input pipeline depends on these names)."""
  return tfds.features.FeaturesDict({
      'image': tfds.features.Image(shape=(None, None, 3)),
      'image/filename': tfds.features.Text(),
      'domain': domain_features,
      'patient': tfds.features.Text(),
      'leukemia_type': tfds.features.ClassLabel(names=list(F.LEUKEMIA_TYPES) + ['unknown']),
      'objects': tfds.features.Sequence({
          'bbox': tfds.features.BBoxFeature(),
          'label': tfds.features.ClassLabel(names=list(class_names)),
          'attributes': tfds.features.Tensor(shape=(F.NUM_ATTRIBUTES,), dtype=np.int32),
      }),
      'annotated_regions': tfds.features.Sequence(tfds.features.BBoxFeature()),
      'annotation_mask': tfds.features.Image(shape=(None, None, 1), encoding_format='png'),
  })


def example_dict(record: P.ExampleRecord, domain: dict) -> dict:
  """TFDS example of a parser record."""
  return {
      'image': record.image_path,
      'image/filename': record.filename,
      'domain': domain,
      'patient': record.patient,
      'leukemia_type': record.leukemia_type,
      'objects': {
          'bbox': P.normalized_yxyx(record.boxes, record.width, record.height),
          'label': record.labels.astype(np.int64),
          'attributes': record.attributes.astype(np.int32),
      },
      'annotated_regions': P.normalized_yxyx(np.asarray(record.regions, np.float32).reshape(-1, 4),
                                             record.width, record.height),
      'annotation_mask': P.region_mask_png(record.regions, record.width, record.height),
  }


def report_build(name: str, report: P.SkipReport | None, counts: dict) -> str:
  """Prints and logs the end-of-build summary; returns it."""
  lines = [f'[{name}] examples per split: {dict(sorted(counts.items()))}']
  if report is not None:
    lines.append(f'[{name}] ' + report.summary().replace('\n', f'\n[{name}] '))
  text = '\n'.join(lines)
  print(text, flush=True)
  if report is not None:  # One log line (the printed text above is the readable form).
    _LOG.info('%s: examples %s, skipped %s, notes %s', name, dict(counts), dict(report.counts), dict(report.notes))
  return text


def init_skip_policy(builder, on_error):
  """Sets a builder's skip policy (`on_error`, else $LLD_ON_ERROR, else 'raise') and its empty skip report."""
  builder.on_error = on_error if on_error is not None else P.on_error_from_env()
  if builder.on_error not in P.ON_ERROR_CHOICES:
    raise ValueError(f'on_error must be one of {P.ON_ERROR_CHOICES}, got {builder.on_error!r}')
  builder.skip_report = None
  builder._split_counts = {}  # pylint: disable=protected-access


class Builder(tfds.core.GeneratorBasedBuilder):
  """LLD from a manual download. See the module docstring for the skip policy (`LLD_ON_ERROR`, `on_error=`)."""

  name = 'lld'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'COCO, YOLO 12-column and sparse YOLO 16-column layouts.'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='full', description='Fully annotated subsets (COCO JSON and YOLO 12-column).'),
      tfds.core.BuilderConfig(name='sparse', description='Sparsely annotated subsets (YOLO 16-column).'),
  ]
  DEFAULT_CONFIG_NAME = 'full'
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def __init__(self, *, on_error: str | None = None, **kwargs):
    init_skip_policy(self, on_error)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=features_dict(F.CLASS_NAMES, _domain_features(F.MICROSCOPES, F.MAGNIFICATIONS, F.CAMERAS)),
        supervised_keys=None,
        homepage='https://github.com/',
        citation=_CITATION,
    )

  def _layouts(self) -> tuple:
    return P.FULL_LAYOUTS if self.builder_config.name == 'full' else (P.SPARSE,)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = Path(os.fspath(dl_manager.manual_dir)).expanduser()
    if not root.is_dir() or not any(root.iterdir()):
      raise FileNotFoundError(f'LLD manual download folder {root} is missing or empty.\n'
                              f'{MANUAL_DOWNLOAD_INSTRUCTIONS}')
    layouts = self._layouts()
    records, report, subsets = P.parse_lld(root, layouts, on_error=self.on_error)
    wanted = [s for s in subsets if s.layout in layouts]
    if not wanted:
      found = ', '.join(f'{s.path.name} ({s.layout})' for s in subsets) or 'no subset folder at all'
      raise FileNotFoundError(
          f'No LLD subset with layout {"/".join(layouts)} (config {self.builder_config.name!r}) under {root}; '
          f'found: {found}.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}')
    by_split = collections.defaultdict(list)
    seen = set()
    for r in records:
      if r.key in seen:  # Defensive: parsers already reject duplicates.
        raise P.DatasetFormatError(f'{r.image_path}: duplicate example key {r.key}', P.K_DUPLICATE)
      seen.add(r.key)
      if r.layout == P.SPARSE and not r.regions:
        report.note('sparse_image_without_region',
                    f'{r.image_path}: empty or missing label file: no annotated region, all-zero annotation_mask')
      by_split[r.split].append(r)
    if not by_split:
      raise P.DatasetFormatError(f'{root}: no usable image in subsets {[s.path.name for s in wanted]}'
                                 + (f'\n{report.summary()}' if report.total else ''), P.K_LAYOUT)
    self.skip_report = report
    self._split_counts = {k: len(v) for k, v in by_split.items()}
    return {split: self._generate_examples(recs) for split, recs in sorted(by_split.items())}

  def _generate_examples(self, records):
    for r in records:
      d = r.domain
      yield r.key, example_dict(r, {'microscope': d.microscope, 'magnification': d.magnification,
                                    'camera': d.camera, 'subset': r.subset})

  def download_and_prepare(self, *args, **kwargs):  # pylint: disable=arguments-differ
    super().download_and_prepare(*args, **kwargs)
    if self.skip_report is not None:
      report_build(f'{self.name}/{self.builder_config.name}', self.skip_report, self._split_counts)
