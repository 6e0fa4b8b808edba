"""``vdu``: the VDU service from a shell, on ``vdu_client``.

    vdu configure --endpoint http://host:8000 --api-key vdu_...
    vdu forget-sets upload zeros.zip --name "digit zero"
    vdu models upload mnist-ddpm.tar --lineage step-1000.tar --lineage step-2000.tar
    vdu jobs create --model model_... --forget-set fs_... --param steps=200 --watch
    vdu jobs watch job_...          # live progress bar (SSE, falling back to polling)
    vdu download job_... -o ./out   # progress bar, sha256 checked

Every command prints a table, or JSON with ``--json``. Exit codes: 0 ok, 1 the API refused (the
problem is printed), 2 bad usage, 3 checksum mismatch, 4 the job ended failed or cancelled,
5 the service cannot be reached, 130 interrupted.
"""

from __future__ import annotations

import argparse
import dataclasses
import getpass
import json
import sys
from collections.abc import Callable, Sequence
from datetime import datetime
from typing import Any

from vdu_client.client import Client, RetryPolicy
from vdu_client.config import Config, config_path, resolve, save
from vdu_client.errors import APIError, ChecksumMismatch, TransportError, VDUClientError, WaitTimeout
from vdu_client.types import Event, Job, Resource

EXIT_API, EXIT_USAGE, EXIT_CHECKSUM, EXIT_JOB, EXIT_UNREACHABLE = 1, 2, 3, 4, 5


class UsageError(Exception):
    pass


# --- output ------------------------------------------------------------------------------------
def _plain(value: Any) -> Any:
    if isinstance(value, Resource):
        return value.raw
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {k: _plain(v) for k, v in dataclasses.asdict(value).items()}
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return str(value) if hasattr(value, "__fspath__") else value


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, datetime):
        return value.strftime("%Y-%m-%d %H:%M:%S")
    if isinstance(value, float):
        return f"{value:.4g}"
    if isinstance(value, dict | list):
        return json.dumps(value, separators=(",", ":"))[:60]
    return str(value)


def table(rows: Sequence[Any], columns: Sequence[str]) -> str:
    cells = [[_cell(getattr(r, c, None) if not isinstance(r, dict) else r.get(c)) for c in columns] for r in rows]
    widths = [max([len(c)] + [len(row[i]) for row in cells]) for i, c in enumerate(columns)]
    lines = ["  ".join(c.upper().ljust(w) for c, w in zip(columns, widths, strict=True))]
    lines += ["  ".join(v.ljust(w) for v, w in zip(row, widths, strict=True)) for row in cells]
    return "\n".join(line.rstrip() for line in lines)


def details(obj: Any, fields: Sequence[str]) -> str:
    width = max(len(f) for f in fields)
    return "\n".join(f"{f.ljust(width)}  {_cell(getattr(obj, f, None))}" for f in fields)


def emit(args, value: Any, render: Callable[[], str]) -> None:
    if args.json:
        print(json.dumps(_plain(value), indent=2, default=str))
    else:
        print(render())


FORGET_SET_COLUMNS = ("id", "name", "image_count", "bytes", "sha256", "created_at")
MODEL_COLUMNS = ("id", "name", "source", "format", "bytes", "created_at")
JOB_COLUMNS = ("id", "status", "method", "model", "forget_set", "created_at", "finished_at")
JOB_FIELDS = (*JOB_COLUMNS, "attempt", "params", "progress", "error")


def _job_progress(job: Job) -> str:
    p = job.progress or {}
    return f"{p.get('phase', '-')} {p.get('step', '-')}/{p.get('total', '-')}" if p else "-"


# --- value parsing -----------------------------------------------------------------------------
def parse_pairs(pairs: Sequence[str] | None, base: str | None, option: str) -> dict[str, Any]:
    """``--param steps=3 --param posterior=lineage`` (values parsed as JSON when they are JSON),
    on top of ``--params '{"gamma": 0.5}'``."""
    out: dict[str, Any] = {}
    if base:
        try:
            out = json.loads(base)
        except ValueError as exc:
            raise UsageError(f"--{option}s is not valid JSON: {exc}") from exc
        if not isinstance(out, dict):
            raise UsageError(f"--{option}s must be a JSON object")
    for pair in pairs or ():
        key, sep, raw = pair.partition("=")
        if not sep or not key:
            raise UsageError(f"--{option} takes KEY=VALUE, got {pair!r}")
        try:
            out[key] = json.loads(raw)
        except ValueError:
            out[key] = raw
    return out


