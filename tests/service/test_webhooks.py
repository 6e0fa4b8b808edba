"""Signed webhooks: a receiver on loopback verifies each message, answers 500 the first time and
sees the retry; the delivery log shows both attempts; a replayed timestamp is refused by the
verification helper receivers use. Real Postgres and real HTTP; the sender is the workers' delivery
pass (``jobs.webhook_delivery.deliver_due``), called here directly."""

from __future__ import annotations

import json
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

from jobs import ledger
from jobs.db import session_scope
from jobs.tables import WebhookDelivery
from jobs.webhook_delivery import WebhookLoop, deliver_due
from jobs.webhooks import WebhookVerificationError, new_secret, signed_headers, verify_webhook
from tests.service.helpers import make_forget_set_row, make_model_row
from tests.service.stack import wait_until

pytestmark = pytest.mark.timeout(60)


class Receiver:
    """An HTTP server on loopback answering each POST with the next status of ``statuses``."""

    def __init__(self, statuses: list[int]):
        self.statuses = list(statuses)
        self.received: list[tuple[dict[str, str], bytes]] = []
        self.paths: list[str] = []
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's naming
                body = self.rfile.read(int(self.headers.get("content-length", 0)))
                receiver.received.append((dict(self.headers.items()), body))
                receiver.paths.append(self.path)
                status = receiver.statuses.pop(0) if receiver.statuses else 200
                self.send_response(status)
                if 300 <= status < 400:
                    self.send_header("Location", "/elsewhere")
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hooks/vdu"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> Receiver:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()


def queued_job(settings, team_id: str, webhook_url: str) -> str:
    with session_scope(settings) as s:
        model, fs = make_model_row(s, team_id), make_forget_set_row(s, team_id)
        job = ledger.create_job(
            s,
            team_id=team_id,
            model_id=model.id,
            forget_set_id=fs.id,
            method="vdu",
            params={"steps": 3},
            evaluation={},
            max_attempts=1,
            webhook_url=webhook_url,
        )
        return job.id


def finished_job(settings, team_id: str, webhook_url: str, outcome: str = "succeeded") -> str:
    """A job taken through the ledger as a worker would: queued, claimed, then its final state."""
    job_id = queued_job(settings, team_id, webhook_url)
    with session_scope(settings) as s:
        ledger.claim(s, job_id, "w1", 30)
        if outcome == "succeeded":
            ledger.succeed(s, job_id, "w1", metrics={"pul": {"value": 0.9}}, artifacts={"files": {}})
        else:
            ledger.fail(s, job_id, "w1", code="boom", message="it broke")
    return job_id


def forget_pending(settings, job_id: str) -> None:
    """Drop a message left pending, so that later delivery passes (other tests, workers) skip it."""
    with session_scope(settings) as s:
        s.query(WebhookDelivery).filter_by(job_id=job_id).delete()


