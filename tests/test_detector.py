"""The detector on a tiny configuration: output shapes under jit, eval mode, denoising queries that cannot leak
into the matching queries, and the self-attention mask that guarantees it."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from lld_jax.models import detector

NUM_CLASSES = 3
ATTRIBUTE_VALUES = (3, 2, 2, 2, 2, 2, 2)
NUM_QUERIES, GROUPS, MAX_TARGETS, LAYERS, SIZE = 8, 2, 3, 2, 64
NUM_DN = GROUPS * 2 * MAX_TARGETS
NUM_TOKENS = sum((SIZE // stride)**2 for stride in (8, 16, 32))

# The model runs in well under a second; compiling it is what costs time, and XLA's CPU backend optimizations
# take most of that (about 4x). Tests do not need fast code.
FAST_COMPILE = {'xla_backend_optimization_level': 0}

MODEL = detector.Detector(
    num_classes=NUM_CLASSES, attribute_values=ATTRIBUTE_VALUES, backbone_depth=18, backbone_norm='group_norm',
    backbone_width=8, hidden_dim=32, num_heads=2, ffn_dim=64, num_decoder_layers=LAYERS, num_queries=NUM_QUERIES,
    denoising_groups=GROUPS)


def _inputs(seed=0):
  rng = np.random.default_rng(seed)
  images = rng.normal(size=(1, SIZE, SIZE, 3)).astype(np.float32)
  image_mask = np.ones((1, SIZE, SIZE), np.float32)
  image_mask[:, :, 56:] = 0  # some padding on the right
  targets = dict(labels=np.array([[1, 2, 0]], np.int32),
                 boxes=np.array([[[0.3, 0.4, 0.1, 0.12], [0.6, 0.5, 0.08, 0.1], [0, 0, 0, 0]]], np.float32),
                 weight=np.array([[1.0, 1.0, 0.0]], np.float32))  # two cells and one padded slot
  return images, image_mask, targets


@functools.lru_cache(maxsize=None)
def _variables():
  """Variables with init's structure, filled with numpy (jax.random per kernel shape compiles slowly on CPU)."""
  images, image_mask, targets = _inputs()
  rngs = {'params': jax.random.PRNGKey(0), 'denoise': jax.random.PRNGKey(1)}
  shapes = jax.eval_shape(functools.partial(MODEL.init, train=True), rngs, images, image_mask, targets)
  rng = np.random.default_rng(0)

  def fill(path, leaf):
    name = path[-1].key
    if name == 'kernel' or name == 'classifier_kernel':
      fan_in = int(np.prod(leaf.shape[:-1]))
      value = rng.standard_normal(leaf.shape) / np.sqrt(fan_in)
    elif name == 'scale':
      value = rng.uniform(0.5, 1.5, leaf.shape)
    else:  # biases, embeddings, learned queries
      value = 0.1 * rng.standard_normal(leaf.shape)
    return jnp.asarray(value, leaf.dtype)

  return jax.tree_util.tree_map_with_path(fill, shapes)


@functools.partial(jax.jit, compiler_options=FAST_COMPILE)
def _train_apply(variables, images, image_mask, targets, rng):
  return MODEL.apply(variables, images, image_mask, targets, train=True, rngs={'denoise': rng})


@functools.lru_cache(maxsize=None)
def _train_outputs():
  images, image_mask, targets = _inputs()
  return _train_apply(_variables(), images, image_mask, targets, jax.random.PRNGKey(7))


