"""Convert Google's V-MoE checkpoints (google-research/vmoe, JAX/Flax) into hf_vmoe folders.

Reads both file formats vmoe writes, with numpy and msgpack only (no JAX, TensorFlow or GPU):

* **sharded** (`vmoe/checkpoints/partitioned.py`): `<prefix>.index` holds `{"shard_count": N, "index": tree,
  "version": "20220622"}` (no `version` in checkpoints written before 2022-06-22), whose leaves are `IndexInfo`
  records (msgpack ext 8: global shape and dtype, the global slice of every chunk, the shard holding it). Each
  `<prefix>.data-nnnnn-of-NNNNN` is a msgpack map `{"__msgpack_array_chunk_a87ca2__": True, "<leaf>": [[subchunks,
  slice], ...]}`: `<leaf>` is the position of the array among the index tree's leaves in JAX flattening order (dict
  keys sorted), `subchunks` are flat pieces (ext 1 ndarrays) of the chunk, `slice` its global `SliceNd` (ext 6).
* **Flax msgpack** (`flax.serialization.to_bytes`, also vmoe's single-file `checkpoints.base.save_checkpoint`): a
  msgpack state dict whose arrays are ext 1 (`(shape, dtype name, C-order bytes)`), scalars ext 3, complex ext 2,
  and arrays over 1 GiB `{"__msgpack_chunked_array__": True, "shape": {...}, "chunks": {"0": ..., ...}}`.

The parameter tree of `vmoe.nn.vit_moe.VisionTransformerMoe` (at the top, or under `params`) maps onto the state
dict of `VMoEForImageClassification`; the architecture is read from the tree's shapes and checked against the
vmoe model config (a preset named after the released checkpoint, or fields given as JSON), which also gives what the
tree cannot show (k, capacities, batch-priority routing, group size, losses). What hf_vmoe cannot represent is
reported: structurally different models (E^3 ensembles, MAP heads, ...) raise a ValueError; numerics that would differ
at inference (with a VMoEConfig lacking a parity option) warn, or raise with `strict=True`; training-only
differences (expert dropout, router noise samples, ...) are listed in the result and in `config.vmoe_reference`.

The exact spec of what vmoe computes and how each field maps is docs/vmoe-parity-spec.md; usage is
docs/vmoe-checkpoints.md.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import os
import shutil
import tempfile
import warnings
from collections.abc import Callable, Mapping
from pathlib import Path

import msgpack
import numpy as np
import torch

from ..configuration_vmoe import to_pair

__all__ = [
    "VMOE_PRESETS",
    "ConversionResult",
    "VMoEIndexInfo",
    "convert_vmoe_checkpoint",
    "hf_config_from_vmoe",
    "infer_vmoe_architecture",
    "load_vmoe_params",
    "read_flax_msgpack",
    "read_vmoe_sharded",
    "resolve_vmoe_config",
    "vmoe_params_to_state_dict",
]

# ----------------------------------------------------------------------------------------------------------------
# msgpack decoding (the encodings of flax.serialization and vmoe/checkpoints/serialization.py)
# ----------------------------------------------------------------------------------------------------------------

_EXT_NDARRAY, _EXT_COMPLEX, _EXT_NPSCALAR = 1, 2, 3  # flax.serialization._MsgpackExtType
_EXT_SHAPED_ARRAY, _EXT_SLICE, _EXT_SLICE_ND, _EXT_SLICE_ND_ARRAY, _EXT_INDEX_INFO = 4, 5, 6, 7, 8  # vmoe's additions
_ARRAY_CHUNKS_KEY = "__msgpack_array_chunk_a87ca2__"  # vmoe: a checkpoint shard (LazyArrayChunks / ArrayChunks)
_FLAX_CHUNKED_KEY = "__msgpack_chunked_array__"  # flax: an array over MAX_CHUNK_SIZE split into flat chunks
_KNOWN_VERSIONS = (None, "20220622")  # vmoe.checkpoints.partitioned.Version: UNKNOWN (pre-2022-06-22), V1


class _Bfloat16:
    """numpy has no bfloat16: arrays of this dtype are widened to float32 (exactly) when decoded."""


def _dtype_from_name(name) -> np.dtype | type:
    if isinstance(name, bytes):
        name = name.decode("ascii", errors="replace")
    if name == "bfloat16":
        return _Bfloat16
    try:
        return np.dtype(name)
    except TypeError:
        raise ValueError(f"unsupported array dtype {name!r} in the checkpoint") from None


def _array_from_buffer(shape, dtype_name, buffer) -> np.ndarray:
    dtype = _dtype_from_name(dtype_name)
    shape = tuple(int(s) for s in shape)
    count = math.prod(shape)
    if dtype is _Bfloat16:
        if len(buffer) != 2 * count:
            raise ValueError(f"bfloat16 array of shape {shape} needs {2 * count} bytes, the checkpoint has {len(buffer)}")
        bits = np.frombuffer(buffer, dtype="<u2").astype(np.uint32) << 16
        return bits.view(np.float32).reshape(shape)
    if len(buffer) != count * dtype.itemsize:
        raise ValueError(
            f"{dtype.name} array of shape {shape} needs {count * dtype.itemsize} bytes, the checkpoint has {len(buffer)}"
        )
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


def _ndarray_from_ext(data: bytes) -> np.ndarray:
    shape, dtype_name, buffer = msgpack.unpackb(data, raw=True)
    return _array_from_buffer(shape, dtype_name, buffer)


def _slice_from_bytes(data: bytes) -> tuple[int, int]:
    start, stop, step = msgpack.unpackb(data, raw=True)
    if step not in (None, 1) or start is None or stop is None:
        raise ValueError(f"unsupported chunk slice ({start}, {stop}, {step}) in the checkpoint")
    return int(start), int(stop)


def _slice_nd_from_bytes(data: bytes) -> tuple[tuple[int, int], ...]:
    return tuple(_slice_from_bytes(s) for s in msgpack.unpackb(data, raw=True))


@dataclasses.dataclass(frozen=True)
class VMoEIndexInfo:
    """One array of a sharded checkpoint: global shape and dtype, the global slice of each chunk (a tuple of
    (start, stop) per axis) and the checkpoint shard that stores it."""

    shape: tuple[int, ...]
    dtype: str
    global_slices: tuple[tuple[tuple[int, int], ...], ...]
    shards: tuple[int, ...]


def _index_info_from_ext(data: bytes) -> VMoEIndexInfo:
    shaped, slices, shards = msgpack.unpackb(data, raw=True)
    shape, dtype_name, _weak_type, _ = msgpack.unpackb(shaped, raw=True)
    dtype = dtype_name.decode("ascii", errors="replace") if isinstance(dtype_name, bytes) else str(dtype_name)
    return VMoEIndexInfo(
        shape=tuple(int(s) for s in shape),
        dtype=dtype,
        global_slices=tuple(_slice_nd_from_bytes(s) for s in slices),
        shards=tuple(int(s) for s in shards),
    )


def _ext_hook(code: int, data: bytes):
    if code == _EXT_NDARRAY:
        return _ndarray_from_ext(data)
    if code == _EXT_NPSCALAR:
        return _ndarray_from_ext(data)[()]
    if code == _EXT_COMPLEX:
        real, imag = msgpack.unpackb(data)
        return complex(real, imag)
    if code == _EXT_SLICE:
        return _slice_from_bytes(data)
    if code == _EXT_SLICE_ND:
        return _slice_nd_from_bytes(data)
    if code == _EXT_INDEX_INFO:
        return _index_info_from_ext(data)
    if code == _EXT_SHAPED_ARRAY:
        shape, dtype_name, _, _ = msgpack.unpackb(data, raw=True)
        return ("ShapedArray", tuple(shape), dtype_name)
    raise ValueError(f"unsupported msgpack extension type {code} in the checkpoint")


def _unpack_file(path: Path, what: str):
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise ValueError(f"{what} {str(path)!r} does not exist") from None
    except OSError as err:
        raise ValueError(f"cannot read {what} {str(path)!r}: {err}") from None
    if not data:
        raise ValueError(f"{what} {str(path)!r} is empty")
    try:
        return msgpack.unpackb(data, ext_hook=_ext_hook, raw=False, strict_map_key=False)
    except ValueError as err:  # msgpack's ExtraData / UnpackValueError / FormatError are ValueErrors
        detail = "the file is truncated" if "incomplete" in str(err).lower() else str(err)
        raise ValueError(
            f"{what} {str(path)!r} ({len(data)} bytes) is not a readable msgpack file: {detail}; "
            "download or copy it again"
        ) from None
    except (TypeError, KeyError, IndexError) as err:
        raise ValueError(f"{what} {str(path)!r} is corrupt: {err}") from None


def _unchunk_flax_in_place(tree):
    """flax.serialization._unchunk_array_leaves_in_place: large arrays stored as a dict of flat chunks."""
    if isinstance(tree, dict):
        if tree.get(_FLAX_CHUNKED_KEY) is True:
            shape = tuple(int(tree["shape"][str(i)]) for i in range(len(tree["shape"])))
            chunks = [tree["chunks"][str(i)] for i in range(len(tree["chunks"]))]
            flat = np.concatenate([np.asarray(c).reshape(-1) for c in chunks]) if chunks else np.zeros(0)
            if flat.size != math.prod(shape):
                raise ValueError(f"a chunked array of shape {shape} has {flat.size} elements in its chunks")
            return flat.reshape(shape)
        for key, value in tree.items():
            tree[key] = _unchunk_flax_in_place(value)
    return tree


def read_flax_msgpack(path) -> dict:
    """A Flax msgpack file (`flax.serialization.to_bytes`) as a nested dict of numpy arrays (bfloat16 -> float32)."""
    tree = _unpack_file(Path(path), "Flax msgpack checkpoint")
    if not isinstance(tree, dict):
        raise ValueError(f"{str(path)!r} holds a msgpack {type(tree).__name__}, not a Flax state dict")
    if _ARRAY_CHUNKS_KEY in tree:
        raise ValueError(
            f"{str(path)!r} is one shard of a sharded vmoe checkpoint; pass the checkpoint prefix (the path without "
            "'.index' / '.data-nnnnn-of-NNNNN')"
        )
    return _unchunk_flax_in_place(tree)


def _flatten_index(tree, path=()) -> list[tuple[tuple[str, ...], object]]:
    """Leaves in the order of jax.tree_util.tree_flatten on a state dict: dict keys sorted, None / {} hold no leaf."""
    if isinstance(tree, dict):
        out = []
        for key in sorted(tree):
            out += _flatten_index(tree[key], path + (str(key),))
        return out
    if isinstance(tree, (list, tuple)) and not isinstance(tree, VMoEIndexInfo):
        out = []
        for i, value in enumerate(tree):
            out += _flatten_index(value, path + (str(i),))
        return out
    if tree is None:
        return []
    return [(path, tree)]


def _set_path(tree: dict, path: tuple[str, ...], value):
    node = tree
    for key in path[:-1]:
        node = node.setdefault(key, {})
    node[path[-1]] = value


def _shard_path(prefix: str, shard: int, shard_count: int) -> Path:
    return Path(f"{prefix}.data-{shard:05d}-of-{shard_count:05d}")  # vmoe.checkpoints.base.add_shard_suffix


def read_vmoe_sharded(prefix, select: Callable[[tuple[str, ...]], bool] | None = None) -> dict:
    """A sharded vmoe checkpoint (`<prefix>.index` + `<prefix>.data-nnnnn-of-NNNNN`) as a nested dict of numpy
    arrays. `select(path)` picks the arrays to read (default all); only the shards holding them are read.

    Every chunk is checked against the index (shape, the slice it covers, the shard that should hold it) and every
    selected array must be covered exactly: a missing, truncated or inconsistent shard raises a ValueError naming
    the file and the array."""
    prefix = str(prefix)
    index_path = Path(prefix + ".index")
    index = _unpack_file(index_path, "checkpoint index")
    if not isinstance(index, dict) or "index" not in index or "shard_count" not in index:
        raise ValueError(f"{str(index_path)!r} is not a vmoe checkpoint index (no 'index' / 'shard_count' entries)")
    version = index.get("version")
    if version not in _KNOWN_VERSIONS:
        raise ValueError(f"{str(index_path)!r} has checkpoint version {version!r}; known: {_KNOWN_VERSIONS[1:]}")
    shard_count = index["shard_count"]
    if not isinstance(shard_count, int) or shard_count < 1:
        raise ValueError(f"{str(index_path)!r} has shard_count={shard_count!r}")
    leaves = _flatten_index(index["index"])
    for path, info in leaves:
        if not isinstance(info, VMoEIndexInfo):
            raise ValueError(f"{str(index_path)!r}: the index entry {'/'.join(path)} is not an array record")
        bad = [s for s in info.shards if not 0 <= s < shard_count]
        if bad or len(info.shards) != len(info.global_slices):
            raise ValueError(f"{str(index_path)!r}: the index entry {'/'.join(path)} names shards {info.shards} "
                             f"of {shard_count}")
    wanted = {i: (path, info) for i, (path, info) in enumerate(leaves) if select is None or select(path)}
    buffers = {}
    for i, (_, info) in wanted.items():
        dtype = _dtype_from_name(info.dtype)
        buffers[i] = np.zeros(info.shape, dtype=np.float32 if dtype is _Bfloat16 else dtype)
    received: dict[int, set] = {i: set() for i in wanted}
    shards = sorted({s for _, info in wanted.values() for s in info.shards})
    for shard in shards:
        shard_path = _shard_path(prefix, shard, shard_count)
        content = _unpack_file(shard_path, f"checkpoint shard {shard} of {shard_count}")
        if not isinstance(content, dict) or content.get(_ARRAY_CHUNKS_KEY) is not True:
            raise ValueError(f"{str(shard_path)!r} is not a vmoe checkpoint shard (no array-chunks marker)")
        for key, chunks in content.items():
            if key == _ARRAY_CHUNKS_KEY:
                continue
            try:
                leaf = int(key)
            except (TypeError, ValueError):
                raise ValueError(f"{str(shard_path)!r} has an entry {key!r} that is not an array number") from None
            if not 0 <= leaf < len(leaves):
                raise ValueError(f"{str(shard_path)!r} holds array #{leaf}, but the index has {len(leaves)} arrays")
            if leaf not in wanted:
                continue
            path, info = wanted[leaf]
            name = "/".join(path)
            for chunk in chunks:
                try:
                    subchunks, global_slice = chunk
                except (TypeError, ValueError):
                    raise ValueError(f"{str(shard_path)!r}: a chunk of {name} is malformed") from None
                global_slice = tuple(global_slice)
                if global_slice not in info.global_slices:
                    raise ValueError(f"{str(shard_path)!r}: {name} has a chunk {global_slice} the index does not list "
                                     f"(the index and the shards belong to different checkpoints?)")
                if info.shards[info.global_slices.index(global_slice)] != shard:
                    raise ValueError(f"{str(shard_path)!r}: the index puts chunk {global_slice} of {name} in another shard")
                shape = tuple(stop - start for start, stop in global_slice)
                pieces = [np.asarray(s).reshape(-1) for s in subchunks]
                flat = np.concatenate(pieces) if pieces else np.zeros(0, dtype=buffers[leaf].dtype)
                if flat.size != math.prod(shape):
                    raise ValueError(f"{str(shard_path)!r}: chunk {global_slice} of {name} has {flat.size} values, "
                                     f"its slice needs {math.prod(shape)}")
                buffers[leaf][tuple(slice(start, stop) for start, stop in global_slice)] = flat.reshape(shape)
                received[leaf].add(global_slice)
    out: dict = {}
    for leaf, (path, info) in wanted.items():
        missing = set(info.global_slices) - received[leaf]
        if missing:
            shard = info.shards[info.global_slices.index(sorted(missing)[0])]
            raise ValueError(f"array {'/'.join(path)}: {len(missing)} of its {len(info.global_slices)} chunks are missing "
                             f"from shard file {str(_shard_path(prefix, shard, shard_count))!r}")
        _set_path(out, path, buffers[leaf])
    return out


def _find_params(tree: Mapping, where: str) -> tuple[dict, tuple[str, ...]]:
    """The VisionTransformerMoe parameter tree: at the top, or under `params` (a TrainState or {'params': ...}),
    or `target` (old flax optimizers)."""
    node, path = tree, ()
    for _ in range(4):
        if isinstance(node, Mapping) and ("Encoder" in node or "embedding" in node):
            return node, path
        for key in ("params", "target"):
            if isinstance(node, Mapping) and key in node:
                node, path = node[key], path + (key,)
                break
        else:
            break
    keys = sorted(tree) if isinstance(tree, Mapping) else type(tree).__name__
    raise ValueError(f"{where} holds no V-MoE parameter tree: expected 'Encoder', 'embedding', 'head' ... at the top "
                     f"or under 'params'; found {keys}")


def load_vmoe_params(checkpoint) -> dict:
    """The parameter tree of a vmoe checkpoint: `<prefix>` of a sharded checkpoint (`<prefix>.index` exists) or a
    Flax msgpack file; only the parameters are read from a sharded training state."""
    checkpoint = str(checkpoint)
    if checkpoint.endswith(".index") and not os.path.exists(checkpoint + ".index"):
        checkpoint = checkpoint[: -len(".index")]
    if os.path.exists(checkpoint + ".index"):
        index = _unpack_file(Path(checkpoint + ".index"), "checkpoint index")
        if not isinstance(index, dict) or not isinstance(index.get("index"), dict):
            raise ValueError(f"{checkpoint + '.index'!r} is not a vmoe checkpoint index")
        _, path = _find_params(index["index"], repr(checkpoint + ".index"))
        tree = read_vmoe_sharded(checkpoint, select=lambda p: p[: len(path)] == path)
        for key in path:
            tree = tree[key]
        return tree
    if os.path.isfile(checkpoint):
        return _find_params(read_flax_msgpack(checkpoint), repr(checkpoint))[0]
    if os.path.exists(checkpoint + ".data-00000-of-00001") or any(
        name.startswith(os.path.basename(checkpoint) + ".data-") for name in _listdir(os.path.dirname(checkpoint))
    ):
        raise ValueError(f"the index file {checkpoint + '.index'!r} of the sharded checkpoint is missing")
    raise ValueError(f"no checkpoint at {checkpoint!r}: neither {checkpoint + '.index'!r} (sharded) nor a Flax msgpack file")


def _listdir(path: str) -> list[str]:
    try:
        return os.listdir(path or ".")
    except OSError:
        return []


# ----------------------------------------------------------------------------------------------------------------
# The parameter tree: architecture and weights
# ----------------------------------------------------------------------------------------------------------------


def _shape(tree: Mapping, *path: str) -> tuple[int, ...]:
    node = tree
    for key in path:
        if not isinstance(node, Mapping) or key not in node:
            raise ValueError(f"the checkpoint has no parameter {'/'.join(path)}")
        node = node[key]
    if not hasattr(node, "shape"):
        raise ValueError(f"the checkpoint's {'/'.join(path)} is not an array")
    return tuple(node.shape)


def _get(tree: Mapping, path: str) -> np.ndarray:
    node = tree
    for key in path.split("/"):
        if not isinstance(node, Mapping) or key not in node:
            raise ValueError(f"the checkpoint has no parameter {path}")
        node = node[key]
    return np.asarray(node)


def _flat_paths(tree: Mapping, prefix: str = "") -> list[str]:
    out = []
    for key, value in tree.items():
        name = f"{prefix}{key}"
        out += _flat_paths(value, name + "/") if isinstance(value, Mapping) else [name]
    return out


def infer_vmoe_architecture(params: Mapping) -> dict:
    """What the parameter tree of a `VisionTransformerMoe` shows, as vmoe model-config fields (flat keys as in
    `vmoe.configs.vmoe_paper.common.flatten_dict`) plus `image_size` (square images assumed) and
    `num_positions`. Raises a ValueError for trees of other models (ensembles, MAP heads, ...)."""
    if "Encoder" not in params:
        raise ValueError(f"the checkpoint has no Encoder; top-level parameters: {sorted(params)}")
    encoder = params["Encoder"]
    blocks = sorted(int(k.rpartition("_")[2]) for k in encoder if k.startswith("encoderblock_"))
    if not blocks or blocks != list(range(len(blocks))):
        raise ValueError(f"the checkpoint's encoder blocks are {blocks}; expected encoderblock_0 ... encoderblock_N-1")
    kh, kw, channels, hidden = _shape(params, "embedding", "kernel")
    arch = {"patch_size": (kh, kw), "hidden_size": hidden, "num_channels": channels,
            "encoder.num_layers": len(blocks)}
    if "MapHead" in params:
        raise ValueError("the checkpoint has a MAP head (classifier='map', multihead attention pooling); hf_vmoe "
                         "pools with the class token or the mean only, so it cannot be converted")
    arch["classifier"] = "token" if "cls" in params else "gap"
    if "posembed_input" not in encoder:
        raise ValueError("the checkpoint has no learned position embedding (Encoder/posembed_input): sincos2d or no "
                         "position embeddings are not supported by hf_vmoe")
    _, positions, pos_width = _shape(encoder, "posembed_input", "pos_embedding")
    if pos_width != hidden:
        raise ValueError(f"pos_embedding width {pos_width} != embedding width {hidden}")
    arch["num_positions"] = positions
    patches = positions - (1 if arch["classifier"] == "token" else 0)
    side = math.isqrt(patches)
    if side * side != patches:
        raise ValueError(f"the position embedding has {patches} patch positions, not a square grid: give image_size")
    arch["image_size"] = (side * kh, side * kw)
    mlp_dims, moe_layers, heads, experts, expert_dims = set(), [], set(), set(), set()
    router_params, slots = set(), set()  # "dense" (top-k, expert choice) or "soft"; Soft MoE slots per expert
    for b in blocks:
        block = encoder[f"encoderblock_{b}"]
        if "MultiHeadDotProductAttention_0" in block or "SelfAttention" not in block:
            raise ValueError(f"encoderblock_{b} has no SelfAttention module (keys {sorted(block)})")
        q = _shape(block, "SelfAttention", "query", "kernel")
        if len(q) != 3 or q[0] != hidden:
            raise ValueError(f"encoderblock_{b}/SelfAttention/query/kernel has shape {q}, expected ({hidden}, heads, dim)")
        if "query_ln" in block["SelfAttention"] or "key_ln" in block["SelfAttention"]:
            raise ValueError("the checkpoint normalises queries and keys (attention_qk_norm=True), which hf_vmoe lacks")
        heads.add(q[1])
        if "Moe" in block:
            moe = block["Moe"]
            if isinstance(moe.get("Router"), Mapping) and {"mu", "scale"} & set(moe["Router"]):  # Soft MoE
                mu = _shape(moe, "Router", "mu")
                scale = _shape(moe, "Router", "scale")
                if len(mu) != 3 or mu[0] != hidden or scale not in ((), (1,)):
                    raise ValueError(f"encoderblock_{b}/Moe/Router has mu {mu} and scale {scale}: a Soft MoE router "
                                     f"needs mu ({hidden}, E, slots) and a scalar scale")
                extra = sorted(set(moe["Router"]) - {"mu", "scale"})
                if extra:
                    raise ValueError(f"encoderblock_{b}/Moe/Router has parameters {extra} besides Soft MoE's mu and "
                                     "scale")
                router_experts = mu[1]
                router_params.add("soft")
                slots.add(mu[2])
            else:
                router = _shape(moe, "Router", "dense", "kernel")
                if len(router) == 3:
                    raise ValueError(
                        f"encoderblock_{b}/Moe/Router/dense/kernel has shape {router}: an E^3 ensemble router "
                        "(VisionTransformerMoeEnsemble, ensemble_size members); hf_vmoe has no ensemble routing, so "
                        "E^3 checkpoints cannot be converted"
                    )
                if len(router) != 2 or router[0] != hidden:
                    raise ValueError(f"encoderblock_{b}/Moe/Router/dense/kernel has shape {router}, expected "
                                     f"({hidden}, E)")
                extra = sorted(set(moe["Router"]) - {"dense"})
                if extra:
                    raise ValueError(f"encoderblock_{b}/Moe/Router has parameters {extra} besides 'dense': neither "
                                     "a noisy top-k / top-items router (dense) nor Soft MoE (mu, scale)")
                router_experts = router[1]
                router_params.add("dense")
            up = _shape(moe, "Mlp", "Dense_0", "kernel")
            if len(up) != 3 or up[0] != router_experts or up[1] != hidden:
                raise ValueError(f"encoderblock_{b}/Moe/Mlp/Dense_0/kernel has shape {up}, expected "
                                 f"({router_experts}, {hidden}, mlp_dim)")
            experts.add(up[0])
            expert_dims.add(up[2])
            moe_layers.append(b)
        elif "Mlp" in block:
            mlp_dims.add(_shape(block, "Mlp", "Dense_0", "kernel")[1])
        else:
            raise ValueError(f"encoderblock_{b} has neither Mlp nor Moe (keys {sorted(block)})")
    for name, values in (("num_heads", heads), ("dense mlp_dim", mlp_dims), ("num_experts", experts),
                         ("expert mlp_dim", expert_dims), ("router parameters (dense / Soft MoE)", router_params),
                         ("Soft MoE slots", slots)):
        if len(values) > 1:
            raise ValueError(f"the checkpoint's blocks differ in {name}: {sorted(values)}")
    arch["encoder.num_heads"] = heads.pop()
    if hidden % arch["encoder.num_heads"]:
        raise ValueError(f"hidden size {hidden} is not divisible by {arch['encoder.num_heads']} heads")
    arch["encoder.moe.layers"] = tuple(moe_layers)
    if moe_layers:
        arch["encoder.moe.num_experts"] = experts.pop()
        arch["encoder.moe.mlp_dim"] = expert_dims.pop()
        arch["router_params"] = router_params.pop()
        if slots:
            arch["encoder.moe.router.num_slots"] = slots.pop()
    arch["encoder.mlp_dim"] = mlp_dims.pop() if mlp_dims else arch.get("encoder.moe.mlp_dim")
    if "pre_logits" in params and isinstance(params["pre_logits"], Mapping) and "kernel" in params["pre_logits"]:
        arch["representation_size"] = _shape(params, "pre_logits", "kernel")[1]
    else:
        arch["representation_size"] = None
    if "head" in params:
        head = _shape(params, "head", "kernel")
        features = arch["representation_size"] or hidden
        if head[0] != features:
            raise ValueError(f"head/kernel has shape {head}; its input must be {features} wide")
        arch["num_classes"] = head[1]
    else:
        raise ValueError("the checkpoint has no classification head ('head'); hf_vmoe converts classifiers only")
    return arch


def _expected_paths(arch: Mapping) -> set[str]:
    paths = {"embedding/kernel", "embedding/bias", "Encoder/posembed_input/pos_embedding",
             "Encoder/encoder_norm/scale", "Encoder/encoder_norm/bias", "head/kernel", "head/bias"}
    if arch["classifier"] == "token":
        paths.add("cls")
    if arch["representation_size"]:
        paths |= {"pre_logits/kernel", "pre_logits/bias"}
    for b in range(arch["encoder.num_layers"]):
        block = f"Encoder/encoderblock_{b}"
        for ln in ("LayerNorm_0", "LayerNorm_1"):
            paths |= {f"{block}/{ln}/scale", f"{block}/{ln}/bias"}
        for proj in ("query", "key", "value", "out"):
            paths |= {f"{block}/SelfAttention/{proj}/kernel", f"{block}/SelfAttention/{proj}/bias"}
        mlp = f"{block}/Moe/Mlp" if b in arch["encoder.moe.layers"] else f"{block}/Mlp"
        for dense in ("Dense_0", "Dense_1"):
            paths |= {f"{mlp}/{dense}/kernel", f"{mlp}/{dense}/bias"}
        if b in arch["encoder.moe.layers"] and arch.get("router_params") == "soft":
            paths |= {f"{block}/Moe/Router/mu", f"{block}/Moe/Router/scale"}
        elif b in arch["encoder.moe.layers"]:
            paths.add(f"{block}/Moe/Router/dense/kernel")
    return paths


def vmoe_params_to_state_dict(params: Mapping, arch: Mapping | None = None) -> dict[str, torch.Tensor]:
    """The state dict of `VMoEForImageClassification` (float32) from a VisionTransformerMoe parameter tree.

    Flax kernels are (in, out); torch weights (out, in). Attention kernels are (hidden, heads, head_dim) for
    query/key/value and (heads, head_dim, hidden) for out; expert kernels are stacked (E, in, out) and become
    `experts.up_proj` / `down_proj` (E, out, in); the router kernel (hidden, E) becomes `router.weight` (E, hidden),
    Soft MoE's slot parameters `mu` (hidden, E, P) `router.weight` (E * P, hidden) (expert-major rows) and its `scale`
    `router.scale` (a scalar); the patch embedding (kh, kw, C, D) becomes the Conv2d weight (D, C, kh, kw)."""
    arch = dict(arch) if arch is not None else infer_vmoe_architecture(params)
    present = {p for p in _flat_paths(params) if not p.startswith("pre_logits/") or arch["representation_size"]}
    expected = _expected_paths(arch)
    unexpected = sorted(present - expected)
    missing = sorted(expected - present)
    if unexpected or missing:
        lines = [f"  unexpected: {p}" for p in unexpected[:20]] + [f"  missing: {p}" for p in missing[:20]]
        raise ValueError("the checkpoint's parameter tree does not fit a VisionTransformerMoe:\n" + "\n".join(lines))

    def t(array) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(np.asarray(array, dtype=np.float32)))

    hidden = arch["hidden_size"]
    sd = {
        "vmoe.embeddings.patch_embeddings.projection.weight": t(_get(params, "embedding/kernel").transpose(3, 2, 0, 1)),
        "vmoe.embeddings.patch_embeddings.projection.bias": t(_get(params, "embedding/bias")),
        "vmoe.embeddings.position_embeddings": t(_get(params, "Encoder/posembed_input/pos_embedding")),
        "vmoe.layernorm.weight": t(_get(params, "Encoder/encoder_norm/scale")),
        "vmoe.layernorm.bias": t(_get(params, "Encoder/encoder_norm/bias")),
        "classifier.weight": t(_get(params, "head/kernel").T),
        "classifier.bias": t(_get(params, "head/bias")),
    }
    if arch["classifier"] == "token":
        sd["vmoe.embeddings.cls_token"] = t(_get(params, "cls"))
    if arch["representation_size"]:
        sd["pre_logits.weight"] = t(_get(params, "pre_logits/kernel").T)
        sd["pre_logits.bias"] = t(_get(params, "pre_logits/bias"))
    for b in range(arch["encoder.num_layers"]):
        src, dst = f"Encoder/encoderblock_{b}", f"vmoe.encoder.layer.{b}"
        sd[f"{dst}.layernorm_before.weight"] = t(_get(params, f"{src}/LayerNorm_0/scale"))
        sd[f"{dst}.layernorm_before.bias"] = t(_get(params, f"{src}/LayerNorm_0/bias"))
        sd[f"{dst}.layernorm_after.weight"] = t(_get(params, f"{src}/LayerNorm_1/scale"))
        sd[f"{dst}.layernorm_after.bias"] = t(_get(params, f"{src}/LayerNorm_1/bias"))
        for flax_name, torch_name in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
            kernel = _get(params, f"{src}/SelfAttention/{flax_name}/kernel")
            sd[f"{dst}.attention.{torch_name}.weight"] = t(kernel.reshape(hidden, -1).T)
            sd[f"{dst}.attention.{torch_name}.bias"] = t(_get(params, f"{src}/SelfAttention/{flax_name}/bias").reshape(-1))
        out = _get(params, f"{src}/SelfAttention/out/kernel")
        sd[f"{dst}.attention.o_proj.weight"] = t(out.reshape(-1, hidden).T)
        sd[f"{dst}.attention.o_proj.bias"] = t(_get(params, f"{src}/SelfAttention/out/bias"))
        if b in arch["encoder.moe.layers"]:
            mlp = f"{src}/Moe/Mlp"
            if arch.get("router_params") == "soft":
                mu = _get(params, f"{src}/Moe/Router/mu")
                sd[f"{dst}.mlp.router.weight"] = t(mu.reshape(hidden, -1).T)
                sd[f"{dst}.mlp.router.scale"] = t(_get(params, f"{src}/Moe/Router/scale")).reshape(())
            else:
                sd[f"{dst}.mlp.router.weight"] = t(_get(params, f"{src}/Moe/Router/dense/kernel").T)
            sd[f"{dst}.mlp.experts.up_proj"] = t(_get(params, f"{mlp}/Dense_0/kernel").transpose(0, 2, 1))
            sd[f"{dst}.mlp.experts.up_proj_bias"] = t(_get(params, f"{mlp}/Dense_0/bias"))
            sd[f"{dst}.mlp.experts.down_proj"] = t(_get(params, f"{mlp}/Dense_1/kernel").transpose(0, 2, 1))
            sd[f"{dst}.mlp.experts.down_proj_bias"] = t(_get(params, f"{mlp}/Dense_1/bias"))
        else:
            sd[f"{dst}.mlp.fc1.weight"] = t(_get(params, f"{src}/Mlp/Dense_0/kernel").T)
            sd[f"{dst}.mlp.fc1.bias"] = t(_get(params, f"{src}/Mlp/Dense_0/bias"))
            sd[f"{dst}.mlp.fc2.weight"] = t(_get(params, f"{src}/Mlp/Dense_1/kernel").T)
            sd[f"{dst}.mlp.fc2.bias"] = t(_get(params, f"{src}/Mlp/Dense_1/bias"))
    return sd


# ----------------------------------------------------------------------------------------------------------------
# vmoe model configs: the released checkpoints' presets and the mapping onto VMoEConfig
# ----------------------------------------------------------------------------------------------------------------

# ViT-{S,B,L,H} of the V-MoE paper (vmoe/configs/vmoe_paper/common.py get_vmoe_config): hidden, layers, mlp, heads.
# NB: vmoe's "S" has 8 blocks (not the 12 of DeiT-S).
_VARIANTS = {"S": (512, 8, 2048, 8), "B": (768, 12, 3072, 12), "L": (1024, 24, 4096, 16), "H": (1280, 32, 5120, 16)}


def _paper_model(variant: str, patch: int, experts: int, k: int, where: str, where_num: int, *, image_size: int,
                 num_classes: int, representation_size, capacity_factor: float, head_bias_init: float,
                 moe_dropout: float = 0.0) -> dict:
    """The model config vmoe's paper configs build (common.get_vmoe_config and pretrain_imagenet21k's twin): a
    `VisionTransformerMoe` kwargs dict plus `image_size`."""
    hidden, layers, mlp, heads = _VARIANTS[variant]
    if where == "every":
        moe_layers = tuple(range(where_num - 1, layers, where_num))
    else:  # "last": the last `where_num` odd blocks
        moe_layers = tuple(range(1, layers, 2))[-where_num:]
    tokens = (image_size // patch) ** 2 + 1
    return {
        "name": "VisionTransformerMoe",
        "num_classes": num_classes,
        "patch_size": (patch, patch),
        "hidden_size": hidden,
        "classifier": "token",
        "representation_size": representation_size,
        "head_bias_init": head_bias_init,
        "encoder": {
            "num_layers": layers, "mlp_dim": mlp, "num_heads": heads, "dropout_rate": 0.0,
            "attention_dropout_rate": 0.0,
            "moe": {
                "num_experts": experts, "layers": moe_layers, "dropout_rate": moe_dropout, "split_rngs": False,
                "group_size": 8 * tokens,  # min_batch_size_per_device (8) images per routing group
                "router": {
                    "num_selected_experts": k, "noise_std": 1.0, "importance_loss_weight": 0.005,
                    "load_loss_weight": 0.005,
                    "dispatcher": {"name": "einsum", "bfloat16": True, "capacity_factor": capacity_factor,
                                   "batch_priority": False},
                },
            },
        },
    }


def _preset(description: str, model: dict, image_size: int, eval_capacity_factor: float | None, source: str) -> dict:
    preset = {"description": description, "source": source, "image_size": image_size, "model": model}
    if eval_capacity_factor is not None:  # config.evaluate.model_overrides
        preset["eval_overrides"] = {"encoder": {"moe": {"router": {"dispatcher": {"capacity_factor": eval_capacity_factor}}}}}
    return preset


_S32 = dict(variant="S", patch=32, experts=8, k=2, where="last", where_num=2)
_B16 = dict(variant="B", patch=16, experts=8, k=2, where="every", where_num=2)

# The checkpoints released in gs://vmoe_checkpoints (vmoe README), with the configs that trained them.
VMOE_PRESETS: dict[str, dict] = {
    "vmoe_s32_last2_ilsvrc2012_randaug_light1": _preset(
        "V-MoE S/32, 8 experts on the last 2 odd blocks (5, 7), k=2, ILSVRC2012 from scratch, RandAugment light1, "
        "300 epochs, 224 px",
        _paper_model(**_S32, image_size=224, num_classes=1000, representation_size=512, capacity_factor=1.05,
                     head_bias_init=-math.log(1000), moe_dropout=0.2),
        224, 4.0, "vmoe/configs/vmoe_paper/vmoe_s32_last2_ilsvrc2012_randaug_light1.py"),
    "vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012": _preset(
        "the above fine-tuned on ILSVRC2012 at 384 px (no pre-logits)",
        _paper_model(**_S32, image_size=384, num_classes=1000, representation_size=None, capacity_factor=1.5,
                     head_bias_init=-math.log(1000)),
        384, None, "vmoe/configs/vmoe_paper/vmoe_s32_last2_ilsvrc2012_randaug_light1_ft_ilsvrc2012.py"),
    "vmoe_s32_last2_ilsvrc2012_randaug_medium": _preset(
        "V-MoE S/32, 8 experts on the last 2 odd blocks, k=2, ILSVRC2012 from scratch, RandAugment medium, 1000 "
        "epochs, 224 px (no config in the vmoe repository: assumed to be light1's with another augmentation)",
        _paper_model(**_S32, image_size=224, num_classes=1000, representation_size=512, capacity_factor=1.05,
                     head_bias_init=-math.log(1000), moe_dropout=0.2),
        224, 4.0, "assumed from vmoe_s32_last2_ilsvrc2012_randaug_light1.py"),
    "vmoe_b16_imagenet21k_randaug_strong": _preset(
        "V-MoE B/16, 8 experts on every odd block (1, 3, ..., 11), k=2, ImageNet-21k, RandAugment strong, 300 "
        "epochs, 224 px, 21843 classes (sigmoid loss)",
        _paper_model(**_B16, image_size=224, num_classes=21843, representation_size=None, capacity_factor=1.05,
                     head_bias_init=-10.0),
        224, None, "vmoe/configs/vmoe_paper/pretrain_imagenet21k.py"),
    "vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012": _preset(
        "the above fine-tuned on ILSVRC2012 at 384 px",
        _paper_model(**_B16, image_size=384, num_classes=1000, representation_size=None, capacity_factor=1.5,
                     head_bias_init=-math.log(1000)),
        384, None, "vmoe/configs/vmoe_paper/vmoe_b16_imagenet21k_randaug_strong_ft_ilsvrc2012.py"),
    "vmoe_b16_imagenet21k_randaug_strong_ft_cifar10": _preset(
        "the B/16 ImageNet-21k model fine-tuned on CIFAR-10 at 128 px (config in the repository; not listed "
        "among the released checkpoints)",
        _paper_model(**_B16, image_size=128, num_classes=10, representation_size=None, capacity_factor=1.5,
                     head_bias_init=-math.log(10)),
        128, None, "vmoe/configs/vmoe_paper/vmoe_b16_imagenet21k_randaug_strong_ft_cifar10.py"),
}

_UNSUPPORTED_PRESETS = {
    "eee_s32_last2_ilsvrc2012": "an E^3 (efficient ensemble of experts) model: ensemble routing over 2 members",
    "eee_s32_last2_ilsvrc2012_ft_cifar100": "an E^3 (efficient ensemble of experts) model: ensemble routing over 2 members",
}


def _deep_update(base: dict, update: Mapping) -> dict:
    for key, value in update.items():
        if isinstance(value, Mapping) and isinstance(base.get(key), dict):
            _deep_update(base[key], value)
        else:
            base[key] = copy.deepcopy(value) if isinstance(value, (dict, list)) else value
    return base


def resolve_vmoe_config(config) -> dict:
    """A conversion spec `{"model": <VisionTransformerMoe kwargs>, "eval_overrides": {...}, "image_size": N}` from a
    preset name, a dict, a JSON string or a JSON file. A dict may start from a preset (`"preset": NAME`) and
    override its fields; a dict with an `encoder` key is taken as the model config itself."""
    if isinstance(config, (str, os.PathLike)):
        text = str(config).strip()
        if text in VMOE_PRESETS:
            return copy.deepcopy(VMOE_PRESETS[text])
        if text in _UNSUPPORTED_PRESETS:
            raise ValueError(f"{text} is {_UNSUPPORTED_PRESETS[text]}; hf_vmoe cannot represent it (see "
                             "docs/vmoe-checkpoints.md)")
        if text.startswith("{"):
            try:
                config = json.loads(text)
            except json.JSONDecodeError as err:
                raise ValueError(f"--config is not valid JSON: {err}") from None
        elif os.path.isfile(text):
            try:
                config = json.loads(Path(text).read_text())
            except json.JSONDecodeError as err:
                raise ValueError(f"{text!r} is not valid JSON: {err}") from None
        else:
            raise ValueError(f"unknown vmoe config {text!r}: give a preset ({', '.join(VMOE_PRESETS)}), a JSON object "
                             "or a JSON file")
    if not isinstance(config, Mapping):
        raise ValueError(f"the vmoe config must be a preset name or a mapping, got {type(config).__name__}")
    config = copy.deepcopy(dict(config))
    if "encoder" in config and "model" not in config:
        config = {"model": config}
    unknown = sorted(set(config) - {"preset", "model", "eval_overrides", "image_size", "description", "source"})
    if unknown:
        raise ValueError(f"unknown keys {unknown} in the vmoe config; expected 'preset', 'model', 'eval_overrides', "
                         "'image_size'")
    spec = {"model": {}, "eval_overrides": {}}
    if "preset" in config:
        spec = resolve_vmoe_config(config.pop("preset"))
        spec.setdefault("eval_overrides", {})
    _deep_update(spec["model"], config.get("model", {}))
    _deep_update(spec["eval_overrides"], config.get("eval_overrides", {}))
    for key in ("image_size", "description", "source"):
        if key in config:
            spec[key] = config[key]
    return spec


def _flatten(tree: Mapping, prefix: str = "") -> dict:
    out = {}
    for key, value in tree.items():
        if isinstance(value, Mapping):
            out.update(_flatten(value, f"{prefix}{key}."))
        else:
            out[f"{prefix}{key}"] = value
    return out


def _vmoe_capacity(group_size: int, k: int, num_experts: int, capacity_factor: float, ceil_or_round: str,
                   multiple_of: int | None) -> int:
    """vmoe.moe.compute_capacity on num_tokens = group_size * k."""
    raw = group_size * k * capacity_factor / num_experts
    capacity = int(math.ceil(raw)) if ceil_or_round == "ceil" else int(round(raw))
    if multiple_of and multiple_of > 0:
        capacity += (-capacity) % multiple_of
    return capacity


def _hf_ceil_capacity(group_size: int, k: int, num_experts: int, capacity_factor: float) -> int:
    return max(1, math.ceil(group_size * k * capacity_factor / num_experts))


@dataclasses.dataclass
class _Issue:
    option: str  # the VMoEConfig option that would make it exact
    scope: str  # "inference" (changes eval outputs) or "training"
    message: str


def _config_fields() -> set[str]:
    from ..configuration_vmoe import VMoEConfig

    return {f.name for f in dataclasses.fields(VMoEConfig)} if dataclasses.is_dataclass(VMoEConfig) else set()


def hf_config_from_vmoe(spec: Mapping, arch: Mapping | None = None) -> tuple[dict, dict, list[_Issue]]:
    """`VMoEConfig` keyword arguments for a vmoe model config (`resolve_vmoe_config` output), checked against the
    architecture read from the checkpoint (`arch`, optional). Returns (kwargs, vmoe_reference, issues): the
    reference fields kept in `config.vmoe_reference`, and what hf_vmoe does differently (each naming the option
    that would make it exact). Structural differences raise a ValueError.

    The parity options (`router_group_size` with `router_group_remainder="pad"`, `capacity_multiple_of`,
    `representation_size`, `router_load_loss_coef`, `router_aux_loss_layer_reduction`, `expert_dispatch_dtype`,
    `use_cls_token`) are set when `VMoEConfig` has the field, and reported as an issue when it does not."""
    model = _flatten(spec["model"])
    eval_model = _flatten(_deep_update(copy.deepcopy(spec["model"]), spec.get("eval_overrides") or {}))
    fields = _config_fields()
    issues: list[_Issue] = []
    structural: list[str] = []

    def need(option: str, scope: str, message: str) -> bool:
        """True when VMoEConfig has `option`; otherwise record the issue."""
        if option in fields:
            return True
        issues.append(_Issue(option, scope, message))
        return False

    name = model.get("name", "VisionTransformerMoe")
    if name == "VisionTransformerMoeEnsemble" or "encoder.moe.ensemble_size" in model:
        raise ValueError("the vmoe config is an E^3 ensemble (VisionTransformerMoeEnsemble): hf_vmoe has no ensemble "
                         "routing, so it cannot be converted")
    if name != "VisionTransformerMoe":
        raise ValueError(f"unknown vmoe model {name!r}; this converter maps VisionTransformerMoe only")

    # The architecture: the tree's shapes; the config's fields must agree with them (or stand in without a tree).
    arch = dict(arch or {})
    declared = {
        "hidden_size": model.get("hidden_size"),
        "patch_size": to_pair(model["patch_size"]) if "patch_size" in model else None,
        "encoder.num_layers": model.get("encoder.num_layers"),
        "encoder.num_heads": model.get("encoder.num_heads"),
        "encoder.mlp_dim": model.get("encoder.mlp_dim"),
        "num_classes": model.get("num_classes"),
        "image_size": to_pair(spec["image_size"]) if spec.get("image_size") is not None else None,
        "classifier": model.get("classifier"),
    }
    if "representation_size" in model:
        declared["representation_size"] = model["representation_size"]
    if "encoder.moe.layers" in model:
        declared["encoder.moe.layers"] = tuple(model["encoder.moe.layers"])
        if model["encoder.moe.layers"]:
            declared["encoder.moe.num_experts"] = model.get("encoder.moe.num_experts")
            declared["encoder.moe.mlp_dim"] = model.get("encoder.moe.mlp_dim", model.get("encoder.mlp_dim"))
    mismatches = []
    for key, value in declared.items():
        if value is None and key != "representation_size":
            continue
        if key in arch:
            if arch[key] != value:
                mismatches.append(f"  {key}: config {value!r}, checkpoint {arch[key]!r}")
        else:
            arch[key] = value
    arch.setdefault("classifier", "token")  # vmoe's defaults
    arch.setdefault("representation_size", None)
    if mismatches:
        raise ValueError("the checkpoint does not fit the vmoe config (wrong preset?):\n" + "\n".join(mismatches))
    for key in ("hidden_size", "patch_size", "encoder.num_layers", "encoder.num_heads", "encoder.mlp_dim",
                "num_classes", "image_size"):
        if arch.get(key) is None:
            raise ValueError(f"the vmoe config does not give {key} and there is no checkpoint to read it from")
    moe_layers = tuple(arch.get("encoder.moe.layers") or ())

    # What hf_vmoe cannot represent at all.
    classifier = arch["classifier"]
    if classifier == "gap" and "use_cls_token" not in fields:
        structural.append("classifier='gap' (no class token; the mean of all tokens) needs VMoEConfig.use_cls_token")
    elif classifier not in ("token", "gap"):
        structural.append(f"classifier={classifier!r} is not supported (hf_vmoe pools with the class token or the mean)")
    if arch.get("representation_size") and "representation_size" not in fields:
        structural.append(f"representation_size={arch['representation_size']} (a tanh pre-logits layer before the "
                          "head) needs VMoEConfig.representation_size")
    position = model.get("encoder.position_emb.name", "learned")
    if position != "learned":
        structural.append(f"encoder.position_emb={position!r}: only learned position embeddings are supported")
    if model.get("encoder.attention_qk_norm"):
        structural.append("encoder.attention_qk_norm=True is not supported")
    router_name = str(model.get("encoder.moe.router.name", "NoisyTopExpertsPerItemRouter"))
    router_type = _ROUTER_TYPES.get(router_name.rpartition(".")[2])
    if moe_layers and router_type is None:
        structural.append(f"router {router_name!r}: the converter maps {', '.join(_ROUTER_TYPES)}")
    elif moe_layers and arch.get("router_params") and (arch["router_params"] == "soft") != (router_type == "soft"):
        found = "Soft MoE's mu and scale" if arch["router_params"] == "soft" else "a dense kernel"
        raise ValueError(f"the checkpoint's routers have {found} but the vmoe config names {router_name!r} "
                         "(wrong config?)")
    dispatchers = {"top_k": ("einsum", "indices"), "expert_choice": ("einsum",)}.get(router_type, ("einsum",))
    if model.get("encoder.moe.router.dispatcher.name", "einsum") not in dispatchers and moe_layers:
        structural.append(f"dispatcher {model['encoder.moe.router.dispatcher.name']!r}: only "
                          f"{' and '.join(map(repr, dispatchers))} are mapped for {router_name}")
    if structural:
        raise ValueError("this vmoe model cannot be converted to hf_vmoe:\n" + "\n".join(f"  {s}" for s in structural))

    patch, image = to_pair(arch["patch_size"]), to_pair(arch["image_size"])
    tokens = (image[0] // patch[0]) * (image[1] // patch[1]) + (1 if classifier == "token" else 0)
    kwargs = dict(
        hidden_size=int(arch["hidden_size"]),
        num_hidden_layers=int(arch["encoder.num_layers"]),
        num_attention_heads=int(arch["encoder.num_heads"]),
        intermediate_size=int(arch["encoder.mlp_dim"]),
        hidden_act="gelu_pytorch_tanh",  # flax.linen.gelu defaults to approximate=True (the tanh form)
        layer_norm_eps=1e-6,  # flax.linen.LayerNorm's default epsilon
        qkv_bias=True,
        image_size=image[0] if image[0] == image[1] else list(image),
        patch_size=patch[0] if patch[0] == patch[1] else list(patch),
        num_channels=int(arch.get("num_channels", 3)),
        pooling="cls",
        num_labels=int(arch["num_classes"]),
        hidden_dropout_prob=float(model.get("encoder.dropout_rate", 0.0)),
        attention_probs_dropout_prob=float(model.get("encoder.attention_dropout_rate", 0.0)),
        moe_layers=moe_layers if moe_layers else "none",
        routing_level="token",
        shared_router=False,
        num_shared_experts=0,
        normalize_router_weights=False,
        router_aux_loss_coef=0.0,
        router_z_loss_coef=0.0,
        router_importance_loss_coef=0.0,
        layerscale_value=None,
        drop_path_rate=0.0,
    )
    if classifier == "gap":
        kwargs.update(use_cls_token=False, pooling="mean")
    if arch.get("representation_size"):
        kwargs["representation_size"] = int(arch["representation_size"])
    reference = {
        "source": spec.get("source"),
        "description": spec.get("description"),
        "classifier": classifier,
        "representation_size": arch.get("representation_size"),
        "head_bias_init": model.get("head_bias_init", 0.0),
        "head_kernel_zero_init": model.get("head_kernel_zero_init", True),
        "tokens_per_image": tokens,
    }
    if model.get("encoder.dropout_rate", 0.0):
        issues.append(_Issue("(none)", "training", "encoder.dropout_rate: vmoe also drops after the MLP's GELU; "
                                                   "hf_vmoe's hidden_dropout_prob does not"))
    if not moe_layers:
        return kwargs, reference, issues

    num_experts = int(arch["encoder.moe.num_experts"])
    kwargs.update(router_type=router_type, num_experts=num_experts,
                  expert_intermediate_size=int(arch.get("encoder.moe.mlp_dim") or arch["encoder.mlp_dim"]))
    if model.get("encoder.moe.group_size") is None:
        raise ValueError("the vmoe config does not give encoder.moe.group_size (tokens per routing group)")
    group_size = int(model["encoder.moe.group_size"])
    expert_dropout = float(model.get("encoder.moe.dropout_rate", model.get("encoder.dropout_rate", 0.0)))
    if expert_dropout:
        issues.append(_Issue("(none)", "training", f"expert dropout {expert_dropout} (vmoe drops after the experts' "
                             "GELU and output) is not reproduced"))
    reference.update(router=router_name, group_size=group_size, expert_dropout_rate=expert_dropout)
    if router_type == "soft":
        _map_soft_router(model, arch, kwargs, reference, need, group_size, tokens, num_experts)
        return kwargs, reference, issues
    if router_type == "expert_choice":
        _map_expert_choice_router(model, eval_model, kwargs, reference, need, group_size, num_experts)
        return kwargs, reference, issues
    k = int(model.get("encoder.moe.router.num_selected_experts", 1))
    if not 1 <= k <= num_experts:
        raise ValueError(f"encoder.moe.router.num_selected_experts={k} must be in [1, num_experts={num_experts}]")
    kwargs["num_experts_per_tok"] = k
    noise_std = float(model.get("encoder.moe.router.noise_std", 1.0))  # vmoe's defaults (NoisyTopExpertsPerItemRouter)
    importance_w = float(model.get("encoder.moe.router.importance_loss_weight", 1.0))
    load_w = float(model.get("encoder.moe.router.load_loss_weight", 1.0))
    gshard_w = float(model.get("encoder.moe.router.gshard_loss_weight", 0.0))
    reference.update(noise_std=noise_std, importance_loss_weight=importance_w, load_loss_weight=load_w,
                     gshard_loss_weight=gshard_w)
    kwargs["router_noise_std"] = noise_std / num_experts  # vmoe adds N(0, (noise_std / E)^2), training only
    kwargs["router_importance_loss_coef"] = importance_w
    if need("router_group_size", "training", f"routing groups of {group_size} tokens: vmoe computes capacity "
            "and the auxiliary losses per group; hf_vmoe over the whole batch"):
        kwargs["router_group_size"] = group_size
        if "router_group_remainder" in fields:
            # vmoe's model cannot route a batch that is not whole groups; its evaluator pads the last batch with
            # all-zero examples, which hf_vmoe reproduces at inference
            kwargs["router_group_remainder"] = "pad"
    if gshard_w:
        issues.append(_Issue("(none)", "training", f"gshard_loss_weight={gshard_w}: vmoe's GShard loss counts top-1 "
                             "choices only (hf_vmoe's switch loss counts all k); not mapped"))
    if load_w and noise_std and need("router_load_loss_coef", "training", f"load_loss_weight={load_w}: vmoe's "
                                     "noise-based load loss (training with noise only)"):
        kwargs["router_load_loss_coef"] = load_w
    if (importance_w or (load_w and noise_std)) and need(
            "router_aux_loss_layer_reduction", "training", "vmoe sums the auxiliary losses over MoE layers (hf_vmoe "
            "averages them)"):
        kwargs["router_aux_loss_layer_reduction"] = "sum"

    def capacity_factor(flat: Mapping, scope: str) -> tuple[float | None, bool]:
        """hf's capacity factor (None = dropless) and batch priority for one scope; records what differs."""
        prefix = "encoder.moe.router.dispatcher."
        capacity, factor = flat.get(prefix + "capacity"), flat.get(prefix + "capacity_factor")
        rounding = flat.get(prefix + "capacity_ceil_or_round", "ceil")
        multiple = flat.get(prefix + "capacity_multiple_of", 4)
        bpr = bool(flat.get(prefix + "batch_priority", False))
        if (capacity is None) == (factor is None):
            raise ValueError(f"the {scope} dispatcher must give exactly one of capacity and capacity_factor "
                             f"(got capacity={capacity!r}, capacity_factor={factor!r})")
        value = int(capacity) if capacity is not None else _vmoe_capacity(
            group_size, k, num_experts, float(factor), rounding, multiple)
        reference[f"{scope}_capacity_per_group"] = value
        if value >= group_size:
            return None, bpr  # an expert can take every token of its group: nothing is ever dropped
        if "router_group_size" not in fields:
            issues.append(_Issue("router_group_size", scope, f"capacity {value} per expert and routing group of "
                                 f"{group_size} tokens: hf_vmoe applies the capacity to the whole batch (exact only "
                                 f"for batches of {group_size / tokens:g} images)"))
        if capacity is not None:
            need("expert_capacity", scope, f"the {scope} dispatcher gives an absolute capacity={value}")
            return value * num_experts / (group_size * k), bpr
        if rounding != "ceil":
            need("capacity_rounding", scope, f"capacity_ceil_or_round={rounding!r}")
        if multiple:
            if "capacity_multiple_of" in fields:
                kwargs["capacity_multiple_of"] = int(multiple)
            elif _hf_ceil_capacity(group_size, k, num_experts, float(factor)) != value:
                issues.append(_Issue("capacity_multiple_of", scope, f"vmoe rounds the capacity up to a multiple of "
                                     f"{multiple} ({_hf_ceil_capacity(group_size, k, num_experts, float(factor))} -> "
                                     f"{value} per group)"))
        return float(factor), bpr

    train_factor, train_bpr = capacity_factor(model, "training")
    eval_factor, eval_bpr = capacity_factor(eval_model, "inference")
    kwargs["capacity_factor"] = train_factor
    kwargs["eval_capacity_factor"] = eval_factor
    kwargs["batch_priority_routing"] = eval_bpr if eval_factor is not None else train_bpr
    if train_factor is not None and eval_factor is not None and train_bpr != eval_bpr:
        issues.append(_Issue("(none)", "training", f"batch priority routing is {train_bpr} in training and {eval_bpr} "
                             "at inference; hf_vmoe has one flag (set to the inference value)"))
    _map_bfloat16_dispatcher(model, eval_model, kwargs, reference, need)
    return kwargs, reference, issues


