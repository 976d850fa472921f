"""The paper's table in miniature (Lawton et al. 2024, Tables 1-2): for each embedded model and each embedded text,
held-out perplexity and downstream accuracy of 16-bit, 8-bit, 4-bit QLoRA, 4-bit QuAILoRA and 4-bit distill (the
best method of bench/beyond.py) at initialization and after a short fine-tune, with the share of the 4-bit -> 8-bit
improvement each recovers; then the harm of 4-bit against the gain of QuAILoRA over models, texts and ranks, with a
line through the origin and its R^2 (the paper: "improvements proportional to the negative effect of quantization
error").

    python -m bench.paper_table                                  # the table and the scatter (about 65 min, 2 cores)
    python -m bench.paper_table --resume                         # after a stop: keeps the settings already in --json
    python -m bench.paper_table --quick                          # a smoke run: SmolLM2, one text, tiny settings
    python -m bench.paper_table --from-json runs/bench/paper_table.json   # reprint

Per model and text (rank --rank): one init run through the project's init flow (run_init(InitConfig(...)):
methods qlora, quailora, distill; 8-bit and full-precision baselines; accuracy on the continuation task of its
held-out passages, and for the Rotten Tomatoes reviews on their labels too, fresh/rotten as positive/negative (the
speeches' party gives no signal: LABEL_TEXTS)), then `train --from-init` of that run
(run_train(train_config_from_init(run, ...))) with arms qlora4, quailora4, qlora8 and distill4, evaluated at the end,
perplexity and accuracy on the init run's tasks (--no-train-accuracy: perplexity only).
The scatter adds init runs at the other --scatter-ranks (perplexity only; 8-bit / full from the perplexity cache).

Harm of 4-bit = ppl_qlora - ppl_int8; gain of QuAILoRA = ppl_qlora - ppl_quailora; their ratio is the perplexity gap
closed. Also on a log scale (ln ppl_qlora / ppl_int8, ln ppl_qlora / ppl_quailora), which puts texts and models of
different perplexity on one footing. The fitted line goes through the origin (slope = sum xy / sum x^2); R^2 is
1 - SS_res / SS_tot with SS_tot about the mean of the gains (can be negative; the uncentred R^2 usual for lines
through the origin, 1 - SS_res / sum y^2, is in the JSON too).

JSON (every setting, every figure) in --json; the scatter points alone in --scatter-json (assets/paper_scatter.json:
the app's teaching views draw it with quailora_app.plots.teaching.harm_gain_figure).
"""
from __future__ import annotations

import argparse
import math
import os
import sys
import time
from pathlib import Path

from quailora_app.threads import apply_thread_policy

apply_thread_policy()  # before torch loads (as app.py and `python -m quailora_app`): idle OpenMP threads sleep

from bench.common import (  # noqa: E402
    OUT,
    add_json_args,
    command_line,
    machine,
    machine_line,
    reprint,
    resume,
    write_json,
)
from quailora_app.config import AccuracyConfig, DataConfig, InitConfig, LoraSettings, ModelConfig  # noqa: E402
from quailora_app.engine.evaluation.statistics import mcnemar  # noqa: E402
from quailora_app.events import RunFailed, RunFinished, Stage  # noqa: E402
from quailora_app.flows.from_init import train_config_from_init  # noqa: E402
from quailora_app.flows.init import run_init  # noqa: E402
from quailora_app.flows.train import run_train  # noqa: E402
from quailora_app.plots.teaching import fit_through_origin  # noqa: E402
from quailora_app.sources.tasks import DEFAULT_SHOTS  # noqa: E402

MODELS = {"embedded": "SmolLM2-135M", "embedded:gemma3": "Gemma 3 270M"}
TEXTS = {"embedded": "rotten tomatoes", "embedded:speeches": "convention speeches"}
#: init variant -> fine-tuning arm of the same base and initialization
VARIANTS = {"full": None, "int8": "qlora8", "qlora": "qlora4", "quailora": "quailora4", "distill": "distill4"}
VARIANT_LABELS = {"full": "16-bit (full)", "int8": "8-bit", "qlora": "4-bit QLoRA", "quailora": "4-bit QuAILoRA",
                  "distill": "4-bit distill"}
