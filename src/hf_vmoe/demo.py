"""`hf-vmoe demo`: the whole Mobile V-MoE recipe on real data in a few minutes on a CPU, with no download.

Data: scikit-learn's bundled handwritten digits (`sklearn.datasets.load_digits`: 1,797 real 8x8 scans, 10
classes, shipped inside the scikit-learn wheel), upsampled to 32x32 RGB by the image processor. Stratified split:
60% train, 20% held-out validation (for the confusion matrix), 20% test (for every number in the table).

1. dense baseline: a small ViT (`moe_layers="none"`) trained with the Trainer;
2. super-classes: the dense model's (soft) confusion matrix on the validation split -> balanced partition into
   one group per expert (`hf_vmoe.recipes.superclasses`);
3. Mobile V-MoE: the same ViT whose last 2 MLPs are E experts of the dense MLP's width, k=1 expert per image,
   one per-image router shared by both MoE blocks and trained on the super-classes (Mobile V-MoE's recipe: loss +
   0.3 x router cross-entropy, training images routed by their super-class). Active FLOPs per image equal the
   dense model's plus the router's linear layer. Trained from scratch with the dense model's schedule (the
   paper's protocol); `--moe-init dense` starts from the dense weights instead (experts = copies of its MLP).

Then it measures (on the test split) accuracy, FLOPs per image (analytic and counted by torch's FlopCounterMode),
router super-class accuracy and expert load; saves the MoE model, reloads it with
`AutoModelForImageClassification.from_pretrained`, classifies a test image through
`pipeline("image-classification")`, and writes a routing heatmap (class x expert share) PNG. Everything printed is
what this run measured; `results.json` keeps it.

    hf-vmoe demo                   # or: python -m hf_vmoe.demo --output-dir ./vmoe-demo
    hf-vmoe demo --quick           # a few steps, to check the plumbing
"""

from __future__ import annotations

import argparse
import json
import os
import time

import numpy as np
from hf_vmoe_cli import DEMO_DEFAULTS as DEFAULTS
from hf_vmoe_cli import add_demo_arguments


def _require_sklearn():
    try:
        from sklearn.datasets import load_digits
    except ImportError as err:  # pragma: no cover
        raise SystemExit(
            "hf-vmoe demo needs scikit-learn for its bundled digits data set: pip install scikit-learn"
        ) from err
    return load_digits


def load_digit_images():
    """The 1,797 scikit-learn digits as RGB PIL images (8x8, grey levels 0..16 scaled to 0..255) and labels."""
    from PIL import Image

    digits = _require_sklearn()()
    pixels = np.clip(digits.images * (255.0 / 16.0), 0, 255).astype(np.uint8)
    images = [Image.fromarray(p, mode="L").convert("RGB") for p in pixels]
    return images, digits.target.astype(np.int64), [str(name) for name in digits.target_names]


def stratified_split(labels: np.ndarray, fractions=(0.6, 0.2, 0.2), seed: int = 0) -> list[np.ndarray]:
    """Indices of train / validation / test, each class split by the same fractions."""
    rng = np.random.default_rng(seed)
    parts = [[] for _ in fractions]
    bounds = np.cumsum(fractions)[:-1]
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        cuts = (bounds * len(idx)).round().astype(int)
        for part, chunk in zip(parts, np.split(idx, cuts)):
            part.extend(chunk.tolist())
    return [np.array(sorted(p)) for p in parts]


class TensorImageDataset:
    """(pixel_values, labels) pairs for the Trainer; `torch.utils.data.Dataset` protocol."""

    def __init__(self, pixel_values, labels):
        import torch

        self.pixel_values = pixel_values
        self.labels = torch.as_tensor(labels, dtype=torch.long)

    def __len__(self):
        return len(self.labels)

    def __getitem__(self, i):
        return {"pixel_values": self.pixel_values[i], "labels": self.labels[i]}


def make_processor(image_size: int):
    from PIL import Image

    from .image_processing_vmoe import VMoEImageProcessor

    return VMoEImageProcessor(
        size={"height": image_size, "width": image_size}, resample=Image.Resampling.BILINEAR,
        image_mean=[0.5, 0.5, 0.5], image_std=[0.5, 0.5, 0.5],
    )


