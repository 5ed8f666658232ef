"""Recipe tools: what the papers do around the model, built on the checkpoint code and importing nothing else.

- `superclasses`: super-classes from a dense model's confusion matrix (Mobile V-MoE), balanced partitions;
- `upcycling`: a dense ViT / DeiT / DINOv2 / VMoE checkpoint into an MoE whose experts start as the dense MLP
  (or, drop-upcycling, as the dense MLP with a different share of hidden units re-initialised in each);
- `analysis`: per-layer class x expert routing statistics, specialisation, heatmaps;
- `presets`: the model zoo (`mobile-vmoe-tiny`, `vit-3x64`, ...);
- `flops`: parameters and active FLOPs of a config.
"""
