"""QuAILoRA Studio: quantization-aware LoRA initialization, measured on your own model and data.

The public API (imported on first use, so `import quailora_app` stays light):

- `replace_lora_weights_quailora(peft_model, calibration, method="closed_form", ...)`: initialize the LoRA factors
  of your own PeftModel on a bitsandbytes 4-bit (or 8-bit) base, in place; returns the per-layer errors.
- `save_adapter(peft_model, folder, result)`: a plain peft adapter folder that also records how it was initialized.
- `keep_cpu_layout(model)`: keep a 4-bit model computing in its compute dtype on AVX512-BF16 CPUs (call before
  its first forward pass).
- `method_names()`, `register_method`: the registry of initialization methods.
- The flows behind the command line and the app, each an iterator of typed events that writes a run folder:
  `run_init(InitConfig(...))`, `run_train(TrainConfig(...))`, `run_views(ViewsConfig(...))`, with their configs
  `InitConfig`, `TrainConfig`, `ViewsConfig`, `ModelConfig`, `DataConfig`, `QuantConfig`, `LoraSettings`.
"""
import logging
from importlib import import_module

# bitsandbytes (imported by peft and by the engine) warns at import that an optional kernels package is missing:
# nothing a user can act on. Set before any module of this package imports it; flows and the CLI quiet the rest.
logging.getLogger("bitsandbytes").setLevel(logging.ERROR)

__version__ = "0.2.0"

_EXPORTS = {
    "replace_lora_weights_quailora": "quailora_app.api",
    "QuailoraResult": "quailora_app.api",
    "calibration_ids": "quailora_app.api",
    "save_adapter": "quailora_app.api",
    "keep_cpu_layout": "quailora_app.engine.quantization.bnb",
    "method_names": "quailora_app.engine.methods.registry",
    "register_method": "quailora_app.engine.methods.registry",
    "run_init": "quailora_app.flows.init",
    "run_train": "quailora_app.flows.train",
    "run_views": "quailora_app.flows.views",
    "InitConfig": "quailora_app.config",
    "TrainConfig": "quailora_app.config",
    "ViewsConfig": "quailora_app.config",
    "ModelConfig": "quailora_app.config",
    "DataConfig": "quailora_app.config",
    "QuantConfig": "quailora_app.config",
    "LoraSettings": "quailora_app.config",
}
__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    """Lazy exports (PEP 562): torch, transformers and peft load on first use, not on `import quailora_app`."""
    if name not in _EXPORTS:
        raise AttributeError(f"module 'quailora_app' has no attribute {name!r}")
    return getattr(import_module(_EXPORTS[name]), name)


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])
