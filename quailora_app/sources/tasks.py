"""Downstream tasks as multiple-choice items, scored (evaluation/accuracy.py) the way lm-evaluation-harness scores
its multiple-choice tasks: the log-likelihood of each answer after the prompt, no generation.

Two kinds, so every dataset has an accuracy:

- "labels": few-shot classification of labelled text. The embedded Rotten Tomatoes reviews with their
  fresh / rotten verdict (as the words positive / negative) by default, the embedded convention speeches with the
  speaker's party, or any local .csv / .tsv / .jsonl / .json / .parquet file with a text column and a label
  column (label words given as label=word, or the labels as written). The few-shot examples come from the
  run's calibration / training documents where the file is the run's dataset, the items only from documents the
  run held out.
- "continuation": from any text, the true continuation of a held-out passage against continuations of other
  held-out documents (HellaSwag-like), scored per character (lm-eval's acc_norm).

Everything is seeded; the same inputs give the same items. Every failure is a one-line `DataError`.
"""
from __future__ import annotations

import random
from collections import Counter
from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from quailora_app.errors import DataError

# the text reader's helpers: labelled files are read with the same rules, checks and messages
from quailora_app.sources.data import (
    EMBEDDED_DATASETS,
    MAX_DATA_BYTES,
    TokenSplits,
    bos_id,
    choose_column,
    embedded_data_file,
    file_format,
    is_string_feature,
    pack_windows,
    quiet_datasets,
    read_utf8,
    short_reason,
)
from quailora_app.units import format_bytes

TASK_KINDS = ("labels", "continuation")

#: Column names tried, in order, when no label column is given.
PREFERRED_LABEL_COLUMNS = ("label", "labels", "category", "class", "sentiment", "party", "target", "polarity", "y")
#: The most distinct values a guessed or derived label column may have.
MAX_LABELS = 20
#: The fewest held-out items a task may have: below this an accuracy says nothing.
MIN_ITEMS = 20
#: Characters of a text kept in a prompt (cut at a word, marked "..."): few-shot examples, then items.
SHOT_CHARS = 400
ITEM_CHARS = 1000
#: Few-shot examples per label prompt. On 400 held-out reviews at full precision SmolLM2-135M scored 76.8 / 70.2 /
#: 68.0 / 65.0% at 0 / 1 / 2 / 4 shots and Gemma 3 270M 65.0 / 67.0 / 72.5 / 72.2% (majority 57%): 2 is the best
#: count for both together (bench/shots.py).
DEFAULT_SHOTS = 2


@dataclass(frozen=True)
class EmbeddedLabels:
    """How an embedded dataset reads as a labelled task."""

    label_column: str
    words: Mapping[str, str] | None  # label -> answer word; None: the labels as written
    text_header: str  # the prompt's "Review:" ...
    label_header: str  # ... and "Sentiment:"
    title: str


EMBEDDED_LABELS: dict[str, EmbeddedLabels] = {
    "embedded": EmbeddedLabels("category", {"fresh": "positive", "rotten": "negative"}, "Review", "Sentiment",
                               "sentiment of Rotten Tomatoes reviews"),
    "embedded:speeches": EmbeddedLabels("party", None, "Speech", "Party", "party of 2012 convention speakers"),
}


@dataclass(frozen=True)
class ChoiceItem:
    """One question: `context`, then one of `choices` (each follows the task's delimiter); `answer` is right."""

    context: str
    choices: tuple[str, ...]
    answer: int
    row: int  # the document's index in its source, to trace an item back
    prompt: int = 0  # which of the task's prefixes comes before the context


