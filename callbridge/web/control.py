"""The control API over HTTP: list and inspect calls, queue and cancel turns, interrupt, hang up."""

from __future__ import annotations

import logging
from typing import Any

from aiohttp import web

from ..calls.turns import TurnRejected, whole_turn_text
from .services import JsonError, _get_call, check_api_token, services

log = logging.getLogger(__name__)


async def list_calls(request: web.Request) -> web.Response:
    check_api_token(request)
    return web.json_response({"calls": [c.view() for c in services(request).calls.values()]})


async def get_call(request: web.Request) -> web.Response:
    check_api_token(request)
    return web.json_response(_get_call(request).view())


async def _read_json(request: web.Request) -> dict[str, Any]:
    if request.content_length is not None and request.content_length > 256 * 1024:
        raise JsonError(413, "body too large")
    try:
        body = await request.json()
    except ValueError:
        raise JsonError(400, "body must be JSON") from None
    if not isinstance(body, dict):
        raise JsonError(400, "body must be a JSON object")
    return body


async def post_turn(request: web.Request) -> web.Response:
    check_api_token(request)
    call = _get_call(request)
    body = await _read_json(request)
    interrupt = body.get("interrupt", False)
    if not isinstance(interrupt, bool):
        raise JsonError(400, "'interrupt' must be true or false")
    try:
        text = whole_turn_text(body.get("text"))
        turn = call.add_turn(text, close=True, interrupt=interrupt, source="api")
    except TurnRejected as exc:
        raise JsonError(exc.status, str(exc)) from None
    ahead = call.turns.ahead_of(turn)
    return web.json_response({"turn_id": turn.id, "queued": len(call.turns.queued),
                              "status": "queued" if ahead else "playing", "ahead": ahead}, status=202)


async def delete_turn(request: web.Request) -> web.Response:
    check_api_token(request)
    call = _get_call(request)
    if not call.cancel_turn(request.match_info["turn_id"]):
        raise JsonError(404, "no such queued or playing turn")
    return web.json_response({"cancelled": request.match_info["turn_id"]})


async def post_interrupt(request: web.Request) -> web.Response:
    check_api_token(request)
    heard = _get_call(request).interrupt(reason="interrupted by the API")
    return web.json_response({"heard": heard})


async def post_hangup(request: web.Request) -> web.Response:
    """Let the last audio play (bounded), then end the call through the carrier. Idempotent."""
    check_api_token(request)
    call = _get_call(request)
    call.hang_up("api")
    return web.json_response({"hanging_up": call.call_sid}, status=202)
