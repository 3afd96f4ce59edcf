"""Any instance answers for any call: control requests for a call held elsewhere go to its owner.

With ``[cluster]`` on, a control request (``/calls/{CallSid}…``, the text WebSocket included)
for a call this instance does not hold is looked up in the call directory and forwarded to the
owner's ``cluster.internal_url`` with the caller's own authentication (the ``Authorization``
header, or the ``?token=`` query, passed through unchanged): the owner checks it as if the app
had called it directly, and answers. ``GET /calls`` merges every live instance's list. A
forwarded request carries :data:`FORWARDED`, and an instance never forwards such a request again
(a directory that is wrong for a moment cannot make a loop).

This instance checks the token first too, so nothing unauthenticated crosses to another.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import WSMsgType, web

from ..cluster import ClusterUnavailable, Instance
from .services import SERVICES, JsonError, check_api_token, services

log = logging.getLogger(__name__)

FORWARDED = "X-Callbridge-Forwarded"  # the instance that forwarded the request (never forwarded again)
# Request headers a forwarded request keeps (authentication and the body's type).
PASSED_HEADERS = ("Authorization", "Content-Type", "Accept")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def owner_answers(handler: Handler) -> Handler:
    """Wrap a control handler of one call: forwarded to the call's owner when another instance
    holds it; answered here otherwise (including the 404 of a call nobody holds)."""

    @functools.wraps(handler)
    async def wrapper(request: web.Request) -> web.StreamResponse:
        check_api_token(request)
        svc = services(request)
        sid = request.match_info["call_sid"]
        admission = svc.admission
        if admission is None or not admission.clustered or sid in svc.calls or FORWARDED in request.headers:
            return await handler(request)
        try:
            owner = await admission.owner_of(sid)
        except ClusterUnavailable as exc:
            raise JsonError(503, f"{exc}; this instance does not hold call {sid}") from None
        if owner is None:
            return await handler(request)
        if request.headers.get("Upgrade", "").lower() == "websocket":
            return await proxy_websocket(request, owner)
        return await forward_http(request, owner)

    return wrapper


def _forward_headers(request: web.Request) -> dict[str, str]:
    admission = services(request).admission
    assert admission is not None
    headers = {k: request.headers[k] for k in PASSED_HEADERS if k in request.headers}
    headers[FORWARDED] = admission.me.id
    return headers


def _session(request: web.Request) -> aiohttp.ClientSession:
    http = services(request).http
    if http is None:
        raise JsonError(503, "the service is starting up")
    return http


async def forward_http(request: web.Request, owner: Instance) -> web.Response:
    """The same request (method, path, query, body, authentication) to ``owner``; its answer back."""
    settings = services(request).settings.cluster
    url = owner.internal_url + request.rel_url.raw_path_qs
    body = await request.read()
    try:
        async with _session(request).request(
            request.method, url, data=body or None, headers=_forward_headers(request),
            timeout=aiohttp.ClientTimeout(total=settings.forward_timeout_s), allow_redirects=False,
        ) as resp:
            data = await resp.read()
            headers = {k: resp.headers[k] for k in ("WWW-Authenticate",) if k in resp.headers}
            return web.Response(body=data, status=resp.status, headers=headers,
                                content_type=resp.content_type, charset=resp.charset)
    except TimeoutError:
        raise _timed_out(owner, f"a forwarded {request.method}", settings.forward_timeout_s) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise _unreachable(owner, f"a forwarded {request.method}", exc) from None


def _timed_out(owner: Instance, what: str, timeout_s: float) -> JsonError:
    log.warning("instance %s (holding the call) did not answer %s within %.1f s", owner.id, what, timeout_s)
    return JsonError(504, f"instance {owner.id}, which holds this call, did not answer within {timeout_s:g} s "
                          "(cluster.forward_timeout_s)")


def _unreachable(owner: Instance, what: str, exc: BaseException) -> JsonError:
    log.warning("instance %s (holding the call) could not be reached for %s: %s", owner.id, what, type(exc).__name__)
    return JsonError(502, f"instance {owner.id}, which holds this call, could not be reached ({type(exc).__name__})")


async def proxy_websocket(request: web.Request, owner: Instance) -> web.StreamResponse:
    """The call's text socket, relayed both ways to the owner's. The owner's handshake is made
    first, so a refusal there (401, 404, 409) is this request's answer too."""
    svc = services(request)
    url = owner.internal_url + request.rel_url.raw_path_qs
    timeout_s = svc.settings.cluster.forward_timeout_s
    session = _session(request)
    try:
        # The handshake is bounded like a forwarded request (the session's own default is 5 min).
        async with asyncio.timeout(timeout_s):
            upstream = await session.ws_connect(url, headers=_forward_headers(request), max_msg_size=256 * 1024,
                                                heartbeat=20.0)
    except aiohttp.WSServerHandshakeError as exc:
        raise JsonError(exc.status, f"instance {owner.id} refused the text socket") from None
    except TimeoutError:
        raise _timed_out(owner, "a text socket's handshake", timeout_s) from None
    except (aiohttp.ClientError, OSError) as exc:
        raise _unreachable(owner, "a text socket", exc) from None
    ws = web.WebSocketResponse(max_msg_size=256 * 1024, heartbeat=20.0)
    try:
        await ws.prepare(request)
    except BaseException:
        await upstream.close()
        raise
    svc.sockets.add(ws)

    async def relay(src: Any, dst: Any) -> None:
        async for msg in src:
            if msg.type is WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif msg.type is WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            else:
                break

    to_owner = asyncio.create_task(relay(ws, upstream))
    to_app = asyncio.create_task(relay(upstream, ws))
    try:
        await asyncio.wait((to_owner, to_app), return_when=asyncio.FIRST_COMPLETED)
    finally:
        for task in (to_owner, to_app):
            task.cancel()
        for task in (to_owner, to_app):
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        # Whichever side closed, the other closes with the same code.
        code = upstream.close_code if upstream.closed and upstream.close_code else ws.close_code
        await upstream.close(code=ws.close_code or 1000)
        await ws.close(code=code or 1000)
    return ws


