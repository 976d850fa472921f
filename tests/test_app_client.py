"""The app driven headless through gradio_client, against a real server on localhost: the init flow on a
tiny model returns figures and a report; an across-bits run on it returns its frontier, reading and table, and its
bit widths join the across-models scatter; a fine-tuning run streams updates and stops on request, and only for the
session that started it."""
from __future__ import annotations

import json
import time
import zipfile

import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from helpers import form_settings, launched_app, plot_of, wait_for  # noqa: E402

from quailora_app import doc_tables  # noqa: E402
from quailora_app.app.across_bits import example_bits  # noqa: E402
from quailora_app.app.endpoints import documented, signatures  # noqa: E402
from quailora_app.app.handlers import HARM_GAIN_SCALES  # noqa: E402
from quailora_app.plots.frontier import bits_harm_gain_points  # noqa: E402
from quailora_app.plots.teaching import paper_scatter  # noqa: E402

#: the trace of the bit widths in the across-models scatter (plots/teaching.harm_gain_figure)
BITS_TRACE = "bit widths"


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    # the tiny model and text live in pytest's temp folders: allow the app to read typed paths there
    with launched_app(tmp_path_factory.mktemp("runs"), allowed=tmp_path_factory.getbasetemp()) as url:
        yield url


def setup_args(model_dir, short_docs_file, **over):
    """The Setup settings with the text uploaded, at rank 8 / alpha 16."""
    return form_settings(model_dir, upload=handle_file(str(short_docs_file)), rank=8, alpha=16, **over)


def test_endpoints_have_explicit_names(app_url):
    client = Client(app_url, verbose=False)
    names = set(client.view_api(print_info=False, return_format="dict")["named_endpoints"])
    assert {"/attach", "/dataset_columns", "/describe_dataset", "/model_note", "/start_init", "/init_status",
            "/stop_init", "/start_train", "/train_status", "/stop_train", "/download_run", "/view_layers",
            "/start_views", "/views_status", "/stop_views", "/how_it_works", "/harm_gain", "/list_runs",
            "/reopen_run", "/start_bits", "/bits_status", "/stop_bits"} <= names
    assert not client.view_api(print_info=False, return_format="dict")["unnamed_endpoints"]


def test_the_documented_api_is_the_served_one(app_url):
    """docs/api.md lists the endpoints a gradio_client sees, with their parameter names and number of returns,
    and its list is what `python -m quailora_app.doc_tables` writes from them."""
    served = Client(app_url, verbose=False).view_api(print_info=False, return_format="dict")
    text = doc_tables.API_FILE.read_text()
    assert documented(text) == signatures(served), "run: python -m quailora_app.doc_tables"
    assert doc_tables.stale((doc_tables.API_FILE,), doc_tables.api_section(served)) == [], \
        "run: python -m quailora_app.doc_tables"


def test_the_page_s_timer_poll_answers_a_plain_post_as_the_page_and_the_bench_send_it(app_url):
    """The page's timer polls are out of the API docs but callable ("undocumented"): bench.press_generate polls
    Generate exactly as the page does. Another session's job gets the refusal line and no figures."""
    import httpx

    client = Client(app_url, verbose=False)
    assert "/poll_generate" not in client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    session, *_ = client.predict({}, api_name="/attach")
    def poll() -> list:
        answer = httpx.post(f"{app_url.rstrip('/')}/gradio_api/run/poll_generate", timeout=60,
                            json={"data": [session, "job-of-someone-else", {}], "session_hash": client.session_hash})
        answer.raise_for_status()
        return answer.json()["data"]

    first, again = poll(), poll()
    assert len(first) == len(again) == 12
    assert "a session sees only its own jobs" in first[1], first[1]
    # what was sent is remembered under the session hash (the page's gr.State): nothing new, nothing sent
    assert again[1] == {"__type__": "update"} and all(isinstance(v, dict) for v in again[:-1])


def test_the_documented_list_is_parsed_back():
    """The check above reads what `api_markdown` writes: one endpoint more or less, another parameter or another
    number of returns shows."""
    info = {"named_endpoints": {"/stop_init": {"parameters": [{"parameter_name": "session"},
                                                              {"parameter_name": "job_id"}],
                                               "returns": [{}]}}}
    assert documented("- `/stop_init(session, job_id) -> (status)`: stops.\n") == signatures(info)
    assert documented("- `/stop_init(session) -> (status)`: x\n") != signatures(info)
    assert documented("- `/stop_init(session, job_id) -> (status, more)`: x\n") != signatures(info)
    assert documented("") != signatures(info)


