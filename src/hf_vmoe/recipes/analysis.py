"""Routing analysis (ViMoE, Han et al. 2024): which MoE layers route by class, and which could be dense.

    stats = collect_routing(model, dataloader)        # batches with pixel_values and labels
    report = stats.report("routing_report")           # report.json, heatmap_layer{i}.png, recommended_config/

For every MoE block, `collect_routing` counts how often items of each class go to each expert:

- image routing: one item per image, labelled with the image's class (classification) or, for segmentation
  labels, spread over the classes present in proportion to their pixels;
- token routing: one item per patch token (the class token is left out unless `include_cls_token`), labelled with
  the image's class (classification) or the patch's pixel label (segmentation): the majority label of the patch's
  pixels (`patch_label="majority"`, ignoring `ignore_index`) or the label of its centre pixel (`"nearest"`).

With k > 1 each of an item's k assignments counts 1/k. Decisions are read from the routers' top-k outputs (hooks
on every `VMoERouter`: the plan's assignment mass; Soft MoE: its dispatch weights), so they are exactly what the model used at eval time (eval is dropless unless
`eval_capacity_factor` is set; dropped assignments are still counted as the router's choice).

Per layer (`RoutingStats.layer_metrics`), from the joint class x expert distribution P(c, e):
- `specialization` = I(C; E) / H(E): the share of the routing entropy explained by the class (1 = the class decides
  the expert, 0 = routing independent of the class). The main score; robust to more classes than experts.
- `nmi` = I(C; E) / ((H(C) + H(E)) / 2): normalised mutual information (scikit-learn's default normalisation).
- `conditional_entropy` = H(E | C) / log E, `load_entropy` = H(E) / log E (1 = balanced load), `expert_load`
  (share of assignments per expert), `router_entropy` (mean entropy of the router's softmax / log E: how confident
  the router is), `class_purity` (share of items going to their class's most used expert).
Finite samples bias mutual information upwards by about (C - 1)(E - 1) / (2 N) nats; `num_items` is reported.

A layer is *specialised* when `specialization >= threshold`; the others could be made dense. The recommendation is
written as a VMoE config whose `moe_layers` keeps only the specialised layers (trainable directly).
With one shared image router (Mobile V-MoE) every MoE block applies the same decision, so the layers cannot be
told apart: the recommendation keeps all of them or none.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from ..configuration_vmoe import VMoEConfig, to_pair
from ..modeling_vmoe import VMoEEncoder, VMoERouter

PATCH_LABELS = ("majority", "nearest")
DEFAULT_THRESHOLD = 0.2


def _entropy(p: np.ndarray) -> float:
    p = p[p > 0]
    return float(-(p * np.log(p)).sum())


def routing_metrics(counts: np.ndarray) -> dict:
    """Specialisation numbers of one (classes, experts) count matrix (see the module docstring)."""
    counts = np.asarray(counts, dtype=np.float64)
    if counts.ndim != 2:
        raise ValueError(f"counts must be a (classes, experts) matrix, got shape {counts.shape}")
    total = counts.sum()
    num_experts = counts.shape[1]
    if total <= 0:
        raise ValueError("counts are all zero: no routed items were collected")
    joint = counts / total
    p_class, p_expert = joint.sum(axis=1), joint.sum(axis=0)
    h_class, h_expert, h_joint = _entropy(p_class), _entropy(p_expert), _entropy(joint.reshape(-1))
    mutual = max(0.0, h_class + h_expert - h_joint)
    log_e = math.log(num_experts) if num_experts > 1 else 1.0
    rows = counts[counts.sum(axis=1) > 0]
    return {
        "specialization": mutual / h_expert if h_expert > 1e-12 else 0.0,
        "nmi": 2 * mutual / (h_class + h_expert) if h_class + h_expert > 1e-12 else 0.0,
        "mutual_information": mutual,
        "conditional_entropy": (h_joint - h_class) / log_e,
        "load_entropy": h_expert / log_e,
        "expert_load": p_expert.tolist(),
        "class_purity": float(rows.max(axis=1).sum() / rows.sum()) if len(rows) else 0.0,
        "num_items": float(total),
        "num_classes_seen": int(len(rows)),
    }


def heatmap_order(counts: np.ndarray) -> np.ndarray:
    """Class order that makes routing structure visible: classes grouped by their most used expert (experts in
    order), and within a group by decreasing share of that expert. Classes never seen are left out."""
    counts = np.asarray(counts, dtype=np.float64)
    totals = counts.sum(axis=1)
    seen = np.nonzero(totals > 0)[0]
    shares = counts[seen] / totals[seen, None]
    best = shares.argmax(axis=1)
    order = np.lexsort((-shares[np.arange(len(seen)), best], best))
    return seen[order]


ROW_LABEL_MAX_ROWS = 240  # rows get class names up to this many classes (the PNG grows to fit them)
_ROW_INCHES = 0.13  # height per labelled row: fits a 7 pt name
_MAX_NAME = 28  # longer names are shortened on the plot (the rows CSV keeps them whole)


def _short(name: str) -> str:
    name = str(name)
    return name if len(name) <= _MAX_NAME else name[: _MAX_NAME - 1] + "…"


def write_row_order_csv(path: str | os.PathLike, order, matrix: np.ndarray,
                        class_names: list[str] | None = None) -> Path:
    """The heatmap's rows, top to bottom: `row,class_id,class_name,preferred_expert,preferred_share`."""
    import csv

    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.writer(f)
        writer.writerow(["row", "class_id", "class_name", "preferred_expert", "preferred_share"])
        for row, (class_id, shares) in enumerate(zip(order, matrix)):
            name = class_names[class_id] if class_names is not None else ""
            writer.writerow([row, int(class_id), name, int(shares.argmax()), f"{shares.max():.4f}"])
    return path


