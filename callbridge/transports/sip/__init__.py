"""SIP trunks: calls straight from a carrier or a PBX (UDP signalling, RTP media, G.711).

Sans-I/O modules decide (``message``, ``sdp``, ``digest``, ``access``, ``transactions``,
``dialog``, ``uas`` for signalling; ``rtp``, ``media`` for audio); the asyncio edge
(``endpoint``, ``leg``) only moves datagrams and time into them.
"""

from .access import AllowList, RateLimiter, Trunk, parse_networks
from .digest import DigestAuth
from .sdp import CODECS, Answer, SdpError, negotiate, parse_sdp
from .uas import (
    Action,
    CallConfirmed,
    CallEnded,
    CallOffered,
    DigitReceived,
    MediaUpdated,
    Send,
    UasSettings,
    UserAgentServer,
)

__all__ = [
    "CODECS",
    "Action",
    "AllowList",
    "Answer",
    "CallConfirmed",
    "CallEnded",
    "CallOffered",
    "DigestAuth",
    "DigitReceived",
    "MediaUpdated",
    "RateLimiter",
    "SdpError",
    "Send",
    "Trunk",
    "UasSettings",
    "UserAgentServer",
    "negotiate",
    "parse_networks",
    "parse_sdp",
]
