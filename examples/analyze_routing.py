#!/usr/bin/env python
"""Routing analysis of a trained VMoE (ViMoE): class x expert heatmaps per MoE layer, specialisation scores, and a
recommended config keeping only the specialised MoE layers. The same as `hf-vmoe analyze` (the code lives in
`hf_vmoe.routing_report`).

    # classification, an imagefolder (class sub-folders):
    python examples/analyze_routing.py ./vmoe-tiny-imagenet --data_dir tiny-imagenet-200-subset/validation \
        --output_dir routing_report
    # segmentation, an ADE20K-layout folder (per-token routing, labelled by the patch's pixels):
    python examples/analyze_routing.py ./vimoe-ade20k --data_dir ADEChallengeData2016 --split validation \
        --reduce_labels --output_dir routing_report

Writes routing_report/report.json, heatmap_layer{i}.png, heatmap_layer{i}_rows.csv and
recommended_config/config.json (train it with `VMoEConfig.from_pretrained("routing_report/recommended_config")`).
"""

from hf_vmoe.routing_report import (  # noqa: F401  (re-exported for scripts that import this file)
    classification_batches,
    load_model,
    main,
    normalisation,
    parse_args,
    segmentation_batches,
)

if __name__ == "__main__":
    main()