def plot_heatmap(counts: np.ndarray, path: str | os.PathLike, class_names: list[str] | None = None,
                 title: str | None = None, sort: bool = True, rows_csv: str | os.PathLike | None = None) -> dict:
    """Save a class x expert heatmap (each row = the share of a class's items routed to each expert) as a PNG.

    Rows are labelled with the class names (`class_names`, else the class ids) when there are at most
    `ROW_LABEL_MAX_ROWS` rows: the figure grows so each name gets a readable 7-10 pt line. With more rows the axis
    names `rows_csv` instead; `rows_csv` (written when given, whatever the row count) lists the rows top to bottom
    with their class ids and names. Returns the plotted class order, the matrix (rows normalised), whether the rows
    are labelled, and the CSV path (or None)."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    counts = np.asarray(counts, dtype=np.float64)
    order = heatmap_order(counts) if sort else np.nonzero(counts.sum(axis=1) > 0)[0]
    matrix = counts[order] / counts[order].sum(axis=1, keepdims=True)
    num_classes, num_experts = matrix.shape
    labelled = num_classes <= ROW_LABEL_MAX_ROWS
    names = [str(class_names[i]) if class_names is not None else str(int(i)) for i in order]
    fig_h = 2.2 + (_ROW_INCHES * num_classes if labelled else 10.0)
    fig_h = max(fig_h, 3.5)
    row_points = 72 * (fig_h - 1.2) / max(num_classes, 1)  # about the axes' height per row
    font = float(np.clip(row_points * 0.6, 7, 10))
    longest = max((len(_short(n)) for n in names), default=2) if labelled else 2
    fig_w = min(14.0, 3.0 + 0.45 * num_experts + 0.075 * font * longest)
    fig, ax = plt.subplots(figsize=(fig_w, fig_h))
    image = ax.imshow(matrix, aspect="auto", cmap="viridis", vmin=0.0, vmax=1.0, interpolation="nearest")
    ax.set_xlabel("expert", fontsize=11)
    ax.set_xticks(range(num_experts))
    ax.tick_params(axis="x", labelsize=10 if num_experts <= 16 else 7)
    if labelled:
        ax.set_ylabel("class (by preferred expert)", fontsize=11)
        ax.set_yticks(range(num_classes))
        ax.set_yticklabels([_short(n) for n in names], fontsize=font)
    else:
        where = f"row order: {Path(rows_csv).name}" if rows_csv is not None else "too many rows to name"
        ax.set_ylabel(f"{num_classes} classes, grouped by preferred expert ({where})", fontsize=11)
        ax.set_yticks([])
    if title:
        ax.set_title(title, fontsize=11)
    fig.colorbar(image, ax=ax, label="share of the class's items")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    csv_path = write_row_order_csv(rows_csv, order, matrix, class_names) if rows_csv is not None else None
    return {"order": order.tolist(), "matrix": matrix, "labelled": labelled,
            "rows_csv": str(csv_path) if csv_path is not None else None}


@dataclass
class RoutingStats:
    """Class x expert routing counts per MoE layer, collected by :func:`collect_routing`."""

    counts: dict[int, np.ndarray]
    config: VMoEConfig
    unit: str  # "image" or "token"
    class_names: list[str] | None = None
    router_entropy: dict[int, float] = field(default_factory=dict)
    shared_router: bool = False

    @property
    def layers(self) -> list[int]:
        return sorted(self.counts)

    def layer_metrics(self, layer: int) -> dict:
        metrics = routing_metrics(self.counts[layer])
        if layer in self.router_entropy:
            metrics["router_entropy"] = self.router_entropy[layer]
        return metrics

    def recommend(self, threshold: float = DEFAULT_THRESHOLD) -> dict:
        """Which MoE layers are specialised (keep as MoE) and which could be dense."""
        scores = {layer: self.layer_metrics(layer)["specialization"] for layer in self.layers}
        keep = [layer for layer, score in scores.items() if score >= threshold]
        if self.shared_router and keep:  # one decision for all MoE blocks: all or none
            keep = self.layers
        return {
            "threshold": threshold,
            "specialized_layers": keep,
            "dense_candidates": [layer for layer in self.layers if layer not in keep],
            "best_layer": max(scores, key=scores.get) if scores else None,
            "moe_layers": keep,
        }

    def recommended_config(self, threshold: float = DEFAULT_THRESHOLD) -> VMoEConfig:
        """The analysed model's config with `moe_layers` set to the specialised layers."""
        data = self.config.to_dict()
        data["moe_layers"] = tuple(self.recommend(threshold)["moe_layers"])
        for key in ("model_type", "transformers_version", "architectures", "auto_map"):
            data.pop(key, None)
        return VMoEConfig(**data)

    def summary(self, threshold: float = DEFAULT_THRESHOLD) -> dict:
        return {
            "routing_level": self.config.routing_level,
            "unit": self.unit,
            "num_experts": self.config.num_experts,
            "num_experts_per_tok": self.config.num_experts_per_tok,
            "shared_router": self.shared_router,
            "moe_layers": self.layers,
            "layers": {str(layer): self.layer_metrics(layer) for layer in self.layers},
            "recommendation": self.recommend(threshold),
        }

    def report(self, out_dir: str | os.PathLike, threshold: float = DEFAULT_THRESHOLD,
               class_names: list[str] | None = None) -> dict:
        """Write `report.json` (all numbers + counts), `heatmap_layer{i}.png` per MoE layer with
        `heatmap_layer{i}_rows.csv` (its rows top to bottom, with class names) and `recommended_config/config.json`;
        return the report dict."""
        out_dir = Path(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        names = class_names or self.class_names
        summary = self.summary(threshold)
        summary["heatmaps"] = {}
        summary["counts"] = {}
        for layer in self.layers:
            score = summary["layers"][str(layer)]["specialization"]
            path = out_dir / f"heatmap_layer{layer}.png"
            plotted = plot_heatmap(self.counts[layer], path, names,
                                   title=f"MoE layer {layer} ({self.unit} routing), specialization {score:.2f}",
                                   rows_csv=out_dir / f"heatmap_layer{layer}_rows.csv")
            summary["heatmaps"][str(layer)] = {"path": path.name, "class_order": plotted["order"],
                                               "rows_csv": Path(plotted["rows_csv"]).name,
                                               "rows_labelled": plotted["labelled"]}
            summary["counts"][str(layer)] = self.counts[layer].tolist()
        if names is not None:
            summary["class_names"] = list(names)
        config = self.recommended_config(threshold)
        # config.json only (save_pretrained would also copy the remote-code .py files next to it)
        (out_dir / "recommended_config").mkdir(parents=True, exist_ok=True)
        config.to_json_file(out_dir / "recommended_config" / "config.json")
        summary["recommended_config"] = "recommended_config/config.json"
        (out_dir / "report.json").write_text(json.dumps(summary, indent=2))
        return summary


# --------------------------------------------------------------------------------------------------------------
# Collection
# --------------------------------------------------------------------------------------------------------------


def _find_vmoe(model: torch.nn.Module) -> tuple[VMoEConfig, dict[str, list[int]], tuple[int, int]]:
    """(VMoE config, router module name -> MoE layers it serves, patch size)."""
    encoder_name, encoder = next(((n, m) for n, m in model.named_modules() if isinstance(m, VMoEEncoder)),
                                 (None, None))
    if encoder is None:
        raise ValueError(f"{type(model).__name__} contains no VMoE encoder")
    config = encoder.config
    if not config.is_moe:
        raise ValueError("the model has no MoE layers (moe_layers is empty): nothing to analyse")
    routers = {}
    for name, module in model.named_modules():
        if isinstance(module, VMoERouter):
            match = re.search(r"layer\.(\d+)\.mlp\.router$", name)
            routers[name] = [int(match.group(1))] if match else list(config.moe_layers)
    return config, routers, to_pair(config.patch_size)


def _patch_labels(labels: torch.Tensor, size: tuple[int, int], patch: tuple[int, int], num_classes: int,
                  mode: str, ignore_index: int) -> torch.Tensor:
    """(B, H, W) pixel labels -> (B, num_patches) patch labels, -1 where a patch has no valid pixel."""
    labels = labels.long()
    if labels.shape[-2:] != tuple(size):
        labels = F.interpolate(labels[:, None].float(), size=size, mode="nearest")[:, 0].long()
    batch = labels.shape[0]
    gh, gw = size[0] // patch[0], size[1] // patch[1]
    labels = labels[:, : gh * patch[0], : gw * patch[1]]
    patches = labels.reshape(batch, gh, patch[0], gw, patch[1]).permute(0, 1, 3, 2, 4).reshape(batch, gh * gw, -1)
    valid = (patches != ignore_index) & (patches >= 0) & (patches < num_classes)
    if mode == "nearest":
        centre = patches[:, :, (patch[0] // 2) * patch[1] + patch[1] // 2]
        ok = valid[:, :, (patch[0] // 2) * patch[1] + patch[1] // 2]
        return torch.where(ok, centre, torch.full_like(centre, -1))
    hist = F.one_hot(torch.where(valid, patches, 0), num_classes).mul(valid.unsqueeze(-1)).sum(dim=2)
    return torch.where(hist.sum(-1) > 0, hist.argmax(-1), torch.full_like(hist[..., 0], -1))


def _image_class_weights(labels: torch.Tensor, num_classes: int, ignore_index: int) -> torch.Tensor:
    """(B,) class ids or (B, H, W) pixel labels -> (B, C) class weights (one-hot, or pixel shares)."""
    if labels.ndim == 1:
        return F.one_hot(labels.long(), num_classes).double()
    flat = labels.reshape(labels.shape[0], -1).long()
    valid = (flat != ignore_index) & (flat >= 0) & (flat < num_classes)
    hist = F.one_hot(torch.where(valid, flat, 0), num_classes).mul(valid.unsqueeze(-1)).sum(dim=1).double()
    return hist / hist.sum(dim=1, keepdim=True).clamp(min=1)


def collect_routing(
    model: torch.nn.Module,
    data: Iterable,
    num_classes: int | None = None,
    class_names: list[str] | None = None,
    pixel_key: str = "pixel_values",
    label_key: str = "labels",
    patch_label: str = "majority",
    ignore_index: int = 255,
    include_cls_token: bool = False,
    max_batches: int | None = None,
    device: str | torch.device | None = None,
) -> RoutingStats:
    """Run `model` (eval mode, no grad) over `data` (a DataLoader or any iterable of dicts with `pixel_key` and
    `label_key`, or `(pixel_values, labels)` pairs) and count class x expert routing decisions per MoE layer.

    Labels: `(B,)` image classes or `(B, H, W)` pixel labels (`ignore_index` skipped). `num_classes` defaults to
    the model's `num_labels`."""
    if patch_label not in PATCH_LABELS:
        raise ValueError(f"patch_label must be one of {PATCH_LABELS}, got {patch_label!r}")
    config, routers, patch = _find_vmoe(model)
    top_config = getattr(model, "config", config)
    num_classes = num_classes or getattr(top_config, "num_labels", None)
    if not num_classes or num_classes < 1:
        raise ValueError(f"num_classes must be a positive integer, got {num_classes!r}")
    if class_names is None and getattr(top_config, "id2label", None) and len(top_config.id2label) == num_classes:
        class_names = [top_config.id2label[i] for i in range(num_classes)]
    num_experts, top_k = config.num_experts, config.num_experts_per_tok
    shared = config.routing_level == "image" and bool(config.shared_router)
    layers = sorted({layer for served in routers.values() for layer in served})
    counts = {layer: np.zeros((num_classes, num_experts), dtype=np.float64) for layer in layers}
    entropy_sum = {layer: 0.0 for layer in layers}
    entropy_n = {layer: 0 for layer in layers}
    captured: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def make_hook(name):
        def hook(module, args, output):
            logits, plan = output
            captured[name] = (logits.detach(), plan.assignment_mass(num_experts).detach())

        return hook

    modules = dict(model.named_modules())
    handles = [modules[name].register_forward_hook(make_hook(name)) for name in routers]
    was_training = model.training
    model.eval()
    if device is not None:
        model.to(device)
    device = next(model.parameters()).device
    try:
        with torch.no_grad():
            for step, batch in enumerate(data):
                if max_batches is not None and step >= max_batches:
                    break
                if isinstance(batch, dict):
                    pixels, labels = batch[pixel_key], batch[label_key]
                else:
                    pixels, labels = batch[0], batch[1]
                pixels, labels = torch.as_tensor(pixels), torch.as_tensor(labels)
                captured.clear()
                if _accepts_interp(model):  # any resolution divisible by the patch size
                    model(pixel_values=pixels.to(device), interpolate_pos_encoding=True)
                else:
                    model(pixel_values=pixels.to(device))
                _accumulate(captured, routers, counts, entropy_sum, entropy_n, pixels, labels.cpu(), patch,
                            num_classes, num_experts, top_k, patch_label, ignore_index, include_cls_token)
    finally:
        for handle in handles:
            handle.remove()
        model.train(was_training)
    if all(c.sum() == 0 for c in counts.values()):
        raise ValueError("no labelled items were routed: check the labels (all ignored?) and the data")
    entropy = {layer: entropy_sum[layer] / entropy_n[layer] for layer in layers if entropy_n[layer]}
    unit = "image" if config.routing_level == "image" else "token"
    return RoutingStats(counts, config, unit, class_names, entropy, shared)


def _accepts_interp(model) -> bool:
    import inspect

    try:
        return "interpolate_pos_encoding" in inspect.signature(model.forward).parameters
    except (TypeError, ValueError):
        return False


def _accumulate(captured, routers, counts, entropy_sum, entropy_n, pixels, labels, patch, num_classes,
                num_experts, top_k, patch_label, ignore_index, include_cls_token):
    batch = pixels.shape[0]
    size = tuple(pixels.shape[-2:])
    for name, (logits, mass) in captured.items():
        mass, logits = mass.double().cpu(), logits.float().cpu()  # mass: (items, E), the plan's assignment mass
        probs = logits.softmax(-1)
        outputs = probs.shape[-1]  # E, or E x slots for Soft MoE
        ent = -(probs * probs.clamp_min(1e-12).log()).sum(-1) / (math.log(outputs) if outputs > 1 else 1.0)
        num_items = mass.shape[0]
        if num_items == batch:  # image routing
            weights = _image_class_weights(labels, num_classes, ignore_index)  # (B, C)
            joint = weights.t() @ mass
        else:  # token routing: (B * S) items, S = 1 + num_patches
            seq = num_items // batch
            mass = mass.view(batch, seq, num_experts)
            ent = ent.view(batch, seq)
            if labels.ndim == 1:
                token_labels = labels.long().view(batch, 1).expand(batch, seq).clone()
                if not include_cls_token:
                    token_labels[:, 0] = -1
            else:
                patch_labels = _patch_labels(labels, size, patch, num_classes, patch_label, ignore_index)
                cls = torch.full((batch, 1), -1, dtype=torch.long)
                token_labels = torch.cat([cls, patch_labels], dim=1)
            keep = token_labels >= 0
            joint = torch.zeros(num_classes, num_experts, dtype=torch.float64).index_add_(
                0, token_labels[keep], mass[keep])
            ent = ent[keep]
        for layer in routers[name]:
            counts[layer] += joint.numpy()
            entropy_sum[layer] += float(ent.sum())
            entropy_n[layer] += int(ent.numel())


__all__ = ["RoutingStats", "collect_routing", "plot_heatmap", "heatmap_order", "routing_metrics",
           "write_row_order_csv", "ROW_LABEL_MAX_ROWS"]
