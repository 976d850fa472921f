"""The teaching views as one event stream, like init and train: load (prepare) -> the layer picker's choices
(LayerChoices) -> calibrate, correct and sweep ranks -> figures -> report.json of kind "views" (the seven
figures as plotly JSON, the precision table).

`run_views(cfg)` yields events; the app's job queue and `python -m quailora_app views` consume this one stream.
The views are computed in a helper thread so that their progress lines stream as Stage("compute") events.
With `write_files` the figures are also written as offline HTML (PNG where kaleido is installed),
how_it_works.md and precision_table.md into the run folder.
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

from quailora_app.config import ViewsConfig
from quailora_app.engine.preflight import preflight_views
from quailora_app.errors import Cancelled, ConfigError
from quailora_app.events import Event, LayerChoices, Log, RunFinished, Stage
from quailora_app.flows.prepare import prepare
from quailora_app.flows.recorder import Recorder, opening_report
from quailora_app.plots.teaching import CAPTIONS, view_figures, write_views
from quailora_app.runs import Report, RunFolder, read_report_at
from quailora_app.sources.models import device_label, pick_device
from quailora_app.teaching.snapshot import ViewsContext, default_layer, layer_names
from quailora_app.teaching.views import Views, compute_views


class ViewsRun:
    """One run of the teaching views. Iterate `events()`; the report lands in `run_dir` when they are done."""

    def __init__(self, cfg: ViewsConfig, should_stop: Callable[[], bool] | None = None, run_dir: Path | None = None,
                 *, write_files: bool = False):
        self.cfg = cfg
        self.write_files = write_files
        folder = RunFolder.create("views", run_dir or cfg.out)
        self.run_dir = folder.path
        self.device = pick_device(cfg.model.device)
        self.report: Report = opening_report("views", cfg, device_label(self.device))
        self.rec = Recorder(folder, self.report, should_stop)
        self.should_stop = self.rec.should_stop

    def events(self) -> Iterator[Event]:
        return self.rec.run(self._run(), self.report["device"], "try fewer calibration sequences or a shorter seq-len")

    def _run(self) -> Iterator[Event]:
        cfg = self.cfg
        started = time.time()
        if self.should_stop():
            raise Cancelled("stopped before the model was loaded")
        reports = [{**read_report_at(path), "run_dir": str(path)} for path in cfg.reports]  # a bad path fails early
        prepared = yield from self.rec.relay(prepare(
            cfg.model, cfg.data, cfg.quant, self.device,
            lambda name, config: preflight_views(name, config, cfg.model, cfg.data, cfg.quant, self.device),
            should_stop=self.should_stop))
        ctx = ViewsContext(prepared.source, prepared.model, prepared.checkpoint, prepared.splits.calib,
                           prepared.splits.eval, self.device, cfg.quant, cfg.data, cfg.model)
        del prepared
        names, default = layer_names(ctx.model), default_layer(ctx.model)
        layer = cfg.layer or default
        if layer not in names:
            raise ConfigError(f"layer '{layer}' is not a linear layer of this model; e.g. {', '.join(names[:3])}")
        yield self.rec.emit(LayerChoices(names, default, layer))
        views = yield from self._compute(ctx, layer, reports)
        del ctx
        yield self.rec.emit(Stage("figures", "drawing the figures"))
        figs = view_figures(views.inside, views.calibration, views.sweep, views.precision)
        notes = [*views.precision.notes, *(views.sweep.notes if views.sweep else [])]
        if self.write_files:
            written = write_views(views, self.run_dir)
            notes += written.notes
            self.report["files"] = {"html": [p.name for p in written.html], "png": [p.name for p in written.png]}
        for note in notes:
            yield self.rec.emit(Log(note))
        self.report.update({
            "status": "finished", "layer": views.layer, "rank": views.rank, "layers": names, "default_layer": default,
            "reports": list(cfg.reports), "calibration": f"{cfg.data.calib_samples} x {cfg.data.seq_len} tokens",
            "ranks": list(cfg.ranks), "seconds": {**views.seconds, "total": time.time() - started},
            "precision_header": list(views.precision.HEADER), "precision_rows": views.precision.table_rows(),
            "precision_notes": list(views.precision.notes), "precision_markdown": views.precision.markdown(),
            "captions": {k: CAPTIONS[k] for k in figs}, "figures": {k: fig.to_json() for k, fig in figs.items()}})
        self.rec.save()
        yield self.rec.emit(RunFinished(str(self.run_dir), self.report))

    def _compute(self, ctx: ViewsContext, layer: str, reports: list[dict]) -> Iterator[Event]:
        """compute_views in a helper thread, its progress lines as Stage("compute") events; returns the Views."""
        cfg = self.cfg
        lines: queue.Queue[str | None] = queue.Queue()
        result: dict[str, Views | BaseException] = {}

        def work() -> None:
            try:
                result["views"] = compute_views(
                    ctx, layer, cfg.lora.rank, block=cfg.block_choice, sweep_layers=cfg.sweep_layers,
                    ranks=cfg.ranks or None, perplexity_ranks=cfg.perplexity_ranks, reports=reports,
                    damping=cfg.damping, als_rounds=cfg.als_rounds, targets=cfg.lora.targets, progress=lines.put,
                    should_stop=self.should_stop)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the run's own thread below
                result["error"] = exc
            finally:
                lines.put(None)

        thread = threading.Thread(target=work, name="quailora-views", daemon=True)
        thread.start()
        while (line := lines.get()) is not None:
            yield self.rec.emit(Stage("compute", line))
        thread.join()
        if "error" in result:
            raise result["error"]
        return result["views"]


def run_views(cfg: ViewsConfig, should_stop: Callable[[], bool] | None = None, run_dir: Path | None = None, *,
              write_files: bool = False) -> Iterator[Event]:
    """The teaching views' event stream (see ViewsRun)."""
    return ViewsRun(cfg, should_stop, run_dir, write_files=write_files).events()
