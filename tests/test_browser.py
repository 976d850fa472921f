"""End to end in headless Chromium: the first visit shows the embedded SmolLM2's shipped example run
(plots, numbers, curves and the seven teaching views, labelled; the Across bits tab's frontier and its reading)
without pressing anything, and no text of any figure overlaps another at 1400 and 900 px widths (nor runs past the
figure's edge), and section 5 shows the shipped generate run (its continuations side by side and the coloured
agreement strip); type the tiny model (tests/helpers.py: a Llama from a config) into the Setup, set small settings,
quantize & initialize (the live run replaces the shipped one), watch the
per-layer plot render, press Generate on that init run and see the continuations stream in (full precision's text
before a later variant's, then the strip and the top-10 view; choosing a position redraws it), compute the teaching
views (they replace the shipped ones) and open How it works, start a
short two-arm fine-tuning from that init run (the default), see its first curve points and then more, stop it;
reopen the page; then run across bits on a tiny model (its frontier replaces the shipped one, and its bit widths the
shipped ones in the across-models scatter), and quantize & initialize the tiny model at HQQ 3-bit chosen in the Setup
(the quantizer setting: bitsandbytes by default, NF4/FP4 only settable for it; the figures name the base). The
live run's figures, the teaching views, the across-models scatter and the live frontier are checked for overlapping
texts too (at 1400 px), the generate section's at 1400 and 900.
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
def app_url(tmp_path_factory, tiny_model_dir):
    if not Path(CHROMIUM).exists():
        pytest.skip("no /usr/bin/chromium (apt-get install chromium)")
    pytest.importorskip("playwright")
    from quailora_app.sources.models import embedded_gguf

    try:
        embedded_gguf()
    except Exception as exc:  # noqa: BLE001
        pytest.skip(f"embedded model unavailable: {exc}")
    from helpers import launched_app

    # the across-bits run types the tiny model's folder (pytest's temp folders): allow the app to read it
    with launched_app(tmp_path_factory.mktemp("runs"), allowed=tmp_path_factory.getbasetemp()) as url:
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


#: Every shown plotly figure's texts (axis and colour-bar titles, tick labels, annotations and subplot titles, bar
#: and point labels, legend entries, the title; hover labels aside) and legend boxes, measured in the page as the
#: figure draws them (rotated labels as rotated boxes): each pair overlapping by more than TOL px (a text's own
#: lines are one element; a legend box holds its own entries), and each text running more than TOL px past its
#: figure's edge. Figures in a hidden tab or a closed accordion are not drawn and not counted.
TEXT_OVERLAPS = """(root) => {
  const TOL = 2;
  const shown = el => {
    for (let e = el; e && e.nodeType === 1 && !e.classList.contains('js-plotly-plot'); e = e.parentElement) {
      const s = getComputedStyle(e);
      if (s.display === 'none' || s.visibility === 'hidden' || +s.opacity === 0) return false;
    }
    return true;
  };
  const quad = el => {
    const b = el.getBBox(), m = el.getScreenCTM();
    return [[b.x, b.y], [b.x + b.width, b.y], [b.x + b.width, b.y + b.height], [b.x, b.y + b.height]]
      .map(([x, y]) => [m.a * x + m.c * y + m.e, m.b * x + m.d * y + m.f]);
  };
  const depth = (p, q) => {  // separating axes: how deep two convex quads overlap (<= 0: apart)
    let least = Infinity;
    for (const poly of [p, q]) for (let i = 0; i < 4; i++) {
      const [x1, y1] = poly[i], [x2, y2] = poly[(i + 1) % 4], len = Math.hypot(x2 - x1, y2 - y1);
      if (len < 1e-6) continue;
      const nx = (y1 - y2) / len, ny = (x2 - x1) / len;
      const span = s => { const v = s.map(([x, y]) => x * nx + y * ny); return [Math.min(...v), Math.max(...v)]; };
      const [a0, a1] = span(p), [b0, b1] = span(q);
      least = Math.min(least, Math.min(a1, b1) - Math.max(a0, b0));
    }
    return least;
  };
  const bounds = q => ({q, x0: Math.min(...q.map(p => p[0])), x1: Math.max(...q.map(p => p[0])),
                         y0: Math.min(...q.map(p => p[1])), y1: Math.max(...q.map(p => p[1]))});
  const overlaps = [], cut = [];
  let plots = 0;
  for (const plot of (root ? document.querySelector(root) : document).querySelectorAll('.js-plotly-plot')) {
    const box = plot.getBoundingClientRect();
    if (!box.width) continue;
    plots++;
    const where = '#' + (plot.closest('[id]:not(.js-plotly-plot)') || {id: '?'}).id;
    const items = [];
    for (const t of plot.querySelectorAll('text')) {
      const s = t.textContent.trim();
      if (!s || t.closest('.hoverlayer') || !shown(t) || t.getBBox().width < 1) continue;
      const item = {what: `${t.getAttribute('class') || 'text'} "${s.slice(0, 50)}"`, ...bounds(quad(t)),
                    group: t.closest('g.traces') || t, legend: t.closest('g.legend')};
      const past = Math.max(box.left - item.x0, item.x1 - box.right, box.top - item.y0, item.y1 - box.bottom);
      if (past > TOL) cut.push(`${where}: ${item.what} runs ${past.toFixed(0)} px past the figure's edge`);
      items.push(item);
    }
    for (const bg of plot.querySelectorAll('g.legend > rect.bg')) {
      if (shown(bg) && bg.getBBox().width >= 1)
        items.push({what: 'legend box', ...bounds(quad(bg)), group: bg, legend: bg.parentElement, box: true});
    }
    for (let i = 0; i < items.length; i++) for (let j = i + 1; j < items.length; j++) {
      const a = items[i], b = items[j];
      if (Math.min(a.x1, b.x1) - Math.max(a.x0, b.x0) <= TOL || Math.min(a.y1, b.y1) - Math.max(a.y0, b.y0) <= TOL
          || a.group === b.group || ((a.box || b.box) && a.legend === b.legend)) continue;
      const d = depth(a.q, b.q);
      if (d > TOL) overlaps.push(`${where}: ${a.what} overlaps ${b.what} by ${d.toFixed(0)} px`);
    }
  }
  return {plots, overlaps, cut};
}"""
#: every shown figure laid out at its container's width (after a change of the viewport's width)
PLOTS_SETTLED = """() => [...document.querySelectorAll('.js-plotly-plot')].every(p => {
  const w = p.getBoundingClientRect().width;
  return !w || (p._fullLayout && Math.abs(p._fullLayout.width - w) < 2); })"""


#: seconds the test spends on the text checks and the width changes they need (printed at the end)
CHECK_SECONDS = [0.0]


def no_text_overlaps(page, when: str, root: str | None = None, plots: int = 1) -> None:
    """No two texts of the figures shown (under `root`) overlap, nor runs past its figure's edge (TEXT_OVERLAPS);
    at least `plots` figures are shown. What is found is measured again a second later and only what stays counts:
    a figure caught in the middle of a redraw (a live run's poll just drew it) is not what a visitor sees."""
    start = time.time()
    page.wait_for_function(PLOTS_SETTLED, timeout=ms(10_000))
    found = page.evaluate(TEXT_OVERLAPS, root)
    if found["overlaps"] or found["cut"]:
        page.wait_for_timeout(ms(1000))
        page.wait_for_function(PLOTS_SETTLED, timeout=ms(10_000))
        found = page.evaluate(TEXT_OVERLAPS, root)
    CHECK_SECONDS[0] += time.time() - start
    assert found["plots"] >= plots, f"{when}: {found['plots']} figures shown, expected {plots} or more"
    bad = found["overlaps"] + found["cut"]
    assert not bad, f"{when}: {len(bad)} texts overlap in the figures:\n" + "\n".join(bad[:40])


def at_width(page, width: int) -> None:
    """The page `width` px wide, every shown figure laid out again at its new width."""
    start = time.time()
    page.set_viewport_size({"width": width, "height": 1000})
    page.wait_for_function(PLOTS_SETTLED, timeout=ms(10_000))
    CHECK_SECONDS[0] += time.time() - start


def show_tab(page, name: str) -> None:
    """Open tab `name`, its figures laid out at the page's present width (a figure hidden while the width changed
    keeps its old layout until the window's next resize event)."""
    page.get_by_role("tab", name=name).click()
    page.evaluate("window.dispatchEvent(new Event('resize'))")


def frontier_checked(page, width: int) -> None:
    """The open Across bits tab at the page's present `width`: a screenshot (SHOTS/browser-0-frontier-<width>.png)
    and no text overlap in its figure."""
    page.locator("#tab-bits").scroll_into_view_if_needed()
    page.locator("#tab-bits").screenshot(path=str(SHOTS / f"browser-0-frontier-{width}.png"))
    no_text_overlaps(page, f"the shipped frontier at {width} px", "#tab-bits")


def at_both_widths(page, when: str, root: str, shot: str, plots: int = 1) -> None:
    """`root` as drawn at 1400 px and then at 900 px: a screenshot of each (SHOTS/browser-<shot>-<width>.png) and
    no text overlap in its figures at either (no_text_overlaps); the page is left at 1400 px."""
    for width in (1400, 900):
        if width != 1400:
            at_width(page, width)
        page.locator(root).screenshot(path=str(SHOTS / f"browser-{shot}-{width}.png"))
        no_text_overlaps(page, f"{when} at {width} px", root, plots=plots)
    at_width(page, 1400)


#: the frontier's perplexities as drawn (plotly's own data on the figure's div), to see it redrawn by a live run
FRONTIER_Y = """() => { const p = document.querySelector('#bits-frontier .js-plotly-plot');
  return p && p.data ? JSON.stringify(p.data.map(t => t.y)) : ''; }"""
#: the frontier's points as drawn: circles (HQQ) and squares (bitsandbytes) of plotly's scatter traces
FRONTIER_POINTS = "#bits-frontier .js-plotly-plot g.trace.scatter path.point"


def shipped_frontier_shown(page, expect) -> None:
    """The Across bits tab of a first visit: the shipped across-bits run's frontier drawn (a marker per point), its
    one-line reading under it, its table, labelled as the shipped example, with "Compute it live" beside."""
    from quailora_app.app.reopen import EXAMPLE_DIR
    from quailora_app.runs import RunFolder

    report = RunFolder(EXAMPLE_DIR / "bits").read_report()
    assert report and report.get("points"), "no shipped across-bits run (python -m bench.make_example --only bits)"
    page.get_by_role("tab", name="Across bits").click()
    expect(page.locator(FRONTIER_POINTS)).to_have_count(len(report["points"]), timeout=ms(30_000))
    expect(page.locator("#bits-frontier .legendtext").first).to_be_visible()
    expect(page.locator("#bits-reading")).to_contain_text(report["reading"][:60])
    expect(page.locator("#example-bits")).to_contain_text("Shipped example run")
    expect(page.locator("#live-bits")).to_be_visible()
    expect(page.locator("#bits-table")).to_contain_text("full precision")


#: the elem_ids of the seven teaching views, after "view-"
VIEW_IDS = ("weights", "error", "spectrum", "energy", "channels", "rank-sweep", "precision")


def shipped_example_shown(page, expect) -> None:
    """The first visit: the shipped example run's headline, labelled plots, numbers and curves, drawn at once."""
    from quailora_app.app.reopen import EXAMPLE_DIR
    from quailora_app.runs import RunFolder

    report = RunFolder(EXAMPLE_DIR / "init").read_report()
    assert report, "no shipped example run (python -m bench.make_example)"
    expect(page.locator("#example-headline")).to_contain_text("shipped example run", ignore_case=True,
                                                              timeout=ms(60_000))
    expect(page.locator("#example-init")).to_contain_text("Shipped example run")
    expect(page.locator("#example-init")).to_contain_text("make_example")
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
    # the teaching views' tab (open by default) shows the shipped example's seven views, labelled, drawn (plotly
    # traces, not the "press Compute views" placeholders), and its precision table
    views = RunFolder(EXAMPLE_DIR / "views").read_report()
    assert views and views.get("figures"), "no shipped teaching views (python -m bench.make_example)"
    expect(page.locator("#example-views")).to_contain_text("Shipped example run")
    expect(page.locator("#example-views")).to_contain_text(views["layer"])
    expect(page.locator("#live-views")).to_be_visible()
    for key in VIEW_IDS:
        page.wait_for_selector(f"#view-{key} .js-plotly-plot g.trace", state="attached", timeout=ms(60_000))
        expect(page.locator(f"#view-{key}")).not_to_contain_text("Compute views")
    expect(page.locator("#precision-table")).to_contain_text("NF4 + double quant")


#: the agreement strip's coloured token cells (a background set by app/generation.py), one row per variant
STRIP_CELLS = "#gen-strip .g-row[data-variant] .g-tok[style*='background']"
#: a generate run streams: full precision's card already has text while another waits its turn or streams
STREAMING = r"""() => { const cards = [...document.querySelectorAll('#gen-continuations .g-card')];
  const full = cards.find(c => c.dataset.variant === 'full');
  return !!full && full.querySelector('.g-text').textContent.trim().length > 0
    && cards.some(c => /waiting|token \d+ of/.test(c.querySelector('.g-state').textContent)); }"""


def shipped_generate_shown(page, expect) -> None:
    """Section 5 of a first visit: the shipped generate run's continuations side by side (one card per variant),
    its agreement strip coloured token by token, its summary, top-10 and deployment table, labelled."""
    from quailora_app.app.reopen import EXAMPLE_DIR
    from quailora_app.runs import RunFolder

    report = RunFolder(EXAMPLE_DIR / "generate").read_report()
    assert report and report.get("agreement"), "no shipped generate run (python -m bench.make_example --only generate)"
    page.locator("#generate-section").scroll_into_view_if_needed()
    expect(page.locator("#example-generate")).to_contain_text("Shipped example run")
    expect(page.locator("#live-generate")).to_be_visible()
    expect(page.locator("#gen-continuations .g-card")).to_have_count(len(report["variants"]), timeout=ms(30_000))
    for name in report["variants"]:
        text = report["continuations"][name]["text"].strip().split("\n")[0][:20]
        if text:
            expect(page.locator(f"#gen-continuations .g-card[data-variant='{name}']")).to_contain_text(text)
    rows = len(report["variants"]) - 1  # full precision's row is the uncoloured reference
    expect(page.locator(STRIP_CELLS)).to_have_count(rows * report["new_tokens"])
    expect(page.locator("#gen-top10 .js-plotly-plot g.trace.bars")).to_have_count(3, timeout=ms(30_000))
    expect(page.locator("#gen-summary")).to_contain_text("full precision")
    if report.get("deploy"):
        expect(page.locator("#gen-deploy-table")).to_contain_text("(c)")
        expect(page.locator("#gen-deploy-reading")).to_contain_text("Why (c) loses the correction")


#: new tokens of the live generate run
LIVE_NEW_TOKENS = 160


def generate_live(page, expect) -> float:
    """Press Generate on the live init run (the session's latest): the shipped run's banner goes, the continuations
    stream in (full precision's text shown while other cards still wait or stream), then the strip, the summary and
    the top-10 view are the live run's; choosing a position redraws the top-10 lists and outlines that column.
    Seconds from the press to the finished run."""
    page.locator("#generate-section").scroll_into_view_if_needed()
    # the tiny model decodes a token in milliseconds: 160 of them keep the other variants waiting or streaming for a
    # few of the page's one-second polls after full precision's text is shown
    set_number(page, "new tokens", LIVE_NEW_TOKENS)
    set_number(page, "held-out documents", 1)
    start = time.time()
    page.locator("#start-generate").click()
    expect(page.locator("#example-generate")).to_be_hidden(timeout=ms(30_000))
    page.wait_for_function(STREAMING, timeout=ms(120_000))
    page.locator("#generate-section").screenshot(path=str(SHOTS / "browser-7-generate-streaming.png"))
    expect(page.locator("#generate-status")).to_contain_text("finished", timeout=ms(300_000))
    seconds = time.time() - start
    names = ["full", "int8", "qlora", "svd", "quailora"]  # the live init run: svd and quailora beside plain QLoRA
    expect(page.locator("#gen-continuations .g-card")).to_have_count(len(names), timeout=ms(10_000))
    expect(page.locator("#gen-continuations")).not_to_contain_text("waiting")
    expect(page.locator(STRIP_CELLS)).to_have_count((len(names) - 1) * LIVE_NEW_TOKENS, timeout=ms(10_000))
    expect(page.locator("#gen-summary")).to_contain_text("QuAILoRA")
    expect(page.locator("#gen-top10 .js-plotly-plot g.trace.bars")).to_have_count(3, timeout=ms(10_000))
    box = page.locator("#gen-position input[type='number']")
    box.fill("3")
    box.press("Enter")
    expect(page.locator("#gen-top10 .gtitle")).to_contain_text("(3)", timeout=ms(20_000))
    expect(page.locator("#gen-strip .g-row[data-variant='qlora'] .g-tok").nth(2)).to_have_class(
        re.compile("g-chosen"), timeout=ms(10_000))
    at_both_widths(page, "the live generate run", "#generate-section", "7-generate-live", plots=3)
    return seconds


def choose_model(page, model_dir) -> None:
    """Type a model folder into the Setup's Model box."""
    model = page.get_by_label("Model", exact=True)
    model.fill(str(model_dir))
    model.press("Enter")
    model.press("Tab")


def run_across_bits(page, expect, model_dir) -> float:
    """Type the tiny model into the Setup, press "Run across bits" with small token counts, see the frontier
    redrawn (the shipped one gone) with the run's reading and table, and its bit widths in the across-models
    scatter; seconds from the press to the finished run."""
    choose_model(page, model_dir)
    page.get_by_role("tab", name="Across bits").click()
    page.wait_for_selector(FRONTIER_POINTS, timeout=ms(30_000))
    shipped_y = page.evaluate(FRONTIER_Y)
    set_number(page, "calibration sequences (across bits)", 4)
    set_number(page, "tokens per sequence (across bits)", 32)
    set_number(page, "held-out tokens (across bits)", 128)
    start = time.time()
    page.locator("#start-bits").click()
    expect(page.locator("#example-bits")).to_be_hidden(timeout=ms(30_000))  # the live run replaces the shipped one
    expect(page.locator("#bits-status")).to_contain_text("finished", timeout=ms(180_000))
    seconds = time.time() - start
    page.wait_for_function(f"() => ({FRONTIER_Y})() && ({FRONTIER_Y})() !== {shipped_y!r}", timeout=ms(30_000))
    expect(page.locator(FRONTIER_POINTS)).to_have_count(3 * 2, timeout=ms(30_000))  # 3 bases, plain and corrected
    expect(page.locator("#bits-reading")).to_contain_text("plus a rank-16 closed form correction", timeout=ms(10_000))
    expect(page.locator("#bits-progress")).to_contain_text("100%")
    expect(page.locator("#bits-table")).to_contain_text("HQQ 2-bit (groups of 64)")
    page.locator("#tab-bits").scroll_into_view_if_needed()
    page.locator("#tab-bits").screenshot(path=str(SHOTS / "browser-6-bits-live-1400.png"))
    no_text_overlaps(page, "the live frontier at 1400 px", "#tab-bits")
    page.get_by_role("tab", name="Across models").click()
    page.wait_for_selector("#harm-gain-plot .js-plotly-plot", state="attached", timeout=ms(10_000))
    live = """() => { const p = document.querySelector('#harm-gain-plot .js-plotly-plot');
      const t = p && p.data && p.data.find(t => (t.name || '').startsWith('bit widths'));
      return !!t && t.text.length === 3 && t.x.every(x => Math.abs(x) < 1000); }"""  # the tiny model's, not 2-bit's
    page.wait_for_function(live, timeout=ms(30_000))
    page.locator("#tab-harm-gain").screenshot(path=str(SHOTS / "browser-6-harm-gain-bits.png"))
    no_text_overlaps(page, "the across-models scatter with the live bit widths at 1400 px", "#tab-harm-gain")
    return seconds


def quantizer_setting_shown(page, expect) -> None:
    """The Setup's quantizer: bitsandbytes (the QLoRA recipe) chosen, 4 bits, NF4/FP4 settable."""
    expect(page.locator("#quantizer")).to_be_visible()
    expect(page.locator("#quantizer")).to_contain_text("bitsandbytes (QLoRA recipe)")
    expect(page.locator("#quantizer")).to_contain_text("HQQ")
    expect(page.get_by_label("bitsandbytes (QLoRA recipe)", exact=True)).to_be_checked()
    expect(page.locator("#bits input")).to_have_value("4")
    expect(page.locator("#quant-type input").first).to_be_enabled()


def init_at_hqq3(page, expect) -> float:
    """With the tiny model typed in the Setup (run_across_bits): choose HQQ, then 3 bits, and quantize & initialize
    from the page (the Setup's other settings as the first init run left them); the run's base is HQQ 3-bit, and the
    perplexity bars name it where a bitsandbytes run says 4-bit; seconds from the press to the finished run."""
    page.locator("#quantizer").scroll_into_view_if_needed()
    page.get_by_label("HQQ", exact=True).check()
    expect(page.locator("#quant-type input").first).to_be_disabled(timeout=ms(10_000))  # NF4/FP4: bitsandbytes only
    bits = page.locator("#bits input")
    bits.click()
    bits.fill("3")
    bits.press("Enter")
    expect(bits).to_have_value("3")
    page.keyboard.press("Escape")  # the option list closed (and faded out) before the screenshot
    page.wait_for_timeout(500)
    page.locator("#quantizer").locator("xpath=..").screenshot(path=str(SHOTS / "browser-7-quantizer-hqq3.png"))
    start = time.time()
    page.locator("#start-init").click()
    expect(page.locator("#init-status")).to_contain_text("running", timeout=ms(30_000))
    expect(page.locator("#init-progress")).to_contain_text("quantize to HQQ 3-bit", timeout=ms(30_000))
    expect(page.locator("#init-status")).to_contain_text("finished", timeout=ms(180_000))
    seconds = time.time() - start
    for plot in ("#ppl-plot", "#layer-plot"):  # the legends name the base where a bitsandbytes run says 4-bit
        expect(page.locator(plot)).to_contain_text("HQQ 3-bit + SVD", timeout=ms(10_000))
        expect(page.locator(plot)).not_to_contain_text("4-bit +")
    expect(page.locator("#summary")).to_contain_text("HQQ 3-bit, no correction", timeout=ms(10_000))
    page.locator("#ppl-plot").scroll_into_view_if_needed()
    page.screenshot(path=str(SHOTS / "browser-7-init-hqq3.png"))
    no_text_overlaps(page, "the HQQ 3-bit init run at 1400 px", plots=4)
    return seconds


def test_init_then_finetune_in_the_browser(app_url, tiny_model_dir):
    from playwright.sync_api import expect, sync_playwright

    SHOTS.mkdir(exist_ok=True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=ARGS)
        page = browser.new_page(viewport={"width": 900, "height": 1000})
        page.goto(app_url, wait_until="load")
        expect(page.locator("#start-init")).to_be_visible(timeout=ms(30_000))

        # the first visit shows the shipped example run at once: nothing pressed, nothing computed (the teaching
        # views' tab open), and section 5 the shipped generate run's continuations and coloured agreement strip
        shipped_example_shown(page, expect)
        quantizer_setting_shown(page, expect)
        shipped_generate_shown(page, expect)
        # no text covers another in any figure shown, on a narrow page (step 2's heatmap and perplexity bars share a
        # row: each gets under 350 px) and on a wide one: the four of steps 2-4, the seven teaching views and section
        # 5's three, then the Across bits tab's shipped frontier (drawn at once, with its reading)
        no_text_overlaps(page, "first visit at 900 px", plots=4 + len(VIEW_IDS) + 3)
        page.screenshot(path=str(SHOTS / "browser-0-first-visit-900.png"), full_page=True)
        page.locator("#generate-section").screenshot(path=str(SHOTS / "browser-0-generate-900.png"))
        shipped_frontier_shown(page, expect)
        frontier_checked(page, 900)
        at_width(page, 1400)  # the frontier's tab is open: laid out again at once
        frontier_checked(page, 1400)
        show_tab(page, "Teaching views")
        no_text_overlaps(page, "first visit at 1400 px", plots=4 + len(VIEW_IDS) + 3)
        page.locator("#generate-section").screenshot(path=str(SHOTS / "browser-0-generate-1400.png"))
        page.evaluate("window.scrollTo(0, 0)")
        page.screenshot(path=str(SHOTS / "browser-0-first-screen.png"))
        page.locator("#example-init").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "browser-0-shipped-init.png"))
        page.locator("#example-train").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "browser-0-shipped-train.png"))
        page.screenshot(path=str(SHOTS / "browser-0-first-visit.png"), full_page=True)

        # the live runs on the tiny model (the embedded SmolLM2's own runs are the shipped ones drawn above, and
        # tests/test_embedded_integration.py runs its init flow): small settings, 4 x 128 calibration tokens, 512
        # held-out tokens, svd + quailora on q_proj and v_proj
        choose_model(page, tiny_model_dir)
        set_number(page, "calibration sequences", 4)
        set_number(page, "tokens per sequence", 128)
        set_number(page, "held-out tokens for perplexity", 512)
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
        set_number(page, "QuAILoRA ALS rounds", 5)
        page.screenshot(path=str(SHOTS / "browser-1-setup.png"))

        start = time.time()
        page.locator("#start-init").click()
        expect(page.locator("#init-status")).to_contain_text("running", timeout=ms(30_000))
        expect(page.locator("#example-init")).to_be_hidden(timeout=ms(10_000))  # the live run replaces the shipped one
        expect(page.locator("#example-headline")).to_be_hidden()
        page.wait_for_function(LIVE_LAYERS, timeout=ms(240_000))
        page.locator("#layer-plot").screenshot(path=str(SHOTS / "browser-2-calibrating.png"))
        expect(page.locator("#init-status")).to_contain_text("finished", timeout=ms(300_000))
        init_seconds = time.time() - start
        expect(page.locator("#ppl-plot .js-plotly-plot g.trace.bars")).to_have_count(5, timeout=ms(10_000))
        expect(page.locator("#summary")).to_contain_text("QuAILoRA", timeout=ms(10_000))
        page.locator("#layer-plot").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "browser-3-init-done.png"))
        no_text_overlaps(page, "the live init run at 1400 px", plots=4)

        # generate from that init run (the session's latest, the default): the continuations stream in
        generate_seconds = generate_live(page, expect)

        # teaching views of the default layer (8 x 128 calibration tokens, ranks 1..32), then the method page
        page.get_by_role("tab", name="Teaching views").click()
        expect(page.locator("#view-layer input")).to_have_value(re.compile("default"), timeout=ms(10_000))
        start = time.time()
        page.locator("#start-views").click()
        expect(page.locator("#example-views")).to_be_hidden(timeout=ms(10_000))  # the live views replace the shipped
        expect(page.locator("#views-status")).to_contain_text("finished", timeout=ms(180_000))
        views_seconds = time.time() - start
        for key in VIEW_IDS:
            page.wait_for_selector(f"#view-{key} .js-plotly-plot g.trace", state="attached", timeout=ms(20_000))
        expect(page.locator("#precision-table")).to_contain_text("NF4 + double quant", timeout=ms(10_000))
        page.locator("#tab-views").screenshot(path=str(SHOTS / "browser-views.png"))
        no_text_overlaps(page, "the teaching views at 1400 px", "#tab-views", plots=7)
        page.get_by_role("tab", name="How it works").click()
        expect(page.locator("#how-it-works .katex").first).to_be_visible(timeout=ms(10_000))
        page.locator("#tab-how").screenshot(path=str(SHOTS / "browser-how.png"))
        page.get_by_role("tab", name="Across models").click()
        page.wait_for_selector("#harm-gain-plot .js-plotly-plot", state="attached", timeout=ms(10_000))
        expect(page.locator("#harm-gain-source")).to_contain_text("bench.paper_table", timeout=ms(10_000))
        page.locator("#tab-harm-gain").screenshot(path=str(SHOTS / "browser-harm-gain.png"))
        no_text_overlaps(page, "the across-models scatter at 1400 px", "#tab-harm-gain")

        # fine-tune two arms (the tiny model's steps take milliseconds: enough of them that the run is still going
        # when the curves gain their second points, then stopped)
        page.get_by_label("8-bit QLoRA", exact=True).uncheck()
        set_number(page, "steps", 2000)
        set_number(page, "batch (sequences per step)", 1)
        set_number(page, "evaluate every (steps)", 20)
        expect(page.locator("#start-from-init input")).to_be_checked()  # the default: from the init run above
        start = time.time()
        page.locator("#live-train").click()  # "Compute it live" beside the shipped curves presses Start fine-tuning
        expect(page.locator(".toast-body").filter(has_text="starts from init run")).to_be_visible(timeout=ms(30_000))
        expect(page.locator("#train-status")).to_contain_text(re.compile("running|queued"), timeout=ms(30_000))
        expect(page.locator("#example-train")).to_be_hidden(timeout=ms(10_000))
        page.wait_for_function(LIVE_CURVES, timeout=ms(30_000))
        # the left panel (validation perplexity) first shows step 0 of both arms (the init run's perplexities: no
        # second calibration), then gains the step-20 points
        page.wait_for_function(f"() => document.querySelectorAll('{VAL_POINTS}').length >= 2", timeout=ms(120_000))
        first_point_seconds = time.time() - start
        first = page.locator(VAL_POINTS).count()
        page.wait_for_function(f"() => document.querySelectorAll('{VAL_POINTS}').length > {first}", timeout=ms(180_000))
        assert page.locator(VAL_POINTS).count() > first
        page.locator("#curves-plot").scroll_into_view_if_needed()
        page.screenshot(path=str(SHOTS / "browser-4-training.png"))
        page.locator("#stop-train").click()
        expect(page.locator("#train-status")).to_contain_text(re.compile("stopp|finished"), timeout=ms(120_000))
        expect(page.locator("#train-status")).to_contain_text(re.compile("stopped|finished"), timeout=ms(120_000))
        page.screenshot(path=str(SHOTS / "browser-5-stopped.png"))

        # a reopened page re-attaches to this browser's jobs (owner key in localStorage) and redraws them
        page.reload(wait_until="load")
        expect(page.locator("#init-status")).to_contain_text("finished", timeout=ms(30_000))
        expect(page.locator("#train-status")).to_contain_text(re.compile("stopped|finished"), timeout=ms(30_000))
        expect(page.locator("#example-init")).to_be_hidden(timeout=ms(10_000))
        expect(page.locator("#example-train")).to_be_hidden(timeout=ms(10_000))
        page.wait_for_function(LIVE_LAYERS, timeout=ms(30_000))
        page.wait_for_function(LIVE_CURVES, timeout=ms(30_000))
        page.wait_for_selector(VAL_POINTS, timeout=ms(30_000))

        # across bits on the tiny model (HQQ 2, 3 and 4-bit, the closed form, a few seconds): the live frontier
        # replaces the shipped one, its reading and table follow, and the across-models scatter gains its bit widths
        bits_seconds = run_across_bits(page, expect, tiny_model_dir)
        hqq_seconds = init_at_hqq3(page, expect)
        browser.close()
    print(f"init flow in the browser: {init_seconds:.0f} s, teaching views: {views_seconds:.0f} s, fine-tuning from "
          f"the init run: first curve points after {first_point_seconds:.0f} s, across bits on the tiny model: "
          f"{bits_seconds:.0f} s, init of the tiny model at HQQ 3-bit: {hqq_seconds:.0f} s, generate from the live "
          f"init run: {generate_seconds:.0f} s; text-overlap checks and "
          f"width changes: {CHECK_SECONDS[0]:.1f} s")
