"""Google's V-MoE (google-research/vmoe, JAX/Flax) as a test oracle for hf_vmoe.

The reference code is never copied into the repository: it is imported from `<repo>/../shared/ref` (override with
HF_VMOE_REF_DIR), `google-vmoe` for `vmoe` and `google-vision_transformer` for `vit_jax`. `skip_reason()` says why
the reference cannot run (folder absent, jax / flax missing); the tests skip with it.

vmoe's checkpoint code reads and writes through `tensorflow.io.gfile`; `install_gfile_shim()` serves it with a small
local-filesystem module put in `sys.modules` while that code is imported (only when TensorFlow is not installed).

What this module builds: a small `vmoe.nn.vit_moe.VisionTransformerMoe` with vmoe's own Flax modules from a model
config (the kwargs dict vmoe's configs give as `config.model`, the same dict the converter takes), random
parameters (perturbed so that every parameter matters: LayerNorm scales, biases and the class token are not at their
init values), and a run on given images that returns logits, the experts each token chose, which choices capacity
dropped, and vmoe's metrics.
"""

from __future__ import annotations

import contextlib
import dataclasses
import functools
import glob
import importlib.util
import os
import sys
import types
from pathlib import Path

import numpy as np

REPO_ROOT = Path(__file__).resolve().parents[1]
REF_DIR = Path(os.environ.get("HF_VMOE_REF_DIR", REPO_ROOT.parent / "shared" / "ref"))
VMOE_DIR = REF_DIR / "google-vmoe"
VIT_DIR = REF_DIR / "google-vision_transformer"

# The reference runs on the CPU, one thread, before jax is imported anywhere.
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("XLA_FLAGS", "--xla_cpu_multi_thread_eigen=false intra_op_parallelism_threads=1")


def skip_reason() -> str | None:
    """Why the reference cannot run here, or None when it can."""
    if not (VMOE_DIR / "vmoe" / "nn" / "vit_moe.py").is_file():
        return (f"Google's vmoe reference code absent: {VMOE_DIR} (a clone of google-research/vmoe, outside the "
                "repository; HF_VMOE_REF_DIR, default ../shared/ref beside the checkout)")
    if not (VIT_DIR / "vit_jax" / "models_vit.py").is_file():
        return (f"Google's vit_jax reference code absent: {VIT_DIR} (a clone of google-research/vision_transformer, "
                "outside the repository; HF_VMOE_REF_DIR, default ../shared/ref beside the checkout)")
    missing = [m for m in ("jax", "flax", "absl") if importlib.util.find_spec(m) is None]
    if missing:
        return f"the reference needs {', '.join(missing)} (pip install '.[parity]')"
    return None


class _Stat:
    def __init__(self, length: int):
        self.length = length


def _gfile_module() -> types.SimpleNamespace:
    def rename(src, dst, overwrite=False):
        if not overwrite and os.path.exists(dst):
            raise FileExistsError(dst)
        os.replace(src, dst)

    return types.SimpleNamespace(
        GFile=open,
        exists=os.path.exists,
        makedirs=lambda path: os.makedirs(path, exist_ok=True),
        rename=rename,
        stat=lambda path: _Stat(os.path.getsize(path)),
        glob=glob.glob,
        remove=os.remove,
        listdir=os.listdir,
    )


@contextlib.contextmanager
def gfile_shim():
    """`tensorflow.io.gfile` on the local filesystem while vmoe/checkpoints/base.py is imported (it binds `gfile`
    at import). The fake `tensorflow` leaves `sys.modules` afterwards: other libraries (torch._dynamo) probe for
    TensorFlow. A real TensorFlow, when installed, is used instead."""
    if "tensorflow" in sys.modules or importlib.util.find_spec("tensorflow") is not None:
        yield
        return
    tf = types.ModuleType("tensorflow")
    tf_io = types.ModuleType("tensorflow.io")
    tf_io.gfile = _gfile_module()
    tf.io = tf_io
    sys.modules["tensorflow"], sys.modules["tensorflow.io"] = tf, tf_io
    try:
        yield
    finally:
        for name in ("tensorflow.io", "tensorflow"):
            if sys.modules.get(name) in (tf, tf_io):
                del sys.modules[name]