@dataclass(frozen=True)
class Task:
    """Multiple-choice items; item i reads prefixes[item.prompt] (its few-shot examples, "" when none), then
    its context, then the delimiter and a choice."""

    kind: str  # one of TASK_KINDS
    title: str  # what is asked, for reports: "sentiment of Rotten Tomatoes reviews (2-shot)"
    prefixes: tuple[str, ...]
    items: tuple[ChoiceItem, ...]
    #: pick the choice of highest log-likelihood per character (lm-eval's acc_norm) instead of the sum (acc)
    normalize: bool
    description: str  # one line: the source, counts, held-out rule and seed
    delimiter: str = " "  # between the context and a choice

    @property
    def metric(self) -> str:
        return "acc_norm" if self.normalize else "acc"

    @property
    def chance(self) -> float:
        """Expected accuracy of a uniform random guess."""
        return sum(1 / len(it.choices) for it in self.items) / len(self.items)

    @property
    def majority(self) -> float:
        """Accuracy of always giving the most frequent answer position (the majority label)."""
        return max(Counter(it.answer for it in self.items).values()) / len(self.items)


# ------------------------------------------------------------------------------------------ held-out documents


def split_documents(texts: Sequence[str], splits: TokenSplits, tokenizer: Any, *,
                    batch_docs: int = 512) -> dict[str, list[str]]:
    """The documents `make_splits(texts, tokenizer, seed=splits.seed, ...)` gave each split ("eval", "calib",
    "train"), and those it left "unused": the same seeded shuffle, walked with the split's document counts
    (documents that tokenize to nothing are skipped there, so here too)."""
    if not splits.docs:
        raise ValueError("these splits do not record their document counts (make_splits does)")
    docs = [t for t in texts if isinstance(t, str) and t.strip()]
    order = list(range(len(docs)))
    random.Random(splits.seed).shuffle(order)
    names = ("eval", "calib", "train")
    out: dict[str, list[str]] = {name: [] for name in (*names, "unused")}
    calib_ids: list[list[int]] = []
    stage = 0
    for start in range(0, len(order), batch_docs):
        batch = [docs[i] for i in order[start:start + batch_docs]]
        if stage == len(names):
            out["unused"].extend(batch)
            continue
        encoded = tokenizer(batch, add_special_tokens=False, verbose=False)["input_ids"]
        for text, ids in zip(batch, encoded, strict=True):
            while stage < len(names) and len(out[names[stage]]) >= splits.docs.get(names[stage], 0):
                stage += 1
            if stage == len(names) or not ids:
                out["unused"].append(text)
            else:
                out[names[stage]].append(text)
                if names[stage] == "calib":
                    calib_ids.append(list(ids))
    calib = pack_windows(calib_ids, tokenizer.eos_token_id, splits.seq_len, len(splits.calib), bos_id(tokenizer))
    if any(len(out[name]) != splits.docs.get(name, 0) for name in names) or not torch.equal(calib, splits.calib):
        raise ValueError("these texts (or this tokenizer) are not the ones the splits were cut from")
    return out


def reserved_documents(texts: Sequence[str], splits: TokenSplits, tokenizer: Any,
                       reserved: Collection[str] = ("calib", "train")) -> set[str]:
    """The documents of the `reserved` splits: what a task must not ask about. An init run reserves only
    ("calib",): it never reads its training split."""
    parts = split_documents(texts, splits, tokenizer)
    return {text for name in reserved for text in parts[name]}


def asked_about(task: Task, documents: Collection[str]) -> list[int]:
    """Indices of `task`'s items that ask about one of `documents` (a run's training documents, say): a
    continuation item whose context and true ending begin a document (words compared, whitespace normalized), a
    label item whose text is a document's (as the prompt shows it)."""
    if not documents:
        return []
    if task.kind == "continuation":
        starts = [" ".join(d.split()) + " " for d in documents]
        return [i for i, it in enumerate(task.items)
                if any(d.startswith(f"{it.context} {it.choices[it.answer]} ") for d in starts)]
    shown = {_prompt_text(d, ITEM_CHARS) for d in documents}
    return [i for i, it in enumerate(task.items)
            if it.context.split(": ", 1)[-1].rsplit("\n", 1)[0] in shown]


def subset_task(task: Task, keep: Sequence[int], why: str = "") -> Task:
    """`task` with only the items at indices `keep` (prompts unchanged); `why` the others were left out is added
    to its description."""
    kept = tuple(task.items[i] for i in keep)
    if len(kept) == len(task.items):
        return task
    note = f"; {len(task.items) - len(kept)} of its items left out" + (f" ({why})" if why else "")
    return replace(task, items=kept, description=task.description + note)