def test_init_at_hqq_3_bits_names_its_base(app_url, tiny_model_dir, short_docs_file):
    """The Setup's quantizer by name: an init on an HQQ 3-bit base runs, its report holds that base, and its
    figures and numbers say "HQQ 3-bit" where a bitsandbytes run says "4-bit"."""
    client = Client(app_url, verbose=False)
    session, *_ = client.predict({}, api_name="/attach")
    session, job_id, _ = client.predict(session, **setup_args(tiny_model_dir, short_docs_file, quantizer="hqq", bits=3,
                                                              block_size=32),
                                        methods=["qlora", "svd"], baselines=False, als_rounds=2, damping=0.01,
                                        api_name="/start_init")
    out = wait_for(client, session, "/init_status", job_id, lambda o: "finished" in o[1] or "failed" in o[1])
    progress, status, layers, heatmap, ppl, numbers, report, note, accuracy = out
    assert "finished" in status, status
    quant = report["settings"]["quant"]
    assert (quant["quantizer"], quant["bits"], quant["block_size"]) == ("hqq", 3, 32)
    assert "HQQ 3-bit + SVD of the error (uncalibrated)" in {t["name"] for t in plot_of(layers)["data"]}
    names = {t["name"] for t in plot_of(ppl)["data"]}
    assert names == {"HQQ 3-bit + QLoRA init (no correction)", "HQQ 3-bit + SVD of the error (uncalibrated)"}
    assert [row[0] for row in numbers["data"]] == sorted(names, key=lambda n: "SVD" in n)
    summary = client.predict(session, "init", job_id, "", api_name="/download_run")[1]
    assert "HQQ 3-bit, no correction" in summary and "4-bit" not in summary.replace("HQQ 3-bit", "")


def test_dataset_columns_from_an_uploaded_csv(app_url, tmp_path):
    path = tmp_path / "t.csv"
    path.write_text("id,label,review\n1,pos,a fine film with a long road home\n2,neg,the dog was lazy\n")
    client = Client(app_url, verbose=False)
    column, info = client.predict(handle_file(str(path)), api_name="/dataset_columns")
    assert column["value"] == "review" and ["label", "label"] in column["choices"] and "CSV" in info


def test_init_flow_returns_figures_and_report(app_url, tiny_model_dir, short_docs_file):
    client = Client(app_url, verbose=False)
    session, init_id, _, _ = client.predict({}, api_name="/attach")
    assert session["owner"] and init_id == ""
    with pytest.raises(Exception, match="eval-tokens"):
        client.predict(session, **setup_args(tiny_model_dir, short_docs_file, eval_tokens=16), methods=["svd"],
                       baselines=False, als_rounds=2, damping=0.01, api_name="/start_init")
    session, job_id, status = client.predict(session, **setup_args(tiny_model_dir, short_docs_file),
                                             methods=["qlora", "svd", "quailora"], baselines=True, als_rounds=3,
                                             damping=0.01, api_name="/start_init")
    assert job_id and ("queued" in status or "running" in status)
    out = wait_for(client, session, "/init_status", job_id, lambda o: "finished" in o[1] or "failed" in o[1])
    progress, status, layers, heatmap, ppl, numbers, report, note, accuracy = out
    assert "finished" in status, status
    assert "100%" in progress
    layer_fig = plot_of(layers)
    assert "QLoRA" in layer_fig["layout"]["title"]["text"] and len(layer_fig["data"]) > 4
    assert plot_of(heatmap)["data"][0]["type"] == "heatmap"
    bars = {t["x"][0]: t["y"][0] for t in plot_of(ppl)["data"]}
    assert {"full precision", "8-bit", "QLoRA", "SVD", "QuAILoRA"} <= set(bars)
    assert set(report["perplexity"]) >= {"full", "int8", "qlora", "svd", "quailora"}
    assert report["perplexity"]["quailora"] == pytest.approx(bars["QuAILoRA"])
    assert len(report["layers"]) == 2 * 7  # tiny Llama: 2 blocks x 7 linear layers
    assert numbers["headers"][0] == "variant" and len(numbers["data"]) == 5
    # the page re-attaches to the session's latest job
    assert client.predict(session, api_name="/attach")[1] == job_id
    zip_path, summary = client.predict(session, "init", job_id, "", api_name="/download_run")
    names = zipfile.ZipFile(zip_path).namelist()
    assert any(n.endswith("report.json") for n in names) and any("adapters/quailora" in n for n in names)
    assert "QuAILoRA" in summary


