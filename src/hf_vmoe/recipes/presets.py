"""Model-zoo presets: the Mobile V-MoE paper's model sizes as `VMoEConfig`s, each with its dense ViT twin.

The paper (Daxberger et al. 2023, arXiv 2309.04354) names models *layers x width* and reports two headline
points: ViT-Tiny (12 x 192) and "an even smaller ViT variant with only 54M FLOPs". It does not list the smaller
variants' exact shapes here, so the ladder below is **our reconstruction**:

* every model is a ViT at 224 x 224 px with 16 x 16 patches (197 tokens), MLP ratio 4, head width 64 (32 for
  width 96), 1000 classes;
* `3x64` is the 54M-FLOP model: 53.6M multiply-accumulates per image, the number papers of that line (DeiT,
  fvcore) call FLOPs. In this package's FLOPs (2 x MACs) it is 107M. No other (layers, width) pair with patch
  16 at 224 px comes within 10% of 54M MACs; `6x96` with patch 32 (50.6M) is the nearest alternative;
* Mobile V-MoE variants (`mobile-vmoe-LxW`) replace the MLPs of the last 2 blocks with E=10 experts of the
  dense MLP's width, k=1 expert per image, one per-image router shared by both MoE blocks and reading the
  mean patch token, super-class loss weight 0.3; their active FLOPs are the dense twin's plus the router's
  (2 x width x E).

* ViMoE variants (`vimoe-LxW`) are token-routed at the dense twin's active compute, the shape of evidence round 3's
  B3 token arm: in the last 2 blocks, 4 routed experts and one always-on shared expert, each of half the dense MLP's
  width, k=1 expert per token; upcycled from a dense twin with `expert_init="split_shared"` (the shared expert is
  the first half of the dense MLP's hidden units, every routed expert a copy of the second half), they start from
  the dense weights. With V-MoE's combine (the default) the router's probability scales the routed half; with
  `normalize_router_weights=True` the start is the dense model exactly.

A check on the 12 x 192 reconstruction: the paper's routing ablation quotes 11.05M parameters for per-token
routing (all experts can be active) against 6.31M for per-image routing; `mobile-vmoe-12x192` has 11,045,032
parameters in total (11.05M), and 6,311,080 active per image with k=2 (6.31M; 5.72M with k=1).

`get_preset(name, **overrides)` builds the config; `hf-vmoe presets` prints the table.
"""

from __future__ import annotations

from ..configuration_vmoe import VMoEConfig

# name -> (layers, width, heads); the order is the table's order
_SIZES = {
    "12x384": (12, 384, 6),
    "12x192": (12, 192, 3),
    "9x192": (9, 192, 3),
    "6x192": (6, 192, 3),
    "6x128": (6, 128, 2),
    "6x96": (6, 96, 3),
    "3x64": (3, 64, 1),
}
_ALIASES = {
    "vit-small": "vit-12x384",
    "vit-tiny": "vit-12x192",
    "vit-54m": "vit-3x64",
    "mobile-vmoe-small": "mobile-vmoe-12x384",
    "mobile-vmoe-tiny": "mobile-vmoe-12x192",
    "mobile-vmoe-54m": "mobile-vmoe-3x64",
}
_NOTES = {
    "vit-12x384": "ViT-Small size",
    "vit-12x192": "ViT-Tiny",
    "mobile-vmoe-12x192": "Mobile V-MoE-Tiny (paper: +3.39% top-1); 11.05M total params as in the paper",
    "vit-3x64": "our reconstruction of the paper's 54M-FLOP model",
    "mobile-vmoe-3x64": "paper: +4.66% top-1 at 54M FLOPs",
    "vimoe-3x64": "evidence round 3's B3 token arm (benchmarks/evidence/round3)",
}
KINDS = ("vit", "mobile-vmoe", "vimoe")

MOBILE_VMOE_DEFAULTS = dict(
    routing_level="image",
    num_experts=10,
    num_experts_per_tok=1,
    moe_layers="last:2",
    shared_router=True,
    router_input="mean",
    superclass_loss_coef=0.3,
)

VIMOE_DEFAULTS = dict(
    routing_level="token",
    num_experts=4,
    num_experts_per_tok=1,
    moe_layers="last:2",
    num_shared_experts=1,
)


