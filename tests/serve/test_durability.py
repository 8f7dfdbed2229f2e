"""The durability promise at the HTTP level: a response (a stream's last event) leaves only
after its completion record is on disk. The fsync is held back; the response must wait."""

from __future__ import annotations

import asyncio
import json
import threading
from pathlib import Path

import httpx
import pytest

from sparsecircuits.audit.log import AuditLog
from sparsecircuits.audit.signing import Signer
from sparsecircuits.serve.app import create_app
from sparsecircuits.serve.auditing import Auditor, AuditSettings

URL = "/v1/completions"


@pytest.fixture()
def held_fsync(monkeypatch):
    """Every fsync of the audit log waits for ``gate`` (open until the test clears it);
    ``calls`` counts them."""
    gate, calls = threading.Event(), []
    gate.set()
    real = AuditLog._fsync

    def held(self, gen, target):
        calls.append(target)
        gate.wait(10)
        real(self, gen, target)

    monkeypatch.setattr(AuditLog, "_fsync", held)
    yield gate, calls
    gate.set()


@pytest.mark.parametrize("stream", [False, True])
def test_the_response_waits_for_its_record_on_disk(model, tokenizer, tmp_path: Path,
                                                    held_fsync, stream: bool):  # fmt: skip
    gate, calls = held_fsync
    auditor = Auditor(AuditSettings(tmp_path, Signer.generate()), manifest={})
    gate.clear()  # the open record went through; from here every fsync is held
    app = create_app(model, tokenizer, auditor=auditor)
    body = {"prompt": "def f(x):\n", "max_tokens": 4, "temperature": 0, "stream": stream}

    async def main() -> tuple[bool, httpx.Response]:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            task = asyncio.create_task(c.post(URL, json=body))
            await asyncio.sleep(1.0)  # generation takes milliseconds; then the fsync holds
            early = task.done()
            gate.set()
            return early, await task

    early, response = asyncio.run(main())
    auditor.close()
    assert not early, "the response left before its completion record was fsynced"
    assert response.status_code == 200 and calls
    text = response.text
    if stream:
        assert text.rstrip().endswith("data: [DONE]")
    else:
        assert json.loads(text)["choices"][0]["finish_reason"] in ("length", "stop")


def test_control_without_a_held_fsync_the_response_is_prompt(model, tokenizer, tmp_path):
    """The control: nothing held, the same request answers within the second."""
    auditor = Auditor(AuditSettings(tmp_path, Signer.generate()), manifest={})
    app = create_app(model, tokenizer, auditor=auditor)

    async def main() -> bool:
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://t") as c:
            task = asyncio.create_task(c.post(URL, json={"prompt": "x", "max_tokens": 2}))
            await asyncio.sleep(1.0)
            return task.done()

    assert asyncio.run(main())
    auditor.close()
