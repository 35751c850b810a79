"""The optimizer on flat parameter groups equals the same optimizer applied leaf by leaf."""

import flax
import jax
import jax.numpy as jnp
import numpy as np
import optax

from configs import synthetic_demo
from lld_jax import param_groups
from lld_jax import train_step


def _params():
  rng = np.random.default_rng(0)
  return {'backbone': {'conv': {'kernel': jnp.asarray(rng.normal(size=(3, 3, 2, 4)), jnp.float32),
                                'bias': jnp.asarray(rng.normal(size=(4,)), jnp.float32)}},
          'head': {'dense': {'kernel': jnp.asarray(rng.normal(size=(4, 5)), jnp.float32),
                             'bias': jnp.asarray(rng.normal(size=(5,)), jnp.float32)},
                   'scale': jnp.asarray(rng.normal(size=(5,)), jnp.float32)},
          'cell_encoder': {'kernel': jnp.asarray(rng.normal(size=(3, 2)), jnp.float32)},
          'attribute_head': {'bias': jnp.asarray(rng.normal(size=(2,)), jnp.float32)}}


def test_ravel_unravel_round_trip_and_grouping():
  params = _params()
  groups = param_groups.ParamGroups(params, lambda path, leaf: path[0] + str(leaf.ndim > 1))
  flat = groups.ravel(params)
  assert {k: v.shape for k, v in flat.items()} == {'backboneTrue': (72,), 'backboneFalse': (4,),
                                                   'headTrue': (20,), 'headFalse': (10,),
                                                   'cell_encoderTrue': (6,), 'attribute_headFalse': (2,)}
  back = groups.unravel(flat)
  assert jax.tree_util.tree_structure(back) == jax.tree_util.tree_structure(params)
  for a, b in zip(jax.tree_util.tree_leaves(back), jax.tree_util.tree_leaves(params)):
    np.testing.assert_array_equal(a, b)


def test_create_optimizer_matches_leafwise_adamw():
  """Clipping, the backbone's lower rate, the cell heads' higher rate and the no-decay rule for 1-D parameters,
  against optax leaf by leaf."""
  config = synthetic_demo.get_config()
  o = config.optimizer
  o.learning_rate, o.backbone_lr_factor, o.weight_decay, o.grad_clip, o.warmup_steps = 1e-2, 0.1, 0.5, 1.0, 2
  o.cell_head_lr_factor = 4.0
  config.total_steps = 10
  params = _params()
  rate_group = {'backbone': 'backbone', 'cell_encoder': 'cell_head', 'attribute_head': 'cell_head'}
  label = flax.traverse_util.path_aware_map(lambda p, _: rate_group.get(p[0], 'head'), params)
  decay_mask = flax.traverse_util.path_aware_map(lambda p, x: x.ndim > 1, params)
  reference = optax.chain(
      optax.clip_by_global_norm(o.grad_clip),
      optax.multi_transform({
          name: optax.adamw(train_step.learning_rate_schedule(config, rate), weight_decay=o.weight_decay,
                            mask=decay_mask)
          for name, rate in (('backbone', o.learning_rate * o.backbone_lr_factor), ('head', o.learning_rate),
                             ('cell_head', o.learning_rate * o.cell_head_lr_factor))},
          label))
  tx = train_step.create_optimizer(config, params)
  groups = train_step.optimizer_groups(params)
  assert sorted(groups.members) == ['backbone/decay', 'backbone/no_decay', 'cell_head/decay', 'cell_head/no_decay',
                                    'head/decay', 'head/no_decay']
  got, want = groups.ravel(params), params
  got_state, want_state = tx.init(got), reference.init(params)
  rng = np.random.default_rng(1)
  for _ in range(4):
    grads = jax.tree_util.tree_map(lambda x: jnp.asarray(rng.normal(size=x.shape) * 3, jnp.float32), params)
    updates, got_state = tx.update(groups.ravel(grads), got_state, got)
    got = optax.apply_updates(got, updates)
    updates, want_state = reference.update(grads, want_state, want)
    want = optax.apply_updates(want, updates)
  got = groups.unravel(got)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(got), jax.tree_util.tree_leaves(want)):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6, err_msg=jax.tree_util.keystr(path))
  assert not np.allclose(got['backbone']['conv']['kernel'], params['backbone']['conv']['kernel'])
  assert not np.allclose(got['cell_encoder']['kernel'], params['cell_encoder']['kernel'])
