"""`hf-vmoe` command line: the arguments of every verb, parsed before anything heavy is imported.

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

This module sits beside the `hf_vmoe` package, not in it: importing any module of the package runs
`hf_vmoe/__init__.py`, which registers the model with transformers' Auto classes and so imports torch and
transformers' modeling code (seconds). Here only argparse is imported; `main` imports the verbs' implementations
(`hf_vmoe.cli`) after the arguments parse, so `--help` and usage errors answer at once.
"""

from __future__ import annotations

import argparse
import sys

# `hf-vmoe demo`: a 6-block width-64 ViT on 32x32 digits, its last 2 MLPs 5 experts, k=1
DEMO_DEFAULTS = dict(layers=6, width=64, heads=2, image_size=32, patch_size=8, num_experts=5, top_k=1, moe_blocks=2,
                     epochs=30, batch_size=64, learning_rate=2e-3)
# the same values as hf_vmoe.recipes.analysis.PATCH_LABELS / DEFAULT_THRESHOLD and
# hf_vmoe.integrations.export.ONNX_QUANTIZATION_MODES (tests/test_errors_extras_and_cli.py checks)
PATCH_LABELS = ("majority", "nearest")
ANALYZE_THRESHOLD = 0.2
ONNX_QUANTIZATION_MODES = ("dynamic", "static")


def add_demo_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `hf-vmoe demo` (`hf_vmoe.demo`)."""
    defaults = DEMO_DEFAULTS
    parser.add_argument("--output-dir", "--output_dir", default="./vmoe-demo", help="where models, PNG and results go")
    parser.add_argument("--quick", action="store_true", help="a few training steps on a quarter of the data")
    parser.add_argument("--epochs", type=int, default=defaults["epochs"], help="epochs for each model")
    parser.add_argument("--max-steps", type=int, default=0, help="stop each training after this many steps")
    parser.add_argument("--batch-size", type=int, default=defaults["batch_size"])
    parser.add_argument("--learning-rate", type=float, default=defaults["learning_rate"])
    parser.add_argument("--layers", type=int, default=defaults["layers"])
    parser.add_argument("--width", type=int, default=defaults["width"])
    parser.add_argument("--heads", type=int, default=defaults["heads"])
    parser.add_argument("--image-size", type=int, default=defaults["image_size"])
    parser.add_argument("--patch-size", type=int, default=defaults["patch_size"])
    parser.add_argument("--num-experts", type=int, default=defaults["num_experts"])
    parser.add_argument("--top-k", type=int, default=defaults["top_k"])
    parser.add_argument("--moe-blocks", type=int, default=defaults["moe_blocks"], help="MoE in the last N blocks")
    parser.add_argument("--moe-init", choices=("scratch", "dense"), default="scratch",
                        help="train the MoE from scratch (paper protocol) or from the dense baseline's weights")
    parser.add_argument("--train-routing", choices=("router", "superclass"), default="router",
                        help="route training images by the router (default; it learns the super-classes through the super-class loss) "
                             "or by their label's super-class (train/test routing mismatch: worse in our runs)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (default 1: this model is too small to gain from more, and extra threads slow it down badly on a busy machine; 0 = torch default)")
    return parser


def add_analyze_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `hf-vmoe analyze` (`hf_vmoe.routing_report`); each takes `--a-b` or `--a_b`."""

    def option(name, **kwargs):
        spellings = dict.fromkeys((f"--{name.replace('_', '-')}", f"--{name}"))  # one spelling when they coincide
        parser.add_argument(*spellings, dest=name, **kwargs)

    parser.add_argument("model", help="VMoE checkpoint directory (classification, segmentation or VMoE UperNet)")
    option("data_dir", required=True, help="imagefolder (classification) or ADE20K-layout folder (segmentation)")
    option("split", default="validation", help="ADE20K split sub-folder (segmentation)")
    option("task", choices=("auto", "classification", "segmentation"), default="auto")
    option("reduce_labels", action="store_true", help="ADE20K labels: 0 -> ignore, k -> k - 1")
    option("image_size", type=int, default=None, help="default: the model's image_size")
    option("batch_size", type=int, default=16)
    option("max_samples", type=int, default=None, help="a seeded random subset of this many images")
    option("patch_label", choices=PATCH_LABELS, default="majority", help="token routing on segmentation labels")
    option("threshold", type=float, default=ANALYZE_THRESHOLD, help="specialisation a layer needs to stay MoE")
    option("output_dir", default="routing_report")
    return parser


