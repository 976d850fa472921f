"""The downstream-accuracy bookkeeping of both flows, written once: which tasks a run scores, their entries in the
report, every model scored on every task (or its answers read back), the accuracy cache, and the figures built
from the answers (95% Wilson intervals, accuracy gaps closed, paired tests against the baseline).

The init flow scores model variants once each (4-bit with each method, 8-bit, full precision) against qlora; the
train flow scores its arms at every evaluation against qlora4. Both keep one `AccuracyLedger`:

    ledger = AccuracyLedger(rec, cfg.accuracy, device, tokenizer)
    yield from ledger.build(cfg.data, splits, reserved_splits, fit)   # the tasks; each in report["accuracy"]
    yield from ledger.score(model, known, book)                       # every task on one model: one event each

and make their report's figures with `accuracy_record`, `gaps_closed` and `versus`.

Report fields (read by the app and the tests): report["accuracy"][kind] (the task: title, metric, description, n,
chance, majority, fingerprint, then the flow's own fields), report["accuracy_unavailable"][kind] (why a task asked
for gives no accuracy), report["accuracy_gap_closed"][kind] and report["accuracy_gap_closed_full"][kind] (the
flow's gaps closed toward 8-bit and toward full precision).
"""
from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from quailora_app.config import AccuracyConfig, DataConfig
from quailora_app.engine.evaluation.accuracy import (
    TaskScore,
    accuracy_gap_closed,
    build_tasks,
    score_task,
    task_fingerprint,
    task_score,
)
from quailora_app.engine.evaluation.accuracy_cache import accuracy_key, read_cached_accuracy, write_cached_accuracy
from quailora_app.engine.evaluation.statistics import PairedTest, paired_test, wilson_interval
from quailora_app.errors import ConfigError, DataError, one_line
from quailora_app.events import Event, Log, Stage
from quailora_app.flows.recorder import Recorder
from quailora_app.sources.data import TokenSplits
from quailora_app.sources.tasks import Task

#: a task as built -> the task the run scores and the flow's own fields of its report entry; raises DataError
Fit = Callable[[Task], tuple[Task, dict[str, Any]]]
#: which items a model got right: a fresh or cached TaskScore, or the answers read back from an init run
Answers = TaskScore | tuple[bool, ...]


def accuracy_record(correct: Sequence[bool], *, step: int | None = None, items: bool = False, **fields) -> dict:
    """One model's accuracy on one task: (the step,) hits / n, its 95% Wilson interval and half-width, the flow's
    `fields`, and with `items` which items were right ("1"/"0" per item, for paired tests read back later)."""
    hits, n = sum(correct), len(correct)
    lo, hi = wilson_interval(hits, n)
    record = {} if step is None else {"step": step}
    record.update(accuracy=hits / n, hits=hits, n=n, interval=[lo, hi], half_width=(hi - lo) / 2, **fields)
    if items:
        record["correct"] = "".join("1" if c else "0" for c in correct)
    return record


def gaps_closed(acc: Mapping[str, float], base: str, target: str) -> dict[str, float | None]:
    """Per model: the accuracy gap it closes, (acc - acc[base]) / (acc[target] - acc[base]) (None where either
    is missing or there is no gap)."""
    return {name: accuracy_gap_closed(a, acc.get(base), acc.get(target)) for name, a in acc.items()}


def versus(correct: Sequence[bool] | TaskScore, baseline: Sequence[bool] | TaskScore) -> tuple[dict, PairedTest]:
    """A model against the baseline on the same items (McNemar's exact test): the report's entry (the test's
    figures and whether the difference is significant at its confidence) and the test."""
    test = paired_test(correct, baseline)
    return {**test.as_dict(), "significant": test.p_value < 1 - test.confidence}, test


