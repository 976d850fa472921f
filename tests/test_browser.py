"""End to end in headless Chromium with the embedded SmolLM2: the first visit shows the shipped example run
(plots, numbers and curves, labelled) without pressing anything; set small settings, quantize & initialize (the
live run replaces the shipped one), watch the per-layer plot render, compute the teaching views and open How it
works, start a short two-arm fine-tuning from that init run (the default), see its first curve points and then
more, stop it.
Screenshots go to test-output/ (ignored by git)."""
from __future__ import annotations

import os
import re
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SHOTS = Path(__file__).resolve().parent.parent / "test-output"
#: QUAILORA_TEST_SLOWDOWN=4 stretches every wait on a busy machine (then also pass pytest --timeout)
SLOWDOWN = float(os.environ.get("QUAILORA_TEST_SLOWDOWN") or 1)


def ms(milliseconds: int) -> int:
    return int(milliseconds * SLOWDOWN)


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    if not Path(CHROMIUM).exists():
        pytest.skip("no /usr/bin/chromium (apt-get install chromium)")
    pytest.importorskip("playwright")
    from quailora_app.sources.models import embedded_gguf

    try:
        embedded_gguf()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"embedded model unavailable: {exc}")
    from helpers import launched_app

    with launched_app(tmp_path_factory.mktemp("runs")) as url:
        yield url


def set_number(page, label: str, value) -> None:
    box = page.get_by_label(label, exact=True)
    box.fill(str(value))
    box.press("Tab")


#: markers of the validation-perplexity panel (plotly's first subplot, "xy") of the fine-tuning figure
VAL_POINTS = "#curves-plot .js-plotly-plot .subplot.xy g.trace.scatter path.point"
#: the per-layer plot shows points and no down_proj panel: the live run (q_proj, v_proj), not the shipped one
LIVE_LAYERS = """() => { const p = document.querySelector('#layer-plot .js-plotly-plot');
  return !!p && !!p.querySelector('g.trace.scatter path.point')
    && ![...p.querySelectorAll('.annotation-text')].some(a => a.textContent === 'down_proj'); }"""
#: the curves legend lacks the 8-bit arm: the live fine-tuning (two 4-bit arms; no legend before its first
#: evaluation), not the shipped one
LIVE_CURVES = """() => !!document.querySelector('#curves-plot .js-plotly-plot')
  && ![...document.querySelectorAll('#curves-plot .legendtext')].some(e => e.textContent === '8-bit QLoRA')"""


def shipped_example_shown(page, expect) -> None:
    """The first visit: the shipped example run's headline, labelled plots, numbers and curves, drawn at once."""
    from quailora_app.app.reopen import EXAMPLE_DIR
    from quailora_app.runs import RunFolder

    report = RunFolder(EXAMPLE_DIR / "init").read_report()
    assert report, "no shipped example run (python bench/make_example.py)"
    expect(page.locator("#example-headline")).to_contain_text("shipped example run", ignore_case=True,
                                                              timeout=ms(60_000))
    expect(page.locator("#example-init")).to_contain_text("Shipped example run")
    expect(page.locator("#example-init")).to_contain_text("bench/make_example.py")
    expect(page.locator("#live-init")).to_be_visible()
    page.wait_for_selector("#layer-plot .js-plotly-plot g.trace.scatter path.point", timeout=ms(60_000))
    expect(page.locator("#layer-plot .annotation-text", has_text="down_proj")).to_have_count(1)  # all linear
    page.wait_for_selector("#heatmap-plot .js-plotly-plot g.hm", state="attached", timeout=ms(60_000))
    bars = len([v for v in report["perplexity"].values() if v is not None])
    expect(page.locator("#ppl-plot .js-plotly-plot g.trace.bars")).to_have_count(bars, timeout=ms(60_000))
    expect(page.locator("#ppl-plot")).to_contain_text("gap closed")
    expect(page.locator("#example-train")).to_contain_text("Shipped example run")
    page.wait_for_selector(VAL_POINTS, timeout=ms(60_000))
    expect(page.locator("#summary")).to_contain_text("Shipped example run")


