"""The garbage collector after startup: one policy per process, like the thread policy.

Everything alive once the app is built (the imported libraries' modules and classes, the page's components, the
shipped example's figures) lives as long as the process. A run's `free_memory()` calls `gc.collect()` to drop a
model held in a reference cycle (peft's wrappers are), and a full collection walks every tracked object: about
0.65 M of them in the app, 0.2-0.4 s per call here, a few calls per run. `gc.freeze()` moves the startup objects
out of the collector's sight, so a collection walks only what was made since (the runs' own objects).
No project imports: the bottom layer.
"""
from __future__ import annotations

import gc


def freeze_startup_heap() -> int:
    """Collect once, then freeze what is left (never collected again: call it after startup, before any run);
    returns how many objects were frozen."""
    gc.collect()
    gc.freeze()
    return gc.get_freeze_count()
