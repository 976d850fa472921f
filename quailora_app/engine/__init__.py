"""The engine: quantization, calibration, the initialization math and its registry, adapters, evaluation."""
import logging

# bitsandbytes (imported by peft and by the engine) warns at import that an optional kernels package is missing:
# nothing a user can act on. Set before any engine module imports it; flows and the CLI quiet the rest.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)
