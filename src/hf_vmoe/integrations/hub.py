"""Model cards and publishing to the Hugging Face Hub.

    from hf_vmoe.integrations.hub import build_model_card, publish
    card = build_model_card(model, repo_id="org/mobile-vmoe-tiny", trained_on="ImageNet-1k, 300 epochs",
                            eval_results=[{"dataset": "imagenet-1k", "metric": "accuracy", "value": 0.629}])
    publish(model, processor, "org/mobile-vmoe-tiny", card=card)

`publish` saves the model (safetensors, with its modeling/config code for `trust_remote_code`), the image processor
and the card into one folder and uploads it as a single commit. Offline (`HF_HUB_OFFLINE=1`) it raises before
anything is written, locally or remotely.

The card is built from the config: routing level, experts, k, MoE layers, total and active parameters (and FLOPs
from `hf_vmoe.recipes.flops`), the super-class map, intended use, limitations and the citations of Mobile
V-MoE (Daxberger et al. 2023) and ViMoE (Han et al. 2024). It says plainly when the weights are untrained. A
dense config (no MoE block) gets a dense description: its width, parameters and FLOPs, no experts or routing.

From the command line: `hf-vmoe card --preset mobile-vmoe-tiny --repo-id org/mobile-vmoe-tiny --out model_cards/...`
"""

from __future__ import annotations

import os
import re
import tempfile
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path

from huggingface_hub import EvalResult, HfApi, ModelCard, ModelCardData
from huggingface_hub.errors import OfflineModeIsEnabled

from ..configuration_vmoe import VMoEConfig
from ..recipes.flops import count_flops, count_params, format_count

UNTRAINED = "randomly initialised (no trained weights yet)"

CITATIONS = r"""```bibtex
@article{daxberger2023mobilevmoe,
  title   = {Mobile V-MoEs: Scaling Down Vision Transformers via Sparse Mixture-of-Experts},
  author  = {Daxberger, Erik and Weers, Floris and Zhang, Bowen and Gunter, Tom and Pang, Ruoming and
             Eichner, Marcin and Emmersberger, Michael and Yang, Yinfei and Toshev, Alexander and Du, Xianzhi},
  journal = {arXiv preprint arXiv:2309.04354},
  year    = {2023}
}

@article{han2024vimoe,
  title   = {ViMoE: An Empirical Study of Designing Vision Mixture-of-Experts},
  author  = {Han, Xumeng and Wei, Longhui and Dou, Zhiyang and Wang, Zipeng and Qiang, Chenhui and He, Xin and
             Sun, Yingfei and Han, Zhenjun and Tian, Qi},
  journal = {arXiv preprint arXiv:2410.15732},
  year    = {2024}
}
```"""

def preset_config(name: str) -> VMoEConfig:
    """The config of a named preset (`hf_vmoe.recipes.presets.get_preset`)."""
    from ..recipes.presets import get_preset

    return get_preset(name)


# ----------------------------------------------------------------------------------------------------------------
# Counting
# ----------------------------------------------------------------------------------------------------------------


def count_parameters(model_or_config) -> dict[str, int]:
    """Total parameters and the parameters active for one input (image routing: per image; token routing: per
    token). Only routed experts are inactive: a MoE block uses k of its E experts. From a model the total is the
    exact `numel` sum (any head); from a config it is `hf_vmoe.recipes.flops.count_params` (the classification model)."""
    if isinstance(model_or_config, VMoEConfig):
        total, active = count_params(model_or_config)
        return {"total": int(total), "active": int(active)}
    model, config = model_or_config, model_or_config.config
    total = sum(p.numel() for p in model.parameters())
    base_total, base_active = count_params(config, head=None)  # the idle experts do not depend on the head
    return {"total": int(total), "active": int(total - (base_total - base_active))}


def _flops(config: VMoEConfig) -> dict:
    """Per-image FLOPs from `hf_vmoe.recipes.flops.count_flops` (2 x MACs, see that module)."""
    cost = count_flops(config)
    return {"flops": int(cost.flops), "macs": int(cost.macs), "flops_all_experts": int(cost.flops_all_experts)}


