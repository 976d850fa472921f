import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).parent))


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    from helpers import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


@pytest.fixture(scope="session")
def tiny_tok():
    from helpers import tiny_tokenizer

    return tiny_tokenizer()


@pytest.fixture(scope="session")
def text_file(tmp_path_factory) -> Path:
    """300 lines of 40 words drawn from the tiny tokenizer's sentences (the engine tests' text)."""
    import random

    from helpers import TINY_TEXT

    rng = random.Random(0)
    words = " ".join(TINY_TEXT).split()
    path = tmp_path_factory.mktemp("data") / "docs.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(300)))
    return path


@pytest.fixture(scope="session")
def short_docs_file(tmp_path_factory) -> Path:
    """600 short documents (4-12 words) separated by blank lines (the app tests' upload)."""
    import random

    from helpers import TINY_TEXT

    rng = random.Random(0)
    docs = [" ".join(rng.choice(TINY_TEXT).split()[: rng.randint(4, 12)]) for _ in range(600)]
    path = tmp_path_factory.mktemp("data") / "tiny.txt"
    path.write_text("\n\n".join(docs))
    return path


@pytest.fixture(scope="module")
def allowed(tmp_path_factory):
    """Typed paths into pytest's temp folders (the tiny model) are allowed, as an operator would set it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("QUAILORA_ALLOWED_PATHS", str(tmp_path_factory.getbasetemp()))
    mp.setenv("QUAILORA_UPLOADS", str(tmp_path_factory.mktemp("uploads")))
    yield
    mp.undo()
