"""Several processes (torch.distributed, gloo on CPU): the same run folder and adapters as one process; the
exported adapter fine-tunes with transformers' Trainer."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from quailora_app.config import DataConfig, InitConfig, LoraSettings, ModelConfig
from quailora_app.engine.parallel import share_layers
from quailora_app.events import RunFinished
from quailora_app.flows.init import run_init
from quailora_app.flows.launch import LAUNCHER_VARS

ROOT = Path(__file__).resolve().parents[1]
COMPUTED = ("svd", "quailora", "closed_form")
# 11 sequences: the processes get 6 and 5, and one process runs them as batches of 8 and 3
DATA = dict(seq_len=48, calib_samples=11, eval_tokens=512)


@pytest.fixture(scope="module")
def runs(tiny_model_dir, text_file, tmp_path_factory):
    """(one-process run folder, two-process run folder, the two-process command's output)."""
    from helpers import free_port

    one, two = tmp_path_factory.mktemp("one"), tmp_path_factory.mktemp("two")
    cfg = InitConfig(ModelConfig(str(tiny_model_dir)), DataConfig(str(text_file), **DATA), lora=LoraSettings(rank=4),
                     methods=COMPUTED, baselines=False, out=str(one))
    assert isinstance(list(run_init(cfg))[-1], RunFinished)
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    for var in LAUNCHER_VARS:
        env.pop(var, None)
    init = ["-m", "quailora_app", "init", "--model", str(tiny_model_dir), "--dataset", str(text_file),
            "--seq-len", str(DATA["seq_len"]), "--calib-samples", str(DATA["calib_samples"]),
            "--eval-tokens", str(DATA["eval_tokens"]), "--rank", "4", "--methods", *COMPUTED, "--no-baselines",
            "--accuracy-tasks", "none",  # as the one-process InitConfig (the CLI scores accuracy by default)
            "--out", str(two)]
    for _ in range(2):  # a free port can be taken by another process before torchrun binds it: one more try
        shutil.rmtree(two)
        launch = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                  "--master_port", str(free_port())]
        done = subprocess.run(launch + init, capture_output=True, text=True, cwd=ROOT, env=env, timeout=300)
        if done.returncode == 0 or "address already in use" not in done.stderr.lower():
            break
    assert done.returncode == 0, done.stderr[-3000:]
    return one, two, done


def corrections(run_dir: Path, method: str) -> dict[str, torch.Tensor]:
    """Layer -> s * B @ A of a saved adapter (the factors themselves are only defined up to signs)."""
    folder = run_dir / "adapters" / method
    config = json.loads((folder / "adapter_config.json").read_text())
    s = config["lora_alpha"] / config["r"]
    weights = load_file(folder / "adapter_model.safetensors")
    return {key: s * weights[key.replace("lora_A", "lora_B")] @ weights[key] for key in weights if "lora_A" in key}


def test_two_processes_give_the_one_process_adapters(runs):
    one, two, _ = runs
    for method in COMPUTED:
        a, b = corrections(one, method), corrections(two, method)
        assert set(a) == set(b) and len(a) == 14
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=1e-4, atol=1e-4 * float(a[key].abs().max()))


def test_two_processes_write_the_one_process_run_folder(runs):
    one, two, done = runs
    assert (sorted(p.relative_to(two).as_posix() for p in two.rglob("*"))
            == sorted(p.relative_to(one).as_posix() for p in one.rglob("*")))
    r1, r2 = (json.loads((d / "report.json").read_text()) for d in (one, two))
    assert r2["status"] == "finished" and r2["processes"]["world_size"] == 2 and r2["processes"]["backend"] == "gloo"
    assert [row["name"] for row in r2["layers"]] == [row["name"] for row in r1["layers"]]
    for x, y in zip(r1["layers"], r2["layers"]):
        for figure in ("weight_error", "calibrated_error"):
            assert y[figure] == pytest.approx(x[figure], rel=1e-4)
    assert r2["perplexity"] == pytest.approx(r1["perplexity"], rel=1e-4)
    kinds = lambda d: [json.loads(line)["kind"] for line in (d / "events.jsonl").read_text().splitlines()]  # noqa: E731
    assert kinds(two) == kinds(one)
    assert done.stdout.count("run folder:") == 1  # only rank 0 speaks


def test_share_layers_spreads_a_block_by_cost():
    h, f = 4096, 11008  # a Llama-2-7B block
    block = [("q", "q", (h, h)), ("k", "q", (h, h)), ("v", "q", (h, h)), ("o", "o", (h, h)),
             ("gate", "gate", (f, h)), ("up", "gate", (f, h)), ("down", "down", (h, f))]
    owners = share_layers(block, 2, calibrated=True)
    assert owners == share_layers(block, 2, calibrated=True)
    assert owners.count(owners[-1]) == 1  # down_proj (n = 11008) costs more than the other six together
    assert sorted(share_layers(block, 8, calibrated=True))[:7] == list(range(7))  # one layer per process
    assert share_layers(block, 1, calibrated=False) == [0] * 7


def test_distributed_flag_without_a_launcher_says_how_to_launch(tiny_model_dir, monkeypatch, capsys):
    from quailora_app.cli import main

    for var in LAUNCHER_VARS:
        monkeypatch.delenv(var, raising=False)
    assert main(["init", "--distributed", "--model", str(tiny_model_dir)]) == 2
    assert "torchrun --nproc_per_node N -m quailora_app init" in capsys.readouterr().err


def test_exported_adapter_fine_tunes_with_trainer(runs, tiny_model_dir, text_file, tmp_path):
    """The README recipe: the 4-bit base from plain transformers (quant_storage float32, as FSDP-QLoRA loads it),
    the adapter through PeftModel.from_pretrained(is_trainable=True), two steps of transformers' Trainer."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig, Trainer, TrainingArguments

    from quailora_app.engine.quantization.bnb import dequantized_weight, linear4bit_modules

    _, two, _ = runs

    def base(storage):
        bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                 bnb_4bit_compute_dtype=torch.float32, bnb_4bit_quant_storage=storage)
        return AutoModelForCausalLM.from_pretrained(tiny_model_dir, quantization_config=bnb, dtype=torch.float32)

    q_packed = {name: dequantized_weight(m) for name, m in linear4bit_modules(base(torch.uint8)).items()}
    for storage in (torch.bfloat16, torch.float32):  # the float storage FSDP shards holds the same Q
        floats = base(storage)
        for name, m in linear4bit_modules(floats).items():
            assert m.weight.dtype == storage and torch.equal(dequantized_weight(m), q_packed[name])

    model = PeftModel.from_pretrained(floats, two / "adapters" / "closed_form", is_trainable=True)
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert before and all("lora_" in n for n in before)
    ids = AutoTokenizer.from_pretrained(tiny_model_dir)(text_file.read_text()[:4000])["input_ids"]
    data = [{"input_ids": torch.tensor(ids[i:i + 32]), "labels": torch.tensor(ids[i:i + 32])}
            for i in range(0, 8 * 32, 32)]
    args = TrainingArguments(output_dir=str(tmp_path), max_steps=2, per_device_train_batch_size=2, learning_rate=1e-3,
                             use_cpu=True, report_to=[], logging_steps=1, save_strategy="no", disable_tqdm=True)
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()
    losses = [h["loss"] for h in trainer.state.log_history if "loss" in h]
    assert len(losses) == 2 and all(math.isfinite(loss) for loss in losses)
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)
