"""Loading torchvision ResNet checkpoints into ``lld_jax.models.resnet.ResNet``.

``load_torchvision_resnet(path, depth, norm, width=64) -> (params, frozen_stats)`` reads a
torchvision-style ResNet state dict (``conv1.weight``, ``bn1.running_mean``, ``layer1.0.conv1.weight``,
``layer2.0.downsample.0.weight``, ...) and returns the two variable trees of ``ResNet``:

* ``params``: conv kernels (torch ``[O, I, kh, kw]`` -> flax ``[kh, kw, I, O]``), plus GroupNorm
  ``scale``/``bias`` when ``norm='group_norm'``.
* ``frozen_stats``: for ``norm='frozen_bn'``, each BatchNorm's ``weight/bias/running_mean/running_var``
  as ``scale/bias/mean/var``; ``{}`` for ``norm='group_norm'``.

Supported files: ``.safetensors`` (``safetensors.numpy``, no torch needed) and ``.pth``/``.pt``
(needs torch; state dicts nested under ``'state_dict'`` or ``'model'`` are unwrapped). Convert a
``.pth`` once with::

    python -c "import torch, safetensors.torch as st; sd = torch.load('r50.pth', map_location='cpu');
               st.save_file({k: v.contiguous() for k, v in sd.items()}, 'r50.safetensors')"

Strictness: ``fc.*`` and ``*.num_batches_tracked`` are ignored (and, for ``group_norm``, the
BatchNorm ``running_mean``/``running_var``, since GroupNorm has no running statistics: its scale/bias
are initialised from the BN weight/bias, which is only an initialisation, not an equivalent
network). Every other checkpoint key must map to a model variable, every model variable must be in
the checkpoint, and shapes must agree; otherwise ``PretrainedMismatchError`` lists all offending
keys together with the file path.
"""

from __future__ import annotations

import os
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from lld_jax.models.resnet import FROZEN_COLLECTION, ResNet

# Flax leaf name -> torchvision BatchNorm suffix.
_FROZEN_BN = {"scale": "weight", "bias": "bias", "mean": "running_mean", "var": "running_var"}
_GROUP_NORM = {"scale": "weight", "bias": "bias"}


class PretrainedMismatchError(ValueError):
    """A checkpoint does not match the model: unexpected keys, missing keys or wrong shapes."""


# ----------------------------------------------------------------------------------------------
# Reading state dicts.


def _to_numpy(value) -> np.ndarray:
    if hasattr(value, "detach"):  # torch.Tensor
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    return np.asarray(value)


def read_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """Reads a flat ``{name: array}`` state dict from ``.safetensors`` or ``.pth``/``.pt``/``.bin``."""
    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"Pretrained checkpoint not found: {path}")
    if path.endswith(".safetensors"):
        from safetensors.numpy import load_file

        return {k: np.asarray(v) for k, v in load_file(path).items()}
    if path.endswith((".pth", ".pt", ".bin", ".ckpt")):
        try:
            import torch
        except ImportError as e:
            raise ImportError(
                f"Reading the PyTorch checkpoint {path} needs torch, which is not installed. Either "
                "install torch, or convert the checkpoint to .safetensors on a machine that has it "
                "(see lld_jax.models.pretrained's docstring) and pass the .safetensors file."
            ) from e
        try:
            sd = torch.load(path, map_location="cpu", weights_only=True)
        except TypeError:  # torch < 1.13 has no weights_only
            sd = torch.load(path, map_location="cpu")
        for wrapper in ("state_dict", "model"):
            if isinstance(sd, Mapping) and wrapper in sd and isinstance(sd[wrapper], Mapping):
                sd = sd[wrapper]
        if not isinstance(sd, Mapping):
            raise ValueError(f"{path} does not hold a state dict (got {type(sd).__name__}).")
        return {str(k): _to_numpy(v) for k, v in sd.items()}
    raise ValueError(f"Unsupported checkpoint format {path!r}: expected .safetensors, .pth or .pt.")


# ----------------------------------------------------------------------------------------------
# Name mapping.


