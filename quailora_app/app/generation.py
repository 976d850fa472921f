"""What the Generate section shows and starts, without gradio: the live generate run's settings (a finished init or
fine-tuning run of the session, or a run folder it may reopen, and the section's prompt, new tokens and sampling)
as a GenerateConfig, the job's progress bar, the side-by-side continuations (streamed from the job's token events),
the agreement strip (HTML: each token of full precision's continuation, per variant, green where the variant's
top-1 next token is full precision's and red where not, darker for a larger KL(full || variant) there), the
summary table, the top-10 next tokens at a chosen position, the over-documents shares against plain 4-bit, the
deployment table (a)-(f), and the shipped example's generate run (assets/example/generate).

The live default fits a free 2-core Space: 32 new tokens per variant, greedy, and the agreement over 4 held-out
documents; `python -m bench.generate_time` times it against one plain 4-bit greedy generation.
"""
from __future__ import annotations

import html
import math
import tempfile
import uuid
import zipfile
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pandas as pd

from quailora_app.app.forms import form_values, one_line_errors, text_setting
from quailora_app.app.jobs import RUNNING, Job
from quailora_app.app.presenters import DRAWN, ended_bar, job_key, made_by, model_title, report_of
from quailora_app.app.reopen import EXAMPLE_DIR, example_manifest, is_example_name, list_runs, open_run
from quailora_app.config import GenerateConfig
from quailora_app.engine.deploy import DEPLOY_VARIANTS
from quailora_app.errors import UserError
from quailora_app.plots.agreement import cell_colour, deploy_figure, strip_values, top10_figure, versus_plain_figure
from quailora_app.runs import RunFolder, default_runs_root
from quailora_app.settings import build

#: The settings /start_generate takes, by name and in its API order (session, init and train job ids first).
GEN_NAMES = ("gen_from", "gen_prompt_from", "gen_prompt", "gen_new_tokens", "gen_sample", "gen_temperature",
             "gen_seed", "gen_documents", "gen_deploy")
#: the section's names for the GenerateConfig settings it sets itself
TAB_NAMES = {"gen_new_tokens": "new_tokens", "gen_sample": "sample", "gen_temperature": "temperature",
             "gen_seed": "seed", "gen_documents": "documents", "gen_deploy": "deploy"}
#: where the prompt comes from (label, value)
PROMPT_CHOICES = (("the start of a held-out document", "held_out"), ("my own text", "text"))
#: the source choice meaning the session's latest finished init or fine-tuning run
LATEST = "latest"
LATEST_CHOICE = ("my latest finished init or fine-tuning run", LATEST)
#: what the live default runs (and bench/generate_time.py times): greedy, 32 new tokens, 4 held-out documents
DEFAULTS = {"new_tokens": 32, "documents": 4, "sample": False, "temperature": 1.0, "seed": 0, "deploy": False}
#: the one line under the deployment table: why merging then quantizing again loses the correction
WHY_ONE_LINE = ("quantizing the merged weights again rounds every weight afresh, and the correction s B A is mostly "
                "smaller than one quantization step, so the new rounding error is about as large as the one the "
                "adapter was fitted to cancel, and unrelated to it.")
DEPLOY_HEADER = ["way of shipping", "held-out perplexity", "share of the adapter's gain kept"]
SUMMARY_HEADER = ["variant", "top-1 agreement", "mean KL (nats)", "top-1 agreement, documents",
                  "mean KL, documents", "right where plain 4-bit is wrong", "wrong where plain 4-bit is right",
                  "tokens/s"]


# ------------------------------------------------------------------------------------------------ settings
@one_line_errors
def make_generate_config(values: Mapping[str, Any], from_run: str) -> GenerateConfig:
    """The section's fields by name (GEN_NAMES, `gen_from` already resolved to the run folder `from_run`) ->
    GenerateConfig; an empty own prompt, zero new tokens, a bad number: one line."""
    values = dict(values)
    values.pop("gen_from", None)
    own = values.pop("gen_prompt_from", "held_out") == "text"
    prompt = text_setting(values.pop("gen_prompt", None), "prompt")
    unknown = sorted(set(values) - set(TAB_NAMES))
    if unknown:
        raise UserError(f"unknown setting(s) {', '.join(map(str, unknown))}")
    typed = form_values(GenerateConfig, {TAB_NAMES[k]: v for k, v in values.items()})
    if own and not prompt:
        raise UserError("the prompt is empty: type some text to continue, or choose 'the start of a held-out "
                        "document'")
    return build(GenerateConfig, {**typed, "prompt": prompt if own else None, "from_run": from_run})


