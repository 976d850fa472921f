"""The shipped example run: an init run and a fine-tuning run of the embedded defaults, kept small in the
repository (assets/example/) so the app shows real plots, numbers and curves on a first visit.

    python bench/make_example.py                # full settings (many minutes of CPU): writes assets/example/
    python bench/make_example.py --quick        # small settings, for development
    python bench/make_example.py --check        # re-run the shipped settings with the same seed into a temp
                                                # folder and compare every perplexity with the shipped ones

Full settings: embedded SmolLM2-135M-Instruct on the embedded rotten-tomatoes text, NF4 4-bit with double
quantization, LoRA rank 16 / alpha 16 on all linear layers, 64 x 256 calibration tokens, 16,384 held-out tokens,
every registered initialization method (LoftQ only where peft's LoftQ runs: CUDA); then the default fine-tuning
arms, 30 steps of 4 sequences, evaluated every 5 steps, started from the init run (`train --from-init`: its data
cut and held-out tokens, so the curves start at the init run's perplexities). Every perplexity is measured (the
perplexity cache is off).
The run folders are written to a temp folder, then stripped to what the page reads (report.json, events.jsonl,
each adapter's quailora.json; no adapter weights) and relabelled (their temp paths -> assets/example/...).
assets/example/example.json records the command, preset, seed, device, machine, versions and date; README.md says
the same for people.

Reproducibility: the data splits, peft's random A and the distillation's batches are seeded, and the CPU kernels
are deterministic for a given machine and thread count, so `--check` on the machine and thread count that made the
example reproduces every perplexity exactly (default tolerance 0). On another CPU (other instruction set, other
thread count) float32 sums are taken in another order: pass e.g. `--rtol 1e-3`, and expect the fine-tuning curves
to drift more than the initialization numbers (30 optimizer steps amplify last-bit differences).
"""
from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from quailora_app.app.reopen import EXAMPLE_DIR, EXAMPLE_MANIFEST  # noqa: E402
from quailora_app.cli import consume_init, consume_train  # noqa: E402
from quailora_app.config import (  # noqa: E402
    ALL_LINEAR,
    DataConfig,
    InitConfig,
    LoraSettings,
    ModelConfig,
    TrainConfig,
)
from quailora_app.engine.arms import default_arm_names  # noqa: E402
from quailora_app.engine.methods.registry import method_names  # noqa: E402
from quailora_app.flows.init import run_init  # noqa: E402
from quailora_app.flows.train import run_train  # noqa: E402
from quailora_app.runs import EVENTS, REPORT, RunFolder  # noqa: E402

#: preset -> (init settings, train settings); the model and the text are the embedded defaults in both. The train
#: data settings (calib_samples, seq_len, eval_tokens) apply only where `train --from-init` does not exist (with it,
#: the init run's data cut and held-out tokens are used).
PRESETS = {
    "full": (dict(calib_samples=64, seq_len=256, eval_tokens=16384, als_rounds=20),
             dict(calib_samples=32, seq_len=128, eval_tokens=4096, steps=30, batch_size=4, eval_every=5)),
    "quick": (dict(calib_samples=8, seq_len=128, eval_tokens=1024, als_rounds=5),
              dict(calib_samples=8, seq_len=128, eval_tokens=1024, steps=6, batch_size=2, eval_every=2)),
}
RANK, ALPHA = 16, 16.0
MAX_BYTES = 1_000_000  # what the repository should carry for the example, all files together
ADAPTER_FILES = ("quailora.json",)  # per adapter folder: the record of the init (no weights, no model card)


# ------------------------------------------------------------------------------------------------ the runs
def from_init_helper():
    """engine/from_init.train_config_from_init(run, **overrides) where `train --from-init` exists, else None."""
    try:
        from quailora_app.flows.from_init import train_config_from_init  # newer engines only
    except ImportError:
        return None
    return train_config_from_init


def has_from_init() -> bool:
    """Whether `train` can start its arms from an init run's adapters (TrainConfig.from_init)."""
    return from_init_helper() is not None and any(f.name == "from_init" for f in dataclasses.fields(TrainConfig))


def init_config(preset: str, seed: int, device: str, out: Path) -> InitConfig:
    s = PRESETS[preset][0]
    return InitConfig(
        model=ModelConfig(device=device),
        data=DataConfig(seq_len=s["seq_len"], calib_samples=s["calib_samples"], eval_tokens=s["eval_tokens"],
                        seed=seed),
        lora=LoraSettings(rank=RANK, alpha=ALPHA, targets=(ALL_LINEAR,)),
        methods=method_names(), als_rounds=s["als_rounds"], baselines=True, out=str(out))


