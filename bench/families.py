"""The init across model families: tiny models built from each family's config (random weights, no download),
loaded in 4-bit the way a user does, initialized with the API, and run through the init and train flows.

    python -m bench.families                          # every family of tests/helpers.py TINY_FAMILIES
    python -m bench.families --families opt gpt_neox  # some of them
    python -m bench.families --from-json runs/bench/families.json                       # reprint a run

Per family (hidden 64, MLP 128, 2 blocks, 4 heads, the tiny test tokenizer's ~300-token vocabulary; 2-D weights
x8 as tests/helpers.py save_tiny_llama does, so 4-bit error is visible):
  API     from_pretrained(folder, BitsAndBytesConfig(load_in_4bit=True, nf4, double quantization off or on, default
          compute dtype)); with "forward first", one evaluation forward (torch.no_grad) before anything else: on an
          AVX512-BF16 CPU bitsandbytes repacks the 4-bit layers there and computes in bfloat16; then
          get_peft_model(LoraConfig(r, lora_alpha, all-linear)) and replace_lora_weights_quailora(method=
          "closed_form") on seeded random token windows. Mean squared logit error to the float32 model on other
          (held-out) windows with the adapter disabled (plain 4-bit, B = 0) and enabled; ratio = after / before.
          The main variant is double quantization off + forward first; the others are extra ratio columns, and
          "on text" is the main variant calibrated and measured on windows of the flows' text file instead.
          The calibration is also given as a list of {"input_ids", "attention_mask"} dicts (refused or not).
  flows   quailora_app.flows.init.run_init (closed_form, with the full-precision and 8-bit perplexities, no
          accuracy) on a small text file (perplexity of a random-weight model is no quality measure by itself:
          "gap to full closed" = (ppl qlora - ppl closed_form) / (ppl qlora - ppl full) says whether the init
          moves it toward the float32 model's), and a 2-step quailora_app.flows.train.run_train with arms qlora4
          and quailora4 (the project's QuantConfig: nf4, double quantization, keep_cpu_layout).
A family that fails gets its error in one line instead of numbers. Prints two Markdown tables and writes JSON
(--json, default runs/bench/families.json) after every family.
"""
from __future__ import annotations

import argparse
import os
import random
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("QUAILORA_PERPLEXITY_CACHE", "off")  # every figure measured here, none from the cache

import torch  # noqa: E402

from bench.common import OUT, add_json_args, command_line, machine, reprint, write_json  # noqa: E402
from quailora_app.errors import one_line  # noqa: E402
from tests.helpers import TINY_FAMILIES, TINY_TEXT, family_init, save_tiny_family, tiny_tokenizer  # noqa: E402

#: (key, double quantization, forward first): the first is the main variant
VARIANTS = (("dq_off_fwd", False, True), ("dq_on_fwd", True, True), ("dq_off_nofwd", False, False),
            ("dq_on_nofwd", True, False))
VARIANT_LABELS = {"dq_off_fwd": "dq off, fwd first", "dq_on_fwd": "dq on, fwd first",
                  "dq_off_nofwd": "dq off, no fwd", "dq_on_nofwd": "dq on, no fwd"}


