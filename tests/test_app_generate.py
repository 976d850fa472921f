"""The app's Generate section (app/generation.py, the Studio's generate handlers), called directly (no server): the
agreement strip colours each token as the figure does, the continuations stream, the tables and the top-10 view
follow the report; bad input (an empty own prompt, zero new tokens, a prompt beyond the context, a run folder
without adapters, the shipped example) gets one line; on a tiny init run the handlers start a real generate job,
draw it, choose a position and hand over the merged model of a deploy run; the shipped generate run draws."""
from __future__ import annotations

import re
import shutil
import zipfile

import pytest

from quailora_app.app.generation import (
    LATEST,
    continuations_html,
    deploy_markdown,
    deploy_table,
    example_generate,
    generate_drawn,
    generate_progress,
    make_generate_config,
    position_view,
    source_choices,
    source_folder,
    strip_html,
    summary_table,
)
from quailora_app.app.jobs import RUNNING, Job
from quailora_app.app.reopen import EXAMPLE_DIR
from quailora_app.errors import UserError
from quailora_app.plots.agreement import cell_colour, strip_values

N = 4
VARIANTS = ["full", "int8", "qlora", "quailora"]
AGREE = {"full": [True] * N, "int8": [True, True, False, True], "qlora": [True, False, False, True],
         "quailora": [True, True, True, False]}
KL = {"full": [0.0] * N, "int8": [0.01, 0.02, 0.3, 0.0], "qlora": [0.05, 0.8, 1.2, 0.1],
      "quailora": [0.02, 0.1, 0.2, 0.6]}


def figures(name: str) -> dict:
    return {"agree": AGREE[name], "kl": KL[name], "top1": [1] * N, "top1_agreement": sum(AGREE[name]) / N,
            "mean_kl": sum(KL[name]) / N}


def report(**over) -> dict:
    """A finished generate report as flows/generate.py writes one, small and by hand."""
    top = [[{"id": i, "text": f"t{i}", "p": 0.5 / (i + 1)} for i in range(10)] for _ in range(N)]
    base = {
        "kind": "generate", "status": "finished", "variants": list(VARIANTS), "new_tokens": N,
        "labels": {"full": "full precision", "int8": "8-bit (LLM.int8)", "qlora": "QLoRA", "quailora": "QuAILoRA"},
        "colours": {"full": "#4d4d4d", "int8": "#8c8c8c", "qlora": "#1f77b4", "quailora": "#d62728"},
        "prompt": {"text": "<b>the", "tokens": 2, "origin": "given"}, "sampling": None,
        "continuations": {n: {"text": f"{n} says\nmore", "token_ids": [1] * N, "tokens_per_s": 8.0}
                          for n in VARIANTS},
        "reference": {"token_ids": [5, 6, 7, 8], "pieces": [" a", "\n", "<c>", " d"]},
        "agreement": {n: figures(n) for n in VARIANTS},
        "documents": {"n": 2, "positions": 8, "variants": {n: {"top1_agreement": 0.5, "mean_kl": 0.2}
                                                           for n in VARIANTS},
                      "versus_plain": {"quailora": {"corrected_only": 0.25, "plain_only": 0.125}}},
        "top10": {"variants": ["full", "qlora", "quailora"], "full": top, "qlora": top, "quailora": top},
        "best": "quailora"}
    return {**base, **over}


def cells(html_text: str, variant: str) -> list[tuple[str, str]]:
    """(style, text) of each token cell of one variant's row of the strip."""
    row = html_text.split(f"data-variant='{variant}'", 1)[1].split("</div></div>", 1)[0]
    return re.findall(r"<span class='g-tok[^']*' style='([^']*)' title='[^']*'>([^<]*)</span>", row)