def test_train_outputs_have_documented_shapes():
  outputs = _train_outputs()
  expected = {
      'pred_logits': (LAYERS, 1, NUM_QUERIES, NUM_CLASSES), 'pred_boxes': (LAYERS, 1, NUM_QUERIES, 4),
      'attribute_logits': (1, NUM_QUERIES, 7, 3), 'enc_logits': (1, NUM_QUERIES, NUM_CLASSES),
      'enc_boxes': (1, NUM_QUERIES, 4), 'dn_logits': (LAYERS, 1, NUM_DN, NUM_CLASSES),
      'dn_boxes': (LAYERS, 1, NUM_DN, 4), 'dn_attribute_logits': (1, MAX_TARGETS, 7, 3), 'dn_labels': (1, NUM_DN),
      'dn_target_index': (1, NUM_DN), 'dn_valid': (1, NUM_DN), 'dn_is_positive': (1, NUM_DN),
      'token_logits': (1, NUM_TOKENS, NUM_CLASSES), 'token_boxes': (1, NUM_TOKENS, 4),
      'token_centres': (1, NUM_TOKENS, 2), 'token_usable': (1, NUM_TOKENS)}
  assert {k: tuple(v.shape) for k, v in outputs.items()} == expected
  for name in ('pred_logits', 'pred_boxes', 'attribute_logits', 'enc_logits', 'enc_boxes', 'dn_logits', 'dn_boxes'):
    assert np.isfinite(np.asarray(outputs[name])).all(), name
  for name in ('pred_boxes', 'enc_boxes', 'dn_boxes'):
    assert ((outputs[name] >= 0) & (outputs[name] <= 1)).all(), name
  # Attribute values beyond each attribute's count are masked.
  attribute_logits = np.asarray(outputs['attribute_logits'])
  assert (attribute_logits[:, :, 1:, 2] <= -1e8).all()
  assert (attribute_logits[:, :, 0, :] > -1e8).all() and (attribute_logits[:, :, 1:, :2] > -1e8).all()
  # Denoising bookkeeping: group-major layout [group, positive/negative, target slot].
  _, _, targets = _inputs()
  np.testing.assert_array_equal(outputs['dn_target_index'][0], np.tile(np.arange(MAX_TARGETS), 2 * GROUPS))
  np.testing.assert_array_equal(outputs['dn_valid'][0], np.tile(targets['weight'][0] > 0, 2 * GROUPS))
  np.testing.assert_array_equal(outputs['dn_is_positive'][0],
                                np.tile(np.repeat([True, False], MAX_TARGETS), GROUPS))
  expected_labels = np.where(outputs['dn_is_positive'][0], np.tile(targets['labels'][0], 2 * GROUPS), -1)
  np.testing.assert_array_equal(outputs['dn_labels'][0], expected_labels)


def test_eval_mode_has_no_denoising_outputs():
  images, image_mask, targets = _inputs()
  # Shapes only (tracing, no compile). Targets are passed (as evaluation may) but only train=True uses them.
  outputs = jax.eval_shape(lambda v, *a: MODEL.apply(v, *a, train=False), _variables(), images, image_mask, targets)
  assert {k: v.shape for k, v in outputs.items()} == {
      'pred_logits': (LAYERS, 1, NUM_QUERIES, NUM_CLASSES), 'pred_boxes': (LAYERS, 1, NUM_QUERIES, 4),
      'attribute_logits': (1, NUM_QUERIES, 7, 3), 'enc_logits': (1, NUM_QUERIES, NUM_CLASSES),
      'enc_boxes': (1, NUM_QUERIES, 4)}


def test_denoising_queries_do_not_leak_into_matching_queries():
  images, image_mask, targets = _inputs()
  variables = _variables()
  rng = jax.random.PRNGKey(7)
  base = _train_outputs()
  moved = dict(targets, boxes=targets['boxes'].copy())
  moved['boxes'][0, 1] = [0.2, 0.8, 0.15, 0.05]  # only the denoising queries see targets
  relabelled = dict(targets, labels=np.array([[0, 0, 1]], np.int32))
  for changed in (moved, relabelled):
    outputs = _train_apply(variables, images, image_mask, changed, rng)
    # The change did reach the denoising queries ...
    assert not np.allclose(outputs['dn_logits'], base['dn_logits'], atol=1e-4)
    # ... and nothing else.
    for name in ('pred_logits', 'pred_boxes', 'attribute_logits', 'enc_logits', 'enc_boxes'):
      np.testing.assert_allclose(outputs[name], base[name], atol=1e-5, rtol=1e-5, err_msg=name)
  # The comparison above relies on the same rng giving the same noise.
  again = _train_apply(variables, images, image_mask, targets, rng)
  np.testing.assert_array_equal(again['dn_boxes'], base['dn_boxes'])