def source_choices(owner: str | None, root: str | Path | None = None) -> list[tuple[str, str]]:
    """(label, value) of what a generate run can start from: the session's latest finished init or fine-tuning
    run, then the init and fine-tuning run folders under the runs root this session may reopen (its own and the
    command line's), newest first."""
    root = Path(root) if root is not None else default_runs_root()
    out = [LATEST_CHOICE]
    for label, name in list_runs(owner, root):
        if RunFolder(root / name).kind() in ("init", "train"):
            out.append((label, name))
    return out


def source_folder(choice: Any, owner: str | None, latest: str | None, root: str | Path | None = None) -> str:
    """The run folder a generate run starts from: `latest` (the session's latest finished init or fine-tuning run,
    found by the caller) for LATEST, else the run folder `choice` under the runs root if this session may see it;
    one line otherwise."""
    choice = text_setting(choice, "generate from") or LATEST
    if choice == LATEST:
        if not latest:
            raise UserError("no finished init or fine-tuning run in this session yet: run step 2 (or 3) first, or "
                            "pick one of your run folders")
        return latest
    if is_example_name(choice):
        raise UserError("the shipped example keeps no adapter weights (only their records), so it cannot generate "
                        "live: its generate run is shown here; run step 2 to generate from your own init run")
    return str(open_run(choice, owner, root).run_dir)


# ------------------------------------------------------------------------------------------------ progress
def _metrics(job: Job, group: str) -> list[dict]:
    return [e for e in job.events if e.get("kind") == "metric" and e.get("group") == group]


def _variants(job: Job) -> list[str]:
    """The variants the run compares (from its partial report once it has one, else the ones with tokens)."""
    report = live_report(job) or {}
    names = list(report.get("variants") or [])
    for e in job.events:
        if e.get("kind") == "token" and e["variant"] not in names:
            names.append(e["variant"])
    return names


#: the progress chips of a generate job (with deploy, one more)
GENERATE_CHIPS = ("load model & text", "full precision", "8-bit", "plain & corrected 4-bit")


def generate_progress(job: Job) -> tuple[int, float, str]:
    """(index of the current chip, overall fraction done, a line) of a generate job: loading, then each variant's
    tokens and its agreement (on a CPU the 4-bit variants stream beside full precision and 8-bit: the line names
    each chip streaming, the earliest is lit), then (with deploy) the deployment perplexities."""
    tokens = streamed(job)
    if not tokens:
        return 0, 0.0, job.stage_message or "loading the model and the text"
    measured = {e["name"] for e in _metrics(job, "agreement")}
    names = _variants(job)
    deploy = bool(getattr(job.config, "deploy", False))
    done = len(measured) + sum(e["step"] / max(1, e["total"]) for n, e in tokens.items() if n not in measured)
    frac = 0.05 + (0.8 if deploy else 0.95) * min(1.0, done / max(1, len(names)))
    streaming: dict[int, tuple[str, dict]] = {}  # chip -> what it is decoding (the 4-bit rows go in lockstep)
    for name, last in tokens.items():
        chip = _chip(name)
        if name not in measured and chip not in streaming:
            streaming[chip] = (variant_label_of(job, name) if chip < 3 else GENERATE_CHIPS[3], last)
    idx = min(streaming) if streaming else _chip(list(tokens)[-1])
    line = " · ".join(f"{what}: token {last['step']} of {last['total']}" for _, (what, last)
                      in sorted(streaming.items())) or job.stage_message or ""
    if deploy and (job.stage == "deploy" or len(measured) >= len(names)):
        idx, frac = 4, max(frac, 0.85)
    return idx, min(frac, 1.0), line


def variant_label_of(job: Job, name: str) -> str:
    return ((live_report(job) or {}).get("labels") or {}).get(name, name)