def test_teaching_views_job_returns_seven_figures(app_url, tiny_model_dir, short_docs_file):
    client = Client(app_url, verbose=False)
    layer = client.predict(str(tiny_model_dir), api_name="/view_layers")
    names = [c[1] for c in layer["choices"]]
    assert layer["value"] == "" and "model.layers.1.mlp.down_proj" in names and len(names) == 1 + 2 * 7
    session, init_id, *_ = client.predict({}, api_name="/attach")
    setup = setup_args(tiny_model_dir, short_docs_file)
    args = {k: setup[k] for k in ("model", "dataset", "upload", "text_column", "quant", "double_quant", "block_size",
                                  "eval_tokens", "seed")}
    session, job_id, status = client.predict(session, init_id, **args, als_rounds=3, damping=0.01,
                                             layer="model.layers.0.self_attn.q_proj", views_rank=4,
                                             views_calib_samples=4, views_seq_len=32, api_name="/start_views")
    assert job_id and ("queued" in status or "running" in status)
    out = wait_for(client, session, "/views_status", job_id, lambda o: "finished" in o[1] or "failed" in o[1],
                   timeout=180)
    progress, status, *plots, table, picked = out
    assert "finished" in status and "100%" in progress, status
    assert len(plots) == 7
    for value in plots:
        fig = plot_of(value)
        assert fig["data"] and any(len(t.get("x") or t.get("y") or []) for t in fig["data"]), fig["layout"].get("title")
    assert "q_proj" in json.dumps(plot_of(plots[0])["layout"])
    assert table["headers"][0] == "format" and len(table["data"]) >= 3
    assert picked["value"] == "model.layers.0.self_attn.q_proj"
    how = client.predict(8, api_name="/how_it_works")
    assert "$$" in how and "rank-8" in how


def test_across_models_scatter_draws_the_shipped_points(app_url):
    """The "Across models" tab: one marker per shipped point (assets/paper_scatter.json), on either scale, and the
    shipped across-bits run's bit widths as a labelled trace of their own (log axes: their harms span decades)."""
    client = Client(app_url, verbose=False)
    points = paper_scatter()["points"]
    shipped = example_bits()
    bits = bits_harm_gain_points(shipped["report"]) if shipped else []
    for scale, xkey in zip(HARM_GAIN_SCALES, ("harm", "log_harm"), strict=True):
        fig = plot_of(client.predict(scale, api_name="/harm_gain"))
        runs = [t for t in fig["data"] if "markers" in (t.get("mode") or "") and BITS_TRACE not in t["name"]]
        assert sorted(x for t in runs for x in t["x"]) == pytest.approx(sorted(p[xkey] for p in points))
        assert ("ln(" in json.dumps(fig["layout"]["xaxis"]["title"])) == (xkey == "log_harm") or bits
        widths = [t for t in fig["data"] if BITS_TRACE in (t.get("name") or "")]
        if bits:
            assert len(widths) == 1 and widths[0]["x"] == pytest.approx([b[xkey] for b in bits])
            assert widths[0]["text"] == [b["text"] for b in bits] and fig["layout"]["xaxis"]["type"] == "log"
        else:
            assert not widths


def test_across_bits_job_returns_its_frontier(app_url, tiny_model_dir, short_docs_file):
    """/start_bits on the tiny model (HQQ 3 and 4-bit, the closed form): /bits_status gives the frontier (a line
    per correction, points at each base), the one-line reading and the table; the bit widths of the finished run
    then replace the shipped ones in the across-models scatter, for its session only."""
    client = Client(app_url, verbose=False)
    session, *_ = client.predict({}, api_name="/attach")
    other, *_ = client.predict({}, api_name="/attach")
    setup = setup_args(tiny_model_dir, short_docs_file)
    args = {k: setup[k] for k in ("model", "dataset", "upload", "text_column", "rank", "alpha", "rslora", "targets",
                                  "seed")}
    with pytest.raises(Exception, match="at least one base"):
        client.predict(session, **args, bits_bases=[], bits_methods=["closed_form"], bits_group_size=64,
                       bits_calib_samples=4, bits_seq_len=32, bits_eval_tokens=128, api_name="/start_bits")
    session, job_id, status = client.predict(session, **args, bits_bases=["hqq3", "hqq4"],
                                             bits_methods=["closed_form"], bits_group_size=64, bits_calib_samples=4,
                                             bits_seq_len=32, bits_eval_tokens=128, api_name="/start_bits")
    assert job_id and ("queued" in status or "running" in status) and "Across bits" in status
    out = wait_for(client, session, "/bits_status", job_id, lambda o: "finished" in o[1] or "failed" in o[1],
                   timeout=180)
    progress, status, frontier, reading, table = out
    assert "finished" in status and "100%" in progress, status
    fig = plot_of(frontier)
    lines = {t["name"]: t for t in fig["data"] if t.get("x") and t["x"][0] is not None}
    assert set(lines) == {"no correction", "+ closed form (rank-r correction)"}
    assert all(len(t["x"]) == 2 for t in lines.values())  # 3 and 4 bits
    assert fig["layout"]["yaxis"]["type"] == "log" and "HQQ at 3, 4 bits" in fig["layout"]["title"]["text"]
    assert reading.startswith("**Reading:** At 3 bits plus a rank-8 closed form correction")
    assert table["headers"][:4] == ["base", "correction", "bits / weight", "perplexity"]
    assert len(table["data"]) == 2 * 2 + 1 and table["data"][-1][0] == "full precision"
    assert "another session" in client.predict(other, job_id, api_name="/stop_bits")
    refused = client.predict(other, job_id, api_name="/bits_status")
    assert "only its own jobs" in refused[1] and not plot_of(refused[2])["data"]
    scatter = plot_of(client.predict(HARM_GAIN_SCALES[0], session, job_id, api_name="/harm_gain"))
    widths = [t for t in scatter["data"] if BITS_TRACE in (t.get("name") or "")]
    assert len(widths) == 1 and widths[0]["text"] == ["HQQ 3-bit", "HQQ 4-bit"]
    theirs = plot_of(client.predict(HARM_GAIN_SCALES[0], other, job_id, api_name="/harm_gain"))
    assert [t.get("text") for t in theirs["data"] if BITS_TRACE in (t.get("name") or "")] != [widths[0]["text"]]


