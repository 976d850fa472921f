"""Is a model/dataset hub reachable from here? Answered within seconds, so offline machines fail fast."""
from __future__ import annotations

import os
import socket
import threading
import time
import urllib.parse

_TRUTHY = {"1", "true", "yes", "on"}
_REACHABLE_CACHE: dict[tuple[str, int], tuple[float, bool]] = {}
_REACHABLE_TTL_S = 300.0


def hub_offline() -> bool:
    """True when offline mode is requested (HF_HUB_OFFLINE / HF_DATASETS_OFFLINE / TRANSFORMERS_OFFLINE)."""
    return any(os.environ.get(v, "").strip().lower() in _TRUTHY
               for v in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"))


def hub_reachable(timeout: float = 2.0) -> bool:
    """A quick TCP probe of the hub endpoint (HF_ENDPOINT), cached for a few minutes; never retries.
    False whenever offline mode is requested."""
    if hub_offline():
        return False
    endpoint = os.environ.get("HF_ENDPOINT") or "https://huggingface.co"
    url = urllib.parse.urlparse(endpoint)
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    key = (host, port)
    now = time.monotonic()
    cached = _REACHABLE_CACHE.get(key)
    if cached and now - cached[0] < _REACHABLE_TTL_S:
        return cached[1]
    result = [False]

    def probe() -> None:
        try:
            with socket.create_connection((host, port), timeout=timeout):
                result[0] = True
        except OSError:
            pass

    thread = threading.Thread(target=probe, daemon=True)  # getaddrinfo has no timeout of its own
    thread.start()
    thread.join(timeout + 0.5)
    _REACHABLE_CACHE[key] = (now, result[0])
    return result[0]
