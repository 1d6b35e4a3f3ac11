"""API.md "Outbound calls (egress)" from outside: private destinations are refused in every spelling."""

from __future__ import annotations

import pytest

from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import Stack

REFUSED = [
    "http://127.0.0.1:{port}/",  # loopback, even on the allowed fake's host but another port... see below
    "http://localhost/",
    "http://localhost./",
    "http://127.0.0.1./",
    "http://[::1]/",
    "http://[::ffff:127.0.0.1]/",
    "http://[::ffff:7f00:1]/",
    "http://2130706433/",
    "http://0177.0.0.1/",
    "http://0x7f000001/",
    "http://0x7f.0.0.1/",
    "http://127.1/",
    "http://0.0.0.0/",
    "http://10.0.0.1/",
    "http://172.16.0.1/",
    "http://192.168.1.1/",
    "http://100.64.0.1/",
    "http://169.254.169.254/latest/meta-data/",
    "http://[fe80::1]/",
    "http://[fd00::1]/",
    "http://224.0.0.1/",
    "http://240.0.0.1/",
    "http://user:pw@127.0.0.1/",
    "http://example.com@127.0.0.1/",
    "ftp://example.com/",
    "file:///etc/passwd",
    "gopher://127.0.0.1/",
]


@pytest.mark.parametrize("url", REFUSED)
def test_private_destinations_are_refused_and_audited(
    stack: Stack, tenant: str, url: str, third_party: FakeThirdParty
) -> None:
    # The fake listens on an allowed port; any *other* port on loopback stays forbidden.
    url = url.replace("{port}", str(third_party.port + 1 if third_party.port < 65535 else third_party.port - 1))
    with stack.client(tenant) as api:
        answer = api.post("/v1/tools/http_request/invoke", json={"arguments": {"url": url}})
        assert answer.status_code in (400, 403), answer.text
        message = answer.json()["error"]["message"]
        assert "egress refused" in message or "url" in message
        assert "pw" not in message
        if answer.status_code == 403:
            events = api.get("/v1/audit").json()["events"]
            assert events[-1]["outcome"] == "denied" and "egress refused" in events[-1]["reason"]


def test_allowed_fake_third_party_works(stack: Stack, tenant: str, third_party: FakeThirdParty) -> None:
    with stack.client(tenant) as api:
        answer = api.post("/v1/tools/http_request/invoke", json={"arguments": {"url": f"{third_party.base_url}/hello"}})
        assert answer.status_code == 200 and answer.json()["output"]["path"] == "/hello"


def test_redirect_to_a_private_address_is_refused(stack: Stack, tenant: str, third_party: FakeThirdParty) -> None:
    with stack.client(tenant) as api:
        target = "http://169.254.169.254/latest/meta-data/"
        answer = api.post(
            "/v1/tools/http_request/invoke", json={"arguments": {"url": f"{third_party.base_url}/redirect?to={target}"}}
        )
        assert answer.status_code == 403, answer.text
        assert "egress refused" in answer.json()["error"]["message"]
        followed = api.post(
            "/v1/tools/http_request/invoke", json={"arguments": {"url": f"{third_party.base_url}/redirect?to=/landed"}}
        )
        assert followed.status_code == 200 and followed.json()["output"]["path"] == "/landed"


def test_custom_tool_pointing_at_metadata_is_refused(stack: Stack, tenant: str) -> None:
    with stack.client(tenant) as api:
        api.post(
            "/v1/tools",
            json={
                "tool_id": "meta",
                "name": "M",
                "method": "GET",
                "endpoint": "http://169.254.169.254/computeMetadata/v1/",
            },
        )
        answer = api.post("/v1/tools/meta/invoke", json={"arguments": {}})
        assert answer.status_code == 403 and "egress refused" in answer.json()["error"]["message"]
