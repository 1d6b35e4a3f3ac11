"""API.md "Outbound calls (egress)" from outside: private destinations are refused in every spelling."""

from __future__ import annotations

import pytest

from tests.e2e.fake_third_party import FakeThirdParty
from tests.e2e.stack import Stack

REFUSED = [
    ("http://127.0.0.1:{port}/", "loopback"),  # loopback on a port the allow list does not name
    ("http://localhost/", "loopback"),
    ("http://localhost./", "loopback"),
    ("http://127.0.0.1./", "loopback"),
    ("http://[::1]/", "loopback"),
    ("http://[::ffff:127.0.0.1]/", "loopback"),
    ("http://[::ffff:7f00:1]/", "loopback"),
    ("http://2130706433/", "loopback"),
    ("http://0177.0.0.1/", "loopback"),
    ("http://0x7f000001/", "loopback"),
    ("http://0x7f.0.0.1/", "loopback"),
    ("http://127.1/", "loopback"),
    ("http://0.0.0.0/", "unspecified"),
    ("http://10.0.0.1/", "private"),
    ("http://172.16.0.1/", "private"),
    ("http://192.168.1.1/", "private"),
    ("http://100.64.0.1/", "CGNAT"),
    ("http://169.254.169.254/latest/meta-data/", "link-local"),
    ("http://[fe80::1]/", "link-local"),
    ("http://[fd00::1]/", "private"),
    ("http://224.0.0.1/", "multicast"),
    ("http://240.0.0.1/", "reserved"),
    ("http://user:pw@127.0.0.1/", "loopback"),
    ("http://example.com@127.0.0.1/", "loopback"),
    ("ftp://example.com/", "scheme 'ftp'"),
    ("file:///etc/passwd", "scheme 'file'"),
    ("gopher://127.0.0.1/", "scheme 'gopher'"),
]


@pytest.mark.parametrize(("url", "reason"), REFUSED)
def test_private_destinations_are_refused_and_audited(
    stack: Stack, tenant: str, url: str, reason: str, third_party: FakeThirdParty
) -> None:
    url = url.replace("{port}", str(third_party.port + 1 if third_party.port < 65535 else third_party.port - 1))
    with stack.client(tenant) as api:
        answer = api.post("/v1/tools/http_request/invoke", json={"arguments": {"url": url}})
        assert answer.status_code == 403, answer.text
        assert answer.json()["error"]["code"] == "PERMISSION_DENIED"
        message = answer.json()["error"]["message"]
        assert message.startswith("egress refused") and reason in message
        assert "pw" not in message
        (event,) = api.get("/v1/audit").json()["events"]
        assert event["outcome"] == "denied" and event["reason"] == message and event["tool_id"] == "http_request"
        if not reason.startswith("scheme"):  # the destination that was refused is audited as host:port
            assert event["target"] and event["target"].rsplit(":", 1)[1].isdigit(), event


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
