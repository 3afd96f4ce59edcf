"""What every handler shares (one :class:`Services` per app, under a typed key), and the
helpers every route uses: the API token check, JSON errors, log redaction of URL-borne secrets."""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import aiohttp
from aiohttp import web

from dia2 import Dia2

from ..calls.agent import Agent
from ..calls.call import Call
from ..cluster import Admission
from ..config import Settings
from ..metrics import Metrics
from ..speech import SpeechWorker
from ..tts import TtsWorker
from ..voices import VoiceRegistry
from .app_link import AppLink
from .stream_tokens import StreamTokens
from .worker_supervisor import Readiness, WorkerSupervisor

log = logging.getLogger(__name__)


@dataclass
class Services:
    """Everything the handlers share; one per app."""

    settings: Settings
    metrics: Metrics
    runtime: Dia2 | None = None
    worker: TtsWorker | None = None
    voices: VoiceRegistry | None = None
    calls: dict[str, Call] = field(default_factory=dict)  # started calls, by CallSid
    # Calls whose media socket is open and not yet started (the token is used, the slot held).
    connecting: set[Call] = field(default_factory=set)
    tokens: StreamTokens = field(default_factory=lambda: StreamTokens(30.0))
    sockets: weakref.WeakSet[web.WebSocketResponse] = field(default_factory=weakref.WeakSet)
    # Played when a turn fails (calls.fallback_audio, loaded at start-up); None: 300 ms silence.
    fallback_ulaw8k: bytes | None = None
    # Called with each call once it has ended and left the registry (diagnostics: bench/soak.py).
    call_observers: list[Callable[[Call], None]] = field(default_factory=list)
    agent: Agent | None = None
    speech: SpeechWorker | None = None  # the speech-to-text thread, when [speech] is enabled
    supervisor: WorkerSupervisor | None = None
    # Who admits calls and who holds which: in memory, or shared through Redis ([cluster]).
    admission: Admission | None = None
    # Requests forwarded to other instances (clustered only; made in the cluster's cleanup_ctx).
    http: aiohttp.ClientSession | None = None
    # The app connections of live calls ([app] websocket_url), each a task that ends with its call.
    app_links: dict[str, asyncio.Task[None]] = field(default_factory=dict)
    ready: bool = False  # start-up done (the worker may still be warming up: see readiness())
    shutting_down: bool = False

    def readiness(self) -> Readiness:
        """Whether calls are admitted now, and if not why: the one rule behind ``/healthz``,
        the voice webhook and ``/ws/stream_tts``."""
        if self.shutting_down:
            return Readiness("stopping", "the service is shutting down")
        if not self.ready or self.supervisor is None:
            return Readiness("starting", "the service is starting up")
        return self.supervisor.readiness()

    def live_calls(self) -> int:
        """Calls that count against ``calls.max_calls`` here, every carrier: each TTS reservation
        admission handed out and not yet released (a webhook's unused stream token, a media socket
        not started yet, a SIP call before its ACK, a live call). The admission keeps the count."""
        return self.admission.live if self.admission is not None else 0

    def start_call(self, call: Call, app_url: str = "") -> None:
        """A carrier's handler has a call whose media started: register it, open its app
        connection (from this instance, the one that holds the call; ``app_url`` when the call's
        route names its own app, else ``[app] websocket_url``), begin it. Every carrier starts its
        calls here, so the app sees every call whatever the carrier."""
        self.calls[call.call_sid] = call
        app = replace(self.settings.app, websocket_url=app_url) if app_url else self.settings.app
        if app.websocket_url:
            link = AppLink(call, app)  # subscribed before begin(): it gets call_started
            task = asyncio.get_running_loop().create_task(link.run(), name=f"app-link-{call.call_sid}")
            self.app_links[call.call_sid] = task
            task.add_done_callback(lambda t, sid=call.call_sid: self._link_done(sid, t))
        call.begin()

    def forget_call(self, call: Call) -> None:
        """A carrier's handler is done with a call that ended: unregister it, give its admission
        slot back, tell the observers. Every carrier ends its calls here."""
        if self.calls.get(call.call_sid) is call:
            del self.calls[call.call_sid]
        if self.admission is not None:
            self.admission.ended(call.call_sid)
        for observe in self.call_observers:
            observe(call)

    def _link_done(self, call_sid: str, task: asyncio.Task[None]) -> None:
        if self.app_links.get(call_sid) is task:
            del self.app_links[call_sid]
        if not task.cancelled() and task.exception() is not None:
            log.error("app connection task failed: %r", task.exception(), extra={"call_sid": call_sid})

    def require(self) -> tuple[Dia2, TtsWorker, VoiceRegistry]:
        if self.runtime is None or self.worker is None or self.voices is None:
            raise web.HTTPServiceUnavailable(text="starting up")
        return self.runtime, self.worker, self.voices


