"""The optimizer's view of the parameters: one flat vector per group of parameters that share hyperparameters.

A detector has hundreds of parameter arrays, and an optimizer applied leaf by leaf puts a copy of its update
arithmetic (clipping, Adam moments, weight decay, the schedule) into the compiled step for each of them: for the
demo model that was about 60 % of the train step's operations, and most of its compile time. Concatenated into a
handful of vectors (backbone or head, decayed or not), the same element-wise arithmetic is a few operations.
"""

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np


def _path_names(path):
  return tuple(str(getattr(key, 'key', getattr(key, 'name', key))) for key in path)


class ParamGroups:
  """Maps a parameter pytree to {group name: flat vector} and back; the grouping is static."""

  def __init__(self, params, group_of: Callable[[tuple, jax.Array], str]):
    """group_of(path names, leaf) -> the leaf's group name."""
    with_paths, self.treedef = jax.tree_util.tree_flatten_with_path(params)
    self.shapes = [np.shape(leaf) for _, leaf in with_paths]
    dtypes = {jnp.dtype(leaf.dtype) for _, leaf in with_paths}
    if len(dtypes) != 1:
      raise ValueError(f'parameters of several dtypes ({sorted(map(str, dtypes))}) cannot share flat vectors')
    self.members = {}  # group name -> leaf indices, in tree order
    for index, (path, leaf) in enumerate(with_paths):
      self.members.setdefault(group_of(_path_names(path), leaf), []).append(index)

  def ravel(self, tree):
    leaves = self.treedef.flatten_up_to(tree)
    return {name: jnp.concatenate([jnp.ravel(leaves[i]) for i in indices])
            for name, indices in self.members.items()}

  def unravel(self, flat):
    leaves = [None] * len(self.shapes)
    for name, indices in self.members.items():
      sizes = [int(np.prod(self.shapes[i])) for i in indices]
      parts = jnp.split(flat[name], np.cumsum(sizes)[:-1])
      for i, part in zip(indices, parts):
        leaves[i] = part.reshape(self.shapes[i])
    return self.treedef.unflatten(leaves)