def _torch_module_name(flax_path: Sequence[str]) -> str:
    """('layer2_0', 'downsample_conv') -> 'layer2.0.downsample.0'; ('conv1',) -> 'conv1'."""
    parts = []
    for p in flax_path:
        if p.startswith("layer") and "_" in p:
            stage, block = p.split("_", 1)
            parts += [stage, block]
        elif p == "downsample_conv":
            parts += ["downsample", "0"]
        elif p == "downsample_bn":
            parts += ["downsample", "1"]
        else:
            parts.append(p)
    return ".".join(parts)


def _expected_variables(depth: int, norm: str, width: int) -> dict[str, Any]:
    model = ResNet(depth=depth, norm=norm, width=width)
    return jax.eval_shape(model.init, jax.random.PRNGKey(0), jnp.zeros((1, 32, 32, 3), jnp.float32))


def torchvision_key_map(depth: int, norm: str, width: int = 64) -> dict[str, tuple[tuple[str, ...], tuple[int, ...], bool]]:
    """torchvision key -> (flax path incl. collection, flax shape, is_conv_kernel) for every model variable."""
    variables = _expected_variables(depth, norm, width)
    mapping = {}
    for collection, tree in variables.items():
        for key_path, leaf in jax.tree_util.tree_flatten_with_path(tree)[0]:
            names = tuple(k.key for k in key_path)
            module, leaf_name = names[:-1], names[-1]
            torch_module = _torch_module_name(module)
            if leaf_name == "kernel":
                suffix, is_conv = "weight", True
            elif collection == FROZEN_COLLECTION:
                suffix, is_conv = _FROZEN_BN[leaf_name], False
            else:
                suffix, is_conv = _GROUP_NORM[leaf_name], False
            mapping[f"{torch_module}.{suffix}"] = ((collection,) + names, tuple(leaf.shape), is_conv)
    return mapping


def _ignored(key: str, norm: str) -> bool:
    if key.startswith("fc.") or key.endswith(".num_batches_tracked"):
        return True
    if norm == "group_norm" and key.endswith((".running_mean", ".running_var")):
        return True
    return False


def _set(tree: dict, path: Sequence[str], value) -> None:
    for p in path[:-1]:
        tree = tree.setdefault(p, {})
    tree[path[-1]] = value


def load_torchvision_resnet(
    path: str | os.PathLike,
    depth: int,
    norm: str = "frozen_bn",
    width: int = 64,
    strip_prefix: str = "",
) -> tuple[dict, dict]:
    """Loads a torchvision ResNet state dict as ``(params, frozen_stats)`` for ``ResNet(depth, norm, width=width)``.

    Args:
      path: ``.safetensors`` or ``.pth``/``.pt`` file with torchvision key names.
      depth: 18, 34 or 50.
      norm: 'frozen_bn' (BN weight/bias/running_mean/running_var -> frozen scale/bias/mean/var) or
        'group_norm' (BN weight/bias -> GroupNorm scale/bias; running stats are ignored, so the
        result is an initialisation, not the same function as the BN network).
      width: base width of the model (64 for real checkpoints).
      strip_prefix: keys are kept only if they start with this prefix, which is then removed
        (e.g. 'backbone.0.body.' for a DETR checkpoint, 'module.' for DataParallel). '' keeps all.

    Returns:
      ``(params, frozen_stats)``: nested dicts of float32 numpy arrays matching
      ``model.init(...)['params']`` and ``model.init(...)['frozen_stats']`` ({} for group_norm).

    Raises:
      PretrainedMismatchError: listing unexpected keys, missing keys and shape mismatches.
    """
    path = os.fspath(path)
    sd = read_state_dict(path)
    if strip_prefix:
        sd = {k[len(strip_prefix):]: v for k, v in sd.items() if k.startswith(strip_prefix)}
    mapping = torchvision_key_map(depth, norm, width)

    unexpected = sorted(k for k in sd if k not in mapping and not _ignored(k, norm))
    missing = sorted(k for k in mapping if k not in sd)
    mismatched = []
    variables: dict[str, dict] = {"params": {}, FROZEN_COLLECTION: {}}
    for key, (flax_path, flax_shape, is_conv) in mapping.items():
        if key not in sd:
            continue
        value = np.asarray(sd[key])
        if is_conv:
            if value.ndim != 4:
                mismatched.append(f"{key}: checkpoint {tuple(value.shape)}, expected a 4-d [O, I, kh, kw] conv weight")
                continue
            value = value.transpose(2, 3, 1, 0)  # [O, I, kh, kw] -> [kh, kw, I, O]
        if tuple(value.shape) != flax_shape:
            want = (flax_shape[3], flax_shape[2], flax_shape[0], flax_shape[1]) if is_conv else flax_shape
            got = tuple(np.asarray(sd[key]).shape)
            mismatched.append(f"{key}: checkpoint {got}, model expects {want}")
            continue
        _set(variables, flax_path, value.astype(np.float32))

    if unexpected or missing or mismatched:
        lines = [f"Checkpoint {path} does not match ResNet(depth={depth}, norm={norm!r}, width={width}):"]
        if unexpected:
            lines.append(f"  unexpected keys ({len(unexpected)}): " + ", ".join(unexpected))
        if missing:
            lines.append(f"  missing keys ({len(missing)}): " + ", ".join(missing))
        if mismatched:
            lines.append(f"  shape mismatches ({len(mismatched)}): " + "; ".join(mismatched))
        raise PretrainedMismatchError("\n".join(lines))
    return variables["params"], variables[FROZEN_COLLECTION]