@functools.cache
def modules() -> types.SimpleNamespace:
    """Import the reference (call only when `skip_reason()` is None)."""
    reason = skip_reason()
    if reason:
        raise RuntimeError(reason)
    for path in (str(VIT_DIR), str(VMOE_DIR)):
        if path not in sys.path:
            sys.path.insert(0, path)
    import flax.serialization
    import jax
    import jax.numpy as jnp
    import vmoe.moe
    import vmoe.nn.routing
    import vmoe.nn.vit_moe

    with gfile_shim():
        from vmoe.checkpoints import base as ckpt_base
        from vmoe.checkpoints import partitioned

    return types.SimpleNamespace(jax=jax, jnp=jnp, flax_serialization=flax.serialization, vit_moe=vmoe.nn.vit_moe,
                                 routing=vmoe.nn.routing, moe=vmoe.moe, partitioned=partitioned, ckpt_base=ckpt_base)


TOP_K, EXPERT_CHOICE, SOFT = ("NoisyTopExpertsPerItemRouter", "NoisyTopItemsPerExpertRouter",
                              "vmoe.projects.soft_moe.router.SoftRouter")


def model_config(*, hidden=16, layers=4, heads=2, mlp_dim=32, patch=8, num_classes=5, experts=4, k=1,
                 moe_layers=(2, 3), group_size=80, capacity_factor=4.0, batch_priority=False, noise_std=0.0,
                 dispatcher="einsum", bfloat16=False, classifier="token", representation_size=None,
                 importance_loss_weight=0.005, load_loss_weight=0.005, router=TOP_K, num_slots=None,
                 **router_extra) -> dict:
    """A small VisionTransformerMoe config in vmoe's own vocabulary (as `config.model` in vmoe's configs).
    `router` picks vmoe's router: TOP_K (the default; k, capacity, batch priority, losses), EXPERT_CHOICE (noise,
    the dispatcher's capacity and bfloat16; `router_extra` goes to its dispatcher) or SOFT (`num_slots`, or slots
    from `capacity_factor`; noise)."""
    if router == EXPERT_CHOICE:
        router_config = {"name": router, "noise_std": noise_std,
                         "dispatcher": {"name": dispatcher, "capacity_factor": capacity_factor, "bfloat16": bfloat16,
                                        **router_extra}}
    elif router == SOFT:
        router_config = {"name": router, "num_slots": num_slots, "capacity_factor": capacity_factor,
                         "noise_std": noise_std, **router_extra}
    else:
        router_config = {
            "num_selected_experts": k, "noise_std": noise_std,
            "importance_loss_weight": importance_loss_weight, "load_loss_weight": load_loss_weight,
            "dispatcher": {"name": dispatcher, "capacity_factor": capacity_factor,
                           "batch_priority": batch_priority, "bfloat16": bfloat16},
            **router_extra,
        }
    return {
        "name": "VisionTransformerMoe",
        "num_classes": num_classes,
        "patch_size": (patch, patch),
        "hidden_size": hidden,
        "classifier": classifier,
        "representation_size": representation_size,
        "head_kernel_zero_init": False,  # a zero head would make every logit its bias
        "encoder": {
            "num_layers": layers, "mlp_dim": mlp_dim, "num_heads": heads, "dropout_rate": 0.0,
            "attention_dropout_rate": 0.0,
            "moe": {
                "num_experts": experts, "layers": tuple(moe_layers), "group_size": group_size, "dropout_rate": 0.0,
                "router": router_config,
            },
        },
    }


def _with_overrides(config: dict, overrides: dict | None) -> dict:
    import copy

    out = copy.deepcopy(config)

    def update(base, new):
        for key, value in new.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                update(base[key], value)
            else:
                base[key] = value

    update(out, overrides or {})
    return out


def build(config: dict, train: bool = False):
    m = modules()
    kwargs = {k: v for k, v in config.items() if k != "name"}
    return m.vit_moe.VisionTransformerMoe(deterministic=not train, **kwargs)


def images(batch: int = 8, size: int = 24, seed: int = 0) -> np.ndarray:
    """Random images in vmoe's value range [-1, 1], NHWC float32 (hf takes them transposed to NCHW)."""
    return np.random.default_rng(seed).uniform(-1, 1, (batch, size, size, 3)).astype(np.float32)


