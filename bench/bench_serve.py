"""Server load test: concurrent clients on loopback against `mmhops-lite serve`, every result checked against
in-process search of the same index.

    python bench/bench_serve.py [INDEX] [--clients 8] [--requests 500] [--batch 1]

Without INDEX, the demo index (built on first use). The server runs as its own process (`mmhops-lite serve
INDEX --no-ask`); each client thread keeps one HTTP/1.1 connection and sends `--requests` /retrieve calls with
rotating queries. Prints p50/p99 latency, throughput, errors, and how many results differ from in-process search
(both must be 0). The run is bounded: it stops after clients x requests calls or --timeout seconds.
"""
from __future__ import annotations

import argparse
import http.client
import json
import socket
import statistics
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

QUERIES = ["capital of France", "Eiffel Tower architect", "largest planet in the solar system", "Andromeda galaxy",
           "flag with a red maple leaf", "population of Japan", "river through Vienna", "Orion nebula constellation",
           "national animal of Scotland", "stamp with a lighthouse", "emoji of a rocket", "Mount Fuji height"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(port: int, timeout: float, proc=None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"the server exited with code {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            if c.getresponse().status == 200:
                return
        except OSError:
            time.sleep(0.1)
    raise RuntimeError(f"the server did not answer /health within {timeout:.0f}s")


def run_clients(port: int, queries: list[str], want: dict, clients: int, requests: int, batch: int = 1,
                topk: int = 3, timeout: float = 600.0) -> dict:
    """`clients` threads x `requests` POST /retrieve each; latency percentiles, errors and result mismatches."""
    lat: list[float] = []
    errors, mismatches = [0], [0]
    lock = threading.Lock()
    deadline = time.monotonic() + timeout

    def client(c: int) -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine, bad, wrong = [], 0, 0
        for r in range(requests):
            if time.monotonic() > deadline:
                bad += requests - r
                break
            qs = [queries[(c * 7 + r + j) % len(queries)] for j in range(batch)]
            body = json.dumps({"queries": qs, "topk": topk, "return_scores": True})
            t0 = time.perf_counter()
            try:
                conn.request("POST", "/retrieve", body, {"Content-Type": "application/json"})
                resp = conn.getresponse()
                data = resp.read()
            except OSError:
                bad += 1
                conn.close()
                conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
                continue
            mine.append(time.perf_counter() - t0)
            if resp.status != 200:
                bad += 1
                continue
            got = [[d["document"]["id"] for d in row] for row in json.loads(data)["result"]]
            wrong += sum(g != want[q] for g, q in zip(got, qs))
        conn.close()
        with lock:
            lat.extend(mine)
            errors[0] += bad
            mismatches[0] += wrong

    t0 = time.perf_counter()
    threads = [threading.Thread(target=client, args=(c,)) for c in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    wall = time.perf_counter() - t0
    lat.sort()
    pct = (lambda p: lat[min(len(lat) - 1, int(p / 100 * len(lat)))] * 1e3) if lat else (lambda p: 0.0)
    return {"requests": clients * requests, "answered": len(lat), "errors": errors[0], "mismatches": mismatches[0],
            "p50_ms": round(statistics.median(lat) * 1e3, 2) if lat else 0.0, "p99_ms": round(pct(99), 2),
            "max_ms": round(lat[-1] * 1e3, 2) if lat else 0.0, "seconds": round(wall, 2),
            "requests_per_s": round(len(lat) / wall, 1)}


def load_test(app, queries: list[str], want: dict, clients: int = 8, requests: int = 500, **kw) -> dict:
    """Serve `app` with uvicorn on a free loopback port in this process, run the clients, stop the server."""
    import uvicorn

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           limit_concurrency=64))
    t = threading.Thread(target=server.run, daemon=True)
    t.start()
    try:
        wait_ready(port, 30)
        return run_clients(port, queries, want, clients, requests, **kw)
    finally:
        server.should_exit = True
        t.join(10)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("index", nargs="?", help="index folder (default: the demo index)")
    ap.add_argument("--clients", type=int, default=8)
    ap.add_argument("--requests", type=int, default=500, help="requests per client")
    ap.add_argument("--batch", type=int, default=1, help="queries per request")
    ap.add_argument("--timeout", type=float, default=900.0)
    args = ap.parse_args()

    from mmhops_lite import api
    from mmhops_lite.config import Config

    cfg = Config.resolve()
    index = api.resolve_index(cfg, args.index)
    with api.open_index(index, cfg) as idx:
        want = {q: [h.passage.id for h in idx.search_text(q, 3)] for q in QUERIES}
    port = free_port()
    cmd = [sys.executable, str(Path(__file__).resolve().parents[1] / "cli.py"), "serve", str(index), "--no-ask",
           "--port", str(port), "--log-level", "warning"]
    proc = subprocess.Popen(cmd)
    try:
        t0 = time.perf_counter()
        wait_ready(port, 120, proc)
        print(f"server ready in {time.perf_counter() - t0:.1f}s: {index}")
        rep = run_clients(port, QUERIES, want, args.clients, args.requests, args.batch, timeout=args.timeout)
    finally:
        proc.terminate()
        proc.wait(30)
    print(f"{args.clients} clients x {args.requests} requests ({args.batch} queries each) on loopback:")
    print(f"  p50 {rep['p50_ms']} ms  p99 {rep['p99_ms']} ms  max {rep['max_ms']} ms  "
          f"{rep['requests_per_s']} requests/s over {rep['seconds']} s")
    print(f"  errors {rep['errors']}  results differing from in-process search {rep['mismatches']} "
          f"(of {rep['answered']} answered)")
    sys.exit(1 if rep["errors"] or rep["mismatches"] else 0)


if __name__ == "__main__":
    main()
