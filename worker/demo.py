"""``python -m worker.embedded demo``: the embedded service running a real job, seen from a client.

Starts ``worker.embedded serve`` as a subprocess, then, over REST only: uploads a forget set of real
MNIST digits of one class, registers the reference MNIST DDPM (uploaded as an archive), creates the
job, shows a progress bar while polling, downloads the checkpoint, verifies its sha256, loads it with
plain ``diffusers``, and prints the metrics, where the before/after grids are, and how long it took.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import socket
import subprocess
import sys
import tarfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def forget_zip(digit: int, count: int) -> bytes:
    """A zip of the first ``count`` real MNIST images of ``digit`` as PNGs (the service tests use it too)."""
    from vdu_core.reference import forget_zip_bytes

    return forget_zip_bytes(digit, count)


def _model_archive(folder: Path) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for path in sorted(folder.rglob("*")):
            rel = path.relative_to(folder).as_posix()
            if path.is_file() and not rel.startswith("lineage/") and (rel.endswith((".json", ".safetensors"))):
                tf.add(path, arcname=f"{folder.name}/{rel}")
    return buf.getvalue()


def _default_model() -> Path:
    for name in ("mnist-ddpm", "mnist-ddpm-tiny"):
        folder = REPO / "reference" / name
        if (folder / "model_index.json").is_file():
            return folder
    raise SystemExit("no reference model found under reference/ (train one with scripts/train_reference.py)")


def run_demo(args) -> int:
    import httpx
    from tqdm import tqdm

    t0 = time.monotonic()
    data = Path(args.data_dir).resolve()
    data.mkdir(parents=True, exist_ok=True)
    port = args.port or _free_port()
    base = f"http://127.0.0.1:{port}"
    log_path = data / "service.log"
    env = {**os.environ, "OMP_WAIT_POLICY": "PASSIVE", "VDU_LOG_JSON": "false"}
    print(f"[{time.monotonic() - t0:5.1f}s] starting the embedded service on {base} (log: {log_path})")
    with open(log_path, "ab") as log_fh:
        server = subprocess.Popen(
            [sys.executable, "-m", "worker.embedded", "serve", "--port", str(port), "--data-dir", str(data)],
            cwd=REPO,
            env=env,
            stdout=log_fh,
            stderr=subprocess.STDOUT,
        )
    try:
        deadline = time.monotonic() + 120
        while True:
            if server.poll() is not None:
                raise SystemExit(f"the service exited; see {log_path}")
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                raise SystemExit("the service did not become ready in 120s")
            time.sleep(0.3)
        key = (data / "api-key").read_text().strip()
        client = httpx.Client(base_url=base, headers={"Authorization": f"Bearer {key}"}, timeout=120)

        model_dir = Path(args.model) if args.model else _default_model()
        print(
            f"[{time.monotonic() - t0:5.1f}s] uploading the forget set ({args.count} real MNIST '{args.digit}'s) "
            f"and the model {model_dir.name}"
        )
        fs = client.post(
            "/v1/forget-sets",
            files={"file": (f"digit{args.digit}.zip", forget_zip(args.digit, args.count))},
            data={"name": f"MNIST digit {args.digit}"},
        )
        fs.raise_for_status()
        model = client.post(
            "/v1/models",
            files={"file": (f"{model_dir.name}.tar", _model_archive(model_dir))},
            data={"name": model_dir.name},
        )
        model.raise_for_status()
        params = {"steps": args.steps, **json.loads(args.params)}
        evaluation = {"forget_class": args.digit, **json.loads(args.evaluation)}
        job = client.post(
            "/v1/jobs",
            json={
                "model": model.json()["id"],
                "forget_set": fs.json()["id"],
                "method": "vdu",
                "params": params,
                "evaluation": evaluation,
            },
        )
        if job.status_code != 201:
            raise SystemExit(f"job refused: {job.text}")
        job_id = job.json()["id"]
        print(f"[{time.monotonic() - t0:5.1f}s] job {job_id} queued; params {params}")

        bar = tqdm(total=1, unit="step", dynamic_ncols=True)
        phase = None
        while True:
            job = client.get(f"/v1/jobs/{job_id}").json()
            p = job.get("progress") or {}
            if p.get("phase") != phase and p.get("total"):
                phase = p["phase"]
                bar.reset(total=p["total"])
                bar.set_description(phase)
            if p.get("total"):
                bar.n = min(p.get("step", 0), p["total"])
                losses = {k: round(v, 4) for k, v in (p.get("losses") or {}).items() if isinstance(v, float)}
                bar.set_postfix({**losses, "eta_s": round(p.get("eta_s") or 0)}, refresh=False)
                bar.refresh()
            if job["status"] in ("succeeded", "failed", "cancelled"):
                break
            time.sleep(0.5)
        bar.close()
        if job["status"] != "succeeded":
            print(f"job {job['status']}: {job.get('error')}")
            return 1

        out = data / "results" / job_id
        out.mkdir(parents=True, exist_ok=True)
        ck = job["checkpoint"]
        archive = out / "checkpoint.tar"
        digest = hashlib.sha256()
        with client.stream("GET", f"/v1/jobs/{job_id}/artifacts/checkpoint") as resp, open(archive, "wb") as fh:
            resp.raise_for_status()
            for chunk in resp.iter_bytes():
                digest.update(chunk)
                fh.write(chunk)
        if digest.hexdigest() != ck["sha256"]:
            raise SystemExit("checkpoint sha256 mismatch")
        print(f"[{time.monotonic() - t0:5.1f}s] downloaded {ck['bytes']} bytes, sha256 {ck['sha256'][:16]}... verified")
        pipeline_dir = out / "pipeline"
        with tarfile.open(archive) as tf:
            tf.extractall(pipeline_dir, filter="data")
        from diffusers import DDPMPipeline

        pipe = DDPMPipeline.from_pretrained(pipeline_dir)
        print(
            f"[{time.monotonic() - t0:5.1f}s] loaded with diffusers.DDPMPipeline.from_pretrained: "
            f"{sum(p.numel() for p in pipe.unet.parameters())} parameters"
        )
        metrics = job["metrics"] or {}
        print("metrics:")
        for name, value in metrics.items():
            if isinstance(value, dict) and "value" in value:
                value = value["value"]
            if isinstance(value, int | float | str | bool):
                print(f"  {name:32s} {value}")
        print(
            f"before/after grids: {pipeline_dir / 'samples' / 'before.png'}  {pipeline_dir / 'samples' / 'after.png'}"
        )
        print(f"total time: {time.monotonic() - t0:.1f}s")
        return 0
    finally:
        server.terminate()
        try:
            server.wait(20)
        except subprocess.TimeoutExpired:
            server.kill()