def _chip(name: str) -> int:
    """The progress chip of a variant: full precision, 8-bit, or the 4-bit ones (decoded together)."""
    return {"full": 1, "int8": 2}.get(name, 3)


def generate_stage_texts(job: Job) -> list[str]:
    texts = list(GENERATE_CHIPS)
    return texts + (["what survives deployment"] if getattr(job.config, "deploy", False) else [])


def generate_progress_html(job: Job) -> str:
    return ended_bar(job, generate_stage_texts(job), *generate_progress(job))


# ------------------------------------------------------------------------------------------------ what it shows
def live_report(job: Job | None) -> dict | None:
    """The job's report: the final one, or the partial report.json the run rewrites after every variant."""
    report = report_of(job)
    if report is None and job is not None and job.run_dir:
        report = RunFolder(Path(job.run_dir)).read_report()
    return report if report and report.get("kind") == "generate" else None


def streamed(job: Job | None) -> dict[str, dict]:
    """variant -> its last token event (the continuation so far), in the order the variants started."""
    out: dict[str, dict] = {}
    for e in (job.events if job else []):
        if e.get("kind") == "token":
            out[e["variant"]] = e
    return out


def _piece(text: str) -> str:
    """A token as the strip shows it: escaped, a newline as a visible mark."""
    return html.escape(text).replace("\n", "\u21b5")


def _swatch(colour: str) -> str:
    return f"<span class='g-swatch' style='background:{html.escape(colour)}'></span>"


def prompt_html(report: Mapping | None) -> str:
    prompt = (report or {}).get("prompt") or {}
    if not prompt:
        return ""
    sampling = (report or {}).get("sampling")
    how = (f"sampled at temperature {sampling['temperature']:g}, seed {sampling['seed']} (the same draws for every "
           "variant)" if sampling else "greedy")
    return (f"<div class='g-prompt'><b>Prompt</b> ({html.escape(str(prompt.get('origin', '')))}, "
            f"{prompt.get('tokens', 0)} tokens; {html.escape(str((report or {}).get('new_tokens', '')))} new tokens "
            f"each, {how}): <span class='g-text'>{_piece(str(prompt.get('text', '')))}</span></div>")


def continuations_html(report: Mapping | None, tokens: Mapping[str, dict] | None = None) -> str:
    """Side by side, one card per variant (labelled and coloured as every figure): its continuation, the streamed
    text so far while it is being generated (`tokens`: variant -> last token event), its speed once done."""
    report, tokens = report or {}, tokens or {}
    names = list(report.get("variants") or [])
    names += [n for n in tokens if n not in names]
    if not names:
        return ("<div class='g-empty'>Press <b>Generate</b> to see what each variant says: full precision, 8-bit, "
                "plain 4-bit and 4-bit with each adapter, side by side.</div>")
    labels, colours = report.get("labels") or {}, report.get("colours") or {}
    done = report.get("continuations") or {}
    cards = []
    for name in names:
        entry, live = done.get(name), tokens.get(name)
        if entry is not None:
            text, state = entry.get("text", ""), speed_note(entry, labels)
        elif live is not None:
            text, state = live.get("text", ""), f"token {live['step']} of {live['total']}\u2026"
        else:
            text, state = "", "waiting"
        colour = colours.get(name, "#555")
        cursor = "<span class='g-cursor'>\u258c</span>" if entry is None and live is not None else ""
        cards.append(f"<div class='g-card' data-variant='{html.escape(name)}' style='border-top-color:"
                     f"{html.escape(colour)}'><div class='g-head'>{_swatch(colour)}<b>"
                     f"{html.escape(labels.get(name, name))}</b><span class='g-state'>{html.escape(state)}</span>"
                     f"</div><div class='g-text'>{_piece(text)}{cursor}</div></div>")
    return prompt_html(report) + "<div class='g-cards'>" + "".join(cards) + "</div>"


