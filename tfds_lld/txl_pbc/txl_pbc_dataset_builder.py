"""TFDS builder for TXL-PBC (peripheral blood smears, WBC / RBC / Platelets boxes), from a local copy.

Build from the repository root:

  tfds build tfds_lld/txl_pbc --manual_dir=/work/shared/data/txl_pbc --config=full
  tfds build tfds_lld/txl_pbc --manual_dir=/work/shared/data/txl_pbc --config=sparse

The features are those of `lld` (same names), with labels WBC / RBC / Platelets (from `data.yaml`), every attribute
-1 (not applicable), `domain/microscope` = the image source guessed from the image size (575x575 Raabin-WBC,
360x363 and 366x369 PBC, 416x416 BCD, 640x480 BCCD, else 'other'), `domain/subset` = the same source name,
`magnification` / `camera` 'unknown', `patient` '' and `leukemia_type` 'unknown'.

Config `sparse` simulates sparse annotation on the train split: one rectangle of about one fifth of the image,
drawn deterministically from a hash of the file name; cells whose centre falls outside it are removed and the
rectangle is recorded in `annotated_regions` / `annotation_mask`. Other splits stay fully annotated.

Bad input: as for `lld`, `LLD_ON_ERROR=skip` (environment) or `Builder(on_error='skip')` skips bad images and
prints the counts at the end of the build; the default 'raise' stops at the first bad file.
"""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path

try:  # Hide accelerators from TensorFlow: the builder only needs the CPU.
  import tensorflow as tf
  tf.config.set_visible_devices([], 'GPU')
except Exception:  # pylint: disable=broad-except
  pass

import tensorflow_datasets as tfds

_REPO_ROOT = Path(__file__).resolve().parents[2]
if str(_REPO_ROOT) not in sys.path:  # `tfds build tfds_lld/txl_pbc` imports this file as a top-level package.
  sys.path.insert(0, str(_REPO_ROOT))

from tfds_lld import parsers as P  # pylint: disable=g-import-not-at-top
from tfds_lld.lld import lld_dataset_builder as lld_builder  # pylint: disable=g-import-not-at-top

CLASS_NAMES = ('WBC', 'RBC', 'Platelets')
SOURCES = P.TXL_SOURCES

_DESCRIPTION = """
TXL-PBC: real peripheral blood smear images from four public sources with WBC, RBC and Platelets boxes, in the
feature layout of the `lld` dataset (attributes all not applicable). Config `sparse` simulates sparse annotation
of the train split.
"""

_CITATION = """
@article{gan2024txlpbc,
  title={TXL-PBC: a freely accessible labeled peripheral blood cell dataset},
  author={Gan, Lu and Li, Xi},
  journal={arXiv preprint arXiv:2407.13214},
  year={2024}
}
"""

MANUAL_DOWNLOAD_INSTRUCTIONS = """
Pass the TXL-PBC folder (holding `data.yaml`, `images/{train,val[,test]}/` and `labels/{train,val[,test]}/`) with
`--manual_dir`, e.g. `--manual_dir=/work/shared/data/txl_pbc`, or place it in
`~/tensorflow_datasets/downloads/manual/`.
"""


class Builder(tfds.core.GeneratorBasedBuilder):
  """TXL-PBC in the `lld` feature layout. Skip policy: `LLD_ON_ERROR` / `on_error=` (see module docstring)."""

  name = 'txl_pbc'
  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [
      tfds.core.BuilderConfig(name='full', description='All splits fully annotated.'),
      tfds.core.BuilderConfig(name='sparse', description='Train split with simulated sparse annotation.'),
  ]
  DEFAULT_CONFIG_NAME = 'full'
  MANUAL_DOWNLOAD_INSTRUCTIONS = MANUAL_DOWNLOAD_INSTRUCTIONS

  def __init__(self, *, on_error: str | None = None, **kwargs):
    lld_builder.init_skip_policy(self, on_error)
    super().__init__(**kwargs)

  def _info(self) -> tfds.core.DatasetInfo:
    domain = {
        'microscope': tfds.features.ClassLabel(names=list(SOURCES)),
        'magnification': tfds.features.ClassLabel(names=['unknown']),
        'camera': tfds.features.ClassLabel(names=['unknown']),
        'subset': tfds.features.Text(),
    }
    return self.dataset_info_from_configs(
        description=_DESCRIPTION,
        features=lld_builder.features_dict(CLASS_NAMES, domain),
        supervised_keys=None,
        homepage='https://arxiv.org/abs/2407.13214',
        citation=_CITATION,
        license='MIT',
    )

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = Path(os.fspath(dl_manager.manual_dir)).expanduser()
    if not root.is_dir() or not any(root.iterdir()):
      raise FileNotFoundError(f'TXL-PBC folder {root} is missing or empty.\n{MANUAL_DOWNLOAD_INSTRUCTIONS}')
    records, report, names = P.parse_txl_pbc(root, on_error=self.on_error)
    if [n.lower() for n in names] != [n.lower() for n in CLASS_NAMES]:
      raise P.DatasetFormatError(f'{root / "data.yaml"}: class names {names} differ from {list(CLASS_NAMES)}',
                                 P.K_YAML)
    by_split = collections.defaultdict(list)
    for r in records:
      if self.builder_config.name == 'sparse' and r.split == 'train':
        r = P.simulate_sparse(r)
      by_split[r.split].append(r)
    self.skip_report = report
    self._split_counts = {k: len(v) for k, v in by_split.items()}
    return {split: self._generate_examples(recs) for split, recs in sorted(by_split.items())}

  def _generate_examples(self, records):
    for r in records:
      yield f'{r.split}/{r.filename}', lld_builder.example_dict(
          r, {'microscope': r.subset, 'magnification': 'unknown', 'camera': 'unknown', 'subset': r.subset})

  def download_and_prepare(self, *args, **kwargs):  # pylint: disable=arguments-differ
    super().download_and_prepare(*args, **kwargs)
    if self.skip_report is not None:
      lld_builder.report_build(f'{self.name}/{self.builder_config.name}', self.skip_report, self._split_counts)
