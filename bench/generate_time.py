"""How long the app's Generate takes on the CPU: from pressing the button to the last continuation and to the
agreement view, against an anchor measured in the same process (one plain 4-bit greedy generation).

The goal (issue 25): with the embedded model, every variant's continuation of 32 new tokens plus the agreement
view within 30 s of pressing the button, on a free 2-core Space (idle cores).

    python -m bench.generate_time                        # the app's CPU-default init run (made once), then generate
    python -m bench.generate_time --from-run RUN         # generate from a finished init or train run
    python -m bench.generate_time --repeat 2             # two generate runs (the second with warm file caches)
    python -m bench.generate_time --through-app 3        # also press Generate 3 times through the served app.py
    python -m bench.generate_time --from-json runs/bench/generate_time.json     # reprint

The init run is the one the app's "Quantize & initialize" starts on a CPU (`default_settings(gpu=False)` through
the app's own form code: the embedded SmolLM2, every linear layer, svd + quailora, 16 x 256 calibration tokens,
2048 held-out tokens), made once into runs/bench/generate_time-init and reused while it is finished (--fresh-init
makes it again). The generate run is the app's default (`app/generation.py`: greedy, 32 new tokens, 4 held-out
documents, the start of a held-out document as the prompt), built by the app's form code and run by the same
`run_generate` the app's job runs; the clock starts where the job's worker calls it (the queue and the page's
one-second poll are not counted). Measured: seconds to the first token, to the last token of the last variant (the
last continuation) and to the finished event (the agreement strip, the over-documents shares and the top-10 view
are complete then), and the run's own per-stage seconds (report.json). The anchor, in the same process after the
generate runs: load the 4-bit base (`load_quantized`) and continue the same prompt greedily by the same number of
tokens, timed apart (load, tokens); the ratio generate / anchor carries over better between machines and loads than
the seconds do. With --through-app N the button is also pressed N times through the served app, first: app.py in
its own process, its API called as the page calls it (start, then the status polled once a second) by
bench.press_generate in a light process of its own (no torch: a visitor's browser is on another machine), timed
from the start call to the polled status saying finished, so the job queue and the poll are counted too. The thread
policy of app.py is applied before torch loads, and its heap policy (quailora_app/heap.py: what is alive after
startup is frozen out of the collector's sight) before the timed runs. Table on stdout, JSON
in runs/bench/generate_time.json (machine, load average at the start).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

from bench.common import (
    OUT,
    ROOT,
    add_json_args,
    command_line,
    fmt,
    machine,
    machine_line,
    markdown_table,
    reprint,
    write_json,
)
from quailora_app.threads import apply_thread_policy  # light: no torch

INIT_DIR = OUT / "generate_time-init"
GOAL_S = 30.0


def app_init_run(folder: Path, fresh: bool) -> Path:
    """The app's CPU-default init run in `folder`, made unless a finished one is there (or `fresh`)."""
    report_path = folder / "report.json"
    if report_path.is_file() and not fresh and json.loads(report_path.read_text()).get("status") == "finished":
        print(f"the app's CPU-default init run: {folder} (made before; --fresh-init to make it again)", file=sys.stderr)
        return folder  # read without torch: the served presses may come first
    from quailora_app.app.defaults import default_settings  # loads torch: after the thread policy
    from quailora_app.app.forms import make_init_config
    from quailora_app.config import InitConfig
    from quailora_app.flows.init import run_init
    from quailora_app.settings import settings
    known = settings(InitConfig)
    values = {k: v for k, v in default_settings(gpu=False).items() if k in known}
    shutil.rmtree(folder, ignore_errors=True)
    start = time.perf_counter()
    last = None
    for event in run_init(make_init_config({**values, "out": str(folder)})):
        last = event
    if getattr(last, "kind", None) != "finished":
        raise SystemExit(f"the init run failed: {getattr(last, 'message', last)}")
    print(f"made the app's CPU-default init run in {time.perf_counter() - start:.0f} s: {folder}", file=sys.stderr)
    return folder


def time_generate(from_run: Path, out: Path) -> dict:
    """One generate run as the app's default starts it; seconds to its milestones and its own stage seconds."""
    from quailora_app.app.generation import DEFAULTS, TAB_NAMES, make_generate_config
    from quailora_app.flows.generate import run_generate

    form = {name: DEFAULTS[setting] for name, setting in TAB_NAMES.items()}
    cfg = make_generate_config({**form, "gen_prompt_from": "held_out"}, str(from_run))
    shutil.rmtree(out, ignore_errors=True)
    start = time.perf_counter()
    first = last_token = None
    event = None
    for event in run_generate(cfg, run_dir=out):
        if event.kind == "token":
            first = first if first is not None else time.perf_counter() - start
            last_token = time.perf_counter() - start
    finished = time.perf_counter() - start
    if getattr(event, "kind", None) != "finished":
        raise SystemExit(f"the generate run failed: {getattr(event, 'message', event)}")
    report = event.report
    seconds = report.get("seconds") or {}
    return {"first_token_s": first, "last_continuation_s": last_token, "agreement_view_s": finished,
            "variants": report["variants"], "new_tokens": report["new_tokens"],
            "documents": (report.get("documents") or {}).get("n", 0),
            "stages": {k: round(v, 3) for k, v in seconds.items()}, "run_dir": str(out),
            "prompt": report["prompt"],
            "agreement": {n: {"top1_agreement": a["top1_agreement"], "mean_kl": a["mean_kl"]}
                          for n, a in report["agreement"].items()}}