def test_the_strip_colours_each_token_as_the_figure_does():
    drawn = strip_html(report(), position=2)
    kl_max = max(k for n in VARIANTS[1:] for k in KL[n])
    for name in VARIANTS[1:]:
        row = cells(drawn, name)
        assert len(row) == N
        for (style, _), value in zip(row, strip_values(AGREE[name], KL[name], kl_max), strict=True):
            background, ink = cell_colour(value)
            assert style == f"background:{background};color:{ink}"
        for (style, _), agrees in zip(row, AGREE[name], strict=True):  # green where it agrees, red where not
            r, g = int(style[12:14], 16), int(style[14:16], 16)
            assert (g > r) == agrees, (name, style)
    assert f"top-1 50% \u00b7 mean KL {sum(KL['qlora']) / N:.3f}" in drawn  # plain 4-bit's summary: 2 of 4 agree
    assert drawn.count("g-chosen") == len(VARIANTS)  # position 2 outlined in every row, the reference's too
    assert "&lt;c&gt;" in drawn and "<c>" not in drawn and "\u21b5" in drawn  # escaped; a newline made visible
    assert "g-empty" in strip_html({}) and "g-empty" in strip_html(report(agreement={}))


def test_continuations_stream_side_by_side_and_wait_their_turn():
    partial = report(continuations={"full": report()["continuations"]["full"]})
    live = {"int8": {"kind": "token", "variant": "int8", "step": 2, "total": N, "text": "half <way>"}}
    drawn = continuations_html(partial, live)
    assert drawn.index("data-variant='full'") < drawn.index("data-variant='int8'") < drawn.index("data-variant='qlora'")
    int8 = drawn.split("data-variant='int8'", 1)[1].split("data-variant='qlora'", 1)[0]
    assert "token 2 of 4" in int8 and "half &lt;way&gt;" in int8 and "g-cursor" in int8
    qlora = drawn.split("data-variant='qlora'", 1)[1].split("data-variant='quailora'", 1)[0]
    assert "waiting" in qlora and "g-cursor" not in qlora
    assert "border-top-color:#d62728" in drawn and "&lt;b&gt;the" in drawn  # coloured as everywhere; prompt escaped
    assert "8.0 tokens/s" in drawn.split("data-variant='full'", 1)[1]
    assert "Press <b>Generate</b>" in continuations_html(None)
    batched = report(continuations={"qlora": {"text": "x", "token_ids": [1] * N, "tokens_per_s": 4.0,
                                              "batch_rows": 3}})
    assert "4.0 tokens/s each, 3 decoded together" in continuations_html(batched)
    shared = report(continuations={"int8": {"text": "x", "token_ids": [1] * N, "tokens_per_s": 4.0,
                                            "batch_rows": 1, "beside": ["qlora", "quailora"]}})
    assert "4.0 tokens/s, CPU shared with QLoRA &amp; 1 more" in continuations_html(shared)
    assert summary_table(shared).iloc[1]["tokens/s"] == "4.0 (CPU shared)"


def test_tables_and_the_top10_view_follow_the_report():
    table = summary_table(report())
    assert list(table.iloc[:, 0]) == ["full precision", "8-bit (LLM.int8)", "QLoRA", "QuAILoRA"]
    quailora = table.iloc[3]
    assert quailora["top-1 agreement"] == "75.0%" and quailora["right where plain 4-bit is wrong"] == "25.0%"
    assert quailora["wrong where plain 4-bit is right"] == "12.5%"
    assert table.iloc[2]["right where plain 4-bit is wrong"] == ""  # plain 4-bit is not compared with itself
    top10, strip = position_view(report(), 99)  # clamped to the last position
    assert [len(t.x) for t in top10.data] == [10, 10, 10] and "(4)" in top10.layout.title.text
    assert strip.count("g-chosen") == len(VARIANTS)
    drawn = generate_drawn(report(), position=0)
    assert drawn["positions"] == N and drawn["position"] == 1
    assert "Tick **what survives deployment**" in deploy_markdown(report()) and deploy_table(report()).empty
    ppl = {"full": 10.0, "plain_4bit": 14.0, "adapter_4bit": 12.0, "merged": 13.5, "merged_requantized": 13.9}
    deploy = {"perplexity": ppl, "kept": {"adapter_4bit": 1.0, "merged": 0.25, "merged_requantized": 0.05},
              "labels": {"adapter_4bit": "(a) as trained", "merged": "(b) merged", "merged_requantized": "(c) again"},
              "reading": "Of the adapter's gain, (b) keeps 25%.", "order": ["adapter_4bit", "merged",
                                                                           "merged_requantized"]}
    rows = deploy_table(report(deploy=deploy))
    assert list(rows.iloc[:, 0]) == ["full precision", "plain 4-bit, no correction", "(a) as trained", "(b) merged",
                                     "(c) again"]
    assert list(rows.iloc[:, 2]) == ["\u2013", "\u2013", "100.0%", "25.0%", "5.0%"]
    reading = deploy_markdown(report(deploy=deploy))
    assert "(b) keeps 25%" in reading and "Why (c) loses the correction:** quantizing the merged weights" in reading
    assert reading.count("\n") == 2  # the reading, then the one-line reason


