#!/usr/bin/env python
"""Fine-tune a VMoE (token routing + shared experts, ViMoE) for semantic segmentation, e.g. on ADE20K.

In the style of transformers' examples/pytorch/semantic-segmentation/run_semantic_segmentation.py, offline-friendly:

    # a local ADEChallengeData2016 folder (images/{training,validation}/*.jpg, annotations/{...}/*.png),
    # upcycled from a dense DINOv2 / ViT checkpoint directory, UperNet head:
    python examples/run_semantic_segmentation.py \
        --train_dir ADEChallengeData2016 --validation_dir ADEChallengeData2016 --reduce_labels \
        --upcycle_from ./dinov2-small --routing_level token --num_experts 8 --num_experts_per_tok 2 \
        --num_shared_experts 1 --moe_layers last:4 --head upernet --crop_size 518 \
        --output_dir vimoe-ade20k --do_train --do_eval --learning_rate 1e-4 --max_steps 80000

    # a Hub dataset in the scene_parse_150 layout (needs network for the dataset):
    python examples/run_semantic_segmentation.py --dataset_name scene_parse_150 --reduce_labels ...

Heads: `linear` = VMoEForSemanticSegmentation's light head on the last block; `upernet` = UperNet on VMoEBackbone
features of four blocks (hf_vmoe.integrations.upernet.VMoEUperNetForSemanticSegmentation, which keeps the MoE aux loss).
Metrics: mean IoU / mean accuracy / overall accuracy (+ per-class IoU) from the package's offline `evaluate` module.
Unless set, `--logging_steps` is 1/20 of the run and pinned memory is off on the CPU (`hf_vmoe.integrations.script_defaults`);
MoE runs log the expert load with the loss and a routing-health line after each evaluation (`hf_vmoe.integrations.callbacks`).
"""

import logging
import os
import sys
from dataclasses import dataclass, field
from pathlib import Path

# first: it registers the Auto classes, and imports transformers' modeling code without torchao's import noise
# (README, install notes); evaluate imports transformers too
import hf_vmoe  # noqa: F401  isort: skip

import evaluate
import numpy as np
import torch
import transformers
from transformers import HfArgumentParser, Trainer, TrainingArguments, default_data_collator, set_seed

from hf_vmoe import VMoEConfig, VMoEForSemanticSegmentation, VMoEImageProcessor
from hf_vmoe.integrations.callbacks import (
    AugmentationEpochCallback,
    RouterBiasUpdateCallback,
    RouterStatsCallback,
    count_active_flops,
)
from hf_vmoe.integrations.data import (
    AugmentedDataset,
    SegmentationTransform,
    ade20k_id2label,
    load_ade_folder,
    mean_iou_metric_path,
    parse_config_overrides,
    parse_moe_layers_arg,
    read_id2label,
)
from hf_vmoe.integrations.script_defaults import apply_script_defaults
from hf_vmoe.integrations.upernet import VMoEUperNetForSemanticSegmentation, vmoe_upernet_config
from hf_vmoe.recipes.upcycling import upcycle

logger = logging.getLogger(__name__)


@dataclass
class DataTrainingArguments:
    dataset_name: str | None = field(
        default=None, metadata={"help": "Hub dataset in the scene_parse_150 layout (columns image, annotation)."}
    )
    dataset_config_name: str | None = field(default=None, metadata={"help": "Configuration of the Hub dataset."})
    train_dir: str | None = field(
        default=None,
        metadata={"help": "ADE20K-layout folder for training: images/training + annotations/training "
                          "(an ADEChallengeData2016 root), or images/ + annotations/."},
    )
    validation_dir: str | None = field(
        default=None, metadata={"help": "ADE20K-layout folder for evaluation (images/validation + annotations/validation)."}
    )
    train_split: str = field(default="training", metadata={"help": "Sub-folder name of the training split."})
    validation_split: str = field(default="validation", metadata={"help": "Sub-folder name of the validation split."})
    train_val_split: float | None = field(
        default=0.15, metadata={"help": "Fraction of train held out for evaluation when there is no validation set."}
    )
    max_train_samples: int | None = field(default=None, metadata={"help": "Truncate the training set."})
    max_eval_samples: int | None = field(default=None, metadata={"help": "Truncate the evaluation set."})
    reduce_labels: bool = field(
        default=False, metadata={"help": "ADE20K convention: annotation 0 (other) -> 255 (ignored), k -> k - 1."}
    )
    label_names_file: str | None = field(
        default=None,
        metadata={"help": "id2label source: JSON {id: name}, objectInfo150.txt, or 'value name' lines (classes.txt). "
                          "Default: objectInfo150.txt / classes.txt in the data folder, else the ADE20K 150 classes."},
    )
    crop_size: int = field(default=512, metadata={"help": "Training crop and evaluation size (pixels)."})
    min_scale: float = field(default=0.5, metadata={"help": "Smallest random rescale factor."})
    max_scale: float = field(default=2.0, metadata={"help": "Largest random rescale factor."})

    def __post_init__(self):
        if self.dataset_name is None and self.train_dir is None and self.validation_dir is None:
            raise ValueError("give --dataset_name or --train_dir / --validation_dir")