SERVICES = web.AppKey("services", Services)


# An in-process agent object given by the embedding app (takes precedence over [agent]).
AGENT = web.AppKey("agent", object)


# Secrets that travel in URLs: the API token as ``?token=`` (clients that cannot set headers)
# and the one-time stream token in the media stream's path.
_URL_SECRETS = re.compile(r"(?P<key>[?&]token=)[^&\s\"]*|(?P<path>/twilio/stream/)[^?\s\"/]+")


def redact_url(text: str) -> str:
    """``text`` with URL-borne tokens replaced by ``[redacted]`` (for log lines)."""
    return _URL_SECRETS.sub(lambda m: (m.group("key") or m.group("path")) + "[redacted]", text)


class RedactTokens(logging.Filter):
    """Keeps tokens out of aiohttp's access log (its request line includes path and query)."""

    def filter(self, record: logging.LogRecord) -> bool:
        if isinstance(record.msg, str) and not record.args:
            record.msg = redact_url(record.msg)
        line = record.__dict__.get("first_request_line")  # the access log's `extra` for %r
        if isinstance(line, str):
            record.__dict__["first_request_line"] = redact_url(line)
        return True


def _install_log_redaction() -> None:
    access = logging.getLogger("aiohttp.access")
    if not any(isinstance(f, RedactTokens) for f in access.filters):
        access.addFilter(RedactTokens())


def services(request: web.Request) -> Services:
    return request.app[SERVICES]


def _public_base(request: web.Request, settings: Settings) -> str:
    """The configured public base URL; without one (local use), what the request says."""
    if settings.server.public_base_url:
        return settings.server.public_base_url.rstrip("/")
    return f"{request.scheme}://{request.host}"


def _stream_base(request: web.Request, settings: Settings) -> str:
    """The base of THIS instance's media stream URLs: ``cluster.public_url`` when set (each
    instance of a cluster is reached at its own URL), else the public base URL."""
    if settings.cluster.public_url:
        return settings.cluster.public_url.rstrip("/")
    return _public_base(request, settings)


def check_api_token(request: web.Request) -> None:
    """Bearer token (or ?token= for clients that cannot set headers), constant-time compare."""
    auth = services(request).settings.auth
    if not auth.enabled:
        return
    header = request.headers.get("Authorization", "")
    given = header[7:] if header.startswith("Bearer ") else request.query.get("token", "")
    if not given or not hmac.compare_digest(given.encode(), auth.api_token.encode()):
        services(request).metrics.rejected_total.labels(reason="bad_api_token").inc()
        raise web.HTTPUnauthorized(
            text='{"error": "missing or invalid API token"}',
            content_type="application/json",
            headers={"WWW-Authenticate": "Bearer"},
        )


class JsonError(web.HTTPError):
    """An HTTP error with a JSON body ``{"error": message}`` and any status."""

    def __init__(self, status: int, message: str) -> None:
        self.status_code = status
        super().__init__(text=json.dumps({"error": message}), content_type="application/json")


def _get_call(request: web.Request) -> Call:
    sid = request.match_info["call_sid"]
    call = services(request).calls.get(sid)
    if call is None:
        raise JsonError(404, "unknown call")
    return call
