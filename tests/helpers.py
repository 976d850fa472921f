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

    Weights are scaled up a little so 4-bit quantization error is visible in perplexity (save_tiny_family)."""
    return save_tiny_family("llama", folder, hidden=hidden, intermediate=intermediate, layers=layers, seed=seed)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def launched_app(runs_dir: Path, allowed: Path | None = None):
    """The real app served on a free localhost port, run folders under `runs_dir`, typed paths allowed under
    `allowed` as well (QUAILORA_ALLOWED_PATHS, e.g. pytest's temp folders holding a tiny model); yields its URL."""
    import gradio.networking as networking

    from quailora_app.app.jobs import JobManager
    from quailora_app.app.ui import build_ui, launch_options

    env = {"QUAILORA_RUNS": str(runs_dir), **({"QUAILORA_ALLOWED_PATHS": str(allowed)} if allowed else {})}
    old = {name: os.environ.get(name) for name in env}
    os.environ.update(env)
    demo = build_ui(JobManager(gpu=False))
    quick_check = networking.url_ok

    def patient_check(url: str) -> bool:  # gradio gives the page 3 s; a loaded machine's first answer takes longer
        deadline = time.time() + 120
        while time.time() < deadline:
            if quick_check(url):
                return True
            time.sleep(0.2)  # not a busy loop beside the server it waits for
        return False

    networking.url_ok = patient_check
    try:
        _, url, _ = demo.launch(prevent_thread_lock=True, server_name="127.0.0.1", server_port=free_port(), quiet=True,
                                **launch_options())
    finally:
        networking.url_ok = quick_check
    try:
        yield url
    finally:
        demo.close()
        for name, value in old.items():
            if value is None:
                os.environ.pop(name, None)
            else:
                os.environ[name] = value


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
    """The app's 17 Setup settings (/start_init, /start_train, by parameter name) for a ~2 s job on the tiny model;
    `over` replaces any of them (e.g. upload=handle_file(path), rank=8) or adds a flow's own (methods, arms, ...)."""
    args = dict(model=str(model_dir), dataset="", upload=None, text_column=None, quantizer="bitsandbytes", bits=4,
                quant="nf4", double_quant=True,
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


#: Causal-LM families built tiny from their configs (random weights): family -> (config class, model class, the
#: family's own config settings). Every family also gets hidden 64, MLP 128, 2 blocks, 4 heads, the tiny tokenizer's
#: vocabulary and special tokens (see `save_tiny_family`).
TINY_FAMILIES: dict[str, tuple[str, str, dict]] = {
    "llama": ("LlamaConfig", "LlamaForCausalLM", dict(num_key_value_heads=2)),
    "mistral": ("MistralConfig", "MistralForCausalLM", dict(num_key_value_heads=2, sliding_window=16)),
    "qwen2": ("Qwen2Config", "Qwen2ForCausalLM", dict(num_key_value_heads=2)),  # q/k/v with bias
    "qwen3": ("Qwen3Config", "Qwen3ForCausalLM", dict(num_key_value_heads=2, head_dim=16)),  # q/k norms
    "gemma2": ("Gemma2Config", "Gemma2ForCausalLM",  # sliding and global blocks, soft-capping
               dict(num_key_value_heads=2, head_dim=16, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"])),
    # text-only; sliding and global blocks; one key-value head (as Gemma 3 270M) of 32: bitsandbytes' CPU repacking
    # at an inference forward needs out_features % 32 == 0 (a k_proj of 16 crashes inside the user's own forward)
    "gemma3": ("Gemma3TextConfig", "Gemma3ForCausalLM",
               dict(num_key_value_heads=1, head_dim=32, sliding_window=8,
                    layer_types=["sliding_attention", "full_attention"])),
    "phi3": ("Phi3Config", "Phi3ForCausalLM", dict(num_key_value_heads=2)),  # fused qkv_proj, gate_up_proj
    "gpt_neox": ("GPTNeoXConfig", "GPTNeoXForCausalLM",  # gpt_neox.layers, fused query_key_value, partial rotary
                 dict(rotary_pct=0.25, use_parallel_residual=True)),
    "olmo2": ("Olmo2Config", "Olmo2ForCausalLM", dict(num_key_value_heads=2)),  # norms after attention and MLP
    "granite": ("GraniteConfig", "GraniteForCausalLM",  # multipliers on embeddings, residuals, attention, logits
                dict(num_key_value_heads=2, embedding_multiplier=4.0, residual_multiplier=0.5,
                     attention_multiplier=0.25, logits_scaling=2.0)),
    "opt": ("OPTConfig", "OPTForCausalLM",  # model.decoder.layers, learned positions, LayerNorm, fc1/fc2
            dict(ffn_dim=128, word_embed_proj_dim=64, do_layer_norm_before=True)),
    # OPT-350m's layout: embeddings narrower than the blocks (project_in / project_out: 4-bit linear layers outside
    # the blocks, which get LoRA from all-linear but no initialization), LayerNorm after attention and MLP
    "opt_350m_style": ("OPTConfig", "OPTForCausalLM",
                       dict(hidden_size=128, ffn_dim=256, word_embed_proj_dim=64, do_layer_norm_before=False)),
}


def save_tiny_family(family: str, folder: Path, *, hidden: int = 64, intermediate: int = 128, layers: int = 2,
                     seed: int = 0, **config) -> Path:
    """A random model of one of TINY_FAMILIES, saved as safetensors with the tiny tokenizer (as save_tiny_llama:
    2-D weights scaled up 8x so 4-bit quantization error is visible). The family's own settings, then `config`,
    override the common ones."""
    import transformers

    config_class, model_class, own = TINY_FAMILIES[family]
    tokenizer = tiny_tokenizer()
    special = dict(eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.eos_token_id,
                   bos_token_id=tokenizer.eos_token_id)
    settings = dict(vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=intermediate,
                    num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=512,
                    tie_word_embeddings=True, **special)
    config = getattr(transformers, config_class)(**{**settings, **own, **config})
    torch.manual_seed(seed)
    model = getattr(transformers, model_class)(config)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.mul_(8.0)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return Path(folder)


def family_init(folder: Path, calibration, heldout: torch.Tensor, *, double_quant: bool = False,
                forward_first: bool = True, rank: int = 8, alpha: float = 16.0, tokenizer=None,
                reference: torch.Tensor | None = None) -> dict:
    """QuAILoRA's closed form on a model folder loaded in 4-bit the way a user does, and what it did to the logits.

    Loads with BitsAndBytesConfig(load_in_4bit=True, nf4, double quantization `double_quant`, default compute dtype);
    `forward_first`: one evaluation forward before anything else (on AVX512-BF16 CPUs bitsandbytes repacks the
    layers there); then get_peft_model(r=rank, alpha, all-linear) and replace_lora_weights_quailora(calibration).
    The mean squared logit error to the float32 model (`reference`: its logits on `heldout`, computed when None)
    is measured with the adapter disabled (plain 4-bit, B = 0) and enabled, both after the replace (a forward
    before it would repack the layers of a `forward_first=False` model). Returns before, after, ratio, the
    QuailoraResult, the LoRA layer paths inside the decoder blocks (`in_blocks`), those of them whose B the replace
    made nonzero (`written`), the count of all LoRA layers and the peft model."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from quailora_app import replace_lora_weights_quailora
    from quailora_app.engine.adapters import lora_layers
    from quailora_app.engine.calibration.calibrate import decoder_layers

    if reference is None:
        full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        with torch.no_grad():
            reference = full(input_ids=heldout).logits.float()
        del full
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=double_quant)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb)
    if forward_first:
        with torch.no_grad():
            model(input_ids=heldout[:1])
    torch.manual_seed(0)
    peft_model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=alpha, target_modules="all-linear",
                                                  task_type="CAUSAL_LM"))
    result = replace_lora_weights_quailora(peft_model, calibration, method="closed_form", tokenizer=tokenizer,
                                           seq_len=heldout.shape[1], progress=False)

    def error() -> float:
        with torch.no_grad():
            return ((peft_model(input_ids=heldout).logits.float() - reference) ** 2).mean().item()

    with peft_model.disable_adapter():
        before = error()
    after = error()
    prefix, _ = decoder_layers(peft_model.get_base_model())
    layers = lora_layers(peft_model)
    in_blocks = [p for p in layers if p.startswith(prefix + ".")]
    written = [p for p in in_blocks if layers[p].lora_B["default"].weight.abs().max() > 0]
    return {"before": before, "after": after, "ratio": after / before, "result": result, "in_blocks": in_blocks,
            "written": written, "lora_layers": len(layers), "peft_model": peft_model}