# ------------------------------------------------------------------------------------------ labelled text


@dataclass(frozen=True)
class LabelledText:
    """Rows of text with a label each (labels as strings), from one source."""

    texts: list[str]
    labels: list[str]
    text_column: str
    label_column: str
    source: str  # the file's name, for messages


def _label_string(value: Any) -> str | None:
    if value is None or isinstance(value, float) and value != value:
        return None
    text = " ".join(str(value).split())
    return text or None


def _choose_label_column(columns: list[str], distinct: Mapping[str, int], label_column: str | None,
                         source: str, all_columns: list[str]) -> str:
    """The given label column (checked), else a preferred name among `columns`, else the one column with
    2..MAX_LABELS values."""
    if label_column:
        if label_column not in all_columns:
            raise DataError(f"label column '{label_column}' not found in {source}; columns: {', '.join(all_columns)}")
        return label_column
    lowered = {c.lower(): c for c in columns}
    for name in PREFERRED_LABEL_COLUMNS:
        if name in lowered:
            return lowered[name]
    fits = [c for c in columns if 2 <= distinct[c] <= MAX_LABELS]
    if len(fits) == 1:
        return fits[0]
    if not fits:
        raise DataError(f"{source} has no label column (a column with 2 to {MAX_LABELS} distinct values); "
                        f"columns: {', '.join(columns) or '(none)'}")
    raise DataError(f"{source} has several columns that could be labels ({', '.join(fits)}): name the label column")


def load_labelled(dataset: str, text_column: str | None = None, label_column: str | None = None, *,
                  max_bytes: int = MAX_DATA_BYTES) -> LabelledText:
    """Text and label columns of an embedded dataset or a local .csv / .tsv / .jsonl / .json / .parquet file;
    rows with a blank text or label are dropped. Columns are guessed when not given (text as the text reader
    does, the label from PREFERRED_LABEL_COLUMNS or the only column of 2 to MAX_LABELS distinct values)."""
    name = (dataset or "").strip()
    if not name:
        raise DataError("no labelled dataset given")
    if name in EMBEDDED_DATASETS:
        path = embedded_data_file(name)
        text_column = text_column or EMBEDDED_DATASETS[name][1]
        label_column = label_column or EMBEDDED_LABELS[name].label_column
    else:
        path = Path(name).expanduser()
        if not path.is_file():
            raise DataError(f"labelled data must be an embedded dataset ({', '.join(EMBEDDED_LABELS)}) or a local "
                            f".csv, .tsv, .jsonl, .json or .parquet file; no such file: {name}")
    source = path.name
    fmt, compression = file_format(path)
    if fmt == "text":
        raise DataError(f"{source} is plain text: labelled data needs a table with a text and a label column "
                        f"(.csv, .tsv, .jsonl, .json or .parquet)")
    size = path.stat().st_size
    if size == 0:
        raise DataError(f"{source} is empty")
    if size > max_bytes:
        raise DataError(f"{source} is {format_bytes(size)}, larger than the {format_bytes(max_bytes)} limit")
    if fmt != "parquet":
        read_utf8(path, compression, max_bytes, keep=False)
    kwargs = {"delimiter": "\t"} if path.name.lower().removesuffix(compression or "").endswith(".tsv") else {}
    try:
        with quiet_datasets() as datasets:
            ds = datasets.load_dataset(fmt, data_files=str(path), split="train", **kwargs)
    except Exception as e:  # datasets / pyarrow / pandas raise many types; report one line
        if "corresponds to no data" in str(e):
            raise DataError(f"{source} is empty: no rows") from e
        raise DataError(f"cannot read {source} as {fmt.upper()}: {short_reason(e)}") from e
    if len(ds) == 0:
        raise DataError(f"{source} is empty: no rows")
    columns = list(ds.column_names)
    table = {c: ds.data.column(c).to_pylist() for c in columns}
    string_columns = [c for c in columns if is_string_feature(ds.features[c]) and c != label_column]

    def mean_length(col: str) -> float:
        values = [len(v) for v in table[col][:1000] if isinstance(v, str)]
        return sum(values) / len(values) if values else 0.0

    text_col = choose_column(columns, string_columns, mean_length, text_column, source)
    others = [c for c in columns if c != text_col]
    distinct = {c: len({_label_string(v) for v in table[c]} - {None}) for c in others}
    label_col = _choose_label_column(others, distinct, label_column, source, columns)
    if label_col == text_col:
        raise DataError(f"the label column and the text column of {source} are the same column ({label_col})")
    texts, labels = [], []
    for text, label in zip(table[text_col], table[label_col], strict=True):
        label = _label_string(label)
        if isinstance(text, str) and text.strip() and label is not None:
            texts.append(text.strip())
            labels.append(label)
    if not texts:
        raise DataError(f"{source} has no row with both a text ({text_col}) and a label ({label_col})")
    return LabelledText(texts, labels, text_col, label_col, source)


