"""Ending a call through Twilio's REST API (the async client of the twilio package)."""

from __future__ import annotations

import logging

from ...config import TwilioSettings

log = logging.getLogger(__name__)


async def complete_call(settings: TwilioSettings, call_sid: str) -> bool:
    """``calls(sid).update(status="completed")``; a 404 (already ended) counts as done.

    Returns True when Twilio ended it, False when it had already ended.
    """
    from twilio.base.exceptions import TwilioRestException
    from twilio.http.async_http_client import AsyncTwilioHttpClient
    from twilio.rest import Client

    if not settings.account_sid or not settings.auth_token:
        raise RuntimeError("REST hang-up needs TWILIO_ACCOUNT_SID and TWILIO_AUTH_TOKEN")
    http = AsyncTwilioHttpClient()
    client = Client(settings.account_sid, settings.auth_token, http_client=http)
    client.api.base_url = settings.api_base_url.rstrip("/")  # configurable for the simulator
    try:
        await client.api.v2010.accounts(settings.account_sid).calls(call_sid).update_async(status="completed")
        return True
    except TwilioRestException as exc:
        if exc.status == 404:
            log.info("call %s had already ended (404)", call_sid)
            return False
        raise
    finally:
        await http.close()
