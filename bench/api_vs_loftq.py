"""The public API beside peft's LoftQ on the same PeftModel: init seconds, peak memory, perplexity, gap closed.

    python -m bench.api_vs_loftq                       # embedded SmolLM2 + text, rank 16, alpha 32, 64 x 256
    python -m bench.api_vs_loftq --calib-samples 8 --seq-len 128 --eval-tokens 2048     # a quick run
    python -m bench.api_vs_loftq --alpha 16            # alpha == r: peft's ignored scaling does not matter
    python -m bench.api_vs_loftq --from-json runs/bench/api_vs_loftq.json               # reprint a run

Each arm runs in a fresh child process, so its peak memory is its own (CUDA max allocated on a GPU; on the CPU
the resident anonymous memory, RssAnon, sampled every 5 ms as bench/scale.py does). Every arm with LoRA loads
the model the way a user does (from_pretrained with BitsAndBytesConfig nf4 + double quantization, compute
float32 on the CPU / bfloat16 on CUDA; keep_cpu_layout on the CPU), then get_peft_model with the same LoraConfig
(target_modules="all-linear", r, lora_alpha) and the same seed, then:
  qlora                  nothing: peft's default init (B = 0), the plain QLoRA start
  loftq                  peft's replace_lora_weights_loftq(peft_model, model_path=<the local checkpoint folder>),
                         as a user calls it (raw factors)
  loftq_rescaled         replace_lora_weights_quailora(method="loftq"): peft's LoftQ with A, B divided by sqrt(s)
                         each, so that s * B @ A is LoftQ's correction
  svd                    replace_lora_weights_quailora(method="svd") (one LoftQ iteration on the fixed 4-bit Q)
  svd_as_peft_writes_it  the API's svd factors multiplied by sqrt(s) each: s * B @ A = s * C, what peft's LoftQ
                         writes when alpha != r (runs on the CPU too, where peft's LoftQ cannot)
  closed_form            replace_lora_weights_quailora(method="closed_form") (calibrated)
and the anchors full (the unquantized model) and int8 (LLM.int8, the target of "gap closed").
Calibration and evaluation windows come from disjoint documents (load_splits) and are the same for every arm.
Where peft's LoftQ fails (on the CPU: it needs CUDA) the row gives its message and no number.
Prints a Markdown table and writes JSON (--json, default runs/bench/api_vs_loftq.json) after every arm.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import tempfile
import time
from pathlib import Path

from bench.common import OUT, add_json_args, command_line, machine, module_command, reprint, write_json
from bench.scale import WORK, PeakMemory, gib, run_child

ANCHORS = ("full", "int8", "qlora")
ARMS = (*ANCHORS, "loftq", "loftq_rescaled", "svd", "svd_as_peft_writes_it", "closed_form")
LABELS = {
    "full": "full precision",
    "int8": "8-bit LLM.int8",
    "qlora": "qlora (4-bit, peft's default init)",
    "loftq": "peft replace_lora_weights_loftq (raw)",
    "loftq_rescaled": "API loftq (peft's, rescaled by 1/sqrt(s))",
    "svd": "API svd",
    "svd_as_peft_writes_it": "API svd x sqrt(s) each (as peft writes it)",
    "closed_form": "API closed_form",
}


# ---------------------------------------------------------------------------------------------- child
def load_4bit_user_way(folder: Path, device):
    """What a QLoRA script does: from_pretrained with the QLoRA BitsAndBytesConfig."""
    import torch
    from transformers import AutoModelForCausalLM, BitsAndBytesConfig

    from quailora_app import keep_cpu_layout

    compute = torch.float32 if device.type == "cpu" else torch.bfloat16
    config = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute)
    model = AutoModelForCausalLM.from_pretrained(str(folder), quantization_config=config, dtype=compute,
                                                 device_map={"": device})
    if device.type == "cpu":
        keep_cpu_layout(model)  # before the first forward: no AVX512-BF16 repacking, the layer computes Q x
    model.config.use_cache = False
    return model


def load_model(arm: str, folder: Path, device):
    import torch

    from quailora_app.engine.quantization.bnb import load_8bit
    from quailora_app.sources.models import ModelSource, load_full_precision

    source = ModelSource("bench", folder)
    if arm == "full":
        return load_full_precision(source, device, torch.float32 if device.type == "cpu" else torch.bfloat16)
    if arm == "int8":
        return load_8bit(source, device)
    return load_4bit_user_way(folder, device)


def rescale_factors(peft_model, power: float) -> None:
    """Multiply lora_A and lora_B of every LoRA layer by s ** power each (s = the layer's alpha / r)."""
    import torch
    from peft.tuners.lora import LoraLayer

    with torch.no_grad():
        for module in peft_model.modules():
            if isinstance(module, LoraLayer) and "default" in module.lora_A:
                factor = float(module.scaling["default"]) ** power
                module.lora_A["default"].weight.mul_(factor)
                module.lora_B["default"].weight.mul_(factor)


def initialize(arm: str, peft_model, calib, folder: str, row: dict) -> None:
    """The arm's init, in place; a failure of peft's LoftQ is recorded in row['unavailable']."""
    from peft import replace_lora_weights_loftq

    from quailora_app import replace_lora_weights_quailora
    from quailora_app.errors import one_line

    if arm == "loftq":
        try:  # a local checkpoint: peft needs model_path (it finds only hub ids by itself)
            replace_lora_weights_loftq(peft_model, model_path=folder)
        except Exception as exc:  # noqa: BLE001 - peft needs CUDA: say why it did not run
            row["unavailable"] = f"{type(exc).__name__}: {one_line(exc, 160)}"
        return
    method = {"loftq_rescaled": "loftq", "svd_as_peft_writes_it": "svd"}.get(arm, arm)
    try:
        result = replace_lora_weights_quailora(peft_model, calib, method, max_samples=len(calib), progress=False)
    except Exception as exc:  # noqa: BLE001 - on the CPU method "loftq" raises peft's error, in one line
        row["unavailable"] = f"{type(exc).__name__}: {one_line(exc, 200)}"
        return
    row["calibrated_error_median"] = result.calibrated_error_median
    row["api_seconds"] = dict(result.seconds)
    if arm == "svd_as_peft_writes_it":
        rescale_factors(peft_model, 0.5)  # undo the API's 1/sqrt(s) per factor: s * B @ A = s * C


def run_arm(args) -> dict:
    import torch
    from peft import LoraConfig, get_peft_model

    from quailora_app.engine.evaluation.evaluate import perplexity
    from quailora_app.sources.models import pick_device

    device = pick_device(args.device)
    tokens = torch.load(args.tokens)
    row: dict = {"arm": args.arm, "device": str(device)}
    with PeakMemory(device) as mem:
        t0 = time.perf_counter()
        model = load_model(args.arm, Path(args.folder), device)
        row["load_s"] = time.perf_counter() - t0
    row["load_peak_bytes"] = mem.peak
    if args.arm not in ("full", "int8"):
        with PeakMemory(device) as mem:
            torch.manual_seed(args.seed)
            config = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules="all-linear", lora_dropout=0.0,
                                bias="none", task_type="CAUSAL_LM")
            model = get_peft_model(model, config)
            t0 = time.perf_counter()
            if args.arm != "qlora":
                initialize(args.arm, model, tokens["calib"], args.folder, row)
            row["init_s"] = time.perf_counter() - t0
        row["init_peak_bytes"] = mem.peak
        row["scaling"] = args.alpha / args.rank
    if "unavailable" not in row:
        with PeakMemory(device) as mem:
            t0 = time.perf_counter()
            row["perplexity"] = perplexity(model, tokens["eval"])
            row["eval_s"] = time.perf_counter() - t0
        row["eval_peak_bytes"] = mem.peak
    return row