# ----------------------------------------------------------------------------------------------
# Placing a loaded backbone into a larger model.


def _as_path(path: str | Sequence[str]) -> tuple[str, ...]:
    if isinstance(path, str):
        return tuple(p for p in path.split("/") if p)
    return tuple(path)


def _to_dict(tree):
    if isinstance(tree, Mapping):
        return {k: _to_dict(v) for k, v in tree.items()}
    return tree


def merge_pretrained(tree: Mapping, loaded: Mapping, path: str | Sequence[str] = "backbone", dtype=None) -> dict:
    """Returns a copy of ``tree`` whose subtree at ``path`` is replaced by ``loaded``.

    Use it once per collection, e.g.::

        bb_params, bb_frozen = load_torchvision_resnet(ckpt, depth=50)
        params = merge_pretrained(variables['params'], bb_params, 'backbone')
        frozen = merge_pretrained(variables['frozen_stats'], bb_frozen, 'backbone')

    ``path`` is a '/'-separated string or a sequence of keys (``()`` / '' replaces the root). The
    existing subtree must have exactly the same keys and shapes as ``loaded``; otherwise a
    ``PretrainedMismatchError`` names the differing paths. Leaves are converted to jax arrays
    with the dtype of the leaf they replace (or ``dtype`` if given).
    """
    keys = _as_path(path)
    tree = _to_dict(tree)
    target = tree
    for i, k in enumerate(keys):
        if not isinstance(target, Mapping) or k not in target:
            where = "/".join(keys[: i + 1])
            raise PretrainedMismatchError(
                f"merge_pretrained: cannot place the weights at {'/'.join(keys)!r}: the model tree has no {where!r}."
            )
        target = target[k]

    old = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(target)[0]}
    new = {jax.tree_util.keystr(p): x for p, x in jax.tree_util.tree_flatten_with_path(_to_dict(loaded))[0]}
    problems = [f"missing from loaded: {k}" for k in sorted(set(old) - set(new))]
    problems += [f"not in model: {k}" for k in sorted(set(new) - set(old))]
    problems += [
        f"shape {k}: model {tuple(old[k].shape)}, loaded {tuple(np.shape(new[k]))}"
        for k in sorted(set(old) & set(new))
        if tuple(old[k].shape) != tuple(np.shape(new[k]))
    ]
    if problems:
        raise PretrainedMismatchError(
            f"merge_pretrained at {'/'.join(keys) or '<root>'!r}: " + "; ".join(problems)
        )

    def convert(old_leaf, new_leaf):
        return jnp.asarray(new_leaf, dtype=dtype or old_leaf.dtype)

    replaced = jax.tree_util.tree_map(convert, target, _to_dict(loaded))
    if not keys:
        return replaced
    parent = tree
    for k in keys[:-1]:
        parent = parent[k]
    parent[keys[-1]] = replaced
    return tree
