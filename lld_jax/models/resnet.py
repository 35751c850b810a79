"""ResNet-18/34/50 backbone in flax.linen, laid out like torchvision.

The module mirrors ``torchvision.models.resnet`` (v1.5: the bottleneck stride sits on the 3x3 conv)
closely enough that a torchvision state dict maps onto it by name (see ``lld_jax.models.pretrained``)
and produces the same activations: same padding (3 px for the stem 7x7, 1 px for every 3x3, 1 px
``-inf`` padding for the stem 3x3/2 max pool), same block structure, same downsample placement.

Naming (flax path -> torchvision key prefix)::

    conv1, bn1                               -> conv1, bn1
    layer{i}_{j}/conv{k}, layer{i}_{j}/bn{k} -> layer{i}.{j}.conv{k}, layer{i}.{j}.bn{k}
    layer{i}_{j}/downsample_conv             -> layer{i}.{j}.downsample.0
    layer{i}_{j}/downsample_bn               -> layer{i}.{j}.downsample.1

Normalisation (``norm``):

* ``'frozen_bn'``: a fixed affine ``y = (x - mean) / sqrt(var + eps) * scale + bias``. Its four
  arrays live in the variable collection ``'frozen_stats'`` (``FROZEN_COLLECTION``), not in
  ``'params'``, so an optimizer over ``params`` never sees or updates them. Nothing is mutable during
  ``apply``: pass ``{'params': ..., 'frozen_stats': ...}`` and no ``mutable=``.
* ``'group_norm'``: trainable ``nn.GroupNorm`` (scale/bias in ``'params'``) with up to 32 groups
  (the largest divisor of the channel count that is <= 32, so tiny ``width`` models still work).

Usage::

    model = ResNet(depth=50, norm='frozen_bn', dtype=jnp.bfloat16)
    variables = model.init(rng, jnp.zeros((1, 64, 64, 3)))   # {'params', 'frozen_stats'}
    feats = model.apply(variables, images)                   # {'stride4', ..., 'stride32'}
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

FROZEN_COLLECTION = "frozen_stats"
NORMS = ("frozen_bn", "group_norm")
LEVELS = ("stride4", "stride8", "stride16", "stride32")
# The input normalization of torchvision's ImageNet weights: images reach the model as (pixels - mean) / std,
# pixels in [0, 1].
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)

# depth -> (block kind, blocks per stage)
_SPECS = {
    18: ("basic", (2, 2, 2, 2)),
    34: ("basic", (3, 4, 6, 3)),
    50: ("bottleneck", (3, 4, 6, 3)),
}
_EXPANSION = {"basic": 1, "bottleneck": 4}

# torchvision initialises convs with kaiming_normal_(mode='fan_out', nonlinearity='relu').
_conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def resnet_spec(depth: int) -> tuple[str, tuple[int, ...]]:
    """Returns ``(block_kind, blocks_per_stage)`` for a supported depth."""
    if depth not in _SPECS:
        raise ValueError(f"Unsupported ResNet depth {depth!r}; expected one of {sorted(_SPECS)}.")
    return _SPECS[depth]


def feature_channels(depth: int, width: int = 64) -> dict[str, int]:
    """Channels of each output level, e.g. depth 50 / width 64 -> {'stride4': 256, ..., 'stride32': 2048}."""
    kind, _ = resnet_spec(depth)
    exp = _EXPANSION[kind]
    return {level: width * (2**i) * exp for i, level in enumerate(LEVELS)}


def group_norm_groups(channels: int, max_groups: int = 32) -> int:
    """Largest divisor of ``channels`` that is <= ``max_groups`` (32 for all standard widths)."""
    for g in range(min(max_groups, channels), 0, -1):
        if channels % g == 0:
            return g
    return 1


class FrozenBatchNorm(nn.Module):
    """BatchNorm with fixed statistics and affine (DETR's FrozenBatchNorm2d).

    ``scale``, ``bias``, ``mean`` and ``var`` (shape [C], float32) are stored in the
    ``'frozen_stats'`` collection; they are inputs, never trained. Initial values give the identity.
    """

    eps: float = 1e-5
    dtype: Any = None

    @nn.compact
    def __call__(self, x):
        c = x.shape[-1]
        scale = self.variable(FROZEN_COLLECTION, "scale", lambda: jnp.ones((c,), jnp.float32)).value
        bias = self.variable(FROZEN_COLLECTION, "bias", lambda: jnp.zeros((c,), jnp.float32)).value
        mean = self.variable(FROZEN_COLLECTION, "mean", lambda: jnp.zeros((c,), jnp.float32)).value
        var = self.variable(FROZEN_COLLECTION, "var", lambda: jnp.ones((c,), jnp.float32)).value
        # Fold into one affine in float32, then apply in the computation dtype.
        mul = scale.astype(jnp.float32) * jnp.reciprocal(jnp.sqrt(var.astype(jnp.float32) + self.eps))
        add = bias.astype(jnp.float32) - mean.astype(jnp.float32) * mul
        dtype = self.dtype or x.dtype
        return x.astype(dtype) * mul.astype(dtype) + add.astype(dtype)


def _norm(norm: str, channels: int, dtype: Any, name: str) -> nn.Module:
    if norm == "frozen_bn":
        return FrozenBatchNorm(eps=1e-5, dtype=dtype, name=name)
    if norm == "group_norm":
        return nn.GroupNorm(
            num_groups=group_norm_groups(channels), epsilon=1e-5, dtype=dtype, param_dtype=jnp.float32, name=name
        )
    raise ValueError(f"Unsupported norm {norm!r}; expected one of {NORMS}.")


def _conv(features: int, kernel: int, stride: int, dtype: Any, name: str) -> nn.Conv:
    pad = (kernel - 1) // 2  # 3 for 7x7, 1 for 3x3, 0 for 1x1 (torchvision)
    return nn.Conv(
        features,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=((pad, pad), (pad, pad)),
        use_bias=False,
        dtype=dtype,
        param_dtype=jnp.float32,
        kernel_init=_conv_init,
        name=name,
    )


class BasicBlock(nn.Module):
    """torchvision BasicBlock: 3x3(stride) - norm - relu - 3x3 - norm, + shortcut, relu."""

    planes: int
    stride: int = 1
    downsample: bool = False
    norm: str = "frozen_bn"
    dtype: Any = None

    expansion = 1

    @nn.compact
    def __call__(self, x):
        out = _conv(self.planes, 3, self.stride, self.dtype, "conv1")(x)
        out = nn.relu(_norm(self.norm, self.planes, self.dtype, "bn1")(out))
        out = _conv(self.planes, 3, 1, self.dtype, "conv2")(out)
        out = _norm(self.norm, self.planes, self.dtype, "bn2")(out)
        identity = x
        if self.downsample:
            identity = _conv(self.planes, 1, self.stride, self.dtype, "downsample_conv")(x)
            identity = _norm(self.norm, self.planes, self.dtype, "downsample_bn")(identity)
        return nn.relu(out + identity)


class Bottleneck(nn.Module):
    """torchvision Bottleneck (v1.5): 1x1 - norm - relu - 3x3(stride) - norm - relu - 1x1(4x) - norm, + shortcut, relu."""

    planes: int
    stride: int = 1
    downsample: bool = False
    norm: str = "frozen_bn"
    dtype: Any = None

    expansion = 4

    @nn.compact
    def __call__(self, x):
        out_ch = self.planes * self.expansion
        out = _conv(self.planes, 1, 1, self.dtype, "conv1")(x)
        out = nn.relu(_norm(self.norm, self.planes, self.dtype, "bn1")(out))
        out = _conv(self.planes, 3, self.stride, self.dtype, "conv2")(out)
        out = nn.relu(_norm(self.norm, self.planes, self.dtype, "bn2")(out))
        out = _conv(out_ch, 1, 1, self.dtype, "conv3")(out)
        out = _norm(self.norm, out_ch, self.dtype, "bn3")(out)
        identity = x
        if self.downsample:
            identity = _conv(out_ch, 1, self.stride, self.dtype, "downsample_conv")(x)
            identity = _norm(self.norm, out_ch, self.dtype, "downsample_bn")(identity)
        return nn.relu(out + identity)


class ResNet(nn.Module):
    """torchvision-layout ResNet backbone returning the four stage outputs.

    Attributes:
      depth: 18, 34 (BasicBlock) or 50 (Bottleneck).
      norm: 'frozen_bn' (fixed affine in collection 'frozen_stats') or 'group_norm' (trainable).
      dtype: computation dtype (e.g. jnp.bfloat16); parameters and frozen stats stay float32.
      width: base channel count (64 for the standard models; small values for tests).

    ``__call__(images [B, H, W, 3] float) -> {'stride4': layer1, 'stride8': layer2,
    'stride16': layer3, 'stride32': layer4}``, each [B, h, w, C] in ``dtype`` (input dtype if None),
    with C given by ``feature_channels(depth, width)``. Spatial sizes follow torchvision exactly
    (e.g. 64x64 input -> 16, 8, 4, 2).
    """

    depth: int = 50
    norm: str = "frozen_bn"
    dtype: Any = None
    width: int = 64

    @property
    def num_channels(self) -> dict[str, int]:
        return feature_channels(self.depth, self.width)

    @nn.compact
    def __call__(self, images):
        kind, blocks = resnet_spec(self.depth)
        if self.norm not in NORMS:
            raise ValueError(f"Unsupported norm {self.norm!r}; expected one of {NORMS}.")
        block_cls = BasicBlock if kind == "basic" else Bottleneck
        exp = _EXPANSION[kind]

        x = images if self.dtype is None else images.astype(self.dtype)
        x = _conv(self.width, 7, 2, self.dtype, "conv1")(x)
        x = nn.relu(_norm(self.norm, self.width, self.dtype, "bn1")(x))
        # torchvision MaxPool2d(3, stride=2, padding=1): flax pads with -inf.
        x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        outputs = {}
        in_ch = self.width
        for i, (n_blocks, level) in enumerate(zip(blocks, LEVELS)):
            planes = self.width * (2**i)
            stage_stride = 1 if i == 0 else 2
            for j in range(n_blocks):
                stride = stage_stride if j == 0 else 1
                downsample = j == 0 and (stride != 1 or in_ch != planes * exp)
                x = block_cls(
                    planes=planes,
                    stride=stride,
                    downsample=downsample,
                    norm=self.norm,
                    dtype=self.dtype,
                    name=f"layer{i + 1}_{j}",
                )(x)
                in_ch = planes * exp
            outputs[level] = x
        return outputs


def split_variables(variables) -> tuple[dict, dict]:
    """``model.init`` output -> ``(params, frozen_stats)`` (frozen_stats is {} for group_norm)."""
    return dict(variables["params"]), dict(variables.get(FROZEN_COLLECTION, {}))


def num_params(tree) -> int:
    import jax

    return int(sum(math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree)))
