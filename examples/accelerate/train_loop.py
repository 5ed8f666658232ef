"""A plain Accelerate training loop for a VMoE image classifier (no Trainer).

    accelerate launch --config_file examples/accelerate/ddp_multi_gpu.yaml examples/accelerate/train_loop.py \
        --data-dir /path/to/imagefolder --steps 1000
    accelerate launch --config_file examples/accelerate/cpu_multi_process.yaml examples/accelerate/train_loop.py \
        --tiny --steps 3                                   # 2 CPU processes (gloo), synthetic data

How the MoE quantities are reduced across processes (checked by `--measure-reduction`, see the README (Publishing, multi-process training and device export)):
* `outputs.loss` = task loss + aux loss of the *local* batch; each rank back-propagates its own. DDP averages the
  gradients, so the update is the gradient of the mean over ranks of the local losses. The balancing losses are
  products of batch means (fraction routed x mean probability), so the mean of local aux losses is not the aux loss
  of the global batch: balance is enforced per rank's batch.
* `outputs.expert_counts` are local; this loop sums them over ranks with `accelerator.reduce(..., "sum")` for logging.
"""

import argparse
import copy
import json
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from accelerate import Accelerator  # noqa: E402
from accelerate.utils import set_seed  # noqa: E402
from common import (  # noqa: E402
    RoutingRecorder, add_model_args, build_dataset, build_model, force_first_experts, shutdown_distributed, write_report,
)
from torch.utils.data import DataLoader  # noqa: E402


def measure_reduction(accelerator, model, ddp_model, batch):
    """One backward under DDP, compared with single-process references built from the gathered global batch:
    (a) gradient of the mean over ranks of each rank's local loss, (b) gradient of the loss on the global batch."""
    reference = copy.deepcopy(accelerator.unwrap_model(ddp_model))
    ddp_model.zero_grad()
    out = ddp_model(**batch)
    accelerator.backward(out.loss)
    router = [p for n, p in accelerator.unwrap_model(ddp_model).named_parameters() if n.endswith("router.weight")][0]
    ddp_grad = router.grad.detach().clone()
    pixel_values = accelerator.gather(batch["pixel_values"])
    labels = accelerator.gather(batch["labels"])
    world = accelerator.num_processes
    name = [n for n, p in reference.named_parameters() if n.endswith("router.weight")][0]
    ref_router = dict(reference.named_parameters())[name]

    local = [reference(pixel_values=x, labels=y) for x, y in zip(pixel_values.chunk(world), labels.chunk(world))]
    grad_mean_local = torch.autograd.grad(sum(o.loss for o in local) / world, ref_router)[0]
    whole = reference(pixel_values=pixel_values, labels=labels)
    grad_global = torch.autograd.grad(whole.loss, ref_router)[0]
    ddp_model.zero_grad()
    return {
        "local_aux_losses_all_ranks": [float(o.aux_loss.detach()) for o in local],
        "mean_of_local_aux": float(sum(o.aux_loss.detach() for o in local) / world),
        "global_batch_aux": float(whole.aux_loss.detach()),
        "this_rank_aux": float(out.aux_loss.detach()),
        "max_abs_ddp_grad_minus_mean_of_local_grad": float((ddp_grad - grad_mean_local).abs().max()),
        "max_abs_ddp_grad_minus_global_batch_grad": float((ddp_grad - grad_global).abs().max()),
        "router_grad_norm": float(ddp_grad.norm()),
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4, help="per process")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--measure-reduction", action="store_true",
                        help="before training, compare the DDP router gradient with single-process references")
    parser.add_argument("--output-dir", default=None, help="save the trained model here (main process)")
    args = parser.parse_args(argv)

    # cpu=True when there is no GPU: under torchrun without CUDA, Accelerate otherwise runs each process alone
    accelerator = Accelerator(cpu=not torch.cuda.is_available())
    set_seed(args.seed)
    model = build_model(args)
    dataset = build_dataset(args, model.config)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=True, drop_last=True)
    optimizer = torch.optim.AdamW(model.parameters(), lr=args.learning_rate)
    ddp_model, optimizer, loader = accelerator.prepare(model, optimizer, loader)
    rank, world = accelerator.process_index, accelerator.num_processes

    extra = {"world_size": world, "wrapped": type(ddp_model).__name__,
             "find_unused_parameters": getattr(ddp_model, "find_unused_parameters", None)}
    if args.measure_reduction:
        extra["reduction"] = measure_reduction(accelerator, model, ddp_model, next(iter(loader)))
    if args.force_idle_experts and rank == world - 1:
        force_first_experts(model)
    recorder = RoutingRecorder(model)

    ddp_model.train()
    step = 0
    global_counts = None
    while step < args.steps:
        for batch in loader:
            outputs = ddp_model(**batch)
            accelerator.backward(outputs.loss)
            optimizer.step()
            optimizer.zero_grad()
            counts = accelerator.reduce(outputs.expert_counts, reduction="sum")  # router statistics: summed
            loss = accelerator.reduce(outputs.loss.detach(), reduction="mean")  # logged loss: averaged
            global_counts = counts if global_counts is None else global_counts + counts
            accelerator.print(f"step {step} loss {loss.item():.4f} expert counts (all ranks) {counts.tolist()}")
            step += 1
            if step >= args.steps:
                break
    extra["global_expert_counts"] = global_counts.tolist()
    if args.report_dir:
        write_report(args.report_dir, rank, accelerator.unwrap_model(ddp_model), recorder, extra)
        if args.measure_reduction and accelerator.is_main_process:
            print(json.dumps(extra["reduction"], indent=1))
    if args.output_dir:
        accelerator.wait_for_everyone()
        accelerator.unwrap_model(ddp_model).save_pretrained(args.output_dir, is_main_process=accelerator.is_main_process,
                                                            save_function=accelerator.save)


if __name__ == "__main__":
    main()
    shutdown_distributed()
