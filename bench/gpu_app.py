"""The app on the GPU (bench/gpu_check.sh part 4): the real Gradio app served on localhost (build_ui, as
tests/helpers.launched_app serves it) and driven by gradio_client: /attach, /start_init on a small Llama built from
a config (the text uploaded) until it finishes, then /start_train from that init run, qlora4 and quailora4, 5 steps,
until it finishes. The run folders' report.json say which device each flow ran on (the app picks CUDA when there is
one).

Where gradio or gradio_client cannot be imported (the wheels were not carried), the same init and 5 steps run
through the flows directly (run_init, then run_train from that init run), and the JSON says the app itself was not
launched ("app_launched": false, with the reason). Writes $OUT/gpu_app.json (OUT defaults to /tmp/gpu_check).

    python -m bench.gpu_app            # hidden 256, 4 blocks
    python -m bench.gpu_app --small    # hidden 64, 2 blocks (the script's own check, on the CPU)
"""
from __future__ import annotations

import argparse
import json
import os
import random
import time
from pathlib import Path

from bench.common import machine, write_json

OUT = Path(os.environ.get("OUT", "/tmp/gpu_check"))
WORK = Path("/tmp/gpu_check_work")
INIT_METHODS = ["qlora", "svd", "quailora", "closed_form"]
ARMS = ["qlora4", "quailora4"]
STEPS = 5


def short_docs(path: Path) -> Path:
    """600 short documents separated by blank lines (the app tests' upload)."""
    from tests.helpers import TINY_TEXT

    rng = random.Random(0)
    docs = [" ".join(rng.choice(TINY_TEXT).split()[: rng.randint(4, 12)]) for _ in range(600)]
    path.write_text("\n\n".join(docs))
    return path


def reports(runs: Path) -> dict:
    """kind (init / train) -> the newest run's report.json under `runs`."""
    found = {}
    for path in sorted(runs.rglob("report.json"), key=lambda p: p.stat().st_mtime):
        report = json.loads(path.read_text())
        kind = "train" if "arms" in report else "init"
        found[kind] = {"folder": str(path.parent), "device": report.get("device"), "status": report.get("status"),
                       "compute_dtype": report.get("settings", {}).get("model", {}).get("compute_dtype"),
                       "perplexity": report.get("perplexity"),
                       "from_init": report.get("from_init"),
                       "arms": {n: {k: a.get(k) for k in ("steps_done", "step0_perplexity", "final_perplexity",
                                                          "tokens_per_s", "peak_memory_bytes")}
                                for n, a in report.get("arms", {}).items()} or None}
    return found


def through_app(model: Path, text: Path, runs: Path, sizes: dict) -> dict:
    from gradio_client import Client, handle_file

    from tests.helpers import form_settings, launched_app, wait_for

    row: dict = {"app_launched": True}
    os.environ["QUAILORA_ALLOWED_PATHS"] = str(WORK)
    t0 = time.perf_counter()
    with launched_app(runs) as url:
        row["launch_s"] = time.perf_counter() - t0
        client = Client(url, verbose=False)
        session, *_ = client.predict({}, api_name="/attach")
        setup = form_settings(model, upload=handle_file(str(text)), rank=8, alpha=16, **sizes)
        t0 = time.perf_counter()
        session, init_id, status = client.predict(session, **setup, methods=INIT_METHODS, baselines=True,
                                                  als_rounds=3, damping=0.01, api_name="/start_init")
        out = wait_for(client, session, "/init_status", init_id, lambda o: any(w in o[1] for w in
                                                                               ("finished", "failed", "stopped")))
        row["init_status"], row["init_s"] = out[1], time.perf_counter() - t0
        print(f"init through the app: {out[1]} ({row['init_s']:.1f} s)", flush=True)
        t0 = time.perf_counter()
        session, train_id, status = client.predict(session, init_id, **setup, als_rounds=3, damping=0.01, arms=ARMS,
                                                   steps=STEPS, learning_rate=1e-3, batch_size=2, grad_accum=1,
                                                   eval_every=STEPS, warmup_ratio=0.0, start_from_init=True,
                                                   api_name="/start_train")
        out = wait_for(client, session, "/train_status", train_id, lambda o: any(w in o[1] for w in
                                                                                 ("finished", "failed", "stopped")))
        row["train_status"], row["train_s"] = out[1], time.perf_counter() - t0
        row["train_table"] = out[3].get("data") if isinstance(out[3], dict) else None
        print(f"fine-tuning through the app: {out[1]} ({row['train_s']:.1f} s)", flush=True)
    return row


