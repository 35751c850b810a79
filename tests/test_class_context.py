"""The class context (lld_jax.class_context) against Bayes' rule by enumeration."""

import itertools

import numpy as np
import pytest
from scipy.special import softmax

from lld_jax import class_context

TYPES = ('ALL', 'AML', 'CLL')


def _mix(rng, num_classes=3):
  counts = rng.integers(0, 30, (len(TYPES), num_classes))
  return counts, class_context.type_mix(counts, TYPES)


def _posterior_by_enumeration(logits, mix):
  """p(k_i | every cell of the group), summing the joint p(t) prod_j p(k_j | x_j) pi_t(k_j) / pi(k_j) over the
  type and every labelling of the cells."""
  probs = softmax(logits, -1)
  num_cells, num_classes = probs.shape
  ratio = np.exp(mix.log_ratio)
  marginals = np.zeros((num_cells, num_classes))
  for t, log_prior in enumerate(mix.log_type_prior):
    for labels in itertools.product(range(num_classes), repeat=num_cells):
      joint = np.exp(log_prior) * np.prod([probs[j, k] * ratio[t, k] for j, k in enumerate(labels)])
      for j, k in enumerate(labels):
        marginals[j, k] += joint
  return marginals / marginals.sum(-1, keepdims=True)


@pytest.mark.parametrize('seed, num_cells', [(0, 1), (1, 2), (2, 4)])
def test_context_is_bayes_rule_over_the_type(seed, num_cells):
  rng = np.random.default_rng(seed)
  _, mix = _mix(rng)
  logits = rng.normal(0, 2, (num_cells, 3))
  got = softmax(np.log(softmax(logits, -1)) + class_context.log_weights(logits, np.ones(num_cells), mix), -1)
  np.testing.assert_allclose(got, _posterior_by_enumeration(logits, mix), rtol=1e-9)


def test_a_query_that_is_no_cell_adds_no_evidence():
  rng = np.random.default_rng(3)
  _, mix = _mix(rng)
  logits = rng.normal(0, 2, (3, 3))
  with_empty = class_context.log_weights(np.concatenate([logits, rng.normal(0, 5, (1, 3))]), [1, 1, 1, 0], mix)
  np.testing.assert_allclose(with_empty[:3], class_context.log_weights(logits, np.ones(3), mix), rtol=1e-12)


def test_cells_of_a_type_pull_a_doubtful_cell_to_that_types_class():
  # Type 0 holds class 0 only, type 1 class 1 only; class 2 is everywhere. A cell torn between 0 and 1 among
  # three sure cells of class 0 becomes class 0; alone, it stays torn.
  counts = np.array([[50, 0, 10], [0, 50, 10]])
  mix = class_context.type_mix(counts, TYPES[:2])
  logits = np.log(np.array([[0.98, 0.01, 0.01]] * 3 + [[0.45, 0.45, 0.1]]))
  context = class_context.log_weights(logits, np.ones(4), mix)
  probs = softmax(logits + context, -1)
  assert probs[3, 0] > 50 * probs[3, 1]
  alone = softmax(logits[3:] + class_context.log_weights(logits[3:], np.ones(1), mix), -1)
  np.testing.assert_allclose(alone[0, 0], alone[0, 1], rtol=0.05)


def test_in_context_groups_a_patients_fields_and_leaves_unnamed_fields_alone():
  rng = np.random.default_rng(4)
  _, mix = _mix(rng)
  logits = [rng.normal(0, 2, (2, 3)) for _ in range(4)]
  detector = [rng.normal(0, 2, (2, 3)) for _ in range(4)]
  out, alone = class_context.in_context(logits, detector, ['7', '', '7', '9'], 'patient', mix)
  assert alone == 1
  weights = [1 / (1 + np.exp(-d.max(-1))) for d in detector]
  film = class_context.log_weights(np.concatenate([logits[0], logits[2]]), np.concatenate([weights[0], weights[2]]),
                                   mix)
  np.testing.assert_allclose(out[0], np.log(softmax(logits[0], -1)) + film[:2], rtol=1e-12)
  np.testing.assert_allclose(out[2], np.log(softmax(logits[2], -1)) + film[2:], rtol=1e-12)
  for i in (1, 3):
    np.testing.assert_allclose(out[i], np.log(softmax(logits[i], -1)) + class_context.log_weights(
        logits[i], weights[i], mix), rtol=1e-12)
  by_field, alone = class_context.in_context(logits, detector, ['7', '', '7', '9'], 'field', mix)
  assert alone == 0
  np.testing.assert_allclose(by_field[0], np.log(softmax(logits[0], -1)) + class_context.log_weights(
      logits[0], weights[0], mix), rtol=1e-12)


def test_type_mix_leaves_out_unseen_types_and_needs_two():
  mix = class_context.type_mix([[3, 1], [0, 0], [1, 3]], TYPES)
  assert mix.types == ('ALL', 'CLL')
  np.testing.assert_allclose(np.exp(mix.log_type_prior), [0.5, 0.5])
  with pytest.raises(ValueError, match='at least two leukemia types.*ALL'):
    class_context.type_mix([[3, 1], [0, 0], [0, 0]], TYPES)


def test_patient_of_reads_lld_names_only():
  assert class_context.patient_of('H_100x_C1/Images/test/4_15_1000_ALL.png') == '4'
  assert class_context.patient_of('smear_001.jpg') == ''


def test_counts_round_trip_and_bad_files_name_the_file(tmp_path):
  names = ('None', 'Myeloblast')
  path = str(tmp_path / class_context.COUNTS_FILE)
  class_context.write_counts([[1, 2], [3, 4]], ('ALL', 'AML'), names, path)
  counts, types = class_context.read_counts(path, names)
  np.testing.assert_array_equal(counts, [[1, 2], [3, 4]])
  assert types == ('ALL', 'AML')
  with pytest.raises(ValueError, match=f'{path}: type .ALL. needs counts of exactly the classes'):
    class_context.read_counts(path, ('None', 'Lymphoblast'))
  (tmp_path / 'bad.json').write_text('{"ALL": {"None": -1, "Myeloblast": 2}}')
  with pytest.raises(ValueError, match='bad.json: ALL/None: the count -1 is not a non-negative integer'):
    class_context.read_counts(str(tmp_path / 'bad.json'), names)


def test_mode_needs_the_cell_classifier():
  from lld_jax.default_config import base_config
  config = base_config()
  assert class_context.mode_of(config) == 'none'
  config.eval.class_context = 'patient'
  with pytest.raises(ValueError, match='eval.class_scores=cell_classifier'):
    class_context.mode_of(config)
  config.eval.class_scores = 'cell_classifier'
  assert class_context.mode_of(config) == 'patient'
  config.eval.class_context = 'film'
  with pytest.raises(ValueError, match="eval.class_context='film'"):
    class_context.mode_of(config)