def test_the_form_refuses_bad_input_in_one_line(tmp_path):
    form = {"gen_prompt_from": "text", "gen_prompt": "  ", "gen_new_tokens": 32}
    for values, words in ((form, "the prompt is empty"), ({**form, "gen_prompt": "hi", "gen_new_tokens": 0},
                                                          "new tokens must be at least 1"),
                          ({"gen_new_tokens": "many"}, "must be a number"), ({"gen_documents": -1}, "documents"),
                          ({"gen_sample": True, "gen_temperature": 0}, "temperature"), ({"rank": 4}, "unknown")):
        with pytest.raises(UserError, match=words) as caught:
            make_generate_config(values, str(tmp_path))
        assert "\n" not in str(caught.value)
    held_out = make_generate_config({"gen_prompt_from": "held_out", "gen_prompt": "ignored"}, str(tmp_path))
    assert held_out.prompt is None and held_out.new_tokens == 32 and held_out.from_run == str(tmp_path)
    own = make_generate_config({"gen_prompt_from": "text", "gen_prompt": " the cat ", "gen_sample": True,
                                "gen_seed": 3}, str(tmp_path))
    assert own.prompt == "the cat" and own.sample and own.seed == 3


def test_what_a_generate_run_starts_from(tmp_path):
    with pytest.raises(UserError, match="no finished init or fine-tuning run in this session yet"):
        source_folder(LATEST, "me", None, tmp_path)
    assert source_folder("", "me", "/runs/init-1", tmp_path) == "/runs/init-1"
    with pytest.raises(UserError, match="keeps no adapter weights"):
        source_folder("shipped:init", "me", None, tmp_path)
    for name in ("../etc", "nope", "/abs/path"):
        with pytest.raises(UserError, match="no run folder named"):
            source_folder(name, "me", None, tmp_path)
    (tmp_path / "init-a").mkdir()
    (tmp_path / "init-a" / "report.json").write_text('{"kind": "init", "status": "finished"}')
    (tmp_path / "bits-a").mkdir()
    (tmp_path / "bits-a" / "report.json").write_text('{"kind": "bits", "status": "finished"}')
    assert [v for _, v in source_choices("me", tmp_path)] == [LATEST, "init-a"]  # no across-bits run
    assert source_folder("init-a", "me", None, tmp_path) == str(tmp_path / "init-a")


def test_progress_counts_tokens_and_measured_variants():
    from types import SimpleNamespace

    events = [{"kind": "token", "variant": "full", "step": s, "total": 4, "text": ""} for s in range(1, 5)]
    events += [{"kind": "metric", "name": "full", "group": "agreement", "value": 1.0},
               {"kind": "token", "variant": "int8", "step": 2, "total": 4, "text": ""}]
    job = Job(id="g", kind="generate", owner="me", config=SimpleNamespace(deploy=False), status=RUNNING,
              events=events, report=None)
    idx, frac, line = generate_progress(job)
    assert idx == 2 and "token 2 of 4" in line  # the 8-bit chip; full precision measured, 8-bit half way
    assert frac == pytest.approx(0.05 + 0.95 * 1.5 / 2)


