"""FSDP2 (`torch.distributed.fsdp.fully_shard`) training of a VMoE on CPU with gloo, one VMoELayer per wrap unit.

    OMP_NUM_THREADS=1 torchrun --nproc_per_node 2 examples/accelerate/fsdp2_cpu.py --routing image --report-dir /tmp/fsdp

Accelerate 1.15 does not give FSDP on CPU: with `cpu=True` (which gloo needs) its state resolves to MULTI_CPU and
`prepare()` wraps the model in DistributedDataParallel, silently ignoring the FSDP config (see the README (Publishing, multi-process training and device export)). This
script calls FSDP2 directly. The last rank's routers are forced to expert 0, so the other experts idle there.
"""

import argparse
import json
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
from common import TINY, force_first_experts  # noqa: E402
from torch.distributed.fsdp import fully_shard  # noqa: E402

from hf_vmoe import VMoEConfig, VMoEForImageClassification  # noqa: E402
from hf_vmoe.modeling_vmoe import VMoELayer  # noqa: E402


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--routing", choices=["image", "token"], default="image")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--report-dir", default=None)
    args = parser.parse_args()
    dist.init_process_group("gloo")
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)
    model = VMoEForImageClassification(VMoEConfig(**TINY, routing_level=args.routing))
    if rank == world - 1:  # this rank's routers send everything to expert 0: the other experts get no input here
        force_first_experts(model)
    for module in model.modules():
        if isinstance(module, VMoELayer):
            fully_shard(module)
    fully_shard(model)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    generator = torch.Generator().manual_seed(rank)
    counts = None
    for _ in range(args.steps):
        pixel_values = torch.randn(4, 3, 32, 32, generator=generator)
        labels = torch.randint(0, 5, (4,), generator=generator)
        out = model(pixel_values=pixel_values, labels=labels)
        out.loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        counts = out.expert_counts if counts is None else counts + out.expert_counts
    full = {name: p.full_tensor().detach() for name, p in model.named_parameters()}
    sums = [None] * world
    dist.all_gather_object(sums, {name: t.double().sum().item() for name, t in full.items()})
    if args.report_dir:
        out_dir = Path(args.report_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
        report = {"rank": rank, "world_size": world, "param_type": type(next(model.parameters())).__name__,
                  "expert_counts": counts.tolist(), "identical_full_params": all(s == sums[0] for s in sums),
                  "local_shard_numel": sum(p.to_local().numel() for p in model.parameters()),
                  "full_numel": sum(t.numel() for t in full.values())}
        (out_dir / f"fsdp_rank{rank}.json").write_text(json.dumps(report))
    dist.barrier()  # without it gloo may abort at teardown ("terminate called without an active exception")
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
