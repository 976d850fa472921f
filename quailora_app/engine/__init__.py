"""The engine: quantization, calibration, the initialization math and its registry, adapters, evaluation."""