def test_progress_names_both_lanes_while_they_stream():
    """On a CPU the 4-bit rows stream beside full precision: the line names both, the earlier chip is lit."""
    from types import SimpleNamespace

    events = [{"kind": "token", "variant": "full", "step": 1, "total": 4, "text": ""}]
    events += [{"kind": "token", "variant": v, "step": 1, "total": 4, "text": ""} for v in ("qlora", "svd")]
    events += [{"kind": "token", "variant": "full", "step": 3, "total": 4, "text": ""}]
    job = Job(id="g", kind="generate", owner="me", config=SimpleNamespace(deploy=False), status=RUNNING,
              events=events, report=None)
    idx, frac, line = generate_progress(job)
    assert idx == 1
    assert line == "full: token 3 of 4 · plain & corrected 4-bit: token 1 of 4"
    assert frac == pytest.approx(0.05 + 0.95 * (3 / 4 + 1 / 4 + 1 / 4) / 3)


def test_a_new_token_redraws_the_cards_only_and_a_measured_variant_the_rest(tmp_path):
    """While a run streams, each poll with a new token rebuilds the continuations and hands back the strip, tables
    and figures already drawn (plotly builds each in tens of ms); a measured variant, or a rewrite of the run's
    report.json, draws them afresh from what the run has written."""
    import os
    from types import SimpleNamespace

    from quailora_app.app.generation import generate_outputs
    from quailora_app.runs import RunFolder

    folder = RunFolder.create("generate", tmp_path / "gen")
    partial = report(agreement={}, documents={}, continuations={})
    folder.write_report(partial)
    events = [{"kind": "token", "variant": "full", "step": 1, "total": N, "text": " a"}]
    job = Job(id="g-redraw", kind="generate", owner="me", config=SimpleNamespace(deploy=False), status=RUNNING,
              events=events, report=None, run_dir=str(folder.path))
    first = generate_outputs(job)
    events.append({"kind": "token", "variant": "full", "step": 2, "total": N, "text": " a b"})
    second = generate_outputs(job)
    assert "token 1 of" in first["continuations"] and "token 2 of" in second["continuations"]
    assert all(second[k] is first[k] for k in ("strip", "versus", "top10", "deploy_plot"))  # not drawn again
    assert "QuAILoRA" not in second["summary"].to_string()  # nothing measured yet
    folder.write_report(report())  # the run measured its variants and rewrote report.json ...
    stamp = os.stat(folder.path / "report.json").st_mtime_ns
    os.utime(folder.path / "report.json", ns=(stamp, stamp + 1_000_000))  # (a later write, on any clock)
    events.append({"kind": "metric", "name": "quailora", "group": "agreement", "value": 0.75})  # ... and said so
    third = generate_outputs(job)
    assert third["versus"] is not first["versus"] and third["summary"].iloc[3]["top-1 agreement"] == "75.0%"


# ------------------------------------------------------------------------------------------------ the shipped run
@pytest.mark.skipif(not (EXAMPLE_DIR / "generate" / "report.json").is_file(),
                    reason="no shipped generate run: python -m bench.make_example --only generate")
def test_the_shipped_generate_run_draws_with_its_label():
    shipped = example_generate()
    assert shipped is not None and shipped["label"].startswith("**Shipped example run")
    report_ = shipped["report"]
    for name in report_["variants"]:
        assert f"data-variant='{name}'" in shipped["continuations"]
    assert shipped["strip"].count("class='g-row") == len(report_["variants"])
    assert shipped["positions"] == report_["new_tokens"] and len(shipped["summary"]) == len(report_["variants"])
    assert "g-cursor" not in shipped["continuations"]
    assert not (EXAMPLE_DIR / "generate" / "deploy").exists()  # no model weights in assets
    size = sum(f.stat().st_size for f in (EXAMPLE_DIR / "generate").rglob("*") if f.is_file())
    assert size < 150_000, size


