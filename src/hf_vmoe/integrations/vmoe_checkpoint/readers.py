"""Reading Google's V-MoE checkpoints (google-research/vmoe, JAX/Flax) with numpy and msgpack only (no JAX,
TensorFlow or GPU). Both file formats vmoe writes:

* **sharded** (`vmoe/checkpoints/partitioned.py`): `<prefix>.index` holds `{"shard_count": N, "index": tree,
  "version": "20220622"}` (no `version` in checkpoints written before 2022-06-22), whose leaves are `IndexInfo`
  records (msgpack ext 8: global shape and dtype, the global slice of every chunk, the shard holding it). Each
  `<prefix>.data-nnnnn-of-NNNNN` is a msgpack map `{"__msgpack_array_chunk_a87ca2__": True, "<leaf>": [[subchunks,
  slice], ...]}`: `<leaf>` is the position of the array among the index tree's leaves in JAX flattening order (dict
  keys sorted), `subchunks` are flat pieces (ext 1 ndarrays) of the chunk, `slice` its global `SliceNd` (ext 6).
* **Flax msgpack** (`flax.serialization.to_bytes`, also vmoe's single-file `checkpoints.base.save_checkpoint`): a
  msgpack state dict whose arrays are ext 1 (`(shape, dtype name, C-order bytes)`), scalars ext 3, complex ext 2,
  and arrays over 1 GiB `{"__msgpack_chunked_array__": True, "shape": {...}, "chunks": {"0": ..., ...}}`.

`load_vmoe_params` finds the `VisionTransformerMoe` parameter tree in either (at the top, or under `params`).
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Callable, Mapping
from pathlib import Path

import msgpack
import numpy as np

__all__ = ["VMoEIndexInfo", "load_vmoe_params", "read_flax_msgpack", "read_vmoe_sharded"]

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
