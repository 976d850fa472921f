"""The engine: quantization, calibration, the initialization math and its registry, adapters, evaluation."""

# Whole-model methods register themselves with engine/methods.py's decorators when their module is imported; they
# are imported here, where every reader of the registry passes first, rather than from methods.py (no import cycle).
from quailora_app.engine import budget, distill, sequential  # noqa: E402,F401
