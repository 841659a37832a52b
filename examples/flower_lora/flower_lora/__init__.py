"""CLAIR in a Flower federation: LoRA fine-tuning of a small JAX/Flax Transformer."""
