"""A bounded load test of the real stack on loopback, while a job trains.

    python bench/bench_load.py [--clients 100] [--seconds 20] [--json out.json]
    python bench/bench_load.py --clients 100 --seconds 60        (the issue's run)

The stack is the one of ``bench/bench_service.py`` (a fresh Postgres database, a private Redis, moto's
S3 server, the API under ``python -m api.serve``, a Celery worker training on the CPU). A team
registers the tiny reference model, uploads a forget set and starts a long job; once it trains,
``--clients`` concurrent clients (one asyncio task each, a fixed seed each) run for ``--seconds``,
mixing status polls of the job, its events, lists of jobs, forget sets and models, and small
uploads (a zip of two PNGs, deleted again). Every answer other than the expected status, and
every transport error, is an error. It prints p50/p99/max per operation, the errors (must be 0),
and how far the job trained meanwhile; then the job is cancelled and everything removed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
import time
from collections import defaultdict
from pathlib import Path

BENCH = Path(__file__).resolve().parent
if str(BENCH) not in sys.path:
    sys.path.insert(0, str(BENCH))

import bench_service as svc  # noqa: E402  (the stack, the model archive, percentiles)
import httpx  # noqa: E402

from tests.service.helpers import png_bytes, zip_bytes  # noqa: E402
from tests.service.stack import wait_until  # noqa: E402

# operation -> weight; the mix of a dashboard and scripts watching jobs while teams upload
MIX = {
    "poll job": 40,
    "job events": 10,
    "list jobs": 15,
    "list forget sets": 10,
    "list models": 5,
    "upload forget set": 10,
    "delete forget set": 10,
}
UPLOAD = zip_bytes({"a.png": png_bytes(1), "b.png": png_bytes(2)})


class Load:
    def __init__(self, base: str, headers: dict[str, str], job_id: str, clients: int, seconds: float):
        self.base, self.headers, self.job_id = base, headers, job_id
        self.clients, self.seconds = clients, seconds
        self.latency: dict[str, list[float]] = defaultdict(list)
        self.errors: dict[str, list[str]] = defaultdict(list)
        self.elapsed = 0.0

    async def one(self, client: httpx.AsyncClient, op: str, mine: list[str]) -> None:
        t0 = time.perf_counter()
        try:
            if op == "poll job":
                resp, ok = await client.get(f"/v1/jobs/{self.job_id}"), 200
            elif op == "job events":
                resp, ok = await client.get(f"/v1/jobs/{self.job_id}/events", params={"limit": 20}), 200
            elif op == "list jobs":
                resp, ok = await client.get("/v1/jobs", params={"limit": 20}), 200
            elif op == "list forget sets":
                resp, ok = await client.get("/v1/forget-sets", params={"limit": 20}), 200
            elif op == "list models":
                resp, ok = await client.get("/v1/models"), 200
            elif op == "upload forget set":
                resp, ok = await client.post("/v1/forget-sets", files={"file": ("two.zip", UPLOAD)}), 201
                if resp.status_code == 201:
                    mine.append(resp.json()["id"])
            else:  # delete one of this client's uploads
                resp, ok = await client.delete(f"/v1/forget-sets/{mine.pop()}"), 204
        except httpx.HTTPError as exc:
            self.errors[op].append(f"{type(exc).__name__}: {exc}"[:200])
            return
        self.latency[op].append(time.perf_counter() - t0)
        if resp.status_code != ok:
            self.errors[op].append(f"HTTP {resp.status_code}: {resp.text[:200]}")

    async def client(self, index: int, client: httpx.AsyncClient, deadline: float) -> None:
        rng = random.Random(index)
        ops, weights = list(MIX), list(MIX.values())
        mine: list[str] = []
        while time.perf_counter() < deadline:
            op = rng.choices(ops, weights)[0]
            if op == "delete forget set" and not mine:
                op = "upload forget set"
            await self.one(client, op, mine)
        for fs_id in mine:  # leave nothing behind
            await self.one(client, "delete forget set", [fs_id])

    async def run(self) -> None:
        # idle connections are dropped by the client (2 s) before the server closes them (uvicorn: 5 s), so a
        # request never races a closing keep-alive connection
        limits = httpx.Limits(
            max_connections=self.clients, max_keepalive_connections=self.clients, keepalive_expiry=2.0
        )
        timeout = httpx.Timeout(60.0)
        async with httpx.AsyncClient(base_url=self.base, headers=self.headers, limits=limits, timeout=timeout) as c:
            t0 = time.perf_counter()
            deadline = t0 + self.seconds
            await asyncio.gather(*(self.client(i, c, deadline) for i in range(self.clients)))
            self.elapsed = time.perf_counter() - t0

    def table(self) -> str:
        rows = [
            "| operation | requests | errors | p50 ms | p99 ms | max ms |",
            "|---|---:|---:|---:|---:|---:|",
        ]
        total = errors = 0
        for op in MIX:
            values = sorted(self.latency.get(op, []))
            n, e = len(values), len(self.errors.get(op, []))
            total, errors = total + n, errors + e
            if not n and not e:
                continue
            p50, p99 = (svc._percentile(values, q) * 1000 for q in (50, 99))
            peak = values[-1] * 1000 if values else float("nan")
            rows.append(f"| {op} | {n} | {e} | {p50:.0f} | {p99:.0f} | {peak:.0f} |")
        everything = sorted(v for vs in self.latency.values() for v in vs)
        p50, p99 = (svc._percentile(everything, q) * 1000 for q in (50, 99))
        rows.append(f"| **all** | {total} | {errors} | {p50:.0f} | {p99:.0f} | {everything[-1] * 1000:.0f} |")
        rate = total / self.elapsed if self.elapsed else 0.0
        rows.append(f"\n{self.clients} clients for {self.elapsed:.1f} s: {rate:.0f} requests/s, {errors} errors")
        return "\n".join(rows)

    @property
    def error_count(self) -> int:
        return sum(len(v) for v in self.errors.values())


def training_step(client: httpx.Client, job_id: str) -> int:
    job = client.get(f"/v1/jobs/{job_id}").json()
    return int((job.get("progress") or {}).get("step", 0)) if job["status"] == "running" else -1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--clients", type=int, default=100)
    ap.add_argument("--seconds", type=float, default=20.0, help="how long the load runs (the issue's run: 60)")
    ap.add_argument("--worker-threads", type=int, default=1, help="OMP_NUM_THREADS of the training worker")
    ap.add_argument("--pg-admin", default="host=127.0.0.1 port=5432 user=postgres dbname=postgres")
    ap.add_argument("--pg-url", default="postgresql+psycopg://postgres@127.0.0.1:5432/{db}")
    ap.add_argument("--redis-url", default="redis://127.0.0.1:6379/0", help="used only with --shared-redis")
    ap.add_argument("--shared-redis", action="store_true")
    ap.add_argument("--api-python", default=sys.executable)
    ap.add_argument("--keep-logs", action="store_true")
    ap.add_argument("--json", help="also write the raw latencies and errors here")
    args = ap.parse_args(argv)
    args.upload_mib = 1  # what bench_service's stack sizes its upload limit from

    stack = svc.Stack(args)
    started = time.perf_counter()
    load: Load | None = None
    try:
        stack.up()
        stack.admin("create-team", "load")
        key = stack.admin("create-key", "load")
        headers = {"Authorization": f"Bearer {key}"}
        with httpx.Client(base_url=stack.base, headers=headers, timeout=120) as c:
            model = c.post("/v1/models", files={"file": ("tiny.tar", svc.model_archive())})
            fs = c.post("/v1/forget-sets", files={"file": ("zeros.zip", UPLOAD)})
            assert model.status_code == 201 and fs.status_code == 201, (model.text, fs.text)
            body = {
                "model": model.json()["id"],
                "forget_set": fs.json()["id"],
                "params": svc.short_job(),
                "evaluation": {"enabled": False},
            }
            job_id = c.post("/v1/jobs", json=body).json()["id"]
            wait_until(lambda: training_step(c, job_id) > 0, 300, what="the job to train")
            step_before = training_step(c, job_id)
            load = Load(stack.base, headers, job_id, args.clients, args.seconds)
            asyncio.run(load.run())
            step_after = training_step(c, job_id)
            c.post(f"/v1/jobs/{job_id}/cancel")
            final = wait_until(lambda: (j := c.get(f"/v1/jobs/{job_id}").json())["status"] in svc.FINAL and j, 60)
        print(load.table())
        print(f"the job trained from step {step_before} to {step_after} meanwhile, then ended {final['status']}")
        for op, errs in load.errors.items():
            for e in errs[:3]:
                print(f"error: {op}: {e}")
    finally:
        stack.down()
    print(f"total {time.perf_counter() - started:.0f} s")
    if args.json and load is not None:
        Path(args.json).write_text(json.dumps({"latency_s": load.latency, "errors": load.errors}, indent=1))
    return 1 if load is None or load.error_count else 0


if __name__ == "__main__":
    sys.exit(main())
