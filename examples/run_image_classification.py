#!/usr/bin/env python
"""Fine-tune or train a VMoE (dense ViT or Mobile V-MoE) for image classification with the Trainer.

In the style of transformers' examples/pytorch/image-classification/run_image_classification.py, without
torchvision (PIL + numpy augmentations, then the image processor). The three-stage Mobile V-MoE recipe:

    # 1. dense baseline; at the end, super-classes from its confusion matrix on a held-out 10% of each class's
    #    training images (never trained on; --superclass_heldout_dir DIR for a separate folder instead)
    python examples/run_image_classification.py --preset vit-12x192 --train_dir data/train \
        --validation_dir data/val --output_dir runs/dense --do_train --do_eval --compute_superclasses 10
    # 2. (or separately, on another held-out split)
    hf-vmoe superclasses from-model --model runs/dense --validation-dir data/heldout --num-experts 10 \
        -o runs/dense/superclasses.json
    # 3. Mobile V-MoE with super-class routing, optionally initialised from the dense baseline
    python examples/run_image_classification.py --preset mobile-vmoe-12x192 --train_dir data/train \
        --validation_dir data/val --superclasses_file runs/dense/superclasses.json --init_from_dense runs/dense \
        --output_dir runs/moe --do_train --do_eval

The dense and the MoE run train on the same images: superclasses.json records the share held out of the dense
run's training set (`heldout`), and a run given that file holds out the same images. With --init_from_dense the
train metrics, logs and model card also count the dense phase's epochs (`dense_epochs`, `total_epochs`), so an
upcycled MoE is compared with a dense model at equal total epochs.

Every `TrainingArguments` flag works (`--push_to_hub --hub_model_id org/name`, `--eval_strategy epoch`, ...).
Unless set, `--logging_steps` is 1/20 of the run (about 20 loss lines) and pinned memory is off on the CPU
(`hf_vmoe.integrations.script_defaults`). Router statistics (super-class accuracy, routing losses, expert load) are logged with
the loss; after each evaluation a "routing health" line (a warning with the knobs when the load or the router's
super-class accuracy crosses a threshold, see `hf_vmoe.integrations.callbacks`), also saved as `eval_routing_health` in
`all_results.json` and in the model card (README.md), which says what the model was trained from.
"""

import json
import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

# first: it registers the Auto classes, and imports transformers' modeling code without torchao's import noise
# (README, install notes); evaluate and datasets import transformers too
import hf_vmoe  # noqa: F401  isort: skip

import evaluate
import numpy as np
import torch
from datasets import load_dataset
from PIL import Image
from transformers import (
    AutoConfig,
    AutoImageProcessor,
    AutoModelForImageClassification,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
    set_seed,
)

from hf_vmoe import VMoEForImageClassification, VMoEImageProcessor
from hf_vmoe.integrations.callbacks import (
    AugmentationEpochCallback,
    RouterBiasUpdateCallback,
    RouterStatsCallback,
    count_active_flops,
)
from hf_vmoe.integrations.data import (
    AugmentedDataset,
    check_imagefolder,
    metric_path,
    parse_config_overrides,
    size_dict,
)
from hf_vmoe.integrations.hub import SCRATCH, build_model_card
from hf_vmoe.recipes.presets import get_preset
from hf_vmoe.integrations.script_defaults import apply_script_defaults
from hf_vmoe.recipes.superclasses import HELDOUT_SPLIT_FILE, load_superclass_map, save_superclasses
from hf_vmoe.recipes.superclasses import set_superclasses, superclass_groups, superclasses_from_model
from hf_vmoe.recipes.upcycling import init_experts_from_dense

