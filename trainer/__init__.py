"""distill: distil a frozen teacher language model into a LoRA student."""
