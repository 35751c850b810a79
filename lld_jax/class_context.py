"""Class context: the cells of one film share a diagnosis (`eval.class_context`).

A cell classifier reads one cell at a time, but the cells of a film are not independent: a blast in an ALL film is
a lymphoblast, in an AML film most likely a myeloblast. LLD names every field `{patient}_{image}_{mag}_{type}`, so
the training split tells how the classes mix in each leukemia type. The context is Bayes' rule over a latent type t:

  p(t) and the class mix pi_t(k) are counted on the training split; pi(k) is the whole split's mix, the prior the
  classifier's p(k | x) was trained under, so p(x | k) is proportional to p(k | x) / pi(k);
  given the type, the cells are independent:
    p(t | the others) ∝ p(t) prod_{j != i} [sum_k p(k | x_j) pi_t(k) / pi(k)] ^ w_j
    p(k | x_i, the others) ∝ p(k | x_i) sum_t p(t | the others) pi_t(k) / pi(k)

where the others are the other queries of the same field ('field') or of every field of the same patient
('patient', a film), and w_j is the detector's confidence that query j is a cell at all: queries that found
nothing carry no evidence. A cell's own pixels count once, through p(k | x_i). The test fields' own types are
never read, only their patient id, to group a film.
"""

import dataclasses
import json
import os

import numpy as np
from scipy.special import log_softmax
from scipy.special import logsumexp

from lld_jax import postprocess
from tfds_lld import lld_format

MODES = ('none', 'field', 'patient')
COUNTS_FILE = 'class_context.json'


@dataclasses.dataclass(frozen=True)
class TypeMix:
  """log p(t) [T] and log(pi_t(k) / pi(k)) [T, K] over the leukemia types seen in training."""
  types: tuple[str, ...]
  log_type_prior: np.ndarray
  log_ratio: np.ndarray


def type_mix(counts, types, smoothing: float = 1.0) -> TypeMix:
  """The mix of each type from counts [T, K] of training cells (rows: `types`, in order).

  Types without a cell are left out. Each type's mix is shrunk towards the whole mix by `smoothing` pseudo-cells, so
  a class never seen in a type is unlikely there, not impossible: a type is learnt from a few patients."""
  counts = np.asarray(counts, np.float64)
  if counts.ndim != 2 or len(types) != counts.shape[0]:
    raise ValueError(f'class context: counts of shape {counts.shape} for {len(types)} types')
  seen = counts.sum(1) > 0
  if seen.sum() < 2:
    raise ValueError(f'class context needs training cells of at least two leukemia types, got '
                     f'{[t for t, s in zip(types, seen) if s] or "none"}: the fields\' names must end in the type '
                     f'(`{{patient}}_{{image}}_{{mag}}_{{type}}`)')
  counts = counts[seen]
  num_classes = counts.shape[1]
  overall = (counts.sum(0) + 1.0) / (counts.sum() + num_classes)
  mix = (counts + smoothing * overall) / (counts.sum(1, keepdims=True) + smoothing)
  cells_per_type = counts.sum(1)
  return TypeMix(types=tuple(t for t, s in zip(types, seen) if s),
                 log_type_prior=np.log(cells_per_type / cells_per_type.sum()),
                 log_ratio=np.log(mix) - np.log(overall)[None])


def log_weights(cell_class_logits, cell_weights, mix: TypeMix):
  """For one group of queries (a field or a film): log of sum_t p(t | the others) pi_t(k) / pi(k), [N, K].

  cell_class_logits [N, K]: the classifier's logits of every query of the group; cell_weights [N] in [0, 1]: how
  much each query counts as a cell. Add the result to log p(k | x) for the classes in context."""
  log_probs = log_softmax(np.asarray(cell_class_logits, np.float64), -1)
  weights = np.asarray(cell_weights, np.float64)
  # log sum_k p(k | x_j) pi_t(k) / pi(k): what cell j says of each type, [N, T]
  evidence = logsumexp(log_probs[:, None, :] + mix.log_ratio[None], -1) * weights[:, None]
  others = evidence.sum(0, keepdims=True) - evidence
  type_posterior = mix.log_type_prior[None] + others
  type_posterior -= logsumexp(type_posterior, -1, keepdims=True)
  return logsumexp(type_posterior[:, :, None] + mix.log_ratio[None], 1)


