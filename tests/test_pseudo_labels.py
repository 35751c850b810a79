"""Pseudo-labels: only outside the annotated region, never over a labelled cell, with the configured weight,
and none during the warm-up."""

import functools

import jax
import jax.numpy as jnp
import numpy as np

from configs import synthetic_demo
from lld_jax import pseudo_labels
from lld_jax import sharding
from lld_jax import train_step
from tfds_lld import lld_format

K, A, V = 3, 7, 3


def _scene(seed=0, num_queries=40, num_targets=4):
  rng = np.random.default_rng(seed)
  centres = rng.uniform(0.05, 0.95, (1, num_queries, 2))
  sizes = rng.uniform(0.03, 0.1, (1, num_queries, 2))
  teacher_boxes = np.concatenate([centres, sizes], -1).astype(np.float32)
  teacher_logits = rng.normal(0, 4, (1, num_queries, K)).astype(np.float32)
  teacher_attributes = rng.normal(0, 1, (1, num_queries, A, V)).astype(np.float32)
  mask = np.zeros((1, 16, 16), np.float32)
  mask[:, :, :8] = 1.0  # left half annotated
  # Labelled cells inside the region; the first one also copied as a confident teacher box.
  target_boxes = np.array([[[0.2, 0.3, 0.08, 0.08], [0.3, 0.7, 0.08, 0.08], [0.1, 0.5, 0.05, 0.05],
                            [0, 0, 0, 0]]], np.float32)[:, :num_targets]
  targets = {'labels': np.array([[0, 1, 2, 0]], np.int32), 'boxes': target_boxes,
             'attributes': np.full((1, num_targets, A), -1, np.int32),
             'weight': np.array([[1, 1, 1, 0]], np.float32), 'annotation_mask': mask}
  # A confident teacher box that straddles the region border over a labelled cell (centre outside, overlaps).
  teacher_boxes[0, 0] = [0.52, 0.3, 0.2, 0.1]
  targets['boxes'][0, 0] = [0.45, 0.3, 0.12, 0.1]
  teacher_logits[0, 0] = [9.0, -9.0, -9.0]
  return teacher_logits, teacher_boxes, teacher_attributes, targets


def _select(step, seed=0, without_region=False, **overrides):
  logits, boxes, attributes, targets = _scene(seed)
  if without_region:  # a field whose label file is empty: no region, no labelled cell
    targets = {**targets, 'annotation_mask': np.zeros_like(targets['annotation_mask']),
               'weight': np.zeros_like(targets['weight'])}
  kwargs = dict(threshold=0.9, weight=0.1, warmup_steps=100, max_pseudo=8)
  kwargs.update(overrides)
  out = jax.jit(lambda l, b, a, t, s: pseudo_labels.select(jax.nn.sigmoid(l), b, a, t, s, **kwargs))(
      logits, boxes, attributes, targets, jnp.asarray(step))
  return jax.device_get(out), targets, logits, boxes


def test_pseudo_labels_only_outside_region_and_off_labelled_cells():
  for seed in range(5):
    out, targets, logits, _ = _select(step=1000, seed=seed)
    num_real = targets['labels'].shape[1]
    chosen = out['is_pseudo'][0, num_real:]
    assert chosen.any(), 'the scene has confident detections outside the region'
    pseudo_boxes = out['boxes'][0, num_real:][chosen]
    # Centre x >= 0.5 is outside the annotated left half.
    assert np.all(pseudo_boxes[:, 0] >= 0.5)
    # The straddling box over the labelled cell is never used.
    assert not np.any(np.all(np.isclose(pseudo_boxes, [0.52, 0.3, 0.2, 0.1]), axis=-1))
    # Real targets are untouched.
    np.testing.assert_array_equal(out['boxes'][0, :num_real], targets['boxes'][0])
    assert not out['is_pseudo'][0, :num_real].any()


def test_pseudo_labels_have_the_configured_weight_and_score():
  out, targets, logits, boxes = _select(step=1000, weight=0.25)
  num_real = targets['labels'].shape[1]
  chosen = out['is_pseudo'][0, num_real:]
  np.testing.assert_allclose(out['weight'][0, num_real:][chosen], 0.25)
  np.testing.assert_array_equal(out['weight'][0, num_real:][~chosen], 0.0)
  # Every chosen label is the teacher's confident class (score above the threshold).
  scores = 1 / (1 + np.exp(-logits[0]))
  for box, label in zip(out['boxes'][0, num_real:][chosen], out['labels'][0, num_real:][chosen]):
    query = np.argmin(np.abs(boxes[0] - box).sum(-1))
    assert scores[query].max() > 0.9 and scores[query].argmax() == label
  # Attributes stay "not applicable" unless asked for.
  assert np.all(out['attributes'][0, num_real:] == -1)