def parse_label_words(pairs: Iterable[str]) -> dict[str, str]:
    """("fresh=positive", "rotten=negative") -> {"fresh": "positive", "rotten": "negative"}."""
    words: dict[str, str] = {}
    for pair in pairs:
        label, sep, word = str(pair).partition("=")
        label, word = " ".join(label.split()), " ".join(word.split())
        if not sep or not label or not word:
            raise DataError(f"label words are written label=word (e.g. fresh=positive), not '{pair}'")
        if label in words:
            raise DataError(f"label '{label}' is given two words")
        words[label] = word
    if len(set(words.values())) < len(words):
        raise DataError("two labels are given the same word: the answers would be indistinguishable")
    return words


def _prompt_text(text: str, limit: int) -> str:
    """`text` on one line, cut at a word boundary to at most `limit` characters ('...' marks the cut)."""
    text = " ".join(text.split())
    if len(text) <= limit:
        return text
    cut = text[: limit - 3].rsplit(" ", 1)[0]
    return (cut or text[: limit - 3]) + "..."


def build_label_task(data: LabelledText, *, label_words: Mapping[str, str] | None = None,
                     shots: int = DEFAULT_SHOTS,
                     prompts: int = 8, max_items: int = 0, seed: int = 0, reserved: Collection[str] = (),
                     text_header: str = "Text", label_header: str | None = None, title: str | None = None) -> Task:
    """A `shots`-shot classification task: "{text_header}: <text>\\n{label_header}: <word>" per example, examples
    separated by a blank line, the item last without its word; the choices are the label words, in
    `label_words` order (sorted labels when derived). With `label_words`, rows of other labels are left out.

    Rows are shuffled (seed) and de-duplicated by text (a text given two labels is dropped). Items are only rows
    whose text is not in `reserved` (the run's calibration / training documents), `max_items` of them (0: all).
    A small model's answers swing with the examples it is shown, so (as lm-eval draws examples per item) the
    items are spread round-robin over `prompts` different few-shot prompts; each prompt takes its examples one
    label after another, from the reserved rows first, then from the others (which are then no items),
    preferring texts of at most SHOT_CHARS characters."""
    source = data.source
    if shots < 0 or prompts < 1:
        raise DataError(f"need shots >= 0 and prompts >= 1, got {shots} and {prompts}")
    reserved = set(reserved)
    seen: dict[str, tuple[int, str | None]] = {}  # text -> (first row, its label; None when given two)
    for i, (text, label) in enumerate(zip(data.texts, data.labels, strict=True)):
        first, known = seen.get(text, (i, label))
        seen[text] = (first, label if known == label else None)
    rows = [(i, text, label) for text, (i, label) in seen.items() if label is not None]
    counts = Counter(label for _, _, label in rows)
    if label_words:
        missing = [label for label in label_words if label not in counts]
        if missing:
            raise DataError(f"label(s) {', '.join(missing)} not found in column '{data.label_column}' of {source}; "
                            f"its labels: {', '.join(sorted(counts)[:MAX_LABELS])}")
        words = dict(label_words)
        rows = [r for r in rows if r[2] in words]
    else:
        if len(counts) > MAX_LABELS:
            raise DataError(f"column '{data.label_column}' of {source} has {len(counts):,} distinct values, more than "
                            f"{MAX_LABELS}: not a label column? name it, or give label words for the labels to use")
        words = {label: label for label in sorted(counts)}
    if len(words) < 2:
        only = next(iter(words), "(none)")
        raise DataError(f"column '{data.label_column}' of {source} has a single label ({only}): nothing to classify")
    prompts = prompts if shots else 1
    need = shots + MIN_ITEMS
    if len(rows) < need:
        raise DataError(f"too few examples: {source} has {len(rows):,} usable labelled rows; {shots} few-shot "
                        f"examples and at least {MIN_ITEMS} held-out items need {need}")
    rng = random.Random(seed)
    rng.shuffle(rows)
    train = [r for r in rows if r[1] in reserved]
    held = [r for r in rows if r[1] not in reserved]
    pool = train if len(train) >= shots * prompts else train + held[:max(len(held) - MIN_ITEMS, 0)]
    shot_sets = _pick_shots(pool, list(words), shots, prompts)
    taken = {r[0] for chosen in shot_sets for r in chosen}
    held = [r for r in held if r[0] not in taken]
    if len(held) < MIN_ITEMS:
        raise DataError(f"too few examples: {source} has {len(held):,} labelled rows that the run did not use for "
                        f"calibration or training; at least {MIN_ITEMS} are needed")
    items = held[:max_items] if max_items > 0 else held
    label_header = label_header or data.label_column.replace("_", " ").strip().capitalize()
    order = list(words)
    prefixes = []
    for chosen in shot_sets:
        rng.shuffle(chosen)
        prefixes.append("".join(f"{text_header}: {_prompt_text(text, SHOT_CHARS)}\n{label_header}: {words[label]}\n\n"
                                for _, text, label in chosen))
    choices = tuple(words[label] for label in order)
    task_items = tuple(ChoiceItem(f"{text_header}: {_prompt_text(text, ITEM_CHARS)}\n{label_header}:", choices,
                                  order.index(label), row, k % len(prefixes))
                       for k, (row, text, label) in enumerate(items))
    mapping = ", ".join(f"{label}={word}" for label, word in words.items())
    n_shots = len(shot_sets[0])
    from_train = sum(1 for chosen in shot_sets for r in chosen if r[1] in reserved)
    description = (f"{len(task_items):,} held-out rows of {source} ({data.text_column} -> {data.label_column}: "
                   f"{mapping}) over {len(prefixes)} different {n_shots}-shot prompts ({from_train} of their "
                   f"{n_shots * len(prefixes)} examples from the run's calibration/training documents), seed {seed}")
    return Task("labels", f"{title or 'label of ' + source} ({n_shots}-shot)", tuple(prefixes), task_items, False,
                description)


