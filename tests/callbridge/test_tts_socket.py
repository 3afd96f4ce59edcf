"""``/ws/stream_tts`` over the real service: requests on one connection are served in order or
refused with an ``error`` event, never ignored; a message that cannot be acted on is answered
as what it is; a failed serving task ends the connection with an error, not a silent wait.
The text socket's answer to a non-JSON message is checked here too."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest

from callbridge.web.services import SERVICES
from dia2 import Dia2

from . import test_hardening as hardening
from .test_service import API, Service, running

pytestmark = pytest.mark.timeout(240)

WAIT_S = 120.0  # bound on each receive: only a hang fails it
TEXT = "[S1] Hi, my name is Bob."


@pytest.fixture
async def service(tiny_runtime: Dia2, tmp_path: Path) -> AsyncIterator[Service]:
    async with running(tiny_runtime, tmp_path) as svc:
        yield svc


@pytest.fixture
async def ws(service: Service) -> AsyncIterator[aiohttp.ClientWebSocketResponse]:
    async with aiohttp.ClientSession() as http, http.ws_connect(f"{service.base}/ws/stream_tts?token={API}") as sock:
        assert (await sock.receive_json(timeout=WAIT_S))["event"] == "ready"
        yield sock


async def events_until(ws: aiohttp.ClientWebSocketResponse, ends: int) -> list[dict[str, Any]]:
    """JSON events (audio counted as {"event": "audio"}) until ``ends`` done/error events came."""
    events: list[dict[str, Any]] = []
    while sum(e["event"] in ("done", "error") for e in events) < ends:
        msg = await ws.receive(timeout=WAIT_S)
        if msg.type is aiohttp.WSMsgType.BINARY:
            events.append({"event": "audio", "last": msg.data[0] == 1})
        elif msg.type is aiohttp.WSMsgType.TEXT:
            events.append(json.loads(msg.data))
        else:
            raise AssertionError(f"connection ended: {msg.type} {ws.close_code}")
    return events


def terminal(events: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [e for e in events if e["event"] in ("done", "error")]


async def test_requests_sent_back_to_back_are_all_served_in_order(ws: aiohttp.ClientWebSocketResponse) -> None:
    for text in (TEXT, "[S1] And a second one.", "[S1] Third."):
        await ws.send_json({"type": "tts", "text": text})
    events = await events_until(ws, 3)
    assert [(e["event"], e["request"]) for e in terminal(events)] == [("done", 1), ("done", 2), ("done", 3)]
    # Each request's audio ends with its own last-flagged message before the next one's begins.
    lasts = [i for i, e in enumerate(events) if e["event"] == "audio" and e["last"]]
    dones = [i for i, e in enumerate(events) if e["event"] == "done"]
    assert len(lasts) == 3 and all(last < done for last, done in zip(lasts, dones, strict=True))


async def test_a_tts_while_a_streamed_text_is_open_is_refused_and_the_stream_goes_on(
    ws: aiohttp.ClientWebSocketResponse,
) -> None:
    await ws.send_json({"type": "tts", "text": "[S1] Hello", "stream": True})
    await ws.send_json({"type": "tts", "text": TEXT})
    [refusal] = terminal(await events_until(ws, 1))
    assert refusal["event"] == "error" and "still streaming its text" in refusal["message"]
    await ws.send_json({"type": "text", "text": " there, friend."})
    await ws.send_json({"type": "close"})
    [done] = terminal(await events_until(ws, 1))
    assert done["event"] == "done" and done["request"] == 1 and not done["cancelled"]


async def test_cancel_stops_the_running_request_and_drops_the_waiting_ones(
    ws: aiohttp.ClientWebSocketResponse,
) -> None:
    await ws.send_json({"type": "tts", "text": "[S1] One moment please, ", "stream": True})
    await events_until_audio(ws)
    await ws.send_json({"type": "close"})
    await ws.send_json({"type": "tts", "text": TEXT})
    await ws.send_json({"type": "cancel"})
    done = terminal(await events_until(ws, 2))
    assert [(e["event"], e["request"], e["cancelled"]) for e in done] == [("done", 1, True), ("done", 2, True)]
    await ws.send_json({"type": "cancel"})
    [error] = terminal(await events_until(ws, 1))
    assert "nothing to cancel" in error["message"]


async def events_until_audio(ws: aiohttp.ClientWebSocketResponse) -> None:
    while (await ws.receive(timeout=WAIT_S)).type is not aiohttp.WSMsgType.BINARY:
        pass


@pytest.mark.parametrize(("message", "answer"), [
    ("{not json", "not JSON"),
    ("[1, 2]", "JSON object with a 'type'"),
    ('{"text": "no type"}', "unknown message type None"),
    ('{"type": "text", "text": "orphan"}', "needs an open streaming request"),
    ('{"type": "close"}', "needs an open streaming request"),
    ('{"type": "speak"}', "unknown message type 'speak'"),
])
async def test_every_message_that_cannot_be_acted_on_is_answered(
    ws: aiohttp.ClientWebSocketResponse, message: str, answer: str
) -> None:
    await ws.send_str(message)
    [error] = await events_until(ws, 1)
    assert error["event"] == "error" and answer in error["message"]
    await ws.send_json({"type": "tts", "text": TEXT})  # the connection still serves
    assert terminal(await events_until(ws, 1))[0]["event"] == "done"


async def test_a_failed_serving_task_ends_the_connection_with_an_error(
    service: Service, ws: aiohttp.ClientWebSocketResponse, monkeypatch: pytest.MonkeyPatch
) -> None:
    async def broken(*args: Any, **kwargs: Any) -> Any:
        raise ZeroDivisionError("a bug in the worker")

    monkeypatch.setattr(service.app[SERVICES].worker, "open_turn", broken)
    await ws.send_json({"type": "tts", "text": TEXT})
    [error] = await events_until(ws, 1)
    assert error["event"] == "error" and "internal error: ZeroDivisionError" in error["message"]
    msg = await ws.receive(timeout=WAIT_S)
    assert msg.type in (aiohttp.WSMsgType.CLOSE, aiohttp.WSMsgType.CLOSED) and ws.close_code == 1011


@pytest.mark.parametrize(("message", "answer"), [
    ("{not json", "not a JSON object"),
    ("[1, 2]", "not a JSON object"),
    ('{"type": 3}', "with a string \"type\""),
])
async def test_the_text_socket_answers_a_message_without_a_type_as_such(
    tiny_runtime: Dia2, tmp_path: Path, message: str, answer: str
) -> None:
    async with hardening.running(tiny_runtime, tmp_path) as service, hardening.raw_call(service, 1) as call:
        await call.text_socket()
        assert call.text_ws is not None
        await call.text_ws.send_str(message)
        await hardening.until(lambda: call.errors() != [], "the answer")
        [error] = call.errors()
        assert error["status"] == 400 and answer in error["message"] and "None" not in error["message"]
