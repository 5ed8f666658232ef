"""Integrations with the rest of the stack: the Hub, export, the Trainer, UperNet, data and Google's checkpoints.

- `hub`: model cards and publishing;
- `export`: ONNX and ExecuTorch export, int8;
- `callbacks`: Trainer callbacks (routing statistics, active FLOPs) and `script_defaults` for the example scripts;
- `upernet`: UperNet on a VMoE backbone that keeps the aux loss;
- `data`: ADE20K folders, segmentation augmentations, offline metric modules, command-line parsing helpers;
- `convert_vmoe`: Google's vmoe (JAX) checkpoints into VMoE folders.
"""
