"""QLoRA fine-tuning with TRL's SFTTrainer, the LoRA factors started by QuAILoRA instead of at zero.

    .venv/bin/python examples/finetune_trl.py --steps 20
    .venv/bin/python examples/finetune_trl.py --model path/to/model --dataset notes.jsonl --text-column body

SFTTrainer builds the PeftModel from `peft_config`; QuAILoRA's initialization is written into that model
(`trainer.model`) after the trainer is built and before `trainer.train()`. Needs `pip install trl` (listed in
requirements.txt). The step-0 held-out perplexity printed below is the one the init report of
`python -m quailora_app init` gives for the same model, data and settings (on CPU; see the note on dtypes).
"""
from __future__ import annotations

import argparse

import torch
from datasets import Dataset
from peft import LoraConfig
from transformers import AutoModelForCausalLM, AutoTokenizer, BitsAndBytesConfig
from trl import SFTConfig, SFTTrainer

from quailora_app import DataConfig, keep_cpu_layout, replace_lora_weights_quailora, save_adapter
from quailora_app.engine.evaluation.evaluate import perplexity
from quailora_app.sources.data import load_splits
from quailora_app.sources.models import resolve_model


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description="QuAILoRA initialization, then fine-tuning with TRL's SFTTrainer")
    p.add_argument("--model", default="embedded",
                   help="'embedded' (SmolLM2-135M), 'embedded:gemma3' (Gemma 3 270M), a local folder or a hub id")
    p.add_argument("--dataset", default="embedded", help="'embedded' (rotten-tomatoes text), a local file or a hub id")
    p.add_argument("--text-column", default=None, help="column holding the text (guessed when not given)")
    p.add_argument("--method", default="closed_form", help="svd, quailora or closed_form")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--alpha", type=float, default=16)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--seq-len", type=int, default=128)
    p.add_argument("--calib-samples", type=int, default=32)
    p.add_argument("--eval-tokens", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--lr", type=float, default=2e-4)
    p.add_argument("--out", default="runs/example-trl", help="adapter folder")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> dict:
    args = parse_args(argv)
    folder = resolve_model(args.model).folder if args.model.startswith("embedded") else args.model
    cuda = torch.cuda.is_available()
    dtype = torch.bfloat16 if cuda else torch.float32
    bnb = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                             bnb_4bit_compute_dtype=dtype)
    model = AutoModelForCausalLM.from_pretrained(folder, quantization_config=bnb, dtype=dtype,
                                                 device_map={"": 0 if cuda else "cpu"})
    if not cuda:  # on AVX512-BF16 CPUs bitsandbytes would otherwise compute the 4-bit layers in bf16
        keep_cpu_layout(model)
    tokenizer = AutoTokenizer.from_pretrained(folder)

    # calibration, training and held-out windows from disjoint documents: the command line's splits
    data = DataConfig(args.dataset, args.text_column, seq_len=args.seq_len, calib_samples=args.calib_samples,
                      eval_tokens=args.eval_tokens)
    splits = load_splits(data, tokenizer)
    # SFTTrainer also takes a "text" column; pre-tokenized windows keep training off the calibration and
    # held-out documents
    train = Dataset.from_dict({"input_ids": splits.train.tolist()})
    config = SFTConfig(output_dir=args.out, max_steps=args.steps, per_device_train_batch_size=args.batch_size,
                       learning_rate=args.lr, max_length=args.seq_len, logging_steps=1, save_strategy="no",
                       report_to=[], use_cpu=not cuda, bf16=cuda)
    lora = LoraConfig(r=args.rank, lora_alpha=args.alpha, target_modules="all-linear", task_type="CAUSAL_LM")
    trainer = SFTTrainer(model=model, args=config, train_dataset=train, processing_class=tokenizer, peft_config=lora)
    if not cuda:
        # TRL stores a 4-bit model's LoRA factors in bfloat16 (the QLoRA recipe for GPUs); on CPU everything else
        # computes in float32, and bfloat16 factors would round the initialization and small AdamW updates away
        for param in trainer.model.parameters():
            if param.requires_grad:
                param.data = param.data.float()
    qlora = perplexity(trainer.model, splits.eval)  # peft's default factors (B = 0): the plain 4-bit model
    result = replace_lora_weights_quailora(trainer.model, splits.calib, args.method)
    step0 = perplexity(trainer.model, splits.eval)
    print(f"step 0 held-out perplexity: {step0:.4f} with {args.method} (plain QLoRA: {qlora:.4f})")

    trainer.train()
    losses = [row["loss"] for row in trainer.state.log_history if "loss" in row]
    final = perplexity(trainer.model, splits.eval)
    adapter = save_adapter(trainer.model, args.out, result, data=args.dataset)
    print(f"step {args.steps} held-out perplexity: {final:.4f}; adapter saved in {adapter}")
    return {"qlora_perplexity": qlora, "step0_perplexity": step0, "final_perplexity": final, "train_losses": losses,
            "adapter": adapter}


if __name__ == "__main__":
    main()
