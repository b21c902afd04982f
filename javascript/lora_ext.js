// lora_ext: page helpers for the WebUI (card clicks, progress polling). Loaded by the WebUI into every page.
// Nothing here yet: the WebUI integration adds it.