def test_self_attention_mask():
  num_groups, per_group, num_matching = 2, 4, 3
  num_dn = num_groups * per_group
  dn_valid = jnp.array([[True, True, False, True, True, True, False, True]])
  attention_mask = jax.jit(detector.self_attention_mask, static_argnums=(0, 1, 2), compiler_options=FAST_COMPILE)
  mask = np.asarray(attention_mask(num_dn, num_groups, num_matching, dn_valid))
  assert mask.shape == (1, 1, num_dn + num_matching, num_dn + num_matching)
  mask = mask[0, 0]  # [query, key]
  group = np.repeat(np.arange(num_groups), per_group)
  # Matching queries see each other and no denoising query.
  assert mask[num_dn:, num_dn:].all()
  assert not mask[num_dn:, :num_dn].any()
  # Groups cannot see each other.
  dn_block = mask[:num_dn, :num_dn]
  assert not dn_block[group[:, None] != group[None, :]].any()
  # Inside a group: valid keys are visible; an invalid (padded) key only to itself.
  valid = np.asarray(dn_valid[0])
  same = group[:, None] == group[None, :]
  np.testing.assert_array_equal(dn_block[same & ~np.eye(num_dn, dtype=bool)],
                                np.broadcast_to(valid[None, :], (num_dn, num_dn))[same & ~np.eye(num_dn, dtype=bool)])
  assert np.diag(mask).all()  # every query sees itself (no all-masked softmax row)
  # Denoising queries may read the matching queries (DINO), which cannot affect the matching queries.
  assert mask[:num_dn, num_dn:].all()
  # Batched validity: one mask per image.
  two = attention_mask(num_dn, num_groups, num_matching, jnp.stack([dn_valid[0], ~dn_valid[0]]))
  assert two.shape == (2, 1, num_dn + num_matching, num_dn + num_matching)


def test_denoising_queries_noise_ranges():
  rng = np.random.default_rng(0)
  num_targets, groups = 4, 3
  boxes = np.concatenate([rng.uniform(0.3, 0.7, (2, num_targets, 2)), rng.uniform(0.05, 0.2, (2, num_targets, 2))],
                         -1).astype(np.float32)
  labels = rng.integers(0, 5, (2, num_targets)).astype(np.int32)
  valid = np.array([[True, True, True, False], [True, False, False, False]])
  noise = jax.jit(detector.denoising_queries, static_argnums=(4, 5), compiler_options=FAST_COMPILE)
  noised_labels, noised_boxes, target_index, dn_valid, positive = (np.asarray(x) for x in noise(
      jax.random.PRNGKey(0), labels, boxes, valid, groups, 5, 0.5, 1.0))
  num_dn = groups * 2 * num_targets
  assert noised_labels.shape == target_index.shape == dn_valid.shape == positive.shape == (2, num_dn)
  assert noised_boxes.shape == (2, num_dn, 4)
  assert ((noised_labels >= 0) & (noised_labels < 5)).all()
  np.testing.assert_array_equal(dn_valid, np.take_along_axis(valid, target_index, 1))
  # Corner displacement in units of half the box size: < 1 for positives, in [1, 2) for negatives (before
  # clipping to the image, which these central boxes never reach).
  target = np.take_along_axis(boxes, target_index[..., None], 1)
  to_xyxy = lambda b: np.concatenate([b[..., :2] - b[..., 2:] / 2, b[..., :2] + b[..., 2:] / 2], -1)  # noqa: E731
  half_wh = np.concatenate([target[..., 2:], target[..., 2:]], -1) / 2
  displacement = np.abs(to_xyxy(noised_boxes) - to_xyxy(target)) / half_wh
  assert (displacement[positive] < 1 + 1e-4).all()
  # A negative's corners can cross (x1 > x2); its width or height is then floored at 1e-3 (as DINO, which
  # clamps through inverse_sigmoid), so only uncrossed negatives keep the corner displacement.
  crossed = (noised_boxes[..., 2:] <= 1e-3 + 1e-7).any(-1)
  assert not crossed[positive].any()
  uncrossed_negative = ~positive & ~crossed
  assert uncrossed_negative.sum() > num_dn // 4
  assert (displacement[uncrossed_negative] >= 1 - 1e-4).all()
  assert (displacement[uncrossed_negative] < 2 + 1e-4).all()
  assert (displacement[~positive].max(-1) >= 1 - 1e-4).all()  # every negative moved at least one corner far
  # Zero noise reproduces the targets (and the labels, with zero label noise).
  clean_labels, clean_boxes, *_ = noise(jax.random.PRNGKey(0), labels, boxes, valid, groups, 5, 0.0, 0.0)
  np.testing.assert_array_equal(clean_labels, np.take_along_axis(labels, target_index, 1))
  np.testing.assert_allclose(clean_boxes, target, atol=1e-6)


