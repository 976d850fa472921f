"""QuAILoRA Studio: quantization-aware LoRA initialization, measured on your own model and data."""

__version__ = "0.1.0"
