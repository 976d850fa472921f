"""How long the app's live init takes on the CPU, stage by stage, idle and beside a competing process.

The configuration is the one the app builds from `default_settings(gpu=False)` (app/ui.py) through its own form
code: the embedded SmolLM2, every linear layer, 16 x 256 calibration tokens, svd + quailora, 2048 held-out tokens,
the 8-bit and full-precision baselines. Each measured run is a fresh child process that applies the thread policy
before torch loads (as app.py does) and runs the same `run_init` the app's job runs; its time counts from the flow's
first event (imports and the app's own start are not counted, they are shown apart). The stages come from the
run's report (`seconds`) and from the time stamps of its events.jsonl.

    python -m bench.demo_time                                # idle; perplexity cache warm (a cold run fills it)
    python -m bench.demo_time --cache cold                   # every perplexity measured, as on a fresh machine
    python -m bench.demo_time --compete 2 --compare-idle     # idle, then beside a 2-thread matmul loop: the ratio
    python -m bench.demo_time --from-json runs/bench/demo_time.json                   # reprint
    python -m bench.demo_time --methods qlora svd closed_form --threads native        # variants

Perplexity cache: the children use the bench's own folder (runs/bench/demo_time-cache, kept between invocations;
--cache cold gives each run an empty one). With --cache warm a run that still measured a cached perplexity is
shown as "cold" and followed by a warm one. After the init runs, `train --from-init` from the last idle init run
is timed (seconds to the first optimizer step and to the last evaluation; --no-train skips it). The competitor
(`--compete N`) is a plain torch process, N threads multiplying 1024 x 1024 matrices with OpenMP's default waiting,
started a second before the measured run and ended after it. Table on stdout, JSON in runs/bench/demo_time.json.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench.common import OUT, ROOT, add_json_args, machine, module_command, reprint, write_json  # light
from quailora_app.threads import THREADS_ENV, apply_thread_policy  # light: no torch

CACHE = OUT / "demo_time-cache"
CACHE_ENV = "QUAILORA_PERPLEXITY_CACHE"  # engine/evaluation/perplexity_cache.py (not imported here: it loads torch)
CACHED = ("qlora", "int8", "full")
#: what a competitor must not inherit from us: it stands for any other program on the machine
POLICY_VARS = (THREADS_ENV, "OMP_WAIT_POLICY", "KMP_BLOCKTIME", "OMP_NUM_THREADS", "MKL_NUM_THREADS")


# ------------------------------------------------------------------------------------------------ child processes
def app_init_config(out: str, overrides: dict):
    """The InitConfig the app's form builds from the CPU defaults (plus `overrides`), run folder `out`."""
    from quailora_app.app.forms import make_init_config  # the child only: the app's form code loads torch
    from quailora_app.app.ui import default_settings  # the same
    from quailora_app.config import InitConfig  # the same
    from quailora_app.settings import settings  # the same

    known = settings(InitConfig)
    values = {k: v for k, v in default_settings(gpu=False).items() if k in known}
    return make_init_config({**values, **overrides, "out": out})


def app_train_config(init_dir: str, out: str):
    """The train settings of the CPU defaults, started from the init run `init_dir`."""
    from quailora_app.app.ui import default_settings  # the child only: loads torch
    from quailora_app.config import TrainConfig  # the same
    from quailora_app.flows.from_init import train_config_from_init  # the same
    from quailora_app.settings import settings  # the same

    known = settings(TrainConfig)
    given = {k: v for k, v in default_settings(gpu=False).items()
             if k in known and k in ("steps", "batch_size", "eval_every", "learning_rate")}
    return train_config_from_init(init_dir, **given, out=out)


def child(spec_path: str) -> int:
    """Run one flow as the app would and write what the parent needs beside the spec."""
    started = time.time()
    policy = apply_thread_policy()  # before torch loads, as app.py does
    spec = json.loads(Path(spec_path).read_text())
    import torch  # after the thread policy

    result = {"policy": policy.describe(), "threads": torch.get_num_threads(), "pid": os.getpid()}
    if spec["flow"] == "init":
        from quailora_app.flows.init import run_init  # the flow: after the policy

        cfg = app_init_config(spec["out"], spec["overrides"])
        stream = run_init(cfg)
    else:
        from quailora_app.flows.train import run_train  # the flow: after the policy

        stream = run_train(app_train_config(spec["init_dir"], spec["out"]))
    result["startup_s"] = time.time() - started
    last = None
    for event in stream:
        last = event
    result["status"] = getattr(last, "kind", None)
    result["message"] = getattr(last, "message", "")
    result["run_dir"] = spec["out"]
    Path(spec["result"]).write_text(json.dumps(result))
    return 0 if result["status"] == "finished" else 1