# --- live progress -----------------------------------------------------------------------------
class JobWatcher:
    """Turns a job's events into a tqdm bar per phase (step/total, the loss terms, ETA) and a line
    per state change; with ``--json`` one JSON line per event instead."""

    def __init__(self, as_json: bool, stream=None):
        self.as_json = as_json
        self.stream = stream or sys.stderr
        self.bar = None
        self.phase = None

    def __call__(self, event: Event) -> None:
        if self.as_json:
            print(json.dumps(_plain(event), default=str), flush=True)
            return
        if event.type == "progress":
            self._progress(event.data)
            return
        self.close()
        detail = {k: v for k, v in event.data.items() if k in ("worker", "by", "reason", "code", "message")}
        suffix = " " + " ".join(f"{k}={v}" for k, v in detail.items()) if detail else ""
        print(f"[{event.seq}] {event.type}{suffix}", file=self.stream, flush=True)

    def _progress(self, data: dict[str, Any]) -> None:
        from tqdm import tqdm

        phase, total, step = data.get("phase", "unlearn"), data.get("total") or None, data.get("step", 0)
        if self.bar is None or phase != self.phase:
            self.close()
            self.phase = phase
            self.bar = tqdm(total=total, desc=phase, unit="step", file=self.stream, mininterval=0, leave=True)
        self.bar.n = step
        losses = data.get("losses") or {}
        terms = [k for k in ("stability", "plasticity") if k in losses] or list(losses)[:2]
        post = [f"{k}={losses[k]:.4g}" for k in terms if isinstance(losses[k], int | float)]
        if data.get("eta_s") is not None:
            post.append(f"eta={float(data['eta_s']):.0f}s")
        self.bar.set_postfix_str(" ".join(post), refresh=False)
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


def watch(client: Client, args, job_id: str) -> int:
    watcher = JobWatcher(args.json)
    try:
        job = client.wait(
            job_id,
            timeout=args.timeout,
            on_event=watcher,
            stream=not args.no_stream,
            poll_interval=args.interval,
        )
    finally:
        watcher.close()
    if args.json:
        print(json.dumps(_plain(job), default=str))
    else:
        print(details(job, ("id", "status", "attempt", "started_at", "finished_at")))
        if job.metrics:
            numbers = {k: v for k, v in job.metrics.items() if isinstance(v, int | float | str)}
            print(table([{"metric": k, "value": v} for k, v in numbers.items()], ("metric", "value")))
        if job.error:
            print(f"error: {job.error.code}: {job.error.message}", file=sys.stderr)
        if job.checkpoint:
            print(f"checkpoint: {job.checkpoint.bytes} bytes, sha256 {job.checkpoint.sha256}")
    return 0 if job.ok else EXIT_JOB


# --- commands ----------------------------------------------------------------------------------
def _upload_bar(args, label: str):
    if args.json or args.no_progress:
        return None, lambda: None
    from tqdm import tqdm

    bar = tqdm(total=None, desc=label, unit="B", unit_scale=True, file=sys.stderr, mininterval=0.2)

    def progress(done: int, total: int | None) -> None:
        bar.total = total
        bar.update(done - bar.n)

    return progress, bar.close


def cmd_configure(args) -> int:
    path = config_path()
    current = resolve()
    endpoint = args.endpoint or (current.endpoint if not sys.stdin.isatty() else None)
    api_key = args.api_key
    if sys.stdin.isatty():
        endpoint = endpoint or input(f"endpoint [{current.endpoint or ''}]: ").strip() or current.endpoint
        api_key = api_key or getpass.getpass("API key (hidden; empty keeps the current one): ").strip()
    api_key = api_key or current.api_key
    if not endpoint or not api_key:
        raise UsageError("configure needs --endpoint and --api-key (or a terminal to ask them on)")
    save(Config(endpoint=endpoint.rstrip("/"), api_key=api_key), path)
    print(f"saved {path} (mode 0600)")
    return 0