def warm_up(from_run: Path) -> dict:
    """What app.py does at its start (QUAILORA_WARM): the 4-bit and 8-bit bases of the run's model quantized ahead
    and kept (flows.generate.warm_bases), so each generate run copies them; timed."""
    from quailora_app.config import ModelConfig, QuantConfig
    from quailora_app.flows.generate import read_run, warm_bases
    from quailora_app.settings import build

    values = read_run(str(from_run)).values
    start = time.perf_counter()
    line = warm_bases(build(ModelConfig, values), build(QuantConfig, values))
    return {"seconds": time.perf_counter() - start, "line": line}


def time_through_app(from_run: Path, repeat: int, warm: bool = True) -> list[dict]:
    """Generate pressed through the served app: app.py in a process of its own (its thread and heap policies, its
    job queue; bench.poll_time serves it), pressed by bench.press_generate in another, light process (no torch),
    as the page does (start with the page's defaults, then the status polled once a second). Seconds from the
    start call to the polled status saying finished, the run's own total and the client's CPU seconds."""
    from bench.poll_time import free_port, serve, stop

    root = from_run.parent  # the runs root the app lists its sources from (and writes its generate runs to)
    port = free_port()
    log = OUT / "generate_time-app.log"
    server = serve(root, port, log, {"QUAILORA_WARM": "1" if warm else "0"})
    try:
        done = subprocess.run([sys.executable, "-m", "bench.press_generate", "--port", str(port), "--log", str(log),
                               "--runs", str(root), "--from-run", from_run.name, "--presses", str(max(1, repeat)),
                               *([] if warm else ["--no-warm"])], cwd=ROOT, stdout=subprocess.PIPE, text=True)
        if done.returncode != 0:
            raise SystemExit(f"pressing Generate through the app failed (exit code {done.returncode})")
        found = json.loads(done.stdout)
    finally:
        stop(server)
    runs = found["presses"]
    if runs:
        runs[0]["warm_up_waited_s"] = found["warm_up_waited_s"] if warm else None
    bad = [r for r in runs if "finished" not in r["status"]]
    if bad:
        raise SystemExit(f"the generate job did not finish: {bad[0]['status']}")
    return runs


def time_anchor(from_run: Path, new_tokens: int, prompt_tokens: int = 16) -> dict:
    """One plain 4-bit greedy generation of `new_tokens` after the run's held-out prompt: load, then tokens."""
    import torch

    from quailora_app.config import DataConfig, ModelConfig, QuantConfig
    from quailora_app.engine.evaluation.agreement import continue_tokens
    from quailora_app.engine.quantization.load import load_quantized
    from quailora_app.flows.from_init import flat
    from quailora_app.flows.prepare import prepare
    from quailora_app.runs import RunFolder
    from quailora_app.settings import build
    from quailora_app.sources.models import pick_device

    values = flat((RunFolder(from_run).read_report() or {})["settings"])
    model_cfg, data_cfg, quant = build(ModelConfig, values), build(DataConfig, values), build(QuantConfig, values)
    device = pick_device(model_cfg.device)
    steps = prepare(model_cfg, data_cfg, quant, device, lambda name, _c: name, load_base=False)
    while True:  # the load sequence's events are not needed here, only what it returns
        try:
            next(steps)
        except StopIteration as done:
            prepared = done.value
            break
    prompt = prepared.splits.eval[:1, :prompt_tokens]  # the generate run's prompt: a held-out document's start
    start = time.perf_counter()
    base = load_quantized(prepared.source, quant, device, prepared.dtype)
    loaded = time.perf_counter() - start
    start = time.perf_counter()
    tokens = continue_tokens(base, prompt, new_tokens)
    generated = time.perf_counter() - start
    del base
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"load_4bit_s": loaded, "generate_s": generated, "total_s": loaded + generated, "tokens": len(tokens)}