def competitor(threads: int) -> int:
    """N threads multiplying matrices until SIGTERM: says "ready" after its first product, then at the end the
    products per second."""
    stop = []
    signal.signal(signal.SIGTERM, lambda *_: stop.append(1))
    import torch  # a separate process standing for another program: its own torch, default OpenMP waiting

    torch.set_num_threads(threads)
    a, b = torch.randn(1024, 1024), torch.randn(1024, 1024)
    torch.mm(a, b)
    print("ready", flush=True)
    parent, count, start = os.getppid(), 0, time.perf_counter()
    while not stop and os.getppid() == parent:
        torch.mm(a, b)
        count += 1
    print(json.dumps({"matmuls_per_s": count / (time.perf_counter() - start), "threads": threads}), flush=True)
    return 0


# ------------------------------------------------------------------------------------------------ the parent
def spawn_competitor(threads: int) -> subprocess.Popen:
    env = {k: v for k, v in os.environ.items() if k not in POLICY_VARS}
    env["OMP_NUM_THREADS"] = str(threads)
    proc = subprocess.Popen(module_command(__file__, "--competitor", str(threads)), env=env, cwd=ROOT,
                            stdout=subprocess.PIPE, text=True)
    if proc.stdout.readline().strip() != "ready":  # its torch import and first product, not the measured run's
        proc.kill()
        raise RuntimeError("the competing process did not start")
    time.sleep(1.0)
    return proc


def stop_competitor(proc: subprocess.Popen) -> dict:
    proc.send_signal(signal.SIGTERM)
    try:
        out, _ = proc.communicate(timeout=30)
        return json.loads(out.strip().splitlines()[-1])
    except (subprocess.TimeoutExpired, ValueError, IndexError):
        proc.kill()
        proc.wait()
        return {}


def run_child(flow: str, label: str, args, cache: Path | None, compete: int = 0, init_dir: str | None = None) -> dict:
    """One flow in a fresh process; the parsed run (stages) or the reason it has none."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    folder = OUT / "demo_time" / f"{flow}-{''.join(c if c.isalnum() else '-' for c in label)}-{stamp}"
    folder.parent.mkdir(parents=True, exist_ok=True)
    spec = {"flow": flow, "out": str(folder), "result": str(folder) + ".result.json", "init_dir": init_dir,
            "overrides": overrides(args)}
    spec_path = Path(str(folder) + ".spec.json")
    spec_path.write_text(json.dumps(spec))
    env = dict(os.environ)
    if cache is not None:
        env[CACHE_ENV] = str(cache)
    if args.threads:
        env[THREADS_ENV] = args.threads
    load_before = os.getloadavg()
    rival = spawn_competitor(compete) if compete else None
    try:
        proc = subprocess.run(module_command(__file__, "--child", str(spec_path)), env=env, cwd=ROOT)
    finally:
        rival_rate = stop_competitor(rival) if rival else None
    result = json.loads(Path(spec["result"]).read_text()) if Path(spec["result"]).is_file() else {}
    result.update(label=label, flow=flow, compete=compete, competitor=rival_rate, load_before=load_before,
                  exit_code=proc.returncode)
    if result.get("run_dir") and flow == "init":
        result.update(init_stages(Path(result["run_dir"])))
    elif result.get("run_dir"):
        result.update(train_stages(Path(result["run_dir"])))
    print(f"  {label}: {summary_line(result)}", file=sys.stderr, flush=True)
    return result


def overrides(args) -> dict:
    """Form values over the app's defaults: --methods, --targets and each --set NAME=VALUE (VALUE read as JSON
    where it is JSON: numbers, true/false, lists)."""
    values = {k: v for k, v in (("methods", args.methods), ("targets", args.targets)) if v}
    for item in args.set or ():
        name, _, raw = item.partition("=")
        try:
            values[name.strip()] = json.loads(raw)
        except ValueError:
            values[name.strip()] = raw
    return values


def read_run(folder: Path) -> tuple[dict, list[dict]]:
    report = json.loads((folder / "report.json").read_text())
    events = [json.loads(line) for line in (folder / "events.jsonl").read_text().splitlines() if line.strip()]
    return report, events


def init_stages(folder: Path) -> dict:
    """Seconds by stage of an init run: the load stages from its Stage events' time stamps, the rest from its
    report's seconds; 'other' is what none of them accounts for (report writes, gap figures, freeing memory)."""
    report, events = read_run(folder)
    seconds = report.get("seconds", {})
    starts = {}
    for e in events:
        if e["kind"] == "stage":
            starts.setdefault(e["stage"], e["time"])
    t0, t_end = events[0]["time"], events[-1]["time"]
    stages: dict[str, float] = {}

    def span(name: str, start: str, end: str) -> None:
        if start in starts and end in starts:
            stages[name] = starts[end] - starts[start]

    span("load (resolve, config, tokenizer)", "load", "data")
    span("data (read, tokenize, NaN check)", "data", "quantize")
    span("quantize (4-bit load)", "quantize", "calibrate")
    stages["calibration"] = seconds.get("calibrate", 0.0)
    methods = [m for m in report.get("methods", []) if m != "qlora"]
    for m in methods:
        if m in seconds:
            stages[f"{m}: math"] = seconds[m]
    if "self_check" in seconds:
        stages["self-check (held-out, each layer's own product)"] = seconds["self_check"]
    if "attach" in seconds:
        stages["attach LoRA"] = seconds["attach"]
    cached = report.get("perplexity_cached", {})
    read = []  # the stages whose perplexity came from the cache
    for m in report.get("methods", []):
        if f"eval_{m}" in seconds:
            stages[f"perplexity {m}"] = seconds[f"eval_{m}"]
            read += [f"perplexity {m}"] if m in cached else []
    saves = sum(v for k, v in seconds.items() if k.startswith("save_"))
    if saves:
        stages["save adapters (all methods)"] = saves
    for name, what in (("int8", "8-bit"), ("full", "full precision")):
        if f"eval_{name}" in seconds:
            stages[f"baseline {what} (load + perplexity)"] = seconds[f"eval_{name}"]
            read += [f"baseline {what} (load + perplexity)"] if name in cached else []
    total = seconds.get("total", t_end - t0)
    stages["other (reports, figures, memory)"] = total - sum(stages.values())
    return {"stages": stages, "total": total, "wall": t_end - t0, "cached": sorted(cached), "read": read,
            "perplexity": report.get("perplexity", {}), "status": report.get("status"),
            "device": report.get("device"), "targets": report.get("target_modules"),
            "tokens": report.get("tokens"), "methods": report.get("methods")}


