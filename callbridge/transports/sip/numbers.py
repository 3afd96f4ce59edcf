"""Which voice and greeting a SIP call gets, from the dialled number and the config (never from
caller-supplied headers), and the SIP server's access rules from ``[sip]``.

Numbers are compared without visual separators (``+1 (555) 010-0100`` is ``+15550100100``),
as RFC 3966 allows carriers to write them either way.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from ...config import SipSettings
from .access import AllowList, Trunk, parse_networks

__all__ = ["Route", "allow_list", "route_call"]

_SEPARATORS = re.compile(r"[\s().\-]")


@dataclass(frozen=True)
class Route:
    voice: str
    greeting: str
    app_url: str = ""  # the number's own app connection; "" = [app] websocket_url


def _normal(number: str) -> str:
    return _SEPARATORS.sub("", number.split(";", 1)[0])


def route_call(sip: SipSettings, default_voice: str, dialled: str) -> Route | None:
    """The voice, greeting and app for ``dialled``; None when it is unknown and ``sip.unknown_numbers = "reject"``."""
    wanted = _normal(dialled)
    for number, entry in sip.numbers.entries:
        if _normal(number) == wanted:
            return Route(voice=entry.voice or default_voice, greeting=entry.greeting or sip.greeting,
                         app_url=entry.app_websocket_url)
    if sip.unknown_numbers == "reject":
        return None
    return Route(voice=default_voice, greeting=sip.greeting)


def allow_list(sip: SipSettings) -> AllowList:
    """``[sip.trunks.*]`` in file order, then the default trunk of ``sip.allow``."""
    trunks = [Trunk(name, parse_networks(t.allow), t.digest) for name, t in sip.trunks.entries]
    if sip.allow.strip():
        trunks.append(Trunk("default", parse_networks(sip.allow), True))
    return AllowList(tuple(trunks))
