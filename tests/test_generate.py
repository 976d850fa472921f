"""Generation side by side (quailora_app.flows.generate, engine/evaluation/agreement.py) on a tiny Llama and a tiny
init run: the invariants of the agreement figures, the report, the stream, the command line and its bad input."""
from __future__ import annotations

import json
import math
import shutil

import pytest
import torch

from quailora_app.cli import main as cli_main
from quailora_app.config import DataConfig, GenerateConfig, InitConfig, LoraSettings, ModelConfig, QuantConfig
from quailora_app.engine.adapters import BASE_ROW, add_adapter_with_factors, attach_lora, load_factors, write_factors
from quailora_app.engine.calibration.plan import target_paths
from quailora_app.engine.evaluation.agreement import (
    Reference,
    agreement,
    continue_tokens,
    forced_logprobs,
    stream_rows,
    top_tokens,
    versus_plain,
)
from quailora_app.engine.quantization.load import load_quantized
from quailora_app.errors import ConfigError
from quailora_app.events import GeneratedToken, Metric, RunFailed, RunFinished
from quailora_app.flows.generate import read_run, run_generate
from quailora_app.flows.init import run_init
from quailora_app.plots.figures import color, label
from quailora_app.sources.models import ModelSource, load_full_precision

pytestmark = pytest.mark.usefixtures("one_thread")  # conftest: tiny matrices, one torch thread

NEW = 8


