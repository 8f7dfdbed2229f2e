"""End to end in a real browser: the model server (``create_app`` with the planted model's real
circuit monitor, uvicorn on loopback in a thread) answers one completion; the dashboard
(``sparsecircuits viz CIRCUITS --server URL --catalog CAT``, a subprocess) opens the Monitor
page in headless Chromium, loads that request's telemetry by id, shows the decision and the
family, and a family's button switches the pickers to its circuit.

The screenshot goes to the test's tmp directory and ``test-artifacts/viz/monitor.png``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.request

import pytest

from sparsecircuits.circuits import testing as T
from tests.monitor.conftest import (  # noqa: F401 (fixtures)
    _planted_tasks,
    catalog,
    catalog_dir,
    circuit_dirs,
    families_file,
    planted,
)
from tests.viz.test_app_browser import (  # noqa: F401 (fixtures and helpers)
    _cli,
    _free_port,
    _idle,
    _need_browser,
    _no_exception,
    browser,
    shots,
)

pytestmark = pytest.mark.slow

PROMPT = 'x = "ab'


def _wait_http(url: str, ok, *, timeout: float, proc: subprocess.Popen | None = None) -> None:
    """Poll ``url`` (a loopback server this test started) until ``ok(body)``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the process exited with {proc.returncode}")
        try:
            with urllib.request.urlopen(url, timeout=2) as r:
                if ok(r.read()):
                    return
        except OSError:
            pass
        time.sleep(0.3)
    raise TimeoutError(f"no answer from {url} in {timeout:.0f} s")


@pytest.fixture(scope="module")
def model_server(planted, catalog, catalog_dir, tmp_path_factory):  # noqa: F811
    """The served planted model with its catalogue, a baseline and a policy whose one rule
    (action log) fires on the first token above the benign median."""
    import uvicorn

    from sparsecircuits.interop.download import file_sha256
    from sparsecircuits.monitor.calibrate import calibrate, save_baseline
    from sparsecircuits.monitor.catalog import CATALOG_FILE
    from sparsecircuits.serve.app import create_app
    from sparsecircuits.serve.launch import monitor_factory

    _need_browser()
    d = tmp_path_factory.mktemp("monitor_served")
    sha = file_sha256(catalog_dir / CATALOG_FILE)
    save_baseline(calibrate(planted.model, planted.tokenizer, catalog, catalog_sha256=sha,
                            windows=3), d / "baseline.json")  # fmt: skip
    family = catalog.monitored()[0]
    policy = d / "policy.yaml"
    policy.write_text(f"version: 1\nrules:\n  - name: {family}-log\n    family: {family}\n"
                      "    action: log\n    z: 0.000001\n    k: 1\n    n: 1\n")  # fmt: skip
    factory = monitor_factory(planted.model, catalog=catalog_dir, policy=policy,
                               baseline=d / "baseline.json")  # fmt: skip
    app = create_app(planted.model, planted.tokenizer, factory=factory, model_name="planted",
                     timeout_s=60)  # fmt: skip
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    base = f"http://127.0.0.1:{port}"
    try:
        _wait_http(base + "/healthz", lambda b: json.loads(b)["status"] == "ok", timeout=60)
        yield base, family
    finally:
        server.should_exit = True
        thread.join(timeout=15)


@pytest.fixture(scope="module")
def dashboard(model_server, circuit_dirs, catalog_dir, tmp_path_factory):  # noqa: F811
    """``sparsecircuits viz`` on the catalogue's circuits, reading telemetry from the server."""
    base, _ = model_server
    port = _free_port()
    root = next(iter(circuit_dirs.values())).parent  # holds one directory per task
    log = tmp_path_factory.mktemp("monitor_viz") / "viz.log"
    cmd = _cli("viz", str(root), "--port", str(port), "--headless", "--server", base,
               "--catalog", str(catalog_dir))  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    with log.open("w") as fh:
        proc = subprocess.Popen(cmd, stdout=fh, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        try:
            _wait_http(url + "/_stcore/health", lambda b: b.strip() == b"ok", timeout=120,
                       proc=proc)  # fmt: skip
        except (RuntimeError, TimeoutError) as err:
            pytest.fail(f"{err}:\n{log.read_text()}")
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)  # the CLI and its streamlit child
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