def strip_html(report: Mapping | None, position: int | None = None) -> str:
    """The agreement strip: one row per variant (full precision first, its tokens uncoloured: the reference), one
    cell per position of full precision's continuation, coloured as plots.agreement's strip (green: the variant's
    top-1 next token there is full precision's; red: it is not; darker: larger KL(full || variant), on a square
    root scale up to the largest KL shown), with each variant's top-1 agreement and mean KL; the chosen
    `position` (1-based) outlined."""
    report = report or {}
    pieces = (report.get("reference") or {}).get("pieces") or []
    found = report.get("agreement") or {}
    rows = [n for n in report.get("variants") or [] if n != "full" and n in found]
    if not pieces or not rows:
        return ("<div class='g-empty'>The agreement strip appears once full precision and a quantized variant are "
                "measured.</div>")
    labels, colours = report.get("labels") or {}, report.get("colours") or {}
    kl_max = max((k for n in rows for k in found[n]["kl"]), default=0.0)
    chosen = None if position is None else position - 1

    def cell(t: int, body: str, style: str, tip: str) -> str:
        mark = " g-chosen" if t == chosen else ""
        return f"<span class='g-tok{mark}' style='{style}' title='{html.escape(tip, quote=True)}'>{body}</span>"

    out = [f"<div class='g-strip'><div class='g-row g-ref'><div class='g-name'>{_swatch(colours.get('full', '#555'))}"
           f"{html.escape(labels.get('full', 'full precision'))}<small>the reference</small></div><div class='g-toks'>"]
    out += [cell(t, _piece(p), "", f"position {t + 1}: full precision says {p!r}") for t, p in enumerate(pieces)]
    out.append("</div></div>")
    for name in rows:
        f = found[name]
        values = strip_values(f["agree"], f["kl"], kl_max)
        out.append(f"<div class='g-row' data-variant='{html.escape(name)}'><div class='g-name'>"
                   f"{_swatch(colours.get(name, '#555'))}{html.escape(labels.get(name, name))}<small>top-1 "
                   f"{100 * f['top1_agreement']:.0f}% \u00b7 mean KL {f['mean_kl']:.3f}</small></div>"
                   "<div class='g-toks'>")
        for t, (p, v) in enumerate(zip(pieces, values, strict=True)):
            background, ink = cell_colour(v)
            tip = (f"position {t + 1}: full precision says {p!r}; {labels.get(name, name)} "
                   f"{'agrees' if f['agree'][t] else 'differs'}, KL {f['kl'][t]:.4f} nats")
            out.append(cell(t, _piece(p), f"background:{background};color:{ink}", tip))
        out.append("</div></div>")
    out.append(f"</div><div class='g-legend'><span class='g-tok' style='background:{cell_colour(0.1)[0]}'>agrees"
               f"</span><span class='g-tok' style='background:{cell_colour(0.6)[0]}'>differs</span> top-1 next token "
               f"against full precision's, teacher-forced along its continuation; darker = larger KL there (square "
               f"root scale, 0 to {kl_max:.3f} nats). Hover a token for its numbers.</div>")
    return "".join(out)


def _percent(value: Any) -> str:
    return f"{100 * value:.1f}%" if isinstance(value, (int, float)) and math.isfinite(value) else ""


def _number(value: Any, digits: int = 4) -> str:
    return f"{value:.{digits}f}" if isinstance(value, (int, float)) and math.isfinite(value) else ""


def speed_note(entry: Mapping, labels: Mapping) -> str:
    """A continuation's speed as its card says it: tokens/s, how many rows decoded together and, where another
    lane decoded at the same time (the 4-bit lane beside 8-bit), whose decode shared the CPU with it."""
    if not entry.get("tokens_per_s"):
        return ""
    rows = entry.get("batch_rows") or 1
    beside = entry.get("beside") or []
    return (f"{entry['tokens_per_s']:.1f} tokens/s" + (f" each, {rows} decoded together" if rows > 1 else "")
            + (f", CPU shared with {labels.get(beside[0], beside[0])}"
               + (f" & {len(beside) - 1} more" if len(beside) > 1 else "") if beside else ""))


