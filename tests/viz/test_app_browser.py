"""End to end in a real browser: ``sparsecircuits viz`` serves the dashboard for a tiny pruned
circuit and headless Chromium (the system's, driven by Playwright) picks a task, clicks a node,
reads the inspector and runs the playground; and the ``export-html`` page renders offline.

Screenshots go to the test's tmp directory and to ``test-artifacts/viz/`` (gitignored); the
circuit page's render time and the node-click update time are printed (not asserted).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

from sparsecircuits.circuits.schema import load_circuit

pytestmark = pytest.mark.slow

ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts" / "viz"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
PROMPT = "def load(path):\n    with open(path) as f:\n        data = json.load(f)\n    return data["
STATE = "document.querySelector('[data-testid=stApp]')?.getAttribute('data-test-script-state')"
IDLE_JS = f"() => {STATE} === 'notRunning'"


def _need_browser():
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        pytest.skip("Playwright is not installed (pip install playwright; CI installs it)")
    if not Path(CHROMIUM).exists():
        pytest.skip(
            "no Chromium: apt-get install chromium (CI installs it); never playwright install"
        )
    return sync_playwright


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "sparsecircuits.cli", *args]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def browser():
    sync_playwright = _need_browser()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, headless=True)
        yield b
        b.close()


@pytest.fixture(scope="module")
def shots(tmp_path_factory):
    """save(page, name): a screenshot in the tmp dir, copied to test-artifacts/viz/."""
    out = tmp_path_factory.mktemp("viz_shots")
    ARTIFACTS.mkdir(parents=True, exist_ok=True)

    def save(page, name: str) -> Path:
        path = out / f"{name}.png"
        page.screenshot(path=str(path))
        shutil.copy(path, ARTIFACTS / path.name)
        return path

    return save


@pytest.fixture(scope="module")
def server(viz_circuit_dir, tmp_path_factory):
    """``sparsecircuits viz CIRCUIT_DIR --port P --headless`` as a real subprocess."""
    _need_browser()
    port = _free_port()
    log = tmp_path_factory.mktemp("viz_server") / "server.log"
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = _cli("viz", str(viz_circuit_dir), "--port", str(port), "--headless")
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            if proc.poll() is not None:
                pytest.fail(f"viz exited with {proc.returncode}:\n{log.read_text()}")
            try:
                with urllib.request.urlopen(base + "/_stcore/health", timeout=2) as r:
                    if r.read().strip() == b"ok":
                        break
            except OSError:
                pass
            if time.monotonic() > deadline:
                pytest.fail(f"no health answer from {base} in 120 s:\n{log.read_text()}")
            time.sleep(0.3)
        yield base
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the CLI and its streamlit child
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
    assert f"127.0.0.1:{port}" in log.read_text()  # the CLI printed the URL


def _idle(page, timeout: float = 120_000) -> None:
    """Wait until the app's script has finished its run (and the page has settled)."""
    page.wait_for_timeout(300)
    page.wait_for_function(IDLE_JS, timeout=timeout)
    page.wait_for_timeout(200)


def _shown(page, selector: str, timeout: float = 120_000) -> None:
    """Wait until ``selector`` is on the page and the script is idle (for timings)."""
    page.wait_for_function(
        f"() => document.querySelector({json.dumps(selector)}) && {STATE} === 'notRunning'",
        timeout=timeout,
    )


def _to_top(page) -> None:
    """Scroll the app's main area back to its top."""
    page.locator("[data-testid='stMain'] h1").first.evaluate(
        "e => { for (; e; e = e.parentElement) if (e.scrollTop > 0) e.scrollTop = 0; }"
    )
    page.wait_for_timeout(300)


def _no_exception(page) -> None:
    errors = page.locator('[data-testid="stException"]')
    assert errors.count() == 0, errors.first.inner_text()


def _choose(page, key: str, option: str) -> None:
    """Pick ``option`` in the select box with widget key ``key``."""
    page.locator(f".st-key-{key} [role='combobox']").click()
    page.get_by_role("option", name=option, exact=False).first.click()
    _idle(page)


