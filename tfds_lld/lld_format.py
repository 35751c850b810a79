"""Facts about the Large Leukemia Dataset (LLD) file formats, shared by the generator and the builders.

The source of every fact is `shared/docs/lld.md`. Internally an attribute that is "not applicable" is -1,
whatever the on-disk code is (4 in the COCO layout, 2 on the binary attributes of the YOLO layouts).
"""

import dataclasses
import re

CLASS_NAMES = (
    'None', 'Myeloblast', 'Lymphoblast', 'Neutrophil', 'Atypical lymphocyte', 'Promonocyte', 'Monoblast',
    'Lymphocyte', 'Myelocyte', 'Abnormal promyelocyte', 'Monocyte', 'Metamyelocyte', 'Eosinophil', 'Basophil',
)
NUM_CLASSES = len(CLASS_NAMES)

ATTRIBUTE_NAMES = (
    'cell_size', 'nuclear_chromatin', 'nuclear_shape', 'nucleolus', 'cytoplasm', 'cytoplasmic_basophilia',
    'cytoplasmic_vacuoles',
)
ATTRIBUTE_VALUES = (
    ('small', 'medium', 'large'),
    ('open', 'coarse'),
    ('regular', 'irregular'),
    ('inconspicuous', 'prominent'),
    ('scanty', 'abundant'),
    ('slight', 'moderate'),
    ('absent', 'prominent'),
)
NUM_ATTRIBUTE_VALUES = tuple(len(v) for v in ATTRIBUTE_VALUES)
NUM_ATTRIBUTES = len(ATTRIBUTE_NAMES)
NOT_APPLICABLE = -1

# On-disk codes for "not applicable".
COCO_NOT_APPLICABLE = 4
YOLO_BINARY_NOT_APPLICABLE = 2
# lld.md only documents the binary code; for cell size (values 0-2) we accept 3 as "not applicable".
YOLO_SIZE_NOT_APPLICABLE = 3
# The release misspells the chromatin key; both spellings are accepted, the release's is written.
COCO_ATTRIBUTE_KEYS = {
    'cell_size': ('cell_size',),
    'nuclear_chromatin': ('nuclear_chromatio', 'nuclear_chromatin'),
    'nuclear_shape': ('nuclear_shape',),
    'nucleolus': ('nucleolus',),
    'cytoplasm': ('cytoplasm',),
    'cytoplasmic_basophilia': ('cytoplasmic_basophilia',),
    'cytoplasmic_vacuoles': ('cytoplasmic_vacuoles',),
}

MICROSCOPES = ('H', 'L')
MAGNIFICATIONS = ('100x', '40x', '10x')
CAMERAS = ('C1', 'C2')
LEUKEMIA_TYPES = ('ALL', 'AML', 'CLL', 'CML', 'APML')
# Magnification as written in file names ({patient}_{image}_{mag}_{type}.png).
MAGNIFICATION_FILE_CODE = {'100x': '1000', '40x': '400', '10x': '100'}
SUBSETS = tuple(f'{m}_{g}_{c}' for m in MICROSCOPES for g in MAGNIFICATIONS for c in CAMERAS)
LLD_IMAGE_SIZE = 640

_SUBSET_RE = re.compile(r'^(h|l)(?:cm)?_(100x|40x|10x)_(c1|c2)$', re.IGNORECASE)
_FILENAME_RE = re.compile(r'^(?P<patient>[^_]+)_(?P<image>[^_]+)_(?P<mag>1000|400|100)_(?P<type>[A-Za-z]+)$')


@dataclasses.dataclass(frozen=True)
class Domain:
  microscope: str
  magnification: str
  camera: str

  @property
  def subset(self) -> str:
    return f'{self.microscope}_{self.magnification}_{self.camera}'


def parse_subset_name(name: str) -> Domain | None:
  """Canonical domain of a subset folder name (case-insensitive, `hcm_`/`lcm_` prefixes accepted), else None."""
  match = _SUBSET_RE.match(name.strip())
  if not match:
    return None
  microscope, magnification, camera = match.groups()
  return Domain(microscope.upper(), magnification.lower(), camera.upper())


# The `mag` of a file name is the total magnification (objective x 10): 1000 for the 100x subsets.
FILENAME_MAGNIFICATIONS = {'1000': '100x', '400': '40x', '100': '10x'}


def image_filename_magnification(stem: str) -> str | None:
  """The objective ('100x', '40x', '10x') that a file stem `{patient}_{image}_{mag}_{type}` names, else None."""
  match = _FILENAME_RE.match(stem)
  return FILENAME_MAGNIFICATIONS[match.group('mag')] if match else None


def parse_image_filename(stem: str) -> tuple[str, str] | None:
  """(patient, leukemia_type) from a file stem `{patient}_{image}_{mag}_{type}`, else None."""
  match = _FILENAME_RE.match(stem)
  if not match:
    return None
  return match.group('patient'), match.group('type').upper()
