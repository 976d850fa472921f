"""The engine: quantization, calibration, the initialization methods and their registry, adapters, evaluation."""
