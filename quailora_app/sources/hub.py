"""Is a model/dataset hub reachable from here? Answered fast, so offline machines fail in seconds."""
from __future__ import annotations

import functools
import os
import socket
from urllib.parse import urlparse

OFFLINE_VARS = ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "HF_DATASETS_OFFLINE")


def offline_by_environment() -> bool:
    """True when the user (or a test) has switched the hub off."""
    return any(os.environ.get(v, "").strip().lower() in ("1", "true", "yes", "on") for v in OFFLINE_VARS)


@functools.lru_cache(maxsize=1)
def _probe(host: str, port: int, timeout: float) -> bool:
    try:
        with socket.create_connection((host, port), timeout=timeout):
            return True
    except OSError:
        return False


def hub_reachable(timeout: float = 2.0) -> bool:
    """One TCP connect to the hub endpoint (HF_ENDPOINT or huggingface.co), cached for the process."""
    if offline_by_environment():
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    return _probe(url.hostname or "huggingface.co", url.port or (443 if url.scheme == "https" else 80), timeout)