def failure(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {one_line(exc, 200)}"


def text_file(folder: Path) -> Path:
    """300 lines of 40 words from the tiny tokenizer's sentences (tests/conftest.py's `text_file`)."""
    rng = random.Random(0)
    words = " ".join(TINY_TEXT).split()
    path = folder / "docs.txt"
    path.write_text("\n".join(" ".join(rng.choice(words) for _ in range(40)) for _ in range(300)))
    return path


def text_windows(text: Path, args, tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(calibration, held-out) windows of the text file, cut as the init flow cuts them (disjoint documents)."""
    from quailora_app.config import DataConfig
    from quailora_app.sources.data import load_splits

    splits = load_splits(DataConfig(str(text), seq_len=args.seq_len, calib_samples=args.calib_windows,
                                    eval_tokens=args.heldout_windows * args.seq_len), tokenizer)
    return splits.calib, splits.eval


def api_rows(folder: Path, args, tokenizer, text: tuple[torch.Tensor, torch.Tensor]) -> dict:
    """Each variant's logit errors, layer counts and result fields; the same on the text's windows; the dicts-form
    calibration's outcome."""
    from transformers import AutoModelForCausalLM

    generator = torch.Generator().manual_seed(args.seed)
    vocab = len(tokenizer)
    calib = torch.randint(0, vocab, (args.calib_windows, args.seq_len), generator=generator)
    heldout = torch.randint(0, vocab, (args.heldout_windows, args.seq_len), generator=generator)
    full = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        reference = full(input_ids=heldout).logits.float()
    del full
    out: dict = {}
    for key, double_quant, forward_first in VARIANTS:
        t0 = time.perf_counter()
        try:
            with warnings.catch_warnings(record=True) as caught:  # the API's own warnings, kept in the JSON
                warnings.simplefilter("always", UserWarning)
                got = family_init(folder, calib, heldout, double_quant=double_quant, forward_first=forward_first,
                                  rank=args.rank, alpha=args.alpha, tokenizer=tokenizer, reference=reference)
        except Exception as exc:  # noqa: BLE001 - a family the API cannot serve: its reason, in one line
            out[key] = {"failed": failure(exc)}
            continue
        result = got["result"]
        initialized = {row["name"] for row in result.layers}
        out[key] = {"before": got["before"], "after": got["after"], "ratio": got["ratio"],
                    "initialized": len(result.layers), "in_blocks": len(got["in_blocks"]),
                    "in_blocks_initialized": len(initialized & set(got["in_blocks"])), "written": len(got["written"]),
                    "lora_layers": got["lora_layers"], "skipped": list(result.skipped),
                    "layers_reset": _listed(getattr(result, "layers_reset", None)),
                    "calibrated_error_median": result.calibrated_error_median,
                    "warnings": [one_line(w.message, 200) for w in caught if issubclass(w.category, UserWarning)],
                    "seconds": time.perf_counter() - t0}
    warnings.filterwarnings("ignore", message=".*CPU inference layout.*")  # recorded above, once per variant
    try:  # the main variant on text windows (the init flow's calibration and held-out split) instead of random ids
        got = family_init(folder, text[0], text[1], rank=args.rank, alpha=args.alpha, tokenizer=tokenizer)
        out["text"] = {"before": got["before"], "after": got["after"], "ratio": got["ratio"]}
    except Exception as exc:  # noqa: BLE001
        out["text"] = {"failed": failure(exc)}
    dicts = [{"input_ids": row, "attention_mask": torch.ones_like(row)} for row in calib]
    try:
        got = family_init(folder, dicts, heldout, rank=args.rank, alpha=args.alpha, tokenizer=tokenizer,
                          reference=reference)
        out["dicts"] = {"ratio": got["ratio"], "initialized": len(got["result"].layers)}
    except Exception as exc:  # noqa: BLE001 - the API may not take this form yet: say so
        out["dicts"] = {"refused": failure(exc)}
    return out


def _listed(value):
    """A result field as JSON: None when absent, a list for any collection."""
    if value is None or isinstance(value, (int, float, str)):
        return value
    return list(value)


def _of_method(value, method: str):
    """A report field given per method ({method: value}) or as one value: the method's."""
    return value.get(method) if isinstance(value, dict) else value


def flow_rows(folder: Path, text: Path, work: Path, args) -> dict:
    """The init flow (closed_form) and a 2-step train of qlora4 / quailora4 on the family's folder."""
    from quailora_app.config import DataConfig, InitConfig, LoraSettings, ModelConfig, QuantConfig, TrainConfig
    from quailora_app.flows.init import run_init
    from quailora_app.flows.train import run_train

    model = ModelConfig(str(folder), "cpu")
    data = DataConfig(str(text), seq_len=args.seq_len, calib_samples=args.calib_windows, eval_tokens=256)
    lora = LoraSettings(rank=args.rank, alpha=float(args.alpha))
    out: dict = {}
    t0 = time.perf_counter()
    try:
        events = list(run_init(InitConfig(model, data, QuantConfig(), lora, methods=("closed_form",)),
                               run_dir=work / f"init-{folder.name}"))
        last = events[-1]
        if last.kind == "finished":
            report = last.report
            errors = sorted(row["calibrated_error"]["closed_form"] for row in report["layers"])
            out["init"] = {"status": "finished", "layers": len(report["layers"]),
                           "calibrated_error_median": errors[len(errors) // 2] if errors else None,
                           "perplexity": {k: report["perplexity"].get(k) for k in ("full", "qlora", "closed_form")},
                           "gap_closed_full": (report.get("gap_closed_full") or {}).get("closed_form"),
                           "layers_reset": _listed(_of_method(report.get("layers_reset"), "closed_form"))}
        else:
            out["init"] = {"status": last.kind, "message": getattr(last, "message", "")}
    except Exception as exc:  # noqa: BLE001 - the flows should fail as an event; a raise is a finding
        out["init"] = {"status": "raised", "message": failure(exc)}
    out["init"]["seconds"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    try:
        events = list(run_train(TrainConfig(model, data, QuantConfig(), lora, arms=("qlora4", "quailora4"),
                                            steps=args.steps, batch_size=2, eval_every=args.steps,
                                            learning_rate=1e-2), run_dir=work / f"train-{folder.name}"))
        losses: dict[str, list[float]] = {}
        for event in events:
            if event.kind == "train_step":
                losses.setdefault(event.arm, []).append(event.train_loss)
        out["train"] = {"status": events[-1].kind, "losses": losses,
                        "message": getattr(events[-1], "message", "")}
    except Exception as exc:  # noqa: BLE001
        out["train"] = {"status": "raised", "message": failure(exc)}
    out["train"]["seconds"] = time.perf_counter() - t0
    return out


# ---------------------------------------------------------------------------------------------- tables
def _ratio(row: dict | None) -> str:
    if not row:
        return "-"
    if "failed" in row:
        return f"failed: {row['failed']}"
    return f"{row['ratio']:.3f}"


def table(result: dict) -> str:
    s = result["alpha"] / result["rank"]
    head = (f"# {result['device']} | rank {result['rank']}, alpha {result['alpha']} (s = {s:g}), all-linear, "
            f"closed_form | calibration {result['calib_windows']} x {result['seq_len']} random token ids, held-out "
            f"{result['heldout_windows']} x {result['seq_len']} (seed {result['seed']})")
    out = [head, "",
           "| family | LoRA layers: initialized / B != 0 / in blocks / all | logit MSE plain 4-bit | "
           "logit MSE + init | ratio dq off, fwd first | ratio dq on, fwd first | ratio dq off, no fwd | "
           "ratio dq on, no fwd | ratio on text | calibration as dicts | layers_reset |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
    for family, row in result["families"].items():
        if "failed" in row:
            out.append(f"| {family} | failed: {row['failed']} | | | | | | | | | |")
            continue
        api = row["api"]
        main = api.get("dq_off_fwd", {})
        if "failed" in main:
            layers, before, after = f"failed: {main['failed']}", "-", "-"
        else:
            layers = (f"{main['in_blocks_initialized']} / {main['written']} / {main['in_blocks']} / "
                      f"{main['lora_layers']}")
            before, after = f"{main['before']:.4g}", f"{main['after']:.4g}"
        dicts = api.get("dicts", {})
        dicts_cell = (f"ratio {dicts['ratio']:.3f}" if "ratio" in dicts
                      else f"refused: {dicts['refused']}" if "refused" in dicts else "-")
        reset = main.get("layers_reset")
        reset_cell = "absent" if reset is None else (str(len(reset)) if isinstance(reset, list) else str(reset))
        out.append(f"| {family} | {layers} | {before} | {after} | "
                   + " | ".join(_ratio(api.get(key)) for key, _, _ in VARIANTS)
                   + f" | {_ratio(api.get('text'))} | {dicts_cell} | {reset_cell} |")
    if not any(row.get("flows") for row in result["families"].values()):
        return "\n".join(out)
    out += ["", "| family | init flow | LoRA layers | calibrated error median | "
                "perplexity full / qlora / closed_form | gap to full closed | layers_reset | train losses qlora4 | "
                "train losses quailora4 | flow seconds (init + train) |",
            "|---|---|---|---|---|---|---|---|---|---|"]
    for family, row in result["families"].items():
        flows = row.get("flows")
        if not flows:
            continue
        init, train = flows["init"], flows["train"]
        if init["status"] == "finished":
            ppl = init["perplexity"]
            gap, reset = init.get("gap_closed_full"), init.get("layers_reset")
            cells = [init["status"], str(init["layers"]), f"{init['calibrated_error_median']:.3f}",
                     " / ".join(f"{ppl[k]:.1f}" if ppl.get(k) is not None else "-"
                                for k in ("full", "qlora", "closed_form")),
                     f"{100 * gap:.0f}%" if gap is not None else "-",
                     "absent" if reset is None else str(len(reset)) if isinstance(reset, list) else str(reset)]
        else:
            cells = [f"{init['status']}: {init.get('message', '')}", "-", "-", "-", "-", "-"]
        losses = train.get("losses", {})
        for arm in ("qlora4", "quailora4"):
            cells.append(", ".join(f"{x:.4f}" for x in losses[arm]) if arm in losses
                         else f"{train['status']}: {train.get('message', '')}")
        cells.append(f"{init['seconds']:.1f} + {train['seconds']:.1f}")
        out.append(f"| {family} | " + " | ".join(cells) + " |")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--families", nargs="+", default=list(TINY_FAMILIES), choices=list(TINY_FAMILIES))
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--alpha", type=float, default=16.0)
    parser.add_argument("--calib-windows", type=int, default=8, help="calibration windows of seq-len token ids")
    parser.add_argument("--heldout-windows", type=int, default=4, help="held-out windows for the logit error")
    parser.add_argument("--seq-len", type=int, default=32)
    parser.add_argument("--steps", type=int, default=2, help="fine-tuning steps per arm in the train flow")
    parser.add_argument("--seed", type=int, default=0, help="seed of the token windows")
    parser.add_argument("--no-flows", action="store_true", help="the API part only")
    add_json_args(parser, str(OUT / "families.json"), resume=False)
    args = parser.parse_args()
    if args.alpha == int(args.alpha):
        args.alpha = int(args.alpha)
    if reprint(args, table):
        return
    from quailora_app.engine.quiet import quiet_libraries

    quiet_libraries()
    out = Path(args.json)
    result = {"rank": args.rank, "alpha": args.alpha, "calib_windows": args.calib_windows,
              "heldout_windows": args.heldout_windows, "seq_len": args.seq_len, "seed": args.seed,
              "device": f"cpu ({torch.get_num_threads()} threads)", "families": {},
              "command": command_line(__file__), "machine": machine()}
    tokenizer = tiny_tokenizer()
    with tempfile.TemporaryDirectory(prefix="families-") as tmp:
        work = Path(tmp)
        text = text_file(work)
        windows = text_windows(text, args, tokenizer)
        for family in args.families:
            t0 = time.perf_counter()
            row: dict = {}
            try:
                folder = save_tiny_family(family, work / family)
                row["api"] = api_rows(folder, args, tokenizer, windows)
                if not args.no_flows:
                    row["flows"] = flow_rows(folder, text, work / "runs", args)
            except Exception as exc:  # noqa: BLE001 - e.g. a config this transformers cannot build
                row["failed"] = failure(exc)
            row["seconds"] = time.perf_counter() - t0
            result["families"][family] = row
            main_row = row.get("api", {}).get("dq_off_fwd", {})
            print(f"{family}: {row['seconds']:.1f} s, ratio {_ratio(main_row)}", flush=True)
            write_json(result, out)  # after every family: a run cut short keeps what it has
    print()
    print(table(result))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