def _complete(base: str) -> dict:
    body = json.dumps({"prompt": PROMPT, "max_tokens": 4, "temperature": 0}).encode()
    req = urllib.request.Request(base + "/v1/completions", data=body,
                                 headers={"content-type": "application/json"})  # fmt: skip
    with urllib.request.urlopen(req, timeout=60) as r:
        return json.loads(r.read())


def test_monitor_page_on_a_served_request(model_server, dashboard, browser, shots, planted):  # noqa: F811
    base, family = model_server
    tok = planted.tokenizer
    first = repr(tok.decode(tok.encode(PROMPT)[:1]))[1:-1].strip()
    answer = _complete(base)
    rid, decision = answer["id"], answer["choices"][0]["decision"]
    assert decision["action"] == "log" and decision["family"] == family, decision

    page = browser.new_page(viewport={"width": 1400, "height": 1900})
    try:
        page.goto(dashboard)
        page.wait_for_selector("[data-testid='stSidebar']", timeout=120_000)
        _idle(page)
        page.locator("[data-testid='stSidebar']").get_by_text("Monitor", exact=True).click()
        box = page.locator(".st-key-mon_request_id input")
        box.wait_for(timeout=60_000)
        _idle(page)
        box.fill(rid)
        page.get_by_role("button", name="Load telemetry").click()
        page.wait_for_selector(".st-key-mon_heatmap .js-plotly-plot", timeout=60_000)
        _idle(page)
        _no_exception(page)
        main = page.locator("[data-testid='stMain']")
        text = main.inner_text()
        assert rid in text and "log" in text and f"{family}-log" in text
        assert family in text and decision["policy_sha256"][:8] in text
        assert main.locator(".st-key-mon_heatmap .heatmaplayer .hm").count()
        # The operator's prompt text labels the prompt's tokens (the same tokenizer: no note).
        page.get_by_text("Token texts (optional", exact=False).click()
        area = page.locator(".st-key-mon_prompt textarea")
        area.fill(PROMPT)
        area.press("Control+Enter")
        _idle(page)
        _no_exception(page)
        assert "Token texts:" not in main.inner_text()  # the counts matched
        ticks = main.locator(".st-key-mon_heatmap .xtick text").all_text_contents()  # SVG text
        assert ticks[0].strip() == first and ticks[-1] == "g3", ticks
        page.locator(".st-key-mon_heatmap").scroll_into_view_if_needed()
        shot = shots(page, "monitor")
        assert shot.stat().st_size > 10_000

        # The family's admitted circuit is in the dashboard's list: its button opens it.
        page.locator(f".st-key-mon_open_{family}_{T.TASK} button").click()
        page.wait_for_selector(".st-key-pick_task [role='combobox']", timeout=60_000)
        _idle(page)
        picked = page.locator(".st-key-pick_task [role='combobox']").input_value()
        assert picked == T.TASK
        assert page.locator("[data-testid='stSidebar'] input[type='radio']:checked").count()
    finally:
        page.close()


def test_an_unknown_request_id_is_a_one_line_error(model_server, dashboard, browser):  # noqa: F811
    page = browser.new_page(viewport={"width": 1400, "height": 1000})
    try:
        page.goto(dashboard)
        page.wait_for_selector("[data-testid='stSidebar']", timeout=120_000)
        _idle(page)
        page.locator("[data-testid='stSidebar']").get_by_text("Monitor", exact=True).click()
        box = page.locator(".st-key-mon_request_id input")
        box.wait_for(timeout=60_000)
        box.fill("cmpl-does-not-exist")
        page.get_by_role("button", name="Load telemetry").click()
        page.wait_for_selector("[data-testid='stAlertContentError']", timeout=60_000)
        _idle(page)
        assert "HTTP 404" in page.locator("[data-testid='stAlertContentError']").inner_text()
    finally:
        page.close()
