"""The page's headless API, described: what each public endpoint returns (by name) and what it does. The endpoint
list of docs/api.md is generated from these and from the page's own API info, the same that gradio_client's
`Client(url).view_api(return_format="dict")` returns (endpoint names, parameter names, number of returns):
`python -m quailora_app.doc_tables`. tests/test_app_client.py checks the list against a running app. No gradio
here.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

#: the status endpoints answer only for the calling session's jobs
_OWN = "only for a job of the calling session (another session's job id gets a refusal line and empty plots)"


@dataclass(frozen=True)
class Endpoint:
    """One public endpoint: its returns by name (in order) and what it does (Markdown, one paragraph)."""

    returns: tuple[str, ...]
    about: str


#: Every public endpoint of the page, in the order docs/api.md lists them.
ENDPOINTS: dict[str, Endpoint] = {
    "/attach": Endpoint(
        ("session", "init_job_id", "train_job_id", "queue_text"),
        '`session` is a dict `{"owner": key}`; an empty dict gets a fresh owner key. Returns the owner\'s latest '
        'init and fine-tuning job ids ("" if none), so a reopened page re-attaches, and the server queue line.'),
    "/dataset_columns": Endpoint(
        ("text_column", "dataset_info"),
        "The text columns of an uploaded .txt/.jsonl/.csv/.parquet file (pass `handle_file(path)`), the guessed "
        "one selected, and a line describing the file."),
    "/describe_dataset": Endpoint(("dataset_info",), "A line saying what a dataset name refers to."),
    "/model_note": Endpoint(("note",), 'The honesty note shown for an embedded model ("" for other models).'),
    "/start_init": Endpoint(
        ("session", "init_job_id", "status"),
        "Queue the quantize & initialize flow. The settings go by name, e.g. `client.predict(session, "
        'model="embedded", rank=8, methods=["qlora", "quailora"], ..., api_name="/start_init")`; the names and '
        "their meaning are the command line's (`init` flags in docs/guide.md). `quantizer` (`bitsandbytes`, the "
        "default and the QLoRA recipe, at `bits` 4 with `quant` nf4 or fp4; or `hqq` at `bits` 2, 3, 4 or 8) and "
        "`block_size` (HQQ's group size) choose the quantized base. `accuracy_tasks` (`labels`, "
        "`continuation`), `label_items` and `continuation_items` add downstream accuracy. Bad settings raise an "
        "error."),
    "/init_status": Endpoint(
        ("progress_html", "status", "layer_plot", "heatmap_plot", "perplexity_plot", "numbers", "report",
         "model_note", "accuracy_plot"),
        f"The init job's state, {_OWN}. The plots are plotly figures, `numbers` a table per variant, `report` the "
        "report.json dict once the run has ended (partial for a stopped run); `accuracy_plot` is shown only when "
        "the run scores downstream accuracy."),
    "/stop_init": Endpoint(
        ("status",), "Ask the init job to stop after its current step; only the session that started it can."),
    "/start_train": Endpoint(
        ("session", "train_job_id", "status"),
        "Queue a fine-tuning run: the Setup settings of `/start_init` and the training settings, by name. With "
        "`start_from_init` (the default) it starts from `init_job_id`'s finished init run, else the session's "
        "latest (its model, text, held-out perplexities and initializations), when the Setup still matches it; "
        "else from the Setup's settings. A toast says which and why."),
    "/train_status": Endpoint(
        ("progress_html", "status", "curves_plot", "throughput", "accuracy_plot"),
        f"The fine-tuning job's state, {_OWN}: the curves, the speed and memory table per arm, and the downstream "
        "accuracy per arm (shown only when the run scores it)."),
    "/stop_train": Endpoint(
        ("status",), "Ask the fine-tuning job to stop after its current step; only the session that started it can."),
    "/download_run": Endpoint(
        ("zip_file", "summary"),
        '`which` = "init" or "train": zips that run folder (report, events, adapters) and returns the results '
        "summary; a run still going gives what it has written so far."),
    "/view_layers": Endpoint(
        ("layer",),
        "The layer picker's choices (every linear layer of the decoder blocks, read from the model's config on the "
        "meta device, no weights) and its default; empty for a model not on disk yet."),
    "/start_views": Endpoint(
        ("session", "views_job_id", "status"),
        'Queue the teaching views of one layer (`layer` "" = the default layer) in the same worker, at the Setup\'s '
        "model, text and 4-bit settings (bitsandbytes only: an HQQ `quantizer` is refused in one line); the latest "
        "finished init run of `init_job_id` feeds the precision trade-off."),
    "/views_status": Endpoint(
        ("progress_html", "status", "weights", "error", "spectrum", "energy", "channels", "rank_sweep", "precision",
         "precision_table", "layer"),
        f"The views job's state, {_OWN}: the seven plotly figures (placeholders until the job finishes), the "
        "precision table and the layer picker."),
    "/stop_views": Endpoint(
        ("status",), "Ask the views job to stop after its current step; only the session that started it can."),
    "/how_it_works": Endpoint(
        ("markdown",), "The method in one page at rank `views_rank` (LaTeX in `$$...$$` and `$...$`)."),
    "/harm_gain": Endpoint(
        ("plot",),
        'The "Across models" scatter of QuAILoRA\'s gain against the harm of 4-bit over the embedded models, texts '
        "and ranks (assets/paper_scatter.json, made by `python -m bench.paper_table`), with the bit widths of an "
        "across-bits run as labelled points of their own (the session's finished `bits_job_id`, else the shipped "
        'example\'s); `scale` is "perplexity points" or "log ratios (texts of different perplexity on one footing)".'),
    "/start_bits": Endpoint(
        ("session", "bits_job_id", "status"),
        "Queue an across-bits run: the Setup's model, text, LoRA shape and seed, and the tab's own settings "
        "(`bits_bases`: hqq2, hqq3, hqq4, hqq8, nf4, int8; `bits_methods`: the corrections, e.g. closed_form; "
        "`bits_group_size`, `bits_calib_samples`, `bits_seq_len`, `bits_eval_tokens`), by name. Each base is "
        "quantized, one calibration corrects them all, and each is measured plain and corrected "
        "(`python -m quailora_app bits`)."),
    "/bits_status": Endpoint(
        ("progress_html", "status", "frontier_plot", "reading", "points_table"),
        f"The across-bits job's state, {_OWN}: the frontier (memory per weight against held-out perplexity; it "
        "grows point by point while the run goes), its one-line reading (Markdown) and its points as a table."),
    "/stop_bits": Endpoint(
        ("status",), "Ask the across-bits job to stop after its current step; only the session that started it can."),
    "/generate_sources": Endpoint(
        ("generate_from",),
        'What a generate run can start from: "latest" (the session\'s latest finished init or fine-tuning run), then '
        "the init and fine-tuning run folders under the runs root this session may reopen (its own and the command "
        "line's), newest first."),
    "/start_generate": Endpoint(
        ("session", "generate_job_id", "status"),
        "Queue a generate run (`python -m quailora_app generate`) from `gen_from` (a value of `/generate_sources`; "
        "`init_job_id` and `train_job_id` name the session's runs for \"latest\"): full precision, 8-bit, plain "
        "4-bit and 4-bit with each adapter of that run continue one prompt (`gen_prompt_from`: \"held_out\", the "
        "start of a held-out document, or \"text\", `gen_prompt`) by `gen_new_tokens` tokens, greedy or "
        "(`gen_sample`) sampled at `gen_temperature` with `gen_seed`; agreement over `gen_documents` held-out "
        "documents; `gen_deploy` also measures what survives deployment. An empty own prompt, zero new tokens or a "
        "run without adapters is refused in one line; a prompt beyond the model's context fails the job in one."),
    "/generate_status": Endpoint(
        ("progress_html", "status", "continuations_html", "strip_html", "summary_table", "versus_plot", "position",
         "top10_plot", "deploy_table", "deploy_reading", "deploy_plot"),
        f"The generate job's state, {_OWN}: the continuations side by side (HTML, streamed token by token), the "
        "agreement strip (HTML: each token of full precision's continuation, per variant, green where its top-1 "
        "agrees and red where not, darker for a larger KL), the per-variant summary (top-1 agreement, mean KL, on "
        "the prompt and over the documents, and the shares against plain 4-bit), the over-documents figure, the "
        "position slider (its maximum: the number of positions), the top-10 next tokens of full precision, plain "
        "4-bit and the best corrected variant at position 1, and the deployment table, reading and figure."),
    "/stop_generate": Endpoint(
        ("status",), "Ask the generate job to stop after its current token; only the session that started it can."),
    "/generate_position": Endpoint(
        ("top10_plot", "strip_html"),
        "The top-10 next tokens of full precision, plain 4-bit and the best corrected variant at `position` "
        "(1-based), and the agreement strip with that column outlined: of the session's generate job `job_id`, "
        "else of the shipped example's generate run."),
    "/download_merged": Endpoint(
        ("zip_file",),
        "A zip of the session's generate run's merged model (the adapter merged into the full-precision weights, "
        "safetensors and config: `AutoModelForCausalLM.from_pretrained`) beside the adapter folder; refused in one "
        "line when the run did not measure deployment."),
    "/list_runs": Endpoint(
        ("run_folder",),
        "The run folders under the runs root (QUAILORA_RUNS) this session may reopen (its own, and the command "
        'line\'s), newest first; then the shipped example run ("shipped:init", "shipped:train", "shipped:bits", '
        '"shipped:generate": assets/example, made by `python -m bench.make_example`, read-only).'),
    "/reopen_run": Endpoint(
        ("summary", "layer_plot", "heatmap_plot", "perplexity_plot", "curves_plot", "table", "report", "zip_file"),
        "Redraw a run folder (`name`, one of `/list_runs`) from its report.json / events.jsonl, also after a "
        "restart of the app, with a zip of it (an across-bits run: its frontier in `perplexity_plot`, its points "
        "in `table`; a generate run: each variant's agreement with full precision in `summary`)."),
}


def signatures(api_info: dict[str, Any]) -> dict[str, tuple[tuple[str, ...], int]]:
    """endpoint -> (parameter names, number of returns) of an API info dict (gradio's, or gradio_client's
    `view_api(return_format="dict")`: {"named_endpoints": {"/name": {"parameters": [...], "returns": [...]}}})."""
    return {name: (tuple(p["parameter_name"] for p in e["parameters"]), len(e["returns"]))
            for name, e in api_info["named_endpoints"].items()}


def api_markdown(api_info: dict[str, Any]) -> str:
    """The endpoint list of docs/api.md: one item per endpoint, `/name(parameters) -> (returns)` and what it does.
    Raises ValueError when the app's endpoints and ENDPOINTS disagree (an endpoint undescribed or gone, or another
    number of returns)."""
    served = signatures(api_info)
    missing, gone = sorted(set(served) - set(ENDPOINTS)), sorted(set(ENDPOINTS) - set(served))
    counts = [n for n in ENDPOINTS if n in served and served[n][1] != len(ENDPOINTS[n].returns)]
    if missing or gone or counts:
        raise ValueError(f"quailora_app/app/endpoints.py is out of step with the page: undescribed {missing}, "
                         f"gone {gone}, another number of returns {counts}")
    return "\n".join(f"- `{name}({', '.join(served[name][0])}) -> ({', '.join(e.returns)})`: {e.about}"
                     for name, e in ENDPOINTS.items())


_ITEM = re.compile(r"^- `(/\w+)\(([^)]*)\) -> \(([^)]*)\)`", re.M)


def documented(markdown: str) -> dict[str, tuple[tuple[str, ...], int]]:
    """endpoint -> (parameter names, number of returns) as a document lists them (the items `api_markdown`
    writes), to compare with `signatures` of a running app."""
    def names(text: str) -> tuple[str, ...]:
        return tuple(n.strip() for n in text.split(",") if n.strip())

    return {m[1]: (names(m[2]), len(names(m[3]))) for m in _ITEM.finditer(markdown)}