def test_crop_cells_samples_each_box_with_its_margin():
  # Channel 0 holds each pixel's x index and channel 1 its y index: bilinear sampling of a linear ramp is exact,
  # so every crop pixel must read the continuous coordinate of its sampling point.
  height, width, crop, margin = 40, 60, 5, 0.25
  ys, xs = np.meshgrid(np.arange(height), np.arange(width), indexing='ij')
  images = np.stack([xs, ys, np.zeros_like(xs)], -1).astype(np.float32)[None]
  boxes = np.array([[[0.5, 0.5, 0.4, 0.3], [0.3, 0.6, 0.2, 0.5]]], np.float32)
  crops = np.asarray(jax.jit(detector.crop_cells, static_argnums=(2, 3), compiler_options=FAST_COMPILE)(
      images, boxes, crop, margin))
  assert crops.shape == (1, 2, crop, crop, 3)
  steps = ((np.arange(crop) + 0.5) / crop - 0.5) * (1 + 2 * margin)
  for n, (cx, cy, w, h) in enumerate(boxes[0]):
    expected_x = (cx + steps * w) * width - 0.5
    expected_y = (cy + steps * h) * height - 0.5
    np.testing.assert_allclose(crops[0, n, :, :, 0], np.broadcast_to(expected_x[None, :], (crop, crop)), atol=1e-4)
    np.testing.assert_allclose(crops[0, n, :, :, 1], np.broadcast_to(expected_y[:, None], (crop, crop)), atol=1e-4)


CELL_MODEL = MODEL.clone(input_stride=2, cell_crop_size=8, cell_class_refinement=True)