def _base(layers: int, width: int, heads: int) -> dict:
    return dict(
        num_hidden_layers=layers,
        hidden_size=width,
        num_attention_heads=heads,
        intermediate_size=4 * width,
        image_size=224,
        patch_size=16,
        num_labels=1000,
    )


def preset_names(include_aliases: bool = False) -> list[str]:
    names = [f"{kind}-{size}" for size in _SIZES for kind in KINDS]
    return names + (sorted(_ALIASES) if include_aliases else [])


def preset_kwargs(name: str) -> dict:
    """The keyword arguments of `VMoEConfig` for a preset (without overrides)."""
    name = _ALIASES.get(name, name)
    kind, _, size = name.rpartition("-")
    if kind not in KINDS or size not in _SIZES:
        raise ValueError(f"unknown preset {name!r}; choose one of {preset_names(include_aliases=True)}")
    kwargs = _base(*_SIZES[size])
    if kind == "vit":
        kwargs["moe_layers"] = "none"
    elif kind == "mobile-vmoe":
        kwargs.update(MOBILE_VMOE_DEFAULTS)
    else:  # routed and shared experts of half the dense width: one routed + the shared = the dense MLP's compute
        half = kwargs["intermediate_size"] // 2
        kwargs.update(VIMOE_DEFAULTS, moe_intermediate_size=half, shared_expert_intermediate_size=half)
    return kwargs


def get_preset(name: str, **overrides) -> VMoEConfig:
    """A `VMoEConfig` for a preset, e.g. `get_preset("mobile-vmoe-tiny", num_labels=200, image_size=64,
    patch_size=8)`. Overrides are any `VMoEConfig` fields and are validated like the config's own."""
    kwargs = preset_kwargs(name)
    if "num_hidden_layers" in overrides and overrides.get("moe_layers") is None and kwargs["moe_layers"] != "none":
        overrides.setdefault("moe_layers", kwargs["moe_layers"])  # "last:2" re-resolves for the new depth
    if "id2label" in overrides and "num_labels" not in overrides:
        kwargs.pop("num_labels")  # implied by id2label
    kwargs.update(overrides)
    return VMoEConfig(**kwargs)


def preset_table(names=None, **overrides) -> list[dict]:
    """One row per preset: name, layers, width, MoE blocks, E, k, total/active parameters, active FLOPs and MACs."""
    from .flops import count_flops

    rows = []
    for name in names or preset_names():
        config = get_preset(name, **overrides)
        cost = count_flops(config)
        rows.append(
            dict(
                name=name,
                layers=config.num_hidden_layers,
                width=config.hidden_size,
                moe_blocks=",".join(map(str, config.moe_layers)) or "-",
                experts=config.num_experts if config.is_moe else 0,
                k=config.num_experts_per_tok if config.is_moe else 0,
                params_total=cost.params_total,
                params_active=cost.params_active,
                flops=cost.flops,
                macs=cost.macs,
                note=_NOTES.get(_ALIASES.get(name, name), ""),
            )
        )
    return rows


def format_preset_table(rows: list[dict], markdown: bool = True) -> str:
    """Render `preset_table()` rows as a markdown (or plain) table."""
    from .flops import format_count

    head = ["preset", "layers x width", "MoE blocks", "E", "k", "params total", "params active",
            "GFLOPs/img (2xMAC)", "MMACs/img", "note"]
    lines = []
    for r in rows:
        lines.append([
            r["name"], f"{r['layers']}x{r['width']}", r["moe_blocks"], str(r["experts"] or "-"), str(r["k"] or "-"),
            format_count(r["params_total"]), format_count(r["params_active"]), f"{r['flops'] / 1e9:.3f}",
            f"{r['macs'] / 1e6:.1f}", r["note"],
        ])
    if markdown:
        out = ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        out += ["| " + " | ".join(line) + " |" for line in lines]
        return "\n".join(out)
    widths = [max(len(h), *(len(line[i]) for line in lines)) for i, h in enumerate(head)]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    return "\n".join([fmt.format(*head)] + [fmt.format(*line) for line in lines])


__all__ = ["get_preset", "preset_kwargs", "preset_names", "preset_table", "format_preset_table",
           "MOBILE_VMOE_DEFAULTS", "VIMOE_DEFAULTS"]
