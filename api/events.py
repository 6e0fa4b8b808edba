"""``GET /v1/jobs/{id}/events/stream``: a job's events as Server-Sent Events.

Each stored event (``job_events``) is sent as ``id: <seq>``, ``event: <type>`` and ``data: <the
event as JSON>``; a reconnecting client sends ``Last-Event-ID`` (or ``?after=``) and gets what
followed. The stream ends after the job's final event (``succeeded``, ``failed``, ``cancelled``).

Postgres is polled, cheaply: each tick reads the job's ``event_seq`` (a primary-key lookup, scoped to
the team) and reads events only when it moved. Every query is a short one in the thread pool, in a
session of its own, so the event loop never blocks and no connection is held between ticks.
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import APIRouter, Header, Query, Request
from fastapi.responses import StreamingResponse
from sqlalchemy import select
from starlette.concurrency import run_in_threadpool

from api.deps import CurrentTeam, SessionDep
from api.problems import error_responses
from api.schemas import EventOut
from jobs import ledger
from jobs.db import session_factory
from jobs.errors import InvalidInput
from jobs.scoping import get_owned
from jobs.tables import FINAL_STATUSES, Job

router = APIRouter(prefix="/v1/jobs", tags=["jobs"])
MAX_STREAM_S = 3600.0  # then the client reconnects with Last-Event-ID
RETRY_MS = 2000
BATCH = 500
FINAL_EVENTS = frozenset(s.value for s in FINAL_STATUSES)
MAX_SEQ = 2**31 - 1
SEQ_PATTERN = re.compile(r"^[0-9]{1,10}$")

STREAM_HELP = """A job's events as they happen, as `text/event-stream`:

```
id: 7
event: progress
data: {"seq": 7, "type": "progress", "data": {"step": 3, "total": 40, "losses": {...}}, "created_at": "..."}
```

`id` is the event's sequence number; send it back as `Last-Event-ID` (or `?after=`) to resume after it.
Types: `queued`, `started`, `progress`, `cancel_requested`, `requeued`, and a final `succeeded`, `failed`
or `cancelled`, after which the stream closes (at once when the job had already ended). Comment lines
(`: keepalive`) keep idle connections open."""


class EventStreamResponse(StreamingResponse):
    media_type = "text/event-stream"


def sse_frame(event: EventOut) -> str:
    return f"id: {event.seq}\nevent: {event.type}\ndata: {event.model_dump_json()}\n\n"


def resume_point(after: int | None, last_event_id: str | None) -> int:
    """Where to start: ``Last-Event-ID`` (what a reconnecting EventSource sends) wins over ``after``."""
    if last_event_id is not None and last_event_id.strip() != "":
        value = last_event_id.strip()
        if not SEQ_PATTERN.match(value) or int(value) > MAX_SEQ:
            raise InvalidInput(
                f"Last-Event-ID must be an event sequence number (0..{MAX_SEQ}); got {value[:40]!r}",
                field="Last-Event-ID",
            )
        return int(value)
    return after or 0


def _poll(url: str, team_id: str, job_id: str, after: int) -> tuple[str | None, list[EventOut]]:
    """One tick: the job's status and the events after ``after`` (none when ``event_seq`` has not
    moved). A status of None: the job is gone."""
    with session_factory(url)() as session:
        row = session.execute(
            select(Job.status, Job.event_seq).where(Job.id == job_id, Job.team_id == team_id)
        ).one_or_none()
        if row is None:
            return None, []
        status, seq = row
        if seq <= after:
            return status, []
        return status, [EventOut.of(e) for e in ledger.events_after(session, job_id, after=after, limit=BATCH)]


async def _event_stream(request: Request, team_id: str, job_id: str, after: int) -> AsyncIterator[str]:
    settings = request.app.state.settings
    url, poll_s, keepalive_s = settings.database_url, settings.events_poll_interval_s, settings.events_keepalive_s
    yield f"retry: {RETRY_MS}\n: events of job {job_id} after {after}\n\n"
    started = last_sent = time.monotonic()
    while True:
        status, events = await run_in_threadpool(_poll, url, team_id, job_id, after)
        for event in events:
            yield sse_frame(event)
            after = event.seq
            last_sent = time.monotonic()
            if event.type in FINAL_EVENTS:
                return
        if status is None:
            return
        if len(events) == BATCH:  # more are waiting
            continue
        if status in FINAL_EVENTS:
            # Final, and every event up to event_seq was sent: nothing more will come.
            return
        now = time.monotonic()
        if now - started > MAX_STREAM_S:
            return
        if now - last_sent >= keepalive_s:
            yield ": keepalive\n\n"
            last_sent = now
        if await request.is_disconnected():
            return
        await asyncio.sleep(poll_s)


@router.get(
    "/{job_id}/events/stream",
    response_class=EventStreamResponse,
    summary="Stream a job's events (Server-Sent Events)",
    description=STREAM_HELP,
    responses={
        200: {
            "description": "Server-Sent Events: one per job event, then the stream closes",
            "content": {"text/event-stream": {"schema": {"type": "string"}}},
        },
        **error_responses(401, 404, 422),
    },
)
def stream_events(
    job_id: str,
    request: Request,
    team: CurrentTeam,
    session: SessionDep,
    after: Annotated[
        int | None, Query(ge=0, le=MAX_SEQ, description="sequence number of the last event seen (as Last-Event-ID)")
    ] = None,
    last_event_id: Annotated[
        str | None,
        Header(alias="Last-Event-ID", description="resume after this event; overrides `after`"),
    ] = None,
) -> EventStreamResponse:
    """Stream the job's events (Server-Sent Events), resumable with `Last-Event-ID`."""
    start = resume_point(after, last_event_id)
    get_owned(session, Job, job_id, team.id)
    session.close()  # the stream opens a short session per tick; hold no connection meanwhile
    return EventStreamResponse(
        _event_stream(request, team.id, job_id, start),
        headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"},
    )
