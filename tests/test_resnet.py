"""Tests for the torchvision-layout ResNet backbone and the torchvision checkpoint loader."""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from safetensors.numpy import save_file

from lld_jax.models.pretrained import (
    PretrainedMismatchError,
    load_torchvision_resnet,
    merge_pretrained,
    read_state_dict,
)
from lld_jax.models.resnet import FROZEN_COLLECTION, FrozenBatchNorm, ResNet, feature_channels

WIDTH = 8


def torchvision_state_dict(depth: int, width: int = 64, seed: int = 0) -> dict[str, np.ndarray]:
    """A fake state dict with exactly the keys/shapes of torchvision.models.resnet{depth}(width_per_group default).

    Follows torchvision's ResNet._make_layer: BasicBlock (expansion 1) for 18/34, Bottleneck
    (expansion 4) for 50; downsample = conv1x1 + BN on the first block when the stride or the
    channel count changes; fc on top; every BN with num_batches_tracked.
    """
    rng = np.random.default_rng(seed)
    layers = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3], 50: [3, 4, 6, 3]}[depth]
    bottleneck = depth >= 50
    expansion = 4 if bottleneck else 1
    sd: dict[str, np.ndarray] = {}

    def conv(name, out_ch, in_ch, k):
        sd[f"{name}.weight"] = rng.standard_normal((out_ch, in_ch, k, k)).astype(np.float32)

    def bn(name, c):
        sd[f"{name}.weight"] = rng.uniform(0.5, 1.5, c).astype(np.float32)
        sd[f"{name}.bias"] = rng.standard_normal(c).astype(np.float32)
        sd[f"{name}.running_mean"] = rng.standard_normal(c).astype(np.float32)
        sd[f"{name}.running_var"] = rng.uniform(0.5, 2.0, c).astype(np.float32)
        sd[f"{name}.num_batches_tracked"] = np.array(0, np.int64)

    conv("conv1", width, 3, 7)
    bn("bn1", width)
    inplanes = width
    for li, n_blocks in enumerate(layers):
        planes = width * 2**li
        stride = 1 if li == 0 else 2
        for b in range(n_blocks):
            p = f"layer{li + 1}.{b}"
            if bottleneck:
                conv(f"{p}.conv1", planes, inplanes, 1)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
                conv(f"{p}.conv3", planes * expansion, planes, 1)
                bn(f"{p}.bn3", planes * expansion)
            else:
                conv(f"{p}.conv1", planes, inplanes, 3)
                bn(f"{p}.bn1", planes)
                conv(f"{p}.conv2", planes, planes, 3)
                bn(f"{p}.bn2", planes)
            if b == 0 and (stride != 1 or inplanes != planes * expansion):
                conv(f"{p}.downsample.0", planes * expansion, inplanes, 1)
                bn(f"{p}.downsample.1", planes * expansion)
            inplanes = planes * expansion
    sd["fc.weight"] = rng.standard_normal((1000, inplanes)).astype(np.float32)
    sd["fc.bias"] = np.zeros(1000, np.float32)
    return sd


def _init(model, size=32, seed=0):
    """Variables of ``model`` with the structure/shapes/dtypes of ``model.init``, filled with numpy.

    The structure comes from ``jax.eval_shape(model.init, ...)`` (the same code path as ``init``);
    the values are drawn with numpy because compiling jax.random for every kernel shape takes tens
    of seconds on a small CPU, which would dominate this test file.
    """
    shapes = jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, size, size, 3), jnp.float32))
    rng = np.random.default_rng(seed)

    def fill(path, leaf):
        name = path[-1].key
        if name == "kernel":
            fan_out = int(np.prod(leaf.shape[:-2])) * leaf.shape[-1]
            value = rng.standard_normal(leaf.shape) * np.sqrt(2.0 / fan_out)
        elif name in ("scale", "var"):
            value = rng.uniform(0.5, 1.5, leaf.shape)
        else:  # bias, mean
            value = 0.1 * rng.standard_normal(leaf.shape)
        return jnp.asarray(value, leaf.dtype)

    return jax.tree_util.tree_map_with_path(fill, shapes)


