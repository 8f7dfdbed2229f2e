"""Starting the Streamlit dashboard (``sparsecircuits viz``) as a child process."""

from __future__ import annotations

import importlib.util
import logging
import signal
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from sparsecircuits.errors import InputError

log = logging.getLogger(__name__)

APP = Path(__file__).with_name("app.py")
HEALTH = "/_stcore/health"


def streamlit_command(
    *,
    port: int,
    host: str = "127.0.0.1",
    target: str | None = None,
    runs_dir: str | Path = "runs",
    model: str | None = None,
    server: str | None = None,
    catalog: str | Path | None = None,
) -> list[str]:
    """The ``streamlit run`` command line of the dashboard (the app's arguments after ``--``;
    ``server``/``catalog``: the Monitor page's model server and its catalogue)."""
    app_args = [] if target is None else [str(target)]
    app_args += ["--runs-dir", str(Path(runs_dir).resolve())]
    if model is not None:
        app_args += ["--model", model]
    if server is not None:
        app_args += ["--server", server]
    if catalog is not None:
        app_args += ["--catalog", str(Path(catalog).resolve())]
    return [
        sys.executable,
        "-m",
        "streamlit",
        "run",
        str(APP),
        "--server.port",
        str(port),
        "--server.headless",
        "true",
        "--server.address",
        host,
        "--browser.gatherUsageStats",
        "false",
        "--server.fileWatcherType",
        "none",
        "--client.toolbarMode",
        "viewer",
        "--",
        *app_args,
    ]


def check_installed() -> None:
    """Raise InputError unless Streamlit and Plotly are importable."""
    missing = [m for m in ("streamlit", "plotly") if importlib.util.find_spec(m) is None]
    if missing:
        raise InputError(
            f"the dashboard needs {' and '.join(missing)}: pip install 'sparsecircuits[viz]'"
        )


def url(host: str, port: int) -> str:
    return f"http://{host}:{port}"


def wait_healthy(base: str, *, timeout: float = 60.0, proc: subprocess.Popen | None = None) -> bool:
    """Poll the server's health endpoint until it answers "ok" (False on timeout or exit).
    ``base`` is the Streamlit server this process just started on this machine: a local
    readiness check, never a download."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            return False
        try:
            with urllib.request.urlopen(base + HEALTH, timeout=2) as resp:  # loopback
                if resp.status == 200:
                    return True
        except (urllib.error.URLError, OSError):
            pass
        time.sleep(0.25)
    return False


def run(cmd: list[str], *, base: str, open_browser: bool) -> int:
    """Run the server until it exits or we are interrupted; returns its exit status."""
    log.debug("starting %s", " ".join(cmd))
    proc = subprocess.Popen(cmd)

    def stop(signum: int, frame: object) -> None:
        del signum, frame
        proc.terminate()

    previous = signal.signal(signal.SIGTERM, stop)
    try:
        if open_browser and wait_healthy(base, proc=proc):
            import webbrowser

            webbrowser.open(base)
        return proc.wait()
    except KeyboardInterrupt:
        proc.terminate()
        try:
            return proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait()
    finally:
        signal.signal(signal.SIGTERM, previous)
        if proc.poll() is None:
            proc.terminate()