def through_flows(model: Path, text: Path, runs: Path, sizes: dict, why: str) -> dict:
    from quailora_app.config import DataConfig, InitConfig, LoraSettings, ModelConfig
    from quailora_app.events import RunFailed, RunFinished
    from quailora_app.flows.from_init import train_config_from_init
    from quailora_app.flows.init import run_init
    from quailora_app.flows.train import run_train

    print(f"NOTE: the app itself was NOT launched ({why}): the same init and {STEPS} fine-tuning steps run through "
          "the flows directly", flush=True)
    row: dict = {"app_launched": False, "why_not": why}
    data = DataConfig(str(text), seq_len=sizes["seq_len"], calib_samples=sizes["calib_samples"],
                      eval_tokens=sizes["eval_tokens"])
    cfg = InitConfig(ModelConfig(str(model)), data, lora=LoraSettings(rank=8, alpha=16), methods=tuple(INIT_METHODS),
                     als_rounds=3, out=str(runs / "init"))

    def finish(events) -> tuple[str, str]:
        for event in events:
            if isinstance(event, RunFailed):
                return "failed: " + event.message, event.run_dir
            if isinstance(event, RunFinished):
                return "finished", event.run_dir
        return "no end", ""

    t0 = time.perf_counter()
    row["init_status"], init_dir = finish(run_init(cfg))
    row["init_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    train = train_config_from_init(init_dir, arms=tuple(ARMS), steps=STEPS, learning_rate=1e-3, batch_size=2,
                                   eval_every=STEPS, warmup_ratio=0.0, als_rounds=3, out=str(runs / "train"))
    row["train_status"], _ = finish(run_train(train))
    row["train_s"] = time.perf_counter() - t0
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="hidden 64, 2 blocks (the script's own check)")
    parser.add_argument("--flows", action="store_true", help="skip the app: the flows directly (as without gradio)")
    args = parser.parse_args(argv)
    from tests.helpers import save_tiny_llama

    hidden, layers = (64, 2) if args.small else (256, 4)
    sizes = dict(calib_samples=4, seq_len=32, eval_tokens=128) if args.small else \
        dict(calib_samples=16, seq_len=128, eval_tokens=2048)
    WORK.mkdir(parents=True, exist_ok=True)
    model = WORK / f"app-llama-{hidden}-{layers}"
    if not (model / "config.json").exists():
        save_tiny_llama(model, hidden=hidden, intermediate=2 * hidden, layers=layers)
    text = short_docs(WORK / "app-docs.txt")
    runs = WORK / f"app-runs-{int(time.time())}"
    runs.mkdir(parents=True)
    at_start = machine()
    print("device:", at_start["device"], flush=True)
    out = {"part": "app", "small": args.small, "machine": at_start, "model": {"hidden": hidden, "blocks": layers},
           "settings": {**sizes, "rank": 8, "alpha": 16, "methods": INIT_METHODS, "arms": ARMS, "steps": STEPS}}
    why = "--flows" if args.flows else None
    if not why:
        try:
            import gradio  # noqa: F401
            import gradio_client  # noqa: F401
        except ImportError as exc:
            why = f"gradio cannot be imported here: {exc}"
    try:
        out.update(through_flows(model, text, runs, sizes, why) if why else through_app(model, text, runs, sizes))
    except Exception as exc:  # noqa: BLE001 - recorded, then the exit code says it failed
        out["failed"] = f"{type(exc).__name__}: {exc}"
    out["runs"] = reports(runs)
    write_json(out, OUT / "gpu_app.json")
    for kind, r in out["runs"].items():
        print(f"{kind} run: {r['status']} on {r['device']} ({r['compute_dtype']}), {r['folder']}")
        if r["arms"]:
            for name, a in r["arms"].items():
                print(f"  {name}: {a['steps_done']} steps, perplexity {a['step0_perplexity']:.3f} -> "
                      f"{a['final_perplexity']:.3f}")
    ok = (not out.get("failed") and "finished" in str(out.get("init_status")) and "finished" in
          str(out.get("train_status")) and {"init", "train"} <= set(out["runs"]))
    print("app (init + fine-tuning):", "finished" if ok else f"NOT finished: {out.get('failed') or out}")
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
