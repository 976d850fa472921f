"""What polling costs the app's own job: the live init, unpolled and polled through the app's API, in one run.

    python -m bench.poll_time                          # 2 pairs: unpolled, polled every 1 s (the page's pace)
    python -m bench.poll_time --interval 0.5 --repeat 3
    python -m bench.poll_time --from-json runs/bench/poll_time.json                   # reprint

The app is served in a fresh child process exactly as `python app.py` serves it (thread policy applied before torch
loads, the page's own JobManager), on 127.0.0.1 with its runs root in a temp folder. Every init is started through
/start_init with the page's Setup defaults (the endpoint's own default values: on the CPU the embedded SmolLM2,
every linear layer, 16 x 256 calibration tokens, qlora + svd + quailora, 2048 held-out tokens, baselines). A first,
unmeasured run warms the imports and the perplexity cache. Then each measured pair: "unpolled" waits on the run
folder's report.json (a file read per interval, no request), "polled" calls the status endpoint (--endpoint,
default /init_status, the public one; the page's own timer calls a private endpoint that gradio_client cannot)
every --interval seconds, the page timer's pace. The pairs alternate their order
(unpolled first, then polled first, ...) so a drift in the machine's load falls on both. The figure is the
flow's own total (report.json seconds.total): only the job's time counts.

The unpolled runs of the same invocation are the anchor: the table gives per run its seconds, status calls and
their mean duration, and the load average before it; then the mean unpolled and polled seconds, their ratio and
the goal (polled at most 1.05 x unpolled). Measure on idle cores.
"""
from __future__ import annotations

import argparse
import os
import socket
import statistics
import subprocess
import sys
import tempfile
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
    read_json,
    reprint,
    write_json,
)

#: polled / unpolled flow seconds the page's polling may cost at most
GOAL = 1.05
ENDED = ("finished", "failed", "cancelled", "stopped")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(runs: Path, port: int, log: Path, env_more: dict[str, str] | None = None) -> subprocess.Popen:
    """`python app.py` in a child process, its runs in `runs`, its output in `log` (`env_more`: more variables)."""
    env = {**os.environ, "QUAILORA_RUNS": str(runs), "GRADIO_ANALYTICS_ENABLED": "False",
           "GRADIO_SERVER_NAME": "127.0.0.1", "GRADIO_SERVER_PORT": str(port), **(env_more or {})}
    env.pop("PORT", None)
    with open(log, "w") as out:
        return subprocess.Popen([sys.executable, "app.py"], cwd=ROOT, env=env, stdout=out, stderr=subprocess.STDOUT)


def connect(port: int, server: subprocess.Popen | None, log: Path, timeout: float = 300):
    """A gradio_client on the app at `port`, once it answers; the app's `log` tail when it does not within
    `timeout` s or its process (`server`, when this process started it) has ended."""
    from gradio_client import Client

    deadline = time.time() + timeout
    while True:
        try:
            return Client(f"http://127.0.0.1:{port}/", verbose=False)
        except Exception:  # noqa: BLE001 - not up yet
            ended = server is not None and server.poll() is not None
            if ended or time.time() > deadline:
                tail = log.read_text()[-2000:] if log.is_file() else ""
                code = f" (exit code {server.poll()})" if server is not None else f" within {timeout:.0f} s"
                raise SystemExit(f"the app did not start{code}:\n{tail}") from None
            time.sleep(1)


def start_settings(client) -> dict:
    """/start_init's inputs beside the session: the page's own defaults, None where an input has none (no
    upload, no text column)."""
    api = client.view_api(return_format="dict", print_info=False)
    params = api["named_endpoints"]["/start_init"]["parameters"]
    return {p["parameter_name"]: None for p in params[1:] if not p.get("parameter_has_default")}


def latest_report(runs: Path, before: set[Path]) -> dict | None:
    """report.json of the init run folder (runs/init-<time>) that appeared after `before`, once it has ended; None
    before that."""
    new = sorted((p for p in set(runs.glob("init-*")) - before if p.is_dir()), key=lambda p: p.stat().st_mtime)
    if not new or not (new[-1] / "report.json").is_file():
        return None
    try:
        report = read_json(new[-1] / "report.json")
    except ValueError:  # caught mid-write: read it again next time
        return None
    return report if report.get("status") in ENDED else None


