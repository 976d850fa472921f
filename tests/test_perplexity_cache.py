"""The perplexity cache (evaluation/perplexity_cache.py): a hit is exactly the number a fresh measurement gives and says
so in the report and the events; a changed key misses; a damaged entry is ignored and measured again."""
import json
import os
import shutil

import pytest
import torch

from quailora_app.config import DataConfig, InitConfig, LoraSettings, ModelConfig, QuantConfig
from quailora_app.engine.evaluation import perplexity_cache as pc
from quailora_app.events import Metric, RunFinished, Stage
from quailora_app.flows.init import run_init

CACHED = ("qlora", "int8", "full")


def tiny_cfg(model_dir, text_file, out, eval_tokens=512) -> InitConfig:
    return InitConfig(ModelConfig(str(model_dir)), DataConfig(str(text_file), seq_len=32, calib_samples=4,
                                                              eval_tokens=eval_tokens),
                      lora=LoraSettings(rank=4), methods=("svd",), out=str(out))


def init_run(cfg) -> tuple[dict, list]:
    events = list(run_init(cfg))
    assert isinstance(events[-1], RunFinished), events[-1]
    return events[-1].report, events


@pytest.fixture(scope="module")
def runs(tiny_model_dir, text_file, tmp_path_factory):
    """A run with the cache off (fresh), one that fills an empty cache, and one that reads it."""
    cache = tmp_path_factory.mktemp("ppl-cache")
    mp = pytest.MonkeyPatch()
    out = {}
    try:
        mp.setenv(pc.CACHE_ENV, "off")
        out["fresh"] = init_run(tiny_cfg(tiny_model_dir, text_file, tmp_path_factory.mktemp("fresh")))
        mp.setenv(pc.CACHE_ENV, str(cache))
        out["fill"] = init_run(tiny_cfg(tiny_model_dir, text_file, tmp_path_factory.mktemp("fill")))
        out["hit"] = init_run(tiny_cfg(tiny_model_dir, text_file, tmp_path_factory.mktemp("hit")))
    finally:
        mp.undo()
    return cache, out


def test_a_hit_is_exactly_the_fresh_measurement(runs):
    cache, out = runs
    fresh, _ = out["fresh"]
    filled, _ = out["fill"]
    hit, events = out["hit"]
    assert len(list(cache.glob("*.json"))) == 3
    for name in CACHED:
        assert filled["perplexity"][name] == fresh["perplexity"][name]  # bit for bit, not approximately
        assert hit["perplexity"][name] == fresh["perplexity"][name]
    assert hit["perplexity"]["svd"] == fresh["perplexity"]["svd"]  # a method is always measured
    assert "perplexity_cached" not in fresh and "perplexity_cached" not in filled
    assert set(hit["perplexity_cached"]) == set(CACHED)
    assert all(entry["seconds"] > 0 and entry["measured_at"] for entry in hit["perplexity_cached"].values())
    notes = {e.name: e.note for e in events if isinstance(e, Metric)}
    assert all(notes[name].endswith("(cached)") for name in CACHED) and "cached" not in notes["svd"]
    baselines = [e.message for e in events if isinstance(e, Stage) and e.stage == "baseline"]
    assert len(baselines) == 2 and all("read from the cache" in m for m in baselines)
    assert hit["gap_closed"]["svd"] == fresh["gap_closed"]["svd"]


def test_other_held_out_tokens_miss(runs, tiny_model_dir, text_file, tmp_path, monkeypatch):
    cache, out = runs
    monkeypatch.setenv(pc.CACHE_ENV, str(shutil.copytree(cache, tmp_path / "cache")))
    report, events = init_run(tiny_cfg(tiny_model_dir, text_file, tmp_path / "run", eval_tokens=256))
    assert "perplexity_cached" not in report
    assert not any(isinstance(e, Metric) and "cached" in e.note for e in events)
    assert report["perplexity"]["full"] != out["fresh"][0]["perplexity"]["full"]