logger = logging.getLogger(__name__)


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(default=None, metadata={"help": "A datasets name (must be local or cached)."})
    dataset_config_name: str | None = field(default=None, metadata={"help": "The dataset configuration name."})
    train_dir: str | None = field(default=None, metadata={"help": "An imagefolder with the training images."})
    validation_dir: str | None = field(default=None, metadata={"help": "An imagefolder with the validation images."})
    train_val_split: float = field(default=0.15, metadata={"help": "Validation share when there is no validation split."})
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the validation set."})
    image_column_name: str = field(default="image", metadata={"help": "Column with the images."})
    label_column_name: str = field(default="label", metadata={"help": "Column with the labels."})
    superclass_heldout_share: float = field(
        default=0.1, metadata={"help": "With --compute_superclasses: share of each class's training images held out "
                                       "(seeded by --seed, never trained on) for the confusion matrix. A run given "
                                       "the superclasses.json written then holds out the same images."})
    superclass_heldout_dir: str | None = field(
        default=None, metadata={"help": "With --compute_superclasses: an imagefolder for the confusion matrix instead "
                                        "of a share of the training set (same classes)."})

    def __post_init__(self):
        if self.dataset_name is None and self.train_dir is None:
            raise ValueError("give --dataset_name or --train_dir (an imagefolder)")
        if not 0.0 < self.superclass_heldout_share < 1.0:
            raise ValueError(f"--superclass_heldout_share must be in (0, 1), got {self.superclass_heldout_share}")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(default=None, metadata={"help": "A VMoE checkpoint to fine-tune."})
    preset: str | None = field(default=None, metadata={"help": "A model-zoo preset (`hf-vmoe presets`), trained from scratch."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "Config fields for --preset, e.g. 'num_experts=4,moe_layers=last:2,drop_path_rate=0.1'."}
    )
    image_size: int | None = field(default=None, metadata={"help": "Input resolution (default: the preset's / checkpoint's)."})
    patch_size: int | None = field(default=None, metadata={"help": "Patch size for --preset."})
    superclasses_file: str | None = field(
        default=None, metadata={"help": "Class -> super-class map (JSON/CSV, by class name or id); enables super-class routing."}
    )
    train_routing: str = field(
        default="router",
        metadata={"help": "With super-classes: route training images by the 'router' (trained by the super-class loss; "
                  "the default, better in our measurements) or by their label's 'superclass'."},
    )
    init_from_dense: str | None = field(
        default=None, metadata={"help": "A trained dense VMoE twin: copy its weights, experts = copies of its MLP."}
    )
    drop_upcycling_ratio: float = field(
        default=0.0, metadata={"help": "With --init_from_dense: share of each expert's hidden units re-initialised, a "
                                       "different random subset per expert (drop-upcycling; 0 = plain copies)."})
    expert_init: str = field(
        default="copy", metadata={
            "choices": ["copy", "split_shared"],
            "help": "With --init_from_dense: 'copy' (every expert a copy of the dense MLP) or 'split_shared' (a shared "
                    "expert of half the dense MLP's hidden units, every routed expert a copy of the other half: the "
                    "dense model's active compute with k=1; for the vimoe-* presets)."})
    compute_superclasses: int | None = field(
        default=None, metadata={"help": "After training, write super-classes for this many experts from the model's "
                                        "confusion matrix on the validation split to OUTPUT_DIR/superclasses.json."}
    )
    superclass_confusion: str = field(
        default="soft", metadata={"help": "With --compute_superclasses: partition the 'soft' confusion matrix (summed "
                                          "predicted probabilities, as the demo and the evidence runs do: every class "
                                          "is confused a little, so an accurate model still gives similarity) or "
                                          "the 'hard' one (argmax counts).", "choices": ["soft", "hard"]})
    ignore_mismatched_sizes: bool = field(default=False, metadata={"help": "Allow a new classifier head."})


parse_overrides = parse_config_overrides  # 'a=1,b=last:2,c=0.1,d=true' -> {'a': 1, 'b': 'last:2', ...}


def random_resized_crop(image, size, rng, scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)):
    """torchvision's RandomResizedCrop with PIL and numpy."""
    width, height = image.size
    area = width * height
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = np.exp(rng.uniform(np.log(ratio[0]), np.log(ratio[1])))
        w, h = int(round(np.sqrt(target * aspect))), int(round(np.sqrt(target / aspect)))
        if 0 < w <= width and 0 < h <= height:
            left, top = rng.integers(0, width - w + 1), rng.integers(0, height - h + 1)
            return image.resize((size, size), Image.Resampling.BICUBIC, box=(left, top, left + w, top + h))
    return image.resize((size, size), Image.Resampling.BICUBIC)


