"""The agent hook: an app is called with the call's events and answers what to say or do."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web

from callbridge.calls.agent import AgentReply, CallableAgent, load_agent
from dia2 import Dia2

from .test_service import running


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
    seen: list[dict[str, Any]] = []

    async def hook(request: web.Request) -> web.Response:
        assert request.headers["Authorization"] == "Bearer agent-secret"
        body = await request.json()
        seen.append(body["event"])
        kind = body["event"]["event"]
        if kind == "call_started":
            return web.json_response({"say": "Welcome, this is the agent speaking."})
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
        async with running(tiny_runtime, tmp_path,
                           agent={"webhook_url": f"http://127.0.0.1:{port}/agent", "secret": "agent-secret"},
                           calls={"max_calls": 10, "hangup_drain_timeout_s": 10.0}) as svc:
            # The DTMF comes once the welcome has played; the hang-up then drains nothing.
            cfg = svc.sim(texts=[], dtmf=[(6.0, "9")], expect_greeting=True, linger_s=20.0)
            from callbridge.sim import simulate_call

            report = (await simulate_call(cfg, 0)).to_json()
            # The agent is sent call_ended too (its task used to be cancelled before the event went out).
            async with asyncio.timeout(60):
                while not any(e["event"] == "call_ended" for e in seen):
                    await asyncio.sleep(0.02)
    finally:
        await runner.cleanup()
    kinds = [e["event"] for e in seen]
    assert kinds[0] == "call_started" and "dtmf" in kinds and "turn_done" in kinds
    assert kinds[-1] == "call_ended" and seen[-1]["reason"] == "hangup: agent"  # the hang-up's true reason
    assert report["protocol_errors"] == [] and report["lost_or_reordered"] == 0
    assert report["chunks"] > 0  # the agent's welcome was spoken
    assert report["ended_by"] == "rest"  # and its hang-up went through Twilio's REST API
    await asyncio.sleep(0)
