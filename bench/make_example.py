"""The shipped example run: an init run, a fine-tuning run, the teaching views and an across-bits run of the
embedded defaults, kept small in the repository (assets/example/) so the app shows real plots, numbers, curves,
views and the trade-off frontier on a first visit.

    python -m bench.make_example                # full settings (many minutes of CPU): writes assets/example/
    python -m bench.make_example --quick        # small settings, for development
    python -m bench.make_example --only bits    # only the across-bits run (assets/example/bits, about 3 minutes),
                                                # into the example already there (its manifest and README updated)
    python -m bench.make_example --check        # re-run the shipped settings with the same seed into a temp
                                                # folder and compare every perplexity with the shipped ones
    python -m bench.make_example --check --only bits   # the same for the across-bits run alone
    python -m bench.make_example --only generate       # only the generate run (assets/example/generate): the init
                                                       # run's per-layer adapters made again, then generate
    python -m bench.make_example --check --only generate   # re-run it and compare its figures with the shipped ones

Full settings: embedded SmolLM2-135M-Instruct on the embedded rotten-tomatoes text, NF4 4-bit with double
quantization, LoRA rank 16 / alpha 16 on all linear layers, 64 x 256 calibration tokens, 16,384 held-out tokens,
every registered initialization method (LoftQ only where peft's LoftQ runs: CUDA); then the default fine-tuning
arms, 30 steps of 4 sequences, evaluated every 5 steps, started from the init run (`train --from-init`: its data
cut and held-out tokens, so the curves start at the init run's perplexities); then the teaching views of the
default layer at the same model, text, 4-bit settings, rank, calibration tokens and ALS rounds (`views --report`
the init run: its precision table shows the init run's perplexities); then the across-bits run the app's "Run
across bits" starts by default (app/across_bits.py: HQQ 2, 3 and 4-bit in groups of 64, each plain and with the
closed form at rank 16 on all linear layers, one calibration of 32 x 256 tokens, 4,096 held-out tokens; the same in
both presets); then the generate run of the init run (app/generation.py's defaults: greedy, 32 new tokens after the
start of a held-out document, agreement over 4 held-out documents) with its per-layer adapters (GENERATE_ADAPTERS:
svd, quailora, closed_form; the whole-model ones are left out to keep `--only generate` short) and what survives
deployment of the closed form (the merged models are not shipped: hundreds of MB). The init run keeps no adapter
weights in the repository, so `--only generate` makes them again: an init run with the shipped init's settings and
seed and only those methods (their factors do not depend on the other methods; the held-out perplexities of the
two runs are compared, and agree exactly on the machine that made the init run). Every perplexity is measured (the
perplexity cache is off).
The run folders are written to a temp folder, then stripped to what the page reads (report.json, events.jsonl,
each adapter's quailora.json; no adapter weights) and relabelled (their temp paths -> assets/example/...); the
views' figure arrays are stored as float32 and their finished event carries the report without the figures
(report.json has them).
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
import base64
import datetime as dt
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from bench.common import ROOT, machine
from bench.example_generate import (
    GENERATE_ADAPTERS,
    GENERATE_BEGIN,
    GENERATE_END,
    compact_generate,
    generate_figures,
    generate_readme,
    generate_record,
    make_generate,
)
from quailora_app.app.across_bits import default_bits_config
from quailora_app.app.reopen import EXAMPLE_DIR, EXAMPLE_MANIFEST
from quailora_app.cli import bits_table, consume_init, consume_train
from quailora_app.config import (
    ALL_LINEAR,
    BitsConfig,
    DataConfig,
    InitConfig,
    LoraSettings,
    ModelConfig,
    TrainConfig,
    ViewsConfig,
)
from quailora_app.engine.arms import default_arm_names
from quailora_app.engine.methods.registry import init_method_names
from quailora_app.flows.bits import run_bits
from quailora_app.flows.from_init import train_config_from_init
from quailora_app.flows.init import run_init
from quailora_app.flows.train import run_train
from quailora_app.flows.views import run_views
from quailora_app.runs import EVENTS, REPORT, RunFolder

#: preset -> (init settings, train settings); the model and the text are the embedded defaults in both. The train
#: run starts from the init run (`train --from-init`): its data cut and held-out tokens are the init run's.
PRESETS = {
    "full": (dict(calib_samples=64, seq_len=256, eval_tokens=16384, als_rounds=20),
             dict(steps=30, batch_size=4, eval_every=5)),
    "quick": (dict(calib_samples=8, seq_len=128, eval_tokens=1024, als_rounds=5),
              dict(steps=6, batch_size=2, eval_every=2)),
}
RANK, ALPHA = 16, 16.0
MAX_BYTES = 1_000_000  # what the repository should carry for the example, all files together
ADAPTER_FILES = ("quailora.json",)  # per adapter folder: the record of the init (no weights, no model card)


# ------------------------------------------------------------------------------------------------ the runs
def init_config(preset: str, seed: int, device: str, out: Path) -> InitConfig:
    s = PRESETS[preset][0]
    return InitConfig(
        model=ModelConfig(device=device),
        data=DataConfig(seq_len=s["seq_len"], calib_samples=s["calib_samples"], eval_tokens=s["eval_tokens"],
                        seed=seed),
        lora=LoraSettings(rank=RANK, alpha=ALPHA, targets=(ALL_LINEAR,)),
        methods=init_method_names(), als_rounds=s["als_rounds"], baselines=True, out=str(out))


def train_config(preset: str, device: str, out: Path, init_dir: Path) -> TrainConfig:
    """The default arms, started from the init run `init_dir` (`train --from-init`: its model, data cut, held-out
    tokens, quantization and LoRA shape come from the init run)."""
    s = PRESETS[preset][1]
    return train_config_from_init(str(init_dir), device=device, arms=default_arm_names(), steps=s["steps"],
                                  batch_size=s["batch_size"], eval_every=s["eval_every"], out=str(out))


def views_config(preset: str, seed: int, device: str, out: Path, init_dir: Path) -> ViewsConfig:
    """The teaching views of the default layer at the init run's model, text, 4-bit settings, rank, calibration
    tokens and ALS rounds; the precision table reads the init run's perplexities."""
    s = PRESETS[preset][0]
    return ViewsConfig(
        model=ModelConfig(device=device),
        data=DataConfig(seq_len=s["seq_len"], calib_samples=s["calib_samples"], eval_tokens=s["eval_tokens"],
                        seed=seed),
        lora=LoraSettings(rank=RANK, alpha=ALPHA, targets=(ALL_LINEAR,)), reports=(str(init_dir),),
        als_rounds=s["als_rounds"], out=str(out))


