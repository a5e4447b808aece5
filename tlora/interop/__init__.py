"""A T-LoRA for other tools: standard LoRA files, scheduled chunks and the authors' format (export)."""
