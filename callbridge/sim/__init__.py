"""A local stand-in for Twilio: places calls into callbridge and measures what the caller hears.

The simulator plays Twilio's part over real loopback sockets, written from the JSON shapes in
shared/docs/twilio-media-streams.md and never from ``callbridge.transports.twilio`` (it exists to check
that module):

1. POST the signed voice webhook and read ``<Connect><Stream>`` and its ``<Parameter>``s
   out of the TwiML (``<Reject>`` or a bare ``<Say>…<Hangup/>`` means the service is full);
2. open the media WebSocket with ``x-twilio-signature`` over the ``wss://`` URL as written,
   send ``connected`` and ``start``, then caller audio every 20 ms on a real-time clock,
   ``dtmf`` on cue and ``stop`` at the end (or drop the connection with no ``stop``);
3. model Twilio's playback queue: inbound ``media`` of any size is queued and played at
   8000 bytes/s on our own clock, ``mark`` is echoed when the playout cursor passes it (at
   once on an empty queue), ``clear`` empties the queue and echoes every pending mark;
4. count protocol violations with Twilio's codes (31950 binary frame, 31951 invalid message,
   31931 queue over 10 min) and record the audio as heard, silence included, to a WAV;
5. send text turns through the control API (HTTP or the streaming text WebSocket) and
   report time to first audio, underruns, gaps, pacing, queue depth and mark bookkeeping.

:class:`FakeTwilioRest` serves Twilio's call-update endpoint on loopback so the service's
REST hang-up runs against it. Only loopback hosts are contacted unless ``allow_remote``.

One job per module: ``config`` (what to simulate), ``wire`` (TwiML and the service's messages,
checked as Twilio does), ``report`` (what a call measured), ``queue`` (mu-law and Twilio's
playback queue), ``caller`` (the caller's audio), ``rest`` (Twilio's REST hang-up on loopback),
``call`` (one call's run, and many), ``cli`` (``callbridge simulate``). This package re-exports
the names callers use.
"""

from __future__ import annotations

from .call import run_simulation, simulate_call
from .caller import DEMO_CALLER_WAV, CallerTrack, voiced_speech
from .caller import load_caller_wav as load_caller_wav
from .cli import format_report as format_report
from .cli import main_simulate
from .config import SimConfig, SimulatorError, is_loopback_url
from .queue import PlayoutQueue, ulaw_decode, ulaw_encode
from .report import CallReport, summarize, summarize_reports
from .report import TurnStats as TurnStats
from .rest import FakeTwilioRest
from .rest import RestRequest as RestRequest
from .wire import ServiceMessage, TwimlAnswer, parse_twiml, validate_service_message

__all__ = [
    "DEMO_CALLER_WAV",
    "CallReport",
    "CallerTrack",
    "FakeTwilioRest",
    "PlayoutQueue",
    "ServiceMessage",
    "SimConfig",
    "SimulatorError",
    "TwimlAnswer",
    "is_loopback_url",
    "main_simulate",
    "parse_twiml",
    "run_simulation",
    "simulate_call",
    "summarize",
    "summarize_reports",
    "ulaw_decode",
    "ulaw_encode",
    "validate_service_message",
    "voiced_speech",
]
