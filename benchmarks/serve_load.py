"""The server under concurrent load, with and without its audit trail: status codes, requests/s
and p50/p90/p99 latency of ``sparsecircuits serve`` on loopback, what the audit records cost,
and a check of the trail the audited run left.

Starts real server processes (``python -m sparsecircuits.cli serve`` on 127.0.0.1 and a free
port, loopback only): the baseline without ``--audit-dir`` and the audited one with it. Both
stay up for the whole run, but only one is loaded at a time; with ``--rounds R`` the two loads
alternate (baseline first in odd rounds, audited first in even ones) and the medians over rounds
are reported. Each load is ``--requests`` non-streaming ``POST /v1/completions`` from
``--clients`` concurrent clients (asyncio, one ``httpx.AsyncClient`` pool), short Python
prompts drawn from a fixed list with a seeded generator, ``--max-tokens`` new tokens each,
greedy unless ``--temperature`` is set (then every request carries a seed). A load has a hard
time limit (``--time-limit``); the servers are always terminated at the end (their own PIDs).
The server's ``--queue`` is at least the client count, so a full queue (429) should not happen;
429s are counted anyway.

Latency is client-side, per request, from sending to the whole response. With more clients than
model workers most of it is queueing: each request waits for the ones ahead of it, so a cost
added to every request shows up in p50 multiplied by the queue's length. The script prints both
the p50 difference and the difference in server time per request (1 / throughput).

The audit check, on the audited server's trail after it shut down: every 200 response's id has
exactly one ``start`` and one ``complete`` record (over all logs ``w0``, ``w1``, ...), and
``sparsecircuits audit verify`` exits 0. With ``--processes N`` each process writes its own log;
the script checks that there are N and prints how the records are split across them (by
connection: each client's keep-alive connection stays with the process that accepted it, so a
few clients can land on one process).

Last, an in-process micro-measurement of the record itself: ``AuditLog.append`` (canonical JSON,
Ed25519 signature, chain hash, one write) plus ``sync`` (waiting for the commit thread's fsync)
of a completion record shaped like one the audited run wrote, ``--micro-records`` sequential
records, then the same number from ``--micro-threads`` threads at once (group commit: records
finishing together share one fsync; the fsync count is reported).

    python benchmarks/serve_load.py [--quick] [--clients 64] [--requests 2000] [--max-tokens 8]
        [--workers 1] [--processes 1] [--rounds 1] [--skip-baseline] [--out results.json]

Exit status 1 when a check fails (any 5xx or transport error, an acknowledged request without
its records, ``audit verify`` failing, fewer logs than processes).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import random
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Any

import httpx
from _timing import machine

from sparsecircuits.audit.layout import read_records

# A few short, fixed Python snippets (the model was trained on Python's stdlib).
PROMPTS = (
    "def add(a, b):\n    return",
    "import os\n\ndef main():\n",
    "class Stack:\n    def __init__(self):\n        self.items =",
    "for i in range(10):\n    if i % 2 ==",
    "with open(path) as f:\n    data =",
    "try:\n    value = int(text)\nexcept ValueError:\n",
    "def is_empty(self):\n    return len(self.items) ==",
    'if __name__ == "__main__":\n',
)
CHAIN_FIELDS = ("v", "log", "seq", "prev", "time", "kind", "key_id", "sig")  # set by append


def free_port() -> int:
    with socket.socket() as s:  # loopback
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def pct(values: list[float], q: float) -> float:
    """The q-th percentile (0..100), linear between ranks; NaN for no values."""
    if not values:
        return float("nan")
    xs = sorted(values)
    k = (len(xs) - 1) * q / 100
    lo = int(k)
    hi = min(lo + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


# ---------------------------------------------------------------------------- the server
class ServerProcess:
    """``sparsecircuits serve`` on 127.0.0.1 as a child process (log to ``log_path``)."""

    def __init__(self, name: str, args: list[str], *, log_path: Path, processes: int) -> None:
        self.name, self.processes, self.log_path = name, processes, log_path
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        cmd = [sys.executable, "-m", "sparsecircuits.cli", "serve", "--host", "127.0.0.1",
               "--port", str(self.port), "--device", "cpu", "--processes", str(processes),
               *args]  # fmt: skip
        self._log = open(log_path, "wb")  # noqa: SIM115 (closed in stop)
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT)

    def wait_ready(self, timeout: float) -> float:
        """Seconds until ``GET /v1/models`` answers and every process has started."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server {self.name} exited ({self.proc.returncode}):\n"
                                   + self.log_tail())  # fmt: skip
            started = self.log_path.read_text(errors="replace").count(
                "Application startup complete"
            )
            try:
                ok = httpx.get(f"{self.base}/v1/models", timeout=2).status_code == 200  # loopback
            except httpx.HTTPError:
                ok = False
            if ok and started >= self.processes:
                return time.monotonic() - t0
            time.sleep(0.2)
        raise RuntimeError(f"server {self.name} not ready within {timeout} s:\n{self.log_tail()}")

    def log_tail(self, n: int = 20) -> str:
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM (a graceful shutdown: the last checkpoint), then SIGKILL to the PIDs this
        script started (the server and its worker processes) if it does not exit."""
        if self.proc.poll() is None:
            children = _children(self.proc.pid)
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                for pid in children:
                    with suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGKILL)
                self.proc.kill()
                self.proc.wait(10)
        self._log.close()


def _children(pid: int) -> list[int]:
    """The direct children of ``pid`` (uvicorn's worker processes)."""
    out: list[int] = []
    with suppress(OSError):
        for task in os.listdir(f"/proc/{pid}/task"):
            with open(f"/proc/{pid}/task/{task}/children") as f:
                out += [int(x) for x in f.read().split()]
    return out


# ---------------------------------------------------------------------------- the load
async def _drive(
    base: str,
    *,
    clients: int,
    requests: int,
    max_tokens: int,
    temperature: float,
    seed: int,
    request_timeout: float,
    results: list[tuple[Any, float, str | None] | None],
) -> float:
    """``requests`` completions from ``clients`` coroutines sharing one pool, into
    ``results[i]`` as (status code or exception name, seconds, response id); returns the wall
    seconds (an entry stays None when the load is cancelled before it finishes)."""
    rng = random.Random(seed)
    order = [rng.randrange(len(PROMPTS)) for _ in range(requests)]
    todo = iter(range(requests))
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(  # loopback
        base_url=base, limits=limits, timeout=httpx.Timeout(request_timeout)
    ) as client:

        async def one_client() -> None:
            for i in todo:  # the shared iterator hands each index to one client
                body: dict[str, Any] = {"prompt": PROMPTS[order[i]], "max_tokens": max_tokens,
                                        "temperature": temperature}  # fmt: skip
                if temperature > 0:
                    body["seed"] = seed * 1_000_003 + i
                t0 = time.perf_counter()
                try:
                    r = await client.post("/v1/completions", json=body)
                    rid = r.json().get("id") if r.status_code == 200 else None
                    results[i] = (r.status_code, time.perf_counter() - t0, rid)
                except (httpx.HTTPError, ValueError) as exc:
                    results[i] = (type(exc).__name__, time.perf_counter() - t0, None)

        t0 = time.perf_counter()
        await asyncio.gather(*(one_client() for _ in range(clients)))
        return time.perf_counter() - t0


def run_load(server: ServerProcess, args: argparse.Namespace, *, seed: int) -> dict[str, Any]:
    """One load against ``server`` (bounded by ``--time-limit``): counts, throughput, latency."""
    warm: list[tuple[Any, float, str | None] | None] = [None] * 8
    asyncio.run(_drive(server.base, clients=min(args.clients, 4), requests=len(warm),
                       max_tokens=args.max_tokens, temperature=args.temperature,
                       seed=seed + 7919, request_timeout=60, results=warm))  # fmt: skip
    timed_out = False
    out: list[tuple[Any, float, str | None] | None] = [None] * args.requests

    async def bounded() -> float:
        return await asyncio.wait_for(
            _drive(server.base, clients=args.clients, requests=args.requests,
                   max_tokens=args.max_tokens, temperature=args.temperature, seed=seed,
                   request_timeout=args.request_timeout, results=out),
            args.time_limit,
        )  # fmt: skip

    t0 = time.perf_counter()
    try:
        wall = asyncio.run(bounded())
    except TimeoutError:
        timed_out, wall = True, time.perf_counter() - t0
    done = [r for r in out if r is not None]
    codes = Counter(str(r[0]) for r in done)
    lat = [1000 * r[1] for r in done if r[0] == 200]
    ok_ids = [r[2] for r in [*warm, *done] if r is not None and r[0] == 200 and r[2]]
    return {
        "requests": args.requests,
        "answered": len(done),
        "timed_out": timed_out,
        "codes": dict(sorted(codes.items())),
        "n_5xx": sum(n for c, n in codes.items() if c.isdigit() and c.startswith("5")),
        "n_429": codes.get("429", 0),
        "n_transport_errors": sum(n for c, n in codes.items() if not c.isdigit()),
        "wall_s": wall,
        "rps": len(done) / wall if wall > 0 else float("nan"),
        "p50_ms": pct(lat, 50),
        "p90_ms": pct(lat, 90),
        "p99_ms": pct(lat, 99),
        "ok_ids": ok_ids,
    }


# ---------------------------------------------------------------------------- the trail
def audit_write_cost(base: str) -> dict[str, Any]:
    """The server's own timing of its audit writes (``/metrics``, one process): per kind, the
    mean (exact: sum / count) and the p50 interpolated in its histogram's buckets, in ms."""
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(f"{base}/metrics", timeout=30).text  # loopback
    out: dict[str, Any] = {}
    for fam in text_string_to_metric_families(text):
        if fam.name != "sparsecircuits_audit_write_seconds":
            continue
        by: dict[str, dict[str, Any]] = {}
        for s in fam.samples:
            kind = s.labels.get("kind")
            d = by.setdefault(kind, {"buckets": []})
            if s.name.endswith("_bucket"):
                d["buckets"].append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_sum"):
                d["sum"] = s.value
            elif s.name.endswith("_count"):
                d["count"] = s.value
        for kind, d in by.items():
            n = d.get("count", 0)
            if not n:
                continue
            prev_le, prev_c, p50 = 0.0, 0.0, None
            for le, c in sorted(d["buckets"]):
                if c >= n / 2 and p50 is None:
                    frac = (n / 2 - prev_c) / max(c - prev_c, 1e-9)
                    p50 = prev_le + frac * ((le if le != float("inf") else prev_le) - prev_le)
                prev_le, prev_c = le, c
            out[kind] = {"count": int(n), "mean_ms": 1000 * d["sum"] / n, "p50_ms": 1000 * p50}
    return out


def check_trail(trail: Path, ok_ids: list[str]) -> dict[str, Any]:
    """Every acknowledged id has exactly one start and one complete record, over all logs."""
    logs = {k: v for k, v in read_records(trail).items() if v}
    starts: Counter[str] = Counter()
    completes: Counter[str] = Counter()
    outcomes: Counter[str] = Counter()
    per_log = {}
    for name, recs in logs.items():
        kinds = Counter(r.get("kind") for r in recs)
        per_log[name] = dict(sorted(kinds.items()))
        for r in recs:
            if r.get("kind") == "start":
                starts[r["request_id"]] += 1
            elif r.get("kind") == "complete":
                completes[r["request_id"]] += 1
                outcomes[r.get("outcome")] += 1
    bad_complete = [i for i in ok_ids if completes[i] != 1]
    bad_start = [i for i in ok_ids if starts[i] != 1]
    done = [r for recs in logs.values() for r in recs if r.get("kind") == "complete"]
    sample = next((r for r in done if r.get("outcome") == "completed"), None)
    return {
        "acknowledged": len(ok_ids),
        "acknowledged_distinct": len(set(ok_ids)),
        "without_one_complete": len(bad_complete),
        "without_one_start": len(bad_start),
        "examples": (bad_complete + bad_start)[:5],
        "records_per_log": per_log,
        "outcomes": dict(sorted(outcomes.items(), key=str)),
        "sample_complete": sample,
    }


def audit_verify(trail: Path, pubkey: Path) -> dict[str, Any]:
    res = subprocess.run(
        [sys.executable, "-m", "sparsecircuits.cli", "audit", "verify", str(trail),
         "--pubkey", str(pubkey)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    lines = res.stdout.strip().splitlines()
    return {"exit": res.returncode, "stdout": lines, "stderr": res.stderr.strip()[-2000:]}


# ---------------------------------------------------------------------------- micro
@contextmanager
def _count_fsyncs():
    """Count os.fsync calls in this process (the commit thread's and the checkpoints')."""
    real, n = os.fsync, [0]

    def counted(fd: int) -> None:
        n[0] += 1
        real(fd)

    os.fsync = counted
    try:
        yield n
    finally:
        os.fsync = real


def micro(key: Path, root: Path, fields: dict[str, Any], *, records: int, threads: int):
    """``AuditLog.append`` + ``sync`` of ``fields`` as a completion record: sequential, then
    from ``threads`` threads at once, each in a fresh log under ``root``."""
    from sparsecircuits.audit.log import AuditLog
    from sparsecircuits.audit.signing import load_signer

    signer = load_signer(key)
    out: dict[str, Any] = {}
    with _count_fsyncs() as fsyncs:
        alog = AuditLog(root / "micro-seq", signer)
        app, tot = [], []
        for _ in range(records):
            t0 = time.perf_counter()
            seq = alog.append("complete", fields)
            t1 = time.perf_counter()
            alog.sync(seq)
            t2 = time.perf_counter()
            app.append(1000 * (t1 - t0))
            tot.append(1000 * (t2 - t0))
        alog.close()
        out["sequential"] = {
            "records": records,
            "append_p50_ms": pct(app, 50),
            "append_p99_ms": pct(app, 99),
            "p50_ms": pct(tot, 50),
            "p99_ms": pct(tot, 99),
            "records_per_s": records / (sum(tot) / 1000),
            "fsyncs": fsyncs[0],
        }
    with _count_fsyncs() as fsyncs:
        alog = AuditLog(root / "micro-threads", signer)
        lat: list[float] = []
        mu = threading.Lock()
        per = max(1, records // threads)
        gate = threading.Barrier(threads)

        def work() -> None:
            mine = []
            gate.wait()
            for _ in range(per):
                t0 = time.perf_counter()
                alog.sync(alog.append("complete", fields))
                mine.append(1000 * (time.perf_counter() - t0))
            with mu:
                lat.extend(mine)

        pool = [threading.Thread(target=work) for _ in range(threads)]
        t0 = time.perf_counter()
        for t in pool:
            t.start()
        for t in pool:
            t.join()
        wall = time.perf_counter() - t0
        alog.close()
        out["threads"] = {
            "threads": threads,
            "records": len(lat),
            "p50_ms": pct(lat, 50),
            "p99_ms": pct(lat, 99),
            "records_per_s": len(lat) / wall,
            "fsyncs": fsyncs[0],
        }
    return out


def _fallback_fields() -> dict[str, Any]:
    """A completion record's fields when the run left none to copy (same shape)."""
    return {
        "request_id": "cmpl-" + "0" * 32, "model": "stdlib-sparse", "outcome": "completed",
        "finish_reason": "length", "prompt_tokens": 8, "completion_tokens": 8,
        "decision": {"action": "allow", "at_token": None, "family": None,
                     "policy_sha256": "0" * 64, "reason": "", "rule": None},
        "weights_hash": "0" * 64, "api_key_id": None,
        "scores": {"families": {}, "causal_share": None},
        "mitigation": {"dampened_families": [], "stopped": False},
        "replay": {"seed": 1234567890123, "torch": "2", "threads": 2, "kernel_backend": "cpp",
                   "kernel_build": "0" * 12, "batching": "none"},
        "output_sha256": "0" * 64,
    }  # fmt: skip


# ---------------------------------------------------------------------------- main
def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="stdlib-sparse")
    ap.add_argument("--quick", action="store_true", help="8 clients, 100 requests")
    ap.add_argument("--clients", type=int, default=None, help="concurrent clients (64)")
    ap.add_argument("--requests", type=int, default=None, help="requests per load (2000)")
    ap.add_argument("--max-tokens", type=int, default=8)
    ap.add_argument("--temperature", type=float, default=0.0, help="0: greedy; else seeded")
    ap.add_argument("--workers", type=int, default=1, help="the server's model threads")
    ap.add_argument("--processes", type=int, default=1, help="server processes (own logs)")
    ap.add_argument("--queue", type=int, default=None, help="server queue (default: clients)")
    ap.add_argument("--rounds", type=int, default=1, help="alternating loads per variant")
    ap.add_argument("--skip-baseline", action="store_true", help="the audited server only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--time-limit", type=float, default=600.0, help="seconds per load (hard)")
    ap.add_argument("--request-timeout", type=float, default=120.0)
    ap.add_argument("--ready-timeout", type=float, default=180.0)
    ap.add_argument("--micro-records", type=int, default=500)
    ap.add_argument("--micro-threads", type=int, default=8)
    ap.add_argument("--tmp", type=Path, default=None, help="where the trail goes (its disk)")
    ap.add_argument("--keep", action="store_true", help="keep the trail and server logs")
    ap.add_argument("--out", type=Path, help="write the results as JSON here")
    args = ap.parse_args()
    args.clients = args.clients or (8 if args.quick else 64)
    args.requests = args.requests or (100 if args.quick else 2000)
    queue = args.queue if args.queue is not None else args.clients
    if min(args.clients, args.requests, args.max_tokens, args.workers, args.processes,
           args.rounds, args.micro_records, args.micro_threads) < 1:  # fmt: skip
        raise SystemExit("counts must be >= 1")

    work = Path(tempfile.mkdtemp(prefix="sc-bench-load-", dir=args.tmp))
    from sparsecircuits.audit.signing import keygen

    key, pub, _ = keygen(work / "keys")
    trail = work / "audit"
    common = ["--workers", str(args.workers), "--queue", str(queue), args.model]
    variants = {"audited": ["--audit-dir", str(trail), "--audit-key", str(key)]}
    if not args.skip_baseline:
        variants = {"baseline": [], **variants}
    servers: dict[str, ServerProcess] = {}
    loads: dict[str, list[dict[str, Any]]] = {v: [] for v in variants}
    ready: dict[str, float] = {}
    try:
        for name, extra in variants.items():
            servers[name] = ServerProcess(name, [*extra, *common],
                                          log_path=work / f"server-{name}.log",
                                          processes=args.processes)  # fmt: skip
        for name, srv in servers.items():
            ready[name] = srv.wait_ready(args.ready_timeout)
        names = list(servers)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                loads[name].append(run_load(servers[name], args, seed=args.seed + r))
        served_cost = audit_write_cost(servers["audited"].base)
    finally:
        for srv in servers.values():
            srv.stop()

    summary: dict[str, dict[str, Any]] = {}
    for name, runs in loads.items():
        codes: Counter[str] = Counter()
        for run in runs:
            codes.update(run["codes"])
        med = {k: statistics.median(run[k] for run in runs) for k in ("rps", "p50_ms", "p90_ms",
                                                                      "p99_ms")}  # fmt: skip
        summary[name] = {
            "codes": dict(sorted(codes.items())),
            "n_5xx": sum(run["n_5xx"] for run in runs),
            "n_429": sum(run["n_429"] for run in runs),
            "n_transport_errors": sum(run["n_transport_errors"] for run in runs),
            "timed_out": any(run["timed_out"] for run in runs),
            "ready_s": ready[name],
            **med,
            "runs": [{k: v for k, v in run.items() if k != "ok_ids"} for run in runs],
        }
    ok_ids = [i for run in loads["audited"] for i in run["ok_ids"]]
    trail_check = check_trail(trail, ok_ids)
    verify = audit_verify(trail, pub)
    sample = trail_check.pop("sample_complete")
    fields = ({k: v for k, v in sample.items() if k not in CHAIN_FIELDS} if sample
              else _fallback_fields())  # fmt: skip
    record_bytes = len(json.dumps(sample, separators=(",", ":"))) if sample else None
    micro_res = micro(key, work, fields, records=args.micro_records, threads=args.micro_threads)

    # ------------------------------------------------------------------ report
    print(machine())
    temp = "greedy" if args.temperature == 0 else f"temperature {args.temperature}, seeded"
    print(f"model {args.model}; {args.clients} clients, {args.requests} requests per load, "
          f"max_tokens {args.max_tokens}, {temp}; server: {args.processes} process(es) x "
          f"{args.workers} worker thread(s), queue {queue}; {args.rounds} round(s)")  # fmt: skip
    head = ("variant", "200", "429", "5xx", "other", "req/s", "p50 ms", "p90 ms", "p99 ms")
    print(f"{head[0]:<9}" + "".join(f"{h:>9}" for h in head[1:]))
    for name, s in summary.items():
        c = s["codes"]
        other = sum(n for k, n in c.items() if k not in ("200", "429")) - s["n_5xx"]
        row = (c.get("200", 0), s["n_429"], s["n_5xx"], other)
        times = (s["rps"], s["p50_ms"], s["p90_ms"], s["p99_ms"])
        print(f"{name:<9}" + "".join(f"{x:>9}" for x in row) + "".join(f"{x:>9.1f}" for x in times))
        if s["timed_out"]:
            print(f"  {name}: a load ran past --time-limit {args.time_limit:g} s (cut short)")
    for name, s in summary.items():
        print(f"{name}: status codes {s['codes']}; ready in {s['ready_s']:.1f} s")
    n5 = sum(s["n_5xx"] + s["n_transport_errors"] for s in summary.values())
    print(f"5xx and transport errors: {n5} ({'OK' if n5 == 0 else 'FAIL'}: expected 0)")
    cost = None
    if "baseline" in summary:
        b, a = summary["baseline"], summary["audited"]
        cost = {"p50_ms": a["p50_ms"] - b["p50_ms"],
                "per_request_ms": 1000 / a["rps"] - 1000 / b["rps"]}  # fmt: skip
        print(f"record write + hash adds {cost['p50_ms']:.1f} ms p50 "
              f"({b['p50_ms']:.1f} -> {a['p50_ms']:.1f} ms, end to end with queueing), "
              f"{cost['per_request_ms']:.2f} ms of server time per request "
              f"(1000 / req/s: {1000 / b['rps']:.2f} -> {1000 / a['rps']:.2f} ms)")  # fmt: skip

    if served_cost:
        parts = [f"{k} p50 {v['p50_ms']:.3f} ms, mean {v['mean_ms']:.3f} ms (n={v['count']})"
                 for k, v in sorted(served_cost.items())]  # fmt: skip
        total = sum(v["p50_ms"] for v in served_cost.values())
        print(f"server-side audit time per request (its /metrics histogram): {'; '.join(parts)};"
              f" start + complete p50 {total:.3f} ms (goal <= 1 ms)")  # fmt: skip

    tc = trail_check
    trail_ok = tc["without_one_complete"] == 0 and tc["without_one_start"] == 0
    print(f"audit trail: {tc['acknowledged']} acknowledged (200) ids; "
          f"{tc['without_one_complete']} without exactly one complete record, "
          f"{tc['without_one_start']} without exactly one start record "
          f"({'OK' if trail_ok else 'FAIL'})")  # fmt: skip
    if tc["examples"]:
        print(f"  e.g. {', '.join(tc['examples'])}")
    print(f"  records per log: {tc['records_per_log']}; complete outcomes: {tc['outcomes']}")
    logs_ok = len(tc["records_per_log"]) >= args.processes
    if args.processes > 1:
        done = {n: k.get("complete", 0) for n, k in tc["records_per_log"].items()}
        print(f"  scale-out: {len(done)} logs for {args.processes} processes "
              f"({'OK' if logs_ok else 'FAIL'}); completions per log {done}")  # fmt: skip
        if done and min(done.values()) < 0.1 * max(done.values()):
            print("  note: uneven split; the kernel spreads connections, not requests, over the "
                  "processes, and each client keeps its connection alive")  # fmt: skip
    print(f"audit verify: exit {verify['exit']} ({'OK' if verify['exit'] == 0 else 'FAIL'})")
    for line in verify["stdout"]:
        print(f"  {line}")
    if verify["exit"] != 0 and verify["stderr"]:
        print(f"  stderr: {verify['stderr']}")

    seq, thr = micro_res["sequential"], micro_res["threads"]
    size = f"{record_bytes}-byte" if record_bytes else "synthetic"
    print(f"AuditLog.append + sync of a {size} completion record (in process, {work}'s disk):")
    print(f"  sequential x{seq['records']}: append (sign + hash + write) p50 "
          f"{seq['append_p50_ms']:.3f} p99 {seq['append_p99_ms']:.3f} ms; with the fsync wait "
          f"p50 {seq['p50_ms']:.3f} p99 {seq['p99_ms']:.3f} ms; {seq['records_per_s']:.0f} "
          f"records/s, {seq['fsyncs']} fsyncs")  # fmt: skip
    print(f"  {thr['threads']} threads x{thr['records'] // thr['threads']}: p50 "
          f"{thr['p50_ms']:.3f} p99 {thr['p99_ms']:.3f} ms; {thr['records_per_s']:.0f} "
          f"records/s, {thr['fsyncs']} fsyncs for {thr['records']} records "
          f"({thr['records'] / max(thr['fsyncs'], 1):.1f} records per fsync)")  # fmt: skip

    failed = []
    if n5:
        failed.append("5xx or transport errors")
    if not trail_ok:
        failed.append("acknowledged requests without their records")
    if verify["exit"] != 0:
        failed.append("audit verify")
    if not logs_ok:
        failed.append("fewer logs than processes")
    if any(s["timed_out"] for s in summary.values()):
        failed.append("a load ran past --time-limit")
    print("checks: " + ("all OK" if not failed else "FAIL: " + "; ".join(failed)))

    if args.out is not None:
        result = {
            "machine": machine(),
            "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
            "queue": queue,
            "variants": summary,
            "audit_cost": cost,
            "server_audit_write": served_cost,
            "trail": tc,
            "verify": verify,
            "micro": {**micro_res, "record_bytes": record_bytes},
            "failed": failed,
        }
        args.out.write_text(json.dumps(result, indent=2, default=str) + "\n")
        print(f"wrote {args.out}")
    if not args.keep:
        import shutil

        shutil.rmtree(work, ignore_errors=True)
    else:
        print(f"kept {work}")
    if failed:
        sys.exit(1)


if __name__ == "__main__":
    main()