# ----------------------------------------------------------------------------------------------------------------
# Card
# ----------------------------------------------------------------------------------------------------------------


def _eval_results(results, model_name: str) -> list[EvalResult] | None:
    """Accepts `EvalResult`s or dicts {"dataset", "metric", "value"} (+ optional "dataset_name", "split",
    "task", "metric_name", "config")."""
    if not results:
        return None
    out = []
    for r in results:
        if isinstance(r, EvalResult):
            out.append(r)
            continue
        if not isinstance(r, Mapping) or not {"dataset", "metric", "value"} <= set(r):
            raise ValueError(f"eval result must be an EvalResult or a dict with dataset, metric, value; got {r!r}")
        out.append(
            EvalResult(
                task_type=r.get("task", "image-classification"),
                dataset_type=r["dataset"],
                dataset_name=r.get("dataset_name", r["dataset"]),
                dataset_split=r.get("split"),
                dataset_config=r.get("config"),
                metric_type=r["metric"],
                metric_name=r.get("metric_name", r["metric"]),
                metric_value=float(r["value"]),
            )
        )
    return out


def superclass_summary(config: VMoEConfig, max_names: int = 4) -> str:
    """A markdown table: each expert's super-class, how many classes it holds, a few class names."""
    ids = config.superclass_ids
    if not ids:
        return "No super-class map: the router is trained end to end (or this is a token-routed model)."
    sizes = Counter(ids)
    rows = ["| expert / super-class | classes | examples |", "|---|---|---|"]
    for s in range(config.num_experts):
        members = [c for c, sc in enumerate(ids) if sc == s]
        names = [str(config.id2label.get(c, c)) for c in members[:max_names]]
        more = " ..." if len(members) > max_names else ""
        rows.append(f"| {s} | {sizes.get(s, 0)} | {', '.join(names)}{more} |")
    return (
        f"The router is guided by a map of {len(ids)} classes onto {config.num_experts} super-classes "
        f"(`config.superclass_ids`; sizes {min(sizes.values())}-{max(sizes.values())}).\n\n" + "\n".join(rows)
    )


def architecture_summary(config: VMoEConfig) -> dict:
    params = count_parameters(config)
    summary = {
        "routing_level": config.routing_level,
        "num_experts": config.num_experts,
        "num_experts_per_tok": config.num_experts_per_tok,
        "moe_layers": list(config.moe_layers),
        "num_hidden_layers": config.num_hidden_layers,
        "hidden_size": config.hidden_size,
        "moe_intermediate_size": config.moe_intermediate_size,
        "num_shared_experts": config.num_shared_experts,
        "shared_router": bool(config.shared_router),
        "image_size": config.image_size,
        "patch_size": config.patch_size,
        "total_params": params["total"],
        "active_params": params["active"],
    }
    summary["flops"] = _flops(config)
    return summary


SCRATCH = "scratch"  # trained_from=SCRATCH: the weights started from a random initialisation
_HUB_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*/[A-Za-z0-9_.-]+$")