_ROUTER_TYPES = {"NoisyTopExpertsPerItemRouter": "top_k", "NoisyTopItemsPerExpertRouter": "expert_choice",
                 "SoftRouter": "soft"}  # vmoe.nn.routing's two routers, vmoe.projects.soft_moe.router.SoftRouter


def _map_bfloat16_dispatcher(model: Mapping, eval_model: Mapping, kwargs: dict, reference: dict, need) -> None:
    """dispatcher.bfloat16 (top-k and expert choice) -> expert_dispatch_dtype."""
    bf16 = [scope for scope, flat in (("inference", eval_model), ("training", model))
            if flat.get("encoder.moe.router.dispatcher.bfloat16", False)]
    if bf16:
        reference["bfloat16_dispatch"] = True
        if need("expert_dispatch_dtype", bf16[0], "dispatcher.bfloat16=True: vmoe rounds every expert's input and "
                "output to bfloat16 (without it the logits differ by about 2e-3 of their scale)"):
            kwargs["expert_dispatch_dtype"] = "bfloat16"


def _map_soft_router(model: Mapping, arch: Mapping, kwargs: dict, reference: dict, need, group_size: int,
                     tokens: int, num_experts: int) -> None:
    """vmoe's `SoftRouter` (vmoe/projects/soft_moe/router.py): slots from `num_slots`, or from `capacity_factor`
    (default 1.0) as round(group_size x factor / E); noise added to the logits unscaled (default 0); always a
    bfloat16 dispatcher; no auxiliary loss."""
    if group_size != tokens:
        raise ValueError(f"Soft MoE with group_size={group_size}: hf_vmoe mixes the tokens of each image, so the "
                         f"group must be one image ({tokens} tokens); this model cannot be converted")
    prefix = "encoder.moe.router."
    factor = model.get(prefix + "capacity_factor", 1.0)
    slots = model.get(prefix + "num_slots")
    if slots is None:
        if factor is None:
            raise ValueError("the Soft MoE router gives neither num_slots nor capacity_factor")
        slots = int(round(group_size * float(factor) / num_experts))  # vmoe: compute_capacity(..., "round", 1)
    in_tree = arch.get(prefix + "num_slots")
    if in_tree is not None and int(slots) != in_tree:
        raise ValueError(f"the vmoe config gives {slots} Soft MoE slots per expert (num_slots={model.get(prefix + 'num_slots')!r}, "
                         f"capacity_factor={factor!r}, group_size={group_size}), the checkpoint's mu has {in_tree}")
    if int(slots) < 1:
        raise ValueError(f"the Soft MoE router has {slots} slots per expert; it needs at least 1")
    noise_std = float(model.get(prefix + "noise_std", 0.0))
    kwargs.update(num_slots=int(slots), num_experts_per_tok=1, router_noise_std=noise_std)
    reference.update(num_slots=int(slots), capacity_factor=factor, noise_std=noise_std, bfloat16_dispatch=True)
    if need("expert_dispatch_dtype", "inference", "vmoe's Soft MoE dispatches through a bfloat16 dispatcher: the "
            "tokens and the slot outputs are rounded to bfloat16"):
        kwargs["expert_dispatch_dtype"] = "bfloat16"


