"""What the page starts with on this machine: the device line, and the settings sized to it (no gradio here:
`bench/demo_time.py` runs exactly these settings)."""
from __future__ import annotations

from typing import Any

from quailora_app.app.jobs import zerogpu_available
from quailora_app.config import ALL_LINEAR, InitConfig
from quailora_app.settings import settings


def device_summary() -> tuple[str, bool]:
    """(a line naming the device, whether it is a GPU)."""
    import torch  # heavy: only when a page is built

    if torch.cuda.is_available():
        return f"GPU: {torch.cuda.get_device_name(0)}", True
    if zerogpu_available():
        return "ZeroGPU: a GPU is attached to each job while it runs", True
    return f"CPU ({torch.get_num_threads()} threads), no GPU", False


def default_settings(gpu: bool) -> dict[str, Any]:
    """Settings sized to the device (the others are the config dataclasses' defaults).

    CPU, with the embedded SmolLM2: every linear layer (as on a GPU), 16 x 256 calibration tokens (on 2 shared cores
    they already give the same per-layer errors as 256 x 256) and 2048 held-out tokens, sized for step 2 to finish
    within a minute on 2 idle cores. The 4-bit base's, the 8-bit and the full-precision perplexities, which no
    method changes, are measured once per model, text and settings and then read from the perplexity cache.
    `python -m bench.demo_time` runs exactly this configuration and times each stage."""
    if gpu:
        return dict(calib_samples=128, seq_len=512, eval_tokens=32768,
                    methods=list(settings(InitConfig)["methods"].choices()), baselines=True, targets=[ALL_LINEAR],
                    steps=200, batch_size=8, eval_every=20, learning_rate=2e-4,
                    accuracy_tasks=["labels", "continuation"], label_items=2000, continuation_items=500)
    return dict(calib_samples=16, seq_len=256, eval_tokens=2048, methods=["qlora", "svd", "quailora"],
                baselines=True, targets=[ALL_LINEAR], steps=10, batch_size=1, eval_every=5,
                learning_rate=2e-4, accuracy_tasks=[], label_items=200, continuation_items=100)
