"""Property-based fuzzing of the whole OpenAPI surface (schemathesis) with the stub backend: no 5xx, ever.

Operations are driven one by one through hypothesis (`operation.as_strategy()`):
schemathesis' own `from_fixture` + `parametrize` does not run under pytest 9.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import not_a_server_error

from guard.api import create_app
from guard.settings import Settings
from tests.server_fixtures import StubBackend

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("clean_env")]

EXAMPLES_PER_OPERATION = 25
FUZZ = settings(
    max_examples=EXAMPLES_PER_OPERATION, deadline=None, database=None, suppress_health_check=list(HealthCheck)
)


def test_no_server_errors_on_any_generated_request(stub_bundle: Path) -> None:
    settings_ = Settings(bundle=stub_bundle, max_texts_per_request=8, max_text_chars=500, api_key="fuzz-key")
    stub = StubBackend()
    # schemathesis starts the app's lifespan itself (in-process ASGI) before the first call.
    schema = schemathesis.openapi.from_asgi("/openapi.json", create_app(settings_, backend=stub))
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 10
    for operation in operations:
        _fuzz(operation, {"Authorization": "Bearer fuzz-key"})
        _fuzz(operation, {})  # unauthenticated: 401 (or open endpoints), never 5xx
    assert stub.pass1_rows > 1  # the fuzzer got past validation into the guard


def _fuzz(operation, headers: dict[str, str]) -> None:
    @FUZZ
    @given(case=operation.as_strategy())
    def no_5xx(case) -> None:
        case.call_and_validate(headers=headers, checks=[not_a_server_error])

    no_5xx()
