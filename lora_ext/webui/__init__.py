"""The WebUI integration. `controller` is host-agnostic (testable without the WebUI); `glue`, `api` and `cards` are the
only modules of lora_ext that import AUTOMATIC1111's `modules.*`, and only when the WebUI loads them."""
