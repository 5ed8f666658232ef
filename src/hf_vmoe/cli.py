"""The verbs of the `hf-vmoe` command. Their arguments are parsed by `hf_vmoe_cli` (beside this package, so that
`hf-vmoe --help` answers without importing torch); `run` executes the parsed command.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _read_class_names(path):
    if path is None:
        return None
    with open(path) as f:
        if path.endswith(".json"):
            data = json.load(f)
            return [data[str(i)] for i in range(len(data))] if isinstance(data, dict) else list(data)
        return [line.strip() for line in f if line.strip()]


def _load_matrix(path):
    import numpy as np

    if path.endswith(".npy"):
        return np.load(path)
    if path.endswith(".json"):
        with open(path) as f:
            data = json.load(f)
        return np.asarray(data["confusion_matrix"] if isinstance(data, dict) else data)
    return np.loadtxt(path, delimiter=",")


def cmd_presets(args):
    from .recipes.presets import format_preset_table, preset_table

    overrides = {k: v for k, v in (("num_labels", args.num_labels), ("image_size", args.image_size),
                                   ("patch_size", args.patch_size)) if v is not None}
    print(format_preset_table(preset_table(**overrides), markdown=not args.plain))
    print("\nFLOPs = 2 x multiply-adds of matmuls/convolutions per image (active experts only); MACs = FLOPs / 2, "
          "the unit most ViT papers call FLOPs.")
    return 0


def cmd_flops(args):
    from .configuration_vmoe import VMoEConfig
    from .recipes.flops import count_flops, format_count
    from .recipes.presets import get_preset

    if (args.preset is None) == (args.config is None):
        raise SystemExit("give exactly one of --preset or --config")
    config = get_preset(args.preset) if args.preset else VMoEConfig.from_pretrained(args.config)
    cost = count_flops(config, image_size=args.image_size)
    print(f"tokens per image: {cost.num_tokens}")
    print(f"params: total {format_count(cost.params_total)} ({cost.params_total:,}), "
          f"active per image {format_count(cost.params_active)} ({cost.params_active:,})")
    print(f"FLOPs per image (2 x MACs): active {format_count(cost.flops)} ({cost.flops:,}); "
          f"if every expert ran {format_count(cost.flops_all_experts)}; MACs {format_count(cost.macs)}")
    for name, value in cost.breakdown.items():
        print(f"  {name:<22} {format_count(value):>9}  {100 * value / max(cost.flops, 1):5.1f}%")
    return 0


def _imagefolder_dataset(args, processor):
    from datasets import load_dataset

    if args.validation_dir:
        dataset = load_dataset("imagefolder", data_dir=args.validation_dir, split="train")
    else:
        dataset = load_dataset(args.dataset_name, split=args.split)
    image_col = next(c for c in ("image", "img", "pixel_values") if c in dataset.column_names)
    label_col = next(c for c in ("label", "labels", "fine_label") if c in dataset.column_names)

    def transform(batch):
        images = [img.convert("RGB") for img in batch[image_col]]
        return {"pixel_values": processor(images=images, return_tensors="pt")["pixel_values"],
                "labels": batch[label_col]}

    names = dataset.features[label_col].names if hasattr(dataset.features[label_col], "names") else None
    return dataset.with_transform(transform), names


def cmd_superclasses(args):
    from .recipes.superclasses import (
        load_superclass_map,
        save_superclasses,
        superclass_groups,
        superclasses_from_confusion,
    )

    from .configuration_vmoe import check_local_path

    if getattr(args, "model", None):
        check_local_path(args.model)
    if args.action == "show":
        names = _read_class_names(args.class_names)
        if names is None and args.model:
            from transformers import AutoConfig

            config = AutoConfig.from_pretrained(args.model)
            names = [config.id2label[i] for i in range(config.num_labels)]
        ids = load_superclass_map(args.path, class_names=names)
        for g, members in enumerate(superclass_groups(ids, names)):
            print(f"super-class {g} ({len(members)}): {', '.join(map(str, members))}")
        return 0

    if args.action == "from-confusion":
        cm = _load_matrix(args.path)
        names = _read_class_names(args.class_names)
        ids, info = superclasses_from_confusion(cm, args.num_experts, seed=args.seed), None
    else:  # from-model
        import torch
        from transformers import AutoImageProcessor, AutoModelForImageClassification

        from .integrations.data import size_dict
        from .image_processing_vmoe import VMoEImageProcessor
        from .recipes.superclasses import HELDOUT_SPLIT_FILE, format_confusion_report, superclasses_from_model

        model = AutoModelForImageClassification.from_pretrained(args.model)
        try:
            processor = AutoImageProcessor.from_pretrained(args.model)
        except (OSError, ValueError):
            processor = VMoEImageProcessor(size=size_dict(model.config.image_size))
        dataset, names = _imagefolder_dataset(args, processor)
        names = names or [model.config.id2label[i] for i in range(model.config.num_labels)]
        if len(names) != model.config.num_labels:
            raise SystemExit(f"the data set has {len(names)} classes but the model {model.config.num_labels}")
        with torch.inference_mode():  # the report's warning, if any, goes to the log (stderr)
            ids, cm, report = superclasses_from_model(model, dataset, args.num_experts, batch_size=args.batch_size,
                                                      seed=args.seed, progress=True, soft=args.soft)
        print(format_confusion_report(report))
        info = {"confusion_report": report}
        heldout = Path(args.model) / HELDOUT_SPLIT_FILE  # the training images the dense run held out
        if heldout.is_file():  # a MoE run given this map holds out the same images: both train on the same data
            info["heldout"] = json.loads(heldout.read_text())
    save_superclasses(args.output, ids, names, confusion=cm, info=info)
    for g, members in enumerate(superclass_groups(ids, names)):
        print(f"super-class {g} ({len(members)}): {', '.join(map(str, members))}")
    print(f"wrote {args.output}")
    return 0


def cmd_card(args) -> int:
    from .configuration_vmoe import VMoEConfig
    from .integrations.hub import build_model_card, preset_config

    config = preset_config(args.preset) if args.preset else VMoEConfig.from_pretrained(args.model)
    recipe = Path(args.recipe).read_text().strip() if args.recipe else None  # a missing file: nothing written
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    build_model_card(config, args.repo_id, trained_on=args.trained_on, recipe=recipe).save(out)
    print(f"wrote {out}")
    return 0


def main(argv=None) -> int:
    """`hf-vmoe ARGS`: parse, then `run`."""
    from hf_vmoe_cli import main as cli_main

    return cli_main(argv)


def run(args, parser, argv) -> int:
    """Run the parsed command `args` (`argv`: its command line, for `demo`, which parses its own). A ValueError, a
    missing file or folder (OSError) or a missing optional dependency ends in one `hf-vmoe: error: ...` line and
    exit status 2."""
    try:
        if args.command == "demo":
            from .demo import main as demo_main

            return demo_main(argv[1:])
        if args.command == "presets":
            return cmd_presets(args)
        if args.command == "flops":
            return cmd_flops(args)
        if args.command == "analyze":
            from .routing_report import run as analyze_run

            analyze_run(args)
            return 0
        if args.command == "convert-vmoe":
            from .integrations.convert_vmoe import run_cli as convert_vmoe_run

            return convert_vmoe_run(args)
        if args.command == "export":
            from .integrations.export import run_cli as export_run

            return export_run(args)
        if args.command == "card":
            return cmd_card(args)
        if args.command == "superclasses":
            if args.action == "from-model" and not (args.validation_dir or args.dataset_name):
                parser.error("from-model needs --validation-dir or --dataset-name")
            return cmd_superclasses(args)
    except (ValueError, ImportError, OSError) as err:
        print(f"hf-vmoe: error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
