"""Hungarian matching: optimality against scipy, padded targets, the annotated-region rule, jit/pmap, costs."""

import functools
import os
import subprocess
import sys
import textwrap

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from lld_jax import matching
from repo import REPO_ROOT

WEIGHTS = matching.CostWeights()
# Shared jitted functions and shapes: every new shape is another compile, which dominates on a small CPU.
# XLA's CPU backend optimizations take most of the compile time and are not needed here.
Q, T, MASK = 10, 4, 16
_FAST_COMPILE = {'xla_backend_optimization_level': 0}
_jit = functools.partial(jax.jit, compiler_options=_FAST_COMPILE)
_hungarian = _jit(matching.hungarian_match)
_match = _jit(functools.partial(matching.match, weights=WEIGHTS))
_matching_cost = _jit(functools.partial(matching.matching_cost, weights=WEIGHTS))
_batched_match = _jit(functools.partial(matching.batched_match, weights=WEIGHTS))


def _scipy_cost(cost):
  rows, cols = linear_sum_assignment(cost)
  return cost[rows, cols].sum()


def _random_predictions(rng, num_queries, num_targets, num_classes=4):
  """Predicted logits/boxes and targets in normalized cxcywh, all float32."""
  logits = rng.normal(0, 2, (num_queries, num_classes)).astype(np.float32)
  boxes = np.concatenate([rng.uniform(0.1, 0.9, (num_queries, 2)), rng.uniform(0.05, 0.2, (num_queries, 2))],
                         -1).astype(np.float32)
  labels = rng.integers(0, num_classes, num_targets).astype(np.int32)
  target_boxes = np.concatenate([rng.uniform(0.1, 0.9, (num_targets, 2)),
                                 rng.uniform(0.05, 0.2, (num_targets, 2))], -1).astype(np.float32)
  return logits, boxes, labels, target_boxes


@pytest.mark.parametrize('shape', [(5, 5), (Q, T), (7, 1)])
def test_hungarian_matches_scipy_total_cost(shape):
  for seed in range(4):
    cost = np.random.default_rng(seed).uniform(-1, 3, shape).astype(np.float32)
    query_for_target = np.asarray(_hungarian(cost))
    assert query_for_target.shape == (shape[1],)
    assert len(set(query_for_target.tolist())) == shape[1]  # one query per target
    assert ((query_for_target >= 0) & (query_for_target < shape[0])).all()
    np.testing.assert_allclose(cost[query_for_target, np.arange(shape[1])].sum(), _scipy_cost(cost), rtol=1e-5)


def test_hungarian_rejects_more_targets_than_queries():
  with pytest.raises(ValueError, match='at least as many queries'):
    matching.hungarian_match(jnp.zeros((2, 3)))


@pytest.mark.parametrize('seed', [0, 1, 2])
def test_padded_targets_do_not_change_the_real_assignment(seed):
  rng = np.random.default_rng(seed)
  num_queries, num_targets, num_real = Q, T, 2 + seed % 2
  logits, boxes, labels, target_boxes = _random_predictions(rng, num_queries, num_targets)
  valid = np.arange(num_targets) < num_real
  in_region = np.ones(num_queries, bool)
  cost = np.asarray(_matching_cost(logits, boxes, labels, target_boxes, valid, in_region))
  assert (cost[:, ~valid] == matching.PADDED_TARGET_COST).all()
  query_for_target = np.asarray(_hungarian(cost))
  assert len(set(query_for_target.tolist())) == num_targets
  real_cost = cost[:, valid]
  rows, cols = linear_sum_assignment(real_cost)
  expected = np.empty(num_real, np.int64)
  expected[cols] = rows
  np.testing.assert_array_equal(query_for_target[valid], expected)
  # Padded slots at the front, the middle or the end: same answer for the real ones.
  order = rng.permutation(num_targets)
  shuffled = np.asarray(_hungarian(cost[:, order]))
  np.testing.assert_array_equal(shuffled[np.argsort(order)][valid], expected)


def test_points_in_mask():
  mask = np.zeros((4, 4), np.float32)
  mask[:, :2] = 1  # left half
  points = jnp.array([[0.1, 0.1], [0.49, 0.9], [0.51, 0.5], [0.9, 0.9], [-0.1, 0.5], [0.2, 1.2]])
  np.testing.assert_array_equal(matching.points_in_mask(points, mask), [True, True, False, False, False, False])


