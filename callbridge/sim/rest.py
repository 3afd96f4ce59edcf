"""Twilio's REST call-update endpoint on loopback, so the service's REST hang-up has a target."""

from __future__ import annotations

import base64
import binascii
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from aiohttp import web


@dataclass(frozen=True)
class RestRequest:
    """One call-update request FakeTwilioRest answered."""

    call_sid: str
    params: dict[str, str]
    http_status: int


class FakeTwilioRest:
    """Twilio's ``POST /2010-04-01/Accounts/{AccountSid}/Calls/{CallSid}.json`` on loopback.

    ``Status=completed`` (or a new ``Twiml``/``Url``) on a live call answers 200 and ends its
    stream like Twilio: ``stop``, then the socket closes. An unknown or ended call answers 404
    with code 20404; wrong Basic auth 401 with 20003. Point the service's Twilio API base URL at
    :attr:`base_url`.
    """

    def __init__(self, account_sid: str, auth_token: str, *, host: str = "127.0.0.1", port: int = 0) -> None:
        self.account_sid = account_sid
        self.auth_token = auth_token
        self.host = host
        self.port = port
        self.requests: list[RestRequest] = []
        self._live: dict[str, Callable[[], bool]] = {}
        self._ended: set[str] = set()
        self._runner: web.AppRunner | None = None
        self.base_url: str | None = None

    @property
    def live_calls(self) -> frozenset[str]:
        return frozenset(self._live)

    def register(self, call_sid: str, hang_up: Callable[[], bool]) -> None:
        """A call went live; ``hang_up()`` ends its stream and says whether it was still live."""
        self._live[call_sid] = hang_up

    def unregister(self, call_sid: str) -> None:
        if self._live.pop(call_sid, None) is not None:
            self._ended.add(call_sid)

    async def start(self) -> str:
        """Listen on loopback; returns the base URL (``http://127.0.0.1:PORT``)."""
        app = web.Application()
        path = "/2010-04-01/Accounts/{account_sid}/Calls/{call_sid}.json"
        app.router.add_post(path, self._update)
        app.router.add_get(path, self._fetch)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port)
        await site.start()
        port = self._runner.addresses[0][1]
        self.base_url = f"http://{self.host}:{port}"
        return self.base_url

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    def _error(self, status: int, code: int, message: str) -> web.Response:
        body = {"code": code, "message": message, "more_info": f"https://www.twilio.com/docs/errors/{code}",
                "status": status}
        return web.json_response(body, status=status)

    def _authorized(self, request: web.Request) -> bool:
        # Decoded by hand: aiohttp 3.14 deprecates BasicAuth (a warning is an error in tests).
        scheme, _, encoded = request.headers.get("Authorization", "").partition(" ")
        try:
            login, _, password = base64.b64decode(encoded, validate=True).decode("utf-8").partition(":")
        except (binascii.Error, ValueError):
            return False
        return (
            scheme.lower() == "basic"
            and login == self.account_sid
            and secrets.compare_digest(password.encode(), self.auth_token.encode())
            and request.match_info["account_sid"] == self.account_sid
        )

    def _resource(self, call_sid: str, status: str) -> dict[str, Any]:
        uri = f"/2010-04-01/Accounts/{self.account_sid}/Calls/{call_sid}.json"
        return {"sid": call_sid, "account_sid": self.account_sid, "status": status, "direction": "inbound",
                "api_version": "2010-04-01", "uri": uri}

    async def _fetch(self, request: web.Request) -> web.Response:
        if not self._authorized(request):
            return self._error(401, 20003, "Authenticate")
        sid = request.match_info["call_sid"]
        if sid in self._live:
            return web.json_response(self._resource(sid, "in-progress"))
        if sid in self._ended:
            return web.json_response(self._resource(sid, "completed"))
        return self._error(404, 20404, f"The requested resource {request.path} was not found")

    async def _update(self, request: web.Request) -> web.Response:
        sid = request.match_info["call_sid"]
        params = {k: v for k, v in (await request.post()).items() if isinstance(v, str)}
        response = await self._answer_update(request, sid, params)
        self.requests.append(RestRequest(sid, params, response.status))
        return response

    async def _answer_update(self, request: web.Request, sid: str, params: dict[str, str]) -> web.Response:
        if not self._authorized(request):
            return self._error(401, 20003, "Authenticate")
        status = params.get("Status")
        if status not in (None, "completed", "canceled"):
            return self._error(400, 21218, f"Invalid Status {status!r}")
        # completed, or new TwiML/Url, ends the stream; "canceled" only touches ringing calls.
        ends = status == "completed" or "Twiml" in params or "Url" in params
        if not ends and status is None:
            return self._error(400, 21218, "Nothing to update: pass Status, Twiml or Url")
        if sid not in self._live:
            return self._error(404, 20404, f"The requested resource {request.path} was not found")
        if not ends:  # "canceled" only affects queued or ringing calls; this one is in progress
            return web.json_response(self._resource(sid, "in-progress"))
        hang_up = self._live.pop(sid)
        self._ended.add(sid)
        if not hang_up():
            return self._error(404, 20404, f"The requested resource {request.path} was not found")
        return web.json_response(self._resource(sid, "completed"))
