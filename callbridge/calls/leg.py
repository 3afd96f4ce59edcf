"""The one interface a carrier implements: a call's leg to the phone network.

The call core (:mod:`callbridge.calls`) speaks only to a :class:`Leg`; each carrier
(``transports/twilio``, later ``transports/sip``) implements it, so carriers depend on the call
core and never the reverse. Two directions:

- **caller → call**: the leg turns what the carrier sends into :data:`LegEvent` values and hands
  each to the call's :class:`LegEventSink` (``call.on_leg_event``), in order, from one task;
- **call → caller**: the call sends 20 ms G.711 mu-law chunks (:data:`~callbridge.audio.CHUNK_BYTES`
  bytes each), markers, ``clear``, and ends the leg.

Markers are how the call learns what the caller has actually heard: a marker sent after some
audio comes back as :class:`MarkerPlayed` once the far end has played up to it. A carrier that
echoes markers itself (Twilio Media Streams) passes its echoes on; a leg with no far-end echo
(RTP) echoes a marker itself when its own send clock passes it. After :meth:`Leg.clear`, every
marker still pending comes back (the call tells a stale echo from a played one by its own
bookkeeping, never by timing).
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field
from typing import Literal, Protocol

import numpy as np

__all__ = [
    "CallerAudio",
    "CallerDigit",
    "Leg",
    "LegEnded",
    "LegEvent",
    "LegEventSink",
    "LegInfo",
    "LegPacing",
    "MarkerPlayed",
]


# ---------------------------------------------------------------------------- caller → call


@dataclass(frozen=True)
class CallerAudio:
    """Caller audio as the carrier delivered it, decoded to PCM: every frame, speech or not."""

    pcm16: np.ndarray = field(repr=False)  # int16 [N]
    sample_rate: int  # Hz (8000 for G.711 carriers)


@dataclass(frozen=True)
class MarkerPlayed:
    """The far end has played the audio sent before marker ``name`` (or a ``clear`` dropped it)."""

    name: str


@dataclass(frozen=True)
class CallerDigit:
    """A DTMF digit the caller pressed (``0-9``, ``*``, ``#``, ``A-D``). Caller data: never logged."""

    digit: str


@dataclass(frozen=True)
class LegEnded:
    """The carrier ended the leg (caller hung up, stream stopped, socket dropped, media timeout)."""

    reason: str  # e.g. "hangup: caller", "hangup: socket closed", "error: media timeout"


LegEvent = CallerAudio | MarkerPlayed | CallerDigit | LegEnded


class LegEventSink(Protocol):
    """What a leg delivers caller events to (the call). Called on the event loop, in order."""

    def on_leg_event(self, event: LegEvent) -> None: ...


# ---------------------------------------------------------------------------- call → caller


@dataclass(frozen=True)
class LegPacing:
    """How the call should pace audio into this leg.

    ``chunk_ms``: the duration of one :meth:`Leg.send_audio` chunk. ``lead_ms``: how far ahead
    of real time audio may be sent (Twilio buffers generously; an RTP peer plays what arrives,
    so its lead is small). ``marker_echo``: who echoes markers, the far end (``"far_end"``) or
    the leg's own send clock (``"send_clock"``).
    """

    chunk_ms: int
    lead_ms: int
    marker_echo: Literal["far_end", "send_clock"]


@dataclass(frozen=True)
class LegInfo:
    """Facts about the call as the carrier gave them; caller data (numbers) never goes to INFO logs."""

    carrier: str  # "twilio", "sip"
    # The call's id in our API (the call view, /calls/{id}): Twilio's CallSid; for SIP our own
    # "sip-…" id (a SIP Call-ID is caller-chosen, may be long and is not URL-safe).
    carrier_call_id: str
    from_number: str = ""
    to_number: str = ""
    custom: dict[str, str] = field(default_factory=dict)  # carrier-specific parameters
    # The carrier's own id of this leg's media session: Twilio's StreamSid ("" until the stream
    # starts), the SIP Call-ID. Shown as ``media_id`` in the call view.
    media_id: str = ""


class Leg(abc.ABC):
    """One call's connection to a carrier. Methods are called from the call's tasks on the loop.

    ``send_audio``, ``send_marker`` and ``clear`` may wait while the carrier's socket is full;
    the call bounds every send with ``audio.send_timeout_s`` and ends the call when one times
    out. ``close`` is called exactly once, when the call has ended, and must not wait on the
    peer for longer than ``timeout_s``.
    """

    info: LegInfo
    pacing: LegPacing

    @abc.abstractmethod
    async def send_audio(self, ulaw8k: bytes) -> None:
        """Send one chunk of 8 kHz G.711 mu-law, ``pacing.chunk_ms`` long (the leg converts to its codec)."""

    @abc.abstractmethod
    async def send_marker(self, name: str) -> None:
        """Mark the current end of the audio sent; :class:`MarkerPlayed` comes back when it has played."""

    @abc.abstractmethod
    async def clear(self) -> None:
        """Drop audio sent but not yet played; every pending marker then comes back as played."""

    @abc.abstractmethod
    async def hang_up(self) -> None:
        """Ask the carrier to end the phone call (Twilio: REST API; SIP: BYE). Idempotent."""

    @abc.abstractmethod
    async def close(self, reason: str, timeout_s: float) -> None:
        """The call has ended: release the leg (close the socket with the code for ``reason``, stop media)."""