def test_dashboard_in_a_browser(server, browser, shots, viz_circuit_dir):
    doc = load_circuit(viz_circuit_dir)
    page = browser.new_page(viewport={"width": 1400, "height": 1300})
    t0 = time.perf_counter()
    page.goto(server)
    _shown(page, ".st-key-layer_chart .main-svg")
    render_s = time.perf_counter() - t0
    _idle(page)
    _no_exception(page)
    shots(page, "01-circuit-layer")

    _choose(page, "pick_task", doc.task)  # pick the task (the fixture has one)
    assert page.locator(".st-key-pick_task [role='combobox']").input_value() == doc.task

    # Click a node of the layer figure; fall back to the select box if the click is lost.
    points = page.locator(".st-key-layer_chart .scatterlayer .trace .points path")
    assert points.count() > 0
    box = points.nth(points.count() // 2).bounding_box()
    t0 = time.perf_counter()
    page.mouse.click(box["x"] + box["width"] / 2, box["y"] + box["height"] / 2)
    heading = page.locator(".st-key-inspector h3")
    try:
        _shown(page, ".st-key-inspector h3", timeout=30_000)
        how = "click"
    except Exception:
        _choose(page, "node_pick", doc.nodes[0].id)
        _shown(page, ".st-key-inspector h3", timeout=30_000)
        how = "fallback select box"
    click_s = time.perf_counter() - t0
    _idle(page)
    _no_exception(page)
    node_id = heading.inner_text().removeprefix("Node ").strip()
    assert node_id in {n.id for n in doc.nodes}
    inspector = page.locator(".st-key-inspector")
    n_in = sum(e.dst == node_id for e in doc.edges)
    n_out = sum(e.src == node_id for e in doc.edges)
    assert f"{n_in} in, {n_out} out" in inspector.inner_text()
    if n_in + n_out:  # the edge table: a header row and one row per edge with its weight
        table = inspector.locator("table.sc-table").first
        assert table.locator("tr").count() == n_in + n_out + 1
        assert table.locator("td.num").count() == n_in + n_out
    assert "activating snippets" in inspector.inner_text()
    assert inspector.locator(".sc-tokens span[title]").count() > 0  # snippet token heatmaps
    assert "On the task" in inspector.inner_text()
    page.set_viewport_size({"width": 1400, "height": 2400})  # the whole inspector
    page.locator(".st-key-node_pick").evaluate("e => e.scrollIntoView({block: 'start'})")
    page.wait_for_timeout(500)
    shots(page, "02-node-inspector")
    page.set_viewport_size({"width": 1400, "height": 1300})

    page.get_by_text("Whole circuit", exact=True).click()
    page.wait_for_selector(".st-key-graph_chart .main-svg", timeout=60_000)
    _idle(page)
    _no_exception(page)
    _to_top(page)
    shots(page, "03-whole-circuit")

    page.get_by_text("Playground", exact=True).click()
    area = page.locator(".st-key-pg_text textarea")
    area.wait_for(timeout=120_000)
    _idle(page)
    area.fill(PROMPT)
    ablate = max(doc.nodes, key=lambda n: abs(n.delta or 0.0)).id  # the most important node
    page.locator(".st-key-pg_nodes input").fill(ablate)
    page.get_by_role("option", name=ablate, exact=True).click()
    page.keyboard.press("Escape")
    page.get_by_role("button", name="Run").click()
    page.wait_for_selector(".st-key-pg_heatmap .js-plotly-plot", timeout=120_000)
    _idle(page)
    _no_exception(page)
    text = page.locator("[data-testid='stMain']").inner_text()
    assert "1 node(s) ablated" in text and "Next token, clean" in text
    assert "logit A − logit B" in text
    _to_top(page)
    shots(page, "04-playground")

    # A second visit in the same browser context: Streamlit's and plotly's scripts come from
    # the HTTP cache, as for a user who comes back to the dashboard (the first visit above
    # also fetched and compiled them; the app's own script run is ~0.1 s of either).
    context = browser.new_context(viewport={"width": 1400, "height": 1300})
    revisit_s = 0.0
    for _ in range(2):  # the first visit fills this context's cache, the second is timed
        page2 = context.new_page()
        t0 = time.perf_counter()
        page2.goto(server)
        _shown(page2, ".st-key-layer_chart .main-svg")
        revisit_s = time.perf_counter() - t0
        page2.close()
    context.close()

    timings = {
        "circuit_page_render_s": round(render_s, 2),
        "circuit_page_revisit_s": round(revisit_s, 2),
        "node_click_update_s": round(click_s, 2),
    }
    (ARTIFACTS / "timings.json").write_text(json.dumps({**timings, "node_selected_by": how}))
    print(f"\nviz timings: {timings} (node selected by {how})")
    page.close()


def test_export_html_offline(browser, shots, viz_circuit_dir, tmp_path):
    helped = subprocess.run(_cli("export-html", "--help"), capture_output=True, text=True)
    if helped.returncode != 0:
        pytest.skip("no `sparsecircuits export-html` command yet")
    out = tmp_path / "circuit.html"
    done = subprocess.run(
        _cli("export-html", str(viz_circuit_dir), "--out", str(out)),
        capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert done.returncode == 0, done.stderr
    context = browser.new_context(offline=True, viewport={"width": 1400, "height": 1200})
    blocked: list[str] = []

    def only_files(route) -> None:
        if route.request.url.startswith("file://"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    context.route("**/*", only_files)
    page = context.new_page()
    page.goto(out.as_uri())
    page.wait_for_selector(".plotly .main-svg, .main-svg", timeout=60_000)
    assert page.locator(".main-svg").count() > 0
    assert page.locator(".scatterlayer .points path").count() > 0  # nodes were drawn
    shots(page, "05-export-html-offline")
    context.close()
    assert blocked == [], f"the exported page asked the network for {blocked}"