# ---------------------------------------------------------------------------------------------- parent
def prepare_tokens(args) -> tuple[Path, Path, dict]:
    """The model folder and one file of calibration / evaluation windows that every arm reads."""
    import torch

    from quailora_app import DataConfig
    from quailora_app.sources.data import load_splits
    from quailora_app.sources.models import load_tokenizer, resolve_model

    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    data = DataConfig(dataset=args.dataset, seq_len=args.seq_len, calib_samples=args.calib_samples,
                      eval_tokens=args.eval_tokens, seed=args.seed)
    splits = load_splits(data, tokenizer, min_train_seqs=0, max_train_seqs=1)  # eval, calib: as the init flow's
    WORK.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix="api_vs_loftq-", suffix=".pt", dir=WORK)
    os.close(fd)
    torch.save({"calib": splits.calib, "eval": splits.eval}, name)
    info = {"model": source.name, "folder": str(source.folder), "dataset": args.dataset,
            "calib": list(splits.calib.shape), "eval": list(splits.eval.shape), "splits": splits.summary()}
    return source.folder, Path(name), info


def child(arm: str, args, folder: Path, tokens: Path) -> dict:
    t0 = time.perf_counter()
    row = run_child(module_command(__file__, "--arm", arm, "--folder", str(folder), "--tokens", str(tokens), "--rank",
                                   str(args.rank), "--alpha", str(args.alpha), "--seed", str(args.seed), "--device",
                                   args.device), args.arm_timeout)
    if "failed" in row:
        return {"arm": arm, **row}
    row["wall_s"] = time.perf_counter() - t0
    return row


