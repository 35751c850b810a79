"""Placing host arrays on the 2 simulated devices, and compiling a pmapped step ahead of time from their shapes."""

import jax
from jax import lax
import jax.numpy as jnp
import numpy as np

from lld_jax import sharding


def _step(state, batch):
  gradient = lax.pmean(batch['x'].T @ jnp.tanh(batch['x'] @ state['w']), sharding.AXIS)
  return {'w': state['w'] - 0.1 * gradient, 'count': state['count'] + 1}, jnp.sum(batch['labels'])


def test_a_step_compiled_from_the_shapes_runs_on_what_replicate_and_shard_place():
  devices = jax.local_devices()
  assert len(devices) == 2
  rng = np.random.default_rng(0)
  state = {'w': rng.normal(size=(5, 3)).astype(np.float32), 'count': np.int64(0)}  # int64: canonicalized
  batches = [{'x': rng.normal(size=(2, 4, 5)).astype(np.float32), 'labels': rng.integers(0, 9, (2, 4))}
             for _ in range(3)]
  shapes = sharding.shapes_on_devices(state, replicated=True)
  assert shapes['w'].shape == (2, 5, 3) and shapes['count'].dtype == jnp.int32
  assert sharding.shapes_on_devices(batches[0], replicated=False)['x'].shape == (2, 4, 5)
  p_step = jax.pmap(_step, axis_name=sharding.AXIS, donate_argnums=(0,))
  compiled = p_step.lower(shapes, sharding.shapes_on_devices(batches[0], replicated=False)).compile()
  ahead, plain = sharding.replicate(state), sharding.replicate(state)
  for batch in sharding.prefetch_to_devices(iter(batches)):
    ahead, ahead_sum = compiled(ahead, batch)
    plain, plain_sum = p_step(plain, batch)
    np.testing.assert_array_equal(np.asarray(ahead_sum), np.asarray(plain_sum))
  np.testing.assert_array_equal(np.asarray(ahead['w']), np.asarray(plain['w']))
  np.testing.assert_array_equal(np.asarray(ahead['count']), [3, 3])