def _leaf_paths(tree):
    return [tuple(k.key for k in p) for p, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_fake_state_dict_matches_torchvision_key_counts():
    # torchvision resnet18 / resnet50 state dicts have 122 / 320 entries.
    assert len(torchvision_state_dict(18, WIDTH)) == 122
    assert len(torchvision_state_dict(50, WIDTH)) == 320


@pytest.mark.parametrize("depth", [18, 50])
def test_output_shapes_and_strides(depth):
    model = ResNet(depth=depth, norm="frozen_bn", width=WIDTH)
    variables = _init(model)
    assert set(variables) == {"params", FROZEN_COLLECTION}
    out = model.apply(variables, jnp.ones((1, 64, 64, 3)))
    chans = feature_channels(depth, WIDTH)
    assert chans == model.num_channels
    exp = 1 if depth == 18 else 4
    assert chans == {f"stride{s}": WIDTH * m * exp for s, m in [(4, 1), (8, 2), (16, 4), (32, 8)]}
    for s in (4, 8, 16, 32):
        assert out[f"stride{s}"].shape == (1, 64 // s, 64 // s, chans[f"stride{s}"])
    assert feature_channels(50) == {"stride4": 256, "stride8": 512, "stride16": 1024, "stride32": 2048}
    assert feature_channels(18)["stride32"] == 512


def test_odd_input_sizes_follow_torchvision_arithmetic():
    model = ResNet(depth=18, width=WIDTH)
    variables = _init(model, 32)
    out = model.apply(variables, jnp.ones((1, 45, 37, 3)))
    h, w = 45, 37
    conv = lambda n, k, s, p: (n + 2 * p - k) // s + 1  # noqa: E731
    h, w = conv(conv(h, 7, 2, 3), 3, 2, 1), conv(conv(w, 7, 2, 3), 3, 2, 1)
    assert out["stride4"].shape[1:3] == (h, w)
    for level in ("stride8", "stride16", "stride32"):
        h, w = conv(h, 3, 2, 1), conv(w, 3, 2, 1)
        assert out[level].shape[1:3] == (h, w)


def test_frozen_bn_has_no_trainable_params():
    model = ResNet(depth=18, norm="frozen_bn", width=WIDTH)
    variables = _init(model)
    params, frozen = variables["params"], variables[FROZEN_COLLECTION]
    assert all(p[-1] == "kernel" for p in _leaf_paths(params))
    assert {p[-1] for p in _leaf_paths(frozen)} == {"scale", "bias", "mean", "var"}

    def loss(p):
        out = model.apply({"params": p, FROZEN_COLLECTION: frozen}, jnp.ones((1, 64, 64, 3)))
        return sum(jnp.sum(v) for v in out.values())

    grads = jax.grad(loss)(params)
    assert _leaf_paths(grads) == _leaf_paths(params)
    assert all(p[-1] == "kernel" for p in _leaf_paths(grads))


def test_frozen_bn_is_the_fixed_affine():
    rng = np.random.default_rng(1)
    c = 5
    stats = {
        "scale": rng.uniform(0.5, 2, c).astype(np.float32),
        "bias": rng.standard_normal(c).astype(np.float32),
        "mean": rng.standard_normal(c).astype(np.float32),
        "var": rng.uniform(0.1, 3, c).astype(np.float32),
    }
    x = rng.standard_normal((2, 3, 4, c)).astype(np.float32)
    layer = FrozenBatchNorm()
    init = layer.init(jax.random.PRNGKey(0), x)
    assert "params" not in init and set(init[FROZEN_COLLECTION]) == set(stats)
    y = layer.apply({FROZEN_COLLECTION: stats}, x)
    ref = (x - stats["mean"]) / np.sqrt(stats["var"] + 1e-5) * stats["scale"] + stats["bias"]
    np.testing.assert_allclose(np.asarray(y), ref, rtol=1e-5, atol=1e-5)


def test_group_norm_is_trainable_and_has_no_frozen_stats():
    model = ResNet(depth=18, norm="group_norm", width=WIDTH)
    variables = _init(model)
    assert set(variables) == {"params"}
    leaves = _leaf_paths(variables["params"])
    assert ("bn1", "scale") in leaves and ("layer2_0", "downsample_bn", "bias") in leaves
    assert all(p[-1] in ("kernel", "scale", "bias") for p in leaves)
    out = model.apply(variables, jnp.ones((1, 64, 64, 3)))
    assert out["stride32"].shape == (1, 2, 2, 8 * WIDTH)
    # GroupNorm scale/bias are ordinary params and receive gradients.
    grads = jax.grad(lambda p: jnp.sum(model.apply({"params": p}, jnp.ones((1, 64, 64, 3)))["stride4"]))(variables["params"])
    assert float(jnp.abs(grads["bn1"]["scale"]).sum()) > 0


def test_bfloat16_compute_keeps_float32_params():
    model = ResNet(depth=18, width=WIDTH, dtype=jnp.bfloat16)
    variables = _init(model, 32)
    assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(variables))
    out = model.apply(variables, jnp.ones((1, 32, 32, 3)))
    assert all(v.dtype == jnp.bfloat16 for v in out.values())


@pytest.mark.parametrize("depth", [18, 50])
def test_fake_torchvision_checkpoint_loads_in_place(tmp_path, depth):
    sd = torchvision_state_dict(depth, WIDTH, seed=depth)
    path = tmp_path / f"resnet{depth}.safetensors"
    save_file(sd, str(path))
    params, frozen = load_torchvision_resnet(path, depth=depth, norm="frozen_bn", width=WIDTH)

    model = ResNet(depth=depth, norm="frozen_bn", width=WIDTH)
    variables = _init(model)
    # Same tree structure and shapes as the model's own variables.
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(variables["params"])
    assert jax.tree_util.tree_structure(frozen) == jax.tree_util.tree_structure(variables[FROZEN_COLLECTION])
    for a, b in zip(jax.tree_util.tree_leaves(params), jax.tree_util.tree_leaves(variables["params"])):
        assert a.shape == b.shape and a.dtype == np.float32

    # Conv kernels: [O, I, kh, kw] -> [kh, kw, I, O].
    np.testing.assert_array_equal(params["conv1"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0))
    w = sd["conv1.weight"]
    assert params["conv1"]["kernel"][1, 2, 0, 3] == w[3, 0, 1, 2]
    np.testing.assert_array_equal(
        params["layer2_0"]["downsample_conv"]["kernel"], sd["layer2.0.downsample.0.weight"].transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(params["layer4_1"]["conv2"]["kernel"], sd["layer4.1.conv2.weight"].transpose(2, 3, 1, 0))
    # BN statistics.
    np.testing.assert_array_equal(frozen["bn1"]["scale"], sd["bn1.weight"])
    np.testing.assert_array_equal(frozen["bn1"]["bias"], sd["bn1.bias"])
    np.testing.assert_array_equal(frozen["bn1"]["mean"], sd["bn1.running_mean"])
    np.testing.assert_array_equal(frozen["bn1"]["var"], sd["bn1.running_var"])
    np.testing.assert_array_equal(frozen["layer3_1"]["bn2"]["mean"], sd["layer3.1.bn2.running_mean"])
    np.testing.assert_array_equal(frozen["layer4_0"]["downsample_bn"]["var"], sd["layer4.0.downsample.1.running_var"])
    if depth == 50:
        np.testing.assert_array_equal(params["layer1_0"]["conv3"]["kernel"], sd["layer1.0.conv3.weight"].transpose(2, 3, 1, 0))
        np.testing.assert_array_equal(frozen["layer1_0"]["bn3"]["scale"], sd["layer1.0.bn3.weight"])
        np.testing.assert_array_equal(params["layer1_0"]["downsample_conv"]["kernel"][0, 0], sd["layer1.0.downsample.0.weight"][:, :, 0, 0].T)

    # Every conv weight of the checkpoint is used exactly once.
    n_convs = sum(1 for k in sd if k.endswith(".weight") and sd[k].ndim == 4)
    assert n_convs == len(jax.tree_util.tree_leaves(params))
    out = model.apply({"params": params, FROZEN_COLLECTION: frozen}, jnp.ones((1, 64, 64, 3)))
    assert all(np.isfinite(np.asarray(v)).all() for v in out.values())


def test_group_norm_load_uses_bn_affine_and_ignores_running_stats(tmp_path):
    sd = torchvision_state_dict(18, WIDTH)
    path = tmp_path / "r18.safetensors"
    save_file(sd, str(path))
    params, frozen = load_torchvision_resnet(path, depth=18, norm="group_norm", width=WIDTH)
    assert frozen == {}
    np.testing.assert_array_equal(params["bn1"]["scale"], sd["bn1.weight"])
    np.testing.assert_array_equal(params["layer2_0"]["downsample_bn"]["bias"], sd["layer2.0.downsample.1.bias"])
    variables = _init(ResNet(depth=18, norm="group_norm", width=WIDTH))
    assert jax.tree_util.tree_structure(params) == jax.tree_util.tree_structure(variables["params"])


@pytest.mark.parametrize(
    "defect, key",
    [
        ("extra", "layer1.0.conv4.weight"),
        ("missing", "layer2.0.downsample.0.weight"),
        ("shape", "layer3.1.bn2.running_var"),
        ("shape", "layer1.1.conv2.weight"),
    ],
)
def test_checkpoint_mismatches_raise_naming_key_and_file(tmp_path, defect, key):
    sd = torchvision_state_dict(18, WIDTH)
    if defect == "extra":
        sd[key] = np.zeros((WIDTH, WIDTH, 3, 3), np.float32)
    elif defect == "missing":
        del sd[key]
    else:
        sd[key] = np.concatenate([sd[key], sd[key][:1]])
    path = tmp_path / f"bad_{defect}.safetensors"
    save_file(sd, str(path))
    with pytest.raises(PretrainedMismatchError) as err:
        load_torchvision_resnet(path, depth=18, norm="frozen_bn", width=WIDTH)
    msg = str(err.value)
    assert key in msg and str(path) in msg
    assert {"extra": "unexpected", "missing": "missing", "shape": "shape"}[defect] in msg


def test_wrong_depth_checkpoint_is_rejected(tmp_path):
    path = tmp_path / "r50.safetensors"
    save_file(torchvision_state_dict(50, WIDTH), str(path))
    with pytest.raises(PretrainedMismatchError, match="conv3"):
        load_torchvision_resnet(path, depth=18, width=WIDTH)


def test_pth_without_torch_gives_clear_error(tmp_path):
    try:
        import torch  # noqa: F401
    except ImportError:
        path = tmp_path / "r18.pth"
        path.write_bytes(b"not really a checkpoint")
        with pytest.raises(ImportError, match="safetensors"):
            read_state_dict(path)
    else:
        pytest.skip("torch is installed; the .pth path is exercised for real")


def _numpy_conv(x, w_torch, stride, pad):
    """Explicit NHWC conv with a torch [O, I, kh, kw] weight and symmetric zero padding."""
    n, h, w, _ = x.shape
    o, _, kh, kw = w_torch.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
    oh, ow = (h + 2 * pad - kh) // stride + 1, (w + 2 * pad - kw) // stride + 1
    out = np.zeros((n, oh, ow, o), np.float64)
    for i in range(oh):
        for j in range(ow):
            patch = xp[:, i * stride : i * stride + kh, j * stride : j * stride + kw, :]  # n, kh, kw, c
            out[:, i, j, :] = np.einsum("nhwc,ochw->no", patch, w_torch)
    return out


def _numpy_maxpool(x, k=3, stride=2, pad=1):
    n, h, w, c = x.shape
    xp = np.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=-np.inf)
    oh, ow = (h + 2 * pad - k) // stride + 1, (w + 2 * pad - k) // stride + 1
    out = np.empty((n, oh, ow, c))
    for i in range(oh):
        for j in range(ow):
            out[:, i, j] = xp[:, i * stride : i * stride + k, j * stride : j * stride + k].max(axis=(1, 2))
    return out


def test_stem_matches_numpy_reference_torchvision_padding(tmp_path):
    sd = torchvision_state_dict(18, WIDTH, seed=3)
    # Make layer1's residual branches output 0, so stride4 == the stem's max-pool output.
    for b in (0, 1):
        sd[f"layer1.{b}.bn2.weight"][:] = 0.0
        sd[f"layer1.{b}.bn2.bias"][:] = 0.0
    path = tmp_path / "r18.safetensors"
    save_file(sd, str(path))
    params, frozen = load_torchvision_resnet(path, depth=18, width=WIDTH)

    x = np.random.default_rng(4).standard_normal((2, 13, 10, 3)).astype(np.float32)
    model = ResNet(depth=18, width=WIDTH)
    out, state = model.apply(
        {"params": params, FROZEN_COLLECTION: frozen},
        jnp.asarray(x),
        capture_intermediates=lambda mdl, _: mdl.name in ("conv1", "bn1") and mdl.scope.path_text.count("/") == 1,
        mutable=["intermediates"],
    )
    conv_out = np.asarray(state["intermediates"]["conv1"]["__call__"][0])
    bn_out = np.asarray(state["intermediates"]["bn1"]["__call__"][0])

    ref_conv = _numpy_conv(x.astype(np.float64), sd["conv1.weight"].astype(np.float64), stride=2, pad=3)
    assert conv_out.shape == ref_conv.shape == (2, 7, 5, WIDTH)
    np.testing.assert_allclose(conv_out, ref_conv, rtol=1e-4, atol=1e-4)

    ref_bn = (ref_conv - sd["bn1.running_mean"]) / np.sqrt(sd["bn1.running_var"] + 1e-5) * sd["bn1.weight"] + sd["bn1.bias"]
    np.testing.assert_allclose(bn_out, ref_bn, rtol=1e-4, atol=1e-4)

    ref_pool = _numpy_maxpool(np.maximum(ref_bn, 0.0))
    assert out["stride4"].shape == ref_pool.shape == (2, 4, 3, WIDTH)
    np.testing.assert_allclose(np.asarray(out["stride4"]), ref_pool, rtol=1e-4, atol=1e-4)


def test_merge_pretrained_into_bigger_model(tmp_path):
    class Detector(nn.Module):
        @nn.compact
        def __call__(self, x):
            feats = ResNet(depth=18, width=WIDTH, name="backbone")(x)
            return nn.Dense(4, name="head")(feats["stride32"].mean(axis=(1, 2)))

    det = Detector()
    variables = _init(det)
    sd = torchvision_state_dict(18, WIDTH)
    path = tmp_path / "r18.safetensors"
    save_file(sd, str(path))
    bb_params, bb_frozen = load_torchvision_resnet(path, depth=18, width=WIDTH)

    params = merge_pretrained(variables["params"], bb_params, "backbone")
    frozen = merge_pretrained(variables[FROZEN_COLLECTION], bb_frozen, ("backbone",))
    np.testing.assert_array_equal(params["backbone"]["conv1"]["kernel"], sd["conv1.weight"].transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(frozen["backbone"]["bn1"]["var"], sd["bn1.running_var"])
    np.testing.assert_array_equal(params["head"]["kernel"], variables["params"]["head"]["kernel"])
    # The input tree is not modified.
    assert not np.array_equal(variables["params"]["backbone"]["conv1"]["kernel"], params["backbone"]["conv1"]["kernel"])
    det.apply({"params": params, FROZEN_COLLECTION: frozen}, jnp.ones((1, 32, 32, 3)))

    with pytest.raises(PretrainedMismatchError, match="backbone"):
        merge_pretrained(variables["params"], bb_params, "encoder/backbone")
    bad = jax.tree_util.tree_map(lambda a: a, bb_params)
    del bad["layer1_0"]
    with pytest.raises(PretrainedMismatchError, match="layer1_0"):
        merge_pretrained(variables["params"], bad, "backbone")
