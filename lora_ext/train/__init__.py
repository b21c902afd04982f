"""Layer 3: the training backend.

Runs in its own process: `python -m lora_ext.train` or `accelerate launch -m lora_ext.train`.
"""
