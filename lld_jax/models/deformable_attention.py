"""Multi-scale deformable attention (Zhu et al., 2021) and the bilinear sampler it rests on.

Sampling is a gather of the four neighbouring feature vectors, so it runs on any XLA backend and keeps static
shapes. The same sampler gives RoI-aligned features for the attribute queries.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp


def bilinear_sample(value, locations):
  """Samples value [B, H, W, M, D] at normalized (x, y) locations [B, Q, M, P, 2] -> [B, Q, M, P, D].

  Pixel centres sit at (i + 0.5) / size (align_corners=False); points outside the map read zeros.
  """
  batch, height, width, heads, dim = value.shape
  _, queries, _, points, _ = locations.shape
  flat_value = value.reshape(batch, height * width, heads, dim).transpose(0, 2, 1, 3)  # [B, M, HW, D]
  x = locations[..., 0] * width - 0.5
  y = locations[..., 1] * height - 0.5
  x0 = jnp.floor(x)
  y0 = jnp.floor(y)
  result = jnp.zeros((batch, heads, queries * points, dim), value.dtype)
  for dx in (0, 1):
    for dy in (0, 1):
      xi = x0 + dx
      yi = y0 + dy
      weight = (1 - jnp.abs(x - xi)) * (1 - jnp.abs(y - yi))
      inside = (xi >= 0) & (xi <= width - 1) & (yi >= 0) & (yi <= height - 1)
      weight = jnp.where(inside, weight, 0.0)
      index = (jnp.clip(yi, 0, height - 1) * width + jnp.clip(xi, 0, width - 1)).astype(jnp.int32)
      index = index.transpose(0, 2, 1, 3).reshape(batch, heads, queries * points)  # [B, M, Q*P]
      weight = weight.transpose(0, 2, 1, 3).reshape(batch, heads, queries * points, 1)
      # Indices are clipped above, so the gather needs no bounds handling (which costs selects and pads).
      gathered = jnp.take_along_axis(flat_value, index[..., None], axis=2, mode='promise_in_bounds')
      result = result + gathered * weight.astype(value.dtype)
  return result.reshape(batch, heads, queries, points, dim).transpose(0, 2, 1, 3, 4)


class MultiScaleDeformableAttention(nn.Module):
  """Each query attends to `num_points` sampled points per head and level around its reference box."""
  hidden_dim: int
  num_heads: int = 8
  num_levels: int = 3
  num_points: int = 4
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, query, reference_boxes, values, value_masks):
    """query [B, Q, C]; reference_boxes [B, Q, 4] cxcywh; values: list of [B, H, W, C] per level;
    value_masks: list of [B, H, W] (1 = real pixel, 0 = padding)."""
    batch, num_queries, _ = query.shape
    heads, levels, points = self.num_heads, self.num_levels, self.num_points
    head_dim = self.hidden_dim // heads
    offsets = nn.Dense(heads * levels * points * 2, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                       bias_init=_grid_offset_init(heads, levels, points), name='sampling_offsets')(query)
    offsets = offsets.reshape(batch, num_queries, heads, levels, points, 2)
    weights = nn.Dense(heads * levels * points, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                       name='attention_weights')(query)
    weights = jax.nn.softmax(weights.reshape(batch, num_queries, heads, levels * points).astype(jnp.float32), -1)
    weights = weights.reshape(batch, num_queries, heads, levels, points)
    centre = reference_boxes[:, :, None, None, None, :2]
    half_size = reference_boxes[:, :, None, None, None, 2:] * 0.5
    locations = centre + offsets.astype(jnp.float32) / points * half_size  # [B, Q, M, L, P, 2]
    value_proj = nn.Dense(self.hidden_dim, dtype=self.dtype, name='value_proj')
    output = 0.0
    for level, (value, mask) in enumerate(zip(values, value_masks)):
      h, w = value.shape[1:3]
      projected = value_proj(value) * mask[..., None].astype(self.dtype)
      projected = projected.reshape(batch, h, w, heads, head_dim)
      sampled = bilinear_sample(projected, locations[:, :, :, level].astype(projected.dtype))  # [B,Q,M,P,D]
      output = output + (sampled * weights[:, :, :, level, :, None].astype(sampled.dtype)).sum(3)
    output = output.reshape(batch, num_queries, self.hidden_dim)
    return nn.Dense(self.hidden_dim, dtype=self.dtype, name='output_proj')(output)


def _grid_offset_init(heads, levels, points):
  """Initial offsets point each head in its own direction, at growing distances (Deformable DETR)."""
  def init(key, shape, dtype=jnp.float32):
    del key
    angles = jnp.arange(heads, dtype=jnp.float32) * (2 * jnp.pi / heads)
    directions = jnp.stack([jnp.cos(angles), jnp.sin(angles)], -1)
    directions = directions / jnp.abs(directions).max(-1, keepdims=True)
    grid = directions[:, None, None, :] * jnp.arange(1, points + 1, dtype=jnp.float32)[None, None, :, None]
    grid = jnp.broadcast_to(grid, (heads, levels, points, 2))
    return grid.reshape(shape).astype(dtype)
  return init