def load_data(data_args, cache_dir=None):
    if data_args.dataset_name is not None:
        dataset = load_dataset(data_args.dataset_name, data_args.dataset_config_name, cache_dir=cache_dir)
    else:
        for option in ("train_dir", "validation_dir"):  # named here, not as datasets' "corresponds to no data!"
            if getattr(data_args, option) is not None:
                check_imagefolder(getattr(data_args, option), f"--{option}")
        data_files = {"train": os.path.join(data_args.train_dir, "**")}
        if data_args.validation_dir is not None:
            data_files["validation"] = os.path.join(data_args.validation_dir, "**")
        dataset = load_dataset("imagefolder", data_files=data_files, cache_dir=cache_dir)
    for column in (data_args.image_column_name, data_args.label_column_name):
        if column not in dataset["train"].column_names:
            raise ValueError(f"column {column!r} not in the dataset ({dataset['train'].column_names}); "
                             "set --image_column_name / --label_column_name")
    if "validation" not in dataset:
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=0,
                                                  stratify_by_column=data_args.label_column_name)
        dataset["train"], dataset["validation"] = split["train"], split["test"]
    return dataset


def split_heldout(train, share, seed, label_column="label"):
    """(train, held_out): `share` of each class's items (at least one when the class has two or more), chosen with
    `seed`, moved out of `train`. The super-classes come from the dense model's confusions on `held_out`, which it
    never trained on and which is not the evaluation split."""
    labels = np.asarray(train[label_column])
    rng = np.random.default_rng(seed)
    held = []
    for c in np.unique(labels):
        idx = rng.permutation(np.flatnonzero(labels == c))
        count = min(len(idx) - 1, max(1, int(round(share * len(idx))))) if len(idx) > 1 else 0
        held.extend(idx[:count].tolist())
    held_set = set(held)
    keep = [i for i in range(len(labels)) if i not in held_set]
    if not held:
        raise ValueError(f"no class has two training images: nothing to hold out with share {share}")
    return train.select(keep), train.select(sorted(held))


def recorded_heldout(superclasses_file):
    """The held-out share a super-class file was built from (its `heldout` entry: share, seed, image counts, as
    this script writes it), or None (a map from elsewhere, or built on a separate folder)."""
    if not superclasses_file or not superclasses_file.lower().endswith(".json"):
        return None
    with open(superclasses_file) as f:
        data = json.load(f)
    heldout = data.get("heldout") if isinstance(data, dict) else None
    return heldout if heldout and "share" in heldout else None


def hold_out_recorded(train, record, superclasses_file, label_column="label"):
    """(train, held_out) with the images the super-classes in `superclasses_file` came from held out again, so
    this run trains on exactly the dense run's images. Raises when the training set is not the dense run's."""
    train, heldout = split_heldout(train, record["share"], record["seed"], label_column)
    if (len(train), len(heldout)) != (record["num_train"], record["num_images"]):
        raise ValueError(
            f"{superclasses_file} was built from {record['num_images']} images held out of the dense run's training "
            f"set, leaving {record['num_train']} to train on; this run's training set gives {len(heldout)} and "
            f"{len(train)}: give the dense run's --train_dir / --dataset_name and --max_train_samples")
    return train, heldout


def dense_epochs(path):
    """Epochs the dense checkpoint in `path` trained for: `total_epochs` (it was itself initialised from a trained
    model) or `epoch` of its all_results.json / train_results.json / trainer_state.json; None when none says."""
    for name in ("all_results.json", "train_results.json", "trainer_state.json"):
        file = Path(path) / name
        if file.is_file():
            data = json.loads(file.read_text())
            for key in ("total_epochs", "epoch"):
                if data.get(key) is not None:
                    return float(data[key])
    return None


def load_heldout_dir(path, labels, data_args):
    """The --superclass_heldout_dir imagefolder; its classes must be the training set's."""
    heldout = load_dataset("imagefolder", data_files={"train": os.path.join(path, "**")})["train"]
    names = heldout.features[data_args.label_column_name].names
    if names != list(labels):
        raise ValueError(f"--superclass_heldout_dir {path} has classes {names[:5]}... ({len(names)}), the training "
                         f"set {list(labels)[:5]}... ({len(labels)}): they must be the same")
    return heldout