class AccuracyLedger:
    """One run's downstream tasks and their report entries. `rec` is the run's recorder (its report, events and
    stop requests); `tokenizer` the run model's."""

    def __init__(self, rec: Recorder, cfg: AccuracyConfig, device: torch.device, tokenizer: Any):
        self.rec = rec
        self.report = rec.report
        self.cfg = cfg
        self.device = device
        self.tokenizer = tokenizer
        self.tasks: list[Task] = []  # the tasks scored on every model: built, and not dropped since

    def build(self, data: DataConfig, splits: TokenSplits, reserved_splits: Sequence[str],
              fit: Fit = lambda task: (task, {})) -> Iterator[Event]:
        """The tasks cfg asks for, held out from the documents of `reserved_splits` (evaluation/accuracy.py
        build_tasks), each passed through `fit`. A task that cannot be built here (too little text, no labels,
        ...) is left out with a warning and the reason in report["accuracy_unavailable"]: perplexity still runs.
        Nothing (and no accuracy fields in the report) when cfg asks for no task."""
        if not self.cfg.accuracy_tasks:
            return
        self.report.update(accuracy={}, accuracy_gap_closed={}, accuracy_gap_closed_full={}, accuracy_unavailable={})
        yield self.rec.emit(Stage("data", f"downstream tasks: {', '.join(self.cfg.accuracy_tasks)}"))
        for kind in self.cfg.accuracy_tasks:
            try:
                (task,) = build_tasks(replace(self.cfg, accuracy_tasks=(kind,)), data, splits, self.tokenizer,
                                      reserved_splits=tuple(reserved_splits))
                task, fields = fit(task)
            except (DataError, ConfigError) as exc:
                yield from self.drop(kind, f"not built: {one_line(exc, 200)}")
                continue
            self.tasks.append(task)
            self.report["accuracy"][kind] = {
                "title": task.title, "metric": task.metric, "description": task.description, "n": len(task.items),
                "chance": task.chance, "majority": task.majority, "fingerprint": task_fingerprint(task), **fields}
            yield self.rec.emit(Log(f"accuracy task {task.title}: {task.description}"))

    def drop(self, kind: str, reason: str) -> Iterator[Event]:
        """Task `kind` gives no accuracy in this run: out of the tasks and the report's, `reason` in
        report["accuracy_unavailable"], and a warning."""
        self.tasks = [t for t in self.tasks if t.kind != kind]
        self.report["accuracy"].pop(kind, None)
        self.report["accuracy_unavailable"][kind] = reason
        yield self.rec.emit(Log(f"accuracy task {kind} {reason}", "warning"))

    def score(self, model: Any, known: Callable[[Task], Answers | None],
              book: Callable[[Task, Answers, bool], Event]) -> Iterator[Event]:
        """Every task on `model`: `known(task)` where it has the answers (read back, not scored), else scored here.
        `book(task, answers, known)` records them and returns the event that tells; the report is saved before
        it. A task whose prompts do not fit the model's context is dropped."""
        for task in list(self.tasks):
            self.rec.check_stop("accuracy scoring")
            answers = known(task)
            was_known = answers is not None
            if answers is None:
                try:
                    answers = score_task(model, self.tokenizer, task, should_stop=self.rec.should_stop,
                                         batch_tokens=self.cfg.accuracy_batch_tokens)
                except ConfigError as exc:  # prompts longer than the model's context: the task gives nothing here
                    yield from self.drop(task.kind, f"not scored: {one_line(exc, 200)}")
                    continue
            event = book(task, answers, was_known)
            self.rec.save()
            yield self.rec.emit(event)

    # -- the accuracy cache (engine/evaluation/accuracy_cache.py): models no method changes ----------------
    def _key(self, task: Task, variant: Mapping[str, Any], folder: str | Path) -> dict:
        return accuracy_key(variant, folder, self.report["accuracy"][task.kind]["fingerprint"],
                            self.cfg.accuracy_batch_tokens, self.device)

    def cached(self, task: Task, variant: Mapping[str, Any], folder: str | Path) -> TaskScore | None:
        """Model `variant`'s score on `task` from the accuracy cache (None where not cached)."""
        found = read_cached_accuracy(self._key(task, variant, folder), [len(it.choices) for it in task.items])
        return None if found is None else task_score(task, found.predictions, found.acc_raw, found.seconds)

    def cached_scores(self, variant: Mapping[str, Any], folder: str | Path) -> dict[str, TaskScore | None]:
        """Each task's score of model `variant` from the accuracy cache (None where not cached)."""
        return {task.kind: self.cached(task, variant, folder) for task in self.tasks}

    def store(self, task: Task, variant: Mapping[str, Any], folder: str | Path, score: TaskScore) -> None:
        """Keep a fresh score of model `variant` in the accuracy cache."""
        write_cached_accuracy(self._key(task, variant, folder), score.predictions, score.acc_raw, score.seconds)