def table(result: dict) -> str:
    anchor = result.get("anchor") or {}
    rows = []
    for i, run in enumerate(result.get("runs") or [], start=1):
        ratio = run["agreement_view_s"] / anchor["total_s"] if anchor.get("total_s") else None
        rows.append([i, fmt(run["first_token_s"], ".1f"), fmt(run["last_continuation_s"], ".1f"),
                     fmt(run["agreement_view_s"], ".1f"), fmt(ratio, ".1f", "x"),
                     "yes" if run["agreement_view_s"] <= GOAL_S else "no"])
    head = (f"generate from {result.get('from_run')}: {len((result.get('runs') or [{}])[0].get('variants', []))} "
            f"variants x {result.get('new_tokens')} new tokens, agreement over {result.get('documents')} held-out "
            f"documents\n{machine_line(result.get('machine') or {})}\n")
    lines = [head, markdown_table(["run", "first token (s)", "last continuation (s)", "agreement view (s)",
                                   "x anchor", f"within {GOAL_S:.0f} s"], rows)]
    if anchor:
        lines.append(f"\nanchor (same process): one plain 4-bit greedy generation of {anchor['tokens']} tokens: load "
                     f"{anchor['load_4bit_s']:.1f} s + tokens {anchor['generate_s']:.1f} s = "
                     f"{anchor['total_s']:.1f} s")
    warm = result.get("warm_up")
    lines.append(f"bases: {warm['line']} (app.py's warm-up; each run copies them)" if warm else
                 "bases: none quantized ahead (--no-warm): every run quantizes its own")
    last = (result.get("runs") or [None])[-1]
    if last:
        stages = ", ".join(f"{k} {v:.1f}" for k, v in last["stages"].items() if k != "total")
        lines.append(f"stages of the last run (s): {stages}")
    served = result.get("through_app") or []
    if served:
        waited = served[0].get("warm_up_waited_s")
        lines.append("" if waited is None else f"\nthrough the app: the first press came once app.py's warm-up had "
                                               f"ended, {waited:.1f} s after the app first answered")
        lines.append("\n" + markdown_table(
            ["through the app: run", "pressed -> finished (s)", "the run's own total (s)", "client CPU (s)",
             f"within {GOAL_S:.0f} s"],
            [[i, fmt(r["pressed_to_finished_s"], ".1f"), fmt(r["run_total_s"], ".1f"),
              fmt(r.get("client_cpu_s"), ".1f"), "yes" if r["pressed_to_finished_s"] <= GOAL_S else "no"]
             for i, r in enumerate(served, start=1)]))
    lines.append(f"\n{result.get('command', '')}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--from-run", type=Path, default=None,
                   help="a finished init or train run (default: the app's CPU-default init run, made once)")
    p.add_argument("--fresh-init", action="store_true", help="make the app's CPU-default init run again")
    p.add_argument("--repeat", type=int, default=1, help="generate runs to time (default 1)")
    p.add_argument("--no-anchor", action="store_true", help="skip the plain 4-bit anchor")
    p.add_argument("--no-warm", action="store_true",
                   help="no bases quantized ahead (app.py's warm-up; served with QUAILORA_WARM=0): every run quantizes")
    p.add_argument("--through-app", type=int, default=0, metavar="N",
                   help="also press Generate N times through the served app (app.py in its own process, its API "
                        "polled once a second as the page does, from a light client process), before the "
                        "in-process runs")
    add_json_args(p, str(OUT / "generate_time.json"), resume=False)
    args = p.parse_args(argv)
    if reprint(args, table):
        return 0
    policy = apply_thread_policy()  # before torch loads, as app.py does
    at_start = machine()
    from_run = args.from_run or app_init_run(INIT_DIR, args.fresh_init)
    result = {"command": command_line(__file__, argv), "machine": at_start, "thread_policy": policy.describe(),
              "from_run": str(from_run), "runs": []}
    if args.through_app:  # first, while this process holds nothing of its own (it waits for the client)
        result["through_app"] = time_through_app(from_run, args.through_app, warm=not args.no_warm)
        write_json(result, args.json)
    import quailora_app.app.generation  # noqa: F401 - what the app has imported when its button is pressed
    import quailora_app.flows.generate  # noqa: F401
    from quailora_app.heap import freeze_startup_heap

    freeze_startup_heap()  # as app.py does once the page is built
    if not args.no_warm:  # as app.py does at its start: Generate's two bases quantized ahead
        result["warm_up"] = warm_up(from_run)
        print(result["warm_up"]["line"], file=sys.stderr)
    for i in range(max(1, args.repeat)):
        run = time_generate(from_run, OUT / f"generate_time-run{i + 1}")
        result["runs"].append(run)
        result.update(new_tokens=run["new_tokens"], documents=run["documents"])
        write_json(result, args.json)
        print(f"run {i + 1}: last continuation {run['last_continuation_s']:.1f} s, agreement view "
              f"{run['agreement_view_s']:.1f} s", file=sys.stderr)
    if not args.no_anchor:
        result["anchor"] = time_anchor(from_run, result["new_tokens"])
    result["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    write_json(result, args.json)
    print(table(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