def build_model(model_args, labels, seed=None):
    id2label = dict(enumerate(labels))
    label2id = {name: i for i, name in id2label.items()}
    if (model_args.model_name_or_path is None) == (model_args.preset is None):
        raise ValueError("give exactly one of --model_name_or_path or --preset")
    if model_args.drop_upcycling_ratio and not model_args.init_from_dense:
        raise ValueError(f"--drop_upcycling_ratio {model_args.drop_upcycling_ratio} re-initialises part of experts "
                         "copied from a dense model: give --init_from_dense too")
    if model_args.expert_init != "copy" and not model_args.init_from_dense:
        raise ValueError(f"--expert_init {model_args.expert_init} says how experts are made from a dense model: give "
                         "--init_from_dense too")
    superclass_ids = None
    if model_args.superclasses_file:
        superclass_ids = load_superclass_map(model_args.superclasses_file, class_names=labels)
    sizes = {k: v for k, v in (("image_size", model_args.image_size), ("patch_size", model_args.patch_size)) if v}
    if model_args.preset:
        overrides = parse_overrides(model_args.config_overrides)
        config = get_preset(model_args.preset, id2label=id2label, label2id=label2id, **sizes, **overrides)
        if superclass_ids is not None:
            set_superclasses(config, superclass_ids, train_routing=model_args.train_routing)
        model = VMoEForImageClassification(config)
    else:
        config = AutoConfig.from_pretrained(model_args.model_name_or_path, id2label=id2label, label2id=label2id)
        if superclass_ids is not None:
            set_superclasses(config, superclass_ids, train_routing=model_args.train_routing)
        model = AutoModelForImageClassification.from_pretrained(
            model_args.model_name_or_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes
        )
    if model_args.init_from_dense:
        dense = VMoEForImageClassification.from_pretrained(model_args.init_from_dense)
        init_experts_from_dense(model, dense, drop_ratio=model_args.drop_upcycling_ratio, seed=seed,
                                expert_init=model_args.expert_init)
    return model


def build_processor(model_args, config):
    for path in (model_args.model_name_or_path, model_args.init_from_dense):
        if path:
            try:
                processor = AutoImageProcessor.from_pretrained(path)
                processor.size = size_dict(config.image_size)
                return processor
            except (OSError, ValueError):
                pass
    return VMoEImageProcessor(size=size_dict(config.image_size))


