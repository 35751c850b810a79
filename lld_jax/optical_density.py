"""Optical density: how much stain a pixel holds, measured against its own field's background (Beer-Lambert).

A smear's pixel is the light behind it times exp(-stain): the lamp, the camera's colour cast, the vignetting and
the plasma's tint multiply every pixel of a neighbourhood alike, and the stain's colour is a ratio of densities
between channels. Dividing a cell's pixels by the background around it and taking -log removes the first and
leaves the second; a small CNN on raw pixels would have to learn both from a few hundred cells.
"""

import jax
import jax.numpy as jnp

from lld_jax import postprocess
from lld_jax.models.deformable_attention import bilinear_sample

# Tiles along the canvas's longer side: 16 px at the demo's 224, 46 px at LLD's 640, a cell or more at 100x.
TILES_PER_SIDE = 14
# A pixel a little brighter than its background estimate (noise, a bright plasma patch) keeps a small negative
# density; a black one (padding, dirt) stops at 255 times darker.
_MAX_RATIO = 1.25
_MIN_RATIO = 1.0 / 255.0
# The cell encoder reads (density - _ENCODER_SHIFT) / _ENCODER_SCALE: about zero mean and unit spread on the
# synthetic demo's crops (a cell and its margin of background).
_ENCODER_SHIFT = 0.3
_ENCODER_SCALE = 0.33


def field_background(pixels, tiles_per_side=TILES_PER_SIDE):
  """The background colour [B, h, w, 3] of pixels [B, H, W, 3] (linear intensities) on a grid of square tiles,
  tiles_per_side along the longer side (the canvas is padded with its edge to whole tiles): in each tile, the
  mean colour of its brightest quarter of pixels; then, per channel, the brightest of the tile and its eight
  neighbours, since a tile that a cell fills shows no background (where the light changes across the field, that
  is a little brighter than the tile's own: by the change over one tile's width)."""
  batch, height, width, channels = pixels.shape
  tile = -(-max(height, width) // tiles_per_side)
  rows, cols = -(-height // tile), -(-width // tile)
  pixels = jnp.pad(pixels, ((0, 0), (0, rows * tile - height), (0, cols * tile - width), (0, 0)), mode='edge')
  tiles = pixels.reshape(batch, rows, tile, cols, tile, channels)
  tiles = tiles.transpose(0, 1, 3, 2, 4, 5).reshape(batch, rows, cols, tile * tile, channels)
  brightest = jnp.argsort(tiles.mean(-1), axis=-1)[..., -max(tile * tile // 4, 1):]
  colour = jnp.take_along_axis(tiles, brightest[..., None], axis=3).mean(3)  # [B, h, w, C]
  padded = jnp.pad(colour, ((0, 0), (1, 1), (1, 1), (0, 0)), mode='edge')
  return jax.lax.reduce_window(padded, -jnp.inf, jax.lax.max, (1, 3, 3, 1), (1, 1, 1, 1), 'VALID')


def background_at(pixels, centres, tiles_per_side=TILES_PER_SIDE):
  """The background colour [B, N, 3] of pixels [B, H, W, 3] at normalized (x, y) centres [B, N, 2] of the
  canvas: `field_background`, bilinear between tile centres (the outer tiles' colour out to the edge)."""
  height, width = pixels.shape[1:3]
  background = field_background(pixels, tiles_per_side)
  rows, cols = background.shape[1:3]
  tile = -(-max(height, width) // tiles_per_side)
  # Canvas coordinates -> grid coordinates (the grid covers the padded canvas), kept between the outer centres.
  grid = centres * jnp.asarray([width / (cols * tile), height / (rows * tile)], centres.dtype)
  grid = jnp.clip(grid, jnp.asarray([0.5 / cols, 0.5 / rows]), jnp.asarray([1 - 0.5 / cols, 1 - 0.5 / rows]))
  return bilinear_sample(background[:, :, :, None, :], grid.astype(background.dtype)[:, :, None, None])[:, :, 0, 0]


def optical_density(pixels, background):
  """-log(pixels / background), per channel; background broadcasts against pixels. NumPy in, NumPy out: the
  crop stream computes it on the host, where a JAX call would queue behind the training step."""
  xp = postprocess.array_module(pixels)
  ratio = pixels / xp.maximum(background, 1e-6)
  return -xp.log(xp.clip(ratio, _MIN_RATIO, _MAX_RATIO))


def encoder_input(crop_pixels, background):
  """What the cell encoder reads for crops [..., S, S, 3] of linear intensities and their background [..., 3]:
  the optical density, shifted and scaled to about zero mean and unit spread (NumPy or JAX arrays)."""
  density = optical_density(crop_pixels, background[..., None, None, :])
  return (density - _ENCODER_SHIFT) / _ENCODER_SCALE
