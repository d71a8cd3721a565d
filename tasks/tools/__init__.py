"""Offline tools that make Qwen3-shaped artifacts: Qwen3's tokenizer and a small stand-in model."""