def run_once(client, session: dict, settings: dict, runs: Path, polled: bool, args) -> dict:
    """One init through /start_init, polled or not, until its report.json says it has ended."""
    before = set(runs.iterdir())
    load = os.getloadavg()[0]
    session, job_id, _ = client.predict(session, **settings, api_name="/start_init")
    calls, call_seconds = 0, 0.0
    started = time.perf_counter()
    report = None
    while report is None:
        time.sleep(args.interval)
        if polled:
            t0 = time.perf_counter()
            client.predict(session=session, job_id=job_id, api_name=args.endpoint)
            call_seconds += time.perf_counter() - t0
            calls += 1
        report = latest_report(runs, before)
        if time.perf_counter() - started > args.run_timeout:
            raise SystemExit(f"the init did not end within {args.run_timeout:.0f} s")
    seconds = report.get("seconds") or {}
    return {"polled": polled, "total": seconds.get("total"), "status": report.get("status"), "calls": calls,
            "mean_call_seconds": call_seconds / calls if calls else None, "load_before": round(load, 2),
            "stages": {k: v for k, v in seconds.items() if isinstance(v, (int, float))}, "session": session}


def measure(args) -> dict:
    work = Path(tempfile.mkdtemp(prefix="poll-time-"))
    runs, log = work / "runs", work / "app.log"
    runs.mkdir()
    port = free_port()
    server = serve(runs, port, log)
    result = {"command": command_line(__file__), "machine": machine(with_torch=False),
              "interval": args.interval, "endpoint": args.endpoint, "rows": []}
    try:
        client = connect(port, server, log)
        session = client.predict({}, api_name="/attach")[0]
        settings = start_settings(client)
        warm = run_once(client, session, settings, runs, False, args)  # the imports and the perplexity cache
        session = warm.pop("session")
        result["warm_up"] = warm
        print(f"warm-up run: {fmt(warm['total'], '.1f')} s ({warm['status']})", file=sys.stderr, flush=True)
        for i in range(args.repeat):
            for polled in ((False, True) if i % 2 == 0 else (True, False)):
                row = run_once(client, session, settings, runs, polled, args)
                session = row.pop("session")
                result["rows"].append(row)
                print(f"{'polled' if polled else 'unpolled'}: {fmt(row['total'], '.1f')} s ({row['status']}, "
                      f"{row['calls']} calls)", file=sys.stderr, flush=True)
                write_json(result, args.json)
    finally:
        stop(server)
    return result


def stop(server: subprocess.Popen) -> None:
    """End the served app: terminated, killed if it has not ended 30 s later."""
    server.terminate()
    try:
        server.wait(timeout=30)
    except subprocess.TimeoutExpired:
        server.kill()
        server.wait()


def table(result: dict) -> str:
    rows = result["rows"]
    ok = [r for r in rows if r["status"] == "finished" and r["total"]]
    unpolled = [r["total"] for r in ok if not r["polled"]]
    polled = [r["total"] for r in ok if r["polled"]]
    calls = [r["mean_call_seconds"] for r in ok if r["polled"] and r["mean_call_seconds"]]
    interval = f"every {result['interval']:g} s"
    lines = [f"# live init (the page's CPU defaults) unpolled and polled {interval} through {result['endpoint']}; "
             f"{machine_line(result.get('machine', {}))}", "",
             markdown_table(["run", "flow seconds", "status", "status calls", "mean call (ms)",
                             "load average before"],
                            [[f"{i + 1}: {'polled' if r['polled'] else 'unpolled'}", fmt(r["total"], ".1f"),
                              r["status"], r["calls"] if r["polled"] else "-",
                              fmt(1000 * r["mean_call_seconds"] if r["mean_call_seconds"] else None, ".0f"),
                              f"{r['load_before']:.2f}"] for i, r in enumerate(rows)]), ""]
    if not unpolled or not polled:
        lines.append("no finished unpolled and polled runs to compare")
        return "\n".join(lines)
    ratio = statistics.mean(polled) / statistics.mean(unpolled)
    lines.append(markdown_table(
        ["live init", "unpolled seconds (anchor)", f"polled {interval}, seconds", "polled / unpolled", "goal",
         "mean status call (ms)"],
        [[f"mean of {len(unpolled)} + {len(polled)}", f"{statistics.mean(unpolled):.1f}",
          f"{statistics.mean(polled):.1f}", f"{ratio:.3f}",
          f"<= {GOAL:g}: {'met' if ratio <= GOAL else 'NOT met'}",
          fmt(1000 * statistics.mean(calls) if calls else None, ".0f")]]))
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--interval", type=float, default=1.0, help="seconds between status calls (the page's: 1)")
    p.add_argument("--repeat", type=int, default=2, help="measured pairs (unpolled and polled, order alternating)")
    p.add_argument("--endpoint", default="/init_status",
                   help="the status endpoint polled, called with (session, job_id) by name")
    p.add_argument("--run-timeout", type=float, default=900, help="seconds before one init is given up")
    add_json_args(p, str(OUT / "poll_time.json"), resume=False)
    args = p.parse_args(argv)
    if reprint(args, table):
        return 0
    result = measure(args)
    write_json(result, args.json)
    print(table(result))
    print(f"\nJSON in {args.json}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
