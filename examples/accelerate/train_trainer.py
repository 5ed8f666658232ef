"""Train a VMoE image classifier with the Trainer under `accelerate launch` (DDP, FSDP or CPU multi-process).

    accelerate launch --config_file examples/accelerate/ddp_multi_gpu.yaml examples/accelerate/train_trainer.py \
        --data-dir /path/to/imagefolder --output-dir runs/vmoe --max-steps 1000
    accelerate launch --config_file examples/accelerate/cpu_multi_process.yaml examples/accelerate/train_trainer.py \
        --tiny --max-steps 3 --output-dir /tmp/vmoe        # 2 CPU processes (gloo), synthetic data

`--ddp-find-unused-parameters` is off by default: stacked expert tensors give every parameter a gradient (an idle
expert gets zeros), so DDP does not need the extra graph traversal.
"""

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import torch  # noqa: E402
from common import (  # noqa: E402
    RoutingRecorder, add_model_args, build_dataset, build_model, force_first_experts, shutdown_distributed, write_report,
)
from transformers import Trainer, TrainingArguments  # noqa: E402


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    add_model_args(parser)
    parser.add_argument("--output-dir", required=True)
    parser.add_argument("--max-steps", type=int, default=3)
    parser.add_argument("--batch-size", type=int, default=4, help="per device")
    parser.add_argument("--learning-rate", type=float, default=1e-3)
    parser.add_argument("--ddp-find-unused-parameters", action="store_true")
    args = parser.parse_args(argv)

    model = build_model(args)
    dataset = build_dataset(args, model.config)
    training_args = TrainingArguments(
        output_dir=args.output_dir,
        max_steps=args.max_steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        logging_steps=1,
        save_strategy="no",
        report_to="none",
        remove_unused_columns=False,
        ddp_find_unused_parameters=args.ddp_find_unused_parameters,
        dataloader_num_workers=0,
        seed=args.seed,
        use_cpu=not torch.cuda.is_available(),  # else, under torchrun without CUDA, each process runs alone
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=dataset)
    rank, world = trainer.accelerator.process_index, trainer.accelerator.num_processes
    if args.force_idle_experts and rank == world - 1:
        force_first_experts(model)
    recorder = RoutingRecorder(model)
    trainer.train()
    if args.report_dir:
        losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        write_report(args.report_dir, rank, trainer.model, recorder,
                     {"world_size": world, "trainer_logged_losses": losses,
                      "wrapped": type(trainer.model_wrapped).__name__,
                      "find_unused_parameters": getattr(trainer.model_wrapped, "find_unused_parameters", None)})


if __name__ == "__main__":
    main()
    shutdown_distributed()