def train_config(preset: str, seed: int, device: str, out: Path, init_dir: Path | None) -> TrainConfig:
    """The default arms. Started from the init run where `train --from-init` exists (its model, data cut,
    quantization and LoRA shape then come from the init run); else on the preset's own data settings."""
    s = PRESETS[preset][1]
    common = dict(arms=default_arm_names(), steps=s["steps"], batch_size=s["batch_size"], eval_every=s["eval_every"],
                  out=str(out))
    if init_dir is not None and has_from_init():  # the init run's data cut, held-out tokens included
        return from_init_helper()(str(init_dir), device=device, **common)
    return TrainConfig(
        model=ModelConfig(device=device),
        data=DataConfig(seq_len=s["seq_len"], calib_samples=s["calib_samples"], eval_tokens=s["eval_tokens"],
                        seed=seed),
        lora=LoraSettings(rank=RANK, alpha=ALPHA, targets=(ALL_LINEAR,)),
        als_rounds=PRESETS[preset][0]["als_rounds"], **common)


def make_runs(preset: str, seed: int, device: str, work: Path) -> dict[str, float]:
    """The init run into work/init, then the fine-tuning run into work/train; seconds of each. Every perplexity is
    measured: the perplexity cache (evaluation/perplexity_cache.py) is off, so --check re-measures rather than reads."""
    os.environ["QUAILORA_PERPLEXITY_CACHE"] = "off"
    seconds = {}
    torch.manual_seed(seed)
    start = time.time()
    if consume_init(run_init(init_config(preset, seed, device, work / "init"))) != 0:
        raise SystemExit("the init run failed; see the lines above")
    seconds["init"] = time.time() - start
    torch.manual_seed(seed)
    start = time.time()
    if consume_train(run_train(train_config(preset, seed, device, work / "train", work / "init"))) != 0:
        raise SystemExit("the fine-tuning run failed; see the lines above")
    seconds["train"] = time.time() - start
    return seconds