def summary_table(report: Mapping | None) -> pd.DataFrame:
    """Per variant: top-1 agreement and mean KL on the prompt and over the held-out documents, the shares against
    plain 4-bit (corrected variants), tokens per second."""
    report = report or {}
    labels, found = report.get("labels") or {}, report.get("agreement") or {}
    documents = report.get("documents") or {}
    docs, versus = documents.get("variants") or {}, documents.get("versus_plain") or {}
    rows = []
    for name in report.get("variants") or []:
        if name not in found:
            continue
        d, v = docs.get(name) or {}, versus.get(name) or {}
        entry = (report.get("continuations") or {}).get(name) or {}
        speed = _number(entry.get("tokens_per_s"), 1) + (" (CPU shared)" if entry.get("beside") else "")
        rows.append([labels.get(name, name), _percent(found[name]["top1_agreement"]),
                     _number(found[name]["mean_kl"]), _percent(d.get("top1_agreement")), _number(d.get("mean_kl")),
                     _percent(v.get("corrected_only")), _percent(v.get("plain_only")), speed])
    return pd.DataFrame(rows, columns=SUMMARY_HEADER)


def positions(report: Mapping | None) -> int:
    """How many positions the top-10 view can show (0 before the run has its top-10 lists)."""
    top = (report or {}).get("top10") or {}
    shown = [n for n in top.get("variants", []) if top.get(n)]
    return len(top[shown[0]]) if shown else 0


def deploy_table(report: Mapping | None) -> pd.DataFrame:
    """The deployment table: full precision, plain 4-bit, then (a)-(f), each with its held-out perplexity and the
    share of the adapter's gain on the 4-bit base it keeps."""
    deploy = (report or {}).get("deploy") or {}
    ppl, kept, labels = deploy.get("perplexity") or {}, deploy.get("kept") or {}, deploy.get("labels") or {}
    rows = []
    for name, title in (("full", "full precision"), ("plain_4bit", "plain 4-bit, no correction"),
                        *((n, labels.get(n, n)) for n in DEPLOY_VARIANTS)):
        if ppl.get(name) is not None:
            rows.append([title, _number(ppl[name], 3), _percent(kept.get(name)) or "\u2013"])
    return pd.DataFrame(rows, columns=DEPLOY_HEADER)


def deploy_markdown(report: Mapping | None, running: bool = False) -> str:
    """The deployment reading and the one-line reason why (c) loses the correction; a line saying how to get the
    table when the run did not measure it."""
    deploy = (report or {}).get("deploy")
    if not deploy:
        return ("*Tick **what survives deployment** and generate to measure one adapter shipped six ways (merged, "
                "merged then quantized again, kept apart) and to download the merged model.*")
    if not deploy.get("reading"):
        return "*The deployment table fills in as each way of shipping is measured.*" if running else ""
    return f"**{deploy['reading']}**\n\n**Why (c) loses the correction:** {WHY_ONE_LINE}"


def generate_drawn(report: Mapping | None, tokens: Mapping[str, dict] | None = None, running: bool = False,
                   position: int = 1) -> dict[str, Any]:
    """Everything the section shows of a generate report (partial while it runs): continuations and strip (HTML),
    the summary table, the over-documents figure, the top-10 figure at `position` (1-based) and how many positions
    there are, the deployment table, its reading and figure."""
    return {"continuations": continuations_html(report, tokens), **generate_measured(report, running, position)}


def generate_measured(report: Mapping | None, running: bool = False, position: int = 1) -> dict[str, Any]:
    """What the section shows of the measured variants (all of `generate_drawn` but the continuations): drawn
    once per measured variant, not once per token."""
    n = positions(report)
    position = max(1, min(position, n)) if n else 1
    return {"strip": strip_html(report, position if n else None), "summary": summary_table(report),
            "versus": versus_plain_figure(report), "top10": top10_figure(report, position - 1), "positions": n,
            "position": position, "deploy_table": deploy_table(report),
            "deploy_reading": deploy_markdown(report, running), "deploy_plot": deploy_figure(report)}


def position_view(report: Mapping | None, position: Any) -> tuple[Any, str]:
    """(the top-10 figure, the agreement strip with that column outlined) at `position` (1-based, clamped)."""
    n = positions(report)
    try:
        position = max(1, min(int(position), n)) if n else 1
    except (TypeError, ValueError, OverflowError):
        position = 1
    return top10_figure(report, position - 1), strip_html(report, position if n else None)