def _map_expert_choice_router(model: Mapping, eval_model: Mapping, kwargs: dict, reference: dict, need,
                              group_size: int, num_experts: int) -> None:
    """vmoe's `NoisyTopItemsPerExpertRouter`: each expert takes the top C tokens of its routing group, C =
    compute_capacity(group_size, E, capacity_factor, ceil_or_round, multiple_of) (vmoe's defaults "ceil" and 4) or
    the dispatcher's absolute `capacity`; noise N(0, (noise_std / E)^2) in training (default noise_std 1.0); no
    auxiliary loss. hf_vmoe's capacity is min(n, ceil(n x factor / E) rounded up to `capacity_multiple_of`): when
    vmoe's rounding or an absolute capacity cannot be written that way, the factor is set to (C - 1/2) x E / n,
    whose ceiling is C for the group size n the converter sets."""
    prefix = "encoder.moe.router."
    noise_std = float(model.get(prefix + "noise_std", 1.0))
    kwargs.update(num_experts_per_tok=1, router_noise_std=noise_std / num_experts)
    reference["noise_std"] = noise_std
    if need("router_group_size", "inference", f"routing groups of {group_size} tokens: each expert takes its top "
            "tokens of each group"):
        kwargs["router_group_size"] = group_size
        if need("router_group_remainder", "inference", "vmoe's evaluator pads its last batch with zero images"):
            kwargs["router_group_remainder"] = "pad"

    def capacity(flat: Mapping, scope: str) -> tuple[int, float | None, int | None]:
        """(vmoe's capacity per group, its factor when hf_vmoe's ceil rule gives the same capacity, multiple_of)."""
        absolute, factor = flat.get(prefix + "dispatcher.capacity"), flat.get(prefix + "dispatcher.capacity_factor")
        rounding = flat.get(prefix + "dispatcher.capacity_ceil_or_round", "ceil")
        multiple = flat.get(prefix + "dispatcher.capacity_multiple_of", 4) or None
        if (absolute is None) == (factor is None):
            raise ValueError(f"the {scope} dispatcher must give exactly one of capacity and capacity_factor "
                             f"(got capacity={absolute!r}, capacity_factor={factor!r})")
        if absolute is not None:
            value = int(absolute)
        else:
            value = _vmoe_capacity(group_size, 1, num_experts, float(factor), rounding, multiple)
        reference[f"{scope}_capacity_per_group"] = value
        plain = float(factor) if absolute is None and rounding == "ceil" else None
        return value, plain, multiple

    (train_c, train_f, train_m), (eval_c, eval_f, eval_m) = capacity(model, "training"), capacity(eval_model, "inference")
    if train_f is not None and eval_f is not None and train_m == eval_m:
        kwargs.update(capacity_factor=train_f, eval_capacity_factor=eval_f, capacity_multiple_of=train_m)
    else:  # the exact capacities, for groups of group_size tokens
        kwargs.update(capacity_factor=(train_c - 0.5) * num_experts / group_size,
                      eval_capacity_factor=(eval_c - 0.5) * num_experts / group_size, capacity_multiple_of=None)
    kwargs["router_importance_loss_coef"] = 0.0
    _map_bfloat16_dispatcher(model, eval_model, kwargs, reference, need)


