#!/usr/bin/env python
"""Fine-tune or train a VMoE (dense ViT or Mobile V-MoE) for image classification with the Trainer.

In the style of transformers' examples/pytorch/image-classification/run_image_classification.py, without
torchvision (PIL + numpy augmentations, then the image processor). The three-stage Mobile V-MoE recipe:

    # 1. dense baseline; at the end, super-classes from its confusion matrix on the validation split
    python examples/run_image_classification.py --preset vit-12x192 --train_dir data/train \
        --validation_dir data/val --output_dir runs/dense --do_train --do_eval --compute_superclasses 10
    # 2. (or separately, on any held-out split)
    hf-vmoe superclasses from-model --model runs/dense --validation-dir data/val --num-experts 10 \
        -o runs/dense/superclasses.json
    # 3. Mobile V-MoE with super-class routing, optionally initialised from the dense baseline
    python examples/run_image_classification.py --preset mobile-vmoe-12x192 --train_dir data/train \
        --validation_dir data/val --superclasses_file runs/dense/superclasses.json --init_from_dense runs/dense \
        --output_dir runs/moe --do_train --do_eval

Every `TrainingArguments` flag works (`--push_to_hub --hub_model_id org/name`, `--eval_strategy epoch`, ...).
Router statistics (super-class accuracy, routing losses, expert load) are logged with the loss.
"""

import logging
import os
import sys
from dataclasses import dataclass, field

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

import hf_vmoe  # noqa: F401  (registers the Auto classes)
from hf_vmoe import VMoEForImageClassification, VMoEImageProcessor
from hf_vmoe.callbacks import RouterStatsCallback
from hf_vmoe.data_utils import metric_path, parse_config_overrides, size_dict
from hf_vmoe.presets import get_preset
from hf_vmoe.superclasses import load_superclass_map, model_confusion_matrix, save_superclasses
from hf_vmoe.superclasses import set_superclasses, superclass_groups, superclasses_from_confusion
from hf_vmoe.upcycling import init_experts_from_dense

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

    def __post_init__(self):
        if self.dataset_name is None and self.train_dir is None:
            raise ValueError("give --dataset_name or --train_dir (an imagefolder)")


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
    compute_superclasses: int | None = field(
        default=None, metadata={"help": "After training, write super-classes for this many experts from the model's "
                                        "confusion matrix on the validation split to OUTPUT_DIR/superclasses.json."}
    )
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


def build_model(model_args, labels):
    id2label = dict(enumerate(labels))
    label2id = {name: i for i, name in id2label.items()}
    if (model_args.model_name_or_path is None) == (model_args.preset is None):
        raise ValueError("give exactly one of --model_name_or_path or --preset")
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
        init_experts_from_dense(model, dense)
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
    set_seed(training_args.seed)

    dataset = load_data(data_args, cache_dir=None)
    labels = dataset["train"].features[data_args.label_column_name].names
    model = build_model(model_args, labels)
    config = model.config
    processor = build_processor(model_args, config)
    size = config.image_size if isinstance(config.image_size, int) else config.image_size[0]
    rng = np.random.default_rng(training_args.seed)
    image_col, label_col = data_args.image_column_name, data_args.label_column_name

    def train_transforms(batch):
        images = []
        for image in batch[image_col]:
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
    train_dataset = dataset["train"].with_transform(train_transforms)
    eval_dataset = dataset["validation"].with_transform(eval_transforms)

    metric = evaluate.load(metric_path("accuracy"))

    def compute_metrics(eval_pred):
        return metric.compute(predictions=np.argmax(eval_pred.predictions, axis=1), references=eval_pred.label_ids)

    def collate_fn(examples):
        return {"pixel_values": torch.stack([e["pixel_values"] for e in examples]),
                "labels": torch.tensor([e["labels"] for e in examples])}

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=train_dataset if training_args.do_train else None,
        eval_dataset=eval_dataset if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        processing_class=processor,
        data_collator=collate_fn,
    )
    if config.is_moe:
        RouterStatsCallback.attach(trainer)

    if training_args.do_train:
        result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        trainer.log_metrics("train", result.metrics)
        trainer.save_metrics("train", result.metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)

    if model_args.compute_superclasses:
        cm = model_confusion_matrix(trainer.model, eval_dataset, batch_size=training_args.per_device_eval_batch_size,
                                    collate_fn=collate_fn, progress=True)
        ids = superclasses_from_confusion(cm, model_args.compute_superclasses, seed=training_args.seed)
        path = save_superclasses(os.path.join(training_args.output_dir, "superclasses.json"), ids, labels,
                                 confusion=cm)
        for g, members in enumerate(superclass_groups(ids, labels)):
            logger.info("super-class %d: %s", g, ", ".join(members))
        logger.info("wrote %s", path)

    kwargs = {"finetuned_from": model_args.model_name_or_path or model_args.preset,
              "tasks": "image-classification", "tags": ["image-classification", "vmoe", "mixture-of-experts"]}
    if data_args.dataset_name is not None:
        kwargs["dataset"] = data_args.dataset_name
    if training_args.push_to_hub:
        trainer.push_to_hub(**kwargs)
    elif training_args.do_train:
        trainer.create_model_card(**kwargs)
    return trainer


if __name__ == "__main__":
    main()
