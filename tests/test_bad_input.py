"""Bad input, engine side: every case ends `python -m quailora_app init|train` early with a
non-zero exit, exactly one `error:` line naming the reason, and no traceback. Plus the memory estimate, the
NaN/Inf check and the trust_remote_code rule on their own."""
import json
import re
from pathlib import Path

import pytest
import torch
from helpers import HUGE_LLAMA, bad_file, huge_model, non_causal_model, with_weight
from safetensors.torch import save_file

from quailora_app.errors import ConfigError, ModelError

ROOT = Path(__file__).resolve().parents[1]


def remote_code_model(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({
        "model_type": "quailora-custom", "architectures": ["CustomForCausalLM"],
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomForCausalLM"}}))
    (folder / "configuration_custom.py").write_text(
        "from transformers import PretrainedConfig\n\n\nclass CustomConfig(PretrainedConfig):\n"
        "    model_type = 'quailora-custom'\n")
    (folder / "model.safetensors").write_bytes(b"not weights")
    return folder


# case -> (command, expected text in the error line)
CASES = {
    "unknown-model-offline": ("init", "is not a local folder and the Hugging Face hub is not reachable"),
    "not-causal": ("init", "is not a causal language model"),
    "too-large-for-device": ("init", "needs about"),
    "too-large-for-limit": ("train", "needs about"),
    "unknown-dataset": ("init", "dataset 'no-such-org/no-such-dataset' is not a local file and the Hugging Face hub "
                                "is not reachable"),
    "empty-file": ("init", "is empty"),
    "binary-file": ("init", "is not a text file (it contains NUL bytes"),
    "not-utf8": ("init", "is not UTF-8 text (byte 0xe9 at offset 3)"),
    "file-too-large": ("init", "larger than the"),
    "no-text-column": ("init", "has no text column; columns: id, score"),
    "few-calibration-tokens": ("init", "of the 5000 calibration sequences asked; use more text or lower"),
    "rank-0": ("init", "rank must be at least 1, got 0"),
    "rank-negative": ("init", "rank must be at least 1, got -3"),
    "rank-too-large": ("init", "rank 100 is larger than"),
    "alpha-0": ("init", "alpha must be positive, got 0.0"),
    "steps-0": ("train", "steps must be at least 1, got 0"),
    "seq-len-beyond-context": ("init", "seq-len 1024 is beyond the context of model"),
    "nan-weights": ("init", "has NaN values in the weight model.layers.0.self_attn.q_proj.weight"),
    "inf-weights": ("train", "has Inf values in the weight model.layers.0.self_attn.q_proj.weight"),
    "remote-code": ("init", "needs custom code from its repository"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_is_one_error_line(case, tiny_model_dir, text_file, tmp_path, capsys, monkeypatch):
    from quailora_app.cli import main

    command, expect = CASES[case]
    model, dataset, extra = str(tiny_model_dir), str(text_file), []
    monkeypatch.delenv("QUAILORA_MEMORY_LIMIT_GIB", raising=False)
    monkeypatch.delenv("QUAILORA_TRUST_REMOTE_CODE", raising=False)
    if case == "unknown-model-offline":
        model = "no-such-org/no-such-model"
    elif case == "not-causal":
        model = str(non_causal_model(tmp_path / "bert"))
    elif case == "too-large-for-device":
        model = str(huge_model(tmp_path / "huge"))
        monkeypatch.setenv("QUAILORA_MEMORY_LIMIT_GIB", "16")  # the same answer on a machine with more memory
    elif case == "too-large-for-limit":
        monkeypatch.setenv("QUAILORA_MEMORY_LIMIT_GIB", "0.001")
    elif case == "unknown-dataset":
        dataset = "no-such-org/no-such-dataset"
    elif case in ("empty-file", "binary-file", "not-utf8", "no-text-column"):
        dataset = str(bad_file(case.removesuffix("-file"), tmp_path))
    elif case == "file-too-large":
        monkeypatch.setattr("quailora_app.sources.data.MAX_DATA_BYTES", 1000)
    elif case == "few-calibration-tokens":
        extra = ["--calib-samples", "5000"]
    elif case == "rank-0":
        extra = ["--rank", "0"]
    elif case == "rank-negative":
        extra = ["--rank", "-3"]
    elif case == "rank-too-large":
        extra = ["--rank", "100"]
    elif case == "alpha-0":
        extra = ["--alpha", "0"]
    elif case == "steps-0":
        extra = ["--steps", "0"]
    elif case == "seq-len-beyond-context":
        extra = ["--seq-len", "1024", "--eval-tokens", "2048"]
    elif case in ("nan-weights", "inf-weights"):
        bad = float("nan") if case == "nan-weights" else float("inf")
        model = str(with_weight(tiny_model_dir, tmp_path / "bad", bad))
    elif case == "remote-code":
        model = str(remote_code_model(tmp_path / "custom"))
    argv = [command, "--model", model, "--dataset", dataset, "--seq-len", "32", "--calib-samples", "4",
            "--eval-tokens", "256", "--rank", "4", "--out", str(tmp_path / "run")]
    if command == "train":
        argv += ["--arms", "qlora4", "--steps", "1"]
    code = main(argv + extra)  # later flags win
    stderr = capsys.readouterr().err
    assert code != 0
    assert "Traceback" not in stderr
    error_lines = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert len(error_lines) == 1 and expect in error_lines[0], stderr[-2000:]


def test_memory_refusal_reads_no_weights_and_gives_figures(tmp_path, monkeypatch):
    """A 70B config: refused from config.json alone (the 'weights' file is garbage), with both figures."""
    import safetensors

    from quailora_app.config import DataConfig, InitConfig, ModelConfig
    from quailora_app.events import Log, RunFailed
    from quailora_app.flows.init import run_init

    def no_weights(*_a, **_k):
        raise AssertionError("weights were opened")

    monkeypatch.setattr(safetensors, "safe_open", no_weights)
    monkeypatch.setattr("quailora_app.engine.checkpoint.safe_open", no_weights)
    monkeypatch.setenv("QUAILORA_MEMORY_LIMIT_GIB", "16")
    folder = huge_model(tmp_path / "huge")
    events = list(run_init(InitConfig(ModelConfig(str(folder), device="cpu"), DataConfig("embedded"), baselines=False,
                                      out=str(tmp_path / "run"))))
    assert isinstance(events[-1], RunFailed) and not events[-1].cancelled
    assert not any(isinstance(e, Log) for e in events)
    m = re.fullmatch(rf"model '{re.escape(str(folder))}' needs about ([\d.]+) GiB for init on cpu \(peak: 4-bit \+ "
                     r"calibration\); [\d.]+ GiB (allowed by QUAILORA_MEMORY_LIMIT_GIB|available): choose a smaller "
                     r"model.*", events[-1].message)
    assert m, events[-1].message
    assert 34 < float(m.group(1)) < 50  # 69e9 weights at ~0.52 B + embeddings and head in float32 + one block


def test_memory_estimate_formula_on_the_70b_config():
    from transformers import LlamaConfig

    from quailora_app.config import InitConfig, ModelConfig, TrainConfig
    from quailora_app.engine.preflight import GIB, base_bytes, init_estimate, model_shapes, train_estimate

    shapes = model_shapes(LlamaConfig(**{k: v for k, v in HUGE_LLAMA.items()
                                         if k not in ("model_type", "architectures")}))
    assert shapes.n_blocks == 80 and shapes.hidden == 8192 and shapes.vocab == 32000
    assert abs(shapes.total_params - 68.98e9) < 0.01e9
    assert shapes.other_params == 2 * 32000 * 8192 + 8192 * (2 * 80 + 1)  # embeddings, head, norms
    cpu, gpu = torch.device("cpu"), torch.device("cuda")
    four = base_bytes(shapes, "4bit", 4)
    assert four < base_bytes(shapes, "8bit", 4) < base_bytes(shapes, "full", 4)
    assert base_bytes(shapes, "full", 2) == 2 * shapes.total_params
    assert base_bytes(shapes, "4bit", 4, double_quant=False) > four  # float32 absmax per block
    init = init_estimate(shapes, InitConfig(), cpu)
    assert init.peak[0] == "full-precision baseline" and init.peak[1] > 4 * 68e9  # the float32 baseline dominates
    no_base = init_estimate(shapes, InitConfig(baselines=False), gpu)
    assert list(no_base.phases) == ["4-bit + calibration"] and 34 * GIB < no_base.peak[1] < 45 * GIB
    seq = train_estimate(shapes, TrainConfig(model=ModelConfig(device="cuda")), gpu)
    both = train_estimate(shapes, TrainConfig(model=ModelConfig(device="cuda")), gpu, interleaved=True)
    assert both.peak[1] > seq.peak[1]  # qlora4 + quailora4 + qlora8 resident together


def test_memory_estimate_is_in_the_events(tiny_model_dir, text_file, tmp_path):
    from quailora_app.config import DataConfig, InitConfig, LoraSettings, ModelConfig
    from quailora_app.events import Log, Stage
    from quailora_app.flows.init import run_init

    cfg = InitConfig(ModelConfig(str(tiny_model_dir)),
                     DataConfig(str(text_file), seq_len=32, calib_samples=4, eval_tokens=256),
                     lora=LoraSettings(rank=4), methods=("svd",), out=str(tmp_path / "run"))
    stream = run_init(cfg)
    seen = []
    for event in stream:
        seen.append(event)
        if isinstance(event, Stage) and event.stage == "data":
            break
    stream.close()
    logs = [e.message for e in seen if isinstance(e, Log)]
    size = r"[\d.]+ (?:[KMGT]i)?B"  # units.format_bytes
    assert len(logs) == 1 and re.match(rf"memory estimate for init of '.*' on cpu: about {size} at the peak "
                                       rf"\(4-bit \+ calibration {size}, full-precision baseline {size}\); "
                                       rf"{size} available", logs[0]), logs


def test_nan_check_streams_in_slices_and_names_the_tensor(tmp_path):
    from quailora_app.engine.checkpoint import Checkpoint

    good = torch.randn(40, 8)
    bad = torch.randn(40, 8).to(torch.bfloat16)
    bad[37, 2] = float("-inf")
    save_file({"a.weight": good, "b.weight": bad, "ids": torch.arange(5)}, tmp_path / "model.safetensors")
    with pytest.raises(ModelError, match=r"^model 'm' has Inf values in the weight b.weight \(model.safetensors\)"):
        Checkpoint(tmp_path).check_finite("m", chunk=16)  # 2 rows per slice: the bad row is in the 19th slice
    save_file({"a.weight": good}, tmp_path / "model.safetensors")
    Checkpoint(tmp_path).check_finite("m", chunk=16)  # clean: no error


def test_context_length_attributes():
    from transformers import GPT2Config, LlamaConfig

    from quailora_app.sources.models import check_context, context_length

    assert context_length(LlamaConfig(max_position_embeddings=512)) == 512
    assert context_length(GPT2Config(n_positions=128)) == 128
    check_context(GPT2Config(n_positions=128), 128, "gpt2")
    with pytest.raises(ConfigError, match="seq-len 129 is beyond the context of model 'gpt2' \\(128 tokens\\)"):
        check_context(GPT2Config(n_positions=128), 129, "gpt2")


def test_remote_code_only_with_the_operator_env_var(tmp_path, monkeypatch):
    from quailora_app.sources.models import ModelSource, load_config

    source = ModelSource("custom", remote_code_model(tmp_path / "custom"))
    monkeypatch.delenv("QUAILORA_TRUST_REMOTE_CODE", raising=False)
    with pytest.raises(ModelError, match="QUAILORA_TRUST_REMOTE_CODE=1"):
        load_config(source)
    monkeypatch.setenv("QUAILORA_TRUST_REMOTE_CODE", "1")
    config = load_config(source)  # the operator allowed it: the model's own config class is used
    assert type(config).__name__ == "CustomConfig"


def test_every_engine_from_pretrained_passes_trust_remote_code_explicitly():
    """Every AutoConfig / AutoTokenizer / AutoModel* .from_pretrained call in the package (engine and UI) names
    trust_remote_code (calls in code, read with ast: a docstring's example of user code is not one)."""
    import ast

    calls = []
    for file in sorted((ROOT / "quailora_app").rglob("*.py")):
        for node in ast.walk(ast.parse(file.read_text())):
            if (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                    and node.func.attr == "from_pretrained" and isinstance(node.func.value, ast.Name)
                    and node.func.value.id.startswith("Auto")):
                calls.append((file.name, ast.unparse(node), {k.arg for k in node.keywords}))
    assert len(calls) >= 5, calls
    missing = [c[:2] for c in calls if "trust_remote_code" not in c[2]]
    assert not missing, missing
