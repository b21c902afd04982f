"""Layer 4: key maps built from a model's module names, and the weight patcher.

    adapter = adapter_for_pipeline(pipe)          # or build_adapter(...) for A1111's ldm/sgm trees
    patcher = Patcher(adapter)
    report = patcher.apply([ActiveLora(load_lora(path), te=0.8, unet=0.8)])
    patcher.restore()                             # bit-exact originals
"""

from lora_ext.patch.cache import LoraCache
from lora_ext.patch.keymap import ModelAdapter, Target, TextEncoderPart, adapter_for_pipeline, build_adapter
from lora_ext.patch.patcher import ActiveLora, Patcher
from lora_ext.patch.report import NetworkReport, PatchReport

__all__ = ["ActiveLora", "LoraCache", "ModelAdapter", "NetworkReport", "PatchReport", "Patcher", "Target",
           "TextEncoderPart", "adapter_for_pipeline", "build_adapter"]