ARMS = ("qlora4", "quailora4", "qlora8", "distill4")
#: texts whose labels make the label task. The convention speeches' party gives no signal: SmolLM2-135M at full
#: precision scored 44% / 58% / 43% at 0 / 2 / 4 shots on its ~170 held-out speeches, under the 65% of always
#: answering "democrat" (bench/shots.py --dataset embedded:speeches), so those runs score the continuation task
#: only.
LABEL_TEXTS = ("embedded",)
#: settings a --resume may change: they shape only the settings still to run (each run records its own)
RESUME_FREE = ("train_accuracy",)


def run_line(result: dict) -> str:
    """The machine, the load average at the settings' starts and the seconds of runs, in one line."""
    loads = result.get("load_average", [])
    load = (f"load average (1 min) at the settings' starts: {min(loads):.1f}-{max(loads):.1f}, "
            f"median {sorted(loads)[len(loads) // 2]:.1f}") if loads else "load average not recorded"
    return (f"machine: {machine_line({**result.get('machine', {}), 'load_average_at_start': None})}; {load}; "
            f"{result.get('seconds', 0):.0f} s of runs")


def collect(events, what: str) -> dict:
    report = None
    for event in events:
        if isinstance(event, Stage):
            print(f"  [{what} {event.stage}] {event.message[:110]}", file=sys.stderr, flush=True)
        if isinstance(event, RunFailed):
            raise SystemExit(f"error ({what}): {event.message}")
        if isinstance(event, RunFinished):
            report = event.report
    if report is None:
        raise SystemExit(f"error ({what}): the flow ended without a report")
    return report


def accuracy_summary(section: dict | None) -> dict:
    """The report's accuracy section without the per-item strings: per task its title, chance, majority, n, per
    model accuracy / interval / half-width, gap closed, McNemar vs qlora, notes."""
    out = {}
    for kind, entry in (section or {}).items():
        out[kind] = {
            **{k: entry.get(k) for k in ("title", "description", "n", "chance", "majority", "gap_closed",
                                         "gap_closed_full", "notes")},
            "models": {name: {k: rec.get(k) for k in ("accuracy", "hits", "n", "interval", "half_width", "seconds")}
                       for name, rec in (entry.get("models") or {}).items()},
            "vs_qlora": {name: {k: t.get(k) for k in ("p_value", "significant", "only_a", "only_b")}
                         for name, t in (entry.get("vs_qlora") or {}).items()}}
    return out


def accuracy_tasks(args, text: str) -> tuple[str, ...]:
    """The continuation task on every text; the label task only on --label-texts (see LABEL_TEXTS)."""
    return ("labels", "continuation") if text in args.label_texts else ("continuation",)


def accuracy_settings(args, text: str) -> dict:
    return {"accuracy_tasks": accuracy_tasks(args, text), "label_items": args.label_items,
            "continuation_items": args.continuation_items, "shots": args.shots}


def init_config(args, model: str, text: str, rank: int, main: bool, out: Path) -> InitConfig:
    acc = (AccuracyConfig(label_dataset=text, **accuracy_settings(args, text)) if main and not args.no_accuracy
           else AccuracyConfig(accuracy_tasks=()))
    methods = ("qlora", "quailora", *(("distill",) if main and not args.no_distill else ()))
    return InitConfig(model=ModelConfig(model=model),
                      data=DataConfig(dataset=text, seq_len=args.seq_len, calib_samples=args.calib_samples,
                                      eval_tokens=args.eval_tokens),
                      lora=LoraSettings(rank=rank, alpha=float(rank)), methods=methods, baselines=True,
                      accuracy=acc, out=str(out))