def _pick_shots(rows: list[tuple[int, str, str]], labels: list[str], shots: int,
                prompts: int) -> list[list[tuple[int, str, str]]]:
    """`prompts` lists of `shots` rows, each taking one label after another (so each label word appears when
    shots >= labels); rows of at most SHOT_CHARS characters first, in `rows` order, none used twice while
    rows last."""
    by_label: dict[str, list[tuple[int, str, str]]] = {label: [] for label in labels}
    for r in rows:
        by_label[r[2]].append(r)
    for label, found in by_label.items():  # short texts first, order kept otherwise
        by_label[label] = sorted(found, key=lambda r: len(r[1]) > SHOT_CHARS)
    cursor = dict.fromkeys(labels, 0)
    sets = []
    for _ in range(prompts):
        chosen: list[tuple[int, str, str]] = []
        while len(chosen) < shots:
            for label in labels:
                found = by_label[label]
                if len(chosen) < shots and found:
                    chosen.append(found[cursor[label] % len(found)])
                    cursor[label] += 1
        sets.append(chosen)
    return sets


def label_task(dataset: str = "embedded", *, text_column: str | None = None, label_column: str | None = None,
               label_words: Mapping[str, str] | Iterable[str] | None = None, shots: int = DEFAULT_SHOTS,
               prompts: int = 8,
               max_items: int = 0, seed: int = 0, reserved: Collection[str] = ()) -> Task:
    """load_labelled + build_label_task, with the embedded datasets' own words and headers when not given."""
    data = load_labelled(dataset, text_column, label_column)
    words = label_words if isinstance(label_words, Mapping) else parse_label_words(label_words or ())
    known = EMBEDDED_LABELS.get((dataset or "").strip())
    if known and not words and data.label_column == known.label_column:
        words = dict(known.words or {})
    headers = {"text_header": known.text_header, "label_header": known.label_header, "title": known.title} \
        if known else {}
    return build_label_task(data, label_words=words or None, shots=shots, prompts=prompts, max_items=max_items,
                            seed=seed, reserved=reserved, **headers)