def table(result: dict) -> str:
    from quailora_app.engine.evaluation.evaluate import gap_closed

    rows, s = result["rows"], result["alpha"] / result["rank"]
    ppl = {arm: row.get("perplexity") for arm, row in rows.items()}
    device = next((row["device"] for row in rows.values() if "device" in row), "?")
    info = result["info"]
    out = [f"# {info['model']} on {info['dataset']} | {device} | rank {result['rank']}, alpha {result['alpha']} "
           f"(s = {s:g}), all-linear | calibration {' x '.join(map(str, info['calib']))} tokens, "
           f"eval {' x '.join(map(str, info['eval']))} tokens", "",
           "| arm | init seconds | peak memory GiB, load + init (whole run) | perplexity | gap closed vs 8-bit |",
           "|---|---|---|---|---|"]
    for arm in [a for a in ARMS if a in rows]:
        row = rows[arm]
        label = LABELS.get(arm, arm)
        if "failed" in row:
            out.append(f"| {label} | failed: {row['failed']} | | | |")
            continue
        init = f"{row['init_s']:.2f}" if "init_s" in row and arm != "qlora" else "-"
        before_eval = max(row.get("load_peak_bytes", 0), row.get("init_peak_bytes", 0))
        whole = max(before_eval, row.get("eval_peak_bytes", 0))
        memory = f"{gib(before_eval)} ({gib(whole)})"
        if "unavailable" in row:
            out.append(f"| {label} | n/a: {row['unavailable']} | {memory} | n/a | n/a |")
            continue
        gap = gap_closed(ppl[arm], ppl.get("qlora"), ppl.get("int8")) if arm not in ("full", "int8") else None
        out.append(f"| {label} | {init} | {memory} | {ppl[arm]:.3f} | "
                   f"{f'{100 * gap:.1f}%' if gap is not None else '-'} |")
    out.append("")
    svd, raw = ppl.get("svd"), ppl.get("svd_as_peft_writes_it")
    note = (f"Scaling: peft's LoRA layer adds s * B @ A with s = lora_alpha / r = {result['alpha']} / {result['rank']}"
            f" = {s:g}, but replace_lora_weights_loftq writes B @ A = C, LoftQ's correction (peft issue 1982), so "
            f"the layer applies {s:g} * C.")
    if s == 1:
        note += " With alpha == r that is C: the raw and rescaled factors are the same."
    else:
        note += (" The API's method \"loftq\" divides A and B by sqrt(s) each (s * B @ A = C).")
        if svd is not None and raw is not None:
            note += (f" The same mistake on the API's svd factors (x sqrt(s) each): perplexity {raw:.3f} against "
                     f"{svd:.3f} with the scaling honoured")
            note += f" (plain 4-bit: {ppl['qlora']:.3f})." if ppl.get("qlora") else "."
        loftq, fixed = ppl.get("loftq"), ppl.get("loftq_rescaled")
        if loftq is not None and fixed is not None:
            note += f" peft's LoftQ: {loftq:.3f} raw, {fixed:.3f} rescaled."
    out.append(note)
    seconds = {a: rows[a].get("init_s") for a in ("svd", "closed_form") if a in rows}
    if seconds.get("svd") and seconds.get("closed_form"):
        out.append(f"closed_form / svd init seconds: {seconds['closed_form'] / seconds['svd']:.2f}")
    if "cpu" in device:
        out.append("Peak memory: resident anonymous memory of the arm's process (RssAnon, sampled every 5 ms), through "
                   "load + init; in parentheses through the evaluation too.")
    else:
        out.append("Peak memory: torch.cuda.max_memory_allocated of the arm's process through load + init; in "
                   "parentheses through the evaluation too.")
    return "\n".join(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="embedded", help="'embedded', a local folder or a cached hub id")
    parser.add_argument("--dataset", default="embedded", help="as `python -m quailora_app init --dataset`")
    parser.add_argument("--rank", type=int, default=16)
    parser.add_argument("--alpha", type=float, default=32.0, help="lora_alpha (!= rank shows peft's scaling issue)")
    parser.add_argument("--calib-samples", type=int, default=64, help="calibration windows")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per window")
    parser.add_argument("--eval-tokens", type=int, default=16384, help="held-out tokens for perplexity")
    parser.add_argument("--seed", type=int, default=0, help="seed of the splits and of get_peft_model")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--arms", nargs="+", default=list(ARMS), choices=ARMS)
    parser.add_argument("--arm-timeout", type=float, default=None, help="seconds before an arm is given up")
    add_json_args(parser, str(OUT / "api_vs_loftq.json"), resume=False)
    parser.add_argument("--arm", help=argparse.SUPPRESS)
    parser.add_argument("--folder", help=argparse.SUPPRESS)
    parser.add_argument("--tokens", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.alpha == int(args.alpha):
        args.alpha = int(args.alpha)
    if args.arm:  # child process
        from quailora_app.engine.quiet import quiet_libraries

        quiet_libraries()
        print(json.dumps(run_arm(args)))
        return
    if reprint(args, table):
        return
    t0 = time.perf_counter()
    folder, tokens, info = prepare_tokens(args)
    print(f"{info['splits']} ({time.perf_counter() - t0:.0f} s)", flush=True)
    out = Path(args.json)
    result = {"rank": args.rank, "alpha": args.alpha, "seed": args.seed, "info": info, "rows": {},
              "command": command_line(__file__), "machine": machine()}
    try:
        for arm in [a for a in ARMS if a in args.arms]:
            row = child(arm, args, folder, tokens)
            result["rows"][arm] = row
            ppl = row.get("perplexity")
            print(f"arm {arm}: {row.get('wall_s', float('nan')):.0f} s"
                  f"{f', perplexity {ppl:.3f}' if ppl is not None and math.isfinite(ppl) else ''}"
                  f"{' (' + row.get('unavailable', row.get('failed', '')) + ')' if 'perplexity' not in row else ''}",
                  flush=True)
            write_json(result, out)  # after every arm: a run cut short keeps what it measured
    finally:
        tokens.unlink(missing_ok=True)
    print()
    print(table(result))
    print(f"\nwritten: {out}")


if __name__ == "__main__":
    main()
