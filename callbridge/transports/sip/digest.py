"""Server-side digest authentication for INVITEs (RFC 2617 / RFC 7616 with MD5 or SHA-256), sans I/O.

A PBX trunk that cannot be pinned to a source address proves itself with a password. The
nonce is stateless: a timestamp and an HMAC of it under a per-process secret, so a restart
invalidates old nonces and nothing is stored per caller. An expired but genuine nonce is
challenged again with ``stale=true`` (the client retries without asking its user). The
password comes from the environment only (``CALLBRIDGE_SIP_DIGEST_PASSWORD``).
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
from dataclasses import dataclass, field
from typing import Final

from sipmessage import AuthChallenge, AuthCredentials, AuthParameters

__all__ = ["DigestAuth", "DigestResult"]

_HASHES: Final = {"MD5": hashlib.md5, "SHA-256": hashlib.sha256}


def _h(algorithm: str, text: str) -> str:
    return _HASHES[algorithm](text.encode("utf-8")).hexdigest()


@dataclass(frozen=True)
class DigestResult:
    ok: bool
    reason: str  # "ok", "missing", "malformed", "wrong_user", "bad_nonce", "stale", "bad_response"


@dataclass
class DigestAuth:
    """Checks ``Proxy-Authorization`` (or ``Authorization``) and builds the 407 challenge."""

    username: str
    password: str = field(repr=False)
    realm: str = "callbridge"
    nonce_ttl_s: float = 300.0
    _secret: bytes = field(default_factory=lambda: secrets.token_bytes(32), repr=False)

    def _sign(self, stamp: str) -> str:
        return hmac.new(self._secret, stamp.encode(), hashlib.sha256).hexdigest()[:24]

    def nonce(self, now: float) -> str:
        stamp = f"{int(now * 1000):x}"
        return f"{stamp}.{self._sign(stamp)}"

    def challenge(self, now: float, *, stale: bool = False) -> str:
        """The ``Proxy-Authenticate`` header value for a 407."""
        params = {"realm": self.realm, "nonce": self.nonce(now), "algorithm": "MD5", "qop": "auth"}
        if stale:
            params["stale"] = "true"
        return str(AuthChallenge(scheme="Digest", parameters=AuthParameters(**params)))

    def _nonce_state(self, nonce: str, now: float) -> str:
        stamp, _, mac = nonce.partition(".")
        if not hmac.compare_digest(mac, self._sign(stamp)):
            return "bad_nonce"
        try:
            issued = int(stamp, 16) / 1000
        except ValueError:
            return "bad_nonce"
        return "ok" if 0 <= now - issued <= self.nonce_ttl_s else "stale"

    def check(self, header: str | None, method: str, now: float) -> DigestResult:
        """Verify one request's credentials against our user and password."""
        if not header:
            return DigestResult(False, "missing")
        try:
            creds = AuthCredentials.parse(header)
        except ValueError:
            return DigestResult(False, "malformed")
        p = creds.parameters
        if creds.scheme.lower() != "digest" or p is None:
            return DigestResult(False, "malformed")
        try:
            user, realm, nonce, uri, response = (p["username"], p["realm"], p["nonce"], p["uri"], p["response"])
        except KeyError:
            return DigestResult(False, "malformed")
        algorithm = p.get("algorithm", "MD5").upper()
        if algorithm not in _HASHES:
            return DigestResult(False, "malformed")
        if not hmac.compare_digest(user, self.username) or realm != self.realm:
            return DigestResult(False, "wrong_user")
        state = self._nonce_state(nonce, now)
        if state != "ok":
            return DigestResult(False, state)
        ha1 = _h(algorithm, f"{user}:{realm}:{self.password}")
        ha2 = _h(algorithm, f"{method}:{uri}")
        qop = p.get("qop")
        if qop is None:
            expected = _h(algorithm, f"{ha1}:{nonce}:{ha2}")
        elif qop == "auth" and "nc" in p and "cnonce" in p:
            expected = _h(algorithm, f"{ha1}:{nonce}:{p['nc']}:{p['cnonce']}:{qop}:{ha2}")
        else:
            return DigestResult(False, "malformed")
        if not hmac.compare_digest(expected, response.lower()):
            return DigestResult(False, "bad_response")
        return DigestResult(True, "ok")
