"""The web form's settings as typed configs: every value the browser sends is checked here and turned into
InitConfig / TrainConfig / ViewsConfig, or refused with one line (UserError). Uploads and typed paths go through
app/uploads.py first. No gradio here: the handlers are plain functions, fuzzed by tests/test_fuzz_handlers.py."""
from __future__ import annotations

import functools
import math
import os
import uuid
from typing import Any

import pandas as pd

from quailora_app.config import ALL_LINEAR, DataConfig, InitConfig, LoraSettings, ModelConfig, QuantConfig
from quailora_app.errors import UserError
from quailora_app.app.jobs import ViewsConfig
from quailora_app.app import uploads as paths
from quailora_app.sources.data import PREFERRED_TEXT_COLUMNS, describe_dataset, format_of

def one_line(text: Any, limit: int = 300) -> str:
    text = " ".join(str(text).split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _shown(value: Any) -> str:
    return one_line(repr(value), 60)


def one_line_errors(fn):
    """Settings handlers raise only UserError, in one line: a ValueError/TypeError/OverflowError from a
    config check becomes one, and a multi-line message is folded."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        try:
            return fn(*args, **kwargs)
        except UserError as exc:
            if "\n" in str(exc) or len(str(exc)) > 300:
                raise type(exc)(one_line(exc)) from None
            raise
        except (ValueError, TypeError, OverflowError) as exc:
            raise UserError(one_line(exc) or f"invalid setting ({type(exc).__name__})") from None

    return wrapped


def text_setting(value: Any, name: str) -> str:
    """A text field: None -> "", a string stripped, anything else a UserError."""
    if value is None:
        return ""
    if not isinstance(value, str):
        raise UserError(f"{name} must be text, got {_shown(value)}")
    if "\x00" in value:
        raise UserError(f"{name} must not contain NUL characters")
    return value.strip()


def _choices(value: Any, name: str) -> list[str]:
    """A multi-choice field: a list of names (a single name is a list of one)."""
    if value is None:
        return []
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        raise UserError(f"{name} must be a list of names, got {_shown(value)}")
    return [v.strip() for v in value if v and v.strip()]


def _dataset_name(dataset: str | None, upload: Any) -> str:
    if upload:
        return str(getattr(upload, "name", None) or upload)
    return text_setting(dataset, "dataset") or "embedded"


def _num(value, name: str, kind=int):
    """A finite number from a form field, or a UserError naming the field."""
    try:
        number = float(value)
    except (TypeError, ValueError, OverflowError):
        raise UserError(f"{name} must be a number, got {_shown(value)}") from None
    if not math.isfinite(number):
        raise UserError(f"{name} must be a finite number, got {_shown(value)}")
    if kind is int:
        if number != int(number):
            raise UserError(f"{name} must be a whole number, got {_shown(value)}")
        return int(number)
    return number


def _common_configs(model, dataset, upload, text_column, quant, double_quant, block_size, rank, alpha, rslora,
                    targets, calib_samples, seq_len, eval_tokens, seed):
    targets = _choices(targets, "target modules") or [ALL_LINEAR]
    if ALL_LINEAR in targets:
        targets = [ALL_LINEAR]
    if not isinstance(quant, str):
        raise UserError(f"4-bit data type must be nf4 or fp4, got {_shown(quant)}")
    return (
        ModelConfig(text_setting(model, "model") or "embedded"),
        DataConfig(_dataset_name(dataset, upload), text_setting(text_column, "text column") or None,
                   _num(seq_len, "tokens per sequence"),
                   _num(calib_samples, "calibration sequences"), _num(eval_tokens, "held-out tokens"),
                   _num(seed or 0, "seed")),
        QuantConfig(quant, bool(double_quant), _num(block_size, "block size")),
        LoraSettings(_num(rank, "rank"), _num(alpha, "alpha", float), bool(rslora), tuple(targets)),
    )


@one_line_errors
def make_init_config(model, dataset, upload, text_column, quant, double_quant, block_size, rank, alpha, rslora,
                     targets, calib_samples, seq_len, eval_tokens, seed, methods, baselines, als_rounds,
                     damping) -> InitConfig:
    m, d, q, lora = _common_configs(model, dataset, upload, text_column, quant, double_quant, block_size, rank,
                                    alpha, rslora, targets, calib_samples, seq_len, eval_tokens, seed)
    return InitConfig(m, d, q, lora, tuple(_choices(methods, "methods") or ("qlora",)), _num(als_rounds, "ALS rounds"),
                      _num(damping, "damping", float), baselines=bool(baselines))


@one_line_errors
def make_train_config(model, dataset, upload, text_column, quant, double_quant, block_size, rank, alpha, rslora,
                      targets, calib_samples, seq_len, eval_tokens, seed, als_rounds, damping, arms, steps,
                      learning_rate, batch_size, grad_accum, eval_every, warmup_ratio):
    try:
        from quailora_app.config import TrainConfig
    except ImportError:
        raise UserError("fine-tuning is not available in this build yet (quailora_app.train has not landed)") from None
    m, d, q, lora = _common_configs(model, dataset, upload, text_column, quant, double_quant, block_size, rank,
                                    alpha, rslora, targets, calib_samples, seq_len, eval_tokens, seed)
    arms = _choices(arms, "arms")
    if not arms:
        raise UserError("choose at least one arm to fine-tune")
    return TrainConfig(model=m, data=d, quant=q, lora=lora, arms=tuple(arms), steps=_num(steps, "steps"),
                       learning_rate=_num(learning_rate, "learning rate", float),
                       warmup_ratio=_num(warmup_ratio, "warm-up share", float),
                       batch_size=_num(batch_size, "batch"), grad_accum=_num(grad_accum, "gradient accumulation"),
                       eval_every=_num(eval_every, "evaluate every"), damping=_num(damping, "damping", float),
                       als_rounds=_num(als_rounds, "ALS rounds"))


def peek_columns(path: str) -> tuple[list[str], str | None]:
    """(text-like columns, best guess) of an uploaded table; ([], None) for plain text. A .gz/.bz2/.xz file is
    read by its inner format (pandas decompresses by the name)."""
    suffix = format_of(path)[1]
    if suffix == ".txt":
        return [], None
    if suffix == ".parquet":
        import pyarrow.parquet as pq

        pf = pq.ParquetFile(path)
        frame = next(pf.iter_batches(batch_size=200)).to_pandas() if pf.metadata.num_rows else pd.DataFrame(columns=pf.schema_arrow.names)
    elif suffix in (".jsonl", ".json"):
        frame = pd.read_json(path, lines=suffix == ".jsonl", nrows=200 if suffix == ".jsonl" else None)
    else:
        frame = pd.read_csv(path, nrows=200, sep="\t" if suffix == ".tsv" else ",")
    texts = [c for c in frame.columns if frame[c].dtype == object or str(frame[c].dtype).startswith(("string", "str"))]
    texts = [str(c) for c in texts if frame[c].dropna().map(lambda v: isinstance(v, str)).all()] or [str(c) for c in texts]
    if not texts:
        return [str(c) for c in frame.columns], None
    guess = next((c for p in PREFERRED_TEXT_COLUMNS for c in texts if c.lower() == p), None)
    if guess is None:
        guess = max(texts, key=lambda c: frame[c].dropna().astype(str).str.len().mean() or 0)
    return texts, guess


def inspect_upload(path: Any) -> tuple[list[str], str | None, str]:
    """(text columns, best guess, one line) for an uploaded file; a UserError (one line) for a file of the wrong
    type, empty, too large, or unreadable."""
    if not isinstance(path, (str, os.PathLike)):
        raise UserError(f"the upload must be a file, got {_shown(path)}")
    src = paths.check_upload(path)
    try:
        cols, guess = peek_columns(str(src))
    except Exception as exc:  # noqa: BLE001 - any reader error on a stranger's file is a one-line answer
        raise UserError(f"could not read the file's columns: {type(exc).__name__}: {one_line(exc, 200)}") from None
    info = describe_dataset(str(src))
    if not cols:
        info += " · plain text: blank lines separate documents"
    return cols, guess, one_line(info)


def describe_source(name: Any, owner: str | None = None) -> str:
    """The dataset box's one-line description, after the path policy (a refused path is described as such)."""
    try:
        checked = paths.check_user_path(text_setting(name, "dataset"), "dataset", owner)
    except UserError as exc:
        return str(exc)
    return one_line(describe_dataset(checked))


def vetted_sources(model: Any, dataset: Any, upload: Any, owner: str, upload_sources=()) -> tuple[str, str, str | None]:
    """(model, dataset, stored upload) as the engine may read them: an upload is checked and copied into the
    session's folder, typed paths must lie in the allowed folders (`app.uploads`)."""
    stored = None
    if upload:
        if not isinstance(upload, (str, os.PathLike)):
            upload = getattr(upload, "name", None) or getattr(upload, "path", None)
            if not isinstance(upload, (str, os.PathLike)):
                raise UserError("the upload must be a file; upload it again")
        stored = str(paths.store_upload(upload, owner, sources=upload_sources))
        dataset_name = stored
    else:
        dataset_name = paths.check_user_path(text_setting(dataset, "dataset"), "dataset", owner)
    return paths.check_user_path(text_setting(model, "model"), "model", owner), dataset_name, stored


@one_line_errors
def make_views_config(model, dataset, upload, text_column, quant, double_quant, block_size, eval_tokens, seed,
                      als_rounds, damping, layer, rank, calib_samples, seq_len, ranks, reports=()) -> ViewsConfig:
    m, d, q, _ = _common_configs(model, dataset, upload, text_column, quant, double_quant, block_size, 16, 16, False,
                                 None, calib_samples, seq_len, eval_tokens, seed)
    rank = _num(rank, "rank of the views")
    if rank < 1:
        raise UserError("the views' rank must be at least 1")
    return ViewsConfig(m, d, q, (layer or "").strip() or None, rank, tuple(ranks), tuple(reports),
                       _num(damping, "damping", float), _num(als_rounds, "ALS rounds"))


def session_owner(session: dict | None) -> tuple[dict, str]:
    """(the session dict, its owner key): a fresh random key when the browser has none yet."""
    session = dict(session) if isinstance(session, dict) else {}
    if not session.get("owner") or not isinstance(session["owner"], str):
        session["owner"] = uuid.uuid4().hex
    return session, session["owner"]
