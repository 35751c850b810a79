"""Moving host arrays onto the local devices for pmap, without the APIs removed in JAX 0.10.

Arrays are placed with the same sharding that pmap gives its outputs (a 1-D mesh named after the pmap axis),
so a step's outputs can be fed back without a recompilation."""

import collections
from typing import Iterator

import jax
import numpy as np

AXIS = 'batch'  # the pmap axis name of every step function


def _leading_axis_sharding(devices):
  mesh = jax.sharding.Mesh(np.asarray(devices), (AXIS,))
  return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec(AXIS))


def _put_leading_axis(x, devices):
  return jax.device_put(x, _leading_axis_sharding(devices[:x.shape[0]]))


def shard(tree, devices=None):
  """Host arrays [devices, ...] -> device arrays split along the leading axis (default: the local devices)."""
  devices = jax.local_devices() if devices is None else devices
  return jax.tree_util.tree_map(lambda x: _put_leading_axis(np.asarray(x), devices), tree)


def replicate(tree, devices=None):
  """One copy of every leaf on each device (leading axis = devices; default: the local devices)."""
  devices = jax.local_devices() if devices is None else devices
  return jax.tree_util.tree_map(
      lambda x: _put_leading_axis(np.broadcast_to(np.asarray(x), (len(devices),) + np.shape(x)), devices), tree)


def shapes_on_devices(tree, replicated, devices=None):
  """What `replicate(tree)` (replicated=True) or `shard(tree)` would place, as jax.ShapeDtypeStruct leaves with
  their sharding: enough to compile a step ahead of time (`jax.pmap(f).lower(...)`) without copying anything."""
  devices = jax.local_devices() if devices is None else devices

  def shape(x):
    placed = ((len(devices),) if replicated else ()) + np.shape(x)
    dtype = jax.dtypes.canonicalize_dtype(x.dtype if hasattr(x, 'dtype') else np.asarray(x).dtype)
    return jax.ShapeDtypeStruct(placed, dtype, sharding=_leading_axis_sharding(devices[:placed[0]]))
  return jax.tree_util.tree_map(shape, tree)


def unreplicate(tree):
  """The first device's copy of a replicated tree, as host numpy arrays."""
  return jax.tree_util.tree_map(lambda x: np.asarray(x[0]), tree)


def prefetch_to_devices(iterator, size=2) -> Iterator:
  """Shards host batches onto the devices `size` batches ahead, so the step never waits on the transfer."""
  queue = collections.deque()
  for batch in iterator:
    queue.append(shard(batch))
    if len(queue) > size:
      yield queue.popleft()
  while queue:
    yield queue.popleft()