def main(argv=None):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    training_args.remove_unused_columns = False  # the image column is needed by the on-the-fly transforms
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO,
                        handlers=[logging.StreamHandler(sys.stdout)])
    apply_script_defaults(training_args, argv)  # ~20 log lines per run, no pinned memory on the CPU
    set_seed(training_args.seed)

    dataset = load_data(data_args, cache_dir=None)
    labels = dataset["train"].features[data_args.label_column_name].names
    model = build_model(model_args, labels, seed=training_args.seed)
    config = model.config
    processor = build_processor(model_args, config)
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    image_col, label_col = data_args.image_column_name, data_args.label_column_name

    def train_transforms(batch, rngs):  # one generator per image, seeded by (seed, epoch, index): AugmentedDataset
        images = []
        for image, rng in zip(batch[image_col], rngs):
            image = random_resized_crop(image.convert("RGB"), size, rng)  # grayscale / RGBA -> RGB
            if rng.random() < 0.5:
                image = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
            images.append(image)
        return {"pixel_values": processor(images=images, return_tensors="pt")["pixel_values"],
                "labels": batch[label_col]}

    def eval_transforms(batch):
        images = [image.convert("RGB") for image in batch[image_col]]
        return {"pixel_values": processor(images=images, return_tensors="pt")["pixel_values"],
                "labels": batch[label_col]}

    if data_args.max_train_samples is not None:
        dataset["train"] = dataset["train"].shuffle(seed=training_args.seed).select(range(data_args.max_train_samples))
    if data_args.max_eval_samples is not None:
        dataset["validation"] = dataset["validation"].shuffle(seed=training_args.seed).select(
            range(data_args.max_eval_samples))
    heldout, heldout_record = None, None
    recorded = recorded_heldout(model_args.superclasses_file)
    if model_args.compute_superclasses and data_args.superclass_heldout_dir:
        heldout = load_heldout_dir(data_args.superclass_heldout_dir, labels, data_args)
        if data_args.validation_dir and Path(data_args.superclass_heldout_dir).resolve() == Path(
                data_args.validation_dir).resolve():
            logger.warning("super-classes: --superclass_heldout_dir is the evaluation split (--validation_dir): "
                           "a MoE evaluated there is evaluated on the data its routing was built from")
        logger.info("super-classes: confusion matrix on %d images of %s", len(heldout),
                    data_args.superclass_heldout_dir)
        heldout_record = {"dir": data_args.superclass_heldout_dir, "num_images": len(heldout)}
    elif model_args.compute_superclasses:
        dataset["train"], heldout = split_heldout(dataset["train"], data_args.superclass_heldout_share,
                                                  training_args.seed, label_col)
        logger.info("super-classes: holding out %d training images (%.0f%% of each class, seed %d; not trained "
                    "on, not the evaluation split) for the confusion matrix; training on %d",
                    len(heldout), 100 * data_args.superclass_heldout_share, training_args.seed,
                    len(dataset["train"]))
        heldout_record = {"share": data_args.superclass_heldout_share, "seed": training_args.seed,
                          "num_images": len(heldout), "num_train": len(dataset["train"])}
        if not training_args.do_train:
            logger.warning("super-classes: no --do_train, so the model may have been trained on the held-out "
                           "images; pass --superclass_heldout_dir for images it never saw")
    elif recorded:
        dataset["train"], _ = hold_out_recorded(dataset["train"], recorded, model_args.superclasses_file, label_col)
        logger.info("super-classes: holding out the %d training images %s was built from (%.0f%% of each class, "
                    "seed %d), so this run trains on the dense run's %d images", recorded["num_images"],
                    model_args.superclasses_file, 100 * recorded["share"], recorded["seed"], len(dataset["train"]))
    train_dataset = AugmentedDataset(dataset["train"], train_transforms, training_args.seed)
    eval_dataset = dataset["validation"].with_transform(eval_transforms)

    metric = evaluate.load(metric_path("accuracy"))

    def compute_metrics(eval_pred):
        return metric.compute(predictions=np.argmax(eval_pred.predictions, axis=1), references=eval_pred.label_ids)

    def collate_fn(examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "labels": torch.tensor([e["labels"] for e in examples])}

    card = {}  # filled in below; the card is (re)written whenever the Trainer writes one (also by push_to_hub)

    class CardTrainer(Trainer):
        def create_model_card(self, **kwargs):
            if self.is_world_process_zero():
                write_card(self, **card)

    trainer = CardTrainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=processor,
        data_collator=collate_fn,
    )
    trainer.add_callback(AugmentationEpochCallback(train_dataset))  # a resumed run draws the crops it would have
    router_stats = RouterStatsCallback.attach(trainer) if config.is_moe else None
    trainer.add_callback(RouterBiasUpdateCallback())  # loss-free balancing (router_bias_update_rate); else a no-op
    count_active_flops(trainer)  # total_flos = active training FLOPs, dense and MoE alike

    epochs = {}  # total_epochs (and dense_epochs) of a training run
    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        epochs = epoch_counts(trainer.state.epoch, model_args)
        # total_flos: the model's active training FLOPs (VMoEPreTrainedModel.floating_point_ops); put back from the
        # state because transformers' PrinterCallback (--disable_tqdm) pops it from the train metrics
        train_metrics = {**result.metrics, "total_flos": trainer.state.total_flos,
                         "train_samples": len(dataset["train"]), **epochs}
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
    metrics = {}
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)  # numbers only: RouterStatsCallback logs the routing health line
        if router_stats is not None and router_stats.health is not None:
            metrics["eval_routing_health"] = router_stats.health["summary"]
        trainer.save_metrics("eval", metrics)

    if model_args.compute_superclasses:
        ids, cm, report = superclasses_from_model(
            trainer.model, heldout.with_transform(eval_transforms), model_args.compute_superclasses,
            batch_size=training_args.per_device_eval_batch_size, collate_fn=collate_fn, seed=training_args.seed,
            progress=True, soft=model_args.superclass_confusion == "soft")
        path = save_superclasses(os.path.join(training_args.output_dir, "superclasses.json"), ids, labels,
                                 confusion=cm, info={"confusion_report": report, "heldout": heldout_record})
        if "share" in heldout_record:  # `hf-vmoe superclasses from-model` copies it into the maps it writes
            with open(os.path.join(training_args.output_dir, HELDOUT_SPLIT_FILE), "w") as f:
                json.dump(heldout_record, f, indent=1)
        for g, members in enumerate(superclass_groups(ids, labels)):
            logger.info("super-class %d: %s", g, ", ".join(members))
        logger.info("wrote %s", path)
        trainer.save_metrics("superclasses", {"superclass_heldout_top1": report["top1"],
                                              "superclass_classes_predicted": report["classes_predicted"],
                                              "superclass_classes_confused": report["classes_confused"]})

    card.update(data_args=data_args, model_args=model_args, metrics=metrics, num_train=len(dataset["train"]),
                labels=labels, health=router_stats.health if router_stats is not None else None, epochs=epochs)
    if training_args.push_to_hub:
        trainer.push_to_hub()
    elif training_args.do_train:
        trainer.create_model_card()
    return trainer


