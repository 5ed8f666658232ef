"""hf_vmoe: sparse Vision Mixture-of-Experts (Mobile V-MoE, V-MoE, ViMoE) for the Hugging Face stack.

Importing the package registers the model with transformers' Auto classes (AutoConfig, AutoModel,
AutoModelForImageClassification, AutoModelForSemanticSegmentation, AutoBackbone, AutoImageProcessor) and marks the
classes for `register_for_auto_class`, so a saved folder also loads with `trust_remote_code=True` where hf_vmoe
is not installed.
"""

import contextlib
import importlib
import importlib.abc
import importlib.util
import sys
import types
import warnings

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

# Module paths of the earlier flat layout stay importable (with a FutureWarning): each maps to the module(s) that
# now hold its contents. `hf_vmoe.segmentation` was split into the UperNet model and the segmentation data helpers.
_MOVED = {
    "superclasses": ("recipes.superclasses",),
    "upcycling": ("recipes.upcycling",),
    "analysis": ("recipes.analysis",),
    "presets": ("recipes.presets",),
    "flops": ("recipes.flops",),
    "hub": ("integrations.hub",),
    "export": ("integrations.export",),
    "callbacks": ("integrations.callbacks",),
    "script_defaults": ("integrations.script_defaults",),
    "data_utils": ("integrations.data",),
    "convert_vmoe": ("integrations.convert_vmoe",),
    "segmentation": ("integrations.upernet", "integrations.data"),
}


class _MovedModules(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Resolves `hf_vmoe.<old name>` to the module that holds it now (a merged module for a split one)."""

    def find_spec(self, fullname, path=None, target=None):
        prefix, _, name = fullname.rpartition(".")
        return importlib.util.spec_from_loader(fullname, self) if prefix == __name__ and name in _MOVED else None

    def create_module(self, spec):
        targets = [f"{__name__}.{target}" for target in _MOVED[spec.name.rpartition(".")[2]]]
        warnings.warn(f"{spec.name} moved to {' and '.join(targets)}; import it from there", FutureWarning,
                      stacklevel=2)
        modules = [importlib.import_module(target) for target in targets]
        if len(modules) == 1:
            return modules[0]
        merged = types.ModuleType(spec.name, f"{spec.name}: the names of {', '.join(targets)}")
        for module in modules:
            merged.__dict__.update({name: getattr(module, name) for name in module.__all__})
        merged.__all__ = [name for module in modules for name in module.__all__]
        return merged

    def exec_module(self, module):
        pass


if not any(isinstance(finder, _MovedModules) for finder in sys.meta_path):
    sys.meta_path.append(_MovedModules())

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