def init_setting(args, model: str, text: str, rank: int, main: bool, work: Path) -> dict:
    tag = f"{model.replace(':', '-')}_{text.replace(':', '-')}_r{rank}"
    start = time.perf_counter()
    load = os.getloadavg()[0]
    init = collect(run_init(init_config(args, model, text, rank, main, work / f"init-{tag}")), "init")
    return {"model": model, "text": text, "rank": rank, "main": main, "load_average": round(load, 2), "tag": tag,
            "init_run": str(work / f"init-{tag}"), "perplexity": init["perplexity"],
            "gap_closed": init.get("gap_closed", {}), "gap_closed_full": init.get("gap_closed_full", {}),
            "accuracy": accuracy_summary(init.get("accuracy")),
            "accuracy_unavailable": init.get("accuracy_unavailable", {}),
            "init_seconds": {k: v for k, v in init.get("seconds", {}).items() if isinstance(v, (int, float))},
            "seconds": time.perf_counter() - start}


def train_accuracy_summary(report: dict) -> dict:
    """Per arm and task: accuracy at the last evaluation (with interval and half-width), gap closed toward qlora8,
    McNemar vs qlora4 (the train flow's report["arms"][arm]["accuracy"])."""
    out = {}
    for name, arm in (report.get("arms") or {}).items():
        for kind, entry in (arm.get("accuracy") or {}).items():
            final = entry.get("final") or {}
            out.setdefault(kind, {"models": {}, "gap_closed": {}, "vs_qlora": {}})
            out[kind]["models"][name] = {k: final.get(k) for k in ("step", "accuracy", "hits", "n", "interval",
                                                                   "half_width")}
            if entry.get("gap_closed") is not None:
                out[kind]["gap_closed"][name] = entry["gap_closed"]
            if entry.get("vs_qlora4"):
                out[kind]["vs_qlora"][name] = {k: entry["vs_qlora4"].get(k)
                                               for k in ("p_value", "significant", "only_a", "only_b")}
    for task in out.values():  # the "8-bit vs 4-bit" test of the init table, here qlora8 vs qlora4
        if "qlora8" in task["vs_qlora"]:
            task["vs_qlora"]["int8"] = task["vs_qlora"]["qlora8"]
    return out


def train_setting(args, record: dict, work: Path) -> dict:
    t0 = time.perf_counter()
    arms = tuple(a for a in args.arms if not (a == "distill4" and args.no_distill))
    out = work / f"train-{record['tag']}"
    if out.exists():  # a fine-tune stopped before it ended (--resume): start it afresh beside it
        out = out.with_name(f"{out.name}-{time.strftime('%Y%m%d-%H%M%S')}")
    overrides = dict(arms=arms, steps=args.steps, batch_size=args.batch_size, eval_every=args.steps,
                     learning_rate=args.lr, out=str(out))
    accuracy_in_train = not args.no_accuracy and not args.no_train_accuracy
    # accuracy in train: the init run's tasks and item counts (inherited; named here to be plain)
    overrides.update(accuracy_tasks=accuracy_tasks(args, record["text"]) if accuracy_in_train else ())
    train = collect(run_train(train_config_from_init(record["init_run"], **overrides)), "train")
    return {"run": overrides["out"], "steps": args.steps, "batch_size": args.batch_size, "arms_run": list(arms),
            "arms": {name: {k: a.get(k) for k in ("evals", "final_perplexity", "final_eval_step", "steps_done",
                                                  "median_step_seconds", "seconds")}
                     for name, a in train.get("arms", {}).items()},
            "reference_perplexity": train.get("reference_perplexity", {}),
            "gap_closed": train.get("gap_closed", {}), "gap_closed_full": train.get("gap_closed_full", {}),
            "accuracy_in_train": accuracy_in_train,
            "accuracy": train_accuracy_summary(train) if accuracy_in_train else {},
            "accuracy_unavailable": train.get("accuracy_unavailable", {}),
            "seconds": time.perf_counter() - t0}


# -- the scatter -------------------------------------------------------------------------------------------------
def scatter_points(result: dict) -> list[dict]:
    points = []
    for run in result["runs"]:
        p = run["perplexity"]
        if not all(k in p for k in ("qlora", "int8", "quailora")):
            continue
        points.append({"model": MODELS.get(run["model"], run["model"]), "text": TEXTS.get(run["text"], run["text"]),
                       "rank": run["rank"], "ppl_qlora": p["qlora"], "ppl_int8": p["int8"], "ppl_full": p.get("full"),
                       "ppl_quailora": p["quailora"], "harm": p["qlora"] - p["int8"],
                       "gain": p["qlora"] - p["quailora"],
                       "log_harm": math.log(p["qlora"] / p["int8"]), "log_gain": math.log(p["qlora"] / p["quailora"])})
    return points


