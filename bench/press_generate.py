"""Press Generate through a served app.py as the page does, from a process that loads no torch: a visitor's browser
is on another machine, so the client here should weigh as little as it can on the 2 cores the app computes on (a
client process holding torch and a finished in-process run spent 2.4 s of CPU a press polling, a fresh one 1.4 s).

    python -m bench.press_generate --port P --log LOG --runs RUNS --from-run NAME --presses N

Waits for the app's warm-up line in LOG (bench.generate_time starts the app), attaches a session, lists the runs,
then presses N times: /start_generate with the page's own defaults beside the run and "held_out" prompt, then
the page's own timer poll (/poll_generate, once a second, sending only what changed since the last) until its
status says the job ended. (The public /generate_status draws and sends every output at every call: a script's
full state, heavier than the page: the same press took 24.8 s polled through it against 20.8 and 18.6 s watched
through its report.json.) Prints one JSON object: per press, seconds from the
start call to the status saying finished, the run's own total (its report.json) and this process's CPU seconds.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import httpx
from gradio_client import Client

from bench.poll_time import ENDED, connect  # light: no torch

WARM_LINES = ("quantized ahead", "not made ahead", "no bases made ahead")


def wait_for_warm_up(log: Path, timeout: float = 120.0) -> float:
    """Seconds until the served app's log says its warm-up ended (made or not), from now."""
    start = time.perf_counter()
    while time.perf_counter() - start < timeout:
        text = log.read_text() if log.is_file() else ""
        if any(line in text for line in WARM_LINES):
            break
        time.sleep(0.5)
    return time.perf_counter() - start


def poll(http: httpx.Client, session_hash: str, session, job: str, seen: dict) -> list:
    """One call of the page's timer poll as the page makes it: a plain POST of its inputs under the page's
    session hash (without one, gradio builds a new session state, every component's config, at each call), not
    through gradio_client's queue machinery (about 0.1 s of CPU a call here, where a browser spends next to
    nothing)."""
    answer = http.post("/gradio_api/run/poll_generate",
                       json={"data": [session, job, seen], "session_hash": session_hash})
    answer.raise_for_status()
    return answer.json()["data"]


def press(client: Client, session, runs: Path, from_run: str) -> dict:
    before = set(runs.glob("generate-*"))
    start, cpu = time.perf_counter(), time.process_time()
    session, job, _ = client.predict(session, None, None, from_run, "held_out", "", api_name="/start_generate")
    seen, status, polls = {}, "", 0
    with httpx.Client(base_url=client.src.rstrip("/"), timeout=60) as http:
        while not any(word in status for word in ENDED):
            time.sleep(1.0)  # the page's timer: one poll a second, answered with only what changed since `seen`
            *_, seen = out = poll(http, client.session_hash, session, job, seen)
            status = out[1] if isinstance(out[1], str) else status  # unchanged: a skip, not a string
            polls += 1
    pressed, cpu = time.perf_counter() - start, time.process_time() - cpu
    made = sorted(set(runs.glob("generate-*")) - before)
    report = json.loads((made[-1] / "report.json").read_text()) if made else {}
    return {"pressed_to_finished_s": pressed, "status": status, "polls": polls,
            "run_total_s": (report.get("seconds") or {}).get("total"), "client_cpu_s": cpu,
            "run_dir": str(made[-1]) if made else None, "four_bit_loaded": report.get("four_bit_loaded"),
            "bases": report.get("bases")}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--log", type=Path, required=True)
    p.add_argument("--runs", type=Path, required=True, help="the app's runs root (QUAILORA_RUNS)")
    p.add_argument("--from-run", required=True, help="the run folder's name under --runs")
    p.add_argument("--presses", type=int, default=1)
    p.add_argument("--no-warm", action="store_true", help="the app makes no bases ahead: do not wait for its line")
    args = p.parse_args(argv)
    client = connect(args.port, None, args.log)  # the app's process is bench.generate_time's
    waited = 0.0 if args.no_warm else wait_for_warm_up(args.log)
    session, *_ = client.predict({}, api_name="/attach")
    client.predict(session, api_name="/generate_sources")  # the page's run list, with the run in it
    presses = []
    for i in range(max(1, args.presses)):
        presses.append(press(client, session, args.runs, args.from_run))
        print(f"through the app, press {i + 1}: pressed -> finished {presses[-1]['pressed_to_finished_s']:.1f} s",
              file=sys.stderr, flush=True)
        if "finished" not in presses[-1]["status"]:
            break
    print(json.dumps({"warm_up_waited_s": waited, "presses": presses}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