# ------------------------------------------------------------------------------------------------ handlers, tiny model
@pytest.fixture()
def studio(tiny_init_run, monkeypatch):
    pytest.importorskip("gradio")
    from quailora_app.app.handlers import Studio
    from quailora_app.app.jobs import JobManager

    monkeypatch.setenv("QUAILORA_RUNS", str(tiny_init_run.parent))
    return Studio(JobManager(gpu=False), (1, 2))


FORM = {"gen_from": "init-tiny", "gen_prompt_from": "held_out", "gen_prompt": "", "gen_new_tokens": 6,
        "gen_sample": False, "gen_temperature": 1.0, "gen_seed": 0, "gen_documents": 2, "gen_deploy": False}


def refused(studio, **over) -> str:
    import gradio as gr

    with pytest.raises(gr.Error) as caught:
        studio.start_generate({"owner": "me"}, "", "", None, **{**FORM, **over})
    message = str(caught.value.message)
    assert "\n" not in message and "Traceback" not in message
    return message


@pytest.mark.usefixtures("one_thread")
def test_bad_input_through_the_handlers_gets_one_line(studio, tiny_init_run, tmp_path):
    assert "the prompt is empty" in refused(studio, gen_prompt_from="text", gen_prompt=" ")
    assert "new tokens must be at least 1" in refused(studio, gen_new_tokens=0)
    bare = tiny_init_run.parent / "init-bare"
    shutil.rmtree(bare, ignore_errors=True)
    shutil.copytree(tiny_init_run, bare, ignore=shutil.ignore_patterns("adapters"))
    assert "has no adapters to compare" in refused(studio, gen_from="init-bare")
    assert "keeps no adapter weights" in refused(studio, gen_from="shipped:init")
    assert "no finished init or fine-tuning run" in refused(studio, gen_from=LATEST)
    # a prompt beyond the model's context: the job fails in one line (the tokenizer knows, the form does not)
    session, job_id, _ = studio.start_generate({"owner": "me"}, "", "", None,
                                               **{**FORM, "gen_prompt_from": "text",
                                                  "gen_prompt": "the quick brown fox " * 200})
    studio.manager.wait(job_id, 300)
    status = studio.generate_status(session, job_id)[1]
    assert "failed" in status and "beyond the context of model" in status and "\n" not in status


@pytest.mark.usefixtures("one_thread")
def test_generate_from_an_init_run_through_the_handlers(studio, tiny_init_run):
    import gradio as gr

    sources = [v for _, v in studio.generate_sources({"owner": "me"})["choices"]]
    assert sources[0] == LATEST and "init-tiny" in sources
    session, job_id, line = studio.start_generate({"owner": "me"}, "", "", None, **FORM)
    assert "Generation" in line
    job = studio.manager.wait(job_id, 300)
    assert job.status == "finished", job.message
    progress, status, continuations, strip, summary, versus, position, top10, table, reading, deploy_plot = \
        studio.generate_status(session, job_id)
    assert "done in" in progress and "Generation: finished" in status
    names = ["full", "int8", "qlora", "quailora", "closed_form"]
    assert all(f"data-variant='{n}'" in continuations for n in names) and "waiting" not in continuations
    assert strip.count("class='g-row") == len(names) and len(summary) == len(names)
    assert position["maximum"] == 6 and position["value"] == 1 and [len(t.x) for t in top10.data] == [10, 10, 10]
    assert len(versus.data) == 2 and table.empty and "Tick" in reading
    top5, strip5 = studio.generate_position(session, job_id, 5)
    assert "(5)" in top5.layout.title.text and strip5.count("g-chosen") == len(names)
    with pytest.raises(gr.Error, match="no merged model to download"):
        studio.download_merged(session, job_id)
    other = studio.generate_status({"owner": "someone else"}, job_id)
    assert "a session sees only its own jobs" in other[1] and "data-variant" not in other[2]
    assert studio.attach_generate(session) == job_id