def build_configs(args, id2label, superclass_ids):
    from .configuration_vmoe import VMoEConfig

    common = dict(
        hidden_size=args.width, num_hidden_layers=args.layers, num_attention_heads=args.heads,
        intermediate_size=4 * args.width, image_size=args.image_size, patch_size=args.patch_size,
        id2label=id2label, label2id={v: k for k, v in id2label.items()},
    )
    dense = VMoEConfig(moe_layers="none", **common)
    moe = VMoEConfig(
        moe_layers=f"last:{args.moe_blocks}", routing_level="image", num_experts=args.num_experts,
        num_experts_per_tok=args.top_k, shared_router=True, router_input="mean", superclass_loss_coef=0.3,
        superclass_ids=superclass_ids, train_routing=args.train_routing, normalize_router_weights=args.moe_init == "dense",
        **common,
    )
    return dense, moe


def train(model, train_set, args, output_dir: str, desc: str, callbacks=()):
    """Train with the transformers Trainer (progress bar on); returns the train metrics and the wall time."""
    from transformers import Trainer, TrainingArguments

    steps_per_epoch = max(1, -(-len(train_set) // args.batch_size))
    training_args = TrainingArguments(
        output_dir=output_dir,
        per_device_train_batch_size=args.batch_size,
        num_train_epochs=args.epochs,
        max_steps=args.max_steps if args.max_steps else -1,
        learning_rate=args.learning_rate,
        weight_decay=0.05,
        warmup_steps=steps_per_epoch,
        lr_scheduler_type="cosine",
        logging_steps=max(1, steps_per_epoch * max(1, args.epochs // 5)) if not args.max_steps else 1,
        save_strategy="no",
        report_to="none",
        use_cpu=True,
        dataloader_num_workers=0,
        seed=args.seed,
        disable_tqdm=False,
    )
    trainer = Trainer(model=model, args=training_args, train_dataset=train_set)
    for callback in callbacks:
        trainer.callback_handler.callbacks.insert(0, callback)
        callback.hook(model)
    print(f"\n== {desc} ==")
    start = time.perf_counter()
    result = trainer.train()
    return result.metrics, time.perf_counter() - start


def evaluate_model(model, dataset, superclass_ids=None, batch_size: int = 256):
    """Test-split accuracy, per-image router choice (top-1 expert), router super-class accuracy, expert load."""
    import torch

    model.eval()
    preds, experts = [], []
    with torch.no_grad():
        for start in range(0, len(dataset), batch_size):
            pixel_values = dataset.pixel_values[start : start + batch_size]
            out = model(pixel_values=pixel_values, output_router_logits=True)
            preds.append(out.logits.argmax(-1))
            if out.router_logits:
                experts.append(out.router_logits[0].argmax(-1))  # the shared router's top-1 expert
    labels = dataset.labels.numpy()
    preds = torch.cat(preds).numpy()
    result = {"accuracy": float((preds == labels).mean()), "predictions": preds}
    if experts:
        experts = torch.cat(experts).numpy()
        num_experts = model.config.num_experts
        result["experts"] = experts
        result["expert_load"] = (np.bincount(experts, minlength=num_experts) / len(experts)).tolist()
        if superclass_ids is not None:
            result["router_superclass_accuracy"] = float((experts == np.asarray(superclass_ids)[labels]).mean())
    return result


def _format_table(rows, head) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) for i, h in enumerate(head)]
    fmt = " | ".join(f"{{:<{w}}}" for w in widths)
    sep = "-+-".join("-" * w for w in widths)
    return "\n".join([fmt.format(*head), sep] + [fmt.format(*map(str, r)) for r in rows])


def run(args) -> dict:
    """Run the demo with parsed `args` (see `build_parser`); returns what `results.json` holds."""
    import torch
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    t0 = time.perf_counter()
    os.makedirs(args.output_dir, exist_ok=True)
    threads = torch.get_num_threads()
    if args.threads:
        torch.set_num_threads(args.threads)
    try:
        return _run(args, t0)
    finally:
        torch.set_num_threads(threads)


def _run(args, t0) -> dict:
    import torch
    from transformers import AutoModelForImageClassification, pipeline

    from .recipes.analysis import collect_routing, plot_heatmap
    from .integrations.callbacks import RouterStatsCallback
    from .recipes.flops import count_flops, format_count, measure_flops
    from .modeling_vmoe import VMoEForImageClassification
    from .recipes.upcycling import init_experts_from_dense
    from .recipes.superclasses import model_confusion_matrix, save_superclasses, superclass_groups, superclasses_from_confusion

    torch.manual_seed(args.seed)

    # -- data -------------------------------------------------------------------------------------------------------
    images, labels, class_names = load_digit_images()
    processor = make_processor(args.image_size)
    pixel_values = processor(images=images, return_tensors="pt")["pixel_values"]
    train_idx, val_idx, test_idx = stratified_split(labels, seed=args.seed)
    if args.quick:
        train_idx, val_idx, test_idx = train_idx[::4], val_idx[::2], test_idx[::2]
    splits = {name: TensorImageDataset(pixel_values[idx], labels[idx])
              for name, idx in (("train", train_idx), ("validation", val_idx), ("test", test_idx))}
    print(f"data: scikit-learn digits, {len(images)} real 8x8 images upsampled to {args.image_size}x{args.image_size}; "
          f"train {len(train_idx)} / held-out validation {len(val_idx)} / test {len(test_idx)}")
    id2label = dict(enumerate(class_names))
    dense_config, _ = build_configs(args, id2label, list(range(len(class_names))) and [0] * len(class_names))

    # -- 1. dense baseline ----------------------------------------------------------------------------------------------
    dense = VMoEForImageClassification(dense_config)
    _, dense_time = train(dense, splits["train"], args, os.path.join(args.output_dir, "dense"),
                          f"1/3 dense baseline {args.layers}x{args.width}")
    dense.save_pretrained(os.path.join(args.output_dir, "dense"))

    # -- 2. super-classes from the dense model's confusion on the held-out split ---------------------------------------
    cm = model_confusion_matrix(dense, splits["validation"], soft=True)
    superclass_ids = superclasses_from_confusion(cm, args.num_experts, seed=args.seed)
    save_superclasses(os.path.join(args.output_dir, "superclasses.json"), superclass_ids, class_names, confusion=cm)
    groups = superclass_groups(superclass_ids, class_names)
    print("\n== 2/3 super-classes from the dense model's confusion matrix (held-out split) ==")
    print("  " + "  ".join(f"s{g}={{{','.join(m)}}}" for g, m in enumerate(groups)))
    _, moe_config = build_configs(args, id2label, superclass_ids)

    # -- 3. Mobile V-MoE with super-class routing ----------------------------------------------------------------------
    torch.manual_seed(args.seed)
    moe = VMoEForImageClassification(moe_config)
    if args.moe_init == "dense":
        init_experts_from_dense(moe, dense, noise_std=0.01, seed=args.seed)
    stats = RouterStatsCallback(per_expert=False)
    _, moe_time = train(moe, splits["train"], args, os.path.join(args.output_dir, "mobile-vmoe"),
                        f"3/3 Mobile V-MoE {args.layers}x{args.width}, E={args.num_experts}, k={args.top_k}, "
                        f"MoE blocks {list(moe_config.moe_layers)}", callbacks=[stats])

    # -- measure --------------------------------------------------------------------------------------------------------
    dense_eval = evaluate_model(dense, splits["test"])
    moe_eval = evaluate_model(moe, splits["test"], superclass_ids)
    dense_cost, moe_cost = count_flops(dense_config), count_flops(moe_config)
    sample = splits["test"].pixel_values[:8]
    dense_measured, moe_measured = measure_flops(dense, sample), measure_flops(moe, sample)

    # -- save, reload, pipeline, heatmap ----------------------------------------------------------------------------------
    model_dir = os.path.join(args.output_dir, "mobile-vmoe")
    moe.save_pretrained(model_dir)
    processor.save_pretrained(model_dir)
    reloaded = AutoModelForImageClassification.from_pretrained(model_dir).eval()
    with torch.no_grad():
        same = torch.allclose(reloaded(pixel_values=sample).logits, moe.eval()(pixel_values=sample).logits, atol=1e-5)
    classifier = pipeline("image-classification", model=reloaded, image_processor=processor, device="cpu")
    example = int(test_idx[0])
    image_path = os.path.join(args.output_dir, "example_digit.png")
    images[example].resize((64, 64)).save(image_path)
    prediction = classifier(image_path, top_k=3)
    test = splits["test"]
    batches = [{"pixel_values": test.pixel_values[i : i + 256], "labels": test.labels[i : i + 256]}
               for i in range(0, len(test), 256)]
    routing = collect_routing(moe, batches, class_names=class_names)
    layer = routing.layers[0]  # one shared router: every MoE block applies the same decision
    counts = routing.counts[layer]
    specialization = routing.layer_metrics(layer)["specialization"]
    heatmap = os.path.join(args.output_dir, "routing_heatmap.png")
    plot_heatmap(counts, heatmap, class_names=class_names,
                 title=f"digits test: router super-class acc {moe_eval['router_superclass_accuracy']:.1%}")

    # -- report ---------------------------------------------------------------------------------------------------------
    total = time.perf_counter() - t0
    rows = [
        ["dense ViT", f"{dense_eval['accuracy']:.2%}", format_count(dense_cost.flops), format_count(dense_measured),
         format_count(dense_cost.params_total), format_count(dense_cost.params_active), "-", "-", f"{dense_time:.0f}s"],
        [f"Mobile V-MoE E={args.num_experts} k={args.top_k}", f"{moe_eval['accuracy']:.2%}",
         format_count(moe_cost.flops), format_count(moe_measured), format_count(moe_cost.params_total),
         format_count(moe_cost.params_active), f"{moe_eval['router_superclass_accuracy']:.2%}",
         " ".join(f"{x:.2f}" for x in moe_eval["expert_load"]), f"{moe_time:.0f}s"],
    ]
    head = ["model (test split)", "top-1 acc", "FLOPs/img", "FLOPs/img counted", "params", "active params",
            "router super-class acc", "expert load (share)", "train time"]
    table = _format_table(rows, head)
    print(f"\n== results ({len(test_idx)} test images; FLOPs = 2 x multiply-adds, analytic and counted by "
          "torch FlopCounterMode) ==")
    print(table)
    budget = (f"both trained {args.max_steps} steps" if args.max_steps else f"both trained {args.epochs} epochs")
    print(budget + (" from scratch (the paper's protocol)" if args.moe_init == "scratch" else
                    "; the MoE started from the trained dense model, so it has had twice the training"))
    top = prediction[0]
    print(f"\nsaved {model_dir}; reloaded with AutoModelForImageClassification (same logits: {same})")
    print(f"pipeline('image-classification') on {image_path} (true label {class_names[labels[example]]}): "
          f"{top['label']} ({top['score']:.2f})")
    print(f"routing heatmap: {heatmap} (specialisation I(class; expert) / H(expert) = {specialization:.2f})")
    print(f"total time {total:.0f}s")

    results = {
        "data": {"name": "sklearn.datasets.load_digits", "train": len(train_idx), "validation": len(val_idx),
                 "test": len(test_idx), "image_size": args.image_size},
        "dense": {"accuracy": dense_eval["accuracy"], "flops": dense_cost.flops, "flops_counted": dense_measured,
                  "params": dense_cost.params_total, "train_seconds": dense_time},
        "mobile_vmoe": {"accuracy": moe_eval["accuracy"], "flops": moe_cost.flops, "flops_counted": moe_measured,
                        "params": moe_cost.params_total, "params_active": moe_cost.params_active,
                        "router_superclass_accuracy": moe_eval["router_superclass_accuracy"],
                        "expert_load": moe_eval["expert_load"], "train_seconds": moe_time,
                        "init": args.moe_init, "train_log": stats.history},
        "superclasses": {"superclass_ids": superclass_ids, "groups": groups},
        "reloaded_same_logits": bool(same),
        "pipeline": {"image": image_path, "true_label": class_names[labels[example]], "prediction": prediction},
        "routing_heatmap": heatmap,
        "routing_specialization": specialization,
        "total_seconds": total,
        "args": vars(args),
    }
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(results, f, indent=1, default=float)
    with open(os.path.join(args.output_dir, "results.md"), "w") as f:
        f.write(table + "\n")
    return results


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    parser = parser or argparse.ArgumentParser(prog="hf-vmoe demo", description=__doc__.split("\n\n")[0])
    return add_demo_arguments(parser)


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.quick:
        args.max_steps = args.max_steps or 3
    if not 1 <= args.num_experts <= 10:
        raise SystemExit(f"--num-experts must be in [1, 10] (10 digit classes), got {args.num_experts}")
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
