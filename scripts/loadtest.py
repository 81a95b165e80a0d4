#!/usr/bin/env python
"""Load test of `expertpool serve`: concurrent clients asking for random composite tasks (and one repeated query).

    python scripts/loadtest.py --pool pool.db                # starts its own server on a free loopback port
    python scripts/loadtest.py --url http://127.0.0.1:8000   # targets a running server (loopback only)

Bounded in requests (--requests, default 200) and time (--time-limit, default 300 s). Prints a JSON report
(p50/p99 latency of all, repeated and random queries; errors) and, with --write FILE, a Markdown page that
states the machine and the exact command.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import random
import shlex
import socket
import subprocess
import sys
import threading
import time
from urllib.parse import urlparse

import httpx

LOOPBACK = {"127.0.0.1", "localhost", "::1", "[::1]"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(pool: str, workers: int, timeout: float = 300) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    proc = subprocess.Popen([sys.executable, "-m", "expertpool.cli", "serve", "--pool", pool, "--host", "127.0.0.1",
                             "--port", str(port), "--workers", str(workers), "--log-level", "warning"])
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"error: the server exited with status {proc.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return proc, url
        except httpx.TransportError:
            pass
        time.sleep(0.2)
    proc.terminate()
    raise SystemExit(f"error: the server did not answer within {timeout:.0f} s")


def percentiles(xs: list[float]) -> dict:
    if not xs:
        return {"n": 0}
    xs = sorted(xs)
    pick = lambda q: xs[min(len(xs) - 1, int(q * len(xs)))]  # noqa: E731
    return {"n": len(xs), "p50": round(pick(0.5), 2), "p99": round(pick(0.99), 2), "max": round(xs[-1], 2),
            "mean": round(sum(xs) / len(xs), 2)}


def run(url: str, clients: int, requests: int, time_limit: float, repeat_share: float, fmt: str, seed: int) -> dict:
    tasks = [t["name"] for t in httpx.get(f"{url}/v1/tasks", timeout=30).json()["tasks"]]
    repeated = {"tasks": tasks[:2], "format": fmt}
    rng = random.Random(seed)
    plan = []  # decided up front, so that a run is reproducible
    for i in range(requests):
        if i == 0:
            plan.append(("first", repeated))  # the repeated query's first request builds it (a cache miss)
        elif rng.random() < repeat_share:
            plan.append(("repeated", repeated))
        else:
            n = rng.randint(1, min(4, len(tasks)))
            plan.append(("random", {"tasks": rng.sample(tasks, n), "format": fmt}))
    lock, results, errors = threading.Lock(), [], []
    nxt = iter(range(len(plan)))
    deadline = time.monotonic() + time_limit

    def client() -> None:
        with httpx.Client(base_url=url, timeout=max(1.0, time_limit)) as c:
            while time.monotonic() < deadline:
                with lock:
                    i = next(nxt, None)
                if i is None:
                    return
                kind, body = plan[i]
                t = time.perf_counter()
                try:
                    r = c.post("/v1/models", json=body)
                    ok = r.status_code == 200
                    err = None if ok else f"{r.status_code} {r.text[:200]}"
                except httpx.HTTPError as e:
                    ok, err = False, f"{type(e).__name__}: {e}"
                ms = (time.perf_counter() - t) * 1000
                with lock:
                    results.append((kind, ms, ok))
                    if err:
                        errors.append(err)

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    seconds = time.perf_counter() - t0
    lat = lambda kind: percentiles([ms for k, ms, ok in results if ok and (kind is None or k == kind)])  # noqa: E731
    return {"requests_planned": len(plan), "requests_sent": len(results), "ok": sum(ok for _, _, ok in results),
            "errors": len(errors) + len(plan) - len(results), "error_samples": errors[:5],
            "seconds": round(seconds, 2), "throughput_rps": round(len(results) / seconds, 1) if seconds else None,
            "latency_ms": {"all": lat(None), "first": lat("first"), "repeated": lat("repeated"),
                           "random": lat("random")},
            "clients": clients, "format": fmt, "repeated_query": repeated, "pool_tasks": len(tasks)}


def machine() -> dict:
    import torch

    return {"platform": platform.platform(), "processor": platform.processor() or platform.machine(),
            "cpu_count": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
            "load_average_at_start": [round(x, 2) for x in os.getloadavg()]}


def markdown(report: dict, command: str) -> str:
    lat = report["latency_ms"]
    rows = "\n".join(f"| {k} | {v['n']} | {v.get('p50', '-')} | {v.get('p99', '-')} | {v.get('max', '-')} |"
                     for k, v in lat.items())
    m = report["machine"]
    goal = (report["errors"] == 0 and report["ok"] == report["requests_planned"]
            and lat["repeated"].get("p99", 1e9) < 250)
    return f"""# Service load test