@dataclass
class ModelArguments:
    model_name_or_path: str | None = field(
        default=None, metadata={"help": "A VMoE checkpoint directory (segmentation or classification) to start from."}
    )
    upcycle_from: str | None = field(
        default=None, metadata={"help": "A dense ViT / DeiT / DINOv2 checkpoint directory to upcycle into a VMoE."}
    )
    config_name: str | None = field(default=None, metadata={"help": "A VMoE config (dir or config.json) to train from scratch."})
    config_overrides: str | None = field(
        default=None, metadata={"help": "Comma-separated VMoEConfig overrides, e.g. 'hidden_size=192,num_experts=8'."}
    )
    head: str = field(default="linear", metadata={"help": "Decode head.", "choices": ["linear", "upernet"]})
    upernet_hidden_size: int = field(default=512, metadata={"help": "UperNet channels."})
    upernet_out_indices: str | None = field(
        default=None, metadata={"help": "Blocks feeding UperNet, e.g. '3,6,9,12' (default: four evenly spaced)."}
    )
    routing_level: str | None = field(default=None, metadata={"help": "MoE: 'token' (default for segmentation) or 'image'."})
    num_experts: int | None = field(default=None, metadata={"help": "MoE: experts per MoE block."})
    num_experts_per_tok: int | None = field(default=None, metadata={"help": "MoE: k."})
    moe_layers: str | None = field(default=None, metadata={"help": "MoE blocks: 'last:L', 'every:n', 'all' or '9,11'."})
    num_shared_experts: int | None = field(default=None, metadata={"help": "MoE: always-on shared experts (ViMoE)."})
    expert_noise_std: float = field(default=0.0, metadata={"help": "Upcycling: relative noise on the expert copies."})
    ignore_mismatched_sizes: bool = field(default=True, metadata={"help": "Allow a new head when loading a checkpoint."})


def _moe_kwargs(model_args: ModelArguments) -> dict:
    kwargs = {}
    for name in ("routing_level", "num_experts", "num_experts_per_tok", "num_shared_experts"):
        if getattr(model_args, name) is not None:
            kwargs[name] = getattr(model_args, name)
    if model_args.moe_layers is not None:
        kwargs["moe_layers"] = parse_moe_layers_arg(model_args.moe_layers)
    return kwargs


def _find_label_file(data_args: DataTrainingArguments) -> str | None:
    if data_args.label_names_file:
        return data_args.label_names_file
    for directory in (data_args.train_dir, data_args.validation_dir):
        for name in ("objectInfo150.txt", "classes.txt", "id2label.json"):
            if directory and (Path(directory) / name).is_file():
                return str(Path(directory) / name)
    return None


def load_datasets(data_args: DataTrainingArguments, seed: int):
    """{'train': Dataset, 'validation': Dataset} with `image` and `annotation` columns."""
    from datasets import DatasetDict, load_dataset

    if data_args.dataset_name is not None:
        dataset = load_dataset(data_args.dataset_name, data_args.dataset_config_name)
        dataset = DatasetDict(dataset)
    else:
        dataset = DatasetDict()
        if data_args.train_dir:
            dataset["train"] = load_ade_folder(data_args.train_dir, data_args.train_split)
        if data_args.validation_dir:
            dataset["validation"] = load_ade_folder(data_args.validation_dir, data_args.validation_split)
    if "validation" not in dataset and "train" in dataset and data_args.train_val_split:
        split = dataset["train"].train_test_split(data_args.train_val_split, seed=seed)
        dataset["train"], dataset["validation"] = split["train"], split["test"]
    return dataset