def scatter_fits(points: list[dict]) -> dict:
    out = {}
    for scale, (x, y) in {"absolute": ("harm", "gain"), "log": ("log_harm", "log_gain")}.items():
        if len(points) >= 2:
            fit = fit_through_origin([pt[x] for pt in points], [pt[y] for pt in points])
            out[scale] = {"slope": fit.slope, "r2": fit.r2, "r2_uncentred": fit.r2_uncentred, "n": fit.n}
    return out


def pooled_tests(result: dict, stage: str = "init") -> dict:
    """Every task of every table setting pooled, per variant against 4-bit QLoRA on the same items: the items only
    it got right and only QLoRA got right, summed; McNemar's exact p of those sums; and the share of 8-bit's net
    gain, (only_a - only_b) / (only_a - only_b of 8-bit): the accuracy gap closed over all the items at once, which
    single small tasks cannot show. `stage`: "init" (the init runs) or "fine-tuned" (the arms' last evaluations,
    named by their init variant)."""
    arm_to_variant = {arm: variant for variant, arm in VARIANTS.items() if arm}
    sums: dict[str, list[int]] = {}
    items = 0
    for run in (r for r in result["runs"] if r["main"]):
        tasks = run["accuracy"] if stage == "init" else ((run.get("train") or {}).get("accuracy") or {})
        for task in tasks.values():
            tests = task.get("vs_qlora") or {}
            if not tests:
                continue
            items += next(iter(task["models"].values())).get("n") or 0
            for name, test in tests.items():
                variant = name if stage == "init" else arm_to_variant.get(name)
                if variant is None or test.get("only_a") is None:  # the fine-tuned "int8" alias maps to None
                    continue
                acc = sums.setdefault(variant, [0, 0])
                acc[0] += test["only_a"]
                acc[1] += test["only_b"]
    base = sums.get("int8")
    out = {}
    for variant, (only_a, only_b) in sums.items():
        net = only_a - only_b
        out[variant] = {"only_a": only_a, "only_b": only_b, "net": net, "items": items,
                        "p_value": mcnemar(only_a, only_b)[0],
                        "share_of_8bit": net / (base[0] - base[1]) if base and base[0] != base[1] else None}
    return out


# -- tables ------------------------------------------------------------------------------------------------------
def _pct(x) -> str:
    return "-" if x is None else f"{100 * x:.0f}%"


def _acc(task: dict | None, name: str, base: str = "qlora") -> str:
    rec = (task or {}).get("models", {}).get(name)
    if not rec or rec.get("accuracy") is None:
        return "-"
    sig = ""
    test = None if name == base else (task or {}).get("vs_qlora", {}).get(name)
    if test is not None:
        sig = f" (p={test['p_value']:.2g}{'' if test.get('significant') else ', n.s.'})"
    return f"{100 * rec['accuracy']:.1f} +- {100 * rec['half_width']:.1f}{sig}"


def _gap(task: dict | None, name: str) -> str:
    """Accuracy gap closed of `name`, n.s. when 8-bit and QLoRA do not differ significantly on that task."""
    g = ((task or {}).get("gap_closed") or {}).get(name)
    if g is None:
        return "-"
    int8 = (task or {}).get("vs_qlora", {}).get("int8", {})
    return f"{100 * g:.0f}%" + ("" if int8.get("significant") else " (n.s.: 8-bit ~ 4-bit)")


def header(result: dict) -> str:
    s = result["settings"]
    return (f"# {s['calib_samples']} x {s['seq_len']} calibration tokens, {s['eval_tokens']} held-out tokens, rank "
            f"{s['rank']} (alpha = r), nf4 + double quant, all linear layers; accuracy: {s['label_items']} label items "
            f"({s['shots']}-shot, 8 prompts) on {', '.join(TEXTS.get(t, t) for t in s.get('label_texts', TEXTS))}, "
            f"{s['continuation_items']} continuation items (4 choices); fine-tune: "
            f"{s['steps']} steps x {s['batch_size']} sequences of {s['seq_len']} tokens, lr {s['lr']:g}, evaluated at "
            f"the end; {run_line(result)}")