def describe_origin(trained_from: str | None, upcycled: bool = False, dense_epochs: float | None = None,
                    total_epochs: float | None = None, drop_ratio: float = 0.0,
                    expert_init: str = "copy") -> tuple[str, str | None]:
    """(sentence, Hub id or None) saying where trained weights started from: `SCRATCH` ("scratch") = random
    initialisation; an existing local path is named without a link (it is not on the Hub); an `org/name` id is
    linked and returned for the card's `base_model`; None = not stated (empty sentence). `upcycled`: a dense
    model whose MLP became every expert (else: fine-tuned from it), after its `dense_epochs`, `total_epochs` in
    all with this run's; `drop_ratio`: the share of each expert's hidden units re-initialised (drop-upcycling);
    `expert_init`: how the MLP became the experts (`hf_vmoe.recipes.upcycling.init_experts_from_dense`)."""
    if trained_from is None:
        return "", None
    if not isinstance(trained_from, str) or not trained_from.strip():
        raise ValueError(f"trained_from must be {SCRATCH!r}, a local path or an org/name Hub id, got {trained_from!r}")
    if trained_from == SCRATCH:
        return "Trained from scratch (random initialisation).", None
    how = "Upcycled from the dense model {}" if upcycled else "Fine-tuned from {}"
    detail = "."
    if upcycled:
        sentences = {"copy": "every expert a copy of its MLP",
                     "split_shared": "a shared expert made of the first half of its MLP's hidden units, every routed "
                                     "expert a copy of the other half"}
        if expert_init not in sentences:
            raise ValueError(f"expert_init must be one of {sorted(sentences)} (init_experts_from_dense), got "
                             f"{expert_init!r}")
        copies = sentences[expert_init]
        if drop_ratio:
            copies += f" with a different {drop_ratio:.0%} of its hidden units re-initialised"
        detail = f" (its weights copied, {copies})."
        if dense_epochs is not None and total_epochs is not None:
            detail += (f" The dense model had trained {dense_epochs:g} epochs: {total_epochs:g} epochs in all, "
                       "the dense phase included.")
    if os.path.exists(trained_from) or not _HUB_ID.match(trained_from):
        return how.format(f"`{trained_from}`, a local checkpoint not on the Hub") + detail, None
    return how.format(f"[{trained_from}](https://huggingface.co/{trained_from})") + detail, trained_from


def routing_health_section(health: Mapping | None, num_experts: int, expert_load: Sequence[float] | None = None,
                           routing_level: str = "image") -> str:
    """Markdown for the card: the routing-health check of `hf_vmoe.integrations.callbacks.routing_health` and the expert load,
    all load figures in one unit: percent of the routed items (a balanced expert gets 100 / E %)."""
    unit = "images" if routing_level == "image" else "token assignments"
    balanced = 100.0 / num_experts
    lines = []
    if health:
        thresholds = health.get("thresholds", {})
        problems = []  # health["problems"] in this section's unit
        if "expert_load_max" in health and health["expert_load_max"] > thresholds.get("max_load", float("inf")):
            problems.append(f"busiest expert {health['expert_load_max'] * balanced:.1f}% "
                            f"(> {thresholds['max_load'] * balanced:.1f}%)")
        if "expert_load_min" in health and health["expert_load_min"] < thresholds.get("min_load", 0.0):
            problems.append(f"idlest expert {health['expert_load_min'] * balanced:.1f}% "
                            f"(< {thresholds['min_load'] * balanced:.1f}%)")
        accuracy = health.get("router_superclass_accuracy")
        if accuracy is not None and accuracy < thresholds.get("min_superclass_accuracy", 0.0):
            problems.append(f"router super-class accuracy {100 * accuracy:.1f}% "
                            f"(< {100 * thresholds['min_superclass_accuracy']:.0f}%)")
        lines.append(f"Routing health on the evaluation split: **{health['status']}**"
                     + (f" ({'; '.join(problems)})." if problems else "."))
        if thresholds:
            lines.append(f"Thresholds: busiest expert at most {thresholds['max_load'] * balanced:.1f}%, idlest at "
                         f"least {thresholds['min_load'] * balanced:.1f}% of the routed {unit}, router super-class "
                         f"accuracy at least {100 * thresholds['min_superclass_accuracy']:.0f}%.")
        if health.get("knobs"):
            lines.append("What helps: " + "; ".join(health["knobs"]) + ".")
    rows = []
    if health and "expert_load_max" in health:
        rows.append(f"| busiest expert | {health['expert_load_max'] * balanced:.1f}% |")
    if health and "expert_load_min" in health:
        rows.append(f"| idlest expert | {health['expert_load_min'] * balanced:.1f}% |")
    for e, share in enumerate(expert_load or ()):
        rows.append(f"| expert {e} | {100 * float(share):.1f}% |")
    if health and "router_superclass_accuracy" in health:
        rows.append(f"| router super-class accuracy | {100 * health['router_superclass_accuracy']:.1f}% |")
    if rows:
        lines.append(f"Expert load in percent of the routed {unit} (balanced: {balanced:.1f}% each):\n\n"
                     "| | |\n|---|---|\n" + "\n".join(rows))
    return "\n\n".join(lines)