def bits_config(seed: int, device: str, out: Path) -> BitsConfig:
    """The app's default across-bits run (app/across_bits.py; the same in both presets)."""
    return default_bits_config(seed=seed, device=device, out=str(out))


def make_bits(seed: int, device: str, work: Path) -> float:
    """The across-bits run into work/bits; its seconds. The perplexity cache is off (see make_runs)."""
    os.environ["QUAILORA_PERPLEXITY_CACHE"] = "off"
    torch.manual_seed(seed)
    start = time.time()
    if consume_init(run_bits(bits_config(seed, device, work / "bits")), table=bits_table) != 0:
        raise SystemExit("the across-bits run failed; see the lines above")
    return time.time() - start


def remake_adapters(manifest: dict, device: str, work: Path) -> dict[str, tuple[float, float]]:
    """The shipped init run's GENERATE_ADAPTERS made again into work/init (its settings and seed, only those
    methods, no baselines); method -> (shipped perplexity, this run's)."""
    os.environ["QUAILORA_PERPLEXITY_CACHE"] = "off"
    preset, seed = manifest["preset"], int(manifest["seed"])
    cfg = init_config(preset, seed, device, work / "init")
    cfg = InitConfig(model=cfg.model, data=cfg.data, quant=cfg.quant, lora=cfg.lora,
                     methods=("qlora", *GENERATE_ADAPTERS), als_rounds=cfg.als_rounds, baselines=False, out=cfg.out)
    torch.manual_seed(seed)
    if consume_init(run_init(cfg)) != 0:
        raise SystemExit("the init run (the adapters again) failed; see the lines above")
    again = (RunFolder(work / "init").read_report() or {}).get("perplexity") or {}
    shipped = manifest["perplexity"]["init"]
    return {m: (shipped.get(m), again.get(m)) for m in ("qlora", *GENERATE_ADAPTERS)}