# ------------------------------------------------------------------------------------------------ what is shipped
def strip_into(src: Path, dst: Path, relabel: dict[str, str]) -> None:
    """Copy the part of run folder `src` the page reads into `dst`: report.json, events.jsonl and each
    adapter's quailora.json, with the paths of `relabel` (old -> new) rewritten."""
    dst.mkdir(parents=True)

    def copy_text(a: Path, b: Path) -> None:
        text = a.read_text()
        for old, new in relabel.items():
            text = text.replace(json.dumps(old)[1:-1], json.dumps(new)[1:-1])
        b.parent.mkdir(parents=True, exist_ok=True)
        b.write_text(text)

    for name in (REPORT, EVENTS):
        copy_text(src / name, dst / name)
    for adapter in sorted((src / "adapters").glob("*")):
        for name in ADAPTER_FILES:
            if (adapter / name).is_file():
                copy_text(adapter / name, dst / "adapters" / adapter.name / name)


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                   if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    versions = {}
    for name in ("torch", "transformers", "peft", "bitsandbytes"):
        try:
            versions[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - a version line is only informative
            versions[name] = "?"
    return {"cpu": cpu, "cores": os.cpu_count(), "torch_threads": torch.get_num_threads(),
            "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
            "platform": platform.platform(), "python": platform.python_version(), "versions": versions,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def perplexities(init_report: dict, train_report: dict) -> dict:
    """Every perplexity the example shows: the init run's per variant, the fine-tuning run's per arm and step."""
    return {"init": dict(init_report.get("perplexity") or {}),
            "train_reference": dict(train_report.get("reference_perplexity") or {}),
            "train": {arm: [[int(s), p] for s, p in (entry.get("evals") or [])]
                      for arm, entry in (train_report.get("arms") or {}).items()}}


def named(source: str, embedded: str) -> str:
    return f"embedded ({embedded})" if source == "embedded" else source


def readme(manifest: dict) -> str:
    i, t = manifest["init"], manifest["train"]
    m = manifest["machine"]
    ppl = manifest["perplexity"]["init"]
    rows = "\n".join(f"| {name} | {value:.3f} |" for name, value in ppl.items() if value is not None)
    arms = "\n".join(f"| {arm} | " + ", ".join(f"{p:.2f} @ {s}" for s, p in evals) + " |"
                     for arm, evals in manifest["perplexity"]["train"].items())
    quick = ("\n**This is a quick development run (`--quick`, small settings), not the full example.** Regenerate "
             "it with `python bench/make_example.py` on quiet cores.\n" if manifest["preset"] == "quick" else "")
    return f"""# The shipped example run

What the app shows on a first visit, before anyone computes anything: a real init run and a real fine-tuning run,
stripped to what the page reads (report.json, events.jsonl, each adapter's quailora.json; no adapter weights).
Both folders reopen like any run folder (the app lists them as "shipped example"; `quailora_app.runs.RunFolder`).
{quick}
Made by `{manifest['command']}` on {manifest['date']} (seed {manifest['seed']}, device {manifest['device']}):
init {manifest['seconds']['init']:.0f} s, fine-tuning {manifest['seconds']['train']:.0f} s, on {m['cpu']}
({m['cores']} cores, {m['torch_threads']} torch threads; load average {m['load_average_at_start']} at the start),
{m['platform']}, Python {m['python']}, {', '.join(f'{k} {v}' for k, v in m['versions'].items())}.

- `init/`: model {named(i['model'], 'SmolLM2-135M-Instruct')}, text {named(i['dataset'], 'Rotten Tomatoes snippets')},
  {i['quant']}, LoRA rank {i['rank']} / alpha {i['alpha']} on
  {i['targets']}, {i['calib_samples']} x {i['seq_len']} calibration tokens, {i['eval_tokens']:,} held-out tokens,
  methods {', '.join(i['methods'])}{(' (not run: ' + '; '.join(f'{k}: {v}' for k, v in i['unavailable'].items())
                                     + ')') if i['unavailable'] else ''}.
- `train/`: arms {', '.join(t['arms'])}, {t['steps']} steps of {t['batch_size']} x {t['seq_len']} tokens,
  learning rate {t['learning_rate']}, evaluated every {t['eval_every']} steps on {t['eval_tokens']:,} held-out
  tokens; {t['init_from']}.

Check that the shipped perplexities are what the command gives with the same seed (a re-run into a temp folder):
`python bench/make_example.py --check` (exact on the machine and thread count above; elsewhere pass `--rtol`, see
the script's docstring).

| variant (init run) | held-out perplexity |
|---|---|
{rows}

| arm (fine-tuning run) | perplexity @ step |
|---|---|
{arms}
"""


def describe(preset: str, seed: int, device: str, init_report: dict, train_report: dict, from_init: bool) -> dict:
    i, t = init_report["settings"], train_report["settings"]
    return {
        "init": {"model": init_report["model"], "dataset": init_report["dataset"],
                 "quant": f"{i['quant']['quant']}, double quant {i['quant']['double_quant']}, blocks of "
                          f"{i['quant']['block_size']}",
                 "rank": i["lora"]["rank"], "alpha": i["lora"]["alpha"], "targets": ", ".join(i["lora"]["targets"]),
                 "calib_samples": i["data"]["calib_samples"], "seq_len": i["data"]["seq_len"],
                 "eval_tokens": i["data"]["eval_tokens"], "methods": list(init_report["methods"]),
                 "unavailable": dict(init_report.get("unavailable") or {})},
        "train": {"arms": list(t["arms"]), "steps": t["steps"], "batch_size": t["batch_size"],
                  "seq_len": t["data"]["seq_len"], "learning_rate": t["learning_rate"], "eval_every": t["eval_every"],
                  "eval_tokens": t["data"]["eval_tokens"],
                  "init_from": "the 4-bit arms start from the init run's adapters (--from-init)" if from_init else
                               "each 4-bit arm computes its own initialization on the fine-tuning run's calibration "
                               "text"},
    }


def ship(preset: str, seed: int, device: str, out: Path, keep_work: bool) -> int:
    work = Path(tempfile.mkdtemp(prefix="quailora-example-"))
    print(f"making the example ({preset} settings, seed {seed}, device {device}) in {work}", file=sys.stderr)
    at_start = machine()
    seconds = make_runs(preset, seed, device, work)
    shown = out if not out.is_absolute() or not out.is_relative_to(REPO) else out.relative_to(REPO)
    staging = out.parent / f".{out.name}.new"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    relabel = {str(work / "init"): str(shown / "init"), str(work / "train"): str(shown / "train")}
    strip_into(work / "init", staging / "init", relabel)
    strip_into(work / "train", staging / "train", relabel)
    init_report = RunFolder(staging / "init").read_report() or {}
    train_report = RunFolder(staging / "train").read_report() or {}
    argv = " ".join(["python bench/make_example.py", *(["--quick"] if preset == "quick" else []),
                     *([f"--seed {seed}"] if seed else []), *([f"--device {device}"] if device != "cpu" else [])])
    manifest = {
        "command": argv, "preset": preset, "seed": seed, "device": device, "report_device": init_report.get("device"),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "seconds": seconds,
        "machine": at_start, "from_init": has_from_init(),
        **describe(preset, seed, device, init_report, train_report, has_from_init()),
        "perplexity": perplexities(init_report, train_report),
    }
    (staging / EXAMPLE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (staging / "README.md").write_text(readme(manifest))
    size = sum(f.stat().st_size for f in staging.rglob("*") if f.is_file())
    old = out.parent / f".{out.name}.old"
    shutil.rmtree(old, ignore_errors=True)
    if out.exists():
        out.rename(old)
    staging.rename(out)
    shutil.rmtree(old, ignore_errors=True)
    if keep_work:
        print(f"full run folders (with adapters) kept in {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    over = "; over the ~1 MB the repository should carry" if size > MAX_BYTES else ""
    print(f"wrote {out} ({size / 1e3:.0f} kB){over}")
    return 0


# ------------------------------------------------------------------------------------------------ --check
def compare(shipped: dict, again: dict, rtol: float) -> list[tuple[str, float, float | None, bool]]:
    """(name, shipped, reproduced, within rtol) for every shipped perplexity."""
    rows = []

    def one(name: str, a: float | None, b: float | None) -> None:
        if a is None:
            return
        ok = b is not None and abs(a - b) <= rtol * abs(a)
        rows.append((name, a, b, ok))

    for name, value in shipped["init"].items():
        one(f"init {name}", value, again["init"].get(name))
    for name, value in shipped["train_reference"].items():
        one(f"train reference {name}", value, again["train_reference"].get(name))
    for arm, evals in shipped["train"].items():
        theirs = dict((s, p) for s, p in again["train"].get(arm, []))
        for step, value in evals:
            one(f"train {arm} @ step {step}", value, theirs.get(step))
    return rows


def check(out: Path, rtol: float, keep_work: bool) -> int:
    manifest_path = out / EXAMPLE_MANIFEST
    if not manifest_path.is_file():
        print(f"error: no {manifest_path}: make the example first", file=sys.stderr)
        return 2
    manifest = json.loads(manifest_path.read_text())
    preset, seed, device = manifest["preset"], int(manifest["seed"]), manifest["device"]
    work = Path(tempfile.mkdtemp(prefix="quailora-example-check-"))
    print(f"re-running the shipped example ({preset} settings, seed {seed}, device {device}) in {work}",
          file=sys.stderr)
    make_runs(preset, seed, device, work)
    init_report = RunFolder(work / "init").read_report() or {}
    train_report = RunFolder(work / "train").read_report() or {}
    again = perplexities(init_report, train_report)
    settings_now = describe(preset, seed, device, init_report, train_report, has_from_init())
    differs = [k for k in ("init", "train") if settings_now[k] != manifest[k]]
    rows = compare(manifest["perplexity"], again, rtol)
    print(f"| perplexity | shipped | reproduced | relative difference | within {rtol:g} |\n|---|---|---|---|---|")
    for name, a, b, ok in rows:
        diff = f"{abs(a - b) / abs(a):.2e}" if b is not None else "missing"
        print(f"| {name} | {a:.6f} | {'-' if b is None else f'{b:.6f}'} | {diff} | {'yes' if ok else 'NO'} |")
    bad = [r for r in rows if not r[3]]
    if differs:
        print(f"the settings of the {' and '.join(differs)} run differ from the shipped ones (the script changed "
              "since the example was made)")
    if keep_work:
        print(f"run folders kept in {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    print(f"{len(rows) - len(bad)} of {len(rows)} perplexities reproduced"
          + (" exactly" if rtol == 0 else f" within a relative {rtol:g}")
          + (f"; {len(bad)} differ" if bad else "") + f" (the shipped run: {manifest['date']}, {manifest['command']})")
    return 1 if bad or differs or not rows else 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--quick", action="store_true", help="small settings, for development")
    p.add_argument("--check", action="store_true",
                   help="re-run the shipped example's settings and seed into a temp folder; compare the perplexities")
    p.add_argument("--rtol", type=float, default=0.0,
                   help="--check: relative tolerance (0 = exact, right on the machine and thread count that made it)")
    p.add_argument("--seed", type=int, default=0, help="seed of the data splits (and of peft's random A)")
    p.add_argument("--device", default="cpu", help="cpu (the shipped numbers), cuda or auto")
    p.add_argument("--out", type=Path, default=EXAMPLE_DIR, help="where the example goes (default: assets/example)")
    p.add_argument("--keep-work", action="store_true", help="keep the full run folders (with adapter weights)")
    args = p.parse_args(argv)
    if args.check:
        return check(args.out, args.rtol, args.keep_work)
    return ship("quick" if args.quick else "full", args.seed, args.device, args.out, args.keep_work)


if __name__ == "__main__":
    sys.exit(main())