def build_model_card(
    model_or_config,
    repo_id: str,
    *,
    trained_on: str | None = None,
    eval_results: Sequence | None = None,
    datasets: Sequence[str] | None = None,
    base_model: str | None = None,
    license: str = "apache-2.0",
    extra_notes: str | None = None,
    trained_from: str | None = None,
    upcycled: bool = False,
    dense_epochs: float | None = None,
    total_epochs: float | None = None,
    drop_ratio: float = 0.0,
    expert_init: str = "copy",
    routing_health: Mapping | None = None,
    expert_load: Sequence[float] | None = None,
    training: Mapping | None = None,
    recipe: str | None = None,
) -> ModelCard:
    """A model card for a VMoE model or config.

    trained_on: what the weights were trained on, in words (None = the weights are untrained and the card says so).
    eval_results: `EvalResult`s or dicts {"dataset", "metric", "value"} -> the card's model-index.
    trained_from: with `trained_on`, where the training started from: "scratch" (`SCRATCH`, random initialisation),
    a checkpoint (a local path is named without a link; an `org/name` Hub id is linked and becomes `base_model`); `upcycled`: it was a dense
    model whose MLP became the experts, after its `dense_epochs` (`total_epochs` in all; `drop_ratio`,
    `expert_init`: see `describe_origin`); None = not stated. A dense config (no MoE block) gets a dense description. routing_health: `hf_vmoe.integrations.callbacks.routing_health`'s dict (e.g.
    `RouterStatsCallback.health`); expert_load: each expert's share of the routed items; training: a few
    hyperparameters, {name: value}, listed as they are. recipe: markdown saying how to train the model and the
    evidence for it (the card's "Recipe and evidence" section).
    """
    config = model_or_config if isinstance(model_or_config, VMoEConfig) else model_or_config.config
    if not isinstance(repo_id, str) or not repo_id.strip():
        raise ValueError(f"repo_id must be a non-empty string, got {repo_id!r}")
    if eval_results and trained_on is None:
        raise ValueError("eval_results were given for untrained weights: pass trained_on= to say what they came from")
    if (trained_from is not None or routing_health or expert_load or training) and trained_on is None:
        raise ValueError("trained_from / routing_health / expert_load / training describe trained weights: pass "
                         "trained_on= to say what they were trained on")
    model_name = repo_id.split("/")[-1]
    origin, origin_id = (describe_origin(trained_from, upcycled, dense_epochs, total_epochs, drop_ratio, expert_init)
                         if trained_on else (None, None))
    if base_model is None:
        base_model = origin_id
    arch = architecture_summary(config)
    if config.is_moe:
        tags = ["vision", "image-classification", "mixture-of-experts", "vmoe", f"{config.routing_level}-routing"]
        if config.routing_level == "image":
            tags.append("mobile-vmoe")
        if config.num_shared_experts:
            tags.append("vimoe")
    else:
        tags = ["vision", "image-classification", "vit", "vmoe", "dense"]
    data = ModelCardData(
        model_name=model_name,
        license=license,
        library_name="transformers",
        pipeline_tag="image-classification",
        tags=tags,
        datasets=list(datasets) if datasets else None,
        base_model=base_model,
        eval_results=_eval_results(eval_results, model_name),
    )

    routing = (
        f"**image-level** routing (Mobile V-MoE): each whole image goes to {config.num_experts_per_tok} of "
        f"{config.num_experts} experts, decided by "
        + ("one router shared by every MoE block" if config.shared_router else "a router in each MoE block")
        + f" that reads the {'class token' if config.router_input == 'cls' else 'mean patch token'}"
        if config.routing_level == "image"
        else f"**token-level** routing (V-MoE / ViMoE): each patch token goes to its top-{config.num_experts_per_tok} "
        f"of {config.num_experts} experts in each MoE block"
        + ("" if config.capacity_factor is None else f", training capacity factor {config.capacity_factor}")
    )
    shared = (
        f"{config.num_shared_experts} always-on shared expert(s) of width {config.shared_expert_intermediate_size} "
        "(ViMoE)"
        if config.num_shared_experts
        else "none"
    )
    flops = arch["flops"]
    flops_line = (
        f"{format_count(flops['flops'])} per image at inference ({format_count(flops['macs'])} MACs); "
        f"{format_count(flops['flops_all_experts'])} if every expert ran (analytic, `hf_vmoe.recipes.flops.count_flops`)"
    )
    weights = trained_on or UNTRAINED
    status = (
        f"Weights: {weights}." + (f" {origin}" if origin else "")
        if trained_on
        else "**These weights are randomly initialised: no trained checkpoint has been published yet.** The card "
        "describes the architecture; predictions from these weights are meaningless."
    )
    results_md = ""
    if data.eval_results:
        rows = ["| dataset | split | metric | value |", "|---|---|---|---|"]
        for r in data.eval_results:
            rows.append(f"| {r.dataset_name} | {r.dataset_split or ''} | {r.metric_name} | {r.metric_value:.4g} |")
        results_md = "\n## Evaluation\n\n" + "\n".join(rows) + "\n"
    if trained_on and (routing_health or expert_load):
        results_md += ("\n## Routing health\n\n"
                       + routing_health_section(routing_health, config.num_experts, expert_load, config.routing_level)
                       + "\n")
    if trained_on and training:
        results_md += ("\n## Training\n\n| | |\n|---|---|\n"
                       + "\n".join(f"| {k} | {v} |" for k, v in training.items()) + "\n")

    shape = (f"{config.num_hidden_layers} x {config.hidden_size} ViT, patch\n{config.patch_size}, "
             f"{config.image_size} px")
    if config.is_moe:
        intro = (f"A sparse Vision Mixture-of-Experts Transformer ({shape}) from the `hf_vmoe` package, loadable "
                 "with `transformers`.")
        architecture_rows = (
            f"| routing | {routing} |\n"
            f"| experts per MoE block | {config.num_experts} (k = {config.num_experts_per_tok}), width "
            f"{config.moe_intermediate_size} |\n"
            f"| MoE blocks | {list(config.moe_layers)} of {config.num_hidden_layers} |\n"
            f"| shared experts | {shared} |\n"
            f"| parameters | {format_count(arch['total_params'])} total, {format_count(arch['active_params'])} active "
            f"per {'image' if config.routing_level == 'image' else 'token'} "
            f"({arch['total_params']:,} / {arch['active_params']:,}) |\n"
            f"| FLOPs | {flops_line} |")
        superclass_md = f"### Super-classes\n\n{superclass_summary(config)}\n"
        router_outputs = (" `output_router_logits=True`\nreturns the router logits and `outputs.expert_counts`, the "
                          "items each expert received (one row per router call).")
        intended_use = (
            "Image classification (and, through `VMoEBackbone` / `VMoEForSemanticSegmentation`, dense prediction) "
            "where compute\nper image must stay small: "
            + ("image-level routing runs only k experts per image, so an image costs what a dense ViT of the active "
               "size costs, which suits on-device inference" if config.routing_level == "image"
               else "token routing keeps per-token compute at k experts while total capacity grows with E")
            + ".\nResearch on routing: specialisation of experts per class or super-class, how many MoE layers to use.")
        routing_limitations = (
            "- Routing is learned from the training data: images far from it may be sent to an expert that never "
            "saw\n  anything like them; check `expert_counts` on your data.\n"
            "- Image routing decides one expert set per image: small objects in cluttered scenes get the expert of "
            "the\n  dominant content. Token routing avoids this at a higher active-parameter count.\n"
            "- Training MoE models needs the balancing losses (`router_aux_loss_coef`, `router_z_loss_coef`); without "
            "them\n  experts collapse.\n")
    else:
        intro = (f"A dense Vision Transformer ({shape}) from the `hf_vmoe` package, loadable with `transformers`:\nno "
                 f"mixture of experts, every block has one MLP of width {config.intermediate_size}.")
        flops_line = (f"{format_count(flops['flops'])} per image at inference ({format_count(flops['macs'])} MACs; "
                      "analytic, `hf_vmoe.recipes.flops.count_flops`)")
        architecture_rows = (
            f"| blocks | {config.num_hidden_layers} dense blocks, hidden size {config.hidden_size}, MLP width "
            f"{config.intermediate_size} |\n"
            f"| parameters | {format_count(arch['total_params'])} ({arch['total_params']:,}), all active |\n"
            f"| FLOPs | {flops_line} |")
        superclass_md = ""
        router_outputs = ""
        intended_use = (
            "Image classification, and the dense side of the Mobile V-MoE recipe: the baseline a sparse model is "
            "compared with\nat equal active FLOPs, the model whose confusion matrix gives the super-classes, and the "
            "weights an MoE is upcycled from.")
        routing_limitations = ""
    recipe_md = f"\n## Recipe and evidence\n\n{recipe.strip()}\n" if recipe else ""
    body = f"""
# {model_name}

{intro}

{status}

## Architecture

| | |
|---|---|
{architecture_rows}
| labels | {config.num_labels} |

{superclass_md}{results_md}{recipe_md}
## How to use

```python
from transformers import AutoImageProcessor, AutoModelForImageClassification

processor = AutoImageProcessor.from_pretrained("{repo_id}", trust_remote_code=True)
model = AutoModelForImageClassification.from_pretrained("{repo_id}", trust_remote_code=True)
inputs = processor(images=image, return_tensors="pt")
predicted = model(**inputs).logits.argmax(-1)
```

With `pip install hf-vmoe` and `import hf_vmoe`, `trust_remote_code` is not needed.{router_outputs}

## Intended use

{intended_use}

## Limitations

- {status if not trained_on else 'Accuracy is only known for the evaluation listed on this card; other domains are untested.'}
{routing_limitations}{('- ' + extra_notes) if extra_notes else ''}

## Citation

{CITATIONS}
"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


# ----------------------------------------------------------------------------------------------------------------
# Publishing
# ----------------------------------------------------------------------------------------------------------------


def _check_online(repo_id: str) -> None:
    from huggingface_hub import constants

    offline = constants.HF_HUB_OFFLINE or os.environ.get("HF_HUB_OFFLINE", "").upper() in ("1", "ON", "YES", "TRUE")
    if offline:
        raise OfflineModeIsEnabled(
            f"Cannot publish to {repo_id!r}: HF_HUB_OFFLINE=1 is set, so no request may reach the Hub. Nothing "
            "was written, locally or remotely. Unset HF_HUB_OFFLINE to publish."
        )


def publish(
    model,
    processor,
    repo_id: str,
    *,
    card: ModelCard | None = None,
    trained_on: str | None = None,
    eval_results: Sequence | None = None,
    commit_message: str = "Upload VMoE model, image processor and model card",
    private: bool | None = None,
    token: str | bool | None = None,
    revision: str | None = None,
):
    """Push model + image processor + model card to `repo_id` in one commit; returns the `CommitInfo`.

    The model is saved as safetensors with its `configuration_vmoe.py` / `modeling_vmoe.py` (and the processor's
    code) so the repo loads with `trust_remote_code=True` where hf_vmoe is not installed. Without `card` one is
    built with `build_model_card(model, repo_id, trained_on=..., eval_results=...)`.
    Raises `OfflineModeIsEnabled` (before writing anything) when HF_HUB_OFFLINE is set.
    """
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"repo_id must look like 'name' or 'org/name', got {repo_id!r}")
    _check_online(repo_id)
    if card is None:
        card = build_model_card(model, repo_id, trained_on=trained_on, eval_results=eval_results)
    api = HfApi(token=token)
    repo_url = api.create_repo(repo_id, private=private, exist_ok=True, token=token)
    with tempfile.TemporaryDirectory(prefix="hf_vmoe_publish_") as folder:
        model.save_pretrained(folder)
        if processor is not None:
            processor.save_pretrained(folder)
        card.save(Path(folder) / "README.md")
        return api.upload_folder(
            repo_id=repo_url.repo_id,
            folder_path=folder,
            commit_message=commit_message,
            revision=revision,
            token=token,
        )


__all__ = ["build_model_card", "publish", "count_parameters", "architecture_summary", "superclass_summary",
           "preset_config", "describe_origin", "SCRATCH", "routing_health_section", "CITATIONS"]
