"""Fuzzing the app's form and upload handlers, called directly (no server): whatever a browser or a
gradio_client sends, each either succeeds or raises a UserError whose message is one line; never another
exception. Bounded example counts, no deadline (the machine is shared)."""
from __future__ import annotations

import os
import tempfile
from pathlib import Path

import pytest

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from quailora_app.app import forms  # noqa: E402
from quailora_app.app import uploads as paths  # noqa: E402
from quailora_app.app.reopen import open_run  # noqa: E402
from quailora_app.errors import UserError  # noqa: E402

FUZZ = settings(max_examples=120, deadline=None, suppress_health_check=[HealthCheck.too_slow], derandomize=True)

# anything a JSON client can send for one form field, weighted towards the awkward
ANY = st.one_of(
    st.none(), st.booleans(), st.integers(-(10**12), 10**12), st.integers(-(10**400), 10**400),
    st.floats(allow_nan=True, allow_infinity=True), st.text(max_size=30),
    st.sampled_from(["", " ", "nan", "inf", "-1", "0", "1e999", "3.5", "16", "nf4", "fp4", "all-linear", "\n", "\x00",
                     "../../etc/passwd", "/etc/passwd", "~root/.ssh", "embedded", "embedded:speeches", "a/b:c",
                     "hqq", "bitsandbytes", "2", "3", "8"]),
    st.lists(st.text(max_size=12), max_size=4), st.lists(st.integers(), max_size=3),
    st.dictionaries(st.text(max_size=5), st.integers(), max_size=2),
)

INIT_VALID = dict(model="embedded", dataset="embedded", upload=None, text_column=None, quantizer="bitsandbytes", bits=4,
                  quant="nf4", double_quant=True,
                  block_size=64, rank=16, alpha=16, rslora=False, targets=["q_proj", "v_proj"], calib_samples=16,
                  seq_len=256, eval_tokens=2048, seed=0, methods=["qlora", "svd", "quailora"], baselines=True,
                  als_rounds=20, damping=0.01)
TRAIN_VALID = {**{k: v for k, v in INIT_VALID.items() if k not in ("methods", "baselines")},
               "arms": ["qlora4", "quailora4"], "steps": 20, "learning_rate": 2e-4, "batch_size": 2, "grad_accum": 1,
               "eval_every": 5, "warmup_ratio": 0.03}
VIEWS_VALID = {**{k: INIT_VALID[k] for k in ("model", "dataset", "upload", "text_column", "quantizer", "bits", "quant",
                                             "double_quant", "block_size", "eval_tokens", "seed", "als_rounds",
                                             "damping")},
               "layer": "model.layers.0.self_attn.q_proj", "views_rank": 8, "views_calib_samples": 8,
               "views_seq_len": 128}


