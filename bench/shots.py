"""How many few-shot examples the label task should show: full-precision accuracy of each embedded model on the
embedded sentiment labels at several shot counts, with its 95% Wilson interval, the majority answer and how often
the model answers the first label word (a model that always says "positive" scores the majority, not the task).
The evidence behind sources/tasks.py DEFAULT_SHOTS.

    python -m bench.shots                                    # both embedded models, 0 / 1 / 2 / 4 shots, 400 items
    python -m bench.shots --models embedded --dataset embedded:speeches --shots 0 2 4
"""
from __future__ import annotations

import argparse
import sys
import time

from quailora_app.threads import apply_thread_policy

apply_thread_policy()  # before torch loads: idle OpenMP threads sleep

import torch  # noqa: E402

from quailora_app.engine.evaluation.accuracy import score_task  # noqa: E402
from quailora_app.sources.models import load_full_precision, load_tokenizer, resolve_model  # noqa: E402
from quailora_app.sources.tasks import label_task  # noqa: E402

MODELS = {"embedded": "SmolLM2-135M", "embedded:gemma3": "Gemma 3 270M"}


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS))
    parser.add_argument("--dataset", default="embedded", help="labelled data: embedded, embedded:speeches, a file")
    parser.add_argument("--shots", type=int, nargs="+", default=[0, 1, 2, 4])
    parser.add_argument("--prompts", type=int, default=8, help="different few-shot prompts (1 at 0 shots)")
    parser.add_argument("--items", type=int, default=400, help="held-out items (0: all)")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(f"# full precision, {args.dataset}, {args.items or 'all'} items, {args.prompts} prompts, seed {args.seed}; "
          f"{torch.get_num_threads()} torch threads\n")
    print("| model | shots | accuracy | 95% CI | majority | answers the first label | seconds |")
    print("|---|---|---|---|---|---|---|")
    for name in args.models:
        source = resolve_model(name)
        tokenizer = load_tokenizer(source)
        model = load_full_precision(source, torch.device("cpu")).eval()
        for shots in args.shots:
            task = label_task(args.dataset, shots=shots, prompts=args.prompts if shots else 1, max_items=args.items,
                              seed=args.seed)
            start = time.perf_counter()
            score = score_task(model, tokenizer, task)
            lo, hi = score.interval()
            first = sum(p == 0 for p in score.predictions) / score.n
            print(f"| {MODELS.get(name, name)} | {shots} | {100 * score.accuracy:.1f}% | {100 * lo:.1f}-{100 * hi:.1f} "
                  f"| {100 * score.majority:.0f}% | {100 * first:.0f}% ({task.items[0].choices[0]}) | "
                  f"{time.perf_counter() - start:.0f} |", flush=True)
        del model
    return 0


if __name__ == "__main__":
    sys.exit(main())