def init_params(config: dict, image_size: int = 24, seed: int = 0, router_scale: float = 3.0, batch: int = 8):
    """vmoe's own initialisation, then perturbed: LayerNorm scales 1 + N(0, 0.1^2), biases and the class token
    N(0, 0.1^2) (vmoe initialises them to 0 / 1 / 1e-6, which would hide a mix-up), router kernels scaled by
    `router_scale` (peaked routing, so that capacity drops tokens), Soft MoE's logit scale `router_scale` x
    (1 + N(0, 0.1^2)) (its logits are cosines times this scale)."""
    m = modules()
    jax, jnp = m.jax, m.jnp
    model = build(config)
    x = jnp.zeros((batch, image_size, image_size, 3), jnp.float32)  # batch * tokens: a multiple of group_size
    params = model.init({"params": jax.random.PRNGKey(seed)}, x)["params"]
    rng = np.random.default_rng(seed + 1)

    def perturb(path, leaf):
        names = [getattr(p, "key", str(p)) for p in path]
        value = np.asarray(leaf)
        if names[-1] == "scale" and "Router" in names:  # Soft MoE's logit scale
            value = router_scale * (1.0 + 0.1 * rng.standard_normal(value.shape))
        elif names[-1] == "scale":
            value = 1.0 + 0.1 * rng.standard_normal(value.shape)
        elif names[-1] == "bias" or names[-1] == "cls":
            value = 0.1 * rng.standard_normal(value.shape)
        elif "Router" in names:
            value = value * router_scale
        return jnp.asarray(value, jnp.float32)

    return jax.tree_util.tree_map_with_path(perturb, params)


@dataclasses.dataclass
class ReferenceRun:
    """One forward pass of the reference. Per MoE block (keys `encoderblock_{i}`): `experts` (N, k) chosen experts
    of every token (N = batch * tokens, in the order of `x.reshape(-1, hidden)`, best first), `kept` (N, k) False
    where capacity dropped the choice, `capacity` per group, `metrics` vmoe's per-group metrics (G,)."""

    logits: np.ndarray
    experts: dict[str, np.ndarray]
    kept: dict[str, np.ndarray]
    capacity: dict[str, int]
    metrics: dict[str, dict[str, np.ndarray]]
    auxiliary_loss: np.ndarray  # (G,): the sum over MoE blocks, per group, as vmoe returns it
    # expert choice and Soft MoE, per MoE block: the dispatcher's (combine_weights, dispatch_weights), (G, S, E, C)
    weights: dict[str, tuple[np.ndarray, np.ndarray]] = dataclasses.field(default_factory=dict)


def _unwrap(dispatcher):
    m = modules()
    while isinstance(dispatcher, m.moe.Bfloat16Dispatcher):
        dispatcher = dispatcher.dispatcher
    return dispatcher


