"""The [sip] settings: defaults off, environment overrides, the number map and trunks, clear errors."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from callbridge.config import DEFAULT_CONFIG, SettingsError, load_settings

ON = {"CALLBRIDGE_SIP_LISTEN": "127.0.0.1:5080", "CALLBRIDGE_SIP_ALLOW": "127.0.0.1/32"}


def test_shipped_config_has_sip_off_with_every_default() -> None:
    s = load_settings(DEFAULT_CONFIG, env={})
    assert not s.sip.enabled and s.sip.rtp_range() == (10000, 10999) and s.sip.codec_list() == ("PCMU", "PCMA")


def test_environment_turns_sip_on() -> None:
    env = {**ON, "CALLBRIDGE_SIP_PUBLIC_IP": "203.0.113.9", "CALLBRIDGE_SIP_RTP_PORTS": "20000-20099",
           "CALLBRIDGE_SIP_DIGEST_USER": "pbx", "CALLBRIDGE_SIP_DIGEST_PASSWORD": "pw"}
    s = load_settings(DEFAULT_CONFIG, env=env).sip
    assert s.enabled and s.listen_addr() == ("127.0.0.1", 5080) and s.public_ip == "203.0.113.9"
    assert s.rtp_range() == (20000, 20099) and (s.digest_user, s.digest_password) == ("pbx", "pw")
    assert "pw" not in repr(s)


def test_numbers_and_trunks_tables(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text("""
[sip]
listen = "127.0.0.1:5060"
[sip.trunks.telnyx]
allow = "192.0.2.0/24"
digest = false
[sip.numbers."+15550100"]
voice = "anna"
greeting = "Hi"
""")
    s = load_settings(path, env={}).sip
    assert s.numbers.get("+15550100") is not None and s.numbers.get("+15550100").voice == "anna"  # type: ignore[union-attr]
    assert s.numbers.get("+15550199") is None
    assert s.trunks.entries[0][0] == "telnyx" and s.trunks.entries[0][1].digest is False


@pytest.mark.parametrize("env,message", [
    ({"CALLBRIDGE_SIP_LISTEN": "5060"}, "sip.listen = '5060': expected IP:port"),
    ({**ON, "CALLBRIDGE_SIP_LISTEN": "0.0.0.0:5060"}, "sip.public_ip"),
    ({**ON, "CALLBRIDGE_SIP_RTP_PORTS": "20000"}, "sip.rtp_ports = '20000': expected low-high"),
    ({**ON, "CALLBRIDGE_SIP_ALLOW": "10.0.0.0/33"}, "'10.0.0.0/33' is not an IP address or CIDR block"),
    ({"CALLBRIDGE_SIP_LISTEN": "127.0.0.1:5060"}, "no source may call"),
    ({**ON, "CALLBRIDGE_SIP_DIGEST_USER": "pbx"}, "CALLBRIDGE_SIP_DIGEST_PASSWORD"),
])
def test_bad_values_name_the_key_and_the_fix(env: dict[str, str], message: str) -> None:
    with pytest.raises(SettingsError, match=message.replace("(", r"\(").replace(".", r"\.")):
        load_settings(DEFAULT_CONFIG, env=env)


def test_digest_password_is_never_read_from_the_file(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[sip]\ndigest_password = "oops"\n')
    with pytest.raises(SettingsError, match="secret"):
        load_settings(path, env={})


def test_malformed_number_entry_is_named(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[sip.numbers."+1555"]\nvoic = "x"\n')
    with pytest.raises(SettingsError, match=r"sip\.numbers\.\+1555"):
        load_settings(path, env={})


def test_dialled_numbers_route_to_their_voice_else_the_default(tmp_path: Path) -> None:
    from callbridge.transports.sip.numbers import Route, allow_list, route_call

    path = tmp_path / "c.toml"
    path.write_text("""
[sip]
listen = "127.0.0.1:5060"
allow = "127.0.0.0/8"
greeting = "Hello"
[sip.trunks.carrier]
allow = "127.0.0.1"
digest = false
[sip.numbers."+1 (555) 010-0100"]
voice = "anna"
app_websocket_url = "wss://app.example.com/anna"
""")
    sip = load_settings(path, env={"CALLBRIDGE_APP_SECRET": "0123456789abcdef"}).sip
    assert route_call(sip, "default", "+15550100100;phone-context=x") == Route("anna", "Hello",
                                                                             "wss://app.example.com/anna")
    assert route_call(sip, "default", "+15550199") == Route("default", "Hello")
    strict = dataclasses.replace(sip, unknown_numbers="reject")
    assert route_call(strict, "default", "+15550199") is None
    allow = allow_list(sip)
    assert [t.name for t in allow.trunks] == ["carrier", "default"]
    assert allow.match("127.0.0.1").name == "carrier" and allow.match("127.0.0.2").name == "default"  # type: ignore[union-attr]


@pytest.mark.parametrize(("entry", "expected"), [
    ('app_websocket_url = "https://app.example.com"', "must be a ws:// or wss:// URL"),
    ('app_websocket_url = "wss://app.example.com"', "set CALLBRIDGE_APP_SECRET"),
])
def test_a_numbers_own_app_is_checked_like_the_default_one(tmp_path: Path, entry: str, expected: str) -> None:
    path = tmp_path / "c.toml"
    path.write_text(f'[sip.numbers."+15550100"]\n{entry}\n')
    with pytest.raises(SettingsError, match=expected) as err:
        load_settings(path, env={})
    assert 'sip.numbers."+15550100".app_websocket_url' in str(err.value)