def table(result: dict) -> str:
    rows = [header(result), ""]
    mains = [r for r in result["runs"] if r["main"]]
    rows += ["Accuracy in %, +- the 95% Wilson half-width, (McNemar p vs 4-bit QLoRA on the same items; "
             "n.s.: p > 0.05); "
             "fine-tuned: the arm of the same base and initialization (qlora8, qlora4, quailora4, distill4) at its "
             "last evaluation.", "",
             "| model | text | variant | ppl init | ppl fine-tuned | labels acc, init | continuation acc, init | "
             "labels acc, fine-tuned | continuation acc, fine-tuned |", "|---|---|---|---|---|---|---|---|---|"]
    for run in mains:
        ppl, acc, train = run["perplexity"], run["accuracy"], run.get("train") or {}
        tacc = train.get("accuracy") or {}
        for variant, arm in VARIANTS.items():
            if variant not in ppl:
                continue
            fin = (train.get("arms", {}).get(arm) or {}).get("final_perplexity") if arm else None
            rows.append(f"| {MODELS.get(run['model'], run['model'])} | {TEXTS.get(run['text'], run['text'])} | "
                        f"{VARIANT_LABELS[variant]} | {ppl[variant]:.2f} | {f'{fin:.2f}' if fin else '-'} | "
                        f"{_acc(acc.get('labels'), variant)} | {_acc(acc.get('continuation'), variant)} | "
                        f"{_acc(tacc.get('labels'), arm, 'qlora4') if arm else '-'} | "
                        f"{_acc(tacc.get('continuation'), arm, 'qlora4') if arm else '-'} |")
    rows += ["", "Share of the 4-bit -> 8-bit improvement recovered (gap closed; accuracy: n.s. where 8-bit and "
                 "4-bit QLoRA do not differ significantly, McNemar p > 0.05):", "",
             "| model | text | method | ppl, init | ppl, fine-tuned | labels acc, init | continuation acc, init | "
             "labels acc, fine-tuned | continuation acc, fine-tuned |",
             "|---|---|---|---|---|---|---|---|---|"]
    for run in mains:
        train = run.get("train") or {}
        for variant in ("quailora", "distill"):
            if variant not in run["perplexity"]:
                continue
            arm = VARIANTS[variant]
            rows.append(f"| {MODELS.get(run['model'], run['model'])} | {TEXTS.get(run['text'], run['text'])} | "
                        f"{VARIANT_LABELS[variant]} | {_pct(run['gap_closed'].get(variant))} | "
                        f"{_pct((train.get('gap_closed') or {}).get(arm))} | "
                        f"{_gap(run['accuracy'].get('labels'), variant)} | "
                        f"{_gap(run['accuracy'].get('continuation'), variant)} | "
                        f"{_gap((train.get('accuracy') or {}).get('labels'), arm)} | "
                        f"{_gap((train.get('accuracy') or {}).get('continuation'), arm)} |")
    rows += ["", "Is the full-precision model clearly above chance (Wilson lower bound above both chance and the "
                 "majority answer)?", ""]
    for run in mains:
        for kind, task in run["accuracy"].items():
            full = task["models"].get("full")
            if not full:
                continue
            floor = max(task.get("chance") or 0, task.get("majority") or 0)
            verdict = "yes" if full["interval"][0] > floor else "NO: this task gives no signal here"
            rows.append(f"- {MODELS.get(run['model'], run['model'])}, {TEXTS.get(run['text'], run['text'])}, "
                        f"{task.get('title', kind)}: full {100 * full['accuracy']:.1f}% "
                        f"[{100 * full['interval'][0]:.1f}, {100 * full['interval'][1]:.1f}] vs chance "
                        f"{100 * (task.get('chance') or 0):.0f}% / majority {100 * (task.get('majority') or 0):.0f}% "
                        f"(n={full['n']}): {verdict}")
        for kind, why in (run.get("accuracy_unavailable") or {}).items():
            rows.append(f"- {MODELS.get(run['model'], run['model'])}, {TEXTS.get(run['text'], run['text'])}, "
                        f"{kind}: unavailable ({why})")
    if mains and any(r.get("train") for r in mains) and not any((r.get("train") or {}).get("accuracy_in_train")
                                                                 for r in mains):
        rows.append("- fine-tuned accuracy: not measured (the train flow does not score accuracy yet); perplexities "
                    "only after fine-tuning")
    for stage in ("init", "fine-tuned"):
        pooled = pooled_tests(result, stage)
        if not pooled:
            continue
        items = next(iter(pooled.values()))["items"]
        rows += ["", f"Accuracy pooled over every task and setting above, {stage} ({items:,} items; against 4-bit "
                     "QLoRA on the same items; share = net items gained / 8-bit's net items gained):", "",
                 "| variant | right only it | right only QLoRA | net | McNemar p | share of 8-bit's gain |",
                 "|---|---|---|---|---|---|"]
        for variant in ("full", "int8", "quailora", "distill"):
            if variant in pooled:
                t = pooled[variant]
                rows.append(f"| {VARIANT_LABELS[variant]} | {t['only_a']} | {t['only_b']} | {t['net']:+d} | "
                            f"{t['p_value']:.2g} | {_pct(t['share_of_8bit'])} |")
    points = scatter_points(result)
    if points:
        rows += ["", "Harm of 4-bit against the gain of QuAILoRA (perplexity points; log = ln of the ratios):", "",
                 "| model | text | rank | ppl 4-bit | ppl 8-bit | ppl QuAILoRA | harm | gain | gain / harm |",
                 "|---|---|---|---|---|---|---|---|---|"]
        for p in sorted(points, key=lambda p: (p["model"], p["text"], p["rank"])):
            rows.append(f"| {p['model']} | {p['text']} | {p['rank']} | {p['ppl_qlora']:.2f} | {p['ppl_int8']:.2f} | "
                        f"{p['ppl_quailora']:.2f} | {p['harm']:.2f} | {p['gain']:.2f} | {p['gain'] / p['harm']:.2f} |")
        for scale, fit in scatter_fits(points).items():
            rows.append(f"\n{scale} scale: gain = {fit['slope']:.3f} x harm through the origin, R^2 = {fit['r2']:.3f} "
                        f"(uncentred {fit['r2_uncentred']:.3f}), {fit['n']} points")
    return "\n".join(rows)


