"""Twilio request signatures (``X-Twilio-Signature``) and the public URLs they are computed over.

Twilio signs the URL it called as it knows it (the public ``https``/``wss`` URL), so a
service behind a proxy or tunnel checks against its configured public base URL
(shared/docs/twilio-media-streams.md §9).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any
from urllib.parse import urlsplit

from twilio.request_validator import (
    HMAC_SHA1,
    HMAC_SHA256,
    SIGNATURE_HEADER,
    SIGNATURE_SETTINGS_HEADER,
    RequestValidator,
    get_signature_algorithm,
)

__all__ = [
    "HMAC_SHA1",
    "HMAC_SHA256",
    "SIGNATURE_HEADER",
    "SIGNATURE_SETTINGS_HEADER",
    "compute_signature",
    "public_url",
    "signature_key_id",
    "validate_signature",
    "websocket_url",
]


class _Params:
    """Adapts ``{name: value or [values]}`` to the ``getall`` that RequestValidator looks for.

    Without it a plain dict with list values would be hashed as one value and fail.
    """

    def __init__(self, params: Mapping[str, str | Sequence[str]]) -> None:
        self._params = params

    def __iter__(self) -> Any:
        return iter(self._params)

    def __len__(self) -> int:
        return len(self._params)

    def getall(self, name: str) -> list[str]:
        value = self._params[name]
        return [value] if isinstance(value, str) else list(value)


def _adapt(params: Mapping[str, str | Sequence[str]] | str | None) -> Any:
    if params is None:
        return {}
    if isinstance(params, str):
        return params  # a raw JSON body: checked against bodySHA256 in the URL
    if hasattr(params, "getall"):
        return params  # multidict / aiohttp form data already has the right shape
    return _Params(params)


def validate_signature(
    auth_token: str,
    url: str,
    params: Mapping[str, str | Sequence[str]] | str | None,
    signature: str | None,
    settings_header: str | None = None,
) -> bool:
    """Whether ``signature`` (the ``X-Twilio-Signature`` header) is Twilio's for this request.

    ``url`` is the URL exactly as Twilio was given it (a configured public URL, never
    ``request.url``): ``https://…`` with the query string for a webhook, the ``wss://…``
    stream URL for the WebSocket upgrade. ``params`` is every form field Twilio posted
    (``{}`` for the upgrade), or the raw body string for a JSON webhook. With the
    ``X-Twilio-Webhooks-Signature-Settings`` header, the algorithm it names is used and
    ``auth_token`` must be that Webhooks Rule's SharedKey secret (see
    :func:`signature_key_id`). The port is tried with and without, as Twilio is not
    consistent; the comparison is constant-time. A missing signature is invalid.
    """
    if not auth_token:
        raise ValueError("an empty auth token would accept forged signatures")
    if not signature:
        return False
    algorithm = get_signature_algorithm(settings_header)
    return bool(RequestValidator(auth_token).validate(url, _adapt(params), signature, algorithm=algorithm))


def signature_key_id(settings_header: str | None) -> str | None:
    """The ``key=`` of ``X-Twilio-Webhooks-Signature-Settings``: which SharedKey signed the request."""
    for part in (settings_header or "").split(","):
        name, sep, value = part.partition("=")
        if sep and name.strip() == "key" and value.strip():
            return value.strip()
    return None


def compute_signature(
    auth_token: str,
    url: str,
    params: Mapping[str, str | Sequence[str]] | None = None,
    *,
    algorithm: str = HMAC_SHA1,
) -> str:
    """The ``X-Twilio-Signature`` Twilio would send (for tests; the simulator signs with its own code)."""
    return str(RequestValidator(auth_token).compute_signature(url, _adapt(params), algorithm=algorithm))


def check_http_url(url: str, what: str) -> None:
    """Raise ValueError unless ``url`` is an absolute http(s) URL (``what`` names it in the message)."""
    parts = urlsplit(url)
    if parts.scheme not in ("https", "http") or not parts.hostname:
        raise ValueError(f"{what} must be an absolute http(s) URL")


def public_url(base_url: str, path: str, query: str = "") -> str:
    """The public URL Twilio requests: ``base_url`` (http/https, may have a path) + ``path`` + query.

    Signatures are computed over this, so build it from configuration, never from the
    request as a proxy or tunnel delivered it.
    """
    check_http_url(base_url, "base_url")
    if urlsplit(base_url).query or "?" in base_url or "?" in path:
        raise ValueError("put the query string in `query`, not in base_url or path")
    url = base_url.rstrip("/") + "/" + path.lstrip("/")
    query = query.removeprefix("?")
    return f"{url}?{query}" if query else url


def websocket_url(base_url: str, path: str) -> str:
    """The ``<Stream url>`` for ``path``: https→wss, http→ws (local only); never a query string."""
    url = public_url(base_url, path)
    scheme, rest = url.split("://", 1)
    return ("wss" if scheme == "https" else "ws") + "://" + rest