def test_cell_crops_refine_only_the_last_layer_classes():
  images, image_mask, targets = _inputs()
  rngs = {'params': jax.random.PRNGKey(0), 'denoise': jax.random.PRNGKey(1)}
  init = jax.jit(functools.partial(CELL_MODEL.init, train=True), compiler_options=FAST_COMPILE)
  variables = init(rngs, images, image_mask, targets)
  refinement = variables['params']['attribute_head']['class_refinement']
  # Zero at initialization, so the refinement starts as the decoder's own classes.
  assert not np.asarray(refinement['kernel']).any()
  apply = jax.jit(lambda v: CELL_MODEL.apply(v, images, image_mask, targets, train=True,
                                             rngs={'denoise': jax.random.PRNGKey(7)}), compiler_options=FAST_COMPILE)
  base = apply(variables)
  # The backbone reads the image at half resolution: its tokens are those of a 32 px input.
  assert base['token_logits'].shape == (1, sum((SIZE // 2 // s)**2 for s in (8, 16, 32)), NUM_CLASSES)
  assert base['attribute_logits'].shape == (1, NUM_QUERIES, 7, 3)
  changed = jax.tree_util.tree_map(lambda x: x, variables)
  # (a constant kernel would sum a layer-normalized vector, which is zero)
  changed['params']['attribute_head']['class_refinement']['kernel'] = jax.random.normal(
      jax.random.PRNGKey(3), refinement['kernel'].shape)
  outputs = apply(changed)
  for name in ('pred_logits', 'dn_logits'):
    np.testing.assert_allclose(outputs[name][:-1], base[name][:-1], atol=1e-6, err_msg=name)
  assert not np.allclose(outputs['pred_logits'][-1], base['pred_logits'][-1], atol=1e-3)
  # Among the denoising queries only the first group's positive copies (the ones the head reads) change.
  moved = ~np.isclose(np.asarray(outputs['dn_logits'][-1]), np.asarray(base['dn_logits'][-1]), atol=1e-4).all(-1)
  np.testing.assert_array_equal(moved[0], np.arange(NUM_DN) < MAX_TARGETS)


def test_denoising_cells_read_at_true_boxes_ignore_the_box_noise():
  """The cell classifier sees only its crop: read at the true boxes, the denoising copies' class logits are the
  same whatever the box noise; read at their refined (noised) boxes, they move with it."""
  images, image_mask, targets = _inputs()
  rngs = {'params': jax.random.PRNGKey(0), 'denoise': jax.random.PRNGKey(1)}
  for at_true_boxes in (True, False):
    model = CELL_MODEL.clone(dn_cells_at_true_boxes=at_true_boxes)
    variables = jax.jit(functools.partial(model.init, train=True), compiler_options=FAST_COMPILE)(
        rngs, images, image_mask, targets)
    apply = jax.jit(lambda v, rng, model=model: model.apply(v, images, image_mask, targets, train=True,
                                                           rngs={'denoise': rng}), compiler_options=FAST_COMPILE)
    first, second = (apply(variables, jax.random.PRNGKey(seed)) for seed in (5, 6))
    real = targets['weight'][0] > 0
    assert not np.allclose(first['dn_boxes'][-1], second['dn_boxes'][-1], atol=1e-3)  # the noise differs
    same = np.allclose(first['dn_cell_class_logits'][0, real], second['dn_cell_class_logits'][0, real], atol=1e-5)
    assert same == at_true_boxes


def test_cell_crops_need_the_query_attribute_head():
  images, image_mask, _ = _inputs()
  model = MODEL.clone(attribute_head='mlp', cell_crop_size=8)
  with np.testing.assert_raises_regex(ValueError, 'attribute_head=query'):
    jax.eval_shape(functools.partial(model.init, train=False), {'params': jax.random.PRNGKey(0)}, images, image_mask)


def test_cell_class_flips_average_the_classifier_over_the_flipped_crops():
  """With `cell_class_flips`, evaluation's cell-class logits are the mean log-probabilities of the classifier on
  each query's crop and its three flips; nothing else moves."""
  images, image_mask, targets = _inputs()
  rngs = {'params': jax.random.PRNGKey(0), 'denoise': jax.random.PRNGKey(1)}
  variables = jax.jit(functools.partial(CELL_MODEL.init, train=True), compiler_options=FAST_COMPILE)(
      rngs, images, image_mask, targets)
  flipping = CELL_MODEL.clone(cell_class_flips=True)
  evaluate = {model: jax.jit(functools.partial(model.apply, train=False), compiler_options=FAST_COMPILE)
              for model in (CELL_MODEL, flipping)}
  plain, flipped = (evaluate[model](variables, images, image_mask) for model in (CELL_MODEL, flipping))
  for name in ('pred_logits', 'pred_boxes', 'attribute_logits'):
    np.testing.assert_allclose(flipped[name], plain[name], atol=1e-6, err_msg=name)

  params = variables['params']
  crops = detector.crop_cells(images, plain['pred_boxes'][-1], CELL_MODEL.cell_crop_size)
  encoder = detector.CellCropEncoder(CELL_MODEL.hidden_dim)
  classifier = detector.CellClassifier(NUM_CLASSES)
  views = [crops, crops[:, :, :, ::-1], crops[:, :, ::-1], crops[:, :, ::-1, ::-1]]
  log_probs = [jax.nn.log_softmax(classifier.apply({'params': params['cell_classifier']}, encoder.apply(
      {'params': params['cell_encoder']}, view))) for view in views]
  np.testing.assert_allclose(plain['cell_class_logits'], classifier.apply(
      {'params': params['cell_classifier']}, encoder.apply({'params': params['cell_encoder']}, crops)), atol=1e-4)
  np.testing.assert_allclose(flipped['cell_class_logits'], np.mean(log_probs, 0), atol=1e-4)
  assert not np.allclose(jax.nn.log_softmax(plain['cell_class_logits']), flipped['cell_class_logits'], atol=1e-3)


def test_cell_size_features_are_the_boxes_in_original_pixels_whatever_the_jitter():
  boxes = np.array([[[0.5, 0.5, 0.25, 0.5], [0.2, 0.3, 0.1, 0.05]]], np.float32)
  canvas, scale = 64, np.array([0.5], np.float32)  # the canvas is half the original image's size
  features = np.asarray(detector.cell_size_features(boxes, canvas, scale))
  np.testing.assert_allclose(features, np.log(boxes[..., 2:] * canvas / 0.5 / 64.0), rtol=1e-6)
  # Scale jitter of 1.2 makes the boxes 1.2 times larger on the canvas and the scale 1.2 times larger.
  jittered = boxes.copy()
  jittered[..., 2:] *= 1.2
  np.testing.assert_allclose(detector.cell_size_features(jittered, canvas, scale * 1.2), features, atol=1e-6)


def test_attribute_box_size_reads_the_pixel_scale():
  """Only the attribute queries read the size: not the boxes, nor the class refinement query."""
  images, image_mask, targets = _inputs()
  model = CELL_MODEL.clone(attribute_box_size=True)
  rngs = {'params': jax.random.PRNGKey(0), 'denoise': jax.random.PRNGKey(1)}
  scale = np.array([1.0], np.float32)
  variables = jax.jit(functools.partial(model.init, train=True), compiler_options=FAST_COMPILE)(
      rngs, images, image_mask, targets, pixel_scale=scale)
  head = variables['params']['attribute_head']
  assert head['box_size']['kernel'].shape == (2, MODEL.hidden_dim)
  # Zero at initialization: a random refinement kernel makes the class query's reading visible in the logits.
  refinement = head['class_refinement']
  refinement['kernel'] = jax.random.normal(jax.random.PRNGKey(3), refinement['kernel'].shape)
  evaluate = jax.jit(functools.partial(model.apply, train=False), compiler_options=FAST_COMPILE)
  near, far = (evaluate(variables, images, image_mask, pixel_scale=s) for s in (scale, scale * 4))
  for name in ('pred_boxes', 'pred_logits'):
    np.testing.assert_allclose(near[name], far[name], atol=1e-5, err_msg=name)
  assert not np.allclose(near['attribute_logits'], far['attribute_logits'], atol=1e-4)
  with np.testing.assert_raises_regex(ValueError, 'pass pixel_scale'):
    jax.eval_shape(functools.partial(model.apply, train=False), variables, images, image_mask)


@pytest.mark.parametrize('branch_widths', [(), (8, 8)])
def test_cell_attribute_classifier_adds_to_the_attribute_head_and_reads_the_crops_sizes(branch_widths):
  images, image_mask, targets = _inputs()
  model = CELL_MODEL.clone(attribute_box_size=True, cell_attribute_classifier=True,
                           cell_attribute_branch_widths=branch_widths)
  crops = np.random.default_rng(1).normal(size=(1, 3, 8, 8, 3)).astype(np.float32)
  box_pixels = np.full((1, 3, 2), 40.0, np.float32)
  scale = np.array([1.0], np.float32)
  extra = dict(cell_crops=crops, pixel_scale=scale, cell_crop_box_pixels=box_pixels)
  rngs = {'params': jax.random.PRNGKey(0), 'denoise': jax.random.PRNGKey(1)}
  variables = jax.jit(functools.partial(model.init, train=True), compiler_options=FAST_COMPILE)(
      rngs, images, image_mask, targets, **extra)
  train = jax.jit(functools.partial(model.apply, train=True, rngs={'denoise': jax.random.PRNGKey(2)}),
                  compiler_options=FAST_COMPILE)
  out = train(variables, images, image_mask, targets, **extra)
  num_values = np.asarray(MODEL.attribute_values)
  logits = np.asarray(out['crop_attribute_logits'])
  assert logits.shape == (1, 3, len(num_values), num_values.max())
  allowed = np.arange(num_values.max())[None] < num_values[:, None]
  assert (logits[..., ~allowed] <= -1e8).all() and (np.abs(logits[..., allowed]) < 1e3).all()
  larger = train(variables, images, image_mask, targets, **{**extra, 'cell_crop_box_pixels': box_pixels * 3})
  assert not np.allclose(larger['crop_attribute_logits'], logits, atol=1e-4)
  np.testing.assert_array_equal(larger['crop_class_logits'], out['crop_class_logits'])
  # With the classifier's weights at zero, the detections' attribute logits are the attribute head's alone.
  silent = jax.tree_util.tree_map(np.zeros_like, variables['params']['cell_attribute_classifier'])
  without = {'params': {k: v for k, v in variables['params'].items() if k != 'cell_attribute_classifier'}}
  def evaluation(m):
    apply = jax.jit(functools.partial(m.apply, train=False), compiler_options=FAST_COMPILE)
    return lambda v: np.asarray(apply(v, images, image_mask, pixel_scale=scale)['attribute_logits'])
  head_only = evaluation(CELL_MODEL.clone(attribute_box_size=True))(without)
  evaluate = evaluation(model)  # one compilation for both sets of weights
  summed = evaluate({'params': {**variables['params'], 'cell_attribute_classifier': silent}})
  np.testing.assert_allclose(summed[..., allowed], head_only[..., allowed], atol=1e-5)
  assert not np.allclose(evaluate(variables)[..., allowed], head_only[..., allowed], atol=1e-4)


def test_cell_attribute_branches_give_each_attribute_its_own_cnn():
  """Each attribute's logits come from its own branch alone (its channels of the branches' shared first
  convolution, then its own layers), and the branches go on from the crop encoder's feature map after
  `cell_attribute_branch_stage` convolutions."""
  num_values = MODEL.attribute_values
  encoder = detector.CellCropEncoder(16, branch_stage=2)
  crops = np.random.default_rng(0).normal(size=(2, 3, 8, 8, 3)).astype(np.float32)
  encoder_params = encoder.init(jax.random.PRNGKey(0), crops)
  tokens, stage = encoder.apply(encoder_params, crops)
  np.testing.assert_array_equal(tokens, detector.CellCropEncoder(16).apply(encoder_params, crops))
  assert stage.shape == (2, 3, 4, 4, 32)  # the first convolution at stride 1, the second at stride 2
  classifier = detector.CellAttributeClassifier(num_values, branch_widths=(8, 8))
  sizes = np.zeros((2, 3, 2), np.float32)
  params = classifier.init(jax.random.PRNGKey(1), stage, sizes)['params']
  assert params['branches_conv0']['kernel'].shape == (3, 3, 32, 8 * len(num_values))
  logits = np.asarray(classifier.apply({'params': params}, stage, sizes))
  assert logits.shape == (2, 3, len(num_values), max(num_values))
  allowed = np.arange(max(num_values))[None] < np.asarray(num_values)[:, None]
  assert (logits[..., ~allowed] <= -1e8).all()
  others = np.arange(len(num_values)) != 3
  rng = np.random.default_rng(2)  # random changes: a group norm would undo a constant one

  def moved(change):
    p = jax.tree_util.tree_map(np.array, params)
    change(p)
    return np.asarray(classifier.apply({'params': p}, stage, sizes))

  def first_convolution(p):  # the fourth branch's channels
    p['branches_conv0']['kernel'][..., 8 * 3:8 * 4] += rng.normal(size=(3, 3, 32, 8))

  def second_convolution(p):
    kernel = p['branch3_conv1']['Conv_0']['kernel']
    kernel += rng.normal(size=kernel.shape)

  def classifier_weights(p):
    p['branch3_dense']['kernel'] += rng.normal(size=p['branch3_dense']['kernel'].shape)

  for change in (first_convolution, second_convolution, classifier_weights):
    changed = moved(change)
    np.testing.assert_array_equal(changed[:, :, others], logits[:, :, others])
    assert not np.allclose(changed[:, :, 3][..., allowed[3]], logits[:, :, 3][..., allowed[3]])


def test_cell_attribute_branches_leave_the_crop_encoder_inside_it():
  images, image_mask, _ = _inputs()
  model = CELL_MODEL.clone(cell_attribute_classifier=True, cell_attribute_branch_widths=(8, 8),
                           cell_attribute_branch_stage=5)
  with pytest.raises(ValueError, match='cell_attribute_branch_stage=5: .* 1 to 4'):
    jax.eval_shape(functools.partial(model.init, train=False), jax.random.PRNGKey(0), images, image_mask)
