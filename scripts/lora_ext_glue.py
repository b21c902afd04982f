"""WebUI glue (loaded by AUTOMATIC1111 at start-up).

Deliberately empty for now: the engine (lora_ext.patch) is ready, the WebUI integration (owning the `<lora:...>` tag,
settings, routes, the training tab) is the next piece of work. Until then the built-in Lora extension keeps handling
tags, and this file must not change anything in the WebUI.
"""
