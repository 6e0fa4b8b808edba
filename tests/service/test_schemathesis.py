"""The API against its own OpenAPI description: schemathesis generates requests for every operation of
``/openapi.json`` (a fixed example budget, derandomized: the same examples every run) with a valid
bearer key, on real Postgres, Redis and local storage, and checks every answer: no 5xx, a documented
status code, the documented content type and headers, a body that validates against the schema.
"""

from __future__ import annotations

import pytest
import schemathesis
from hypothesis import HealthCheck, settings
from schemathesis.checks import (
    content_type_conformance,
    not_a_server_error,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

pytestmark = pytest.mark.timeout(600)
EXAMPLES = 20  # per operation
CHECKS = [
    not_a_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


@pytest.fixture(scope="module")
def api_schema(api):
    return schemathesis.openapi.from_asgi("/openapi.json", api.client.app)


@pytest.fixture(scope="module")
def bearer(api) -> dict[str, str]:
    """A team of its own."""
    _, headers = api.new_team()
    return headers


@pytest.fixture(scope="module")
def statuses() -> list[int]:
    return []


schema = schemathesis.pytest.from_fixture("api_schema")


@schema.parametrize()
@settings(
    max_examples=EXAMPLES,
    derandomize=True,
    deadline=None,
    database=None,
    suppress_health_check=list(HealthCheck),
)
def test_every_operation_answers_within_its_schema(case, bearer, statuses):
    response = case.call(headers=bearer)
    statuses.append(response.status_code)
    case.validate_response(response, checks=CHECKS, headers=bearer)


def test_the_generated_requests_got_past_authentication(statuses):
    """Keeps the run above honest: the key was accepted and some requests succeeded."""
    assert len(statuses) >= EXAMPLES
    assert sum(s == 401 for s in statuses) < len(statuses) / 2, sorted(set(statuses))
    assert any(200 <= s < 300 for s in statuses)


def test_every_v1_operation_documents_a_database_outage(api):
    """What the fault tests see during a Postgres outage (503 database_unavailable) is in the schema."""
    paths = api.client.get("/openapi.json").json()["paths"]
    for path, operations in paths.items():
        for method, operation in operations.items():
            if path.startswith("/v1/"):
                assert "503" in operation["responses"], (method, path)