def cmd_health(client: Client, args) -> int:
    ready = client.readyz()
    rows = [{"check": k, "result": v} for k, v in ready["checks"].items()]
    emit(args, ready, lambda: table(rows, ("check", "result")))
    return 0


def cmd_forget_sets(client: Client, args) -> int:
    if args.action == "upload":
        progress, done = _upload_bar(args, "upload")
        try:
            paths = args.paths[0] if len(args.paths) == 1 else args.paths
            fs = client.upload_forget_set(paths, name=args.name, progress=progress)
        finally:
            done()
        emit(args, fs, lambda: details(fs, FORGET_SET_COLUMNS))
    elif args.action == "list":
        page = client.list_forget_sets(limit=args.limit, after=args.after)
        emit(args, page.data, lambda: table(page.data, FORGET_SET_COLUMNS))
    elif args.action == "get":
        fs = client.get_forget_set(args.id)
        emit(args, fs, lambda: details(fs, FORGET_SET_COLUMNS))
    elif args.action == "delete":
        client.delete_forget_set(args.id)
        emit(args, {"id": args.id, "deleted": True}, lambda: f"deleted {args.id}")
    return 0


def cmd_models(client: Client, args) -> int:
    if args.action == "upload":
        progress, done = _upload_bar(args, "upload")
        try:
            model = client.upload_model(args.path, name=args.name, lineage=args.lineage or (), progress=progress)
        finally:
            done()
    elif args.action == "register":
        model = client.register_model(args.name, hub_id=args.hub_id, revision=args.revision, url=args.url)
    elif args.action == "list":
        page = client.list_models(limit=args.limit, after=args.after)
        emit(args, page.data, lambda: table(page.data, MODEL_COLUMNS))
        return 0
    else:
        model = client.get_model(args.id)
    emit(args, model, lambda: details(model, (*MODEL_COLUMNS, "sha256", "lineage")))
    return 0


def cmd_jobs(client: Client, args) -> int:
    if args.action == "create":
        job = client.create_job(
            model=args.model,
            forget_set=args.forget_set,
            method=args.method,
            params=parse_pairs(args.param, args.params, "param"),
            evaluation=parse_pairs(args.eval, args.evaluation, "eval"),
            webhook_url=args.webhook_url,
            idempotency_key=args.idempotency_key,
        )
        if args.watch:
            if not args.json:
                print(f"created {job.id}", file=sys.stderr)
            return watch(client, args, job.id)
        emit(args, job, lambda: details(job, JOB_FIELDS))
    elif args.action == "list":
        page = client.list_jobs(status=args.status, limit=args.limit, after=args.after)
        rows = [{**{c: getattr(j, c) for c in JOB_COLUMNS}, "progress": _job_progress(j)} for j in page.data]
        emit(args, page.data, lambda: table(rows, (*JOB_COLUMNS[:3], "progress", *JOB_COLUMNS[3:])))
    elif args.action == "get":
        job = client.get_job(args.id)
        emit(args, job, lambda: details(job, (*JOB_FIELDS, "metrics")))
    elif args.action == "cancel":
        job = client.cancel_job(args.id)
        emit(args, job, lambda: f"{job.id} {job.status}")
    elif args.action == "events":
        events = list(client.iter_events(args.id, after=args.after))
        emit(args, events, lambda: table(events, ("seq", "type", "created_at", "data")))
    elif args.action == "watch":
        return watch(client, args, args.id)
    elif args.action == "artifacts":
        artifacts = client.list_artifacts(args.id)
        emit(args, artifacts, lambda: table(artifacts, ("name", "bytes", "sha256", "content_type")))
    return 0


def cmd_webhooks(client: Client, args) -> int:
    if args.action == "secret":
        secret = client.rotate_webhook_secret() if args.rotate else client.webhook_secret()
        emit(args, secret, lambda: details(secret, ("secret", "created_at", "rotated_at", "previous_expires_at")))
    else:
        deliveries = client.webhook_deliveries(args.job_id)
        columns = ("id", "event_type", "status", "attempts", "last_status_code", "last_error", "url")
        emit(args, deliveries, lambda: table(deliveries, columns))
    return 0


