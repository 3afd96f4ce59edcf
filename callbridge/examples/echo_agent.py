"""A small agent for the agent hook: it answers what the caller says.

Configure it with ``[agent] callable = "callbridge.examples.echo_agent:answer"`` in the config
file, with ``[speech] enabled = true`` so that the caller's words arrive as ``caller_transcript``
(README "A conversation with no app server"). It is the agent ``scripts/demo.sh`` runs.

It uses only the agent contract (README "Agent hook"): called with the call's view and one
event, it returns ``{"say": …, "hangup": …}`` or None, and imports nothing of the service. Copy it
to start your own: replace :func:`reply_to` with your dialogue logic or an LLM call (keep it
quick or make it ``async``: the call's next events wait for it).
"""

from __future__ import annotations

import re
from typing import Any

GOODBYES = {"bye", "goodbye"}


def reply_to(text: str) -> tuple[str, bool]:
    """What to say to ``text``, and whether to hang up after saying it."""
    words = set(re.findall(r"[a-z']+", text.lower()))
    if words & GOODBYES:
        return "Goodbye, and thanks for calling.", True
    if "call" in words and "back" in words:
        return "Sure, we will call you back. Is there anything else?", False
    return f"You said: {text}", False


def answer(call: dict[str, Any], event: dict[str, Any]) -> dict[str, Any] | None:
    """The agent hook: answer each final transcript of the caller; ignore other events."""
    if event.get("event") != "caller_transcript" or not event.get("final", True):
        return None
    text = str(event.get("text", "")).strip()
    if not text:
        return None
    say, hang_up = reply_to(text)
    return {"say": say, "hangup": hang_up}
