"""The cell detector: ResNet backbone, RT-DETR-style hybrid encoder, deformable decoder with iterative box
refinement, two-stage query selection, contrastive denoising queries and attribute queries.

Why these pieces: vanilla DETR needs hundreds of epochs. Deformable attention around anchor boxes (Deformable
DETR, DAB-DETR), encoder-selected initial queries (two-stage, RT-DETR), and denoising groups (DN-DETR, DINO)
each cut that by an order of magnitude, which is what makes training on small data and few devices possible.
White cells on 10x fields are 6-12 px, so the decoder reads stride-8 features; attributes such as nucleoli and
chromatin are small details, so each attribute query reads RoI-aligned stride-8 features inside its cell's box
and, with `cell_crop_size`, tokens of a small CNN over the cell's own input pixels. With `input_stride` 2 the
backbone reads a half-resolution copy, so those pixels cost no backbone compute; with `cell_class_refinement` one
more query reads them and corrects the last layer's class logits.

Outputs (L decoder layers, Q matching queries, D denoising queries, K classes, A attributes, V values):
  pred_logits [L, B, Q, K], pred_boxes [L, B, Q, 4] (normalized cxcywh), attribute_logits [B, Q, A, V],
  enc_logits [B, Q, K], enc_boxes [B, Q, 4] (two-stage proposals); when training, also every encoder token's
  token_logits [B, N, K], token_boxes [B, N, 4], token_centres [B, N, 2] and token_usable [B, N] (not padding),
  and with denoising: dn_logits [L, B, D, K], dn_boxes [L, B, D, 4], dn_attribute_logits [B, T, A, V] (the
  first group's positive copies, i.e. denoising queries 0..T-1, T = target slots),
  dn_labels [B, D] (-1 = no object), dn_target_index [B, D], dn_valid [B, D], dn_is_positive [B, D].
"""

from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from lld_jax import boxes as box_ops
from lld_jax import optical_density
from lld_jax.models import resnet
from lld_jax.models.deformable_attention import MultiScaleDeformableAttention
from lld_jax.models.deformable_attention import bilinear_sample

_NEG_INF = -1e9