def cmd_download(client: Client, args) -> int:
    bar = None
    progress = None
    if not (args.json or args.no_progress):
        from tqdm import tqdm

        bar = tqdm(total=None, desc=args.name, unit="B", unit_scale=True, file=sys.stderr, mininterval=0.2)

        def progress(done: int, total: int | None) -> None:
            bar.total = total
            bar.update(done - bar.n)

    try:
        result = client.download(args.job_id, args.name, args.output, progress=progress, expected_sha256=args.sha256)
    finally:
        if bar is not None:
            bar.close()
    emit(args, result, lambda: f"{result.path}\n{result.bytes} bytes, sha256 {result.sha256} (verified)")
    return 0


# --- the parser --------------------------------------------------------------------------------
def _common(suppress: bool) -> argparse.ArgumentParser:
    """Global options, accepted before or after the command."""
    d = argparse.SUPPRESS if suppress else None
    p = argparse.ArgumentParser(add_help=False)
    p.add_argument("--endpoint", default=d, help="the service URL (else VDU_ENDPOINT, else the config file)")
    p.add_argument("--api-key", default=d, help="the team's API key (else VDU_API_KEY, else the config file)")
    p.add_argument("--json", action="store_true", default=argparse.SUPPRESS if suppress else False, help="print JSON")
    p.add_argument("--retries", type=int, default=d, help="retries on 429/5xx/connection errors (default 4)")
    return p


