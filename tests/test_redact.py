"""How request headers are stored: credentials masked whatever their case, the rest as sent."""

from __future__ import annotations

import pytest
from aiohttp.test_utils import make_mocked_request

from webhookd.redact import MASK, SECRET_HEADERS, redact_headers, redact_request_headers

CASES = [
    [("Content-Type", "application/json"), ("X-Request-Id", "a1")],
    [("authorization", "Bearer t"), ("Content-Type", "application/json")],
    [("COOKIE", "s=1"), ("X-Api-Key", "k"), ("Cookie", "s=2"), ("Accept", "*/*")],
    [("X-Gitlab-Token", "t"), ("X-Gitlab-Token", "u")],
]


@pytest.mark.parametrize("sent", CASES)
def test_request_headers_are_stored_as_the_generic_rule_stores_them(
    sent: list[tuple[str, str]],
) -> None:
    """The request fast path (ask the case-insensitive headers for each secret name) stores
    exactly what masking every header by its lower-cased name stores, order and repeats kept."""
    headers = make_mocked_request("POST", "/hooks/x", headers=sent).headers
    stored = redact_request_headers(headers, SECRET_HEADERS)
    assert stored == redact_headers(sent, SECRET_HEADERS)
    assert [name for name, _ in stored] == [name for name, _ in sent]
    secret = [v for (k, _), (_, v) in zip(sent, stored, strict=True) if k.lower() in SECRET_HEADERS]
    assert secret == [MASK] * len(secret)