def test_finetune_streams_and_stops_only_for_its_owner(app_url, tiny_model_dir, short_docs_file):
    client = Client(app_url, verbose=False)
    alice, *_ = client.predict({}, api_name="/attach")
    bob, *_ = client.predict({}, api_name="/attach")
    alice, job_id, _ = client.predict(alice, **setup_args(tiny_model_dir, short_docs_file), als_rounds=2, damping=0.01,
                                      arms=["qlora4", "quailora4"], steps=400, learning_rate=1e-3, batch_size=2,
                                      grad_accum=1, eval_every=2, warmup_ratio=0.0, api_name="/start_train")
    seen = set()
    deadline = time.time() + 240
    while len(seen) < 3 and time.time() < deadline:
        progress, status, curves, table, accuracy = client.predict(alice, job_id, api_name="/train_status")
        assert "failed" not in status, status
        points = sum(len(t["x"]) for t in plot_of(curves)["data"] if t.get("mode") == "lines+markers")
        if points:
            seen.add(points)
        time.sleep(0.3)
    assert len(seen) >= 3, f"the curves did not grow: {seen}"
    assert "another session" in client.predict(bob, job_id, api_name="/stop_train")
    assert "running" in client.predict(alice, job_id, api_name="/train_status")[1]
    assert client.predict(alice, job_id, api_name="/stop_train").startswith("stopping")
    out = wait_for(client, alice, "/train_status", job_id, lambda o: "running" not in o[1], timeout=120)
    assert "stopped" in out[1], out[1]
    rows = {r[0]: r for r in out[3]["data"]}
    assert set(rows) == {"4-bit QLoRA", "4-bit QuAILoRA"}
    assert all(int(r[1].split(" / ")[0]) < 400 for r in rows.values())


def test_peek_columns_of_each_upload_format(tmp_path):
    import pandas as pd

    from quailora_app.app.forms import peek_columns

    frame = pd.DataFrame({"n": [1, 2], "title": ["a", "b"], "body": ["a long review text", "another long one"]})
    frame.to_json(tmp_path / "t.jsonl", orient="records", lines=True)
    frame.to_parquet(tmp_path / "t.parquet")
    (tmp_path / "t.txt").write_text("one\n\ntwo")
    assert peek_columns(str(tmp_path / "t.jsonl")) == (["title", "body"], "body")
    assert peek_columns(str(tmp_path / "t.parquet")) == (["title", "body"], "body")
    assert peek_columns(str(tmp_path / "t.txt")) == ([], None)


def test_launch_options_honour_port(monkeypatch):
    from quailora_app.app.ui import launch_options

    monkeypatch.delenv("GRADIO_SERVER_PORT", raising=False)
    monkeypatch.delenv("GRADIO_SERVER_NAME", raising=False)
    monkeypatch.setenv("PORT", "7999")
    opts = launch_options()
    assert opts["server_port"] == 7999 and opts["server_name"] == "0.0.0.0" and opts["css_paths"][0].is_file()
    monkeypatch.setenv("GRADIO_SERVER_PORT", "7000")  # gradio reads its own variables
    assert "server_port" not in launch_options()
    monkeypatch.delenv("PORT")
    assert "server_port" not in launch_options()