def _report_stamp(job: Job | None) -> int | None:
    """When the run last rewrote its report.json (ns), so a drawing keyed on it is never older than the file."""
    try:
        return (Path(job.run_dir) / "report.json").stat().st_mtime_ns if job is not None and job.run_dir else None
    except OSError:
        return None


def generate_cards(job: Job | None) -> str:
    """The continuations side by side of a generate job: built once per new token (or rewrite of its report)."""
    job = job if job is not None and job.kind == "generate" else None
    tokens = sum(1 for e in job.events if e.get("kind") == "token") if job else 0
    return DRAWN.get((*job_key(job), "generate-cards", tokens, _report_stamp(job)),
                     lambda: continuations_html(live_report(job), streamed(job)))


def generate_outputs(job: Job | None, position: int = 1) -> dict[str, Any]:
    """`generate_drawn` of a generate job: the continuations once per new token (`generate_cards`), the rest
    (strip, tables, figures: plotly builds each in tens of ms) once per measured variant, not at every token."""
    job = job if job is not None and job.kind == "generate" else None
    measured = sum(1 for e in job.events if e.get("kind") in ("metric", "log")) if job else 0
    rest = DRAWN.get((*job_key(job), "generate", measured, _report_stamp(job), position),
                     lambda: generate_measured(live_report(job), bool(job) and job.status == RUNNING, position))
    return {"continuations": generate_cards(job), **rest}


# ------------------------------------------------------------------------------------------------ downloads
def merged_zip(report: Mapping | None) -> str:
    """A zip of the deployment's merged 16-bit model folder (b) beside the adapter folder (its safetensors and
    config load with `from_pretrained`); a one-line UserError when the run did not save one."""
    deploy = (report or {}).get("deploy") or {}
    merged, adapter = deploy.get("merged_folder"), deploy.get("adapter_folder")
    if not merged or not Path(merged).is_dir() or not adapter or not Path(adapter).is_dir():
        raise UserError("no merged model to download: generate with 'what survives deployment' ticked (the shipped "
                        "example keeps no model weights)")
    out_dir = Path(tempfile.gettempdir()) / "quailora-zips" / uuid.uuid4().hex[:8]
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{Path(merged).name}.zip"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:  # safetensors barely compress: store them
        for folder in (Path(merged), Path(adapter)):
            for file in sorted(folder.rglob("*")):
                if file.is_file():
                    z.write(file, Path(folder.name) / file.relative_to(folder))
    return str(path)


# ------------------------------------------------------------------------------------------------ shipped example
def generate_label(report: Mapping, manifest: Mapping) -> str:
    """The line over the shipped generate run: that it is the shipped example, what it compares, how it was made."""
    made = dict(manifest.get("generate") or {}) or dict(manifest)
    prompt = report.get("prompt") or {}
    documents = report.get("documents") or {}
    device = "CPU" if str(report.get("device", "")).startswith("cpu") else report.get("device", "?")
    seconds = (report.get("seconds") or {}).get("total")
    took = f", {seconds:.0f} s" if isinstance(seconds, (int, float)) else ""
    adapters = [n for n in report.get("variants") or [] if n not in ("full", "int8", "qlora")]
    labels = report.get("labels") or {}
    names = ", ".join(labels.get(n, n) for n in adapters)
    deploy = f"; what survives deployment of {report['deploy']['label']}" if report.get("deploy") else ""
    body = (f"{model_title(dict(report))}, the shipped init run's adapters ({names}), {report.get('new_tokens')} new "
            f"tokens each after {prompt.get('tokens')} tokens of {prompt.get('origin', 'a prompt')}, greedy; agreement "
            f"over {documents.get('n', 0)} held-out documents{deploy}, {device}{took}")
    return f"**Shipped example run**: {body}; {made_by(made)}. Shown until you generate your own."


def example_generate(root: str | Path = EXAMPLE_DIR) -> dict[str, Any] | None:
    """The shipped generate run (assets/example/generate) drawn by `generate_drawn`, with its label and report; None
    when the app ships none (or it does not read back)."""
    report = RunFolder(Path(root) / "generate").read_report()
    if not report or report.get("kind") != "generate" or report.get("status") != "finished":
        return None
    return {**generate_drawn(report), "label": generate_label(report, example_manifest(root)), "report": report}

