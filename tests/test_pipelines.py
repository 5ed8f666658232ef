"""transformers pipelines on saved VMoE folders: image-classification and image-segmentation."""

import numpy as np
import torch
from conftest import tiny_config
from PIL import Image
from transformers import (
    AutoImageProcessor,
    AutoModelForImageClassification,
    AutoModelForSemanticSegmentation,
    pipeline,
)

from hf_vmoe import VMoEForImageClassification, VMoEForSemanticSegmentation, VMoEImageProcessor

LABELS = {i: f"class{i}" for i in range(5)}


def _save(model, tmp_path):
    model.save_pretrained(tmp_path)
    VMoEImageProcessor(size={"height": 32, "width": 32}).save_pretrained(tmp_path)
    return AutoImageProcessor.from_pretrained(tmp_path)


def _image(seed=0, size=(50, 40)):
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8))


def test_image_classification_pipeline_matches_model(tmp_path):
    model = VMoEForImageClassification(tiny_config(id2label=LABELS, label2id={v: k for k, v in LABELS.items()})).eval()
    processor = _save(model, tmp_path)
    classifier = pipeline("image-classification", model=AutoModelForImageClassification.from_pretrained(tmp_path),
                          image_processor=processor)
    image = _image()
    result = classifier(image, top_k=5)
    with torch.no_grad():
        probs = model(**processor(image, return_tensors="pt")).logits.softmax(-1)[0]
    assert [r["label"] for r in result] == [LABELS[int(i)] for i in probs.argsort(descending=True)]
    assert abs(result[0]["score"] - probs.max().item()) < 1e-5


def test_image_segmentation_pipeline_gives_masks_at_input_size(tmp_path):
    config = tiny_config(routing_level="token", num_shared_experts=1, id2label=LABELS,
                         label2id={v: k for k, v in LABELS.items()})
    model = VMoEForSemanticSegmentation(config).eval()
    processor = _save(model, tmp_path)
    segmenter = pipeline("image-segmentation", model=AutoModelForSemanticSegmentation.from_pretrained(tmp_path),
                         image_processor=processor)
    image = _image(size=(40, 50))  # PIL size (50, 40)
    result = segmenter(image)
    assert result and all(r["mask"].size == image.size for r in result)
    with torch.no_grad():
        logits = model(**processor(image, return_tensors="pt")).logits
    predicted = processor.post_process_semantic_segmentation(
        type("O", (), {"logits": logits})(), target_sizes=[image.size[::-1]])[0]
    assert {r["label"] for r in result} == {LABELS[int(i)] for i in predicted.unique()}
