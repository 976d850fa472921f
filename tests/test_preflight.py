"""The checks made from config.json alone, before any weight is read: a rank too large for the layers is
refused as such (naming the rank and the layer's limit), before the memory estimate could turn it into
'needs 500 GiB'."""
import pytest
import torch
from helpers import huge_model
from transformers import AutoConfig

from quailora_app.config import DataConfig, InitConfig, LoraSettings, TrainConfig
from quailora_app.engine.preflight import preflight_init, preflight_train
from quailora_app.errors import ConfigError, ModelError


@pytest.fixture(scope="module")
def huge_config(tmp_path_factory):
    return AutoConfig.from_pretrained(huge_model(tmp_path_factory.mktemp("m") / "huge"))


def test_rank_beyond_the_layers_is_named_before_memory(huge_config, monkeypatch):
    monkeypatch.setenv("QUAILORA_MEMORY_LIMIT_GIB", "16")  # the memory check alone would refuse this model too
    cfg = InitConfig(lora=LoraSettings(rank=100_000))
    with pytest.raises(ConfigError,
                       match=r"rank 100000 is larger than layer \w+_proj .* allows \(min\(out, in\) = 8192\)"):
        preflight_init("huge", huge_config, cfg, torch.device("cpu"))
    train = TrainConfig(lora=LoraSettings(rank=100_000), data=DataConfig(seq_len=128, calib_samples=8, eval_tokens=256))
    with pytest.raises(ConfigError, match="rank 100000 is larger than"):
        preflight_train("huge", huge_config, train, torch.device("cpu"))


def test_rank_limit_follows_the_targets(huge_config, monkeypatch):
    """q_proj is 8192 x 8192: rank 4096 fits it, while k_proj (1024 x 8192) would refuse it."""
    monkeypatch.setenv("QUAILORA_MEMORY_LIMIT_GIB", "16")
    only_q = InitConfig(lora=LoraSettings(rank=4096, targets=("q_proj",)))
    with pytest.raises(ModelError, match="needs about"):  # past the rank check: now the memory refuses
        preflight_init("huge", huge_config, only_q, torch.device("cpu"))
    with pytest.raises(ConfigError, match="k_proj"):
        preflight_init("huge", huge_config, InitConfig(lora=LoraSettings(rank=4096)), torch.device("cpu"))