async def merged_calls(request: web.Request, local: Handler) -> web.StreamResponse:
    """``GET /calls``: this instance's calls and every other live instance's (clustered), each
    marked with its ``instance``; instances that did not answer are listed in ``unreachable``."""
    check_api_token(request)
    svc = services(request)
    admission = svc.admission
    if admission is None or not admission.clustered or FORWARDED in request.headers:
        return await local(request)
    calls = [{"instance": admission.me.id, **c.view()} for c in svc.calls.values()]
    unreachable: list[str] = []
    try:
        peers = await admission.peers()
    except ClusterUnavailable:
        peers, unreachable = [], ["redis"]
    answers = await asyncio.gather(*(_calls_of(request, peer) for peer in peers))
    for peer, answer in zip(peers, answers):
        if answer is None:
            unreachable.append(peer.id)
        else:
            calls += [{"instance": peer.id, **c} for c in answer]
    return web.json_response({"calls": calls, "unreachable": unreachable})


async def _calls_of(request: web.Request, peer: Instance) -> list[dict[str, Any]] | None:
    settings = services(request).settings.cluster
    try:
        async with _session(request).get(peer.internal_url + "/calls", headers=_forward_headers(request),
                                         timeout=aiohttp.ClientTimeout(total=settings.forward_timeout_s)) as resp:
            if resp.status != 200:
                return None
            body = await resp.json()
            return list(body.get("calls", []))
    except (aiohttp.ClientError, OSError, TimeoutError, ValueError):
        return None


async def cluster_context(app: web.Application) -> AsyncIterator[None]:
    """cleanup_ctx: the admission's heartbeat (Redis) and the client session for forwarding."""
    svc = app[SERVICES]
    assert svc.admission is not None
    if svc.admission.clustered:
        # No connection limit: a relayed text socket holds its connection for the whole call, and
        # with aiohttp's default (100) that many sockets would stall every forwarded request.
        svc.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    await svc.admission.start()
    try:
        yield
    finally:
        await svc.admission.stop()
        if svc.http is not None:
            await svc.http.close()
            svc.http = None
