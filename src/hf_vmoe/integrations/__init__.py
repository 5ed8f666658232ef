"""Integrations with the rest of the stack: the Hub, export, the Trainer, UperNet, data and Google's checkpoints.

- `hub`: model cards and publishing;
- `export`: ONNX and ExecuTorch export, int8 (the entry point; the code is in `onnx`, `executorch` and their shared
  `export_utils`);
- `callbacks`: Trainer callbacks (routing statistics, active FLOPs, the augmentation epoch) and `script_defaults`
  for the example scripts;
- `upernet`: UperNet on a VMoE backbone that keeps the aux loss;
- `data`: ADE20K folders, segmentation augmentations, `AugmentedDataset`, offline metric modules, command-line
  parsing helpers;
- `convert_vmoe`: Google's vmoe (JAX) checkpoints into VMoE folders (the parts: `vmoe_checkpoint.readers`,
  `vmoe_checkpoint.params`, `vmoe_checkpoint.config`).
"""
