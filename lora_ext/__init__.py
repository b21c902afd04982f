"""lora_ext: LoRA for the AUTOMATIC1111 WebUI and diffusers.

Layers (imports point downwards only):
    lora_ext.webui   WebUI glue (the only code importing `modules.*`)
    lora_ext.app     CLI and standalone app
    lora_ext.train   training backend
    lora_ext.models  base-model loading, tiny models, checkpoint layout conversion
    lora_ext.patch   key maps built from a model's module names, the weight patcher
    lora_ext.formats LoRA files: reading, key parsing, algorithms (pure math), metadata, hashes
    lora_ext.prompt  `<lora:...>` tag syntax
    lora_ext.families the vocabulary of model families (stdlib only, imported by every layer)
"""

__version__ = "0.1.0"
