"""Image processor for VMoE: one processor for classification and semantic segmentation.

It is SegformerImageProcessorPil (PIL backend, no torchvision needed) with ViT-style defaults: 224 x 224 resize,
ImageNet mean/std. It takes `segmentation_maps` (with optional `do_reduce_labels` for ADE20K, 0 -> 255) and has
`post_process_semantic_segmentation`, which the image-segmentation pipeline needs. Images of any PIL mode
(RGBA, LA, P, grayscale) or with 1 or 4 channels are converted to RGB first (`do_convert_rgb`), as in CLIP's or
BiT's processors: the model takes 3 channels and the mean/std have 3 entries.
"""

from transformers.models.segformer.image_processing_pil_segformer import SegformerImageProcessorPil


class VMoEImageProcessor(SegformerImageProcessorPil):
    size = {"height": 224, "width": 224}
    do_convert_rgb = True
    model_input_names = ["pixel_values"]


__all__ = ["VMoEImageProcessor"]