def sine_position_embedding(mask, dim, temperature=10000.0):
  """2-D sine embedding [B, H, W, dim] of cumulative valid-pixel coordinates, so padding does not shift it."""
  y = jnp.cumsum(mask, axis=1, dtype=jnp.float32)
  x = jnp.cumsum(mask, axis=2, dtype=jnp.float32)
  y = (y - 0.5) / (y[:, -1:, :] + 1e-6) * 2 * np.pi
  x = (x - 0.5) / (x[:, :, -1:] + 1e-6) * 2 * np.pi
  return jnp.concatenate([_sine(x, dim // 2, temperature), _sine(y, dim // 2, temperature)], axis=-1)


def _sine(coordinate, dim, temperature):
  frequencies = temperature ** (2 * (jnp.arange(dim // 2, dtype=jnp.float32)) / dim)
  angles = coordinate[..., None] / frequencies
  return jnp.concatenate([jnp.sin(angles), jnp.cos(angles)], axis=-1)


def box_sine_embedding(boxes, dim):
  """Sine embedding [..., 4 * dim/4] of normalized cxcywh boxes (DAB-DETR's positional query)."""
  return jnp.concatenate([_sine(boxes[..., i] * 2 * np.pi, dim // 4, 10000.0) for i in range(4)], axis=-1)


class MLP(nn.Module):
  hidden_dim: int
  output_dim: int
  num_layers: int
  dtype: jnp.dtype = jnp.float32
  zero_last: bool = False

  @nn.compact
  def __call__(self, x):
    for i in range(self.num_layers - 1):
      x = nn.relu(nn.Dense(self.hidden_dim, dtype=self.dtype, name=f'layer{i}')(x))
    kernel_init = nn.initializers.zeros if self.zero_last else nn.initializers.lecun_normal()
    return nn.Dense(self.output_dim, dtype=self.dtype, kernel_init=kernel_init,
                    name=f'layer{self.num_layers - 1}')(x)


class ConvNorm(nn.Module):
  features: int
  kernel: int = 1
  stride: int = 1
  activation: bool = True
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    pad = self.kernel // 2
    x = nn.Conv(self.features, (self.kernel, self.kernel), (self.stride, self.stride),
                padding=((pad, pad), (pad, pad)), use_bias=False, dtype=self.dtype)(x)
    x = nn.GroupNorm(num_groups=min(32, self.features // 4), dtype=self.dtype)(x)
    return nn.silu(x) if self.activation else x


class FusionBlock(nn.Module):
  """Fuses two same-resolution maps (concatenated) with a residual stack of 3x3 convolutions."""
  features: int
  depth: int = 2
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    x = ConvNorm(self.features, 1, dtype=self.dtype)(x)
    for _ in range(self.depth):
      x = x + ConvNorm(self.features, 3, dtype=self.dtype)(x)
    return x


class TransformerEncoderLayer(nn.Module):
  hidden_dim: int
  num_heads: int
  ffn_dim: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, tokens, position, valid):
    attention_mask = valid[:, None, None, :]
    attended = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype)(
        tokens + position, tokens + position, tokens, mask=attention_mask)
    tokens = nn.LayerNorm(dtype=self.dtype)(tokens + attended)
    hidden = nn.Dense(self.ffn_dim, dtype=self.dtype)(tokens)
    tokens = nn.LayerNorm(dtype=self.dtype)(tokens + nn.Dense(self.hidden_dim, dtype=self.dtype)(nn.gelu(hidden)))
    return tokens


class HybridEncoder(nn.Module):
  """Self-attention within the coarsest level, then top-down (FPN) and bottom-up (PAN) fusion to stride 8."""
  hidden_dim: int
  num_heads: int
  ffn_dim: int
  num_encoder_layers: int = 1
  fusion_depth: int = 2
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, features: Sequence[jnp.ndarray], masks: Sequence[jnp.ndarray]):
    """features: [stride8, stride16, stride32] maps; masks: matching [B, H, W] padding masks."""
    levels = [ConvNorm(self.hidden_dim, 1, activation=False, dtype=self.dtype, name=f'input_proj{i}')(f)
              for i, f in enumerate(features)]
    coarse = levels[-1]
    batch, h, w, c = coarse.shape
    position = sine_position_embedding(masks[-1], self.hidden_dim).reshape(batch, h * w, c).astype(self.dtype)
    tokens = coarse.reshape(batch, h * w, c)
    for i in range(self.num_encoder_layers):
      tokens = TransformerEncoderLayer(self.hidden_dim, self.num_heads, self.ffn_dim, self.dtype,
                                       name=f'coarse_attention{i}')(tokens, position, masks[-1].reshape(batch, -1))
    levels[-1] = tokens.reshape(batch, h, w, c)
    # Top-down: coarse context flows to stride 8.
    top_down = [levels[-1]]
    for i in range(len(levels) - 2, -1, -1):
      upper = ConvNorm(self.hidden_dim, 1, dtype=self.dtype, name=f'lateral{i}')(top_down[0])
      target_shape = levels[i].shape[:3] + (upper.shape[-1],)
      upsampled = jax.image.resize(upper, target_shape, 'nearest')
      top_down.insert(0, FusionBlock(self.hidden_dim, self.fusion_depth, dtype=self.dtype, name=f'fpn{i}')(
          jnp.concatenate([upsampled, levels[i]], -1)))
    # Bottom-up: fine detail flows back to the coarse levels.
    outputs = [top_down[0]]
    for i in range(1, len(levels)):
      down = ConvNorm(self.hidden_dim, 3, stride=2, dtype=self.dtype, name=f'downsample{i}')(outputs[-1])
      down = down[:, :top_down[i].shape[1], :top_down[i].shape[2]]
      outputs.append(FusionBlock(self.hidden_dim, self.fusion_depth, dtype=self.dtype, name=f'pan{i}')(
          jnp.concatenate([down, top_down[i]], -1)))
    return outputs


class DecoderLayer(nn.Module):
  hidden_dim: int
  num_heads: int
  ffn_dim: int
  num_levels: int
  num_points: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, queries, query_position, reference_boxes, self_attention_mask, values, value_masks):
    q = queries + query_position
    attended = nn.MultiHeadDotProductAttention(num_heads=self.num_heads, dtype=self.dtype, name='self_attention')(
        q, q, queries, mask=self_attention_mask)
    queries = nn.LayerNorm(dtype=self.dtype)(queries + attended)
    cross = MultiScaleDeformableAttention(self.hidden_dim, self.num_heads, self.num_levels, self.num_points,
                                          self.dtype, name='cross_attention')(
        queries + query_position, reference_boxes, values, value_masks)
    queries = nn.LayerNorm(dtype=self.dtype)(queries + cross)
    hidden = nn.relu(nn.Dense(self.ffn_dim, dtype=self.dtype)(queries))
    return nn.LayerNorm(dtype=self.dtype)(queries + nn.Dense(self.hidden_dim, dtype=self.dtype)(hidden))


def box_grid(boxes, size, margin=0.0):
  """Normalized (x, y) centres [B, N, size*size, 2] of a size x size grid over each cxcywh box [B, N, 4] (row
  major), the box grown by `margin` (a fraction of its size) on every side."""
  grid = (jnp.arange(size, dtype=jnp.float32) + 0.5) / size - 0.5
  gy, gx = jnp.meshgrid(grid, grid, indexing='ij')
  offsets = jnp.stack([gx.ravel(), gy.ravel()], -1) * (1.0 + 2.0 * margin)  # [S*S, 2] in box units
  return boxes[:, :, None, :2] + offsets[None, None] * boxes[:, :, None, 2:]


def roi_sample(feature_map, boxes, size, margin=0.0):
  """Bilinear samples [B, N, size*size, C] of feature_map [B, H, W, C] on `box_grid`."""
  locations = box_grid(boxes, size, margin).astype(feature_map.dtype)
  return bilinear_sample(feature_map[:, :, :, None, :], locations[:, :, None])[:, :, 0]


# Each cell's box grows by this fraction of its size on every side before the crop, so that its outline is inside.
CELL_CROP_MARGIN = 0.1


def crop_cells(images, boxes, crop_size, margin=CELL_CROP_MARGIN):
  """Bilinear crops [B, N, S, S, C] of images [B, H, W, C] at normalized cxcywh boxes [B, N, 4], each box grown
  by `margin` on every side."""
  crops = roi_sample(images, boxes, crop_size, margin)
  return crops.reshape(boxes.shape[:2] + (crop_size, crop_size, images.shape[-1]))


CELL_CROP_PIXELS = ('intensity', 'optical_density')


def input_intensities(images):
  """The linear intensities in [0, 1] of images normalized as the backbone's input."""
  return images * jnp.asarray(resnet.IMAGENET_STD, images.dtype) + jnp.asarray(resnet.IMAGENET_MEAN, images.dtype)


def cell_encoder_crops(images, boxes, crop_size, pixels='intensity'):
  """What the cell encoder reads [B, N, S, S, 3] of the cells at normalized cxcywh boxes [B, N, 4] of images
  [B, H, W, 3] (normalized as the backbone's input): `crop_cells` of the images themselves ('intensity'), or of
  their linear intensities turned into optical density against the field's background around each cell
  ('optical_density', lld_jax.optical_density: the lamp, the camera and the plasma's tint divided out)."""
  if pixels == 'intensity':
    return crop_cells(images, boxes, crop_size)
  if pixels == 'optical_density':
    linear = input_intensities(images)
    background = optical_density.background_at(linear, boxes[..., :2])
    return optical_density.encoder_input(crop_cells(linear, boxes, crop_size), background)
  raise ValueError(f'unknown cell crop pixels {pixels!r}; expected one of {CELL_CROP_PIXELS}')


class CellCropEncoder(nn.Module):
  """A small CNN over each object's own pixels (`crop_cells` from the full-resolution input at its box).

  The detector's feature maps are 8x coarser than the input or more, and a cell's nucleoli, vacuoles, granules
  and chromatin texture are a few input pixels wide: only the pixels themselves still show them.
  crops [B, N, S, S, C] -> [B, N, T, hidden_dim] tokens (T = (S/8)^2 positions of the cell).
  With `branch_stage` > 0 it returns (tokens, the feature map after that many convolutions [B, N, h, w, C]), from
  which `CellAttributeClassifier`'s branches go on.
  """
  hidden_dim: int
  widths: Sequence[int] = (16, 32, 48, 64)
  branch_stage: int = 0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, crops):
    batch, num_objects = crops.shape[:2]
    x = crops.astype(self.dtype).reshape((batch * num_objects,) + crops.shape[2:])
    stage = None
    for i, width in enumerate(self.widths):
      x = ConvNorm(width, 3, stride=1 if i == 0 else 2, dtype=self.dtype, name=f'conv{i}')(x)
      if i + 1 == self.branch_stage:
        stage = x.reshape((batch, num_objects) + x.shape[1:])
    tokens = nn.Dense(self.hidden_dim, dtype=self.dtype, name='proj')(x.reshape(x.shape[0], -1, x.shape[-1]))
    tokens = tokens + self.param('position', nn.initializers.normal(0.02), tokens.shape[1:])
    tokens = tokens.reshape(batch, num_objects, -1, self.hidden_dim)
    return (tokens, stage) if self.branch_stage else tokens


def tokens_and_attribute_features(encoded, branch_stage):
  """(tokens, what the cell attribute classifier reads) of a `CellCropEncoder`'s output with that `branch_stage`:
  the tokens themselves, or the feature map its branches go on from."""
  return encoded if branch_stage else (encoded, encoded)


class CellClassifier(nn.Module):
  """The class of a cell from its crop tokens alone [B, N, T, C] -> softmax logits [B, N, K]: a linear classifier
  on the pooled tokens, trained by a cross-entropy that is blind to duplicates (the decoder's sigmoid scores must
  also tell the one answer to a cell from its duplicates, which look alike)."""
  num_classes: int
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, cell_tokens):
    pooled = nn.LayerNorm(dtype=self.dtype, name='norm')(cell_tokens.mean(2))
    return nn.Dense(self.num_classes, dtype=self.dtype, name='dense')(pooled).astype(jnp.float32)


def size_features_of(box_pixels):
  """log(width / 64 px), log(height / 64 px) [..., 2] of boxes [..., 2] measured in their image's own pixels."""
  return jnp.log(jnp.maximum(box_pixels, 1.0) / 64.0)


def original_box_pixels(boxes, canvas_size, pixel_scale):
  """Width and height [B, N, 2] in the original image's pixels of normalized cxcywh boxes [B, N, 4] on a canvas of
  `canvas_size` pixels; `pixel_scale` [B] is canvas pixels per original pixel, scale jitter included."""
  return boxes[..., 2:] * canvas_size / pixel_scale[:, None, None]


def cell_size_features(boxes, canvas_size, pixel_scale):
  """`size_features_of` [B, N, 2] of each box's `original_box_pixels`, so the size does not move with the scale
  jitter (which changes how big a cell looks, not its size attribute)."""
  return size_features_of(original_box_pixels(boxes, canvas_size, pixel_scale))


def allowed_values_only(logits, num_values):
  """Attribute logits [..., A, V] with the values past each attribute's own count (num_values [A]) masked out."""
  allowed = jnp.arange(logits.shape[-1])[None, :] < jnp.asarray(num_values)[:, None]  # [A, V]
  return jnp.where(allowed, logits, _NEG_INF)


class CellAttributeClassifier(nn.Module):
  """Each cell's attributes from its crop alone -> logits [B, N, A, V]. It learns from the true-cell crops of the
  whole training split (lld_jax.cell_crops) as the cell classifier does, and the attribute head adds its logits to
  its own, so that the attributes are learned from every cell of the split and not only from the few of each
  step's fields.

  Without `branch_widths` it is a linear classifier on the pooled crop tokens [B, N, T, C]. With them, each
  attribute has its own small CNN (one 3x3 convolution of each width, at stride 2) that goes on from the crop
  encoder's feature map after its first convolutions [B, N, h, w, C] (`CellCropEncoder.branch_stage`): sharing
  one CNN, the class and the other attributes kept a rare, small feature such as a vacuole from forming (the
  crop oracle's vacuole F1: 0.37 shared, 0.86 learned alone, 0.65 in branches; docs/results.md, sessions 24-25).
  Each cell's `size_features_of` its box [B, N, 2], when given, is added to the pooled features: the crops are
  resized to a fixed grid and lose the cell's own size.
  """
  num_values: Sequence[int]
  branch_widths: Sequence[int] = ()
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, cell_features, box_size_features=None):
    num_attributes, max_values = len(self.num_values), max(self.num_values)
    if not self.branch_widths:
      pooled = nn.LayerNorm(dtype=self.dtype, name='norm')(cell_features.mean(2))
      if box_size_features is not None:  # the crops are resized to a fixed grid: the cell's own size is lost
        pooled = pooled + nn.Dense(pooled.shape[-1], dtype=self.dtype, name='box_size')(box_size_features)
      logits = nn.Dense(num_attributes * max_values, dtype=self.dtype, name='dense')(pooled).astype(jnp.float32)
      return allowed_values_only(logits.reshape(logits.shape[:-1] + (num_attributes, max_values)), self.num_values)
    lead = cell_features.shape[:2]
    x = cell_features.astype(self.dtype).reshape((-1,) + cell_features.shape[2:])
    # Every branch's first convolution reads the same map: one convolution with all their channels (branch after
    # branch; a group norm per branch, as ConvNorm's, since the groups split the channels in order). The later
    # ones, one per branch: on XLA's CPU a loop of small convolutions ran over 10x faster than one grouped
    # convolution or than 3x3 patches times a kernel per branch (docs/results.md, session 25).
    first = self.branch_widths[0]
    x = nn.Conv(num_attributes * first, (3, 3), (2, 2), padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype,
                name='branches_conv0')(x)
    x = nn.silu(nn.GroupNorm(num_groups=num_attributes * min(32, first // 4), dtype=self.dtype,
                             name='branches_norm0')(x))
    logits = []
    for a, x in enumerate(jnp.split(x, num_attributes, axis=-1)):
      for i, width in enumerate(self.branch_widths[1:], start=1):
        x = ConvNorm(width, 3, stride=2, dtype=self.dtype, name=f'branch{a}_conv{i}')(x)
      pooled = nn.LayerNorm(dtype=self.dtype, name=f'branch{a}_norm')(x.mean((1, 2)).reshape(lead + (-1,)))
      if box_size_features is not None:
        pooled = pooled + nn.Dense(pooled.shape[-1], dtype=self.dtype, name=f'branch{a}_box_size')(box_size_features)
      logits.append(nn.Dense(max_values, dtype=self.dtype, name=f'branch{a}_dense')(pooled).astype(jnp.float32))
    return allowed_values_only(jnp.stack(logits, axis=2), self.num_values)


def flip_averaged_log_probs(cell_classifier, encode, crops, logits):
  """The classifier's log-probabilities averaged over the crop and its three flips [B, N, K] (`encode`: crops ->
  tokens): a cell has no orientation (the training crops are flipped at random), and averaging the views steadies
  the class."""
  views = [logits] + [cell_classifier(encode(v)) for v in
                      (crops[:, :, :, ::-1], crops[:, :, ::-1], crops[:, :, ::-1, ::-1])]
  return jnp.mean(jnp.stack([jax.nn.log_softmax(v) for v in views]), 0)


class AttributeHead(nn.Module):
  """Attribute queries: one learned query per attribute, added to its object's decoder output, cross-attends to
  RoI-aligned high-resolution features inside the object's box (and to the tokens of the object's own pixels,
  `cell_tokens`, when given), then classifies that attribute.

  With `num_classes`, one more query reads the same tokens and returns class logits [B, N, K] that refine the
  decoder's (zero at initialization). `mode='mlp'` replaces the queries by a plain MLP per attribute on the
  decoder output (ablation).
  Returns (attribute logits [B, N, A, V], class logits [B, N, K] or None).
  """
  num_values: Sequence[int]
  hidden_dim: int
  num_heads: int = 4
  roi_size: int = 7
  mode: str = 'query'
  num_classes: int = 0
  dtype: jnp.dtype = jnp.float32

  @nn.compact
  def __call__(self, object_features, boxes, feature_map, feature_mask, cell_tokens=None, size_features=None):
    num_attributes, max_values = len(self.num_values), max(self.num_values)
    batch, num_objects, _ = object_features.shape
    class_logits = None
    if self.mode == 'query':
      masked_map = feature_map * feature_mask[..., None].astype(feature_map.dtype)
      roi = roi_sample(masked_map, boxes, self.roi_size)  # [B, N, R, C]
      roi = nn.Dense(self.hidden_dim, dtype=self.dtype, name='roi_proj')(roi)
      roi = roi + self.param('roi_position', nn.initializers.normal(0.02), (self.roi_size**2, self.hidden_dim))
      if cell_tokens is not None:
        roi = jnp.concatenate([roi, cell_tokens.astype(self.dtype)], axis=2)
      num_tokens = roi.shape[2]
      num_read = num_attributes + (1 if self.num_classes else 0)
      attribute_queries = self.param('attribute_queries', nn.initializers.normal(0.02),
                                     (num_read, self.hidden_dim))
      x = object_features[:, :, None, :] + attribute_queries[None, None]  # [B, N, A(+1), C]
      if size_features is not None:  # the crops and RoIs are resized to a fixed grid: the cell's own size is lost
        size = nn.Dense(self.hidden_dim, dtype=self.dtype, name='box_size')(size_features)[:, :, None, :]
        # The attribute queries only: given to the class query too it lowered the cells' AP50 (session 21).
        x = x + size * (jnp.arange(num_read) < num_attributes)[:, None].astype(self.dtype)
      x = x.reshape(batch * num_objects, num_read, self.hidden_dim)
      roi = roi.reshape(batch * num_objects, num_tokens, self.hidden_dim)
      x = nn.LayerNorm(dtype=self.dtype)(x + nn.MultiHeadDotProductAttention(
          num_heads=self.num_heads, dtype=self.dtype, name='roi_attention')(x, roi, roi))
      x = nn.LayerNorm(dtype=self.dtype)(x + MLP(self.hidden_dim * 2, self.hidden_dim, 2, self.dtype)(x))
      x = x.reshape(batch, num_objects, num_read, self.hidden_dim)
      kernel = self.param('classifier_kernel', nn.initializers.lecun_normal(),
                          (num_attributes, self.hidden_dim, max_values))
      bias = self.param('classifier_bias', nn.initializers.zeros, (num_attributes, max_values))
      logits = jnp.einsum('bnac,acv->bnav', x[:, :, :num_attributes].astype(jnp.float32), kernel) + bias
      if self.num_classes:
        class_logits = nn.Dense(self.num_classes, dtype=self.dtype, kernel_init=nn.initializers.zeros,
                                name='class_refinement')(x[:, :, num_attributes]).astype(jnp.float32)
    elif self.mode == 'mlp':
      logits = jnp.stack([MLP(self.hidden_dim, max_values, 2, self.dtype, name=f'attribute{a}')(object_features)
                          for a in range(num_attributes)], axis=2).astype(jnp.float32)
    else:
      raise ValueError(f'unknown attribute head {self.mode!r}; expected query or mlp')
    return allowed_values_only(logits, self.num_values), class_logits


def token_anchors(shapes, masks, base_size=0.05):
  """Anchor boxes [B, N, 4] (cxcywh) at every token of every level, and whether each is usable [B, N]."""
  anchors, usable = [], []
  for level, ((h, w), mask) in enumerate(zip(shapes, masks)):
    ys, xs = jnp.meshgrid((jnp.arange(h) + 0.5) / h, (jnp.arange(w) + 0.5) / w, indexing='ij')
    size = jnp.full((h, w), base_size * 2.0**level)
    anchors.append(jnp.stack([xs, ys, size, size], -1).reshape(-1, 4))
    usable.append(mask.reshape(mask.shape[0], -1) > 0)
  return jnp.concatenate(anchors)[None], jnp.concatenate(usable, axis=1)


def denoising_queries(rng, labels, boxes, valid, num_groups, num_classes, label_noise, box_noise):
  """Contrastive denoising queries (DINO) with static shapes.

  Each group holds a positive copy (box noise below `box_noise`) and a negative copy (noise between `box_noise`
  and 2x) of every target slot, including padded slots, which are marked invalid.
  Returns noised labels [B, D], boxes [B, D, 4], and per-query target index, validity and positivity [B, D],
  where D = num_groups * 2 * T.
  """
  batch, num_targets = labels.shape
  flip_rng, label_rng, sign_rng, magnitude_rng = jax.random.split(rng, 4)
  shape = (batch, num_groups, 2, num_targets)
  tiled_labels = jnp.broadcast_to(labels[:, None, None, :], shape)
  flip = jax.random.uniform(flip_rng, shape) < label_noise * 0.5
  random_labels = jax.random.randint(label_rng, shape, 0, num_classes)
  noised_labels = jnp.where(flip, random_labels, tiled_labels)
  tiled_boxes = jnp.broadcast_to(boxes[:, None, None], shape + (4,))
  xyxy = box_ops.cxcywh_to_xyxy(tiled_boxes)
  half_wh = jnp.concatenate([tiled_boxes[..., 2:], tiled_boxes[..., 2:]], -1) / 2
  sign = jnp.where(jax.random.bernoulli(sign_rng, 0.5, shape + (4,)), 1.0, -1.0)
  magnitude = jax.random.uniform(magnitude_rng, shape + (4,))
  is_negative = jnp.arange(2)[None, None, :, None, None] == 1
  magnitude = jnp.where(is_negative, magnitude + 1.0, magnitude)
  xyxy = jnp.clip(xyxy + sign * magnitude * half_wh * box_noise, 0.0, 1.0)
  noised_boxes = box_ops.xyxy_to_cxcywh(xyxy)
  noised_boxes = noised_boxes.at[..., 2:].set(jnp.maximum(noised_boxes[..., 2:], 1e-3))
  target_index = jnp.broadcast_to(jnp.arange(num_targets)[None, None, None, :], shape)
  is_positive = jnp.broadcast_to(~is_negative[..., 0], shape)
  tiled_valid = jnp.broadcast_to(valid[:, None, None, :], shape)
  flat = lambda x: x.reshape((batch, -1) + x.shape[4:])
  return (flat(noised_labels), flat(noised_boxes), flat(target_index), flat(tiled_valid), flat(is_positive))


def self_attention_mask(num_denoising, num_groups, num_matching, dn_valid):
  """[B, 1, D+Q, D+Q] mask: matching queries never see denoising ones; each denoising group sees only itself.
  Invalid (padded) denoising queries are hidden from everyone but themselves."""
  total = num_denoising + num_matching
  group = jnp.concatenate([jnp.repeat(jnp.arange(num_groups), num_denoising // max(num_groups, 1)),
                           jnp.full((num_matching,), num_groups)])
  allowed = group[:, None] == group[None, :]
  allowed = allowed | ((group[:, None] < num_groups) & (group[None, :] == num_groups))
  key_visible = jnp.concatenate([dn_valid, jnp.ones((dn_valid.shape[0], num_matching), bool)], axis=1)
  allowed = allowed[None] & key_visible[:, None, :]
  allowed = allowed | jnp.eye(total, dtype=bool)[None]
  return allowed[:, None]


class Detector(nn.Module):
  num_classes: int
  attribute_values: Sequence[int]
  backbone_depth: int = 50
  backbone_norm: str = 'frozen_bn'
  backbone_width: int = 64
  hidden_dim: int = 256
  num_heads: int = 8
  ffn_dim: int = 1024
  num_encoder_layers: int = 1
  fusion_depth: int = 2
  num_decoder_layers: int = 6
  num_queries: int = 300
  num_points: int = 4
  two_stage: bool = True
  denoising_groups: int = 5
  label_noise: float = 0.5
  box_noise: float = 1.0
  attribute_head: str = 'query'
  roi_size: int = 7
  input_stride: int = 1
  cell_crop_size: int = 0
  cell_crop_pixels: str = 'intensity'
  cell_class_refinement: bool = False
  dn_cells_at_true_boxes: bool = False
  cell_class_flips: bool = False
  attribute_box_size: bool = False
  cell_attribute_classifier: bool = False
  cell_attribute_branch_widths: Sequence[int] = ()
  cell_attribute_branch_stage: int = 2
  dtype: jnp.dtype = jnp.float32

  @property
  def cell_encoder_branch_stage(self) -> int:
    """Where the cell attribute classifier's branches leave the crop encoder (0: it reads the crop tokens)."""
    if self.cell_attribute_classifier and self.cell_attribute_branch_widths:
      return self.cell_attribute_branch_stage
    return 0

  @nn.compact
  def __call__(self, images, image_mask, targets=None, train: bool = False, cell_crops=None, pixel_scale=None,
               cell_crop_box_pixels=None):
    """images [B, H, W, 3] normalized; image_mask [B, H, W] (1 = image, 0 = padding). `targets` (dict with
    labels [B, T], boxes [B, T, 4], weight [B, T]) switches on the denoising queries when training.
    `cell_crops` [B', N, S, S, 3] (`crop_cells` of true cells, see lld_jax.cell_crops) go through the cell
    classifier alone: `crop_class_logits` [B', N, K] (and, with `cell_attribute_classifier`, through the cell
    attribute classifier: `crop_attribute_logits` [B', N, A, V], reading `cell_crop_box_pixels` [B', N, 2], each
    cell's size in its image's own pixels, when `attribute_box_size`). `pixel_scale` [B], canvas pixels per
    original pixel (the batch's `scale`), gives `attribute_box_size` each cell's size in the original image's
    pixels."""
    backbone = resnet.ResNet(depth=self.backbone_depth, norm=self.backbone_norm, width=self.backbone_width,
                             dtype=self.dtype, name='backbone')
    # With input_stride > 1 the backbone reads a downsampled copy; the full resolution serves the cell crops.
    stride = self.input_stride
    backbone_input = nn.avg_pool(images, (stride, stride), (stride, stride)) if stride > 1 else images
    features = backbone(backbone_input.astype(self.dtype))
    features = [features['stride8'], features['stride16'], features['stride32']]
    masks = [jax.image.resize(image_mask.astype(jnp.float32), f.shape[:3], 'nearest') for f in features]
    levels = HybridEncoder(self.hidden_dim, self.num_heads, self.ffn_dim, self.num_encoder_layers,
                           self.fusion_depth, self.dtype, name='encoder')(features, masks)
    batch = images.shape[0]
    shapes = [level.shape[1:3] for level in levels]
    memory = jnp.concatenate([level.reshape(batch, -1, self.hidden_dim) for level in levels], axis=1)
    anchors, usable = token_anchors(shapes, masks)
    outputs = {}

    # Two-stage query selection: the best-scoring encoder tokens give the initial boxes and contents.
    encoded = nn.LayerNorm(dtype=self.dtype, name='enc_norm')(nn.Dense(self.hidden_dim, dtype=self.dtype,
                                                                       name='enc_proj')(memory))
    encoded = encoded * usable[..., None].astype(self.dtype)
    enc_logits = nn.Dense(self.num_classes, dtype=self.dtype, name='enc_class',
                          bias_init=nn.initializers.constant(-4.6))(encoded).astype(jnp.float32)
    enc_boxes = jax.nn.sigmoid(MLP(self.hidden_dim, 4, 3, self.dtype, name='enc_box')(encoded).astype(jnp.float32)
                               + box_ops.inverse_sigmoid(anchors))
    if train:  # every token's prediction, for the one-to-many encoder loss
      outputs.update(token_logits=enc_logits, token_boxes=enc_boxes,
                     token_centres=jnp.broadcast_to(anchors[..., :2], enc_boxes.shape[:2] + (2,)),
                     token_usable=usable)
    if self.two_stage:
      scores = jnp.where(usable, enc_logits.max(-1), _NEG_INF)
      _, top = jax.lax.top_k(scores, self.num_queries)
      take = jax.vmap(lambda x, i: x[i])
      outputs['enc_logits'] = take(enc_logits, top)
      outputs['enc_boxes'] = take(enc_boxes, top)
      reference = jax.lax.stop_gradient(outputs['enc_boxes'])
      content = jax.lax.stop_gradient(take(encoded, top))
    else:
      reference = jnp.broadcast_to(jax.nn.sigmoid(self.param(
          'query_boxes', nn.initializers.uniform(4.0), (self.num_queries, 4)) - 2.0)[None],
          (batch, self.num_queries, 4))
      content = jnp.broadcast_to(self.param('query_content', nn.initializers.normal(0.02),
                                            (self.num_queries, self.hidden_dim))[None],
                                 (batch, self.num_queries, self.hidden_dim)).astype(self.dtype)

    num_denoising = 0
    attention_mask = None
    if train and targets is not None and self.denoising_groups > 0:
      dn_labels, dn_boxes, dn_target, dn_valid, dn_positive = denoising_queries(
          self.make_rng('denoise'), targets['labels'], targets['boxes'], targets['weight'] > 0,
          self.denoising_groups, self.num_classes, self.label_noise, self.box_noise)
      label_embedding = nn.Embed(self.num_classes, self.hidden_dim, name='dn_label_embedding')
      content = jnp.concatenate([label_embedding(dn_labels).astype(self.dtype), content], axis=1)
      reference = jnp.concatenate([dn_boxes, reference], axis=1)
      num_denoising = dn_labels.shape[1]
      attention_mask = self_attention_mask(num_denoising, self.denoising_groups, self.num_queries, dn_valid)
      outputs.update(dn_target_index=dn_target, dn_valid=dn_valid, dn_is_positive=dn_positive,
                     dn_labels=jnp.where(dn_positive, jnp.take_along_axis(targets['labels'], dn_target, 1), -1))

    query_position_mlp = MLP(self.hidden_dim, self.hidden_dim, 2, self.dtype, name='query_position')
    queries = content
    all_logits, all_boxes = [], []
    for i in range(self.num_decoder_layers):
      position = query_position_mlp(box_sine_embedding(reference, self.hidden_dim).astype(self.dtype))
      queries = DecoderLayer(self.hidden_dim, self.num_heads, self.ffn_dim, len(levels), self.num_points,
                             self.dtype, name=f'decoder{i}')(queries, position, reference, attention_mask,
                                                            levels, masks)
      delta = MLP(self.hidden_dim, 4, 3, self.dtype, zero_last=True, name=f'box_head{i}')(queries)
      boxes = jax.nn.sigmoid(box_ops.inverse_sigmoid(reference) + delta.astype(jnp.float32))
      logits = nn.Dense(self.num_classes, dtype=self.dtype, bias_init=nn.initializers.constant(-4.6),
                        name=f'class_head{i}')(queries).astype(jnp.float32)
      all_logits.append(logits)
      all_boxes.append(boxes)
      reference = jax.lax.stop_gradient(boxes)

    # Attributes are read for the matching queries and for the positive copies of the first denoising group
    # (one per target slot, laid out first): the other denoising copies would multiply the cost of the RoI
    # attention without adding targets. With `dn_cells_at_true_boxes` those copies read their cells at the true
    # boxes: early in training the refined boxes miss the cell, and the per-cell heads learned from crops of
    # background for the first half of the demo's budget.
    num_attribute_dn = targets['labels'].shape[1] if num_denoising else 0
    attribute_queries = jnp.concatenate([queries[:, :num_attribute_dn], queries[:, num_denoising:]], axis=1)
    dn_attribute_boxes = (targets['boxes'] if num_denoising and self.dn_cells_at_true_boxes
                          else all_boxes[-1][:, :num_attribute_dn])
    attribute_boxes = jnp.concatenate([dn_attribute_boxes, all_boxes[-1][:, num_denoising:]], 1)
    attribute_boxes = jax.lax.stop_gradient(attribute_boxes)
    cell_tokens = cell_class_logits = None
    if (self.cell_crop_size or self.cell_class_refinement) and self.attribute_head != 'query':
      raise ValueError(f'model.cell_crop_size / model.cell_class_refinement need attribute_head=query (the queries '
                       f'read the crops), got attribute_head={self.attribute_head!r}')
    if cell_crops is not None and not (self.cell_crop_size and self.cell_class_refinement):
      raise ValueError('cell crops need the cell classifier: model.cell_crop_size > 0 and '
                       'model.cell_class_refinement=True')
    if self.cell_attribute_classifier and not self.cell_crop_size:
      raise ValueError('model.cell_attribute_classifier reads the cell crops: set model.cell_crop_size > 0')
    encoder_depth = len(CellCropEncoder.widths)
    if self.cell_encoder_branch_stage and not 1 <= self.cell_encoder_branch_stage <= encoder_depth:
      raise ValueError(f'model.cell_attribute_branch_stage={self.cell_attribute_branch_stage}: the branches leave the '
                       f'crop encoder after 1 to {encoder_depth} of its convolutions')
    if self.cell_crop_size:
      cell_encoder = CellCropEncoder(self.hidden_dim, branch_stage=self.cell_encoder_branch_stage, dtype=self.dtype,
                                     name='cell_encoder')

      def encode(c):
        return tokens_and_attribute_features(cell_encoder(c), self.cell_encoder_branch_stage)

      crops = cell_encoder_crops(images.astype(self.dtype), attribute_boxes, self.cell_crop_size,
                                 self.cell_crop_pixels)
      cell_tokens, cell_attribute_features = encode(crops)
      if self.cell_class_refinement:
        # Crop features only: the attribute head's shared attention stays the attributes' (a cross-entropy there
        # from the first step cost attribute F1 in our A/B).
        cell_classifier = CellClassifier(self.num_classes, self.dtype, name='cell_classifier')
        cell_class_logits = cell_classifier(cell_tokens)
        if self.cell_class_flips and not train:
          cell_class_logits = flip_averaged_log_probs(cell_classifier, lambda c: encode(c)[0], crops,
                                                      cell_class_logits)
        if cell_crops is not None:
          crop_tokens, crop_attribute_features = encode(cell_crops)
          outputs['crop_class_logits'] = cell_classifier(crop_tokens)
    size_features = None
    if self.attribute_box_size:
      if pixel_scale is None:
        raise ValueError('model.attribute_box_size reads each cell\'s size in original pixels: pass pixel_scale '
                         '(the batch\'s scale, canvas pixels per original pixel)')
      size_features = cell_size_features(attribute_boxes, images.shape[2], pixel_scale).astype(self.dtype)
    attribute_logits, class_refinement = AttributeHead(
        self.attribute_values, self.hidden_dim, roi_size=self.roi_size, mode=self.attribute_head,
        num_classes=self.num_classes if self.cell_class_refinement else 0, dtype=self.dtype, name='attribute_head')(
            attribute_queries, attribute_boxes, levels[0], masks[0], cell_tokens, size_features)
    if self.cell_attribute_classifier:
      cell_attribute_classifier = CellAttributeClassifier(self.attribute_values, self.cell_attribute_branch_widths,
                                                          self.dtype, name='cell_attribute_classifier')
      attribute_logits = attribute_logits + cell_attribute_classifier(cell_attribute_features, size_features)
      if cell_crops is not None:
        if self.attribute_box_size and cell_crop_box_pixels is None:
          raise ValueError('model.attribute_box_size: pass the crops\' cell_crop_box_pixels')
        crop_size_features = size_features_of(cell_crop_box_pixels) if self.attribute_box_size else None
        outputs['crop_attribute_logits'] = cell_attribute_classifier(crop_attribute_features, crop_size_features)
    if class_refinement is not None:  # the last layer's classes, for the queries the head has read
      last = all_logits[-1]
      all_logits[-1] = jnp.concatenate([
          last[:, :num_attribute_dn] + class_refinement[:, :num_attribute_dn],
          last[:, num_attribute_dn:num_denoising], last[:, num_denoising:] + class_refinement[:, num_attribute_dn:]],
          axis=1)
    logits, boxes = jnp.stack(all_logits), jnp.stack(all_boxes)
    outputs.update(pred_logits=logits[:, :, num_denoising:], pred_boxes=boxes[:, :, num_denoising:],
                   attribute_logits=attribute_logits[:, num_attribute_dn:])
    if cell_class_logits is not None:
      outputs['cell_class_logits'] = cell_class_logits[:, num_attribute_dn:]
    if num_denoising:
      outputs.update(dn_logits=logits[:, :, :num_denoising], dn_boxes=boxes[:, :, :num_denoising],
                     dn_attribute_logits=attribute_logits[:, :num_attribute_dn])
      if cell_class_logits is not None:
        outputs['dn_cell_class_logits'] = cell_class_logits[:, :num_attribute_dn]
    return outputs