def build_model(model_args: ModelArguments, id2label: dict[int, str], crop_size: int):
    label2id = {v: k for k, v in id2label.items()}
    moe = _moe_kwargs(model_args)
    moe.setdefault("routing_level", "token")
    overrides = parse_config_overrides(model_args.config_overrides)
    upernet = model_args.head == "upernet"
    out_indices = (
        [int(i) for i in model_args.upernet_out_indices.split(",")] if model_args.upernet_out_indices else None
    )
    if model_args.upcycle_from:
        task = "backbone" if upernet else "segmentation"
        label_kwargs = {} if upernet else {"id2label": id2label}
        model = upcycle(model_args.upcycle_from, task=task, image_size=crop_size,
                        expert_noise_std=model_args.expert_noise_std, **label_kwargs, **moe, **overrides)
        model.train()
        if not upernet:
            return model
        config = vmoe_upernet_config(model.config, out_indices, hidden_size=model_args.upernet_hidden_size,
                                     id2label=id2label, label2id=label2id)
        seg = VMoEUperNetForSemanticSegmentation(config)
        seg.backbone.load_state_dict(model.state_dict())
        return seg
    if model_args.model_name_or_path:
        if upernet:
            raise ValueError("--head upernet starts from --upcycle_from or --config_name, not --model_name_or_path")
        config = VMoEConfig.from_pretrained(model_args.model_name_or_path, id2label=id2label, label2id=label2id,
                                            **moe, **overrides)
        return VMoEForSemanticSegmentation.from_pretrained(
            model_args.model_name_or_path, config=config, ignore_mismatched_sizes=model_args.ignore_mismatched_sizes
        )
    if model_args.config_name:
        config = VMoEConfig.from_pretrained(model_args.config_name, **moe, **overrides)
    else:
        config = VMoEConfig(**moe, **overrides)
    if config.image_size != crop_size:
        config.image_size = crop_size
    if upernet:
        return VMoEUperNetForSemanticSegmentation(vmoe_upernet_config(
            config, out_indices, hidden_size=model_args.upernet_hidden_size, id2label=id2label, label2id=label2id))
    config.id2label, config.label2id = id2label, label2id
    config.num_labels = len(id2label)
    return VMoEForSemanticSegmentation(config)