Generated by `scripts/loadtest.py` on {report['date']}; do not edit by hand.

Command:

    {command}

Machine: {m['platform']}, {m['processor']}, {m['cpu_count']} CPU cores (os.cpu_count), Python {m['python']},
torch {m['torch']}; load average when the test started: {', '.join(map(str, m['load_average_at_start']))}
(the machine is shared, so the figures include other people's work).

Server: `expertpool serve` with {report['workers']} worker(s), started by the script on a loopback port; pool
`{report['pool']}` ({report['pool_tasks']} primitive tasks). {report['clients']} concurrent clients sent
`POST /v1/models` (format `{report['format']}`): the repeated query `{json.dumps(report['repeated_query']['tasks'])}` and random
composite tasks of 1-4 tasks in random order. Rows: `first` = the repeated query's first request (it builds the
model), `repeated` = its later requests (answered from the cache), `random` = the random queries.

| requests | ok | errors | seconds | requests/s |
|---:|---:|---:|---:|---:|
| {report['requests_sent']} / {report['requests_planned']} | {report['ok']} | {report['errors']} | {report['seconds']} | {report['throughput_rps']} |

Latency (ms, client side, including HTTP):

| queries | n | p50 | p99 | max |
|---|---:|---:|---:|---:|
{rows}

Goal of issue 5 (all requests succeed, repeated query p99 under 250 ms on 2 cores): **{'met' if goal else 'NOT met'}**.

Random queries that are not yet cached pay for composing, counting FLOPs and exporting + verifying the ONNX
artifact in ONNX Runtime; everything else is a cache hit.

```json
{json.dumps(report, indent=2)}
```
"""


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group(required=True)
    where.add_argument("--pool", help="start `expertpool serve --pool POOL` on a free loopback port")
    where.add_argument("--url", help="target a running server (loopback addresses only)")
    p.add_argument("--workers", type=int, default=1, help="server workers when the script starts the server")
    p.add_argument("--clients", type=int, default=8)
    p.add_argument("--requests", type=int, default=200)
    p.add_argument("--time-limit", type=float, default=300, help="seconds; requests not sent by then are errors")
    p.add_argument("--repeat-share", type=float, default=0.5, help="share of requests that are the repeated query")
    p.add_argument("--format", default="onnx", choices=["onnx", "safetensors", "torch"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--write", metavar="FILE", help="write the Markdown report to FILE (e.g. docs/results/service.md)")
    a = p.parse_args(argv)
    if a.url and urlparse(a.url).hostname not in LOOPBACK:
        p.error("--url must be a loopback address (127.0.0.1, localhost, ::1)")
    if a.clients < 1 or a.requests < 1 or a.time_limit <= 0:
        p.error("--clients, --requests and --time-limit must be positive")
    command = "python " + " ".join(shlex.quote(x) for x in [os.path.relpath(__file__), *(argv or sys.argv[1:])])
    info = machine()
    proc = None
    if a.pool:
        proc, url = start_server(a.pool, a.workers)
    else:
        url = a.url.rstrip("/")
    try:
        report = run(url, a.clients, a.requests, a.time_limit, a.repeat_share, a.format, a.seed)
    finally:
        if proc is not None:
            proc.terminate()
            try:
                proc.wait(30)
            except subprocess.TimeoutExpired:
                proc.kill()
    report.update(machine=info, command=command, workers=a.workers if a.pool else None,
                  pool=os.path.basename(a.pool) if a.pool else url,
                  date=_dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"))
    print(json.dumps(report, indent=2))
    if a.write:
        with open(a.write, "w") as f:
            f.write(markdown(report, command))
    return 0 if report["errors"] == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