@pytest.mark.usefixtures("one_thread")
def test_latest_run_and_the_merged_model_download(studio, tiny_init_run, monkeypatch):
    """'latest' finds the session's finished init job; with deployment ticked the zip holds the merged model (it
    loads with plain transformers) beside the adapter folder."""
    from transformers import AutoModelForCausalLM

    from quailora_app.app.jobs import JobManager
    from quailora_app.events import RunFinished
    from quailora_app.flows.generate import run_generate
    from quailora_app.runs import RunFolder

    finished = RunFolder(tiny_init_run).read_report()
    manager = JobManager({"init": lambda cfg, stop, run_dir: iter([RunFinished(str(tiny_init_run), finished)]),
                          "generate": run_generate}, gpu=False)
    studio.manager = manager
    init = manager.submit("init", None, "me")
    manager.wait(init.id, 30)
    session, job_id, _ = studio.start_generate({"owner": "me"}, init.id, "", None,
                                               **{**FORM, "gen_from": LATEST, "gen_documents": 0,
                                                  "gen_new_tokens": 3, "gen_deploy": True})
    job = manager.wait(job_id, 600)
    assert job.status == "finished", job.message
    assert job.config.from_run == str(tiny_init_run)
    outputs = studio.generate_status(session, job_id)
    assert len(outputs[8]) == 8 and "Why (c) loses the correction" in outputs[9]  # full, plain, (a)-(f)
    path = studio.download_merged(session, job_id)
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        z.extractall(path + ".d")
    merged = [n for n in names if n.endswith("-merged/model.safetensors")]
    assert merged and any(n.endswith("-adapter/adapter_config.json") for n in names)
    model = AutoModelForCausalLM.from_pretrained(f"{path}.d/{merged[0].rsplit('/', 1)[0]}")
    assert sum(p.numel() for p in model.parameters()) > 0


def test_the_poller_sends_each_new_token_and_redraws_the_rest_per_variant(tmp_path):
    """A running generate job: a new token redraws only the continuations; a measured variant redraws the rest."""
    from types import SimpleNamespace

    pytest.importorskip("gradio")
    from quailora_app.app.handlers import Studio, count_generate
    from quailora_app.runs import RunFolder

    RunFolder(tmp_path).write_report(report(status="running", continuations={}, agreement={}, top10={}))
    token = {"kind": "token", "variant": "full", "step": 1, "total": N, "text": " a"}
    job = Job(id="g1", kind="generate", owner="me", config=SimpleNamespace(deploy=False), status=RUNNING,
              started=0.0, events=[token], run_dir=str(tmp_path))

    class Manager:
        def owned(self, job_id, owner):
            return job if job_id == job.id and owner == job.owner else None

        def queue_length(self):
            return 1, 0

    studio = Studio(Manager(), (1, 2))
    poll = studio.poller(count_generate, studio.draw_generate, 9)
    me = {"owner": "me"}
    first = poll(me, "g1", {}, "")
    assert len(first) == 12 and "token 1 of 4" in first[2] and "g-empty" in first[3]

    def skipped(value) -> bool:
        return isinstance(value, dict) and value.get("__type__") == "update" and len(value) == 1

    job.events.append({**token, "step": 2, "text": " a b"})
    job.version += 1
    second = poll(me, "g1", first[-1], "")
    assert "token 2 of 4" in second[2] and " a b" in second[2] and all(skipped(v) for v in second[3:11])
    RunFolder(tmp_path).write_report(report(status="running"))  # full precision and the rest measured
    job.events.append({"kind": "metric", "name": "full", "group": "agreement", "value": 1.0})
    job.version += 1
    third = poll(me, "g1", second[-1], "")
    assert not skipped(third[3]) and "data-variant='qlora'" in third[3] and len(third[4]) == len(VARIANTS)
    assert all(skipped(v) for v in poll(me, "g1", third[-1], "")[2:11])  # nothing new: nothing redrawn
