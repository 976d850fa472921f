"""The web form's settings as typed configs: every value the browser sends is checked here and turned into
InitConfig / TrainConfig / ViewsConfig, or refused with one line (UserError). Values come by setting name (the
config's field names, `quailora_app.settings`), so no two places keep an order in step; each is read as its
field's type. Uploads and typed paths go through app/uploads.py first. No gradio here: the handlers are plain
functions, fuzzed by tests/test_fuzz_handlers.py."""
from __future__ import annotations

import functools
import math
import os
import uuid
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd

from quailora_app.app import uploads as paths
from quailora_app.config import (
    ALL_LINEAR,
    DataConfig,
    InitConfig,
    LoraSettings,
    ModelConfig,
    QuantConfig,
    TrainConfig,
    ViewsConfig,
)
from quailora_app.engine.arms import ARM_SPECS
from quailora_app.engine.methods.registry import BASELINE, all_methods
from quailora_app.errors import UserError, one_line
from quailora_app.flows.from_init import conflicts, read_init_run, train_config_from_init
from quailora_app.settings import Setting, build, settings
from quailora_app.sources.data import PREFERRED_TEXT_COLUMNS, describe_dataset, format_of

#: How the form names a setting in its one-line refusals (default: the name with spaces).
LABELS = {"quant": "4-bit data type", "block_size": "block / group size", "bits": "bits per weight",
          "text_column": "text column", "targets": "target modules",
          "calib_samples": "calibration sequences", "seq_len": "tokens per sequence", "eval_tokens": "held-out tokens",
          "als_rounds": "ALS rounds", "warmup_ratio": "warm-up share", "batch_size": "batch",
          "grad_accum": "gradient accumulation"}
#: Settings whose empty box means their default.
BLANK_IS_DEFAULT = ("seed",)
#: The views form's own names for settings the Setup also has.
VIEWS_NAMES = {"views_rank": "rank", "views_calib_samples": "calib_samples", "views_seq_len": "seq_len"}


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


def form_value(s: Setting, value: Any) -> Any:
    """One browser value as setting `s` takes it (its field's type), or a UserError naming the field. Empty
    text is the setting's default; a value with fixed choices must be one of them."""
    name = LABELS.get(s.name, s.name.replace("_", " "))
    if s.many:
        return tuple(_choices(value, name))
    if s.kind is bool:
        return bool(value)
    if s.kind is str:
        choices = s.choices()
        if choices is not None:
            if not isinstance(value, str) or value not in choices:
                raise UserError(f"{name} must be {' or '.join(choices)}, got {_shown(value)}")
            return value
        return text_setting(value, name) or s.default
    if value is None and s.name in BLANK_IS_DEFAULT:
        return s.default
    return _num(value, name, s.kind)


def form_values(cls: type, values: Mapping[str, Any]) -> dict[str, Any]:
    """The form's values for config `cls`, each read as its setting's type (`dataset` is the stored upload when
    there is one); a name that is not a setting of `cls` is refused."""
    known = settings(cls)
    values = dict(values)
    upload = values.pop("upload", None)
    if upload:
        values["dataset"] = str(getattr(upload, "name", None) or upload)
    unknown = sorted(set(values) - set(known))
    if unknown:
        raise UserError(f"unknown setting(s) {', '.join(map(str, unknown))}")
    typed = {name: form_value(known[name], value) for name, value in values.items()}
    if ALL_LINEAR in typed.get("targets", ()):
        typed["targets"] = (ALL_LINEAR,)
    return typed


@one_line_errors
def make_init_config(values: Mapping[str, Any]) -> InitConfig:
    """The Setup and step 2 fields by setting name -> InitConfig."""
    return build(InitConfig, form_values(InitConfig, values))


@one_line_errors
def make_train_config(values: Mapping[str, Any]) -> TrainConfig:
    """The Setup and step 3 fields by setting name -> TrainConfig."""
    return build(TrainConfig, form_values(TrainConfig, values))


#: the step 3 settings a fine-tuning run that starts from an init run takes from the form; the model, data cut,
#: quantization, LoRA shape and held-out tokens are the init run's (flows/from_init.py)
TRAINING_ONLY = ("arms", "steps", "learning_rate", "batch_size", "grad_accum", "eval_every", "warmup_ratio")