def epoch_counts(epochs, model_args):
    """`total_epochs` of this run, the dense phase included with --init_from_dense (then also `dense_epochs`), so
    an upcycled MoE is compared with a dense model at equal total epochs."""
    if not model_args.init_from_dense:
        return {"total_epochs": epochs}
    before = dense_epochs(model_args.init_from_dense)
    if before is None:
        logger.warning("--init_from_dense %s records no epochs (no all_results.json / trainer_state.json): the total "
                       "epochs of this run, dense phase included, are unknown", model_args.init_from_dense)
        return {}
    logger.info("epochs: %g dense + %g here = %g in all", before, epochs, before + epochs)
    return {"dense_epochs": before, "total_epochs": before + epochs}


def write_card(trainer, data_args=None, model_args=None, metrics=None, num_train=None, labels=None, health=None,
               epochs=None):
    """README.md in the output folder: `hf_vmoe.integrations.hub.build_model_card` with what this run knows (the Trainer's own
    card would call a preset a fine-tuning source and mix two units of expert load)."""
    if model_args is None:  # a save during training (push_to_hub with a save strategy): the final card comes later
        return
    args = trainer.args
    metrics = metrics or {}
    source = data_args.dataset_name or data_args.train_dir
    steps = trainer.state.global_step
    trained_on = (f"{source} ({num_train} training images, {len(labels)} classes), {steps} steps"
                  + (f" from the `{model_args.preset}` preset" if model_args.preset else ""))
    trained_from = model_args.init_from_dense or model_args.model_name_or_path or SCRATCH
    eval_results = None
    if "eval_accuracy" in metrics:
        eval_results = [{"dataset": data_args.dataset_name or Path(data_args.validation_dir or source).name,
                         "metric": "accuracy", "value": metrics["eval_accuracy"],
                         "split": "validation" if data_args.validation_dir or data_args.dataset_name
                         else f"{data_args.train_val_split:.0%} of train"}]
    config = trainer.model.config
    # the card's unit is each expert's share of the routed items; the logs give multiples of a balanced share
    load = [metrics[f"eval_expert_load_{e}"] / config.num_experts for e in range(config.num_experts)
            if f"eval_expert_load_{e}" in metrics]
    training = {"learning rate": args.learning_rate, "train batch size (per device)": args.per_device_train_batch_size,
                "epochs": args.num_train_epochs if args.max_steps <= 0 else f"max_steps {args.max_steps}",
                "optimizer steps": steps, "seed": args.seed}
    epochs = epochs or {}
    if "dense_epochs" in epochs:
        training["dense epochs before upcycling"] = f"{epochs['dense_epochs']:g}"
    if "total_epochs" in epochs:
        training["total epochs (dense phase included)"] = f"{epochs['total_epochs']:g}"
    card = build_model_card(
        trainer.model, args.hub_model_id or args.output_dir, trained_on=trained_on, eval_results=eval_results,
        datasets=[data_args.dataset_name] if data_args.dataset_name else None, trained_from=trained_from,
        upcycled=bool(model_args.init_from_dense), dense_epochs=epochs.get("dense_epochs"),
        total_epochs=epochs.get("total_epochs") if "dense_epochs" in epochs else None,
        drop_ratio=model_args.drop_upcycling_ratio if model_args.init_from_dense else 0.0,
        expert_init=model_args.expert_init,
        routing_health=health if config.is_moe else None,
        expert_load=load if config.is_moe and load else None, training=training)
    card.save(os.path.join(args.output_dir, "README.md"))


if __name__ == "__main__":
    main()
