"""The agent hook: an app is called with the call's events and answers what to say or do."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from callbridge.calls.agent import AgentReply, CallableAgent, load_agent
from dia2 import Dia2

from . import test_hardening as hardening


async def test_callable_agent_accepts_the_usual_return_shapes() -> None:
    async def async_fn(call: dict, event: dict) -> dict:
        return {"say": "hi", "hangup": True}

    assert await CallableAgent(lambda c, e: "hello").on_event({}, {}) == AgentReply(say="hello")
    assert await CallableAgent(lambda c, e: None).on_event({}, {}) is None
    assert await CallableAgent(async_fn).on_event({}, {}) == AgentReply(say="hi", hangup=True)
    with pytest.raises(ValueError):
        AgentReply.from_json({"say": 3})
    with pytest.raises(ValueError, match="not both"):
        load_agent("x:y", "http://127.0.0.1:1/")
    with pytest.raises(ValueError, match="module:function"):
        load_agent("just_a_module", "")


async def test_a_webhook_agent_speaks_on_call_start_and_hangs_up_on_dtmf(tiny_runtime: Dia2, tmp_path: Path) -> None:
    """Sequenced by events, not a clock: the caller presses 9 once the agent's welcome has been
    played (its turn_done reached the agent), and the agent's hang-up ends the call."""
    seen: list[dict[str, Any]] = []
    welcome_played = asyncio.Event()
    agent_told_call_ended = asyncio.Event()

    async def hook(request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == "Bearer agent-secret"
        body = await request.json()
        seen.append(body["event"])
        kind = body["event"]["event"]
        if kind == "call_started":
            return web.json_response({"say": "Welcome, this is the agent speaking."})
        if kind == "turn_done":
            welcome_played.set()
        if kind == "call_ended":
            agent_told_call_ended.set()
        if kind == "dtmf" and body["event"]["digit"] == "9":
            return web.json_response({"hangup": True})
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/agent", hook)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
    try:
        async with hardening.running(tiny_runtime, tmp_path,
                                     agent={"webhook_url": f"http://127.0.0.1:{port}/agent", "secret": "agent-secret"},
                                     calls={"max_calls": 10, "hangup_drain_timeout_s": 10.0}) as service:
            async with hardening.raw_call(service, 1) as call:
                async with asyncio.timeout(hardening.WAIT_S):
                    await welcome_played.wait()
                await call.send("dtmf", dtmf={"track": "inbound_track", "digit": "9"})
                await hardening.until(lambda: call.closed, "the agent hangs up")
                assert call.close_code == 1000 and call.media_chunks > 0  # the welcome was spoken
            assert [r.call_sid for r in service.rest.requests] == [call.call_sid]  # through Twilio's REST API
            # The agent is sent call_ended too (its task used to be cancelled before the event went out).
            async with asyncio.timeout(hardening.WAIT_S):
                await agent_told_call_ended.wait()
    finally:
        await runner.cleanup()
    kinds = [e["event"] for e in seen]
    assert kinds[0] == "call_started" and "dtmf" in kinds and "turn_done" in kinds
    assert kinds[-1] == "call_ended" and seen[-1]["reason"] == "hangup: agent"  # the hang-up's true reason