def save(result: dict, path: str) -> None:
    result["scatter"] = scatter_points(result)
    result["fits"] = scatter_fits(result["scatter"])
    write_json(result, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--texts", nargs="+", default=list(TEXTS))
    parser.add_argument("--rank", type=int, default=16, help="rank of the table's runs")
    parser.add_argument("--scatter-ranks", type=int, nargs="*", default=[8, 64],
                        help="further ranks of the scatter (perplexity only); the table's rank is in it already")
    parser.add_argument("--calib-samples", type=int, default=16)
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--eval-tokens", type=int, default=4096)
    parser.add_argument("--label-items", type=int, default=400)
    parser.add_argument("--continuation-items", type=int, default=100)
    parser.add_argument("--shots", type=int, default=DEFAULT_SHOTS,
                        help="few-shot examples of the label task (see sources/tasks.py DEFAULT_SHOTS)")
    parser.add_argument("--label-texts", nargs="*", default=list(LABEL_TEXTS),
                        help="texts scored on their labels as well (the others: continuation only)")
    parser.add_argument("--no-accuracy", action="store_true")
    parser.add_argument("--no-train-accuracy", action="store_true",
                        help="fine-tuned arms: perplexity only (accuracy at initialization still scored)")
    parser.add_argument("--no-distill", action="store_true", help="leave out distill and its arm")
    parser.add_argument("--arms", nargs="+", default=list(ARMS))
    parser.add_argument("--steps", type=int, default=10, help="fine-tuning steps (0: no fine-tune)")
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--lr", type=float, default=2e-4)
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run: SmolLM2 on rotten tomatoes, 4 x 128 calibration, 512 held-out tokens, "
                             "20 + 10 "
                             "accuracy items, 2 steps, scatter rank 8 (JSON: runs/bench/paper_table_quick.json)")
    add_json_args(parser, None)
    parser.add_argument("--scatter-json", default=None, help="default assets/paper_scatter.json (not with --quick)")
    args = parser.parse_args(argv)
    if reprint(args, table):
        return 0
    if args.quick:
        given = set(a for a in (argv if argv is not None else sys.argv[1:]) if a.startswith("--"))
        for flag, value in {"--models": ["embedded"], "--texts": ["embedded"], "--scatter-ranks": [8],
                            "--calib-samples": 4, "--seq-len": 128, "--eval-tokens": 512, "--label-items": 20,
                            "--continuation-items": 10, "--steps": 2, "--batch-size": 1}.items():
            if flag not in given:
                setattr(args, flag[2:].replace("-", "_"), value)
    args.json = args.json or str(OUT / ("paper_table_quick.json" if args.quick else "paper_table.json"))
    if args.scatter_json is None and not args.quick:
        args.scatter_json = "assets/paper_scatter.json"
    work = Path(args.json).with_suffix("")
    the_settings = {k: getattr(args, k) for k in ("calib_samples", "seq_len", "eval_tokens", "rank", "label_items",
                                                  "continuation_items", "shots", "label_texts", "steps", "batch_size",
                                                  "lr")}
    the_settings.update(arms=[a for a in args.arms if not (a == "distill4" and args.no_distill)],
                        accuracy=not args.no_accuracy, distill=not args.no_distill, quick=args.quick,
                        train_accuracy=not (args.no_accuracy or args.no_train_accuracy))
    # with --resume: what the finished settings were computed with must match; how the remaining fine-tunes are
    # scored may not
    result = resume(args, {"command": command_line(__file__, argv), "settings": the_settings, "machine": machine(),
                           "runs": [], "load_average": [], "seconds": 0.0}, free=RESUME_FREE)
    # the table's runs first (SmolLM2's, the cheap ones, before Gemma's), then the scatter's other ranks
    plan = [(m, t, args.rank, True) for m in args.models for t in args.texts]
    plan += [(m, t, r, False) for m in args.models for r in args.scatter_ranks for t in args.texts if r != args.rank]
    for model, text, rank, is_main in plan:
        key = (model, text, rank, is_main)
        record = next((r for r in result["runs"] if (r["model"], r["text"], r["rank"], r["main"]) == key), None)
        needs_train = is_main and args.steps > 0
        if record is not None and (not needs_train or record.get("train")):
            continue
        what = f"{MODELS.get(model, model)} on {TEXTS.get(text, text)}, rank {rank}"
        if record is None:
            print(f"{what}: init{' (with accuracy)' if is_main and not args.no_accuracy else ''}", file=sys.stderr,
                  flush=True)
            record = init_setting(args, model, text, rank, is_main, work)
            result["runs"].append(record)
            result["load_average"].append(record["load_average"])
            result["seconds"] += record["seconds"]
            save(result, args.json)
            print(f"  init done in {record['seconds']:.0f} s", file=sys.stderr, flush=True)
        if needs_train:
            print(f"{what}: fine-tune from the init run", file=sys.stderr, flush=True)
            result["load_average"].append(round(os.getloadavg()[0], 2))
            record["train"] = train_setting(args, record, work)
            result["seconds"] += record["train"]["seconds"]
            save(result, args.json)
            print(f"  fine-tune done in {record['train']['seconds']:.0f} s", file=sys.stderr, flush=True)
    if args.scatter_json and result.get("scatter"):
        small = {"source": "bench/paper_table.py", "command": result["command"], "settings": result["settings"],
                 "machine": run_line(result), "points": [{k: (round(v, 6) if isinstance(v, float) else v)
                                                              for k, v in p.items()} for p in result["scatter"]],
                 "fits": result.get("fits", {})}
        write_json(small, args.scatter_json, indent=1)
    print(table(result))
    print(f"\nJSON in {args.json}" + (f"; scatter points in {args.scatter_json}" if args.scatter_json else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
