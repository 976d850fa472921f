"""The shipped example's generate run (bench/make_example.py makes it): the app's default Generate of the example's
init run with its per-layer adapters and what survives deployment of the closed form, stripped and compacted for
the repository, its record in the manifest and its README section."""
from __future__ import annotations

import datetime as dt
import json
import os
import shutil
import time
from pathlib import Path

from quailora_app.cli import consume_init
from quailora_app.config import GenerateConfig
from quailora_app.flows.generate import generate_table, run_generate
from quailora_app.runs import EVENTS, REPORT

#: the init run's adapters the shipped generate run compares (per-layer methods: quick to make again)
GENERATE_ADAPTERS = ("svd", "quailora", "closed_form")


def generate_config(device: str, init_dir: Path, out: Path, deploy: bool = True) -> GenerateConfig:
    """The app's default generate run (app/generation.py's DEFAULTS) of the init run `init_dir`, with what
    survives deployment of its closed form (unless not `deploy`)."""
    from quailora_app.app.generation import DEFAULTS  # the app's defaults: what a visitor's Generate runs

    return GenerateConfig(from_run=str(init_dir), new_tokens=DEFAULTS["new_tokens"], documents=DEFAULTS["documents"],
                          deploy=deploy, deploy_adapter="closed_form" if deploy else None, device=device,
                          out=str(out))


def adapters_only(init_dir: Path, dst: Path, names=GENERATE_ADAPTERS) -> Path:
    """A copy of init run `init_dir` (its report.json and the adapters `names`) for the generate run to read."""
    shutil.rmtree(dst, ignore_errors=True)
    dst.mkdir(parents=True)
    shutil.copy2(init_dir / REPORT, dst / REPORT)
    for name in names:
        shutil.copytree(init_dir / "adapters" / name, dst / "adapters" / name)
    return dst


def make_generate(device: str, work: Path, init_dir: Path, deploy: bool = True) -> float:
    """The generate run of `init_dir`'s GENERATE_ADAPTERS into work/generate; its seconds."""
    os.environ["QUAILORA_PERPLEXITY_CACHE"] = "off"
    source = adapters_only(init_dir, work / "init-for-generate")
    start = time.time()
    cfg = generate_config(device, source, work / "generate", deploy)
    if consume_init(run_generate(cfg), table=generate_table) != 0:
        raise SystemExit("the generate run failed; see the lines above")
    return time.time() - start


def generate_figures(report: dict) -> dict:
    """What --check compares of a generate run: each variant's top-1 agreement and mean KL on the prompt and over
    the documents, and each deployment perplexity."""
    out = {}
    for name, found in (report.get("agreement") or {}).items():
        out[f"{name} top-1"], out[f"{name} mean KL"] = found["top1_agreement"], found["mean_kl"]
    for name, found in ((report.get("documents") or {}).get("variants") or {}).items():
        out[f"{name} documents top-1"], out[f"{name} documents mean KL"] = found["top1_agreement"], found["mean_kl"]
    for name, value in ((report.get("deploy") or {}).get("perplexity") or {}).items():
        out[f"deploy {name}"] = value
    return out


def compact_generate(folder: Path) -> None:
    """A stripped generate run, smaller: report.json without indentation, and its finished event's report without
    the top-10 lists (report.json holds them)."""
    report = json.loads((folder / REPORT).read_text())
    (folder / REPORT).write_text(json.dumps(report, separators=(",", ":")) + "\n")
    events = [json.loads(line) for line in (folder / EVENTS).read_text().splitlines() if line.strip()]
    for e in events:
        if e.get("kind") == "finished" and isinstance(e.get("report"), dict):
            e["report"] = {k: v for k, v in e["report"].items() if k != "top10"}
    (folder / EVENTS).write_text("".join(json.dumps(e, separators=(",", ":")) + "\n" for e in events))


def generate_record(command: str, seconds: float, at_start: dict, report: dict,
                    adapters: dict[str, tuple[float, float]] | None, init_seconds: float | None = None) -> dict:
    """The manifest's record of the generate run: command, date, seconds, machine, settings, its figures, and (made
    with --only generate) the re-made adapters' perplexities beside the shipped init run's."""
    s = report.get("settings") or {}
    record = {"command": command, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
              "seconds": seconds, "machine": at_start,
              "settings": {"adapters": [n for n in report.get("variants", []) if n in GENERATE_ADAPTERS],
                           "new_tokens": s.get("new_tokens"), "prompt_tokens": s.get("prompt_tokens"),
                           "documents": s.get("documents"), "sample": s.get("sample"), "deploy": s.get("deploy"),
                           "deploy_adapter": (report.get("deploy") or {}).get("adapter"),
                           "deploy_tokens": s.get("deploy_tokens")},
              "figures": generate_figures(report), "reading": (report.get("deploy") or {}).get("reading", "")}
    if adapters is not None:
        record["adapters_again"] = {m: {"shipped": a, "again": b} for m, (a, b) in adapters.items()}
        record["adapters_seconds"] = init_seconds
    return record


GENERATE_BEGIN, GENERATE_END = "<!-- generate: written by python -m bench.make_example -->", "<!-- /generate -->"


def generate_readme(manifest: dict) -> str:
    """The README's generate section (between GENERATE_BEGIN and GENERATE_END)."""
    g = manifest["generate"]
    s, m = g["settings"], g["machine"]
    rows = "\n".join(f"| {name} | {value:.4f} |" for name, value in g["figures"].items() if value is not None)
    again = g.get("adapters_again") or {}
    made = ("\nThe init run keeps no adapter weights here, so they were made again (its settings and seed, only "
            f"these methods, {g.get('adapters_seconds') or 0:.0f} s); held-out perplexity, shipped init run / made "
            "again: " + ", ".join(f"{k} {v['shipped']:.4f} / {v['again']:.4f}" for k, v in again.items()
                                 if v["shipped"] is not None and v["again"] is not None) + ".\n") if again else ""
    deploy = (f"what survives deployment of {s['deploy_adapter']} on {s['deploy_tokens']:,} held-out tokens (the "
              "merged models are not shipped)" if s.get("deploy") else
              "what survives deployment was left out (--no-deploy): tick it in the app, or `generate --deploy`")
    return f"""{GENERATE_BEGIN}
## `generate/`: the generate run (section 5 of the page)

What the app's *Generate* starts by default, from `init/`: full precision, 8-bit, plain 4-bit and 4-bit with the
adapters {', '.join(s['adapters'])} continue the start of a held-out document by {s['new_tokens']} tokens (greedy);
each is teacher-forced along full precision's continuation (top-1 agreement, KL) there, and along the next
{s['new_tokens']} tokens of {s['documents']} held-out documents' own text; {deploy}. Made by `{g['command']}` on {g['date']} in {g['seconds']:.0f} s on {m['cpu']}
({m['cores']} cores, {m['torch_threads']} torch threads; load average {m['load_average_at_start']} at the start).
Check it with `{g['command'].replace(' --only', ' --check --only')}`.
{made}
{g.get('reading', '')}

| figure | value |
|---|---|
{rows}
{GENERATE_END}
"""