def test_a_damaged_entry_is_ignored_and_measured_again(runs, tiny_model_dir, text_file, tmp_path, monkeypatch):
    cache, out = runs
    copy = tmp_path / "cache"
    shutil.copytree(cache, copy)
    monkeypatch.setenv(pc.CACHE_ENV, str(copy))
    (int8,) = copy.glob("int8-*.json")
    int8.write_text('{"key": {"version": 1}, "perplex')  # torn write
    (full,) = copy.glob("full-*.json")
    entry = json.loads(full.read_text())
    full.write_text(json.dumps({**entry, "key": {**entry["key"], "batch": 99}}))  # another key under this name
    report, _ = init_run(tiny_cfg(tiny_model_dir, text_file, tmp_path / "run"))
    assert set(report["perplexity_cached"]) == {"qlora"}
    for name in CACHED:
        assert report["perplexity"][name] == out["fresh"][0]["perplexity"][name]
    assert json.loads(int8.read_text())["perplexity"] == out["fresh"][0]["perplexity"]["int8"]  # written again


@pytest.fixture
def key_parts(tiny_model_dir):
    return dict(folder=tiny_model_dir, eval_ids=torch.arange(64).reshape(2, 32), batch_size=4,
                device=torch.device("cpu"))


def test_the_key_holds_what_moves_the_number(key_parts, tmp_path, monkeypatch):
    monkeypatch.setenv(pc.CACHE_ENV, str(tmp_path / "cache"))
    variant = pc.four_bit_variant(QuantConfig(), torch.float32)
    key = pc.perplexity_key(variant, **key_parts)
    assert pc.write_cached(key, 12.25, 1.5) is not None
    assert pc.read_cached(key).perplexity == 12.25
    assert pc.read_cached(pc.perplexity_key(variant, **key_parts)).perplexity == 12.25  # the same key again
    others = [
        pc.perplexity_key(pc.four_bit_variant(QuantConfig(), torch.bfloat16), **key_parts),  # compute dtype
        pc.perplexity_key(pc.four_bit_variant(QuantConfig(quant="fp4"), torch.float32), **key_parts),
        pc.perplexity_key(pc.four_bit_variant(QuantConfig(block_size=128), torch.float32), **key_parts),
        pc.perplexity_key(variant, **{**key_parts, "eval_ids": torch.arange(64).reshape(2, 32).flip(1)}),
        pc.perplexity_key(variant, **{**key_parts, "eval_ids": torch.arange(96).reshape(3, 32)}),  # eval tokens
        pc.perplexity_key(variant, **{**key_parts, "batch_size": 2}),
        pc.perplexity_key(pc.full_variant(), **key_parts),
        pc.perplexity_key(pc.int8_variant(torch.float32), **key_parts),
        {**key, "libraries": {**key["libraries"], "bitsandbytes": "0.0.1"}},
        {**key, "version": key["version"] + 1},
    ]
    assert all(pc.read_cached(other) is None for other in others)


def test_changed_weights_miss(key_parts, tmp_path, monkeypatch):
    monkeypatch.setenv(pc.CACHE_ENV, str(tmp_path / "cache"))
    model = shutil.copytree(key_parts["folder"], tmp_path / "model")
    parts = {**key_parts, "folder": model}
    key = pc.perplexity_key(pc.full_variant(), **parts)
    pc.write_cached(key, 30.0, 1.0)
    (weights,) = model.glob("*.safetensors")
    stat = weights.stat()
    os.utime(weights, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))  # rewritten in place
    assert pc.read_cached(pc.perplexity_key(pc.full_variant(), **parts)) is None


def test_bad_values_and_the_off_switch(key_parts, tmp_path, monkeypatch):
    monkeypatch.setenv(pc.CACHE_ENV, str(tmp_path / "cache"))
    key = pc.perplexity_key(pc.full_variant(), **key_parts)
    assert pc.write_cached(key, float("inf"), 1.0) is None and pc.read_cached(key) is None
    path = pc.write_cached(key, 5.0, 1.0)
    for value in ("NaN", "0.5", '"12"', "null"):
        path.write_text(json.dumps(json.loads(path.read_text()) | {"perplexity": None}).replace("null", value))
        assert pc.read_cached(key) is None, value
    path.write_text("[1, 2]")
    assert pc.read_cached(key) is None
    monkeypatch.setenv(pc.CACHE_ENV, "off")
    assert pc.cache_folder() is None and pc.write_cached(key, 5.0, 1.0) is None and pc.read_cached(key) is None