@pytest.fixture(scope="module")
def generated(tiny_init_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("generate")
    events = list(run_generate(GenerateConfig(from_run=str(tiny_init_run), new_tokens=NEW, documents=3, device="cpu"),
                               run_dir=out))
    assert isinstance(events[-1], RunFinished), events[-1]
    return out, events, events[-1].report


def test_the_report_names_every_variant_and_its_figures(generated, tiny_init_run):
    out, _, report = generated
    assert report == json.loads((out / "report.json").read_text())
    assert report["kind"] == "generate" and report["status"] == "finished" and report["from_run"] == str(tiny_init_run)
    names = ["full", "int8", "qlora", "quailora", "closed_form"]
    assert report["variants"] == names
    assert report["labels"] == {n: label(n) for n in names}
    assert report["colours"] == {n: color(n, i) for i, n in enumerate(names)}
    assert report["prompt"]["origin"] == "the start of a held-out document" and report["prompt"]["tokens"] == 16
    for name in names:
        assert len(report["continuations"][name]["token_ids"]) == NEW
        figures = report["agreement"][name]
        assert len(figures["agree"]) == len(figures["kl"]) == len(figures["top1"]) == NEW
        assert figures["top1_agreement"] == pytest.approx(sum(figures["agree"]) / NEW)
        assert figures["mean_kl"] == pytest.approx(sum(figures["kl"]) / NEW)
        assert all(k >= 0 for k in figures["kl"])
    # full precision against itself: every position agrees, KL 0 exactly; its continuation is the reference
    assert report["agreement"]["full"]["top1_agreement"] == 1.0 and report["agreement"]["full"]["mean_kl"] == 0.0
    assert report["reference"]["token_ids"] == report["continuations"]["full"]["token_ids"]
    assert report["reference"]["greedy_matches_forced"] == 1.0  # teacher forcing gives greedy's top-1
    assert len(report["reference"]["pieces"]) == NEW
    # the quantized variants are not full precision
    assert report["agreement"]["qlora"]["mean_kl"] > 0


def test_top10_of_full_plain_and_the_best_corrected_variant(generated):
    _, _, report = generated
    corrected = {n: report["agreement"][n]["mean_kl"] for n in ("quailora", "closed_form")}
    assert report["best"] == min(corrected, key=corrected.get)
    top = report["top10"]
    assert top["variants"] == ["full", "qlora", report["best"]]
    for name in top["variants"]:
        assert len(top[name]) == NEW
        for position in top[name]:
            probs = [t["p"] for t in position]
            assert len(position) == 10 and probs == sorted(probs, reverse=True) and sum(probs) <= 1 + 1e-6
    # full precision's top-1 at each position is the token it generated
    assert [pos[0]["id"] for pos in top["full"]] == report["reference"]["token_ids"]
    assert [pos[0]["id"] for pos in top["qlora"]] == report["agreement"]["qlora"]["top1"]


def test_over_documents_the_shares_against_plain_4bit_add_up(generated):
    _, _, report = generated
    docs = report["documents"]
    assert docs["n"] == 3 and docs["positions"] == 3 * NEW and docs["prompt_tokens"] == 16
    assert docs["along"] == "held-out text" and docs["new_tokens"] == NEW
    assert docs["variants"]["full"] == {"top1_agreement": 1.0, "mean_kl": 0.0}
    assert set(docs["versus_plain"]) == {"quailora", "closed_form"}
    for name, shares in docs["versus_plain"].items():
        assert shares["positions"] == 3 * NEW
        assert shares["both"] + shares["neither"] + shares["corrected_only"] + shares["plain_only"] == \
            pytest.approx(1.0)
        # the shares follow from the two agreement figures over the same positions
        assert shares["both"] + shares["corrected_only"] == pytest.approx(docs["variants"][name]["top1_agreement"])
        assert shares["both"] + shares["plain_only"] == pytest.approx(docs["variants"]["qlora"]["top1_agreement"])


def test_tokens_stream_before_each_variants_figures(generated):
    out, events, report = generated
    order = [(e.variant if isinstance(e, GeneratedToken) else e.name) for e in events
             if isinstance(e, GeneratedToken) or (isinstance(e, Metric) and e.group == "agreement")]
    # full precision, then 8-bit, each alone; the 4-bit variants decode together, token by token in lockstep (in
    # their own lane, so their events fall among the others' anywhere)
    four_bit = ["qlora", "quailora", "closed_form"]
    assert [n for n in order if n not in four_bit] == ["full"] * (NEW + 1) + ["int8"] * (NEW + 1)
    assert [n for n in order if n in four_bit] == four_bit * NEW + four_bit
    assert all(report["continuations"][n]["batch_rows"] == 3 for n in four_bit)
    tokens = [e for e in events if isinstance(e, GeneratedToken) and e.variant == "closed_form"]
    assert [e.step for e in tokens] == list(range(1, NEW + 1)) and all(e.total == NEW for e in tokens)
    assert [e.token_id for e in tokens] == report["continuations"]["closed_form"]["token_ids"]
    assert tokens[-1].text == report["continuations"]["closed_form"]["text"]
    logged = [json.loads(line) for line in (out / "events.jsonl").read_text().splitlines()]
    assert sum(e["kind"] == "token" for e in logged) == NEW * len(report["variants"])


def test_a_zero_adapter_is_plain_4bit_exactly(tiny_init_run, tiny_model_dir, text_file):
    """qlora's saved adapter (B = 0) on the 4-bit base gives the plain base's log-probabilities bit for bit, and a
    corrected adapter does not."""
    source = ModelSource("tiny", tiny_model_dir)
    base = load_quantized(source, QuantConfig(), torch.device("cpu"), torch.float32)
    lora = LoraSettings(rank=4, alpha=8.0)
    model = attach_lora(base, lora, target_paths(base, lora))
    prompt = torch.tensor([[5, 17, 42, 7]])
    continuation = torch.tensor([continue_tokens(model, prompt, 6)])
    plain = forced_logprobs(model, prompt, continuation)
    write_factors(model, load_factors(tiny_init_run / "adapters" / "qlora")[0])
    zero = forced_logprobs(model, prompt, continuation)
    assert torch.equal(plain, zero)
    assert continue_tokens(model, prompt, 6) == continuation[0].tolist()
    found = agreement(plain, zero)
    assert found.top1_agreement == 1.0 and found.mean_kl == 0.0
    write_factors(model, load_factors(tiny_init_run / "adapters" / "closed_form")[0])
    assert agreement(plain, forced_logprobs(model, prompt, continuation)).mean_kl > 0


def test_mixed_adapter_rows_are_each_adapter_alone(tiny_init_run, tiny_model_dir):
    """One 4-bit base holding several adapters (one with per-layer ranks), its batch rows routed by peft's
    adapter_names, gives each row what that adapter alone on the base gives: the teacher-forced log-probabilities
    and the greedy continuation; the base row is plain 4-bit."""
    source = ModelSource("tiny", tiny_model_dir)
    lora = LoraSettings(rank=4, alpha=8.0)
    adapters = {m: load_factors(tiny_init_run / "adapters" / m)[0] for m in ("quailora", "closed_form")}
    first = sorted(adapters["closed_form"])[0]
    cut = {**adapters["closed_form"]}
    cut[first] = type(cut[first])(cut[first].A[:2].clone(), cut[first].B[:, :2].clone())  # rank 2 on one layer
    adapters["cut"], ranks = cut, {"cut": {first: 2}}
    prompt = torch.tensor([[5, 17, 42, 7]])

    def alone(name):
        base = load_quantized(source, QuantConfig(), torch.device("cpu"), torch.float32)
        model = attach_lora(base, lora, target_paths(base, lora), ranks.get(name))
        if name != BASE_ROW:
            write_factors(model, adapters[name])
        model.eval()
        tokens = continue_tokens(model, prompt, 6)
        return tokens, forced_logprobs(model, prompt, torch.tensor([tokens]))

    base = load_quantized(source, QuantConfig(), torch.device("cpu"), torch.float32)
    mixed = attach_lora(base, lora, target_paths(base, lora))
    for name, factors in adapters.items():
        add_adapter_with_factors(mixed, name, lora, factors, ranks.get(name))
    mixed.eval()
    rows = [BASE_ROW, *adapters]
    steps = list(stream_rows(mixed, prompt.repeat(len(rows), 1), 6, adapter_names=rows))
    for row, name in enumerate(rows):
        tokens, logprobs = alone(name)
        assert [s[row] for s in steps] == tokens, name
        batched = forced_logprobs(mixed, prompt.repeat(len(rows), 1), torch.tensor([tokens] * len(rows)),
                                  adapter_names=rows)
        torch.testing.assert_close(batched[row:row + 1], logprobs, rtol=0, atol=1e-5)
    assert not torch.allclose(batched[0], batched[3], atol=1e-3)  # the cut adapter does correct


def test_teacher_forcing_gives_greedy_top1_and_sampling_is_seeded(tiny_model_dir):
    model = load_full_precision(ModelSource("tiny", tiny_model_dir), torch.device("cpu"))
    prompt = torch.tensor([3, 9, 27, 81, 10])
    greedy = continue_tokens(model, prompt, 12)
    logprobs = forced_logprobs(model, prompt, torch.tensor(greedy))
    assert logprobs.shape == (1, 12, model.config.vocab_size)
    assert logprobs[0].argmax(-1).tolist() == greedy
    # several prompts at once give each one's greedy continuation
    batch = torch.stack([prompt, prompt.flip(0)])
    rows = torch.tensor(list(stream_rows(model, batch, 12))).T
    assert rows[0].tolist() == greedy and rows[1].tolist() == continue_tokens(model, prompt.flip(0), 12)
    # sampling draws each row with its own generator seeded alike: two equal prompts draw the same tokens
    drawn_rows = torch.tensor(list(stream_rows(model, torch.stack([prompt, prompt]), 12, sample=True,
                                               temperature=1.5, seed=7))).T
    assert drawn_rows[0].tolist() == drawn_rows[1].tolist() == continue_tokens(model, prompt, 12, sample=True,
                                                                                temperature=1.5, seed=7)
    drawn = continue_tokens(model, prompt, 12, sample=True, temperature=1.5, seed=7)
    assert drawn == continue_tokens(model, prompt, 12, sample=True, temperature=1.5, seed=7)
    assert drawn != continue_tokens(model, prompt, 12, sample=True, temperature=1.5, seed=8)
    assert continue_tokens(model, prompt, 0) == []


def test_agreement_math():
    torch.manual_seed(0)
    ref = torch.log_softmax(torch.randn(2, 5, 11), -1)
    var = torch.log_softmax(torch.randn(2, 5, 11), -1)
    same = agreement(ref, ref)
    assert bool(same.agree.all()) and float(same.kl.abs().max()) == 0.0
    found = agreement(ref, var)
    expected = (ref.double().exp() * (ref.double() - var.double())).sum(-1)
    assert torch.allclose(found.kl, expected) and bool((found.kl > 0).all())
    assert torch.equal(found.agree, ref.argmax(-1) == var.argmax(-1)) and torch.equal(found.top1, var.argmax(-1))
    assert found.top1_agreement == pytest.approx(found.agree.double().mean().item())
    record = found.record(1)
    assert record["kl"] == pytest.approx(found.kl[1].tolist()) and record["top1"] == var.argmax(-1)[1].tolist()
    top = top_tokens(ref[0, 0], 3)
    assert [i for i, _ in top] == ref[0, 0].topk(3).indices.tolist()
    assert [p for _, p in top] == pytest.approx(ref[0, 0].exp().topk(3).values.tolist())
    plain = agreement(ref, ref.roll(1, dims=-1))
    shares = versus_plain(plain, found)
    assert math.isclose(sum(v for k, v in shares.items() if k != "positions"), 1.0) and shares["positions"] == 10
    with pytest.raises(ValueError, match="do not compare"):
        agreement(ref, var[:, :4])
    made_once = Reference.of(ref)  # the reference made once for many variants gives the same figures
    again = agreement(made_once, var)
    assert torch.equal(again.kl, found.kl) and torch.equal(again.agree, found.agree)
    assert float(agreement(made_once, ref).kl.abs().max()) == 0.0


def test_teacher_forcing_projects_only_the_positions_it_asks(tiny_model_dir):
    """forced_logprobs asks transformers for the logits of the positions it returns (logits_to_keep) and gives the
    log-softmax of the whole pass's logits there; a model without logits_to_keep gets the whole pass."""
    model = load_full_precision(ModelSource("tiny", tiny_model_dir), torch.device("cpu")).eval()
    gen = torch.Generator().manual_seed(3)
    prompt, continuation = torch.randint(3, 200, (2, 5), generator=gen), torch.randint(3, 200, (2, 4), generator=gen)
    with torch.no_grad():
        whole = torch.log_softmax(model(input_ids=torch.cat([prompt, continuation], 1)).logits[:, 4:8], -1)
    widths = []
    hook = model.lm_head.register_forward_hook(lambda _m, _i, out: widths.append(out.shape[1]))
    found = forced_logprobs(model, prompt, continuation)
    hook.remove()
    assert widths == [5]  # 4 positions asked, plus the last token's own (sliced off)
    torch.testing.assert_close(found, whole, rtol=0, atol=1e-5)

    class NoKeep(torch.nn.Module):  # a causal LM whose forward takes no logits_to_keep
        def __init__(self):
            super().__init__()
            self.inner = model

        def forward(self, input_ids, use_cache=False):
            return self.inner(input_ids=input_ids, use_cache=use_cache)

    torch.testing.assert_close(forced_logprobs(NoKeep(), prompt, continuation), whole, rtol=0, atol=1e-5)


def test_a_train_run_gives_its_arms_after_fine_tuning(tiny_init_run, tmp_path):
    from quailora_app.flows.from_init import train_config_from_init  # this test only: a train run
    from quailora_app.flows.train import run_train  # the same

    train_dir = tmp_path / "train"
    cfg = train_config_from_init(tiny_init_run, arms=("qlora4", "quailora4", "qlora8"), steps=2, batch_size=2,
                                 eval_every=2, learning_rate=1e-2, device="cpu")
    assert list(run_train(cfg, run_dir=train_dir))[-1].kind == "finished"
    source = read_run(train_dir)
    assert list(source.adapters) == ["quailora", "closed_form", "qlora4", "quailora4"]  # the init run's, then arms
    assert source.trained == {"qlora4", "quailora4"} and "qlora8" in source.skipped
    events = list(run_generate(GenerateConfig(from_run=str(train_dir), new_tokens=4, documents=0, device="cpu",
                                              prompt="the quick brown fox"), run_dir=tmp_path / "gen"))
    report = events[-1].report
    assert report["status"] == "finished", events[-1]
    assert report["variants"] == ["full", "int8", "qlora", "quailora", "closed_form", "qlora4", "quailora4"]
    assert report["labels"]["quailora4"].endswith(", fine-tuned") and report["prompt"]["origin"] == "given"
    assert report["documents"] is None and "versus_plain" not in report
    # qlora4 trained away from B = 0: it no longer says exactly what plain 4-bit says
    assert report["agreement"]["qlora4"]["kl"] != report["agreement"]["qlora"]["kl"]


def test_cli_prints_continuations_and_the_agreement_table(tiny_init_run, tmp_path, capsys):
    code = cli_main(["generate", "--from-run", str(tiny_init_run), "--prompt", "the lazy dog", "--new-tokens", "4",
                     "--documents", "2", "--device", "cpu", "--out", str(tmp_path / "cli")])
    out = capsys.readouterr().out
    assert code == 0, out
    assert "prompt (given" in out and "[full precision]" in out and f"[{label('closed_form')}]" in out
    assert "top-1 agree" in out and "right where plain 4-bit is wrong" in out
    assert json.loads((tmp_path / "cli" / "report.json").read_text())["prompt"]["text"] == "the lazy dog"


def no_adapters(tiny_init_run, tmp_path):
    folder = tmp_path / "bare"
    shutil.copytree(tiny_init_run, folder, ignore=shutil.ignore_patterns("adapters"))
    return folder


def misfit_adapters(tiny_init_run, tmp_path):
    """A copy of the run whose every adapter's first lora_A has lost a column: it no longer fits the model's
    layers (the first adapter wraps the base, the others are added to it: both paths)."""
    from safetensors.torch import load_file, save_file

    folder = tmp_path / "misfit"
    shutil.copytree(tiny_init_run, folder)
    for file in (folder / "adapters").glob("*/adapter_model.safetensors"):
        tensors = load_file(file)
        key = min(k for k in tensors if "lora_A" in k)
        tensors[key] = tensors[key][:, 1:].contiguous()
        save_file(tensors, file)
    return folder


@pytest.mark.parametrize("case, extra, words", [
    ("empty prompt", ["--prompt", "  "], "the prompt is empty"),
    ("an adapter that does not fit", "misfit", "does not fit this model's LoRA layers"),
    ("zero new tokens", ["--new-tokens", "0"], "new tokens must be at least 1"),
    ("prompt beyond the context", ["--prompt", "the quick brown fox " * 200],
     "beyond the context of model"),
    ("no adapters", None, "has no adapters to compare"),
    ("no run", [], "--from-run is required"),
    ("not a run", ["--from-run", "/no/such/run"], "no such run folder"),
    ("unknown deploy adapter", ["--deploy", "--deploy-adapter", "svd"], "not an adapter of run"),
])
def test_bad_input_gets_one_line(case, extra, words, tiny_init_run, tmp_path, capsys):
    if extra is None:
        argv = ["generate", "--from-run", str(no_adapters(tiny_init_run, tmp_path))]
    elif extra == "misfit":
        argv = ["generate", "--from-run", str(misfit_adapters(tiny_init_run, tmp_path))]
    elif case in ("no run", "not a run"):
        argv = ["generate", *extra]
    else:
        argv = ["generate", "--from-run", str(tiny_init_run), *extra]
    code = cli_main([*argv, "--device", "cpu", "--out", str(tmp_path / "out")])
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert code != 0 and len(errors) == 1 and words in errors[0], err
    assert "Traceback" not in err


def test_the_config_refuses_before_anything_loads():
    with pytest.raises(ConfigError, match="prompt is empty"):
        GenerateConfig(prompt="")
    with pytest.raises(ConfigError, match="new tokens"):
        GenerateConfig(new_tokens=0)
    with pytest.raises(ConfigError, match="temperature"):
        GenerateConfig(sample=True, temperature=0.0)
    assert GenerateConfig(from_run="  ").from_run is None


def stopped_run(tiny_init_run, out, variant: str) -> tuple[list, dict]:
    """A 4-token generate run stopped at `variant`'s first token: its events and the report it left in `out`."""
    stop = {"now": False}
    events = []
    for event in run_generate(GenerateConfig(from_run=str(tiny_init_run), new_tokens=4, documents=0, device="cpu"),
                              should_stop=lambda: stop["now"], run_dir=out):
        events.append(event)
        if isinstance(event, GeneratedToken) and event.variant == variant:
            stop["now"] = True
    return events, json.loads((out / "report.json").read_text())


def test_a_stopped_run_fails_in_one_line(tiny_init_run, tmp_path):
    events, report = stopped_run(tiny_init_run, tmp_path / "stopped", "int8")
    assert isinstance(events[-1], RunFailed) and events[-1].cancelled
    assert report["status"] == "cancelled" and "full" in report["continuations"]


def test_the_4bit_base_loaded_ahead_and_dequantized_once_gives_what_bitsandbytes_own_path_gives(
        generated, tiny_init_run, tmp_path, monkeypatch):
    """On a CPU in float32 the 4-bit variants are loaded, decoded and teacher forced in a second thread beside full
    precision and 8-bit, on the base's layers dequantized once, their decode's adapters stacked; the figures are
    the same as when they come in turn, every 4-bit layer takes bitsandbytes' own forward and the rows take peft's
    own mixed batch, token for token and bit for bit."""
    from quailora_app.engine import routed_adapters
    from quailora_app.engine.quantization.dequantized_once import dequantized_once
    from quailora_app.flows import generate
    from quailora_app.flows.generate import GenerateRun

    _, _, ahead = generated
    assert ahead["four_bit_loaded"].startswith("in its own thread")
    assert ahead["four_bit_layers"].startswith("14 4-bit layers dequantized once")
    assert ahead["four_bit_adapters"].startswith("14 LoRA layers with their adapters stacked")
    monkeypatch.setattr(GenerateRun, "_start_lane", lambda self, *args: None)
    monkeypatch.setattr(generate, "dequantized_once", lambda model, dtype: dequantized_once(model, dtype, 0))
    monkeypatch.setattr(routed_adapters, "TOLERANCE", -1.0)  # no difference is small enough: peft's own batch
    events = list(run_generate(GenerateConfig(from_run=str(tiny_init_run), new_tokens=NEW, documents=3, device="cpu"),
                               run_dir=tmp_path / "in-turn"))
    in_turn = events[-1].report
    assert in_turn["four_bit_loaded"] == "in turn"
    assert in_turn["four_bit_layers"].startswith("bitsandbytes' own 4-bit forward")
    assert in_turn["four_bit_adapters"].startswith("peft's own mixed-adapter batch")
    for name in in_turn["variants"]:
        assert in_turn["continuations"][name]["token_ids"] == ahead["continuations"][name]["token_ids"], name
        assert in_turn["agreement"][name] == ahead["agreement"][name], name
    assert in_turn["documents"] == ahead["documents"]
    assert all(not entry["beside"] for entry in in_turn["continuations"].values())  # nothing decoded beside
    for report in (ahead, in_turn):  # a speed measured with the CPU shared names who shared it: the intervals overlap
        done = report["continuations"]
        for name, entry in done.items():
            for other in set(done) - set(entry["decoded_with"]):
                (a0, a1), (b0, b1) = entry["decoded"], done[other]["decoded"]
                assert (other in entry["beside"]) == (a0 < b1 and b0 < a1), (name, other)


def test_a_run_stopped_while_the_4bit_lane_works_leaves_no_thread(tiny_init_run, tmp_path):
    import threading

    # the 4-bit lane started when full precision had loaded; the stop comes at full precision's first token
    events, report = stopped_run(tiny_init_run, tmp_path / "stopped", "full")
    assert isinstance(events[-1], RunFailed) and events[-1].cancelled
    assert not [t for t in threading.enumerate() if t.name.startswith("generate-4bit")]
    assert "int8" not in report["continuations"]


def test_model_loads_take_turns_across_threads(tiny_model_dir, monkeypatch):
    """The one loader holds a process-wide lock: transformers patches torch's init functions and default dtype while
    it builds a model, so the 4-bit load ahead and any other load must not overlap."""
    import threading
    import time

    from quailora_app.sources import models

    inside, most = [0], [0]
    real = models.AutoModelForCausalLM.from_pretrained

    def counting(*args, **kwargs):
        inside[0] += 1
        most[0] = max(most[0], inside[0])
        try:
            time.sleep(0.2)  # long enough that three loads in three threads would overlap without the lock
            return real(*args, **kwargs)
        finally:
            inside[0] -= 1

    monkeypatch.setattr(models.AutoModelForCausalLM, "from_pretrained", counting)
    source = ModelSource("tiny", tiny_model_dir)
    threads = [threading.Thread(target=load_full_precision, args=(source, torch.device("cpu"))) for _ in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert most[0] == 1
    assert torch.nn.init.kaiming_uniform_.__module__ == "torch.nn.init"  # transformers' patches undone


def test_figures_draw_the_report(generated):
    from quailora_app.plots.agreement import agreement_strip, top10_figure, versus_plain_figure  # figures: here only

    _, _, report = generated
    strip = agreement_strip(report).data[0]
    rows = [n for n in report["variants"] if n != "full"]
    assert len(strip.y) == len(rows) and len(strip.x) == NEW
    for row, name in zip(strip.z, rows, strict=True):  # green (below 0.5) exactly where the variant agrees
        assert [v < 0.5 for v in row] == report["agreement"][name]["agree"] and all(0 <= v <= 1 for v in row)
    top = top10_figure(report, 3)
    assert [len(t.x) for t in top.data] == [10, 10, 10]
    assert list(top.data[0].x) == [e["p"] for e in report["top10"]["full"][3]]
    assert len(versus_plain_figure(report).data) == 2
    for draw in (agreement_strip, top10_figure, versus_plain_figure):
        assert not draw({}).data  # nothing yet: a placeholder with a line saying what will appear


def test_an_hqq_3bit_run_batches_its_variants_on_its_own_base(tiny_model_dir, text_file, tmp_path):
    """An init run at HQQ 3-bit: the generate run loads that base (hqq's layers under peft), its plain and
    corrected rows decode as one batch through peft's mixed-adapter path, and the closed form's row is its own."""
    init_dir = tmp_path / "init"
    cfg = InitConfig(ModelConfig(str(tiny_model_dir), "cpu"),
                     DataConfig(str(text_file), seq_len=32, calib_samples=8, eval_tokens=128),
                     QuantConfig(quantizer="hqq", bits=3, block_size=32), LoraSettings(rank=4, alpha=8.0),
                     methods=("closed_form",), baselines=False)
    assert list(run_init(cfg, run_dir=init_dir))[-1].kind == "finished"
    events = list(run_generate(GenerateConfig(from_run=str(init_dir), new_tokens=4, documents=1, device="cpu"),
                               run_dir=tmp_path / "gen"))
    report = events[-1].report
    assert report["status"] == "finished", events[-1]
    assert report["variants"] == ["full", "int8", "qlora", "closed_form"]
    assert report["continuations"]["closed_form"]["batch_rows"] == 2
    assert report["agreement"]["closed_form"]["kl"] != report["agreement"]["qlora"]["kl"]
    # the figures name the base the run measured, never "4-bit" when it is not
    assert report["labels"]["qlora"] == "HQQ 3-bit + QLoRA init (no correction)"
    assert report["labels"]["closed_form"] == "HQQ 3-bit + closed form (calibrated optimum)"


def test_where_memory_is_short_the_4bit_variants_come_in_turn(tiny_init_run, tmp_path, monkeypatch):
    """Three models at once need more than half the memory allowed: the run goes in turn, and finishes."""
    from quailora_app.engine.preflight import LIMIT_ENV

    monkeypatch.setenv(LIMIT_ENV, "0.0005")  # 0.5 MiB: the tiny model's three bases need more than half of it
    events = list(run_generate(GenerateConfig(from_run=str(tiny_init_run), new_tokens=2, documents=0, device="cpu"),
                               run_dir=tmp_path / "short"))
    assert isinstance(events[-1], RunFinished)
    assert events[-1].report["four_bit_loaded"] == "in turn"
