"""A Slack notifier: posts to a channel with the tenant's Slack token, injected by the platform for each call.

The tool declares the credential it needs (``credential="slack"``); a tenant's admin stores a credential of that name
and grants it to the tool (``"tools": ["slack_notify"]``). Without the grant the call fails clearly and no secret
leaves the integrator. Build the image from deploy/docker/tool-container.Dockerfile with ``pip install httpx``.
"""

import os
from typing import Annotated, Literal

import httpx
from pydantic import Field

from altan.sdk import ToolContext, ToolError, tool

_ICONS = {"info": ":information_source:", "warning": ":warning:", "critical": ":rotating_light:"}


@tool(credential="slack")
async def slack_notify(
    ctx: ToolContext,
    channel_id: Annotated[str, Field(pattern=r"^[CGD][A-Z0-9]{2,20}$", description="A channel id, e.g. C0123ABCD")],
    text: Annotated[str, Field(min_length=1, max_length=3000)],
    severity: Literal["info", "warning", "critical"] = "info",
    mention: Annotated[str | None, Field(pattern=r"^U[A-Z0-9]{2,20}$", description="A user id to notify")] = None,
) -> dict[str, str]:
    """Posts a notification to a Slack channel; answers the channel and the message's timestamp."""
    assert ctx.credential is not None  # declared: the SDK refuses a call without it
    headline = f"{_ICONS[severity]} {f'<@{mention}> ' if mention else ''}{text}"
    footer = {"type": "context", "elements": [{"type": "mrkdwn", "text": f"sent by {ctx.user} through Altan"}]}
    blocks = [{"type": "section", "text": {"type": "mrkdwn", "text": headline}}, footer]
    api = os.environ.get("SLACK_API_URL", "https://slack.com/api")  # a fake Slack in tests
    async with httpx.AsyncClient(timeout=10) as client:
        answer = await client.post(
            f"{api}/chat.postMessage",
            headers=ctx.credential.headers,
            json={"channel": channel_id, "text": headline, "blocks": blocks},
        )
    body = answer.json()
    if not body.get("ok"):  # Slack answers 200 with "ok": false and an error code
        raise ToolError(f"Slack refused the message: {body.get('error', f'HTTP {answer.status_code}')}")
    return {"channel": body["channel"], "ts": body["ts"]}