# ----------------------------------------------------------------------------------------------------------------
# Conversion
# ----------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class ConversionResult:
    """What `convert_vmoe_checkpoint` wrote: the folder, its config, and what hf_vmoe computes differently from
    vmoe (`inexact`: changes inference outputs; `training`: training only), each naming the missing option."""

    output_dir: Path
    config: object
    inexact: list[str]
    training: list[str]


def _read_labels(labels, num_labels: int) -> dict[int, str] | None:
    if labels is None:
        return None
    if isinstance(labels, (str, os.PathLike)):
        path = Path(labels)
        text = path.read_text()
        if path.suffix == ".json":
            data = json.loads(text)
            names = [data[str(i)] for i in range(len(data))] if isinstance(data, dict) else list(data)
        else:
            names = [line.strip() for line in text.splitlines() if line.strip()]
    else:
        names = list(labels)
    if len(names) != num_labels:
        raise ValueError(f"the label list has {len(names)} names but the checkpoint has {num_labels} classes")
    return {i: str(n) for i, n in enumerate(names)}


def convert_vmoe_checkpoint(prefix, config, output_dir, *, strict: bool = False, overwrite: bool = False,
                            labels=None) -> ConversionResult:
    """Convert a vmoe checkpoint into a folder that `VMoEForImageClassification.from_pretrained` and
    `pipeline("image-classification")` load: `config.json` (with `vmoe_reference`: the vmoe fields and what is not
    reproduced), `model.safetensors` (float32), `preprocessor_config.json`, and the remote-code files that every
    saved VMoE folder has.

    prefix: a sharded checkpoint's prefix (`<prefix>.index`, `<prefix>.data-nnnnn-of-NNNNN`) or a Flax msgpack file.
    config: a preset name (`VMOE_PRESETS`: the released checkpoints), or vmoe model-config fields as a dict / JSON
        string / JSON file (`{"preset": ..., "model": {...}, "eval_overrides": {...}, "image_size": N}`, see
        `resolve_vmoe_config`); the architecture is read from the checkpoint and must agree with it.
    strict: raise instead of warning when hf_vmoe would compute different outputs at inference.
    overwrite: replace an existing non-empty `output_dir` (otherwise a ValueError).
    labels: class names (a list, a text file with one name a line, or a JSON list / id->name object).

    Anything that does not fit raises a ValueError naming it, and nothing is written: the folder is assembled in a
    temporary directory beside `output_dir` and moved into place at the end."""
    from ..configuration_vmoe import VMoEConfig
    from ..image_processing_vmoe import VMoEImageProcessor

    output_dir = Path(output_dir)
    if output_dir.exists() and (not output_dir.is_dir() or any(output_dir.iterdir())) and not overwrite:
        raise ValueError(f"{str(output_dir)!r} exists and is not empty; pass overwrite=True (--overwrite) to replace it")
    spec = resolve_vmoe_config(config)
    params = load_vmoe_params(prefix)
    arch = infer_vmoe_architecture(params)
    kwargs, reference, issues = hf_config_from_vmoe(spec, arch)
    inexact = [f"{i.message} [needs VMoEConfig.{i.option}]" for i in issues if i.scope == "inference"]
    training = [f"{i.message} [needs VMoEConfig.{i.option}]" if i.option != "(none)" else i.message
                for i in issues if i.scope == "training"]
    if inexact and strict:
        raise ValueError("hf_vmoe cannot reproduce this checkpoint's inference exactly (strict=True):\n"
                         + "\n".join(f"  {m}" for m in inexact))
    for message in inexact:
        warnings.warn(f"converted model differs from vmoe at inference: {message}", stacklevel=2)
    reference["not_reproduced"] = {"inference": inexact, "training": training}
    id2label = _read_labels(labels, kwargs["num_labels"])
    if id2label:
        kwargs["id2label"] = id2label
        kwargs["label2id"] = {v: k for k, v in id2label.items()}
    try:
        hf_config = VMoEConfig(**kwargs, vmoe_reference=reference, architectures=["VMoEForImageClassification"])
    except (TypeError, ValueError) as err:
        raise ValueError(f"the mapped config is not a valid VMoEConfig: {err}") from None
    state_dict = vmoe_params_to_state_dict(params, arch)
    del params
    model = _model_with_weights(hf_config, state_dict)

    output_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))
    try:
        model.save_pretrained(tmp, safe_serialization=True)  # as any VMoE folder: safetensors + remote-code files
        size = hf_config.image_size if isinstance(hf_config.image_size, (list, tuple)) else [hf_config.image_size] * 2
        # vmoe's input pipeline: value_range(-1, 1) = pixels / 127.5 - 1, bilinear resize to the model size
        VMoEImageProcessor(size={"height": size[0], "width": size[1]}, image_mean=[0.5] * 3, image_std=[0.5] * 3,
                           resample=2).save_pretrained(tmp)
        if output_dir.exists():
            if output_dir.is_dir():
                shutil.rmtree(output_dir)
            else:
                output_dir.unlink()
        os.replace(tmp, output_dir)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return ConversionResult(output_dir=output_dir, config=hf_config, inexact=inexact, training=training)