def train_stages(folder: Path) -> dict:
    """Seconds from a train run's first event to its first optimizer step and to its last evaluation."""
    report, events = read_run(folder)
    t0 = events[0]["time"]
    steps = [e for e in events if e["kind"] == "train_step"]
    evals = [e for e in events if e["kind"] == "eval"]
    stages = {"until the first TrainStep": steps[0]["time"] - t0 if steps else None,
              "until the last EvalPoint": evals[-1]["time"] - t0 if evals else None,
              "whole run": events[-1]["time"] - t0}
    return {"stages": stages, "total": stages["whole run"], "wall": events[-1]["time"] - t0,
            "steps": len(steps), "evaluations": len(evals), "status": report.get("status"),
            "arms": report.get("arms"), "from_init": report.get("from_init")}


def summary_line(run: dict) -> str:
    if "stages" not in run:
        return f"no run (exit code {run.get('exit_code')}; {run.get('message', '')})"
    cached = f", cached: {', '.join(run['cached'])}" if run.get("cached") else ""
    return f"{run['total']:.1f} s ({run.get('status')}{cached}; {run.get('policy', '')})"


def needs_fill(run: dict) -> bool:
    """The run measured a perplexity the cache could have given it: it was a cold run."""
    return "stages" in run and not set(CACHED) <= set(run.get("cached", ()))


def measure(args) -> dict:
    """The runs the flags ask for, in order: idle (with --compare-idle or without --compete), then beside the
    competitor; each cold or warm; then the train run."""
    runs: list[dict] = []
    fresh = Path(tempfile.mkdtemp(prefix="demo-time-cache-")) if args.cache == "cold" else None

    def cache_for() -> Path:
        if args.cache == "warm":
            return CACHE
        folder = Path(tempfile.mkdtemp(prefix="empty-", dir=fresh))
        return folder

    conditions = ([0] if (not args.compete or args.compare_idle) else []) + ([args.compete] if args.compete else [])
    for compete in conditions:
        label = f"compete {compete}" if compete else "idle"
        run = run_child("init", f"{label}, {args.cache}", args, cache_for(), compete)
        if args.cache == "warm" and needs_fill(run):
            run["label"] = f"{label}, cold (filled the cache)"
            runs.append(run)
            run = run_child("init", f"{label}, warm", args, CACHE, compete)
        runs.append(run)
    train = None
    source = next((r for r in reversed(runs) if "stages" in r and not r["compete"]), None) or \
        next((r for r in reversed(runs) if "stages" in r), None)
    if not args.no_train and source is not None:
        train = run_child("train", "train --from-init", args, cache_for(), source["compete"],
                          init_dir=source["run_dir"])
    if fresh is not None:
        shutil.rmtree(fresh, ignore_errors=True)
    return {"argv": sys.argv[1:], "cpus": os.cpu_count(), "machine": machine(with_torch=False),
            "when": time.strftime("%Y-%m-%d %H:%M:%S"),
            "runs": runs, "train": train}


