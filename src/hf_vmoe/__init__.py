"""hf_vmoe: sparse Vision Mixture-of-Experts (Mobile V-MoE, V-MoE, ViMoE) for the Hugging Face stack.

Importing the package registers the model with transformers' Auto classes (AutoConfig, AutoModel,
AutoModelForImageClassification, AutoModelForSemanticSegmentation, AutoBackbone, AutoImageProcessor) and marks the
classes for `register_for_auto_class`, so a saved folder also loads with `trust_remote_code=True` where hf_vmoe
is not installed.
"""

import contextlib
import importlib.util
import sys

from .integrations.extras import muted_loggers


@contextlib.contextmanager
def _quiet_torchao_import():
    """Mute two known-harmless messages while transformers' modeling code is first imported.

    transformers imports torchao whenever it is installed (the `executorch` extra brings it). torchao 0.18.0, the
    only release executorch 1.4.x accepts (>=0.18.0, and the newest), logs "Failed to load .../_C_*.so" for two
    libraries its CPU wheel cannot load (an SM90 CUDA kernel, an mxfp8 build for CPython 3.10 only), and torch 2.13
    logs a deprecation for each Enum torchao registers with pytree. Neither touches VMoE or CPU export. Only the
    `torchao` and `torch.utils._pytree` loggers are raised to ERROR, and only for this import."""
    if "torchao" in sys.modules or importlib.util.find_spec("torchao") is None:
        yield
        return
    with muted_loggers("torchao", "torch.utils._pytree"):
        yield


with _quiet_torchao_import():
    from transformers import (
        AutoBackbone,
        AutoConfig,
        AutoImageProcessor,
        AutoModel,
        AutoModelForImageClassification,
        AutoModelForSemanticSegmentation,
    )

    # the real class, not transformers' top-level name (a dummy that raises when torchvision is absent); pipelines
    # use it
    from transformers.models.auto.video_processing_auto import AutoVideoProcessor

    from .configuration_vmoe import VMoEConfig, every_nth_layer, last_layers
    from .image_processing_vmoe import VMoEImageProcessor
    from .modeling_vmoe import (
        VMoEBackbone,
        VMoEForImageClassification,
        VMoEForSemanticSegmentation,
        VMoEModel,
        VMoEPreTrainedModel,
        update_router_biases,
    )

__version__ = "0.1.0"

AutoConfig.register(VMoEConfig.model_type, VMoEConfig, exist_ok=True)
AutoModel.register(VMoEConfig, VMoEModel, exist_ok=True)
AutoModelForImageClassification.register(VMoEConfig, VMoEForImageClassification, exist_ok=True)
AutoModelForSemanticSegmentation.register(VMoEConfig, VMoEForSemanticSegmentation, exist_ok=True)
AutoBackbone.register(VMoEConfig, VMoEBackbone, exist_ok=True)
AutoImageProcessor.register(VMoEConfig, slow_image_processor_class=VMoEImageProcessor, exist_ok=True)
# VMoE has no video processor, and says so: pipelines also try `AutoVideoProcessor`, which turns the saved
# preprocessor's `auto_map["AutoImageProcessor"]` into a remote `...VMoEVideoProcessor` reference and, finding no
# local entry for VMoEConfig, asks "Do you wish to run the custom code? [y/N]" (blocking ~15 s in a terminal). With
# an (empty) local entry it resolves to "no remote code needed", finds no class and the pipeline goes on without one.
AutoVideoProcessor.register(VMoEConfig, video_processor_classes={}, exist_ok=True)

VMoEConfig.register_for_auto_class()
VMoEModel.register_for_auto_class("AutoModel")
VMoEForImageClassification.register_for_auto_class("AutoModelForImageClassification")
VMoEForSemanticSegmentation.register_for_auto_class("AutoModelForSemanticSegmentation")
VMoEBackbone.register_for_auto_class("AutoBackbone")
VMoEImageProcessor.register_for_auto_class("AutoImageProcessor")

__all__ = [
    "VMoEConfig",
    "VMoEModel",
    "VMoEPreTrainedModel",
    "VMoEForImageClassification",
    "VMoEForSemanticSegmentation",
    "VMoEBackbone",
    "VMoEImageProcessor",
    "last_layers",
    "every_nth_layer",
    "update_router_biases",
]