# ------------------------------------------------------------------------------------------ continuation


def continuation_task(texts: Sequence[str], *, max_items: int = 0, choices: int = 4, seed: int = 0,
                      reserved: Collection[str] = (), continuation_words: int = 10, context_words: int = 32,
                      min_context_words: int = 10, source: str = "the text") -> Task:
    """Multiple choice from any text: a held-out document's first words (at most `context_words`, at least
    `min_context_words`) and the `continuation_words` that follow, against the continuations of `choices - 1`
    other held-out documents (cut the same way, so every choice is the same kind of text). Scored per character
    (acc_norm). Documents in `reserved` are never used; documents are de-duplicated and shuffled (seed)."""
    if choices < 2:
        raise DataError(f"a multiple-choice task needs at least 2 choices, got {choices}")
    if continuation_words < 1 or min_context_words < 1 or context_words < min_context_words:
        raise DataError("need continuation_words >= 1 and context_words >= min_context_words >= 1")
    need_words = min_context_words + continuation_words
    reserved = set(reserved)
    docs: list[tuple[int, list[str]]] = []
    seen: set[str] = set()
    for i, text in enumerate(texts):
        if not isinstance(text, str) or text in reserved or text in seen:
            continue
        seen.add(text)
        words = text.split()
        if len(words) >= need_words:
            docs.append((i, words))
    if len(docs) < max(MIN_ITEMS, choices):
        raise DataError(f"too few examples: {source} has {len(docs):,} held-out documents of at least {need_words} "
                        f"words; the continuation task needs {max(MIN_ITEMS, choices)}")
    rng = random.Random(seed)
    rng.shuffle(docs)
    docs = docs[:max_items] if max_items > 0 else docs
    cut = []
    for row, words in docs:
        start = min(context_words, len(words) - continuation_words)
        cut.append((row, " ".join(words[:start]), " ".join(words[start:start + continuation_words])))
    endings = [ending for _, _, ending in cut]
    items = []
    for k, (row, context, ending) in enumerate(cut):
        others: list[str] = []
        for _ in range(100 * choices):  # seeded draws among the other documents
            j = rng.randrange(len(cut))
            if j != k and endings[j] != ending and endings[j] not in others:
                others.append(endings[j])
                if len(others) == choices - 1:
                    break
        if len(others) < choices - 1:
            raise DataError(f"{source} has too few distinct held-out passages for {choices} choices")
        answer = rng.randrange(choices)
        items.append(ChoiceItem(context, tuple(others[:answer] + [ending] + others[answer:]), answer, row))
    description = (f"{len(items):,} held-out documents of {source}: the true next {continuation_words} words after "
                   f"up to {context_words} words, against {choices - 1} continuations of other documents; "
                   f"per-character log-likelihood (acc_norm), seed {seed}")
    return Task("continuation", f"continuation of {source} ({choices} choices)", ("",), tuple(items), True,
                description)