def deliver_until(settings, predicate, timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "webhook not delivered in time"
        deliver_due(settings)
        time.sleep(0.05)


@pytest.fixture
def sender(settings):
    """The workers' settings with loopback receivers allowed and quick retries."""
    return settings.model_copy(update={"allow_private_urls": True, "webhook_retry_base_s": 0.2})


def test_verify_webhook_accepts_the_signed_message_and_rejects_replays_and_tampering():
    secret = new_secret()
    body = json.dumps({"type": "job.succeeded", "data": {"id": "job_1"}}).encode()
    now = int(time.time())
    headers = signed_headers([secret], "msg_1", now, body)
    assert verify_webhook(secret, headers, body)["data"]["id"] == "job_1"

    with pytest.raises(WebhookVerificationError, match="replayed"):
        verify_webhook(secret, headers, body, now=now + 301)
    with pytest.raises(WebhookVerificationError, match="replayed"):
        verify_webhook(secret, signed_headers([secret], "msg_1", now - 3600, body), body)
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify_webhook(secret, headers, body.replace(b"job_1", b"job_2"))
    with pytest.raises(WebhookVerificationError, match="signature"):
        verify_webhook(new_secret(), headers, body)
    with pytest.raises(WebhookVerificationError, match="missing"):
        verify_webhook(secret, {k: v for k, v in headers.items() if k != "webhook-signature"}, body)


def test_a_finished_job_is_signed_retried_after_a_500_and_logged(api, sender):
    team_id, auth = api.new_team()
    secret = api.client.get("/v1/webhook-secret", headers=auth).json()["secret"]
    assert secret.startswith("whsec_")
    assert api.client.get("/v1/webhook-secret", headers=auth).json()["secret"] == secret  # stable until rotated

    with Receiver([500]) as receiver:
        job_id = finished_job(sender, team_id, receiver.url)
        deliver_until(sender, lambda: len(receiver.received) >= 2)

    (h1, b1), (h2, b2) = receiver.received
    assert b1 == b2 and h1["webhook-id"] == h2["webhook-id"]  # one message, retried
    for headers, body in receiver.received:
        event = verify_webhook(secret, headers, body)
        assert event["type"] == "job.succeeded"
        assert event["data"]["id"] == job_id and event["data"]["status"] == "succeeded"
        assert headers["Content-Type"] == "application/json"

    deliveries = api.client.get(f"/v1/jobs/{job_id}/webhook-deliveries", headers=auth)
    assert deliveries.status_code == 200, deliveries.text
    (delivery,) = deliveries.json()["data"]
    assert delivery["id"] == h1["webhook-id"] and delivery["event_type"] == "job.succeeded"
    assert delivery["status"] == "succeeded" and delivery["attempts"] == 2
    first, second = delivery["log"]
    assert first["status_code"] == 500 and first["error"] == "HTTP 500" and first["next_attempt_at"]
    assert second["status_code"] == 200 and second["error"] is None and second["next_attempt_at"] is None
    assert all(entry["latency_ms"] >= 0 for entry in delivery["log"])

    _, stranger = api.new_team()
    other = api.client.get(f"/v1/jobs/{job_id}/webhook-deliveries", headers=stranger)
    assert other.status_code == 404 and other.headers["content-type"].startswith("application/problem+json")
    assert other.json()["code"] == "not_found"
    anonymous = api.client.get(f"/v1/jobs/{job_id}/webhook-deliveries")
    assert anonymous.status_code == 401 and anonymous.json()["field"] == "Authorization"


def test_a_loopback_receiver_is_refused_at_send_time_unless_the_operator_allows_it(api, settings):
    team_id, auth = api.new_team()
    quick = settings.model_copy(update={"webhook_retry_base_s": 0.2})
    with Receiver([]) as receiver:
        job_id = finished_job(quick, team_id, receiver.url, outcome="failed")
        deliver_due(quick)
        assert receiver.received == []
    (delivery,) = api.client.get(f"/v1/jobs/{job_id}/webhook-deliveries", headers=auth).json()["data"]
    assert delivery["event_type"] == "job.failed" and delivery["status"] == "pending"
    assert delivery["log"][0]["status_code"] is None and delivery["log"][0]["error"].startswith("refused:")
    forget_pending(settings, job_id)


def test_a_redirect_is_not_followed_but_retried(api, sender):
    team_id, auth = api.new_team()
    with Receiver([302]) as receiver:
        job_id = finished_job(sender, team_id, receiver.url)
        deliver_until(sender, lambda: len(receiver.received) >= 2)
    assert receiver.paths == ["/hooks/vdu", "/hooks/vdu"]  # never /elsewhere
    (delivery,) = api.client.get(f"/v1/jobs/{job_id}/webhook-deliveries", headers=auth).json()["data"]
    assert delivery["log"][0]["status_code"] == 302 and delivery["log"][0]["error"] == "redirect not followed"
    assert delivery["status"] == "succeeded"


def test_after_a_rotation_both_secrets_sign_until_the_grace_period_ends(api, sender):
    team_id, auth = api.new_team()
    old = api.client.get("/v1/webhook-secret", headers=auth).json()["secret"]
    rotated = api.client.post("/v1/webhook-secret/rotate", headers=auth).json()
    new = rotated["secret"]
    assert new != old and rotated["previous_expires_at"] and rotated["rotated_at"]
    with Receiver([]) as receiver:
        finished_job(sender, team_id, receiver.url)
        loop = WebhookLoop(sender.model_copy(update={"webhook_poll_interval_s": 0.1})).start()  # as workers run it
        try:
            wait_until(lambda: receiver.received, 20, what="the delivery loop")
        finally:
            loop.stop()
    headers, body = receiver.received[0]
    assert len(headers["webhook-signature"].split()) == 2
    assert verify_webhook(new, headers, body) == verify_webhook(old, headers, body)


def test_cancelling_a_queued_job_through_the_api_records_its_webhook_without_sending_it(api, settings):
    team_id, auth = api.new_team()
    job_id = queued_job(settings, team_id, "https://hooks.example.com/vdu")
    assert api.client.post(f"/v1/jobs/{job_id}/cancel", headers=auth).json()["status"] == "cancelled"
    with session_scope(settings) as s:
        (row,) = s.query(WebhookDelivery).filter_by(job_id=job_id).all()
        assert row.event_type == "job.cancelled" and row.attempts == 0 and row.payload["data"]["status"] == "cancelled"
    forget_pending(settings, job_id)
