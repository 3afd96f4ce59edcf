"""One simulated call, start to report (:func:`simulate_call`), and many at once
(:func:`run_simulation`). The steps are listed in :mod:`callbridge.sim`."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import json
import logging
import re
import secrets
from collections import deque
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp
import numpy as np
import soundfile as sf
from twilio.request_validator import RequestValidator
from yarl import URL

from .caller import CallerTrack, _caller_track
from .config import SimConfig, SimulatorError, is_loopback_url
from .queue import CHUNK_S, SAMPLE_RATE, PlayoutQueue, ulaw_decode
from .report import CallReport, TurnStats, _ms, summarize, summarize_reports
from .rest import FakeTwilioRest
from .wire import TwimlAnswer, parse_twiml, validate_service_message

log = logging.getLogger("callbridge.sim")

MIN_GAP_SAMPLES = 8  # a dry queue shorter than 1 ms is clock rounding, not an underrun
MAX_ERRORS_KEPT = 200  # protocol_errors keeps this many strings; the rest are only counted
OUTBOX_MAX = 4096  # messages waiting for the socket writer; more means the socket is stuck
POLL_S = 0.01  # how often waits look at the call's state
CUE_TAIL_S = 0.3  # after the last dtmf or caller speech, time left for the service to react
CLOSE_TIMEOUT_S = 2.0  # bound on each closing step (stop flush, close handshake)
HTTP_TIMEOUT_S = 10.0
REQUEST_TIMEOUT = aiohttp.ClientTimeout(total=HTTP_TIMEOUT_S)
MAX_WS_MSG = 16 * 1024 * 1024  # Twilio takes media of any size; do not cap it at 4 MiB


def _new_sid(prefix: str) -> str:
    return prefix + secrets.token_hex(16)


# ---------------------------------------------------------------------------------- a call


def _ws_url(base_url: str, path: str) -> URL:
    base = URL(base_url)
    scheme = "wss" if base.scheme == "https" else "ws"
    return URL(f"{scheme}://{base.raw_authority}{base.raw_path.rstrip('/')}{path}", encoded=True)


def _split_words(text: str) -> list[str]:
    """Chunks an LLM might stream: each word with its trailing space; they join back to text."""
    return re.findall(r"\S+\s*", text) or [text]


class _CallRun:
    """One simulated call: the state, the socket tasks and the scenario. Built per call."""

    def __init__(self, cfg: SimConfig, index: int, rest: FakeTwilioRest | None, caller: CallerTrack) -> None:
        self.cfg = cfg
        self.index = index
        self.rest = rest
        self.caller = caller
        self.voice_chunk = caller.voice_chunk if cfg.barge_in_at_s is not None else None
        self.loop = asyncio.get_running_loop()
        self.call_sid = _new_sid("CA")
        self.stream_sid = _new_sid("MZ")
        self.report = CallReport(call_sid=self.call_sid, index=index)
        self.queue = PlayoutQueue()
        self.turns: list[TurnStats] = []
        self.turns_by_id: dict[str, TurnStats] = {}
        self.pending_ws_turn: TurnStats | None = None  # sent over the socket, id not yet known
        self.active_ids: set[str] = set()
        self.custom_parameters: dict[str, str] = {}
        self.t0 = 0.0  # loop time `start` was sent: sample 0 of the played timeline
        self.started = False  # `start` queued: the clock runs
        self.start_on_wire = False  # `start` written to the socket
        self.ending = False
        self.end_t: float | None = None
        self.stop_sent = False
        self.seq = 0
        self.outbox: asyncio.Queue[tuple[str, str] | None] = asyncio.Queue(maxsize=OUTBOX_MAX)
        self.expected_echoes: deque[str] = deque()
        self.speech_start_t: float | None = None
        self.clear_times: list[float] = []
        self.discarded_msgs = 0
        self.http: aiohttp.ClientSession | None = None
        self.media_http: aiohttp.ClientSession | None = None
        self.ws: aiohttp.ClientWebSocketResponse | None = None
        self.text_ws: aiohttp.ClientWebSocketResponse | None = None
        self.writer: asyncio.Task[None] | None = None
        self.background: list[asyncio.Task[None]] = []
        self.end_tasks: list[asyncio.Task[None]] = []

    # ---------------------------------------------------------------- small helpers

    def _now(self) -> float:
        return self.loop.time()

    def _clock(self, now: float) -> int:
        return max(0, int((now - self.t0) * SAMPLE_RATE))

    def _error(self, message: str) -> None:
        self.report.protocol_error_count += 1
        if len(self.report.protocol_errors) < MAX_ERRORS_KEPT:
            self.report.protocol_errors.append(message)
        log.debug("call %s: %s", self.call_sid, message)

    def _auth(self) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.cfg.api_token}"}

    @property
    def greeting(self) -> TurnStats | None:
        return next((t for t in self.turns if t.kind == "greeting"), None)

    def _greeting_turn(self) -> TurnStats:
        turn = self.greeting
        if turn is None:
            turn = TurnStats(index=0, kind="greeting", text=None, sent_t=self.t0)
            self.turns.insert(0, turn)
        return turn

    def _emit(self, event: str, body: dict[str, Any]) -> bool:
        """Queue one message for the socket writer; numbers it (``connected`` has no number)."""
        if self.stop_sent or self.ws is None:
            return False
        if event == "connected":
            msg: dict[str, Any] = {"event": "connected", "protocol": "Call", "version": "1.0.0"}
        else:
            self.seq += 1
            msg = {"event": event, "sequenceNumber": str(self.seq), **body, "streamSid": self.stream_sid}
        try:
            self.outbox.put_nowait((event, json.dumps(msg)))
        except asyncio.QueueFull:
            self._error("simulator: outbox full (the service stopped reading); message dropped")
            return False
        return True

    def _echo(self, names: list[str]) -> None:
        for name in names:
            expected = self.expected_echoes.popleft() if self.expected_echoes else None
            if expected != name:  # a self-check of the queue model: echoes leave in arrival order
                self.report.marks_out_of_order += 1
            if self._emit("mark", {"mark": {"name": name}}):
                self.report.marks_echoed += 1

    # ---------------------------------------------------------------- socket tasks

    async def _writer(self) -> None:
        """The only task that writes the media socket, so numbering order is sending order."""
        assert self.ws is not None
        while True:
            item = await self.outbox.get()
            if item is None:
                return
            try:
                await self.ws.send_str(item[1])
            except (ConnectionError, aiohttp.ClientError):
                self._socket_closed()
                return
            if item[0] == "start":
                self.start_on_wire = True

    async def _reader(self) -> None:
        """The only task that reads the media socket; ends when the socket closes."""
        assert self.ws is not None
        async for msg in self.ws:
            if self.ending:
                continue  # after stop Twilio acts on nothing; keep reading for the close
            now = self._now()
            if msg.type is aiohttp.WSMsgType.TEXT:
                self._on_message(msg.data, now)
            elif msg.type is aiohttp.WSMsgType.BINARY:
                self._error("31950 binary frame (Twilio takes JSON text frames only)")
            elif msg.type is aiohttp.WSMsgType.ERROR:
                break
        self._socket_closed()

    def _socket_closed(self) -> None:
        if not self.ending:
            self.ending = True
            self.report.ended_by = "service"
            self.end_t = self._now()
            if self.started:
                self.queue.advance(self._clock(self.end_t))

    def _on_message(self, text: str, now: float) -> None:
        if not self.start_on_wire:
            self._error(f"31951 message before start: {text[:60]!r}")
            return
        self._echo(self.queue.advance(self._clock(now)))
        msg, problem = validate_service_message(text, self.stream_sid)
        if msg is None:
            self._error(problem or "31951 invalid message")
            return
        if msg.event == "media":
            turn = self.turns[-1] if self.turns else self._greeting_turn()
            turn.chunks += 1
            turn.media_after_clear += turn.cleared
            turn.audio_bytes += len(msg.payload)
            turn.arrivals.append((now, len(msg.payload)))
            turn.last_media_t = now
            if turn.first_media_t is None:
                turn.first_media_t = now
            self.report.chunks += 1
            self.report.audio_ms_received += 1000.0 * len(msg.payload) / SAMPLE_RATE
            if not self.queue.push_media(msg.payload, turn):
                self.discarded_msgs += 1
                if self.discarded_msgs == 1:
                    self._error("31931 playback queue over 10 min: media discarded")
            turn.max_queue_bytes = max(turn.max_queue_bytes, self.queue.queued)
        elif msg.event == "mark":
            self.report.marks_sent += 1
            self.expected_echoes.append(msg.name)
            self._echo(self.queue.push_mark(msg.name))
        else:  # clear
            self.report.clears += 1
            self.clear_times.append(now)
            if self.turns:
                self.turns[-1].cleared = True
            names = self.queue.clear()
            self.report.marks_cleared += len(names)
            self._echo(names)

    async def _ticker(self) -> None:
        """Plays the queue on the clock; wakes every chunk, or sooner when a mark is due."""
        for _ in range(int(self.cfg.max_call_s / 0.001) + 10):  # sleeps >= 1 ms: a hard bound
            if self.ending:
                return
            self._echo(self.queue.advance(self._clock(self._now())))
            wait = CHUNK_S
            due = self.queue.samples_to_next_mark()
            if due is not None:
                wait = min(wait, max(due / SAMPLE_RATE, 0.001))
            await asyncio.sleep(wait)

    async def _caller_audio(self) -> None:
        """Caller media every 20 ms at absolute deadlines, dtmf on cue; late wake-ups burst."""
        cues = deque(sorted(self.cfg.dtmf))
        for n in range(int(self.cfg.max_call_s / CHUNK_S) + 1):
            delay = self.t0 + n * CHUNK_S - self._now()
            if delay > 0:
                await asyncio.sleep(delay)
            if self.ending:
                return
            while cues and cues[0][0] <= n * CHUNK_S + 1e-9:
                digit = cues.popleft()[1]
                if self._emit("dtmf", {"dtmf": {"track": "inbound_track", "digit": digit}}):
                    self.report.dtmf_sent.append(digit)
            if n == self.voice_chunk:
                self.speech_start_t = self._now()
            payload = base64.b64encode(self.caller.chunk(n)).decode("ascii")
            self._emit("media", {"media": {"track": "inbound", "chunk": str(n + 1),
                                           "timestamp": str(n * 20), "payload": payload}})

    async def _text_events(self) -> None:
        assert self.text_ws is not None
        async for msg in self.text_ws:
            if msg.type is not aiohttp.WSMsgType.TEXT:
                continue
            try:
                event = json.loads(msg.data)
            except ValueError:
                self.report.service_errors.append(f"text socket sent invalid JSON: {msg.data[:60]!r}")
                continue
            if isinstance(event, dict):
                self._on_service_event(event, self._now())

    def _turn_for_event(self, turn_id: Any) -> TurnStats | None:
        if not isinstance(turn_id, str):
            return None
        turn = self.turns_by_id.get(turn_id)
        if turn is None:
            if self.pending_ws_turn is not None:
                turn, self.pending_ws_turn = self.pending_ws_turn, None
            elif not any(t.kind == "text" for t in self.turns) or (
                self.greeting is not None and self.greeting.turn_id is None
            ):
                turn = self._greeting_turn()  # a turn we did not send: the greeting
            else:
                return None
            turn.turn_id = turn_id
            self.turns_by_id[turn_id] = turn
        return turn

    def _on_service_event(self, event: dict[str, Any], now: float) -> None:
        kind = str(event.get("event"))
        self.report.service_events[kind] = self.report.service_events.get(kind, 0) + 1
        if kind == "dtmf":
            self.report.dtmf_events.append(str(event.get("digit")))
            return
        if kind == "call_ended":
            self.report.call_ended_event = True
            return
        if kind == "error":
            self.report.service_errors.append(str(event.get("message"))[:200])
            return
        if kind.startswith("caller_transcript"):
            self._on_transcript(kind, event)
            return
        if kind == "turn_queued" and event.get("source") not in (None, "greeting", "api", "stream"):
            self._answer_turn(event.get("turn_id"))  # queued by the app, an agent or the service
        turn = self._turn_for_event(event.get("turn_id"))
        if turn is None:
            return
        words = event.get("words") if kind == "heard" else event.get("heard")
        words = [str(w) for w in words] if isinstance(words, list) else None
        if kind in ("turn_queued", "turn_started"):
            if turn.done_t is None:
                self.active_ids.add(str(turn.turn_id))
        elif kind == "first_audio":
            turn.service_first_audio_t = now
        elif kind == "heard" and words:
            turn.heard.extend(words)
        elif kind == "barge_in":
            turn.barge_in_heard = words
        elif kind == "turn_done":
            turn.done_t = now
            turn.interrupted = bool(event.get("interrupted"))
            turn.state = str(event["state"]) if "state" in event else None
            if words is not None:
                turn.heard = words
            self.active_ids.discard(str(turn.turn_id))

    def _on_transcript(self, kind: str, event: dict[str, Any]) -> None:
        outcome = {"caller_transcript": "transcript", "caller_transcript_dropped": "dropped",
                   "caller_transcript_failed": "failed"}.get(kind)
        if outcome is None:
            return
        self.report.transcripts.append({
            "utterance_id": event.get("utterance_id"), "outcome": outcome,
            "text": event.get("text") if outcome == "transcript" else None,
            "reason": event.get("reason") or event.get("error"),
            "eos_to_final_ms": event.get("eos_to_final_ms"), "during_bot": event.get("during_bot"),
        })

    def _answer_turn(self, turn_id: Any) -> None:
        if not isinstance(turn_id, str) or turn_id in self.turns_by_id:
            return
        turn = TurnStats(index=len(self.turns), kind="answer", text=None, sent_t=self._now(), turn_id=turn_id)
        self.turns.append(turn)
        self.turns_by_id[turn_id] = turn

    # ---------------------------------------------------------------- waiting

    async def _wait_for(self, ready: Callable[[], bool], timeout_s: float, *, after_end: bool = False) -> bool:
        """Poll ``ready`` until true, ``timeout_s`` passes or (unless ``after_end``) the call ends."""
        deadline = self._now() + timeout_s
        for _ in range(int(timeout_s / POLL_S) + 2):
            if ready():
                return True
            left = deadline - self._now()
            if (self.ending and not after_end) or left <= 0:
                break
            await asyncio.sleep(min(POLL_S, left))
        return ready()

    def _quiet(self) -> bool:
        since = self.queue.empty_since
        return since is not None and self.queue.clock - since >= self.cfg.quiet_s * SAMPLE_RATE

    def _drained(self) -> bool:
        return self.queue.queued == 0

    # ---------------------------------------------------------------- the scenario

    async def run(self) -> CallReport:
        """The whole call, within max_call_s: the scenario, then a bounded close."""
        reserve_s = min(2 * CLOSE_TIMEOUT_S, 0.2 * self.cfg.max_call_s)  # kept for closing
        reason = "error"
        budget = asyncio.timeout(self.cfg.max_call_s - reserve_s)
        try:
            async with budget:
                await self._scenario()
        except TimeoutError as exc:
            if budget.expired():
                reason = "timeout"
                self.report.error = f"call still running after max_call_s={self.cfg.max_call_s}"
            else:
                self.report.error = f"timed out: {exc!r}"
        except Exception as exc:  # top of the call's task: one call's failure is its report
            log.exception("simulated call %s failed", self.call_sid)
            self.report.error = f"{type(exc).__name__}: {exc}"
        finally:
            try:
                async with asyncio.timeout(reserve_s):
                    await self._close(reason)
            except TimeoutError:
                log.warning("call %s: closing took over %.1f s", self.call_sid, reserve_s)
            finally:
                await self._release()
                self._fill_report()
        return self.report

    async def _scenario(self) -> None:
        cfg = self.cfg
        # No total timeout on the sessions: it would also cut the long-lived sockets.
        connect_only = aiohttp.ClientTimeout(total=None, connect=HTTP_TIMEOUT_S)
        self.http = aiohttp.ClientSession(timeout=connect_only)
        self.media_http = aiohttp.ClientSession(timeout=connect_only)
        twiml = await self._post_webhook()
        if twiml is None or not await self._open_stream(twiml):
            return
        if self.rest is not None:
            self.rest.register(self.call_sid, self._rest_hang_up)
        self.writer = asyncio.create_task(self._writer())
        self.background += [self.writer, asyncio.create_task(self._reader())]
        self._emit("connected", {})
        self.t0 = self._now()
        self._emit("start", {"start": {
            "accountSid": cfg.account_sid,
            "streamSid": self.stream_sid,
            "callSid": self.call_sid,
            "tracks": ["inbound"],
            "customParameters": dict(self.custom_parameters),
            "mediaFormat": {"encoding": "audio/x-mulaw", "sampleRate": SAMPLE_RATE, "channels": 1},
        }})
        self.started = True
        self.background += [asyncio.create_task(self._ticker()), asyncio.create_task(self._caller_audio())]
        # Both modes listen on the text socket: its events say each turn's state and heard words.
        await self._open_text_socket()
        await self._wait_greeting()
        for i, text in enumerate(cfg.texts, start=1):
            if self.ending:
                break
            await self._wait_for(lambda: not self.active_ids and self._drained(), cfg.turn_timeout_s)
            if self.ending:
                break
            if cfg.stream_text and self.text_ws is not None and not self.text_ws.closed:
                await self._turn_streamed(i, text)
            else:
                await self._turn_posted(i, text)
        await self._wait_for(self._drained, cfg.turn_timeout_s)
        self._place_reply()
        await self._wait_cues()
        if cfg.await_answer and self.caller.audio:
            await self._await_answer()
        await self._wait_for(self._drained, cfg.turn_timeout_s)
        if cfg.hold_s > 0:
            await self._hold()
        await self._wait_for(lambda: False, cfg.linger_s)
        await self._end("network_drop" if cfg.drop_network else "simulator")

    async def _post_webhook(self) -> TwimlAnswer | None:
        cfg = self.cfg
        assert self.http is not None
        query = urlencode(cfg.webhook_query, quote_via=quote)
        path = cfg.webhook_path + (f"?{query}" if query else "")
        params = {
            "CallSid": self.call_sid, "AccountSid": cfg.account_sid, "From": cfg.from_number,
            "To": cfg.to_number, "CallStatus": "ringing", "Direction": "inbound", "ApiVersion": "2010-04-01",
            # Twilio sends more than a service reads; all of them are signed.
            "Caller": cfg.from_number, "Called": cfg.to_number,
        }
        if cfg.caller_name is not None:
            params["CallerName"] = cfg.caller_name
        signature = RequestValidator(cfg.twilio_auth_token).compute_signature(cfg.public_base + path, params)
        headers = {"X-Twilio-Signature": signature, "User-Agent": "TwilioProxy/1.1"}
        # encoded=True: the bytes on the wire are exactly the query string that was signed
        url = URL(cfg.base_url.rstrip("/") + path, encoded=True)
        try:
            async with self.http.post(url, data=params, headers=headers, timeout=REQUEST_TIMEOUT) as resp:
                body, status = await resp.read(), resp.status
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:  # service down: a report, not a traceback
            why = exc.os_error.strerror if isinstance(exc, aiohttp.ClientConnectorError) else str(exc) or type(exc).__name__
            self.report.error = (f"no service answers at {cfg.base_url} ({why}): is `callbridge serve` "
                                 "running on that address?")
            return None
        if status != 200:
            self.report.error = f"webhook answered HTTP {status}: {body[:200].decode(errors='replace')}"
            if status == 403:  # the one a newcomer meets: signed over another URL or with another token
                self.report.error += (f" (signed over {cfg.public_base}{path}: the service checks its "
                                      "CALLBRIDGE_PUBLIC_BASE_URL and TWILIO_AUTH_TOKEN; use the same values, "
                                      "or --public-base-url / --auth-token)")
            return None
        try:
            twiml = parse_twiml(body)
        except ValueError as exc:
            self.report.error = f"webhook: {exc}"
            return None
        self.custom_parameters = twiml.parameters
        self.report.custom_parameters = twiml.parameters
        if twiml.one_way:
            self.report.error = "webhook answered <Start><Stream>: one-way, Twilio would never play our audio"
            return None
        if twiml.rejected:
            self.report.rejected = True
            self.report.refusal = twiml.refusal
            self.report.refusal_said = twiml.said or None
            self.report.ended_by = "rejected"
            return None
        return twiml

    async def _open_stream(self, twiml: TwimlAnswer) -> bool:
        cfg = self.cfg
        assert twiml.stream_url is not None and self.media_http is not None
        stream_url = twiml.stream_url
        target = URL(stream_url, encoded=True)
        if not target.is_absolute():  # relative: Twilio resolves it against the webhook's host
            stream_url = f"wss://{URL(cfg.public_base).raw_authority}/{stream_url.lstrip('/')}"
            target = URL(stream_url, encoded=True)
        self.report.stream_url = stream_url
        if target.scheme != "wss":
            self._error(f"31920 <Stream url> scheme is {target.scheme!r}; Twilio connects to wss:// only")
        if target.raw_query_string:
            self._error("twiml: <Stream url> has a query string; Twilio drops it (use <Parameter>)")
        contact = cfg.base_url
        public_path = URL(cfg.public_base).raw_path.rstrip("/")
        path = target.raw_path
        if public_path and path.startswith(public_path + "/"):
            path = path[len(public_path) :]
        for public, local in cfg.resolve.items():  # a stream URL naming another instance
            prefix = str(_ws_url(public, ""))
            if stream_url.startswith(prefix + "/"):
                contact, path = local, URL(stream_url[len(prefix):], encoded=True).raw_path
        signature = RequestValidator(cfg.twilio_auth_token).compute_signature(stream_url, {})
        try:
            self.ws = await self.media_http.ws_connect(
                _ws_url(contact, path),
                headers={"x-twilio-signature": signature, "User-Agent": "Twilio.TmeWs/1.0"},
                max_msg_size=MAX_WS_MSG,
                timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_S),
            )
        except aiohttp.WSServerHandshakeError as exc:
            self._error(f"31920 stream handshake answered HTTP {exc.status}")
            self.report.error = f"media stream refused: HTTP {exc.status}"
            return False
        except (aiohttp.ClientError, OSError) as exc:
            self._error(f"31902 could not connect the media stream: {exc}")
            self.report.error = f"media stream: {exc}"
            return False
        self.report.stream_sid = self.stream_sid
        return True

    async def _open_text_socket(self) -> None:
        assert self.http is not None
        url = _ws_url(self.cfg.base_url, f"/calls/{self.call_sid}/text")
        for attempt in range(20):  # the call may register a moment after `start`
            try:
                self.text_ws = await self.http.ws_connect(url, headers=self._auth(),
                                                          timeout=aiohttp.ClientWSTimeout(ws_close=CLOSE_TIMEOUT_S))
                break
            except aiohttp.WSServerHandshakeError as exc:
                if exc.status not in (404, 409) or attempt == 19 or self.ending:
                    then = "using POST turns" if self.cfg.stream_text else "turn states and heard words unknown"
                    self.report.service_errors.append(f"text socket refused: HTTP {exc.status}; {then}")
                    return
                await asyncio.sleep(0.1)
        if self.text_ws is not None:
            self.background.append(asyncio.create_task(self._text_events()))

    def _expects_greeting(self) -> bool:
        if self.cfg.expect_greeting is not None:
            return self.cfg.expect_greeting
        return bool(self.cfg.webhook_query.get("greeting") or self.custom_parameters.get("greeting"))

    async def _wait_greeting(self) -> None:
        """Let a greeting the service starts by itself finish before the first turn."""
        timeout_s = self.cfg.turn_timeout_s
        if self._expects_greeting():
            await self._wait_for(lambda: self.greeting is not None and self.greeting.first_media_t is not None,
                                 timeout_s)
        greeting = self.greeting
        if greeting is None:
            return
        if greeting.turn_id is not None and self.text_ws is not None:
            await self._wait_for(lambda: greeting.done_t is not None, timeout_s)
        await self._wait_for(self._quiet, timeout_s)
        if greeting.done_t is None:
            greeting.done_t = self._now()

    async def _turn_posted(self, index: int, text: str) -> None:
        """POST the turn; it is over once its audio arrived and the queue stayed empty quiet_s."""
        assert self.http is not None
        turn = TurnStats(index=index, kind="text", text=text, sent_t=self._now())
        self.turns.append(turn)  # before sending: audio that races the answer belongs to it
        self.pending_ws_turn = turn  # its events may reach the text socket before the answer
        try:
            async with self.http.post(f"{self.cfg.base_url.rstrip('/')}/calls/{self.call_sid}/turns",
                                      json={"text": text, "interrupt": False}, headers=self._auth(),
                                      timeout=REQUEST_TIMEOUT) as resp:
                status, body = resp.status, await resp.text()
        except (aiohttp.ClientError, TimeoutError) as exc:
            turn.error = f"POST turns failed: {exc}"
            return
        turn.text_done_t = self._now()
        if status != 202:
            turn.error = f"POST turns answered HTTP {status}: {body[:200]}"
            return
        with contextlib.suppress(ValueError):
            answer = json.loads(body)
            if isinstance(answer, dict) and isinstance(answer.get("turn_id"), str):
                turn.turn_id = answer["turn_id"]
                self.turns_by_id[turn.turn_id] = turn
        if self.pending_ws_turn is turn:
            self.pending_ws_turn = None
        if not await self._wait_for(lambda: turn.first_media_t is not None, self.cfg.turn_timeout_s):
            turn.timed_out = not self.ending
        await self._wait_for(self._quiet, self.cfg.turn_timeout_s)
        if self.text_ws is not None and not self.text_ws.closed:  # its turn_done: state and heard words
            await self._wait_for(lambda: turn.state is not None, self.cfg.turn_timeout_s)
        if turn.done_t is None:
            turn.done_t = self._now()

    async def _turn_streamed(self, index: int, text: str) -> None:
        """Stream the turn word by word; it is over at turn_done and a drained queue."""
        ws = self.text_ws
        assert ws is not None
        turn = TurnStats(index=index, kind="text", text=text, sent_t=self._now())
        self.turns.append(turn)
        self.pending_ws_turn = turn
        try:
            for j, chunk in enumerate(_split_words(text)):
                if j:
                    await asyncio.sleep(self.cfg.word_delay_s)
                if self.ending:
                    return
                await ws.send_json({"type": "text", "text": chunk})
            await ws.send_json({"type": "end_turn"})
        except (ConnectionError, aiohttp.ClientError) as exc:
            turn.error = f"text socket: {exc}"
            return
        turn.text_done_t = self._now()
        if not await self._wait_for(lambda: turn.done_t is not None, self.cfg.turn_timeout_s):
            turn.timed_out = not self.ending
        await self._wait_for(self._drained, self.cfg.turn_timeout_s)
        if turn.done_t is None:
            turn.done_t = self._now()

    def _place_reply(self) -> None:
        """A caller WAV without barge-in is the caller's reply: it starts now, the bot silent."""
        if self.caller.start_chunk is None and self.started and not self.ending:
            next_chunk = int((self._now() - self.t0) / CHUNK_S) + 1
            self.caller = dataclasses.replace(self.caller, start_chunk=next_chunk)

    async def _await_answer(self) -> None:
        """The caller has spoken: its transcript (or why there is none), then the answer played."""
        timeout_s = self.cfg.turn_timeout_s
        await self._wait_for(lambda: bool(self.report.transcripts), timeout_s)
        if not any(t["outcome"] == "transcript" for t in self.report.transcripts):
            return  # dropped or failed: no answer is coming
        answers = lambda: [t for t in self.turns if t.kind == "answer"]  # noqa: E731
        await self._wait_for(lambda: bool(answers()), timeout_s)
        await self._wait_for(lambda: all(t.done_t is not None for t in answers()) and self._drained(), timeout_s)

    async def _hold(self) -> None:
        """Keep the call open ``hold_s`` for experiments by hand (curl); ends early if the call does."""
        base = self.cfg.base_url.rstrip("/")
        if self.cfg.announce is not None:
            self.cfg.announce(
                f"call {self.call_sid} is live for {self.cfg.hold_s:.0f} s; try: curl -X POST "
                f"{base}/calls/{self.call_sid}/turns -H \"Authorization: Bearer $CALLBRIDGE_API_TOKEN\" "
                "-H 'Content-Type: application/json' -d '{\"text\": \"Hello from curl.\"}'"
            )
        await self._wait_for(lambda: False, self.cfg.hold_s)

    async def _wait_cues(self) -> None:
        """Hold the call until every dtmf cue and the caller's speech (barge-in or reply) went out."""
        last_s = max((at for at, _ in self.cfg.dtmf), default=-1.0)
        if self.caller.audio:
            last_s = max(last_s, self.caller.end_s)
        if last_s >= 0:
            end_t = self.t0 + last_s + CUE_TAIL_S
            await self._wait_for(lambda: self._now() >= end_t, max(0.0, end_t - self._now()) + 0.1)

    def _rest_hang_up(self) -> bool:
        """FakeTwilioRest ends the call: stop and close happen in a task, the answer is now."""
        if self.ending:
            return False
        self.end_tasks.append(asyncio.create_task(self._end("rest")))
        return True

    async def _end(self, reason: str) -> None:
        """End the stream once: ``stop`` then close, or (network drop) cut the connection."""
        if self.ending or self.ws is None:
            if self.report.ended_by is None:
                self.report.ended_by = reason
            return
        self.ending = True
        self.report.ended_by = reason
        self.end_t = self._now()
        if self.started:
            self._echo(self.queue.advance(self._clock(self.end_t)))
        if reason == "network_drop":
            self.stop_sent = True  # nothing more goes out
            assert self.media_http is not None
            await self.media_http.close()  # drops the TCP connection: no stop, no close frame
            return
        self._emit("stop", {"stop": {"accountSid": self.cfg.account_sid, "callSid": self.call_sid}})
        self.stop_sent = True
        with contextlib.suppress(asyncio.QueueFull):
            self.outbox.put_nowait(None)
        if self.writer is not None:
            await asyncio.wait({self.writer}, timeout=CLOSE_TIMEOUT_S)
        with contextlib.suppress(TimeoutError, ConnectionError, aiohttp.ClientError):
            async with asyncio.timeout(CLOSE_TIMEOUT_S):
                await self.ws.close()

    async def _close(self, reason: str) -> None:
        """End the stream if the scenario did not, then close the text socket politely."""
        if self.end_tasks:
            await asyncio.wait(self.end_tasks, timeout=CLOSE_TIMEOUT_S)
        if not self.ending and self.ws is not None:
            await self._end(reason)
        if self.text_ws is not None and not self.text_ws.closed:
            # A moment for the service's call_ended, then close our side.
            await self._wait_for(lambda: self.report.call_ended_event, 1.0, after_end=True)
            with contextlib.suppress(TimeoutError, ConnectionError, aiohttp.ClientError):
                async with asyncio.timeout(CLOSE_TIMEOUT_S):
                    await self.text_ws.close()

    async def _release(self) -> None:
        """Cancel the call's tasks and close its sessions; waits on nothing the peer controls."""
        for task in self.background + self.end_tasks:
            task.cancel()
        results = await asyncio.gather(*self.background, *self.end_tasks, return_exceptions=True)
        for result in results:
            if isinstance(result, Exception):
                log.warning("call %s: task failed: %r", self.call_sid, result)
        if self.rest is not None:
            self.rest.unregister(self.call_sid)
        for session in (self.http, self.media_http):
            if session is not None and not session.closed:
                await session.close()

    # ---------------------------------------------------------------- the report

    def _fill_report(self) -> None:
        r, q = self.report, self.queue
        if self.started:
            end_t = self.end_t if self.end_t is not None else self._now()
            r.duration_s = round(end_t - self.t0, 3)
        r.played_samples = len(q.out)
        r.audio_ms_played = round(1000.0 * q.played_audio / SAMPLE_RATE, 1)
        r.audio_ms_cleared = round(1000.0 * q.cleared_bytes / SAMPLE_RATE, 1)
        r.audio_ms_unplayed = round(1000.0 * q.queued / SAMPLE_RATE, 1)
        r.audio_ms_discarded = round(1000.0 * q.discarded_bytes / SAMPLE_RATE, 1)
        r.audio_ms_received = round(r.audio_ms_received, 1)
        r.marks_unechoed = len(q.pending_marks)
        r.lost_or_reordered = r.marks_unechoed + r.marks_out_of_order + self.discarded_msgs
        gaps = [(a, b) for a, b in q.gaps if b - a >= MIN_GAP_SAMPLES]
        turn_gaps = {id(t): self._turn_gaps(t, gaps) for t in self.turns}
        all_gaps = [g for gs in turn_gaps.values() for g in gs]
        r.underruns = len(all_gaps)
        r.gaps_ms = {"max": round(max(all_gaps, default=0.0), 1), "total": round(sum(all_gaps), 1)}
        text_turns = [t for t in self.turns if t.kind == "text"]
        r.ttfa_ms = summarize([self._ttfa(t) for t in text_turns])
        r.ttfa_heard_ms = summarize([self._ttfa_heard(t) for t in text_turns])
        r.max_queue_ms = round(1000.0 * max((t.max_queue_bytes for t in self.turns), default=0) / SAMPLE_RATE, 1)
        r.pacing_jitter_ms = self._pacing()
        if self.speech_start_t is not None:
            after = [t for t in self.clear_times if t >= self.speech_start_t]
            r.barge_in_to_clear_ms = _ms(after[0] - self.speech_start_t) if after else None
        r.media_after_clear = sum(t.media_after_clear for t in self.turns)
        r.turns = [self._turn_json(t, turn_gaps[id(t)]) for t in sorted(self.turns, key=lambda t: t.index)]

    @staticmethod
    def _turn_gaps(turn: TurnStats, gaps: list[tuple[int, int]]) -> list[float]:
        """Dry spells between two pieces of this turn's audio, in ms."""
        if turn.first_sample is None or turn.end_sample is None:
            return []
        return [1000.0 * (b - a) / SAMPLE_RATE for a, b in gaps if turn.first_sample <= a and b < turn.end_sample]

    @staticmethod
    def _ttfa(turn: TurnStats) -> float | None:
        return _ms(turn.first_media_t - turn.sent_t) if turn.first_media_t is not None else None

    def _ttfa_heard(self, turn: TurnStats) -> float | None:
        if turn.first_sample is None or turn.first_media_t is None:
            return None
        # Sample arithmetic floors by up to 1/8 ms: never report hearing before arrival.
        heard_t = max(self.t0 + turn.first_sample / SAMPLE_RATE, turn.first_media_t)
        return _ms(heard_t - turn.sent_t)

    def _pacing(self) -> dict[str, float | int | None]:
        """Spacing of media arrivals within each turn: interval stats, and the mean distance
        of each interval from the audio length of the message before it."""
        intervals: list[float] = []
        deviations: list[float] = []
        for turn in self.turns:
            for (t_prev, n_prev), (t_next, _) in zip(turn.arrivals, turn.arrivals[1:]):
                gap = 1000.0 * (t_next - t_prev)
                intervals.append(gap)
                deviations.append(abs(gap - 1000.0 * n_prev / SAMPLE_RATE))
        if not intervals:
            return {"n": 0, "mean": None, "std": None, "p95": None, "max": None, "mean_abs_dev": None}
        arr = np.array(intervals)
        return {
            "n": len(intervals),
            "mean": round(float(arr.mean()), 2),
            "std": round(float(arr.std()), 2),
            "p95": round(float(np.percentile(arr, 95)), 2),
            "max": round(float(arr.max()), 2),
            "mean_abs_dev": round(float(np.mean(deviations)), 2),
        }

    def _turn_json(self, turn: TurnStats, gaps: list[float]) -> dict[str, Any]:
        def rel(t: float | None) -> float | None:
            return None if t is None else _ms(t - self.t0)

        return {
            "index": turn.index,
            "kind": turn.kind,
            "text": turn.text,
            "turn_id": turn.turn_id,
            "sent_ms": rel(turn.sent_t),
            "text_done_ms": rel(turn.text_done_t),
            "done_ms": rel(turn.done_t),
            "ttfa_ms": self._ttfa(turn),
            "ttfa_heard_ms": self._ttfa_heard(turn),
            "service_first_audio_ms": rel(turn.service_first_audio_t),
            "chunks": turn.chunks,
            "audio_ms": round(1000.0 * turn.audio_bytes / SAMPLE_RATE, 1),
            "played_ms": round(1000.0 * turn.played_bytes / SAMPLE_RATE, 1),
            "underruns": len(gaps),
            "gaps_ms": {"max": round(max(gaps, default=0.0), 1), "total": round(sum(gaps), 1)},
            "max_queue_ms": round(1000.0 * turn.max_queue_bytes / SAMPLE_RATE, 1),
            "cleared": turn.cleared,
            "media_after_clear": turn.media_after_clear,
            "interrupted": turn.interrupted,
            "state": turn.state,
            "heard": turn.heard,
            "barge_in_heard": turn.barge_in_heard,
            "timed_out": turn.timed_out,
            "error": turn.error,
        }


