"""The agent hook: for apps that prefer to be called rather than to call the control API.

An agent sees a call's events (``call_started``, ``dtmf``, ``barge_in``, ``turn_done``,
``call_ended``, and the caller-speech events: ``caller_transcript`` and its kin) and may answer with what to do next: speak a text, interrupt, hang up. It is
either a Python callable (``[agent] callable = "package.module:function"``, sync or async)
or a webhook URL that receives the event as JSON and answers JSON (or 204 for nothing).
"""

from __future__ import annotations

import asyncio
import importlib
import inspect
import json
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import aiohttp

log = logging.getLogger(__name__)

AGENT_EVENTS = frozenset({
    "call_started", "dtmf", "barge_in", "turn_done", "call_ended",
    # caller speech ([speech] enabled): an agent answers a caller_transcript with what to say
    "caller_speech_started", "caller_speech_stopped", "caller_transcript", "caller_transcript_dropped",
    "caller_transcript_failed",
})


@dataclass(frozen=True)
class AgentReply:
    say: str | None = None
    interrupt: bool = False
    hangup: bool = False

    @classmethod
    def from_json(cls, data: Any) -> AgentReply | None:
        if data is None:
            return None
        if not isinstance(data, dict):
            raise ValueError("an agent reply must be a JSON object")
        say = data.get("say")
        if say is not None and not isinstance(say, str):
            raise ValueError("'say' must be a string")
        return cls(say=say or None, interrupt=bool(data.get("interrupt", False)), hangup=bool(data.get("hangup", False)))


class Agent(Protocol):
    async def on_event(self, call: dict[str, Any], event: dict[str, Any]) -> AgentReply | None: ...

    async def close(self) -> None: ...


class CallableAgent:
    """Wraps ``fn(call, event)`` returning an AgentReply, a dict, a string to say, or None."""

    def __init__(self, fn: Callable[[dict[str, Any], dict[str, Any]], Any]) -> None:
        self.fn = fn

    async def on_event(self, call: dict[str, Any], event: dict[str, Any]) -> AgentReply | None:
        result = self.fn(call, event)
        if inspect.isawaitable(result):
            result = await result
        if isinstance(result, str):
            return AgentReply(say=result)
        if isinstance(result, AgentReply) or result is None:
            return result
        return AgentReply.from_json(result)

    async def close(self) -> None:
        return None


class WebhookAgent:
    """POSTs ``{"call": …, "event": …}`` to ``url`` (bearer ``secret`` if set); JSON reply or 204."""

    def __init__(self, url: str, secret: str = "", timeout_s: float = 5.0) -> None:
        self.url = url
        self.secret = secret
        self.timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._session: aiohttp.ClientSession | None = None

    async def on_event(self, call: dict[str, Any], event: dict[str, Any]) -> AgentReply | None:
        if self._session is None:
            self._session = aiohttp.ClientSession(timeout=self.timeout)
        headers = {"Authorization": f"Bearer {self.secret}"} if self.secret else {}
        async with self._session.post(self.url, json={"call": call, "event": event}, headers=headers) as resp:
            if resp.status == 204:
                return None
            if resp.status >= 400:
                raise RuntimeError(f"agent webhook answered HTTP {resp.status}")
            text = await resp.text()
        return AgentReply.from_json(json.loads(text)) if text.strip() else None

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def load_agent(callable_path: str, webhook_url: str, secret: str = "", timeout_s: float = 5.0) -> Agent | None:
    """The configured agent, or None. ``callable_path`` is ``module:function``."""
    if callable_path and webhook_url:
        raise ValueError("configure either agent.callable or agent.webhook_url, not both")
    if callable_path:
        module_name, _, attr = callable_path.partition(":")
        if not attr:
            raise ValueError(f"agent.callable {callable_path!r} must look like package.module:function")
        fn = getattr(importlib.import_module(module_name), attr)
        return CallableAgent(fn)
    if webhook_url:
        return WebhookAgent(webhook_url, secret, timeout_s)
    return None


async def run_agent(
    agent: Agent,
    events: asyncio.Queue[dict[str, Any]],
    view: Callable[[], dict[str, Any]],
    act: Callable[[AgentReply], Awaitable[None]],
    call_sid: str,
) -> None:
    """Feed a call's events to the agent and carry out its replies, until the call ends.

    An agent that fails is logged and skipped for that event; it never ends the call.
    """
    while True:
        event = await events.get()
        if event.get("event") not in AGENT_EVENTS:
            continue
        try:
            reply = await agent.on_event(view(), event)
        except Exception as exc:  # the agent is user code or a remote service
            log.warning("agent failed on %s: %s", event.get("event"), exc, extra={"call_sid": call_sid})
            reply = None
        if reply is not None and event.get("event") != "call_ended":
            await act(reply)
        if event.get("event") == "call_ended":
            return