def table(data: dict) -> str:
    runs = [r for r in data["runs"] if "stages" in r]
    lines = [f"# python -m bench.demo_time {' '.join(data.get('argv', []))} | {data.get('when', '')} | "
             f"{data.get('cpus')} CPUs"]
    if runs:
        r = runs[0]
        lines.append(f"{r.get('device')} | targets {', '.join(r.get('targets') or [])} | methods "
                     f"{', '.join(r.get('methods') or [])} | tokens {r.get('tokens')} | {r.get('policy', '')}")
    for r in data["runs"]:
        if "stages" not in r:
            lines.append(f"{r['label']}: {summary_line(r)}")
    if runs:
        names = list(dict.fromkeys(name for r in runs for name in r["stages"]))
        head = [r["label"] for r in runs]
        idle = next((r for r in runs if not r["compete"] and not needs_fill(r)), None) or \
            next((r for r in runs if not r["compete"]), None)
        rival = next((r for r in runs if r["compete"] and not needs_fill(r)), None) or \
            next((r for r in runs if r["compete"]), None)
        ratio = idle is not None and rival is not None
        lines += ["", "| stage | " + " | ".join(head) + (" | compete / idle |" if ratio else " |"),
                  "|---|" + "---|" * (len(head) + ratio)]

        for name in [*names, "total (flow)", "wall (first to last event)", "startup (imports; not counted)"]:
            key = {"total (flow)": "total", "wall (first to last event)": "wall",
                   "startup (imports; not counted)": "startup_s"}.get(name)
            values = [(r.get(key) if key else r["stages"].get(name)) for r in runs]
            row = " | ".join("-" if v is None else f"{v:.2f}" + (" cached" if name in r.get("read", ()) else "")
                             for r, v in zip(runs, values))
            share = ""
            if ratio:
                a = idle.get(key) if key else idle["stages"].get(name)
                b = rival.get(key) if key else rival["stages"].get(name)
                share = f" | {b / a:.2f}x" if a and b is not None and a > 0.05 else " | -"
            lines.append(f"| {name} | {row}{share} |")
        for r in runs:
            rate = (r.get("competitor") or {}).get("matmuls_per_s")
            extra = f", competitor {rate:.1f} matmuls/s" if rate else ""
            lines.append(f"\n{r['label']}: load average before {', '.join(f'{x:.2f}' for x in r['load_before'])}"
                         f"{extra}; perplexities " + ", ".join(f"{k} {v:.3f}" for k, v in r["perplexity"].items()))
        if ratio:
            lines.append(f"\nflow total beside a {rival['compete']}-thread process / idle: "
                         f"{rival['total'] / idle['total']:.2f}x (goal: at most 2.5x); idle total "
                         f"{idle['total']:.1f} s (goal: within 60 s on 2 idle cores)")
    train = data.get("train")
    if train:
        lines.append("")
        if "stages" in train:
            lines.append(f"train --from-init ({train['label']}; arms {', '.join(train.get('arms') or [])}, "
                         f"{train['steps']} steps, {train['evaluations']} evaluations, status {train['status']}):")
            lines += [f"  {name}: {'-' if v is None else f'{v:.2f} s'}" for name, v in train["stages"].items()]
        else:
            lines.append(f"train --from-init: {summary_line(train)}")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--compete", type=int, default=0, metavar="N",
                   help="run beside a competing process of N threads (a torch matmul loop)")
    p.add_argument("--compare-idle", action="store_true", help="with --compete: an idle run first, and the ratio")
    p.add_argument("--cache", choices=("warm", "cold"), default="warm",
                   help="warm: the bench's perplexity cache (a cold run fills it first); cold: an empty one per run")
    p.add_argument("--methods", nargs="+", help="instead of the app's CPU default methods")
    p.add_argument("--targets", nargs="+", help="instead of the app's CPU default targets")
    p.add_argument("--set", action="append", metavar="NAME=VALUE",
                   help="any other form setting over the app's defaults, e.g. --set calib_samples=4 (a smaller run)")
    p.add_argument("--threads", help=f"{THREADS_ENV} for the runs (auto, native, N); default: as set here")
    p.add_argument("--no-train", action="store_true", help="skip the train --from-init timing")
    add_json_args(p, str(OUT / "demo_time.json"), resume=False)
    p.add_argument("--child", help=argparse.SUPPRESS)
    p.add_argument("--competitor", type=int, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.child:
        return child(args.child)
    if args.competitor:
        return competitor(args.competitor)
    if reprint(args, table):
        return 0
    data = measure(args)
    write_json(data, args.json)
    print(table(data))
    print(f"\n(JSON in {args.json})", file=sys.stderr)
    return 0 if all("stages" in r for r in data["runs"]) else 1


if __name__ == "__main__":
    sys.exit(main())