def shipped_manifest(out: Path) -> dict | None:
    """The manifest of the example already in `out` (None, with a line on stderr, when there is none)."""
    manifest_path = out / EXAMPLE_MANIFEST
    if not manifest_path.is_file():
        print(f"error: no {manifest_path}: make the whole example first (python -m bench.make_example)",
              file=sys.stderr)
        return None
    return json.loads(manifest_path.read_text())


def ship_generate(device: str, out: Path, keep_work: bool, init_dir: Path | None = None, deploy: bool = True) -> int:
    """Only the generate run, into the example already in `out` (generate/, its manifest entry, its README
    section): the init run's adapters made again (`remake_adapters`; or `init_dir`, a finished init run made so
    before, e.g. kept by --keep-work), then the generate run (with what survives deployment unless not `deploy`)."""
    manifest = shipped_manifest(out)
    if manifest is None:
        return 2
    work = Path(tempfile.mkdtemp(prefix="quailora-example-generate-"))
    print(f"making the example's generate run (device {device}) in {work}", file=sys.stderr)
    at_start = machine()
    start = time.time()
    if init_dir is None:
        adapters = remake_adapters(manifest, device, work)
        init_dir = work / "init"
    else:
        again = (RunFolder(init_dir).read_report() or {}).get("perplexity") or {}
        adapters = {m: (manifest["perplexity"]["init"].get(m), again.get(m)) for m in ("qlora", *GENERATE_ADAPTERS)}
    init_seconds = time.time() - start
    seconds = make_generate(device, work, init_dir, deploy)
    shown = out if not out.is_absolute() or not out.is_relative_to(ROOT) else out.relative_to(ROOT)
    staging = out / ".generate.new"
    shutil.rmtree(staging, ignore_errors=True)
    strip_into(work / "generate", staging, {str(work / "generate"): str(shown / "generate"),
                                            str(work / "init-for-generate"): str(shown / "init")})
    compact_generate(staging)
    report = RunFolder(staging).read_report() or {}
    argv = " ".join(["python -m bench.make_example --only generate", *([] if deploy else ["--no-deploy"]),
                     *([f"--device {device}"] if device != "cpu" else [])])
    manifest["generate"] = generate_record(argv, seconds, at_start, report, adapters, init_seconds)
    shutil.rmtree(out / "generate", ignore_errors=True)
    staging.rename(out / "generate")
    (out / EXAMPLE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    readme_path = out / "README.md"
    readme_text = readme_path.read_text() if readme_path.is_file() else "# The shipped example run\n"
    readme_path.write_text(with_section(readme_text, generate_readme(manifest), GENERATE_BEGIN, GENERATE_END))
    if keep_work:
        print(f"the full run folders kept in {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    size = sum(f.stat().st_size for f in (out / "generate").rglob("*") if f.is_file())
    print(f"wrote {out / 'generate'} ({size / 1e3:.0f} kB) in {seconds:.0f} s (the adapters again: "
          f"{init_seconds:.0f} s)")
    return 0


def make_runs(preset: str, seed: int, device: str, work: Path) -> dict[str, float]:
    """The init run into work/init, then the fine-tuning run into work/train, the teaching views and the
    across-bits run; seconds of each. Every perplexity is measured: the perplexity cache (evaluation/
    perplexity_cache.py) is off, so --check re-measures rather than reads."""
    os.environ["QUAILORA_PERPLEXITY_CACHE"] = "off"
    seconds = {}
    torch.manual_seed(seed)
    start = time.time()
    if consume_init(run_init(init_config(preset, seed, device, work / "init"))) != 0:
        raise SystemExit("the init run failed; see the lines above")
    seconds["init"] = time.time() - start
    torch.manual_seed(seed)
    start = time.time()
    if consume_train(run_train(train_config(preset, device, work / "train", work / "init"))) != 0:
        raise SystemExit("the fine-tuning run failed; see the lines above")
    seconds["train"] = time.time() - start
    torch.manual_seed(seed)
    start = time.time()
    if [e.kind for e in run_views(views_config(preset, seed, device, work / "views", work / "init"))][-1] != "finished":
        raise SystemExit("the teaching views failed; see the lines above")
    seconds["views"] = time.time() - start
    seconds["bits"] = make_bits(seed, device, work)
    seconds["generate"] = make_generate(device, work, work / "init")
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


def _float32(node):
    """plotly's float64 typed arrays ({"dtype": "f8", "bdata": ...}) as float32: half the bytes, the same figure."""
    if isinstance(node, dict):
        if node.get("dtype") == "f8" and "bdata" in node:
            values = np.frombuffer(base64.b64decode(node["bdata"]), dtype="<f8").astype("<f4")
            return {**node, "dtype": "f4", "bdata": base64.b64encode(values.tobytes()).decode()}
        return {k: _float32(v) for k, v in node.items()}
    return [_float32(v) for v in node] if isinstance(node, list) else node


def compact_views(folder: Path) -> None:
    """A stripped views run, smaller: its figures' float64 arrays as float32, and its finished event's report
    without the figures (report.json holds them)."""
    report = json.loads((folder / REPORT).read_text())
    report["figures"] = {k: json.dumps(_float32(json.loads(v)), separators=(",", ":"))
                         for k, v in report["figures"].items()}
    (folder / REPORT).write_text(json.dumps(report, indent=1) + "\n")
    events = [json.loads(line) for line in (folder / EVENTS).read_text().splitlines() if line.strip()]
    for e in events:
        if e.get("kind") == "finished" and isinstance(e.get("report"), dict):
            e["report"] = {k: v for k, v in e["report"].items() if k != "figures"}
    (folder / EVENTS).write_text("".join(json.dumps(e) + "\n" for e in events))


def perplexities(init_report: dict, train_report: dict, bits_report: dict | None = None) -> dict:
    """Every perplexity the example shows: the init run's per variant, the fine-tuning run's per arm and step, and
    the across-bits run's per point ("hqq3/closed_form") and of full precision."""
    out = {"init": dict(init_report.get("perplexity") or {}),
           "train_reference": dict(train_report.get("reference_perplexity") or {}),
           "train": {arm: [[int(s), p] for s, p in (entry.get("evals") or [])]
                     for arm, entry in (train_report.get("arms") or {}).items()}}
    if bits_report is not None:
        out["bits"] = bits_perplexities(bits_report)
    return out


def bits_perplexities(report: dict) -> dict:
    """The across-bits run's perplexities: per point of the frontier, and "full"."""
    out = {name: point["perplexity"] for name, point in (report.get("points") or {}).items()}
    out["full"] = report.get("full")
    return out


def describe_bits(report: dict) -> dict:
    """The across-bits run's settings, as its manifest records them (and --check compares)."""
    s = report["settings"]
    return {"model": report["model"], "dataset": report["dataset"], "bases": list(s["bases"]),
            "methods": list(s["methods"]), "group_size": s["group_size"], "rank": s["lora"]["rank"],
            "alpha": s["lora"]["alpha"], "targets": ", ".join(s["lora"]["targets"]),
            "calib_samples": s["data"]["calib_samples"], "seq_len": s["data"]["seq_len"],
            "eval_tokens": s["data"]["eval_tokens"], "seed": s["data"]["seed"]}


BITS_BEGIN, BITS_END = "<!-- bits: written by python -m bench.make_example -->", "<!-- /bits -->"


def bits_readme(manifest: dict) -> str:
    """The README's across-bits section (between BITS_BEGIN and BITS_END)."""
    b = manifest["bits"]
    s, m = b["settings"], b["machine"]
    ppl = manifest["perplexity"]["bits"]
    rows = "\n".join(f"| {name} | {value:,.3f} |" for name, value in ppl.items() if value is not None)
    return f"""{BITS_BEGIN}
## `bits/`: the across-bits run (the Across bits tab)

What the app's *Run across bits* starts by default: model {named(s['model'], 'SmolLM2-135M-Instruct')}, text
{named(s['dataset'], 'Rotten Tomatoes snippets')}, bases {', '.join(s['bases'])} (HQQ groups of {s['group_size']}),
each plain and with {', '.join(s['methods'])} at LoRA rank {s['rank']} / alpha {s['alpha']} on {s['targets']}, one
calibration of {s['calib_samples']} x {s['seq_len']} tokens shared by every base, {s['eval_tokens']:,} held-out tokens
(seed {s['seed']}). Made by `{b['command']}` on {b['date']} in {b['seconds']:.0f} s on {m['cpu']} ({m['cores']} cores,
{m['torch_threads']} torch threads; load average {m['load_average_at_start']} at the start). Check it with
`{b['command'].replace(' --only', ' --check --only')}`.

{b.get('reading', '')}

| point (base/method) | held-out perplexity |
|---|---|
{rows}
{BITS_END}
"""


def with_bits_section(readme_text: str, section: str) -> str:
    """The README with its across-bits section replaced (or added at the end)."""
    return with_section(readme_text, section, BITS_BEGIN, BITS_END)


def with_section(readme_text: str, section: str, begin: str, end: str) -> str:
    """The README with the section between `begin` and `end` replaced (or added at the end)."""
    if begin in readme_text and end in readme_text:
        head, rest = readme_text.split(begin, 1)
        return head + section.rstrip("\n") + rest.split(end, 1)[1]
    return readme_text.rstrip("\n") + "\n\n" + section


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
             "it with `python -m bench.make_example` on quiet cores.\n" if manifest["preset"] == "quick" else "")
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
- `views/`: the teaching views of layer {manifest['views']['layer']} (the app's default) at LoRA rank
  {manifest['views']['rank']}, the same calibration tokens and 4-bit settings, a rank sweep over r =
  {', '.join(str(r) for r in manifest['views']['ranks'])}; the precision table reads `init/`'s perplexities.

Check that the shipped perplexities are what the command gives with the same seed (a re-run into a temp folder):
`python -m bench.make_example --check` (exact on the machine and thread count above; elsewhere pass `--rtol`, see
the script's docstring).

| variant (init run) | held-out perplexity |
|---|---|
{rows}

| arm (fine-tuning run) | perplexity @ step |
|---|---|
{arms}
"""


def describe(preset: str, seed: int, device: str, init_report: dict, train_report: dict) -> dict:
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
                  "init_from": "the 4-bit arms start from the init run's adapters (--from-init)"},
    }


def ship(preset: str, seed: int, device: str, out: Path, keep_work: bool) -> int:
    work = Path(tempfile.mkdtemp(prefix="quailora-example-"))
    print(f"making the example ({preset} settings, seed {seed}, device {device}) in {work}", file=sys.stderr)
    at_start = machine()
    seconds = make_runs(preset, seed, device, work)
    shown = out if not out.is_absolute() or not out.is_relative_to(ROOT) else out.relative_to(ROOT)
    staging = out.parent / f".{out.name}.new"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    relabel = {str(work / "init-for-generate"): str(shown / "init"),  # first: work/init is a prefix of it
               **{str(work / kind): str(shown / kind) for kind in ("init", "train", "views", "bits", "generate")}}
    strip_into(work / "init", staging / "init", relabel)
    strip_into(work / "train", staging / "train", relabel)
    strip_into(work / "views", staging / "views", relabel)
    compact_views(staging / "views")
    strip_into(work / "bits", staging / "bits", relabel)
    strip_into(work / "generate", staging / "generate", relabel)
    compact_generate(staging / "generate")
    views_report = RunFolder(staging / "views").read_report() or {}
    init_report = RunFolder(staging / "init").read_report() or {}
    train_report = RunFolder(staging / "train").read_report() or {}
    bits_report = RunFolder(staging / "bits").read_report() or {}
    argv = " ".join(["python -m bench.make_example", *(["--quick"] if preset == "quick" else []),
                     *([f"--seed {seed}"] if seed else []), *([f"--device {device}"] if device != "cpu" else [])])
    manifest = {
        "command": argv, "preset": preset, "seed": seed, "device": device, "report_device": init_report.get("device"),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"), "seconds": seconds,
        "machine": at_start, "from_init": True,
        **describe(preset, seed, device, init_report, train_report),
        "perplexity": perplexities(init_report, train_report, bits_report),
        "bits": bits_record(argv, seed, seconds["bits"], at_start, bits_report),
        "generate": generate_record(argv, seconds["generate"], at_start,
                                    RunFolder(staging / "generate").read_report() or {}, None),
        "views": {"layer": views_report.get("layer"), "rank": views_report.get("rank"),
                  "ranks": views_report.get("ranks"), "calibration": views_report.get("calibration")},
    }
    (staging / EXAMPLE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    (staging / "README.md").write_text(with_section(with_bits_section(readme(manifest), bits_readme(manifest)),
                                                    generate_readme(manifest), GENERATE_BEGIN, GENERATE_END))
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


def bits_record(command: str, seed: int, seconds: float, at_start: dict, report: dict) -> dict:
    """The manifest's record of the across-bits run: command, date, seconds, machine, settings, reading."""
    return {"command": command, "seed": seed, "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
            "seconds": seconds, "machine": at_start, "settings": describe_bits(report),
            "reading": report.get("reading", "")}


def ship_bits(seed: int, device: str, out: Path, keep_work: bool) -> int:
    """Only the across-bits run, into the example already in `out` (bits/, its manifest entries, its README
    section); the init, fine-tuning and views runs are left as they are."""
    manifest = shipped_manifest(out)
    if manifest is None:
        return 2
    work = Path(tempfile.mkdtemp(prefix="quailora-example-bits-"))
    print(f"making the example's across-bits run (seed {seed}, device {device}) in {work}", file=sys.stderr)
    at_start = machine()
    seconds = make_bits(seed, device, work)
    shown = out if not out.is_absolute() or not out.is_relative_to(ROOT) else out.relative_to(ROOT)
    staging = out / ".bits.new"
    shutil.rmtree(staging, ignore_errors=True)
    strip_into(work / "bits", staging, {str(work / "bits"): str(shown / "bits")})
    report = RunFolder(staging).read_report() or {}
    argv = " ".join(["python -m bench.make_example --only bits", *([f"--seed {seed}"] if seed else []),
                     *([f"--device {device}"] if device != "cpu" else [])])
    manifest["bits"] = bits_record(argv, seed, seconds, at_start, report)
    manifest.setdefault("perplexity", {})["bits"] = bits_perplexities(report)
    shutil.rmtree(out / "bits", ignore_errors=True)
    staging.rename(out / "bits")
    (out / EXAMPLE_MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    readme_path = out / "README.md"
    readme_text = readme_path.read_text() if readme_path.is_file() else "# The shipped example run\n"
    readme_path.write_text(with_bits_section(readme_text, bits_readme(manifest)))
    if keep_work:
        print(f"the full run folder kept in {work}", file=sys.stderr)
    else:
        shutil.rmtree(work, ignore_errors=True)
    size = sum(f.stat().st_size for f in out.rglob("*") if f.is_file())
    over = "; over the ~1 MB the repository should carry" if size > MAX_BYTES else ""
    print(f"wrote {out / 'bits'} in {seconds:.0f} s (the example: {size / 1e3:.0f} kB{over})")
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

    for name, value in (shipped.get("init") or {}).items():
        one(f"init {name}", value, (again.get("init") or {}).get(name))
    for name, value in (shipped.get("train_reference") or {}).items():
        one(f"train reference {name}", value, (again.get("train_reference") or {}).get(name))
    for arm, evals in (shipped.get("train") or {}).items():
        theirs = dict((s, p) for s, p in (again.get("train") or {}).get(arm, []))
        for step, value in evals:
            one(f"train {arm} @ step {step}", value, theirs.get(step))
    for name, value in (shipped.get("bits") or {}).items():
        one(f"bits {name}", value, (again.get("bits") or {}).get(name))
    for name, value in (shipped.get("generate") or {}).items():
        one(f"generate {name}", value, (again.get("generate") or {}).get(name))
    return rows


def check(out: Path, rtol: float, keep_work: bool, only: str | None = None) -> int:
    """Re-run the shipped example (`only` = "bits": its across-bits run alone) with its settings and seed into a
    temp folder; print every shipped perplexity beside the reproduced one; 0 when all agree within `rtol`."""
    manifest_path = out / EXAMPLE_MANIFEST
    if not manifest_path.is_file():
        print(f"error: no {manifest_path}: make the example first", file=sys.stderr)
        return 2
    manifest = json.loads(manifest_path.read_text())
    preset, seed, device = manifest["preset"], int(manifest["seed"]), manifest["device"]
    if only in ("bits", "generate") and only not in manifest:
        what = {"bits": "across-bits", "generate": "generate"}[only]
        print(f"error: the shipped example has no {what} run: python -m bench.make_example --only {only}",
              file=sys.stderr)
        return 2
    work = Path(tempfile.mkdtemp(prefix="quailora-example-check-"))
    what = {"bits": "across-bits run", "generate": "generate run"}[only] if only else f"example ({preset} settings"
    print(f"re-running the shipped {what}{',' if only else ''} seed {seed}, device {device}{'' if only else ')'} in "
          f"{work}", file=sys.stderr)
    shipped, differs = dict(manifest["perplexity"]), []
    if only == "bits":
        seed = int(manifest["bits"].get("seed", seed))
        make_bits(seed, device, work)
        shipped = {"bits": shipped.get("bits") or {}}
        again = {}
    elif only == "generate":
        remake_adapters(manifest, device, work)
        make_generate(device, work, work / "init", bool(manifest["generate"]["settings"].get("deploy")))
        shipped, again = {}, {}
    else:
        make_runs(preset, seed, device, work)
        init_report = RunFolder(work / "init").read_report() or {}
        train_report = RunFolder(work / "train").read_report() or {}
        again = perplexities(init_report, train_report)
        settings_now = describe(preset, seed, device, init_report, train_report)
        differs = [k for k in ("init", "train") if settings_now[k] != manifest[k]]
    if "bits" in shipped:
        bits_report = RunFolder(work / "bits").read_report() or {}
        again["bits"] = bits_perplexities(bits_report)
        if describe_bits(bits_report) != manifest["bits"]["settings"]:
            differs.append("across-bits")
    if "generate" in manifest and only in (None, "generate"):
        generate_report = RunFolder(work / "generate").read_report() or {}
        shipped["generate"] = manifest["generate"]["figures"]
        again["generate"] = generate_figures(generate_report)
    rows = compare(shipped, again, rtol)
    print(f"| perplexity | shipped | reproduced | relative difference | within {rtol:g} |\n|---|---|---|---|---|")
    for name, a, b, ok in rows:
        diff = "missing" if b is None else f"{abs(a - b) / abs(a):.2e}" if a else f"{abs(b):.2e} (absolute)"
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
          + (f"; {len(bad)} differ" if bad else "")
          + (f" (the shipped run: {manifest[only]['date']}, {manifest[only]['command']})" if only else
             f" (the shipped run: {manifest['date']}, {manifest['command']})"))
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
    p.add_argument("--only", choices=["bits", "generate"], default=None,
                   help="only the across-bits run, or only the generate run: made into the example already there (its "
                        "manifest and README updated), or with --check re-run and compared alone")
    p.add_argument("--init-dir", type=Path, default=None,
                   help="--only generate: a finished init run with the shipped init's settings and seed and adapters "
                        "svd, quailora and closed_form (e.g. kept by --keep-work) instead of making them again")
    p.add_argument("--no-deploy", action="store_true",
                   help="--only generate: leave out what survives deployment (six perplexities and two merged models)")
    args = p.parse_args(argv)
    if args.check:
        return check(args.out, args.rtol, args.keep_work, args.only)
    if args.only == "bits":
        return ship_bits(args.seed, args.device, args.out, args.keep_work)
    if args.only == "generate":
        return ship_generate(args.device, args.out, args.keep_work, args.init_dir, not args.no_deploy)
    return ship("quick" if args.quick else "full", args.seed, args.device, args.out, args.keep_work)


if __name__ == "__main__":
    sys.exit(main())