def _model_with_weights(config, state_dict: Mapping[str, torch.Tensor]):
    """A VMoEForImageClassification holding the converted tensors (built on the meta device, the tensors assigned:
    no second copy). The state dict must have exactly the model's keys and shapes."""
    from ..modeling_vmoe import VMoEForImageClassification

    with torch.device("meta"):
        model = VMoEForImageClassification(config)
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    problems = [f"  {k}: missing from the converted weights (shape {s})" for k, s in sorted(expected.items())
                if k not in state_dict]
    problems += [f"  {k}: not a parameter of VMoEForImageClassification" for k in sorted(state_dict) if k not in expected]
    problems += [f"  {k}: converted shape {tuple(v.shape)} != model shape {expected[k]}"
                 for k, v in sorted(state_dict.items()) if k in expected and tuple(v.shape) != expected[k]]
    if problems:
        raise ValueError("the converted weights do not fit VMoEForImageClassification:\n" + "\n".join(problems))
    model.load_state_dict(state_dict, strict=True, assign=True)
    leftover = [name for name, p in list(model.named_parameters()) + list(model.named_buffers()) if p.is_meta]
    if leftover:
        raise ValueError(f"the converted model has tensors without values: {leftover[:5]}")
    return model.eval()


# ----------------------------------------------------------------------------------------------------------------
# `hf-vmoe convert-vmoe`
# ----------------------------------------------------------------------------------------------------------------


def run_cli(args) -> int:
    """`hf-vmoe convert-vmoe` (its arguments: `hf_vmoe_cli.add_convert_vmoe_arguments`): prints what was written and what hf_vmoe does differently; ValueErrors propagate (the
    CLI prints them and exits with 2)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the same messages are printed below
        result = convert_vmoe_checkpoint(args.checkpoint, args.config, args.output_dir, strict=args.strict,
                                         overwrite=args.overwrite, labels=args.labels)
    config = result.config
    print(f"wrote {result.output_dir}: VMoEForImageClassification, {config.num_hidden_layers} blocks x "
          f"{config.hidden_size}, MoE blocks {list(config.moe_layers)}, {config.num_experts} experts, "
          f"k={config.num_experts_per_tok}, {config.num_labels} classes, {config.image_size} px")
    for message in result.inexact:
        print(f"  differs at inference: {message}")
    for message in result.training:
        print(f"  differs in training: {message}")
    if not result.inexact:
        print("  inference: the same computation as vmoe's (see docs/vmoe-parity-spec.md)")
    return 0