def one_line_or_ok(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except UserError as exc:
        message = str(exc)
        assert message and "\n" not in message and len(message) <= 400, repr(message)
        return None


def mutated(valid: dict):
    """The valid settings with one to four fields replaced by anything."""
    return st.lists(st.tuples(st.sampled_from(sorted(valid)), ANY), min_size=1, max_size=4).map(
        lambda changes: {**valid, **{k: v for k, v in changes if k != "upload"}})


def test_valid_settings_pass():
    assert forms.make_init_config(INIT_VALID).lora.rank == 16
    hqq = forms.make_init_config({**INIT_VALID, "quantizer": "hqq", "bits": "3", "block_size": 32}).quant
    assert (hqq.quantizer, hqq.bits, hqq.block_size) == ("hqq", 3, 32)
    assert forms.make_train_config({**TRAIN_VALID, "quantizer": "hqq", "bits": 2}).quant.bits == 2
    assert forms.make_train_config(TRAIN_VALID).steps == 20
    views = forms.make_views_config({**VIEWS_VALID, "layer": " "}, ranks=(1, 2))
    assert views.lora.rank == 8 and views.data.seq_len == 128 and views.layer is None and views.ranks == (1, 2)


@pytest.mark.parametrize("over,words", [
    ({"quantizer": "bitsandbytes", "bits": 3}, "bitsandbytes quantizes to 4 bits, not 3"),
    ({"quantizer": "hqq", "bits": 5}, "hqq quantizes to 2, 3, 4 or 8 bits, not 5"),
    ({"quantizer": "hqq", "bits": 1}, "hqq quantizes to 2, 3, 4 or 8 bits, not 1"),
    ({"quantizer": "hqq", "bits": 3, "block_size": 20}, "HQQ group size must be a positive multiple of 8, not 20"),
    ({"quantizer": "bitsandbytes", "block_size": 48}, "block size must be a power of two from 32 to 4096, not 48"),
    ({"quantizer": "gptq"}, "quantizer must be bitsandbytes or hqq"),
    ({"bits": "three"}, "bits per weight must be a number"),
])
def test_bad_quantizer_settings_get_one_line(over, words):
    """Bits a quantizer does not offer, a block or group size it cannot use: one line naming them."""
    with pytest.raises(UserError) as err:
        forms.make_init_config({**INIT_VALID, **over})
    assert words in str(err.value) and "\n" not in str(err.value)


def test_the_views_refuse_an_hqq_setup_in_one_line():
    with pytest.raises(UserError, match="teaching views look inside bitsandbytes' 4-bit blocks"):
        forms.make_views_config({**VIEWS_VALID, "quantizer": "hqq", "bits": 3}, ranks=(1, 2))


@FUZZ
@given(mutated(INIT_VALID))
def test_make_init_config(fields):
    one_line_or_ok(forms.make_init_config, fields)


@FUZZ
@given(mutated(TRAIN_VALID))
def test_make_train_config(fields):
    one_line_or_ok(forms.make_train_config, fields)


@FUZZ
@given(mutated(VIEWS_VALID))
def test_make_views_config(fields):
    one_line_or_ok(forms.make_views_config, fields, (1, 2, 4))


@settings(max_examples=40, deadline=None, derandomize=True)
@given(st.fixed_dictionaries({k: ANY for k in INIT_VALID if k != "upload"}))
def test_make_init_config_from_anything(fields):
    one_line_or_ok(forms.make_init_config, {"upload": None, **fields})


CONTENTS = st.one_of(
    st.binary(max_size=600),
    st.text(max_size=400).map(lambda t: t.encode("utf-8", "surrogatepass")),
    st.sampled_from([b"", b"text\nhello\n", b"\xff\xfe\x00bad", b'{"text": "a"}\n{"text": 1}\n', b"PAR1\x00\x00PAR1",
                     b"a,b\n1,2\n", b"\x1f\x8b\x08\x00garbage", b"col\n" + b"x" * 3000,
                     "é,ü\nà,ß\n".encode("latin-1")]),
)
NAMES = st.sampled_from(["t.txt", "t.csv", "t.tsv", "t.jsonl", "t.json", "t.parquet", "t.csv.gz", "t.txt.bz2",
                         "t.jsonl.xz", "t.parquet.gz", "t.exe", "t", "t.CSV", "..csv", "t.txt.gz"])


@settings(max_examples=150, deadline=None, derandomize=True)
@given(NAMES, CONTENTS)
def test_inspect_upload_of_any_file(name, content):
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / name
        path.write_bytes(content)
        old = os.environ.get("QUAILORA_MAX_UPLOAD_MB")
        os.environ["QUAILORA_MAX_UPLOAD_MB"] = "0.002"  # ~2 KB: some examples are over the limit
        try:
            out = one_line_or_ok(forms.inspect_upload, str(path))
        finally:
            if old is None:
                os.environ.pop("QUAILORA_MAX_UPLOAD_MB")
            else:
                os.environ["QUAILORA_MAX_UPLOAD_MB"] = old
        if out is not None:
            cols, guess, info = out
            assert isinstance(cols, list) and (guess is None or guess in cols) and "\n" not in info


@settings(max_examples=40, deadline=None, derandomize=True)
@given(ANY)
def test_inspect_upload_of_anything(value):
    one_line_or_ok(forms.inspect_upload, value)


PATHISH = st.one_of(ANY, st.text(alphabet="./~-_:ab\\\x00 ", max_size=20),
                    st.builds(lambda a, b: f"{a}/{b}", st.text(max_size=8), st.text(max_size=8)))


@FUZZ
@given(PATHISH, st.sampled_from(["model", "dataset"]), st.one_of(st.none(), st.text(max_size=10)))
def test_path_policy(text, kind, owner):
    text = text if isinstance(text, str) or text is None else str(text)
    value = one_line_or_ok(paths.check_user_path, text, kind, owner)
    embedded = value == "embedded" or str(value).startswith("embedded:")
    if value is not None and not embedded and paths.is_hub_id(value) is False:
        resolved = Path(value)
        assert any(resolved.is_relative_to(r.resolve()) for r in paths.allowed_roots(owner)), value


@FUZZ
@given(PATHISH)
def test_describe_dataset_box(text):
    line = forms.describe_source(text)
    assert isinstance(line, str) and "\n" not in line


@FUZZ
@given(PATHISH, st.one_of(st.none(), st.text(max_size=10)))
def test_vetted_sources_without_upload(dataset, owner):
    one_line_or_ok(forms.vetted_sources, "embedded", dataset, None, owner or "someone")


@FUZZ
@given(ANY, st.one_of(ANY, st.just({"owner": "x"})))
def test_reopen_names_and_sessions(name, session):
    with tempfile.TemporaryDirectory() as root:
        (Path(root) / "init-1").mkdir()
        (Path(root) / "init-1" / "report.json").write_text("{}")
        _, owner = forms.session_owner(session)
        run = one_line_or_ok(open_run, name if isinstance(name, str) or name is None else str(name), owner, root)
        if run is not None:
            assert run.run_dir.parent == Path(root).resolve()