def add_convert_vmoe_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `hf-vmoe convert-vmoe` (`hf_vmoe.integrations.convert_vmoe`)."""
    parser.add_argument("checkpoint", metavar="CHECKPOINT_PREFIX",
                        help="a sharded checkpoint's prefix (PREFIX.index + PREFIX.data-nnnnn-of-NNNNN) or a Flax "
                             "msgpack file")
    parser.add_argument("--config", required=True, metavar="NAME_OR_FIELDS",
                        help="a released checkpoint's name (a key of hf_vmoe.integrations.convert_vmoe.VMOE_PRESETS, "
                             "e.g. vmoe_s32_last2_ilsvrc2012_randaug_light1) or vmoe model-config fields as JSON (a "
                             "string or a .json file): {\"preset\": NAME, \"model\": {...}, \"eval_overrides\": {...}, "
                             "\"image_size\": N}")
    parser.add_argument("--output-dir", "-o", required=True, metavar="OUT_DIR")
    parser.add_argument("--labels", help="class names: a text file (one a line) or a JSON list / id->name object")
    parser.add_argument("--strict", action="store_true",
                        help="fail instead of warning when hf_vmoe would compute different outputs at inference")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty OUT_DIR")
    return parser


def add_export_arguments(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """The options of `hf-vmoe export` (`hf_vmoe.integrations.export`)."""
    parser.add_argument("model", help="a saved model folder (VMoE, or any transformers image classifier)")
    parser.add_argument("--format", choices=("onnx", "executorch"), required=True)
    parser.add_argument("--output", "-o", required=True, help="the .onnx / .pte file to write")
    parser.add_argument("--int8", action="store_true", help="int8 quantization (ExecuTorch: needs --calibration-dir)")
    parser.add_argument("--onnx-quantization", choices=ONNX_QUANTIZATION_MODES, default="dynamic",
                        help="onnxruntime int8 mode (static needs --calibration-dir)")
    parser.add_argument("--calibration-dir", help="a folder of real images (e.g. the training imagefolder)")
    parser.add_argument("--calibration-images", type=int, default=128, help="how many calibration images to use")
    parser.add_argument("--float-experts", action="store_true", help="int8: keep the experts' weights float32")
    parser.add_argument("--batch-size", type=int, default=1, help="example batch (ExecuTorch: the program's batch)")
    parser.add_argument("--static-batch", action="store_true", help="ONNX: fix the batch size instead of a dynamic one")
    parser.add_argument("--with-router-logits", action="store_true", help="a second output: the router's logits")
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads for the export")
    return parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hf-vmoe", description="Sparse Vision Mixture-of-Experts tools")
    sub = parser.add_subparsers(dest="command", required=True)

    add_demo_arguments(sub.add_parser("demo", help="run the Mobile V-MoE recipe on bundled real data (a few CPU minutes)"))

    p = sub.add_parser("presets", help="print the model-zoo table (params, FLOPs)")
    p.add_argument("--plain", action="store_true", help="plain text instead of markdown")
    p.add_argument("--num-labels", type=int)
    p.add_argument("--image-size", type=int)
    p.add_argument("--patch-size", type=int)

    p = sub.add_parser("flops", help="params and per-image FLOPs of one preset or saved config")
    p.add_argument("--preset")
    p.add_argument("--config", help="a model directory or config.json")
    p.add_argument("--image-size", type=int)

    add_analyze_arguments(sub.add_parser("analyze", help="routing analysis of a saved model: class x expert heatmaps, "
                                         "specialisation per MoE layer, recommended config"))
    add_convert_vmoe_arguments(sub.add_parser("convert-vmoe", help="convert a Google vmoe (JAX) checkpoint into a VMoE folder"))
    add_export_arguments(sub.add_parser("export", help="export a saved model to ONNX or ExecuTorch (.pte), float32 or int8"))

    p = sub.add_parser("card", help="write the model card of a preset or a saved model folder")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--preset", help="a preset name, e.g. mobile-vmoe-tiny (hf-vmoe presets lists them)")
    source.add_argument("--model", help="a saved model folder (config.json)")
    p.add_argument("--repo-id", "--repo_id", required=True)
    p.add_argument("--out", required=True, help="README.md path to write")
    p.add_argument("--trained-on", "--trained_on", default=None, help="what the weights were trained on (omit: untrained)")
    p.add_argument("--recipe", default=None,
                   help="a markdown file: how to train the model and the evidence for it (the card's 'Recipe and "
                        "evidence' section)")

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
    """Parse `argv` (default: the command line), then run the verb (`hf_vmoe.cli.run`)."""
    argv = sys.argv[1:] if argv is None else list(argv)
    parser = build_parser()
    args = parser.parse_args(argv)
    from hf_vmoe.cli import run

    return run(args, parser, argv)


if __name__ == "__main__":
    raise SystemExit(main())
