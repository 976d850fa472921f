"""Downstream accuracy the way lm-evaluation-harness measures multiple choice: no generation, the log-likelihood
of each choice after the prompt, and the small-sample statistics to read it by.

For an item with context c and choices a_1..a_k (each after the task's delimiter, " "):

    ll_j = sum_t log p(a_j,t | prefix, c, a_j,<t)          (log-softmax of the logits, summed over a_j's tokens)
    acc      : the item is right when argmax_j ll_j is the answer
    acc_norm : argmax_j ll_j / len(a_j), len in characters of the choice without the delimiter (lm-eval's acc_norm;
               characters, not tokens, so the normalization does not depend on the tokenizer)

Tokens as lm-eval's `_encode_pair` on the whole prompt (few-shot prefix + context): trailing spaces of the context
move to the continuation, the pair is encoded whole and the continuation is what follows the context's own
tokens; no special tokens are added, except the BOS token first where the tokenizer adds one by default (as
lm-eval does for Gemma, whose perplexity without it is about 7 times higher; SmolLM2's tokenizer adds none).
The tokens a prompt's items share (the few-shot examples) run once and their keys and values are reused, so an
item costs only its own tokens; the numbers are those of scoring every sequence whole.

Statistics: a Wilson score interval for each accuracy (sound at small n and near 0 or 1), and for two models
scored on the same items the paired comparison (McNemar's exact test on the discordant items, and a Wald interval
for the difference of paired proportions), much sharper than comparing two intervals.
"""
from __future__ import annotations

import copy
import hashlib
import inspect
import json
import time
from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from quailora_app.config import AccuracyConfig, DataConfig
from quailora_app.engine.evaluation.statistics import wilson_interval
from quailora_app.errors import Cancelled, ConfigError, DataError, ModelError
from quailora_app.sources.data import EMBEDDED_DATASETS, TokenSplits, bos_id, load_texts
from quailora_app.sources.models import context_length
from quailora_app.sources.tasks import Task, continuation_task, label_task, reserved_documents

#: bumped whenever scoring changes what a model's picks are (the accuracy cache's entries then miss)
ACCURACY_VERSION = 1

# ------------------------------------------------------------------------------------------ scoring


@dataclass(frozen=True)
class TaskScore:
    """One model on one task: which choice it picked per item and whether that was right."""

    kind: str
    title: str
    metric: str  # "acc" or "acc_norm"
    predictions: tuple[int, ...]
    correct: tuple[bool, ...]
    chance: float
    majority: float
    seconds: float
    acc_raw: float  # the unnormalized acc as well, for a task scored by acc_norm (lm-eval reports both)

    @property
    def n(self) -> int:
        return len(self.correct)

    @property
    def hits(self) -> int:
        return sum(self.correct)

    @property
    def accuracy(self) -> float:
        return self.hits / self.n

    def interval(self, confidence: float = 0.95) -> tuple[float, float]:
        return wilson_interval(self.hits, self.n, confidence)

    def summary(self) -> str:
        lo, hi = self.interval()
        return (f"{self.title}: {100 * self.accuracy:.1f}% (95% CI {100 * lo:.1f}-{100 * hi:.1f}, n={self.n:,}; "
                f"chance {100 * self.chance:.0f}%, majority {100 * self.majority:.0f}%; {self.metric})")

    def as_dict(self) -> dict[str, Any]:
        lo, hi = self.interval()
        return {"kind": self.kind, "title": self.title, "metric": self.metric, "accuracy": self.accuracy,
                "interval": [lo, hi], "n": self.n, "hits": self.hits, "chance": self.chance,
                "majority": self.majority, "acc_raw": self.acc_raw, "seconds": self.seconds,
                "predictions": list(self.predictions)}


def encode_pairs(tokenizer: Any, pairs: Sequence[tuple[str, str]]) -> list[tuple[list[int], list[int]]]:
    """lm-eval's `_encode_pair` for each (context, continuation): (context tokens, continuation tokens), trailing
    spaces of the context moved to the continuation, the continuation being what encoding the whole adds after
    the context's own tokens. No special tokens."""
    moved = []
    for context, continuation in pairs:
        spaces = len(context) - len(context.rstrip())
        moved.append((context[:-spaces], context[-spaces:] + continuation) if spaces else (context, continuation))
    if not moved:
        return []
    ctx = tokenizer([c for c, _ in moved], add_special_tokens=False)["input_ids"]
    whole = tokenizer([c + x for c, x in moved], add_special_tokens=False)["input_ids"]
    return [(list(c), list(w[len(c):])) for c, w in zip(ctx, whole, strict=True)]


