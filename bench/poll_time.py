"""What polling costs the app's own job: the live init, unpolled and polled through the app's API every second.

    python bench/poll_time.py                      # unpolled, then polled every 1 s (gradio_client, /init_status)
    python bench/poll_time.py --interval 0.5 --repeat 2

The app is served in a fresh child process (thread policy applied before torch loads, as app.py does) with the
CPU defaults of the page's Setup (`default_settings(gpu=False)`: embedded SmolLM2, every linear layer, 16 x 256
calibration tokens, svd + quailora, 2048 held-out tokens, baselines; their perplexity cache warmed by a first run).
Each measured init is started through /start_init; "unpolled" then waits on the run folder's report.json (a file
read per second, no request), "polled" calls /init_status every `--interval` seconds as the page's own timer does,
which returns the figures each time. The figure is the flow's own total (report.json seconds.total), so only the
job's time counts. Measure on idle cores; the table gives the ratio polled / unpolled.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

SERVE = """
import os, sys
sys.path.insert(0, {root!r})
from quailora_app.threads import apply_thread_policy
apply_thread_policy()
from quailora_app.app.jobs import JobManager
from quailora_app.app.ui import build_ui, launch_options
demo = build_ui(JobManager(gpu=False))
demo.launch(server_name="127.0.0.1", server_port={port}, quiet=True, **launch_options())
"""


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_init(client, session) -> tuple[dict, str]:
    sys.path.insert(0, str(ROOT))
    from quailora_app.app.ui import default_settings

    d = default_settings(gpu=False)
    settings = dict(model="embedded", dataset="embedded", upload=None, text_column=None, quant="nf4",
                    double_quant=True, block_size=64, rank=16, alpha=16, rslora=False, targets=d["targets"],
                    calib_samples=d["calib_samples"], seq_len=d["seq_len"], eval_tokens=d["eval_tokens"], seed=0)
    session, job_id, _ = client.predict(session, **settings, methods=d["methods"], baselines=d["baselines"],
                                        als_rounds=20, damping=0.01, api_name="/start_init")
    return session, job_id


def run_once(client, session, runs: Path, polled: bool, interval: float) -> dict:
    before = set(runs.glob("*"))
    session, job_id = start_init(client, session)
    calls, call_seconds = 0, 0.0
    report = None
    while report is None or report.get("status") not in ("finished", "failed", "cancelled"):
        time.sleep(interval)
        if polled:
            start = time.perf_counter()
            client.predict(session, job_id, api_name="/init_status")
            call_seconds += time.perf_counter() - start
            calls += 1
        new = sorted(set(runs.glob("*")) - before)
        if new and (new[-1] / "report.json").is_file():
            try:
                report = json.loads((new[-1] / "report.json").read_text())
            except ValueError:
                report = None  # caught mid-write: read it again next time
    return {"polled": polled, "total": report["seconds"].get("total"), "status": report.get("status"),
            "calls": calls, "mean_call_seconds": call_seconds / calls if calls else None,
            "load_before": os.getloadavg(), "session": session}


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--interval", type=float, default=1.0, help="seconds between status calls (the page's: 1)")
    p.add_argument("--repeat", type=int, default=1, help="measured pairs (unpolled, polled)")
    p.add_argument("--json", default="runs/bench/poll_time.json")
    args = p.parse_args(argv)
    from gradio_client import Client

    work = Path(tempfile.mkdtemp(prefix="poll-time-"))
    runs = work / "runs"
    runs.mkdir()
    port = free_port()
    env = {**os.environ, "QUAILORA_RUNS": str(runs), "GRADIO_ANALYTICS_ENABLED": "False"}
    server = subprocess.Popen([sys.executable, "-c", SERVE.format(root=str(ROOT), port=port)], env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    rows = []
    try:
        deadline = time.time() + 180
        while True:
            try:
                client = Client(f"http://127.0.0.1:{port}/", verbose=False)
                break
            except Exception:  # noqa: BLE001 - not up yet
                if time.time() > deadline or server.poll() is not None:
                    raise SystemExit("the app did not start") from None
                time.sleep(1)
        session, _, _, _ = client.predict({}, api_name="/attach")
        warm = run_once(client, session, runs, False, 1.0)  # fills the perplexity cache and warms the imports
        session = warm["session"]
        print(f"warm-up run: {warm['total']:.1f} s ({warm['status']})", flush=True)
        for _ in range(args.repeat):
            for polled in (False, True):
                row = run_once(client, session, runs, polled, args.interval)
                session = row.pop("session")
                rows.append(row)
                print(json.dumps(row), flush=True)
    finally:
        server.terminate()
        server.wait(timeout=30)
    unpolled = [r["total"] for r in rows if not r["polled"]]
    polled = [r["total"] for r in rows if r["polled"]]
    calls = [r["mean_call_seconds"] for r in rows if r["polled"] and r["mean_call_seconds"]]
    print()
    print(f"| live init (app defaults, CPU) | unpolled | polled every {args.interval:g} s | polled / unpolled | "
          "mean /init_status call |")
    print("|---|---|---|---|---|")
    mean = lambda v: sum(v) / len(v)  # noqa: E731
    print(f"| flow seconds (mean of {len(unpolled)}) | {mean(unpolled):.1f} | {mean(polled):.1f} | "
          f"{mean(polled) / mean(unpolled):.3f} | {1000 * mean(calls):.0f} ms |")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({"args": vars(args), "rows": rows}, indent=1))
    return rows


if __name__ == "__main__":
    main()