def run(config: dict, params, x: np.ndarray, *, train: bool = False, overrides: dict | None = None) -> ReferenceRun:
    """Run the reference on NHWC images. `train=True` is vmoe's training mode (deterministic=False: router noise
    when noise_std > 0, the load loss). `overrides` are merged into the model config (vmoe's
    `evaluate.model_overrides`)."""
    m = modules()
    jax, jnp = m.jax, m.jnp
    config = _with_overrides(config, overrides)
    if config["encoder"]["moe"]["router"].get("name", TOP_K) != TOP_K:
        return _run_other_router(config, params, x, train)
    model = build(config, train=train)
    k = config["encoder"]["moe"]["router"]["num_selected_experts"]

    def capture(module, method_name):
        return isinstance(module, m.routing.NoisyTopExpertsPerItemRouter) or (
            method_name == "__call__" and module.name == "dense" and isinstance(module.parent,
                                                                              m.routing.NoisyTopExpertsPerItemRouter))

    rngs = {"gating": jax.random.PRNGKey(1)} if train else {}
    (logits, metrics), state = model.apply({"params": params}, jnp.asarray(x), capture_intermediates=capture,
                                           mutable=["intermediates"], rngs=rngs)
    experts, kept, capacity, block_metrics = {}, {}, {}, {}
    for name, block in state["intermediates"]["Encoder"].items():
        router = block["Moe"]["Router"]
        dispatcher = _unwrap(router["__call__"][0][0])
        gate_logits = np.asarray(router["dense"]["__call__"][0])  # (G, S, E)
        num_experts = gate_logits.shape[-1]
        if isinstance(dispatcher, m.moe.ExpertIndicesDispatcher):
            indices = np.asarray(dispatcher.indices)  # (G, S, K, 2): expert, buffer position
            chosen = indices[..., 0]
            keep = indices[..., 1] < dispatcher.capacity
            cap = dispatcher.capacity
        else:
            if train and config["encoder"]["moe"]["router"].get("noise_std", 0):
                raise NotImplementedError("chosen experts under router noise are not recovered (noise is random)")
            gates = np.asarray(jax.nn.softmax(jnp.asarray(gate_logits)))
            chosen = np.asarray(jax.lax.top_k(jnp.asarray(gates), k)[1])  # (G, S, K), as the dispatcher picks
            dispatched = np.asarray(dispatcher.dispatch_weights).any(axis=-1)  # (G, S, E)
            keep = np.take_along_axis(dispatched, chosen, axis=-1)
            cap = dispatcher.combine_weights.shape[-1]
        experts[name] = chosen.reshape(-1, k)
        kept[name] = keep.reshape(-1, k).astype(bool)
        capacity[name] = int(cap)
        block_metrics[name] = {key: np.asarray(value) for key, value in metrics[name].items()}
        assert num_experts == config["encoder"]["moe"]["num_experts"]
    return ReferenceRun(logits=np.asarray(logits), experts=experts, kept=kept, capacity=capacity,
                        metrics=block_metrics, auxiliary_loss=np.asarray(metrics["auxiliary_loss"]))


def _run_other_router(config: dict, params, x: np.ndarray, train: bool) -> ReferenceRun:
    """`run` for expert choice and Soft MoE: the logits and each MoE block's dispatch and combine weights (their
    routing, which `experts` / `kept` of top-k do not describe)."""
    m = modules()
    jax, jnp = m.jax, m.jnp
    if config["encoder"]["moe"]["router"]["name"] == SOFT:
        import vmoe.projects.soft_moe.router  # noqa: F401 - the module vmoe imports by name

    model = build(config, train=train)
    rngs = {"gating": jax.random.PRNGKey(1)} if train else {}
    (logits, metrics), state = model.apply(
        {"params": params}, jnp.asarray(x), mutable=["intermediates"], rngs=rngs,
        capture_intermediates=lambda module, method: module.name == "Router" and method == "__call__")
    weights, block_metrics = {}, {}
    for name, block in state["intermediates"]["Encoder"].items():
        dispatcher = _unwrap(block["Moe"]["Router"]["__call__"][0][0])
        weights[name] = (np.asarray(dispatcher.combine_weights, np.float32),
                         np.asarray(dispatcher.dispatch_weights, np.float32))
        block_metrics[name] = {key: np.asarray(value) for key, value in metrics[name].items()}
    return ReferenceRun(logits=np.asarray(logits), experts={}, kept={}, capacity={}, metrics=block_metrics,
                        auxiliary_loss=np.asarray(metrics["auxiliary_loss"]), weights=weights)


def save_sharded(params, prefix, num_shards: int = 3, max_chunk_bytes: int | None = 512) -> str:
    """vmoe's own sharded writer (vmoe.checkpoints.partitioned.save_checkpoint, version 20220622); small chunks
    (`max_chunk_bytes`) split every array over several chunks and shards."""
    m = modules()
    result = m.partitioned.save_checkpoint(str(prefix), params, num_shards=num_shards, max_chunk_bytes=max_chunk_bytes)
    result.get()
    return str(prefix)


def save_flax_msgpack(tree, path) -> str:
    """flax.serialization.to_bytes of a tree (e.g. the params, or {'params': params})."""
    m = modules()
    Path(path).write_bytes(m.flax_serialization.to_bytes(tree))
    return str(path)


def save_vmoe_single_file(tree, path) -> str:
    """vmoe's single-file writer (vmoe.checkpoints.base.save_checkpoint: Flax msgpack with vmoe's extensions)."""
    m = modules()
    return m.ckpt_base.save_checkpoint(str(path), tree)


def to_numpy_tree(tree):
    m = modules()
    return m.jax.tree_util.tree_map(lambda a: np.asarray(a), tree)
