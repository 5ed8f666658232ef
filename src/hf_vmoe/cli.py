"""`hf-vmoe` command line.

    hf-vmoe demo [--quick] [--output-dir DIR]            the whole Mobile V-MoE recipe on bundled real data
    hf-vmoe presets [--plain] [--num-labels N] ...       model zoo: params and FLOPs per preset
    hf-vmoe flops (--preset NAME | --config DIR) [...]   params and per-image FLOPs of one model, by component
    hf-vmoe superclasses from-model --model DIR (--validation-dir DIR | --dataset-name NAME) --num-experts E -o F
    hf-vmoe superclasses from-confusion CM.{npy,csv,json} --num-experts E [--class-names FILE] -o F
    hf-vmoe superclasses show FILE [--model DIR | --class-names FILE]
    hf-vmoe analyze MODEL_DIR --data-dir DIR [--output-dir DIR] [...]  routing heatmaps, specialisation, recommendation
    hf-vmoe convert-vmoe CHECKPOINT_PREFIX --config NAME_OR_FIELDS -o OUT_DIR  a Google vmoe checkpoint -> VMoE folder
    hf-vmoe export MODEL_DIR --format onnx|executorch [--int8 [--calibration-dir DIR]] -o PATH  device export
    hf-vmoe card (--preset NAME | --model DIR) --repo-id ORG/NAME --out README.md    the model card of a preset or model
"""

from __future__ import annotations

import argparse
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
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    build_model_card(config, args.repo_id, trained_on=args.trained_on).save(out)
    print(f"wrote {out}")
    return 0


def build_parser():
    parser = argparse.ArgumentParser(prog="hf-vmoe", description="Sparse Vision Mixture-of-Experts tools")
    sub = parser.add_subparsers(dest="command", required=True)

    from .demo import build_parser as demo_parser

    demo = sub.add_parser("demo", help="run the Mobile V-MoE recipe on bundled real data (a few CPU minutes)")
    demo_parser(demo)

    p = sub.add_parser("presets", help="print the model-zoo table (params, FLOPs)")
    p.add_argument("--plain", action="store_true", help="plain text instead of markdown")
    p.add_argument("--num-labels", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--patch-size", type=int)

    p = sub.add_parser("flops", help="params and per-image FLOPs of one preset or saved config")
    p.add_argument("--preset")
    p.add_argument("--config", help="a model directory or config.json")
    p.add_argument("--image-size", type=int)

    from .routing_report import add_arguments as analyze_arguments

    p = sub.add_parser("analyze", help="routing analysis of a saved model: class x expert heatmaps, specialisation "
                       "per MoE layer, recommended config")
    analyze_arguments(p)

    from .integrations.convert_vmoe import add_cli_arguments as convert_vmoe_arguments

    p = sub.add_parser("convert-vmoe", help="convert a Google vmoe (JAX) checkpoint into a VMoE folder")
    convert_vmoe_arguments(p)

    from .integrations.export import add_cli_arguments as export_arguments

    p = sub.add_parser("export", help="export a saved model to ONNX or ExecuTorch (.pte), float32 or int8")
    export_arguments(p)

    p = sub.add_parser("card", help="write the model card of a preset or a saved model folder")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a preset name, e.g. mobile-vmoe-tiny (hf-vmoe presets lists them)")
    source.add_argument("--model", help="a saved model folder (config.json)")
    p.add_argument("--repo-id", "--repo_id", required=True)
    p.add_argument("--out", required=True, help="README.md path to write")
    p.add_argument("--trained-on", "--trained_on", default=None, help="what the weights were trained on (omit: untrained)")

    p = sub.add_parser("superclasses", help="compute, convert or show super-class maps")
    actions = p.add_subparsers(dest="action", required=True)
    a = actions.add_parser("from-model", help="confusion matrix of a trained dense model on a held-out split")
    a.add_argument("--model", required=True, help="trained classifier directory")
    a.add_argument("--validation-dir", "--validation_dir", help="imagefolder of the held-out split")
    a.add_argument("--dataset-name", "--dataset_name", help="a datasets name (local or cached)")
    a.add_argument("--split", default="validation")
    a.add_argument("--soft", action="store_true", help="sum predicted probabilities instead of counting errors")
    a.add_argument("--batch-size", type=int, default=64)
    a = actions.add_parser("from-confusion", help="a saved confusion matrix (.npy, .csv, or JSON)")
    a.add_argument("path")
    a.add_argument("--class-names", help="text file (one name a line) or JSON list / id->name object")
    for name in ("from-model", "from-confusion"):
        a = actions.choices[name]
        a.add_argument("--num-experts", "--num_experts", type=int, required=True)
        a.add_argument("--output", "-o", required=True, help="superclasses .json or .csv")
        a.add_argument("--seed", type=int, default=0)
    a = actions.add_parser("show", help="print the groups of a super-class file")
    a.add_argument("path")
    a.add_argument("--model", help="model directory whose id2label names the classes")
    a.add_argument("--class-names")
    return parser


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if args.command == "demo":
            from .demo import main as demo_main

            return demo_main(argv[1:] if argv is not None else sys.argv[2:])
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
    except ValueError as err:
        print(f"hf-vmoe: error: {err}", file=sys.stderr)
        return 2
    return 1


if __name__ == "__main__":
    raise SystemExit(main())
