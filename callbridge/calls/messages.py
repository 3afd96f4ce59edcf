"""The messages a client sends to a live call, parsed and carried out in one place.

Both sockets an app can hold on a call use this: the text socket it opens
(``/calls/{id}/text``) and the app connection the bridge opens to it (``[app] websocket_url``).
Sans-I/O: a :class:`ControlSession` takes one text frame, acts on the call, and puts any reply
(an ``error``, a ``pong``, ``audio_subscribed``) into the socket's :class:`~.outbox.ClientOutbox`;
the socket's edge code does the reading and sending.

Messages (JSON objects with a string ``type``):

- ``{"type": "text", "text": "…", "interrupt": false}``: a chunk of a streamed turn (opens one
  if none is open); ``{"type": "end_turn"}`` closes it;
- ``{"type": "turn", "text": "…", "interrupt": false}``: a whole turn;
- ``{"type": "interrupt"}``, ``{"type": "hangup"}``, ``{"type": "ping"}`` (→ ``pong``);
- ``{"type": "subscribe_audio", "format": "ulaw" | "pcm16"}``: the caller's audio as binary
  20 ms frames from now on (→ ``audio_subscribed``); ``{"type": "unsubscribe_audio"}``.

A bad message is answered with ``{"event": "error", "status", "message"}`` and changes nothing;
it never ends the call.
"""

from __future__ import annotations

import contextlib
import json
from typing import Any

from ..audio import CHUNK_MS, LINE_RATE
from .call import Call
from .client_outbox import AudioFormat, ClientOutbox
from .turns import Turn, TurnRejected, whole_turn_text

__all__ = ["MESSAGE_TYPES", "ControlSession"]

MESSAGE_TYPES = ("text", "end_turn", "turn", "interrupt", "hangup", "ping", "subscribe_audio", "unsubscribe_audio")

_NOT_AN_OBJECT = ('not a JSON object with a string "type": send e.g. {"type": "text", "text": "Hello"}')


class ControlSession:
    """One client's messages to one call. ``name`` is the hang-up reason (``text socket``,
    ``app``) and ``source`` the turns' source in events and logs."""

    def __init__(self, call: Call, outbox: ClientOutbox, *, name: str, source: str) -> None:
        self.call = call
        self.outbox = outbox
        self.name = name
        self.source = source
        self.turn: Turn | None = None  # the streamed turn open, if any
        self._audio_subscribed = False

    # ------------------------------------------------------------------ in

    def handle_binary(self) -> None:
        self._error(400, "binary messages are not taken: send JSON text messages")

    def handle_text(self, raw: str) -> None:
        """One text frame: parse, act, reply (into the outbox)."""
        try:
            data = json.loads(raw)
        except ValueError:
            data = None
        if not isinstance(data, dict) or not isinstance(data.get("type"), str):
            self._error(400, _NOT_AN_OBJECT)
            return
        try:
            self._dispatch(data["type"], data)
        except TurnRejected as exc:
            self._error(exc.status, str(exc))

    def close(self) -> None:
        """The client left: a streamed turn it left open is said as sent; its audio stops."""
        if self.turn is not None and not self.turn.text_closed:
            with contextlib.suppress(TurnRejected):  # the turn ended meanwhile (interrupted, call ended)
                self.call.close_text(self.turn)
        self.turn = None
        self._unsubscribe()

    # ------------------------------------------------------------------ dispatch

    def _dispatch(self, kind: str, data: dict[str, Any]) -> None:
        call = self.call
        if kind == "text":
            text = data.get("text")
            if not isinstance(text, str):
                raise TurnRejected(400, "'text' must be a string")
            if self.turn is None or self.turn.text_closed:
                self.turn = call.add_turn(None, close=False, interrupt=_flag(data, "interrupt"), source=self.source)
            call.push_text(self.turn, text)
        elif kind == "end_turn":
            if self.turn is not None:
                call.close_text(self.turn)
                self.turn = None
        elif kind == "turn":
            call.add_turn(whole_turn_text(data.get("text")), close=True, interrupt=_flag(data, "interrupt"),
                          source=self.source)
        elif kind == "interrupt":
            call.interrupt(reason=f"interrupted by the {self.name}")
            self.turn = None
        elif kind == "hangup":
            call.hang_up(self.name)
        elif kind == "ping":
            self.outbox.reply({"event": "pong"})
        elif kind == "subscribe_audio":
            self._subscribe(data.get("format", "ulaw"))
        elif kind == "unsubscribe_audio":
            self._unsubscribe()
            self.outbox.reply({"event": "audio_unsubscribed"})
        else:
            raise TurnRejected(400, f"unknown message type {kind!r} (known: {', '.join(MESSAGE_TYPES)})")

    def _subscribe(self, fmt_name: object) -> None:
        try:
            fmt = AudioFormat(fmt_name)
        except ValueError:
            raise TurnRejected(400, f"'format' must be one of {[f.value for f in AudioFormat]}") from None
        # Every carrier today delivers 8 kHz (G.711); a wideband leg would offer pcm16 at its rate.
        rate = LINE_RATE
        self.outbox.subscribe_audio(fmt)
        if not self._audio_subscribed:
            self.call.caller_audio.append(self.outbox.on_caller_audio)
            self._audio_subscribed = True
        self.outbox.reply({"event": "audio_subscribed", "format": fmt.value, "sample_rate": rate,
                           "frame_ms": CHUNK_MS, "buffer_frames": self.outbox.audio_frames})

    def _unsubscribe(self) -> None:
        if self._audio_subscribed:
            if self.outbox.on_caller_audio in self.call.caller_audio:
                self.call.caller_audio.remove(self.outbox.on_caller_audio)
            self._audio_subscribed = False
        self.outbox.unsubscribe_audio()

    def _error(self, status: int, message: str) -> None:
        self.outbox.reply({"event": "error", "status": status, "message": message})


def _flag(data: dict[str, Any], key: str) -> bool:
    value = data.get(key, False)
    if not isinstance(value, bool):
        raise TurnRejected(400, f"'{key}' must be true or false")
    return value