def test_init_then_finetune_in_the_browser(app_url):
    from playwright.sync_api import expect, sync_playwright

    SHOTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(app_url, wait_until="load")
        expect(page.locator("#start-init")).to_be_visible(timeout=ms(30_000))

        # the first visit shows the shipped example run at once: nothing pressed, nothing computed
        shipped_example_shown(page, expect)
        page.screenshot(path=str(SHOTS / "browser-0-first-screen.png"))
        page.locator("#example-init").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "browser-0-shipped-init.png"))
        page.locator("#example-train").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "browser-0-shipped-train.png"))
        page.screenshot(path=str(SHOTS / "browser-0-first-visit.png"), full_page=True)

        # small settings: 4 x 128 calibration tokens, 1024 eval tokens, svd + quailora on q_proj and v_proj
        set_number(page, "calibration sequences", 4)
        set_number(page, "tokens per sequence", 128)
        set_number(page, "held-out tokens for perplexity", 1024)
        tokens = page.locator("#targets .token")
        if tokens.count() != 2 or "q_proj" not in tokens.first.inner_text():  # the GPU defaults adapt all-linear
            page.locator("#targets .token-remove").first.click()
            targets = page.locator("#targets input")
            for name in ("q_proj", "v_proj"):
                targets.fill(name)
                targets.press("Enter")
            targets.press("Escape")
        expect(page.locator("#targets .token")).to_have_count(2)
        for label in ("closed form", "LoftQ"):
            page.get_by_label(label, exact=True).uncheck()
        page.get_by_label("SVD", exact=True).check()
        page.get_by_label("QuAILoRA", exact=True).check()
        page.get_by_text("Advanced", exact=True).click()
        set_number(page, "QuAILoRA ALS rounds", 5)  # the ALS is most of the CPU time; 5 rounds show the same picture
        page.screenshot(path=str(SHOTS / "browser-1-setup.png"), full_page=True)

        start = time.time()
        page.locator("#start-init").click()
        expect(page.locator("#init-status")).to_contain_text("running", timeout=ms(30_000))
        expect(page.locator("#example-init")).to_be_hidden(timeout=ms(10_000))  # the live run replaces the shipped one
        expect(page.locator("#example-headline")).to_be_hidden()
        page.wait_for_function(LIVE_LAYERS, timeout=ms(240_000))
        page.screenshot(path=str(SHOTS / "browser-2-calibrating.png"), full_page=True)
        expect(page.locator("#init-status")).to_contain_text("finished", timeout=ms(300_000))
        init_seconds = time.time() - start
        expect(page.locator("#ppl-plot .js-plotly-plot g.trace.bars")).to_have_count(5, timeout=ms(10_000))
        expect(page.locator("#summary")).to_contain_text("QuAILoRA", timeout=ms(10_000))
        page.locator("#layer-plot").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "browser-3-init-done.png"), full_page=True)

        # teaching views of the default layer (8 x 128 calibration tokens, ranks 1..32), then the method page
        page.get_by_role("tab", name="Teaching views").click()
        expect(page.locator("#view-layer input")).to_have_value(re.compile("default"), timeout=ms(10_000))
        start = time.time()
        page.locator("#start-views").click()
        expect(page.locator("#views-status")).to_contain_text("finished", timeout=ms(180_000))
        views_seconds = time.time() - start
        for key in ("weights", "error", "spectrum", "energy", "channels", "rank-sweep", "precision"):
            page.wait_for_selector(f"#view-{key} .js-plotly-plot g.trace", state="attached", timeout=ms(20_000))
        expect(page.locator("#precision-table")).to_contain_text("NF4 + double quant", timeout=ms(10_000))
        page.locator("#tab-views").screenshot(path=str(SHOTS / "browser-views.png"))
        page.get_by_role("tab", name="How it works").click()
        expect(page.locator("#how-it-works .katex").first).to_be_visible(timeout=ms(10_000))
        page.locator("#tab-how").screenshot(path=str(SHOTS / "browser-how.png"))
        page.get_by_role("tab", name="Across models").click()
        page.wait_for_selector("#harm-gain-plot .js-plotly-plot", state="attached", timeout=ms(10_000))
        expect(page.locator("#harm-gain-source")).to_contain_text("bench/paper_table.py", timeout=ms(10_000))
        page.locator("#tab-harm-gain").screenshot(path=str(SHOTS / "browser-harm-gain.png"))

        # fine-tune two arms a few steps, evaluating after every step
        page.get_by_label("8-bit QLoRA", exact=True).uncheck()
        set_number(page, "steps", 8)
        set_number(page, "batch (sequences per step)", 1)
        set_number(page, "evaluate every (steps)", 2)
        expect(page.locator("#start-from-init input")).to_be_checked()  # the default: from the init run above
        start = time.time()
        page.locator("#live-train").click()  # "Compute it live" beside the shipped curves presses Start fine-tuning
        expect(page.locator(".toast-body").filter(has_text="starts from init run")).to_be_visible(timeout=ms(30_000))
        expect(page.locator("#train-status")).to_contain_text(re.compile("running|queued"), timeout=ms(30_000))
        expect(page.locator("#example-train")).to_be_hidden(timeout=ms(10_000))
        page.wait_for_function(LIVE_CURVES, timeout=ms(30_000))
        # the left panel (validation perplexity) first shows step 0 of both arms (the init run's perplexities: no
        # second calibration), then gains the step-2 points
        page.wait_for_function(f"() => document.querySelectorAll('{VAL_POINTS}').length >= 2", timeout=ms(120_000))
        first_point_seconds = time.time() - start
        first = page.locator(VAL_POINTS).count()
        page.wait_for_function(f"() => document.querySelectorAll('{VAL_POINTS}').length > {first}", timeout=ms(180_000))
        assert page.locator(VAL_POINTS).count() > first
        page.locator("#curves-plot").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "browser-4-training.png"), full_page=True)
        page.locator("#stop-train").click()
        expect(page.locator("#train-status")).to_contain_text(re.compile("stopp|finished"), timeout=ms(120_000))
        expect(page.locator("#train-status")).to_contain_text(re.compile("stopped|finished"), timeout=ms(120_000))
        page.screenshot(path=str(SHOTS / "browser-5-stopped.png"), full_page=True)

        # a reopened page re-attaches to this browser's jobs (owner key in localStorage) and redraws them
        page.reload(wait_until="load")
        expect(page.locator("#init-status")).to_contain_text("finished", timeout=ms(30_000))
        expect(page.locator("#train-status")).to_contain_text(re.compile("stopped|finished"), timeout=ms(30_000))
        expect(page.locator("#example-init")).to_be_hidden(timeout=ms(10_000))
        expect(page.locator("#example-train")).to_be_hidden(timeout=ms(10_000))
        page.wait_for_function(LIVE_LAYERS, timeout=ms(30_000))
        page.wait_for_function(LIVE_CURVES, timeout=ms(30_000))
        page.wait_for_selector(VAL_POINTS, timeout=ms(30_000))
        browser.close()
    print(f"init flow in the browser: {init_seconds:.0f} s, teaching views: {views_seconds:.0f} s, fine-tuning from "
          f"the init run: first curve points after {first_point_seconds:.0f} s")
