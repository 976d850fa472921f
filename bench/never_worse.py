"""The Python API on the 4-bit layouts users have: is the model closer to full precision after the call, and what
does the self-check cost?

    python -m bench.never_worse                      # embedded SmolLM2, 16 x 256 calibration, rank 16, closed_form
    python -m bench.never_worse --methods closed_form svd --calib-samples 32

For each bitsandbytes layout (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4") with double
quantization off, the class default, and on) and each order (the API called on a fresh model, or after one
evaluation pass, which on AVX512-BF16 CPUs makes bitsandbytes repack the layers): the mean squared logit error to
the full-precision model on held-out windows (documents the calibration never saw), with peft's default factors
(B = 0, no correction) and after `replace_lora_weights_quailora`; the calibration given as texts, and once as
DataLoader-style padded batches ({"input_ids", "attention_mask"}). Beside it the API's seconds: calibration, the
method, and the self-check (its share of the call), the self-check's median held-out error ratio and the layers
it reset. Each configuration runs in this process, one after the other. Prints a Markdown table; --json writes it.
"""
from __future__ import annotations

import argparse
import json
import time

import torch
from peft import LoraConfig, get_peft_model
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig

from bench.common import OUT, add_json_args, machine, write_json
from quailora_app import replace_lora_weights_quailora
from quailora_app.sources.data import load_texts, make_splits
from quailora_app.sources.models import resolve_model


def padded_batches(texts: list[str], tokenizer, batch: int = 8, max_len: int = 256) -> list[dict]:
    """What a Trainer's dataloader yields: right-padded input_ids with their attention_mask."""
    out = []
    for i in range(0, len(texts), batch):
        rows = [tokenizer(t, add_special_tokens=False)["input_ids"][:max_len] for t in texts[i:i + batch]]
        width = max(len(r) for r in rows)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
        out.append({"input_ids": torch.tensor([r + [pad] * (width - len(r)) for r in rows]),
                    "attention_mask": torch.tensor([[1] * len(r) + [0] * (width - len(r)) for r in rows])})
    return out


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", default="embedded")
    p.add_argument("--dataset", default="embedded")
    p.add_argument("--methods", nargs="+", default=["closed_form"])
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--calib-samples", type=int, default=16)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--eval-tokens", type=int, default=2048)
    add_json_args(p, str(OUT / "never_worse.json"), resume=False, from_json=False)
    args = p.parse_args(argv)

    folder = resolve_model(args.model).folder
    tokenizer = AutoTokenizer.from_pretrained(folder)
    texts = load_texts(args.dataset)
    calib_texts = texts[-4000:]  # the calibration documents; the held-out windows come from the others
    held_out = make_splits(texts[:-4000], tokenizer, seq_len=args.seq_len, calib_samples=1,
                           eval_tokens=args.eval_tokens).eval
    with torch.no_grad():
        target = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)(input_ids=held_out).logits

    def logit_mse(model) -> float:
        with torch.no_grad():
            return float((model(input_ids=held_out).logits - target).pow(2).mean())

    rows = []
    configs = [(dq, first, "texts") for dq in (False, True) for first in (True, False)] + [(False, True, "batches")]
    for method in args.methods:
        for double_quant, forward_first, form in configs:
            bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                     bnb_4bit_use_double_quant=double_quant)
            model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb)
            if forward_first:
                with torch.no_grad():
                    model(input_ids=held_out[:1, :32])  # an evaluation pass: bitsandbytes repacks on AVX512-BF16
            torch.manual_seed(0)
            peft_model = get_peft_model(model, LoraConfig(r=args.rank, lora_alpha=args.rank,
                                                          target_modules="all-linear", task_type="CAUSAL_LM"))
            calibration = calib_texts if form == "texts" else padded_batches(calib_texts[:2000], tokenizer)
            start = time.perf_counter()
            result = replace_lora_weights_quailora(peft_model, calibration, method, tokenizer=tokenizer,
                                                   seq_len=args.seq_len, max_samples=args.calib_samples,
                                                   progress=False)
            seconds = time.perf_counter() - start
            after = logit_mse(peft_model)  # (an inference forward: it repacks a model that was not yet)
            with peft_model.disable_adapter():
                before = logit_mse(peft_model)  # peft's default start, B = 0: no correction
            check = result.self_check
            row = {"method": method, "double_quant": double_quant, "forward_first": forward_first,
                   "calibration": form, "mse_none": before, "mse_after": after, "ratio": after / before,
                   "seconds": seconds, "self_check_seconds": result.seconds["self_check"],
                   "self_check_share": result.seconds["self_check"] / seconds,
                   "median_layer_ratio": check["median_ratio"], "worst_layer_ratio": check["worst"],
                   "layers": len(result.layers), "layers_reset": result.layers_reset,
                   "check_tokens": check["tokens"], "held_out": check["held_out"]}
            rows.append(row)
            print(json.dumps({k: v for k, v in row.items() if k != "layers_reset"}), flush=True)
            del model, peft_model
    print()
    print(f"{args.model}, rank {args.rank}, {args.calib_samples} x {args.seq_len} calibration tokens, "
          f"{held_out.numel():,} held-out tokens; logit MSE to full precision")
    print("| method | double quant | forward first | calibration | no correction | after | ratio | layers reset "
          "| self-check: median layer ratio | self-check s / call s |")
    print("|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['method']} | {'on' if r['double_quant'] else 'off'} | {'yes' if r['forward_first'] else 'no'} | "
              f"{r['calibration']} | {r['mse_none']:.4f} | {r['mse_after']:.4f} | {r['ratio']:.3f} | "
              f"{len(r['layers_reset'])} of {r['layers']} | {r['median_layer_ratio']:.3f} | "
              f"{r['self_check_seconds']:.1f} / {r['seconds']:.1f} ({100 * r['self_check_share']:.0f}%) |")
    if args.json:
        write_json({"args": vars(args), "machine": machine(), "rows": rows}, args.json, indent=1)
    return rows


if __name__ == "__main__":
    main()