def test_region_rule_prefers_free_queries_inside_the_mask():
  rng = np.random.default_rng(0)
  num_queries, num_targets = Q, T
  mask = np.zeros((MASK, MASK), np.float32)
  mask[:, :MASK // 2] = 1
  match = _match
  saw_outside_match = False
  for trial in range(12):
    logits, boxes, labels, target_boxes = _random_predictions(rng, num_queries, num_targets)
    num_inside = trial % 6  # sometimes fewer inside queries than targets
    inside = rng.permutation(num_queries) < num_inside
    boxes[:, 0] = np.where(inside, rng.uniform(0.05, 0.45, num_queries), rng.uniform(0.55, 0.95, num_queries))
    num_real = 1 + trial % num_targets
    valid = np.arange(num_targets) < num_real
    query_for_target, query_in_region = match(logits, boxes, labels, target_boxes, valid, mask)
    query_for_target = np.asarray(query_for_target)
    np.testing.assert_array_equal(query_in_region, inside)
    taken_by_real = set(query_for_target[valid].tolist())
    free_inside = [q for q in np.flatnonzero(inside) if q not in taken_by_real]
    for q in query_for_target[valid]:
      if not inside[q]:
        saw_outside_match = True
        assert not free_inside, f'trial {trial}: target matched outside while {free_inside} were free inside'
    # Real targets take min(num_real, num_inside) inside queries.
    assert sum(inside[q] for q in query_for_target[valid]) == min(num_real, num_inside)
  assert saw_outside_match  # the case where too few queries are inside was exercised


def _batch(rng, batch, num_queries, num_targets, with_attributes=False):
  preds = [_random_predictions(rng, num_queries, num_targets) for _ in range(batch)]
  logits, boxes, labels, target_boxes = (np.stack(x) for x in zip(*preds))
  valid = np.arange(num_targets)[None] < rng.integers(0, num_targets + 1, (batch, 1))
  masks = np.ones((batch, MASK, MASK), np.float32)
  masks[:, :, MASK // 2:] = rng.integers(0, 2, (batch, 1, 1))  # some images annotated on the left half only
  args = [logits, boxes, labels, target_boxes, valid, masks]
  if with_attributes:
    args += [rng.normal(size=(batch, num_queries, 2, 3)).astype(np.float32),
             rng.integers(-1, 2, (batch, num_targets, 2)).astype(np.int32)]
  return args


def test_batched_match_under_jit_equals_per_image_match():
  rng = np.random.default_rng(1)
  args = _batch(rng, 3, Q, T)
  query_for_target, in_region = _batched_match(*args)
  assert query_for_target.shape == (3, T) and query_for_target.dtype == jnp.int32
  assert in_region.shape == (3, Q)
  for b in range(3):
    single, single_in_region = _match(*(a[b] for a in args))
    np.testing.assert_array_equal(query_for_target[b], single)
    np.testing.assert_array_equal(in_region[b], single_in_region)


def test_batched_match_with_attribute_cost_under_jit():
  rng = np.random.default_rng(3)
  args = _batch(rng, 2, 4, 2, with_attributes=True)
  weights = matching.CostWeights(attribute_weight=1.0)

  @_jit
  def run(*a):
    query_for_target, in_region = matching.batched_match(*a[:6], weights, *a[6:])
    cost = jax.vmap(lambda l, b, tl, tb, tv, r, al, ta: matching.matching_cost(l, b, tl, tb, tv, r, weights, al, ta))(
        *a[:5], in_region, *a[6:])
    return query_for_target, cost

  query_for_target, cost = (np.asarray(x) for x in run(*args))
  for b in range(2):
    valid = args[4][b]
    if valid.any():
      got = cost[b][query_for_target[b], np.arange(2)][valid].sum()
      np.testing.assert_allclose(got, _scipy_cost(cost[b][:, valid]), rtol=1e-5)


def test_batched_match_inside_pmap_one_device():
  rng = np.random.default_rng(2)
  args = _batch(rng, 3, Q, T)
  expected, _ = _batched_match(*args)  # same shapes as the jit test: already compiled
  sharded = [a[None] for a in args]  # [1 device, B, ...]
  pmapped = jax.pmap(lambda *a: matching.batched_match(*a, WEIGHTS), axis_name='batch')
  query_for_target, _ = _jit(pmapped)(*sharded)
  np.testing.assert_array_equal(query_for_target[0], expected)


_TWO_DEVICE_SCRIPT = textwrap.dedent('''
    import jax
    import numpy as np
    from lld_jax import matching
    assert jax.local_device_count() == 2, jax.devices()
    rng = np.random.default_rng(0)
    weights = matching.CostWeights()
    q, t, b = 5, 3, 2
    logits = rng.normal(size=(2, b, q, 4)).astype(np.float32)
    boxes = rng.uniform(0.2, 0.4, (2, b, q, 4)).astype(np.float32)
    labels = rng.integers(0, 4, (2, b, t)).astype(np.int32)
    target_boxes = rng.uniform(0.2, 0.4, (2, b, t, 4)).astype(np.float32)
    valid = np.array([[[True, True, False]] * b, [[True, False, False]] * b])
    masks = np.ones((2, b, 4, 4), np.float32)
    args = (logits, boxes, labels, target_boxes, valid, masks)
    fast = {'xla_backend_optimization_level': 0}
    out, _ = jax.jit(jax.pmap(lambda *a: matching.batched_match(*a, weights), axis_name='d'),
                     compiler_options=fast)(*args)
    reference = jax.jit(lambda *a: matching.batched_match(*a, weights), compiler_options=fast)
    for d in range(2):
      ref, _ = reference(*(a[d] for a in args))
      np.testing.assert_array_equal(out[d], ref)
    # The criterion divides each device's sums by the mean box count over devices (the train step pmeans the
    # gradients, so the result is normalized by the global count), at least 1.
    from lld_jax import criterion
    count = jax.pmap(lambda c: criterion._global_count(c, 'd'), axis_name='d')
    np.testing.assert_allclose(count(np.array([0.0, 4.0], np.float32)), [2.0, 2.0])
    np.testing.assert_allclose(count(np.array([0.0, 0.0], np.float32)), [1.0, 1.0])
    print('OK', out.shape)
''')


def test_batched_match_inside_pmap_two_simulated_devices():
  env = dict(os.environ, XLA_FLAGS='--xla_force_host_platform_device_count=2', JAX_PLATFORMS='cpu')
  result = subprocess.run([sys.executable, '-c', _TWO_DEVICE_SCRIPT], env=env, capture_output=True, text=True,
                          timeout=120, cwd=REPO_ROOT)
  assert result.returncode == 0, result.stderr[-3000:]
  assert 'OK (2, 2, 3)' in result.stdout


def test_focal_class_cost_matches_numpy():
  rng = np.random.default_rng(0)
  logits = rng.normal(0, 3, (5, 4)).astype(np.float64)
  labels = np.array([3, 0, 0, 2])
  alpha, gamma = 0.3, 1.5
  p = 1 / (1 + np.exp(-logits))
  positive = alpha * (1 - p)**gamma * -np.log(p)
  negative = (1 - alpha) * p**gamma * -np.log(1 - p)
  expected = (positive - negative)[:, labels]
  got = _jit(matching.focal_class_cost, static_argnums=(2, 3))(
      jnp.asarray(logits, jnp.float32), jnp.asarray(labels), alpha, gamma)
  assert got.shape == (5, 4)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
  # A confident correct query is cheaper than an unsure one.
  cost = np.asarray(matching.focal_class_cost(jnp.array([[6.0, -6.0], [0.0, 0.0]]), jnp.array([0])))
  assert cost[0, 0] < cost[1, 0]


def test_attribute_cost_matches_numpy():
  rng = np.random.default_rng(1)
  num_values = [3, 2, 2]
  logits = rng.normal(size=(4, 3, 3))
  for a, n in enumerate(num_values):
    logits[:, a, n:] = -1e9
  attributes = np.array([[0, 1, -1], [2, -1, -1], [-1, -1, -1], [1, 0, 1]])
  log_probs = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
      - logits.max(-1, keepdims=True)
  expected = np.zeros((4, 4))
  for q in range(4):
    for t in range(4):
      known = [a for a in range(3) if attributes[t, a] >= 0]
      expected[q, t] = -np.mean([log_probs[q, a, attributes[t, a]] for a in known]) if known else 0.0
  got = _jit(matching.attribute_cost)(jnp.asarray(logits, jnp.float32), jnp.asarray(attributes))
  assert got.shape == (4, 4)
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
