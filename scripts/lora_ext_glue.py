"""WebUI glue, loaded by AUTOMATIC1111 at start-up and at every "Reload UI". Everything lives in `lora_ext.webui`."""

from lora_ext.webui import glue

glue.setup()