def main(argv: list[str] | None = None):
    parser = HfArgumentParser((ModelArguments, DataTrainingArguments, TrainingArguments))
    argv = sys.argv[1:] if argv is None else argv
    if len(argv) == 1 and argv[0].endswith(".json"):
        model_args, data_args, training_args = parser.parse_json_file(json_file=os.path.abspath(argv[0]))
    else:
        model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    training_args.remove_unused_columns = False  # the transforms need the image columns
    training_args.batch_eval_metrics = True  # accumulate a confusion matrix instead of keeping every logit map
    logging.basicConfig(format="%(asctime)s - %(levelname)s - %(name)s - %(message)s", level=logging.INFO)
    transformers.utils.logging.set_verbosity_warning()
    apply_script_defaults(training_args, argv)  # ~20 log lines per run, no pinned memory on the CPU
    set_seed(training_args.seed)

    label_file = _find_label_file(data_args)
    id2label = read_id2label(label_file, reduce_labels=data_args.reduce_labels) if label_file else ade20k_id2label()
    num_labels = len(id2label)
    logger.info("%d classes (%s)", num_labels, label_file or "ADE20K 150 classes")

    dataset = load_datasets(data_args, training_args.seed)
    model = build_model(model_args, id2label, data_args.crop_size)
    backbone_config = getattr(model.config, "backbone_config", None) or model.config
    processor = VMoEImageProcessor(
        size={"height": data_args.crop_size, "width": data_args.crop_size}, do_reduce_labels=data_args.reduce_labels
    )

    train_tf = SegmentationTransform(size=data_args.crop_size, train=True, reduce_labels=data_args.reduce_labels,
                                     scale_range=(data_args.min_scale, data_args.max_scale),
                                     image_mean=tuple(processor.image_mean), image_std=tuple(processor.image_std))
    eval_tf = SegmentationTransform(size=data_args.crop_size, train=False, reduce_labels=data_args.reduce_labels,
                                    image_mean=tuple(processor.image_mean), image_std=tuple(processor.image_std))

    def make_transform(tf):
        def transform(batch, rngs=None):  # training: one generator per image (AugmentedDataset)
            rngs = rngs or [None] * len(batch["image"])
            pairs = zip(batch["image"], batch["annotation"], rngs)
            pixels, labels = zip(*(tf(image, annotation, rng) for image, annotation, rng in pairs))
            return {"pixel_values": list(pixels), "labels": list(labels)}

        return transform

    if training_args.do_train:
        if "train" not in dataset:
            raise ValueError("--do_train needs a training set (--train_dir or --dataset_name)")
        if data_args.max_train_samples is not None:
            dataset["train"] = dataset["train"].shuffle(seed=training_args.seed).select(
                range(min(data_args.max_train_samples, len(dataset["train"]))))
        dataset["train"] = AugmentedDataset(dataset["train"], make_transform(train_tf), training_args.seed)
    if training_args.do_eval:
        if "validation" not in dataset:
            raise ValueError("--do_eval needs a validation set (--validation_dir or a dataset with a validation split)")
        if data_args.max_eval_samples is not None:
            dataset["validation"] = dataset["validation"].select(
                range(min(data_args.max_eval_samples, len(dataset["validation"]))))
        dataset["validation"].set_transform(make_transform(eval_tf))

    metric = evaluate.load(mean_iou_metric_path())
    metric_module = sys.modules[type(metric).__module__]  # its confusion_matrix / metrics_from_confusion helpers
    confusion = np.zeros((num_labels, num_labels), dtype=np.int64)

    def preprocess_logits_for_metrics(logits, labels):
        if isinstance(logits, (tuple, list)):
            logits = logits[0]
        if logits.shape[-2:] != labels.shape[-2:]:
            logits = torch.nn.functional.interpolate(logits, size=labels.shape[-2:], mode="bilinear",
                                                     align_corners=False)
        return logits.argmax(dim=1)

    def compute_metrics(eval_pred, compute_result: bool = False):
        nonlocal confusion
        preds = eval_pred.predictions
        labels = eval_pred.label_ids
        preds = preds.detach().cpu().numpy() if torch.is_tensor(preds) else np.asarray(preds)
        labels = labels.detach().cpu().numpy() if torch.is_tensor(labels) else np.asarray(labels)
        for pred, label in zip(preds, labels):
            confusion += metric_module.confusion_matrix(pred, label, num_labels, ignore_index=255)
        if not compute_result:
            return {}
        result = metric_module.metrics_from_confusion(confusion)
        confusion = np.zeros_like(confusion)
        per_iou = result.pop("per_category_iou")
        per_acc = result.pop("per_category_accuracy")
        result.update({f"iou_{id2label[i]}": float(v) for i, v in enumerate(per_iou)})
        result.update({f"accuracy_{id2label[i]}": float(v) for i, v in enumerate(per_acc)})
        return result

    trainer = Trainer(
        model=model,
        args=training_args,
        train_dataset=dataset["train"] if training_args.do_train else None,
        eval_dataset=dataset["validation"] if training_args.do_eval else None,
        compute_metrics=compute_metrics,
        preprocess_logits_for_metrics=preprocess_logits_for_metrics,
        processing_class=processor,
        data_collator=default_data_collator,
    )
    logger.info("model: %s, MoE blocks %s, routing %s", type(model).__name__, list(backbone_config.moe_layers),
                backbone_config.routing_level)
    if backbone_config.is_moe:  # expert load with the loss; a routing-health line after each evaluation
        RouterStatsCallback.attach(trainer, per_expert=False)
        trainer.add_callback(RouterBiasUpdateCallback())  # loss-free balancing (router_bias_update_rate)
    count_active_flops(trainer)  # total_flos = active training FLOPs of the VMoE encoder (dense and MoE alike)
    if training_args.do_train:  # a resumed run draws the augmentations it would have drawn
        trainer.add_callback(AugmentationEpochCallback(trainer.train_dataset))

    if training_args.do_train:
        train_result = trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
        trainer.save_model()
        # total_flos (the model's active training FLOPs) from the state: --disable_tqdm's printer pops it from the metrics
        train_metrics = {**train_result.metrics, "total_flos": trainer.state.total_flos}
        trainer.log_metrics("train", train_metrics)
        trainer.save_metrics("train", train_metrics)
        trainer.save_state()
    if training_args.do_eval:
        metrics = trainer.evaluate()
        trainer.log_metrics("eval", metrics)
        trainer.save_metrics("eval", metrics)
    return trainer


if __name__ == "__main__":
    main()