# ------------------------------------------------------------------------------ entry points


def _wav_path(cfg: SimConfig, index: int) -> Path | None:
    if cfg.out_wav is None:
        return None
    if cfg.calls == 1:
        return cfg.out_wav
    return cfg.out_wav.with_name(f"{cfg.out_wav.stem}-{index + 1}{cfg.out_wav.suffix}")


def _write_wav(path: Path, ulaw: bytes) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    sf.write(str(path), ulaw_decode(ulaw), SAMPLE_RATE, subtype="PCM_16")


async def simulate_call(cfg: SimConfig, index: int = 0, *, rest: FakeTwilioRest | None = None) -> CallReport:
    """Place one call (``index`` 0-based) and return what it measured; never raises for a
    failing service (the report's ``error`` says what went wrong). Ends within ``max_call_s``.

    With ``rest`` (or ``cfg.rest_server``), the call is registered there while live so a REST hang-up can end it. With
    ``cfg.out_wav``, the played audio is written (8 kHz 16-bit; ``stem-<index+1>`` when
    ``cfg.calls > 1``).
    """
    if not cfg.allow_remote and not is_loopback_url(cfg.base_url):
        raise SimulatorError(f"base_url={cfg.base_url!r} is not a loopback address")
    rest = rest if rest is not None else cfg.rest_server
    caller = await asyncio.to_thread(_caller_track, cfg)  # file I/O and resampling off the loop
    run = _CallRun(cfg, index, rest, caller)
    report = await run.run()
    path = _wav_path(cfg, index)
    if path is not None and run.started:
        await asyncio.to_thread(_write_wav, path, bytes(run.queue.out))
        report.wav_path = str(path)
    return report


async def run_simulation(cfg: SimConfig, *, rest: FakeTwilioRest | None = None) -> list[CallReport]:
    """Place ``cfg.calls`` concurrent calls; writes ``cfg.report_path`` as
    ``{"calls": [...], "summary": {...}}`` when set."""

    async def one(i: int) -> CallReport:
        if cfg.stagger_s > 0:
            await asyncio.sleep(i * cfg.stagger_s)
        return await simulate_call(cfg, i, rest=rest)

    rest = rest if rest is not None else cfg.rest_server
    reports = list(await asyncio.gather(*(one(i) for i in range(cfg.calls))))
    if cfg.report_path is not None:
        doc = {"calls": [r.to_json() for r in reports], "summary": summarize_reports(reports)}
        path = cfg.report_path

        def write() -> None:
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(doc, indent=2) + "\n")

        await asyncio.to_thread(write)
    return reports
