"""Helpers shared by the Accelerate examples: model/config choice, data, the forced-router switch used by the tests,
and the per-rank report (expert counts, local aux losses, a parameter snapshot)."""

import json
from pathlib import Path

from dataclasses import replace

import torch
from torch.utils.data import Dataset

import hf_vmoe  # noqa: F401  (registers the Auto classes)
from hf_vmoe import VMoEConfig, VMoEForImageClassification
from hf_vmoe.configuration_vmoe import to_pair
from hf_vmoe.modeling_vmoe import VMoETopKRouter

TINY = dict(hidden_size=32, num_hidden_layers=4, num_attention_heads=2, intermediate_size=64, image_size=32,
            patch_size=8, num_experts=4, num_labels=5)


def add_model_args(parser):
    parser.add_argument("--model", default=None, help="a saved model folder or Hub id (default: a fresh config)")
    parser.add_argument("--tiny", action="store_true", help="a 4-block width-32 model on 32 px images (tests)")
    parser.add_argument("--routing", choices=["image", "token"], default="image")
    parser.add_argument("--num-experts-per-tok", type=int, default=1)
    parser.add_argument("--num-shared-experts", type=int, default=0)
    parser.add_argument("--data-dir", default=None, help="an imagefolder (train/ subfolders per class)")
    parser.add_argument("--synthetic", type=int, default=64, help="random images when no --data-dir")
    parser.add_argument("--force-idle-experts", action="store_true",
                        help="test switch: the last rank sends every input to experts 0..k-1, so the other experts "
                             "get no input there while the other ranks route normally")
    parser.add_argument("--report-dir", default=None, help="write per-rank JSON reports and parameter snapshots")
    parser.add_argument("--seed", type=int, default=0)


def build_model(args) -> VMoEForImageClassification:
    if args.model:
        return VMoEForImageClassification.from_pretrained(args.model)
    kwargs = dict(TINY) if args.tiny else dict(num_labels=1000)
    kwargs.update(routing_level=args.routing, num_experts_per_tok=args.num_experts_per_tok,
                  num_shared_experts=args.num_shared_experts)
    torch.manual_seed(args.seed)
    model = VMoEForImageClassification(VMoEConfig(**kwargs))
    with torch.no_grad():  # spread the routers so inputs go to different experts from the first step
        for module in model.modules():
            if isinstance(module, VMoETopKRouter):
                module.weight.normal_(0, 1.0)
    return model


class SyntheticImages(Dataset):
    """Deterministic random images with random labels (the same on every rank; the sampler shards them)."""

    def __init__(self, config, size: int, seed: int = 0):
        g = torch.Generator().manual_seed(seed)
        self.pixel_values = torch.randn(size, config.num_channels, *to_pair(config.image_size), generator=g)
        self.labels = torch.randint(0, config.num_labels, (size,), generator=g)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}


def build_dataset(args, config):
    if args.data_dir is None:
        return SyntheticImages(config, args.synthetic, args.seed)
    from datasets import load_dataset

    from hf_vmoe import VMoEImageProcessor

    processor = VMoEImageProcessor(size={"height": config.image_size, "width": config.image_size})
    data = load_dataset("imagefolder", data_dir=args.data_dir, split="train")

    def transform(batch):
        out = processor([im.convert("RGB") for im in batch["image"]], return_tensors="pt")
        return {"pixel_values": out["pixel_values"], "labels": batch["label"]}

    return data.with_transform(transform)


def force_first_experts(model):
    """Route every item to experts 0..k-1 (router gradients still flow through the softmax probabilities)."""

    def hook(router, args, output):
        logits, plan = output
        forced = torch.arange(router.top_k, device=logits.device).expand_as(plan.top_k_index)
        weights = logits.softmax(-1).gather(1, forced)
        if router.config.normalize_router_weights:
            weights = weights / weights.sum(-1, keepdim=True)
        return logits, replace(plan, top_k_index=forced, top_k_weights=weights, keep=None)

    # prepend: run before transformers' output-capture hooks, so the recorded plan is the one the model applies
    return [m.register_forward_hook(hook, prepend=True) for m in model.modules() if isinstance(m, VMoETopKRouter)]


class RoutingRecorder:
    """Sums `expert_counts` (router calls x experts) and records the local aux loss of every training forward."""

    def __init__(self, model):
        self.counts = None
        self.aux = []
        self.handle = model.register_forward_hook(self._hook)

    def _hook(self, module, args, output):
        if not module.training or output.expert_counts is None:
            return
        counts = output.expert_counts.detach().cpu()
        self.counts = counts if self.counts is None else self.counts + counts
        self.aux.append(float(output.aux_loss.detach()))


def write_report(report_dir, rank: int, model, recorder: RoutingRecorder, extra: dict | None = None):
    from safetensors.torch import save_file

    out = Path(report_dir)
    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in model.state_dict().items()}
    save_file(state, str(out / f"params_rank{rank}.safetensors"))
    report = {"rank": rank, "expert_counts": recorder.counts.tolist() if recorder.counts is not None else None,
              "local_aux_losses": recorder.aux, **(extra or {})}
    (out / f"report_rank{rank}.json").write_text(json.dumps(report, indent=1))


def shutdown_distributed():
    """Barrier, then destroy the process group: without it gloo sometimes aborts at interpreter exit
    ("terminate called without an active exception") although training finished."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()
