"""Bad input through the web app, UI side: every case is answered with one clear line, either
as the form's error (settings refused before a job starts) or as the job's failed status, never a traceback;
and the app still runs a good job afterwards. One launched app serves every case, in one session."""
from __future__ import annotations

import re

import pytest

gradio_client = pytest.importorskip("gradio_client")
from gradio_client import Client, handle_file  # noqa: E402
from helpers import (  # noqa: E402
    JOB_ENDED,
    bad_file,
    form_settings,
    huge_model,
    launched_app,
    non_causal_model,
    wait_for,
    with_weight,
)


@pytest.fixture(scope="module")
def app(allowed, tmp_path_factory):
    with launched_app(tmp_path_factory.mktemp("runs")) as url:
        client = Client(url, verbose=False)
        session, *_ = client.predict({}, api_name="/attach")
        yield client, session
        client.close()


def settings(model, short_docs_file=None, **over) -> dict:
    """The Setup form for a ~2 s init of the tiny model; `dataset` is typed unless an upload is given."""
    return form_settings(model, **{"dataset": str(short_docs_file) if short_docs_file else "", **over})


def answer(client, session, api: str, args: dict, status_api: str, timeout: float = 90.0) -> str:
    """The one line the user reads: the form's error, or the job's status once it ended."""
    try:
        session, job_id, status = client.predict(session, **args, api_name=api)
    except Exception as exc:  # noqa: BLE001 - gradio_client raises the app's gr.Error as an AppError
        return str(exc)
    if any(word in status for word in JOB_ENDED):
        return status
    return wait_for(client, session, status_api, job_id, lambda out: any(w in out[1] for w in JOB_ENDED), timeout)[1]


INIT_EXTRA = dict(methods=["qlora", "svd"], baselines=False, als_rounds=2, damping=0.01)
TRAIN_EXTRA = dict(als_rounds=2, damping=0.01, arms=["qlora4"], steps=2, learning_rate=2e-4, batch_size=2,
                   grad_accum=1, eval_every=1, warmup_ratio=0.0)

# case -> (init or train, expected text in the message: a regular expression)
CASES = {
    "unknown-model-offline": ("init", "is not a local folder and the Hugging Face hub is not reachable"),
    "not-causal": ("init", "is not a causal language model"),
    "too-large-for-device": ("init", "needs about"),
    "unknown-dataset": ("init", "no-such-org/no-such-dataset"),
    "empty-upload": ("init", "empty"),
    "binary-upload": ("init", "NUL bytes"),
    "not-utf8-upload": ("init", "not UTF-8"),
    "no-text-column": ("init", "has no text column"),
    "few-calibration-tokens": ("init", "of the 5000 calibration sequences asked"),
    # the form's sliders refuse out-of-range numbers themselves (gradio's own one-line message)
    "rank-0": ("init", "rank must be at least 1|less than minimum value 1"),
    "rank-too-large": ("init", "rank 100 is larger than"),
    "alpha-0": ("init", "alpha must be positive|less than minimum value"),
    "steps-0": ("train", "steps must be at least 1|less than minimum value 1"),
    "seq-len-beyond-context": ("init", "beyond the context of model"),
    "nan-weights": ("init", "has NaN values in the weight"),
    # the quantizer: bits it does not offer are refused by the form, a group size that does not divide a layer by
    # the job before any weight is quantized
    "bitsandbytes-3-bits": ("init", "bitsandbytes quantizes to 4 bits, not 3"),
    "hqq-5-bits": ("init", "hqq quantizes to 2, 3, 4 or 8 bits, not 5"),
    "hqq-group-not-dividing": ("init", "HQQ group size 48 does not divide the 64 inputs of layer"),
    "train-hqq-9-bits": ("train", "hqq quantizes to 2, 3, 4 or 8 bits, not 9"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_gets_one_clear_message(case, app, tiny_model_dir, short_docs_file, tmp_path, monkeypatch):
    client, session = app
    kind, expect = CASES[case]
    model, over = tiny_model_dir, {}
    if case == "unknown-model-offline":
        model = "no-such-org/no-such-model"
    elif case == "not-causal":
        model = non_causal_model(tmp_path / "bert")
    elif case == "too-large-for-device":
        model = huge_model(tmp_path / "huge")
        monkeypatch.setenv("QUAILORA_MEMORY_LIMIT_GIB", "16")
    elif case == "unknown-dataset":
        over["dataset"] = "no-such-org/no-such-dataset"
    elif case.endswith("-upload") or case == "no-text-column":
        over["upload"] = handle_file(str(bad_file(case.removesuffix("-upload"), tmp_path)))
    elif case == "few-calibration-tokens":
        over["calib_samples"] = 5000
    elif case == "rank-0":
        over["rank"] = 0
    elif case == "rank-too-large":
        over["rank"] = 100
    elif case == "alpha-0":
        over["alpha"] = 0
    elif case == "seq-len-beyond-context":
        over["seq_len"], over["eval_tokens"] = 1024, 1024
    elif case == "nan-weights":
        model = with_weight(tiny_model_dir, tmp_path / "nan", float("nan"))
    elif case == "bitsandbytes-3-bits":
        over["bits"] = 3
    elif case == "hqq-5-bits":
        over["quantizer"], over["bits"] = "hqq", 5
    elif case == "hqq-group-not-dividing":
        over["quantizer"], over["bits"], over["block_size"] = "hqq", 3, 48
    elif case == "train-hqq-9-bits":
        over["quantizer"], over["bits"] = "hqq", 9
    args = settings(model, short_docs_file if "upload" not in over else None, **over)
    if kind == "train":
        args.update(TRAIN_EXTRA, **({"steps": 0} if case == "steps-0" else {}))
        message = answer(client, session, "/start_train", args, "/train_status")
    else:
        args.update(INIT_EXTRA)
        message = answer(client, session, "/start_init", args, "/init_status")
    assert re.search(expect, message), message
    assert "Traceback" not in message and "File \"" not in message
    if "failed" in message:  # a job's status: one line of reason after "failed"
        reason = message.split("failed**:", 1)[1].split(" · run folder")[0]
        assert "\n" not in reason.strip(), reason


def test_the_app_still_works_after_bad_input(app, tiny_model_dir, short_docs_file):
    """Runs after the cases above (same module, same app, same session): a good init finishes."""
    client, session = app
    args = {**settings(tiny_model_dir, short_docs_file), **INIT_EXTRA}
    status = answer(client, session, "/start_init", args, "/init_status")
    assert "finished" in status, status


def test_the_quantizer_choice_offers_its_own_bits():
    """The Setup's quantizer radio sets the bits offered (bitsandbytes 4; HQQ 2, 3, 4, 8), keeps bits the new
    quantizer offers, and leaves NF4/FP4 and double quantization settable only for bitsandbytes."""
    from quailora_app.app.handlers import quantizer_settings

    bits, quant, double = quantizer_settings("hqq", 4)
    assert bits["choices"] == [2, 3, 4, 8] and bits["value"] == 4
    assert quant["interactive"] is False and double["interactive"] is False
    assert quantizer_settings("hqq", 2)[0]["value"] == 2
    bits, quant, double = quantizer_settings("bitsandbytes", 3)
    assert bits["choices"] == [4] and bits["value"] == 4 and quant["interactive"] and double["interactive"]