@one_line_errors
def make_train_config_from_init(values: Mapping[str, Any], init_run: str | os.PathLike | None
                                ) -> tuple[TrainConfig, str]:
    """(TrainConfig, one line saying what it starts from) for the Setup and step 3 fields by setting name.

    With `init_run` (the session's latest finished init run) and a Setup that still shows that run's model, data
    cut, quantization and LoRA shape: a run that starts from it (`train --from-init`: its 4-bit model, its
    held-out perplexities and saved initializations, no second calibration), with step 3's training settings.
    Otherwise the Setup's own settings, and the line says why (no init run yet, or which setting changed)."""
    typed = form_values(TrainConfig, values)
    if init_run is None:
        return build(TrainConfig, typed), ("no finished init run in this session yet: each 4-bit arm computes its "
                                           "initialization on the fine-tuning run's calibration text first")
    source = read_init_run(init_run)
    changed = conflicts(typed, source)
    if changed:
        return build(TrainConfig, typed), (f"the Setup no longer matches init run {source.name} ({changed[0]}): "
                                           "the arms compute their initializations anew with the Setup's settings")
    config = train_config_from_init(source, **{k: typed[k] for k in TRAINING_ONLY if k in typed})
    return config, (f"starts from init run {source.name}: its 4-bit model, held-out perplexities and saved "
                    "initializations (no second calibration)")


def peek_columns(path: str) -> tuple[list[str], str | None]:
    """(text-like columns, best guess) of an uploaded table; ([], None) for plain text. A .gz/.bz2/.xz file is
    read by its inner format (pandas decompresses by the name)."""
    suffix = format_of(path)[1]
    if suffix == ".txt":
        return [], None
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # only for a parquet upload

        pf = pq.ParquetFile(path)
        empty = pd.DataFrame(columns=pf.schema_arrow.names)
        frame = next(pf.iter_batches(batch_size=200)).to_pandas() if pf.metadata.num_rows else empty
    elif suffix in (".jsonl", ".json"):
        frame = pd.read_json(path, lines=suffix == ".jsonl", nrows=200 if suffix == ".jsonl" else None)
    else:
        frame = pd.read_csv(path, nrows=200, sep="\t" if suffix == ".tsv" else ",")
    texts = [c for c in frame.columns if frame[c].dtype == object or str(frame[c].dtype).startswith(("string", "str"))]
    all_text = [str(c) for c in texts if frame[c].dropna().map(lambda v: isinstance(v, str)).all()]
    texts = all_text or [str(c) for c in texts]
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
def make_views_config(values: Mapping[str, Any], ranks: Sequence[int], reports: Sequence[str] = ()) -> ViewsConfig:
    """The Setup's model, text and 4-bit fields and the views' own (layer, views_rank, views_calib_samples,
    views_seq_len, als_rounds, damping) by name -> ViewsConfig; `ranks` of the rank sweep and init run folders
    (`reports`) for the precision trade-off come from the app."""
    values = {VIEWS_NAMES.get(k, k): v for k, v in values.items()}
    layer = text_setting(values.pop("layer", None), "layer") or None
    rank = _num(values.pop("rank", LoraSettings.rank), "rank of the views")
    if rank < 1:
        raise UserError("the views' rank must be at least 1")
    typed = form_values(InitConfig, values)
    own = {name: typed[name] for name in ("damping", "als_rounds") if name in typed}
    quant = build(QuantConfig, typed)
    if quant.quantizer != "bitsandbytes":
        raise UserError("the teaching views look inside bitsandbytes' 4-bit blocks (their 16 levels and absmax): set "
                        "the Setup's quantizer to bitsandbytes for them; the Across bits tab compares HQQ's bit widths")
    return ViewsConfig(model=build(ModelConfig, typed), data=build(DataConfig, typed), quant=quant,
                       lora=LoraSettings(rank=rank), layer=layer, ranks=tuple(ranks), reports=tuple(reports), **own)


def session_owner(session: dict | None) -> tuple[dict, str]:
    """(the session dict, its owner key): a fresh random key when the browser has none yet."""
    session = dict(session) if isinstance(session, dict) else {}
    if not session.get("owner") or not isinstance(session["owner"], str):
        session["owner"] = uuid.uuid4().hex
    return session, session["owner"]


def method_choices() -> list[tuple[str, str]]:
    """(label, name) of every registered method for the form's checkboxes (engine/methods/registry.py), read when the
    form is built."""
    return [(m.short + (" (baseline, always on)" if m.kind == BASELINE else ""), m.name) for m in all_methods()
            if m.kind != "requant"]  # LoftQ re-quantizes the base: the across-bits run and the API offer it


def method_info() -> str:
    """One line under the method checkboxes: what each correcting method does."""
    return "; ".join(f"{m.name.replace('_', ' ')}: {m.help}" for m in all_methods() if m.kind != BASELINE)


def arm_choices() -> list[tuple[str, str]]:
    """(label, name) of every registered fine-tuning arm (engine/arms.py), read when the form is built."""
    return [(spec.short, name) for name, spec in ARM_SPECS.items()]