def build_parser() -> argparse.ArgumentParser:
    common = [_common(True)]
    parser = argparse.ArgumentParser(
        prog="vdu",
        description="The VDU unlearning service from the command line.",
        epilog="exit codes: 0 ok, 1 API error, 2 usage, 3 checksum mismatch, 4 job failed/cancelled, 5 unreachable",
        parents=[_common(False)],
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("configure", parents=common, help=f"store endpoint and key in {config_path()}")
    p.set_defaults(func=cmd_configure, needs_client=False)
    sub.add_parser("health", parents=common, help="is the service ready").set_defaults(func=cmd_health)

    fs = sub.add_parser("forget-sets", parents=common, help="upload, list, get, delete forget sets")
    fs.set_defaults(func=cmd_forget_sets)
    fss = fs.add_subparsers(dest="action", required=True)
    p = fss.add_parser("upload", parents=common, help="one archive or image, or several images")
    p.add_argument("paths", nargs="+")
    p.add_argument("--name")
    p.add_argument("--no-progress", action="store_true")
    for action in ("list",):
        p = fss.add_parser(action, parents=common)
        p.add_argument("--limit", type=int, default=20)
        p.add_argument("--after")
    for action in ("get", "delete"):
        fss.add_parser(action, parents=common).add_argument("id")

    models = sub.add_parser("models", parents=common, help="upload, register, list, get models")
    models.set_defaults(func=cmd_models)
    ms = models.add_subparsers(dest="action", required=True)
    p = ms.add_parser("upload", parents=common, help="a .safetensors file or a zip/tar of a diffusers folder")
    p.add_argument("path")
    p.add_argument("--name")
    p.add_argument("--lineage", action="append", help="a checkpoint of the same lineage (repeat)")
    p.add_argument("--no-progress", action="store_true")
    p = ms.add_parser("register", parents=common, help="a hub id with a pinned revision, or an https/s3 URL")
    p.add_argument("--name", required=True)
    p.add_argument("--hub-id")
    p.add_argument("--revision")
    p.add_argument("--url")
    p = ms.add_parser("list", parents=common)
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--after")
    ms.add_parser("get", parents=common).add_argument("id")

    jobs = sub.add_parser("jobs", parents=common, help="create, list, get, cancel, watch jobs")
    jobs.set_defaults(func=cmd_jobs)
    js = jobs.add_subparsers(dest="action", required=True)
    watch_opts = argparse.ArgumentParser(add_help=False)
    watch_opts.add_argument("--no-stream", action="store_true", help="poll instead of the event stream")
    watch_opts.add_argument("--interval", type=float, default=2.0, help="polling interval (s)")
    watch_opts.add_argument("--timeout", type=float, help="give up after this many seconds")
    p = js.add_parser("create", parents=[*common, watch_opts], help="start a job")
    p.add_argument("--model", required=True)
    p.add_argument("--forget-set", required=True)
    p.add_argument("--method", default="vdu")
    p.add_argument("--param", action="append", metavar="KEY=VALUE", help="a method parameter (repeat)")
    p.add_argument("--params", metavar="JSON", help="method parameters as a JSON object")
    p.add_argument("--eval", action="append", metavar="KEY=VALUE", help="an evaluation option (repeat)")
    p.add_argument("--evaluation", metavar="JSON", help="evaluation options as a JSON object")
    p.add_argument("--webhook-url")
    p.add_argument("--idempotency-key")
    p.add_argument("--watch", action="store_true", help="then watch it to the end")
    p = js.add_parser("list", parents=common)
    p.add_argument("--status", action="append", help="filter (repeat)")
    p.add_argument("--limit", type=int, default=20)
    p.add_argument("--after")
    for action in ("get", "cancel", "artifacts"):
        js.add_parser(action, parents=common).add_argument("id")
    p = js.add_parser("events", parents=common)
    p.add_argument("id")
    p.add_argument("--after", type=int, default=0)
    p = js.add_parser("watch", parents=[*common, watch_opts], help="a live progress bar until the job ends")
    p.add_argument("id")

    hooks = sub.add_parser("webhooks", parents=common, help="the signing secret and a job's deliveries")
    hooks.set_defaults(func=cmd_webhooks)
    hs = hooks.add_subparsers(dest="action", required=True)
    hs.add_parser("secret", parents=common, help="show (or --rotate) the team's secret").add_argument(
        "--rotate", action="store_true", help="replace it (the old one signs too for a grace period)"
    )
    hs.add_parser("deliveries", parents=common, help="a job's webhook messages and attempts").add_argument("job_id")

    p = sub.add_parser("download", parents=common, help="download an artifact, sha256 checked")
    p.set_defaults(func=cmd_download)
    p.add_argument("job_id")
    p.add_argument("name", nargs="?", default="checkpoint", help="checkpoint (default), metrics.json, README.md ...")
    p.add_argument("-o", "--output", help="a file or a folder (default: the current folder)")
    p.add_argument("--sha256", help="also require this sha256")
    p.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        if not getattr(args, "needs_client", True):
            return args.func(args)
        config = resolve(args.endpoint, args.api_key)
        if not config.endpoint:
            raise UsageError("no endpoint: run `vdu configure`, set VDU_ENDPOINT or pass --endpoint")
        if not config.api_key:
            raise UsageError("no API key: run `vdu configure`, set VDU_API_KEY or pass --api-key")
        retry = RetryPolicy(attempts=max(0, args.retries) + 1) if args.retries is not None else None
        with Client(config.endpoint, config.api_key, retry=retry) as client:
            return args.func(client, args)
    except UsageError as exc:
        parser.error(str(exc))
    except APIError as exc:
        rid = f" [request {exc.request_id}]" if exc.request_id else ""
        print(f"vdu: error: {exc}{rid}", file=sys.stderr)
        return EXIT_API
    except ChecksumMismatch as exc:
        print(f"vdu: checksum mismatch: {exc}", file=sys.stderr)
        return EXIT_CHECKSUM
    except TransportError as exc:
        print(f"vdu: cannot reach the service: {exc}", file=sys.stderr)
        return EXIT_UNREACHABLE
    except WaitTimeout as exc:
        print(f"vdu: {exc}", file=sys.stderr)
        return EXIT_JOB
    except (VDUClientError, OSError) as exc:
        print(f"vdu: error: {exc}", file=sys.stderr)
        return EXIT_API
    except KeyboardInterrupt:
        print("vdu: interrupted", file=sys.stderr)
        return 130
    return EXIT_USAGE  # pragma: no cover - parser.error exits


if __name__ == "__main__":
    sys.exit(main())
