import gc
import os
import sys
from pathlib import Path

import pytest

from quailora_app.threads import PASSIVE_WAIT

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
# every test measures its perplexities (tests/test_perplexity_cache.py points the cache at a temp folder)
os.environ["QUAILORA_PERPLEXITY_CACHE"] = "off"
# Idle OpenMP threads sleep at once instead of spinning, as in the app and the command line (threads.PASSIVE_WAIT,
# which they set before torch loads): set here, before any test module imports torch (quailora_app.threads imports
# nothing). On 2 shared cores the spin-waits made the tiny-model runs 2-10x slower (test_accuracy_flow's two runs:
# 30-90 s instead of 9 s). No number changes: the waiting is not the thread count, which stays torch's own (and the
# engine's one_cpu_thread still applies: waits_passively() is only true after apply_thread_policy). Kept where set.
for _var, _value in PASSIVE_WAIT.items():
    os.environ.setdefault(_var, _value)
# pytest-xdist's workers (`-n auto`, pyproject's addopts) share the cores: each torch gets its share of threads (on
# 2 cores, 2 workers of 1 thread), not every core each
_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT") or 0)
if _WORKERS > 1:
    import torch

    torch.set_num_threads(max(1, (os.cpu_count() or 1) // _WORKERS))
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
def train_text_file(tmp_path_factory) -> Path:
    """A few hundred short lines in the tiny tokenizer's vocabulary: half repeated sentences, half word salad (the
    fine-tuning tests' text: the repeated half is learnable in a few steps)."""
    import random

    from helpers import TINY_TEXT

    words = " ".join(TINY_TEXT[:4]).replace(",", "").replace(";", "").split()
    rng = random.Random(0)
    lines = [TINY_TEXT[i % 4] if rng.random() < 0.5 else " ".join(rng.choice(words) for _ in range(rng.randint(6, 14)))
             for i in range(600)]
    path = tmp_path_factory.mktemp("text") / "tiny.txt"
    path.write_text("\n".join(lines) + "\n")
    return path


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


@pytest.fixture(scope="module", autouse=True)
def frozen_heap():
    """At the start of each module, what the process holds (torch, transformers, gradio, every test module and what
    earlier modules left: some 800k objects) is moved out of the cyclic collector's sight (gc.freeze). The flows
    call gc.collect() after each run and the app's worker after each job (flows/recorder.free_memory,
    app/jobs.release_memory): each then scans only what was created since, not all of it again, ~0.5 s saved per
    call (75 calls cost 40 s in four modules, 4 s frozen). What a test creates and drops is collected exactly as
    before; an object frozen here that dies later is only never freed. tests/test_app_robustness.py's count of live
    models unfreezes first, so it still sees every model in the process."""
    gc.collect()
    gc.freeze()
    yield


@pytest.fixture(scope="module")
def quick_heartbeat():
    """gradio's session heartbeat every 0.5 s instead of 15 (GRADIO_HEARTBEAT_INTERVAL, which gradio offers for
    exactly this and reads at each heartbeat connection) for a module that launches the app: a closed client's
    session ends, and the app's unload handler runs, within a second instead of up to 15 s, and
    gradio_client's Client.close() no longer waits out its 1 s join of the heartbeat thread."""
    mp = pytest.MonkeyPatch()
    mp.setenv("GRADIO_HEARTBEAT_INTERVAL", "0.5")
    yield
    mp.undo()


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


@pytest.fixture(scope="session")
def tiny_init_run(tiny_model_dir, text_file, tmp_path_factory) -> Path:
    """A finished init run of the tiny model with quailora and closed_form saved (no 8-bit / full baselines), alone
    under a runs root of its own (its parent): the generate tests' source run."""
    from quailora_app.config import DataConfig, InitConfig, LoraSettings, ModelConfig, QuantConfig
    from quailora_app.flows.init import run_init

    run_dir = tmp_path_factory.mktemp("runs") / "init-tiny"
    cfg = InitConfig(ModelConfig(str(tiny_model_dir), "cpu"),
                     DataConfig(str(text_file), seq_len=32, calib_samples=8, eval_tokens=256),
                     QuantConfig(), LoraSettings(rank=4, alpha=8.0), methods=("quailora", "closed_form"),
                     baselines=False)
    events = list(run_init(cfg, run_dir=run_dir))
    assert events[-1].kind == "finished", events[-1]
    return run_dir
