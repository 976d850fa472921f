"""Tiny models and tokenizers built from a config, offline, for fast tests."""
from __future__ import annotations

import json
import os
import shutil
import socket
import time
from contextlib import contextmanager
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

#: words of the tiny tokenizer's vocabulary (the accuracy tests' labelled and continuation texts)
TINY_WORDS = "the quick brown fox jumps over a lazy dog film about love loss and long road home every block".split()

TINY_TEXT = [
    "the quick brown fox jumps over the lazy dog",
    "a film about love, loss and the long road home",
    "quantization trades memory for accuracy; low rank corrections win some back",
    "every block of sixty four weights shares one scale",
] * 8


def tiny_tokenizer():
    """A byte-level BPE tokenizer trained in memory on a few sentences (vocab ~300, has <eos>)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=300, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TINY_TEXT, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", pad_token="<eos>")


def save_tiny_llama(folder: Path, *, hidden: int = 64, intermediate: int = 128, layers: int = 2, seed: int = 0) -> Path:
    """A random Llama from a config, saved as safetensors with a tokenizer: a complete local model folder.

    Weights are scaled up a little so 4-bit quantization error is visible in perplexity.
    """
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = tiny_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate, num_hidden_layers=layers,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, tie_word_embeddings=True,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id, bos_token_id=tokenizer.eos_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def launched_app(runs_dir: Path):
    """The real app served on a free localhost port, run folders under `runs_dir`; yields its URL."""
    from quailora_app.app.jobs import JobManager
    from quailora_app.app.ui import build_ui, launch_options

    old = os.environ.get("QUAILORA_RUNS")
    os.environ["QUAILORA_RUNS"] = str(runs_dir)
    demo = build_ui(JobManager(gpu=False))
    _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                            **launch_options())
    try:
        yield url
    finally:
        demo.close()
        if old is None:
            os.environ.pop("QUAILORA_RUNS", None)
        else:
            os.environ["QUAILORA_RUNS"] = old


HUGE_LLAMA = {  # a Llama-2-70B-shaped config, written without any weights
    "model_type": "llama", "architectures": ["LlamaForCausalLM"], "hidden_size": 8192, "intermediate_size": 28672,
    "num_hidden_layers": 80, "num_attention_heads": 64, "num_key_value_heads": 8, "vocab_size": 32000,
    "max_position_embeddings": 4096, "tie_word_embeddings": False,
}


def with_weight(src: Path, dst: Path, value: float) -> Path:
    """A copy of the tiny model whose first decoder weight holds one `value` (NaN or Inf)."""
    shutil.copytree(src, dst)
    file = dst / "model.safetensors"
    tensors = load_file(file)
    key = min(k for k in tensors if ".layers.0." in k and k.endswith("q_proj.weight"))
    tensors[key][3, 5] = value
    save_file(tensors, file, metadata={"format": "pt"})
    return dst


def huge_model(folder: Path) -> Path:
    """config.json of a 70B model and a 'weights' file that is not a safetensors file: reading it would fail."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(HUGE_LLAMA))
    (folder / "model.safetensors").write_bytes(b"not weights")
    return folder


def form_settings(model_dir, **over) -> dict:
    """The app's 15 Setup settings (/start_init, /start_train, by parameter name) for a ~2 s job on the tiny model;
    `over` replaces any of them (e.g. upload=handle_file(path), rank=8) or adds a flow's own (methods, arms, ...)."""
    args = dict(model=str(model_dir), dataset="", upload=None, text_column=None, quant="nf4", double_quant=True,
                block_size=64, rank=4, alpha=8, rslora=False, targets=["all-linear"], calib_samples=4, seq_len=32,
                eval_tokens=128, seed=0)
    args.update(over)
    return args


def plot_of(value) -> dict:
    """The plotly figure a gr.Plot output carries, as a dict."""
    assert value["type"] == "plotly"
    return json.loads(value["plot"])


JOB_ENDED = ("finished", "failed", "stopped")


def wait_for(client, session, api: str, job_id: str, done, timeout: float = 240.0, poll: float = 0.3):
    """Poll a status endpoint (`api`, e.g. /init_status) for `job_id` until done(outputs) holds; the outputs."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        out = client.predict(session, job_id, api_name=api)
        if done(out):
            return out
        time.sleep(poll)
    raise AssertionError(f"{api} for job {job_id} did not get there in {timeout:.0f} s; last status: {out[1]}")


#: Files the data reader must refuse, by case name: (file name, bytes).
BAD_FILES = {
    "empty": ("empty.txt", b""),
    "binary": ("blob.txt", bytes(range(256)) * 8),
    "not-utf8": ("latin1.txt", "caf\u00e9 na\u00efve ".encode("latin-1") + b"\xff" * 4),
    "no-text-column": ("d.jsonl", b'{"id": 1, "score": 0.5}\n' * 50),
}


def bad_file(kind: str, folder: Path) -> Path:
    """One of BAD_FILES written into `folder`."""
    name, content = BAD_FILES[kind]
    path = Path(folder) / name
    path.write_bytes(content)
    return path


def non_causal_model(folder: Path) -> Path:
    """A tiny BERT (an encoder, not a causal LM) saved to `folder`."""
    from transformers import BertConfig, BertModel

    BertModel(BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=64)).save_pretrained(folder)
    return Path(folder)
