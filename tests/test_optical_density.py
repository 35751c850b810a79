"""Optical density against the field's background: the estimate of the background, and what the cell encoder
reads from it."""

import numpy as np
import pytest

from lld_jax import input_pipeline
from lld_jax import optical_density
from lld_jax.models import detector

BACKGROUND = np.array([0.75, 0.70, 0.62], np.float32)
CELL_DENSITY = np.array([0.9, 0.8, 0.4], np.float32)  # a violet nucleus


def _field(height, width, cells, seed=0):
  """A lit field [H, W, 3]: the background dimming from left to right (vignetting, lamp), noise, and round cells
  of CELL_DENSITY at (x, y, radius) in pixels. Returns the field and its true background [H, W, 3]."""
  ys, xs = np.mgrid[:height, :width].astype(np.float32)
  light = 1.0 - 0.3 * xs / width
  background = light[..., None] * BACKGROUND
  density = np.zeros((height, width, 3), np.float32)
  for x, y, r in cells:
    density[(xs - x) ** 2 + (ys - y) ** 2 <= r * r] = CELL_DENSITY
  noise = np.random.default_rng(seed).normal(0, 0.005, (height, width, 3)).astype(np.float32)
  return background * np.exp(-density) + noise, background


@pytest.mark.parametrize('height,width', [(224, 224), (150, 200)])
def test_background_under_a_cell_is_the_fields_own(height, width):
  """Where a cell fills its tile, the estimate comes from the tiles around it: within 5 % of the true background,
  which dims by 30 % across the field (the brightest neighbour is a tile's width towards the light)."""
  cells = [(30, 40, 14), (110, 75, 16), (width - 25, height - 30, 12)]
  field, background = _field(height, width, cells)
  centres = np.array([[[x / width, y / height] for x, y, _ in cells]], np.float32)
  estimate = np.asarray(optical_density.background_at(field[None], centres))[0]
  truth = np.stack([background[y, x] for x, y, _ in cells])
  np.testing.assert_allclose(estimate, truth, rtol=0.05)


def test_optical_density_is_beer_lambert():
  pixels = np.array([[0.5, 0.25, 0.75]], np.float32)
  np.testing.assert_allclose(np.asarray(optical_density.optical_density(pixels, BACKGROUND)),
                             -np.log(pixels / BACKGROUND), rtol=1e-6)
  # Black (padding) and over-bright pixels are clipped, not infinite.
  extreme = np.asarray(optical_density.optical_density(np.array([0.0, 1.0, 0.7]), BACKGROUND))
  np.testing.assert_allclose(extreme, [np.log(255.0), -np.log(1.25), -np.log(0.7 / 0.62)], rtol=1e-6)


def _normalized(pixels):
  normalized = (pixels - np.asarray(input_pipeline.IMAGENET_MEAN)) / np.asarray(input_pipeline.IMAGENET_STD)
  return normalized.astype(np.float32)


def test_encoder_crops_ignore_the_lamps_colour():
  """A colour cast of the whole field (another lamp, another camera) changes the intensities the encoder would
  read, not the optical density: what it reads of a cell is the stain alone."""
  cells = [(60, 70, 15), (150, 140, 18)]
  field, _ = _field(224, 224, cells)
  cast = field * np.array([1.08, 0.97, 0.85], np.float32)
  boxes = np.array([[[x / 224, y / 224, 2.4 * r / 224, 2.4 * r / 224] for x, y, r in cells]], np.float32)
  read = {name: [np.asarray(detector.cell_encoder_crops(_normalized(f)[None], boxes, 16, name)) for f in (field, cast)]
          for name in detector.CELL_CROP_PIXELS}
  plain, lit = read['optical_density']
  np.testing.assert_allclose(lit, plain, atol=0.02)
  assert np.abs(read['intensity'][1] - read['intensity'][0]).max() > 0.3  # the intensities do move
  # At the cell's centre the encoder reads the cell's density, shifted and scaled as encoder_input says.
  centre = plain[0, :, 7:9, 7:9].mean((1, 2))
  expected = (CELL_DENSITY - optical_density._ENCODER_SHIFT) / optical_density._ENCODER_SCALE
  np.testing.assert_allclose(centre, np.broadcast_to(expected, centre.shape), atol=0.15)


def test_unknown_crop_pixels_fail():
  with pytest.raises(ValueError, match='unknown cell crop pixels'):
    detector.cell_encoder_crops(np.zeros((1, 28, 28, 3), np.float32), np.full((1, 1, 4), 0.5, np.float32), 8, 'hsv')
