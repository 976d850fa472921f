import os
import sys
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# every test measures its perplexities (tests/test_perplexity_cache.py points the cache at a temp folder)
os.environ["QUAILORA_PERPLEXITY_CACHE"] = "off"
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


@pytest.fixture(scope="session")
def labelled(tmp_path_factory) -> Path:
    """120 short labelled texts (a few words of the tiny tokenizer's vocabulary, label good / bad): the accuracy
    tests' label task."""
    import json
    import random

    from helpers import TINY_WORDS

    rng = random.Random(3)
    path = tmp_path_factory.mktemp("labels") / "reviews.jsonl"
    rows = [{"text": " ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(3, 8))) + f" {i}",
             "label": "good" if i % 2 else "bad"} for i in range(120)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


@pytest.fixture(scope="module")
def one_thread():
    """Torch on one thread for a module of tiny-matrix tests (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    one thread is fastest there and spares the spin-waiting of a busy shared machine; results do not depend on it
    (the engine is deterministic on CPU at any thread count)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture(scope="module")
def allowed(tmp_path_factory):
    """Typed paths into pytest's temp folders (the tiny model) are allowed, as an operator would set it."""
    mp = pytest.MonkeyPatch()
    mp.setenv("QUAILORA_ALLOWED_PATHS", str(tmp_path_factory.getbasetemp()))
    mp.setenv("QUAILORA_UPLOADS", str(tmp_path_factory.mktemp("uploads")))
    yield
    mp.undo()


# -- tiers ----------------------------------------------------------------------------------------------------
# `pytest -m fast`: no server, no subprocess, no model (well under a minute on 2 cores). Every test that is not
# marked model / slow / subprocess / server / browser gets the `fast` mark here.
HEAVY_MARKS = ("model", "slow", "subprocess", "server", "browser")
SERVER_MODULES = {"test_app_bad_input", "test_app_client", "test_app_robustness", "test_load", "test_browser"}
SUBPROCESS_MODULES = {"test_distributed"}
MODEL_FIXTURES = {"tiny_model_dir", "tiny_model", "embedded_model"}


def pytest_collection_modifyitems(config, items):
    for item in items:
        module = item.module.__name__.rsplit(".", 1)[-1]
        if module in SERVER_MODULES:
            item.add_marker(pytest.mark.server)
        if module in SUBPROCESS_MODULES:
            item.add_marker(pytest.mark.subprocess)
        if MODEL_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.model)
        if not any(item.get_closest_marker(mark) for mark in HEAVY_MARKS):
            item.add_marker(pytest.mark.fast)
