"""End to end in headless Chromium with the embedded SmolLM2: set small settings, quantize & initialize,
watch the per-layer plot render, compute the teaching views and open How it works, start a short two-arm
fine-tuning, see the live curve gain points, stop it.
Screenshots go to test-output/ (ignored by git)."""
from __future__ import annotations

import re
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slow, pytest.mark.browser]

CHROMIUM = "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
        "--disable-sync", "--no-first-run"]
SHOTS = Path(__file__).resolve().parent.parent / "test-output"


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


def test_init_then_finetune_in_the_browser(app_url):
    from playwright.sync_api import expect, sync_playwright

    SHOTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 1280, "height": 1000})
        page.goto(app_url, wait_until="load")
        expect(page.locator("#start-init")).to_be_visible(timeout=30_000)

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
        expect(page.locator("#init-status")).to_contain_text("running", timeout=30_000)
        page.wait_for_selector("#layer-plot .js-plotly-plot g.trace.scatter path.point", timeout=240_000)
        page.screenshot(path=str(SHOTS / "browser-2-calibrating.png"), full_page=True)
        expect(page.locator("#init-status")).to_contain_text("finished", timeout=300_000)
        init_seconds = time.time() - start
        expect(page.locator("#ppl-plot .js-plotly-plot g.trace.bars")).to_have_count(5, timeout=10_000)
        expect(page.locator("#summary")).to_contain_text("QuAILoRA", timeout=10_000)
        page.locator("#layer-plot").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "browser-3-init-done.png"), full_page=True)

        # teaching views of the default layer (8 x 128 calibration tokens, ranks 1..32), then the method page
        page.get_by_role("tab", name="Teaching views").click()
        expect(page.locator("#view-layer input")).to_have_value(re.compile("default"), timeout=10_000)
        start = time.time()
        page.locator("#start-views").click()
        expect(page.locator("#views-status")).to_contain_text("finished", timeout=180_000)
        views_seconds = time.time() - start
        for key in ("weights", "error", "spectrum", "energy", "channels", "rank-sweep", "precision"):
            page.wait_for_selector(f"#view-{key} .js-plotly-plot g.trace", state="attached", timeout=20_000)
        expect(page.locator("#precision-table")).to_contain_text("NF4 + double quant", timeout=10_000)
        page.locator("#tab-views").screenshot(path=str(SHOTS / "browser-views.png"))
        page.get_by_role("tab", name="How it works").click()
        expect(page.locator("#how-it-works .katex").first).to_be_visible(timeout=10_000)
        page.locator("#tab-how").screenshot(path=str(SHOTS / "browser-how.png"))

        # fine-tune two arms a few steps, evaluating after every step
        page.get_by_label("8-bit QLoRA", exact=True).uncheck()
        set_number(page, "steps", 8)
        set_number(page, "batch (sequences per step)", 1)
        set_number(page, "evaluate every (steps)", 2)
        page.locator("#start-train").click()
        expect(page.locator("#train-status")).to_contain_text(re.compile("running|queued"), timeout=30_000)
        # the left panel (validation perplexity) first shows step 0 of both arms, then gains the step-2 points
        page.wait_for_function(f"() => document.querySelectorAll('{VAL_POINTS}').length >= 2", timeout=300_000)
        first = page.locator(VAL_POINTS).count()
        page.wait_for_function(f"() => document.querySelectorAll('{VAL_POINTS}').length > {first}", timeout=180_000)
        assert page.locator(VAL_POINTS).count() > first
        page.locator("#curves-plot").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "browser-4-training.png"), full_page=True)
        page.locator("#stop-train").click()
        expect(page.locator("#train-status")).to_contain_text(re.compile("stopp|finished"), timeout=120_000)
        expect(page.locator("#train-status")).to_contain_text(re.compile("stopped|finished"), timeout=120_000)
        page.screenshot(path=str(SHOTS / "browser-5-stopped.png"), full_page=True)

        # a reopened page re-attaches to this browser's jobs (owner key in localStorage) and redraws them
        page.reload(wait_until="load")
        expect(page.locator("#init-status")).to_contain_text("finished", timeout=30_000)
        expect(page.locator("#train-status")).to_contain_text(re.compile("stopped|finished"), timeout=30_000)
        page.wait_for_selector("#layer-plot .js-plotly-plot g.trace.scatter path.point", timeout=30_000)
        page.wait_for_selector(VAL_POINTS, timeout=30_000)
        browser.close()
    print(f"init flow in the browser: {init_seconds:.0f} s, teaching views: {views_seconds:.0f} s")