def group_keys(patients, mode):
  """The group of each image: its own ('field'), or its patient ('patient'; an image without one is its own
  group). Returns (keys, how many images had no patient to group by)."""
  if mode not in MODES[1:]:
    raise ValueError(f'eval.class_context={mode!r}: expected one of {MODES}')
  keys, alone = [], 0
  for index, patient in enumerate(patients):
    if mode == 'patient' and patient:
      keys.append(('patient', patient))
    else:
      alone += mode == 'patient'
      keys.append(('image', index))
  return keys, alone


def in_context(cell_class_logits, detector_logits, patients, mode, mix: TypeMix):
  """The classifier's log-probabilities with the context, one [Q, K] per image.

  cell_class_logits, detector_logits: one [Q, K] per image (the decoder's logits give each query's cell weight,
  `postprocess.cell_scores`); patients: each image's patient id ('' when unknown). Returns (the new logits, how
  many images had no patient to group by)."""
  keys, alone = group_keys(patients, mode)
  groups = {}
  for index, key in enumerate(keys):
    groups.setdefault(key, []).append(index)
  out = [None] * len(keys)
  for members in groups.values():
    logits = [np.asarray(cell_class_logits[i], np.float64) for i in members]
    weights = [postprocess.cell_scores(detector_logits[i]) for i in members]
    context = log_weights(np.concatenate(logits), np.concatenate(weights), mix)
    for i, own, extra in zip(members, logits, np.split(context, np.cumsum([len(x) for x in logits])[:-1])):
      out[i] = log_softmax(own, -1) + extra
  return out, alone


def patient_of(file_name: str) -> str:
  """The patient id in an LLD file name (`{patient}_{image}_{mag}_{type}.png`), else ''."""
  parsed = lld_format.parse_image_filename(os.path.splitext(os.path.basename(file_name))[0])
  return parsed[0] if parsed else ''


def mode_of(config) -> str:
  """`eval.class_context`, validated; 'none' in the config of a run from before the option."""
  mode = config.get('eval', {}).get('class_context', 'none')
  if mode not in MODES:
    raise ValueError(f'eval.class_context={mode!r}: expected one of {MODES}')
  if mode != 'none' and config.get('eval', {}).get('class_scores', 'detector') != 'cell_classifier':
    raise ValueError(f'eval.class_context={mode!r} adjusts the cell classifier\'s probabilities: set '
                     f'eval.class_scores=cell_classifier')
  return mode


def write_counts(counts, types, class_names, path):
  """{type: {class: count}} of the training cells, what `lld_jax.predict` reads to put cells in context."""
  table = {t: {name: int(c) for name, c in zip(class_names, row)} for t, row in zip(types, np.asarray(counts))}
  with open(f'{path}.tmp', 'w') as f:
    json.dump(table, f, indent=1)
  os.replace(f'{path}.tmp', path)


def read_counts(path, class_names):
  """(counts [T, K], types) that `write_counts` wrote, with the classes in `class_names`' order."""
  with open(path) as f:
    table = json.load(f)
  if not isinstance(table, dict) or not table:
    raise ValueError(f'{path}: expected {{leukemia type: {{class: count}}}}, got {table!r:.80}')
  types = tuple(table)
  counts = np.zeros((len(types), len(class_names)), np.int64)
  for t, name in enumerate(types):
    row = table[name]
    if not isinstance(row, dict) or set(row) != set(class_names):
      raise ValueError(f'{path}: type {name!r} needs counts of exactly the classes {list(class_names)}, got '
                       f'{sorted(row) if isinstance(row, dict) else row!r}')
    for k, class_name in enumerate(class_names):
      if not isinstance(row[class_name], int) or row[class_name] < 0:
        raise ValueError(f'{path}: {name}/{class_name}: the count {row[class_name]!r} is not a non-negative integer')
      counts[t, k] = row[class_name]
  return counts, types
