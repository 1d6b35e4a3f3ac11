"""A Slack notifier in two halves: this container writes the message, a custom tool with the credential posts it.

Tool containers receive no secrets: the integrator injects a credential only into a custom tool (to the endpoint its
admin wrote) and into ``http_request`` (to the credential's hosts). So the Slack token never reaches this code; the
tenant registers ``slack_post``, a custom tool for ``chat.postMessage`` with its credential, and a plan chains the two
(docs/tool-developers.md, "Credentials").
"""

from typing import Annotated, Literal

from pydantic import BaseModel, Field

from altan.sdk import ToolContext, tool

_ICONS = {"info": ":information_source:", "warning": ":warning:", "critical": ":rotating_light:"}


class SlackMessage(BaseModel):
    channel: str
    text: str
    blocks: list[dict[str, object]]


@tool
def slack_message(
    ctx: ToolContext,
    channel_id: Annotated[str, Field(pattern=r"^[CGD][A-Z0-9]{2,20}$", description="A channel id, e.g. C0123ABCD")],
    text: Annotated[str, Field(min_length=1, max_length=3000)],
    severity: Literal["info", "warning", "critical"] = "info",
    mention: Annotated[str | None, Field(pattern=r"^U[A-Z0-9]{2,20}$", description="A user id to notify")] = None,
) -> SlackMessage:
    """Writes a Slack notification (chat.postMessage's channel, text and blocks) for slack_post to send."""
    headline = f"{_ICONS[severity]} {f'<@{mention}> ' if mention else ''}{text}"
    footer = f"sent by {ctx.user} of {ctx.tenant_id} through Altan"
    blocks: list[dict[str, object]] = [
        {"type": "section", "text": {"type": "mrkdwn", "text": headline}},
        {"type": "context", "elements": [{"type": "mrkdwn", "text": footer}]},
    ]
    return SlackMessage(channel=channel_id, text=headline, blocks=blocks)