def test_pseudo_labels_on_images_without_region_only_when_allowed():
  def num_pseudo(without_region, allowed):
    out, targets, _, _ = _select(step=1000, without_region=without_region, on_images_without_region=allowed)
    return int(out['is_pseudo'][0, targets['labels'].shape[1]:].sum())

  assert num_pseudo(without_region=True, allowed=True) > 0
  assert num_pseudo(without_region=True, allowed=False) == 0
  # A field that has a region still gets them in the rest of its field.
  assert num_pseudo(without_region=False, allowed=False) > 0


def test_no_pseudo_labels_during_warmup():
  out, targets, _, _ = _select(step=99)
  assert not out['is_pseudo'].any()
  assert np.all(out['weight'][0, targets['labels'].shape[1]:] == 0)


def test_one_pseudo_label_per_cell_among_duplicate_teacher_boxes():
  logits, boxes, attributes, targets = _scene(seed=1)
  logits[0, 1:] = -9.0  # only the queries set below are confident
  # Three queries answer the same unlabelled cell (right half), a fourth a separate one.
  boxes[0, 1:5] = [[0.80, 0.40, 0.10, 0.10], [0.805, 0.40, 0.10, 0.10], [0.80, 0.405, 0.10, 0.10],
                   [0.70, 0.80, 0.08, 0.08]]
  logits[0, 1:5] = [[-9.0, 6.0, -9.0], [-9.0, 8.0, -9.0], [5.0, -9.0, -9.0], [-9.0, -9.0, 7.0]]

  def select(duplicate_iou):
    out = jax.jit(lambda l, b, a, t: pseudo_labels.select(
        jax.nn.sigmoid(l), b, a, t, jnp.asarray(1000), threshold=0.9, weight=0.1, warmup_steps=100, max_pseudo=8,
        duplicate_iou=duplicate_iou))(logits, boxes, attributes, targets)
    num_real = targets['labels'].shape[1]
    chosen = np.asarray(out['is_pseudo'][0, num_real:])
    return np.asarray(out['boxes'][0, num_real:])[chosen], np.asarray(out['labels'][0, num_real:])[chosen]

  kept_boxes, kept_labels = select(duplicate_iou=0.5)
  order = np.argsort(kept_boxes[:, 0])
  np.testing.assert_allclose(kept_boxes[order], [[0.70, 0.80, 0.08, 0.08], [0.805, 0.40, 0.10, 0.10]])
  np.testing.assert_array_equal(kept_labels[order], [2, 1])  # the most confident of the three duplicates
  assert len(select(duplicate_iou=1.0)[0]) == 4  # without the suppression every duplicate becomes a label


def test_pseudo_labels_in_the_pmapped_train_step_start_after_warmup():
  """On 2 devices: none before `warmup_steps`; then the teacher's distinct boxes in the unlabelled right half."""
  config = synthetic_demo.get_config()
  config.image_size, config.per_device_batch_size, config.max_objects = 64, 1, 4
  config.model.update(backbone_width=8, hidden_dim=32, num_heads=2, ffn_dim=64, num_decoder_layers=1,
                      num_queries=12, denoising_groups=1, roi_size=3, cell_crop_size=8)
  config.pseudo_labels.update(enabled=True, threshold=0.0, warmup_steps=2, max_per_image=4)
  devices = jax.local_devices()
  batch = train_step.random_batch(config, len(devices), lld_format.NUM_CLASSES)
  batch['annotation_mask'][..., config.image_size // 16:] = 0.0  # only the left half is annotated
  batch['boxes'][..., 0] = np.clip(batch['boxes'][..., 0] / 2 - 0.1, 0.1, 0.35)  # labelled cells inside it
  model = train_step.create_model(config, lld_format.NUM_CLASSES)
  state, tx = train_step.create_train_state(model, config, jax.random.PRNGKey(0))
  step = jax.pmap(functools.partial(train_step.train_step, model=model, tx=tx, config=config),
                  axis_name=train_step.AXIS, devices=devices)
  replicated, on_devices = sharding.replicate(state, devices), sharding.shard(batch, devices)
  counts = []
  for _ in range(4):
    replicated, metrics = step(replicated, on_devices)
    assert np.isfinite(float(metrics['loss'][0]))
    counts.append(int(metrics['num_pseudo_labels'][0]))
  assert counts[:2] == [0, 0], counts
  most = len(devices) * config.per_device_batch_size * config.pseudo_labels.max_per_image
  assert all(0 < count <= most for count in counts[2:]), counts