def _common_prefix(rows: Sequence[Sequence[int]]) -> int:
    """Length of the longest token prefix every row starts with."""
    first, k = rows[0], min(map(len, rows))
    for row in rows[1:]:
        k = next((t for t in range(k) if row[t] != first[t]), k)
    return k


def _accepts(model: Any, name: str) -> bool:
    """Whether the (peft-unwrapped) model's forward takes keyword `name`."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return name in inspect.signature(type(base).forward).parameters


@torch.no_grad()
def choice_loglikelihoods(model: Any, tokenizer: Any, task: Task, *, batch_tokens: int = 2048,
                          should_stop: Callable[[], bool] | None = None,
                          progress: Callable[[int, int], None] | None = None) -> list[list[float]]:
    """ll[i][j]: the summed log-probability of item i's choice j (after the delimiter) given its prompt prefix
    and context, tokens as lm-eval's `_encode_pair`.

    Computed in shared pieces, each exact: the token prefix common to a prompt's items (its few-shot examples)
    runs once and its keys and values are reused; the logits at a context's last token give every choice's
    first token; choices of more tokens continue from the context's cached keys and values, so such items run
    in batches of one context length. Rows are right-padded (a causal model's real tokens never see the padding
    after them), about `batch_tokens` tokens a forward pass. `progress(done, total)` after each batch;
    `should_stop()` -> Cancelled."""
    items = task.items
    if not items:
        raise DataError(f"task '{task.title}' has no items")
    if any(not item.context.strip() for item in items):
        raise DataError(f"task '{task.title}' has an item with an empty context")
    pairs = [(task.prefixes[item.prompt] + item.context, task.delimiter + c) for item in items for c in item.choices]
    encoded = iter(encode_pairs(tokenizer, pairs))
    bos = bos_id(tokenizer)
    ctxs: list[list[int]] = []
    conts: list[list[list[int]]] = []
    for item in items:
        per_choice = [next(encoded) for _ in item.choices]
        ctxs.append(([bos] if bos is not None else []) + per_choice[0][0])  # alike for every choice
        conts.append([cont for _, cont in per_choice])
        if not all(conts[-1]):
            raise DataError(f"a choice of task '{task.title}' encodes to no tokens")
    limit = context_length(getattr(model, "config", None))
    longest = max(len(ctx) + max(map(len, cs)) - 1 for ctx, cs in zip(ctxs, conts, strict=True))
    if limit and longest > limit:
        raise ConfigError(f"task '{task.title}' has prompts of {longest:,} tokens, more than the model's context "
                          f"of {limit:,}: use fewer shots")
    # per prompt, the tokens all its items start with (each item keeps >= 1 token of its own)
    heads: dict[int, list[int]] = {}
    for prompt in sorted({item.prompt for item in items}):
        own = [ctxs[i] for i, item in enumerate(items) if item.prompt == prompt]
        heads[prompt] = own[0][:max(0, min(_common_prefix(own), min(map(len, own)) - 1))]
    rest = [len(ctx) - len(heads[item.prompt]) for ctx, item in zip(ctxs, items, strict=True)]
    # items whose choices all are one token need one pass and may be padded; the others continue from their
    # contexts' keys and values, so a batch of them shares one context length
    group = [(item.prompt, rest[i] if any(len(c) > 1 for c in conts[i]) else -1) for i, item in enumerate(items)]
    order = sorted(range(len(items)), key=lambda i: (group[i], -rest[i]))
    batches: list[list[int]] = []
    tokens = 0
    for i in order:
        width = rest[batches[-1][0]] if batches else rest[i]  # the batch's longest row
        cost = width + sum(len(c) - 1 for c in conts[i])
        if not batches or group[i] != group[batches[-1][0]] or tokens + cost > batch_tokens:
            batches.append([])
            tokens, cost = 0, rest[i] + sum(len(c) - 1 for c in conts[i])
        batches[-1].append(i)
        tokens += cost

    was_training = model.training
    model.eval()
    device = next(p for p in model.parameters()).device
    keep_last = _accepts(model, "logits_to_keep")  # project only the positions read onto the vocabulary
    ll = [[0.0] * len(item.choices) for item in items]
    head_cache, head_of = None, None
    done = 0
    try:
        for batch in batches:
            prompt = items[batch[0]].prompt
            head = heads[prompt]
            if head and head_of != prompt:
                head_cache = _cache_of(model(input_ids=torch.tensor([head], device=device), use_cache=True))
                head_of = prompt
            lengths = [rest[i] for i in batch]
            ids = torch.zeros(len(batch), max(lengths), dtype=torch.long)
            for b, i in enumerate(batch):  # right-padded: a causal model's real tokens never see what follows
                ids[b, :lengths[b]] = torch.tensor(ctxs[i][len(head):])
            last = torch.tensor(lengths, device=device) - 1
            more = [(b, j) for b, i in enumerate(batch) for j, c in enumerate(conts[i]) if len(c) > 1]
            kwargs: dict[str, Any] = {"use_cache": bool(more)}
            if head:
                kwargs["cache"] = _repeated(head_cache, len(batch))
            if keep_last:
                kwargs["logits_to_keep"] = 1 if len(set(lengths)) == 1 else last[:, None]
            out = model(input_ids=ids.to(device), **kwargs)
            logits = out.logits[:, -1] if out.logits.shape[1] == 1 else out.logits[torch.arange(len(batch)), last]
            first = F.log_softmax(logits.float(), dim=-1)
            rows = [b for b, i in enumerate(batch) for _ in conts[i]]
            starts = [c[0] for i in batch for c in conts[i]]
            values = iter(first[torch.tensor(rows, device=device), torch.tensor(starts, device=device)].tolist())
            for i in batch:
                for j in range(len(conts[i])):
                    ll[i][j] += next(values)
            if more:  # the rest of longer choices, after the contexts' keys and values
                cache = _cache_of(out)
                cache.batch_select_indices(torch.tensor([b for b, _ in more], device=device))
                tails = [conts[batch[b]][j] for b, j in more]
                width = max(len(t) - 1 for t in tails)
                ids = torch.zeros(len(more), width, dtype=torch.long)
                targets = torch.zeros(len(more), width, dtype=torch.long)
                mask = torch.zeros(len(more), width)
                for r, t in enumerate(tails):
                    ids[r, :len(t) - 1] = torch.tensor(t[:-1])
                    targets[r, :len(t) - 1] = torch.tensor(t[1:])
                    mask[r, :len(t) - 1] = 1
                logp = F.log_softmax(model(input_ids=ids.to(device), cache=cache, use_cache=True).logits.float(), -1)
                picked = logp.gather(2, targets.to(device)[..., None])[..., 0] * mask.to(device)
                for (b, j), value in zip(more, picked.sum(1).tolist(), strict=True):
                    ll[batch[b]][j] += value
            done += len(batch)
            if progress is not None:
                progress(done, len(items))
            if should_stop is not None and should_stop():
                raise Cancelled(f"stopped by the user while scoring '{task.title}'")
    finally:
        model.train(was_training)
    return ll


def _cache_of(output: Any) -> Any:
    cache = getattr(output, "cache", None)
    if cache is None:
        raise ModelError("the model returned no key/value cache, which accuracy scoring reuses between passes")
    return cache


def _repeated(cache: Any, batch: int) -> Any:
    """A copy of a one-row key/value cache, repeated `batch` times (the forward pass extends it in place)."""
    copied = copy.deepcopy(cache)
    if batch > 1:
        copied.batch_repeat_interleave(batch)
    return copied


def pick(task: Task, ll: Sequence[Sequence[float]], normalize: bool | None = None) -> list[int]:
    """The chosen choice per item: argmax of ll (acc), or of ll per character of the choice (acc_norm)."""
    normalize = task.normalize if normalize is None else normalize
    picks = []
    for item, values in zip(task.items, ll, strict=True):
        scores = [v / max(len(c), 1) for v, c in zip(values, item.choices, strict=True)] if normalize else values
        picks.append(max(range(len(scores)), key=scores.__getitem__))
    return picks


def task_score(task: Task, predictions: Sequence[int], acc_raw: float, seconds: float = 0.0) -> TaskScore:
    """The TaskScore of `task` whose items were answered `predictions` (from score_task, or read back from the
    accuracy cache)."""
    if len(predictions) != len(task.items):
        raise ValueError(f"{len(predictions)} predictions for the {len(task.items)} items of '{task.title}'")
    correct = tuple(p == item.answer for p, item in zip(predictions, task.items, strict=True))
    return TaskScore(task.kind, task.title, task.metric, tuple(int(p) for p in predictions), correct, task.chance,
                     task.majority, seconds, acc_raw)


def task_fingerprint(task: Task) -> str:
    """The hash of everything a task asks: its kind, prompts, items (context, choices, answer, prompt), the
    delimiter and whether it is scored per character. Two tasks of one fingerprint score alike on one model."""
    body = {"kind": task.kind, "prefixes": list(task.prefixes), "normalize": task.normalize,
            "delimiter": task.delimiter,
            "items": [[it.context, list(it.choices), it.answer, it.prompt] for it in task.items]}
    return hashlib.sha256(json.dumps(body, ensure_ascii=False).encode()).hexdigest()


def score_task(model: Any, tokenizer: Any, task: Task, *, batch_tokens: int = 2048,
               should_stop: Callable[[], bool] | None = None,
               progress: Callable[[int, int], None] | None = None) -> TaskScore:
    """Accuracy of `model` on `task` (its metric: acc, or acc_norm for a length-normalized task)."""
    start = time.perf_counter()
    ll = choice_loglikelihoods(model, tokenizer, task, batch_tokens=batch_tokens, should_stop=should_stop,
                               progress=progress)
    predictions = pick(task, ll)
    raw = pick(task, ll, normalize=False)
    answers = [item.answer for item in task.items]
    acc_raw = sum(p == a for p, a in zip(raw, answers, strict=True)) / len(answers)
    return task_score(task, predictions, acc_raw, time.perf_counter() - start)


def accuracy_gap_closed(acc_method: float | None, acc_baseline: float | None,
                        acc_target: float | None) -> float | None:
    """(acc_method - acc_qlora) / (acc_target - acc_qlora): the share of the 4-bit -> target (8-bit or full
    precision) accuracy gap a method closes; 0 = no better than plain 4-bit, 1 = as good as the target. None when
    an accuracy is missing or the baseline is as accurate as the target (no gap to close). With small sets the
    gap itself is noisy: read it beside the paired test of the target against the baseline."""
    if None in (acc_method, acc_baseline, acc_target):
        return None
    gap = acc_target - acc_baseline
    if abs(gap) < 1e-12:
        return None
    return (acc_method - acc_baseline) / gap


# ------------------------------------------------------------------------------------------ tasks of a run


def build_tasks(acc: AccuracyConfig, data: DataConfig, splits: TokenSplits | None = None, tokenizer: Any = None, *,
                reserved_splits: Collection[str] = ("calib", "train")) -> list[Task]:
    """The tasks `acc` asks for, held out from the run: documents of `splits`' `reserved_splits` (recovered
    with `tokenizer`) are never items. An init run passes reserved_splits=("calib",) (it does not train);
    without `splits` nothing is reserved. The continuation task reads the run's evaluation text
    (data.eval_dataset, else data.dataset); the label task acc.label_dataset."""
    reserved: set[str] = set()
    texts = None
    if splits is not None and reserved_splits:
        if tokenizer is None:
            raise ConfigError("build_tasks needs the tokenizer to find the run's calibration documents")
        texts = load_texts(data.dataset, data.text_column)
        reserved = reserved_documents(texts, splits, tokenizer, reserved_splits)
    tasks = []
    for kind in acc.accuracy_tasks:
        if kind == "labels":
            tasks.append(label_task(acc.label_dataset, text_column=acc.label_text_column,
                                    label_column=acc.label_column, label_words=acc.label_words, shots=acc.shots,
                                    prompts=acc.label_prompts, max_items=acc.label_items, seed=data.seed,
                                    reserved=reserved))
        elif kind == "continuation":
            name = data.eval_dataset or data.dataset
            if name != data.dataset:
                held = load_texts(name)
            else:
                held = texts if texts is not None else load_texts(name, data.text_column)
            source = EMBEDDED_DATASETS[name][2] if name in EMBEDDED_DATASETS else Path(name).name
            tasks.append(continuation_task(held, max_items=acc.continuation_items, choices=acc.continuation_choices,
                                           seed=data.seed, reserved=reserved, source=source))
    return tasks
