"""Service settings: TOML defaults, environment overrides, secrets from the environment only.

Read once at start into frozen dataclasses (:func:`load_settings`); nothing reads
``os.environ`` after that. Every invalid value is reported with its key and the bad value.
``config/callbridge.toml`` documents each key.
"""

from __future__ import annotations

import os
import tomllib
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

# The documented defaults file of a source checkout. An installed wheel has no such file and runs
# on the dataclass defaults below, which tests/callbridge/test_config.py holds equal to it key by key.
DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "config" / "callbridge.toml"
DEVICES = ("auto", "cpu", "cuda")
DTYPES = ("auto", "float32", "bfloat16")


class SettingsError(Exception):
    """A configuration value is missing or invalid; the message names the key."""


@dataclass(frozen=True)
class ServerSettings:
    host: str = "127.0.0.1"
    port: int = 8080
    public_base_url: str = ""  # the https:// URL Twilio reaches us at; signatures are checked against it
    shutdown_timeout_s: float = 5.0


@dataclass(frozen=True)
class AuthSettings:
    enabled: bool = True  # control API and /ws/stream_tts need the API token
    api_token: str = field(default="", repr=False)  # env CALLBRIDGE_API_TOKEN only


@dataclass(frozen=True)
class TwilioSettings:
    validate_signatures: bool = True
    auth_token: str = field(default="", repr=False)  # env TWILIO_AUTH_TOKEN only
    account_sid: str = ""  # env TWILIO_ACCOUNT_SID; needed for REST hang-up
    api_base_url: str = "https://api.twilio.com"
    stream_token_ttl_s: float = 30.0
    start_timeout_s: float = 5.0
    max_message_bytes: int = 64 * 1024
    max_messages_per_s: int = 200
    greeting: str = ""
    status_callback: bool = False


@dataclass(frozen=True)
class ModelSettings:
    model: str = "random-tiny"  # a model folder, a hub repo id, or random-tiny
    device: str = "auto"
    dtype: str = "auto"
    mimi: str = ""
    # Where generated files go (the random-tiny checkpoint); "" = $XDG_CACHE_HOME/callbridge,
    # else ~/.cache/callbridge. Never the working directory.
    cache_dir: str = ""


@dataclass(frozen=True)
class VoiceSettings:
    dir: str = "voices"
    default: str = "default"


@dataclass(frozen=True)
class TtsSettings:
    max_streams: int = 8
    cfg_scale: float = 2.0
    temperature: float = 0.8
    text_temperature: float = 0.6
    top_k: int = 50
    initial_padding: int = 2
    seed: int = 0


@dataclass(frozen=True)
class AudioSettings:
    resampler_quality: str = "HQ"
    lead_ms: int = 120
    fade_out_ms: int = 10
    mark_every_frames: int = 1
    send_timeout_s: float = 5.0
    send_buffer_bytes: int = 16384  # kernel send buffer of a media socket (bounded: see the TOML)


@dataclass(frozen=True)
class BargeInSettings:
    enabled: bool = True
    min_speech_ms: int = 240
    aggressiveness: int = 2


@dataclass(frozen=True)
class CallSettings:
    max_calls: int = 8
    max_turn_chars: int = 2000
    max_word_chars: int = 64  # longer runs without whitespace are refused (400)
    max_queued_turns: int = 8
    hangup_drain_timeout_s: float = 3.0
    max_call_s: float = 4 * 3600.0
    fallback_audio: str = ""  # WAV played when a turn fails; "" = 300 ms of silence


@dataclass(frozen=True)
class AgentSettings:
    callable: str = ""  # "package.module:function" called with (call, event)
    webhook_url: str = ""  # or a URL that receives {"call", "event"} as JSON
    secret: str = field(default="", repr=False)  # env CALLBRIDGE_AGENT_SECRET: bearer sent to the webhook
    timeout_s: float = 5.0


# ---------------------------------------------------------------------------- [sip]


@dataclass(frozen=True)
class SipNumber:
    """What a dialled number gets: a voice, a greeting and an app (never from caller-supplied headers)."""

    voice: str = ""  # "" = voices.default
    greeting: str = ""  # "" = sip.greeting
    app_websocket_url: str = ""  # "" = app.websocket_url (the app connection; same app.secret)


@dataclass(frozen=True)
class SipNumbers:
    """``[sip.numbers."+15550100"]`` tables: the dialled-number map, checked at load."""

    entries: tuple[tuple[str, SipNumber], ...] = ()

    @classmethod
    def from_config(cls, value: Any, key: str) -> SipNumbers:
        if not isinstance(value, dict):
            raise SettingsError(f"{key}: expected a table of numbers, e.g. [{key}.\"+15550100\"]")
        out = []
        for number, entry in value.items():
            if not isinstance(entry, dict) or set(entry) - {"voice", "greeting", "app_websocket_url"}:
                raise SettingsError(f"{key}.{number}: expected a table with voice, greeting and/or app_websocket_url")
            if not all(isinstance(v, str) for v in entry.values()):
                raise SettingsError(f"{key}.{number}: voice, greeting and app_websocket_url must be strings")
            out.append((number, SipNumber(**entry)))
        return cls(tuple(out))

    def get(self, number: str) -> SipNumber | None:
        return dict(self.entries).get(number)


@dataclass(frozen=True)
class SipTrunkEntry:
    allow: str  # comma-separated CIDRs
    digest: bool = True


@dataclass(frozen=True)
class SipTrunks:
    """``[sip.trunks.NAME]`` tables (``allow = "CIDRs"``, ``digest = true|false``), in file order."""

    entries: tuple[tuple[str, SipTrunkEntry], ...] = ()

    @classmethod
    def from_config(cls, value: Any, key: str) -> SipTrunks:
        if not isinstance(value, dict):
            raise SettingsError(f"{key}: expected a table of trunks, e.g. [{key}.carrier]")
        out = []
        for name, entry in value.items():
            if not isinstance(entry, dict) or not isinstance(entry.get("allow"), str) \
                    or set(entry) - {"allow", "digest"} or not isinstance(entry.get("digest", True), bool):
                raise SettingsError(f'{key}.{name}: expected allow = "CIDR, ..." and optionally digest = true|false')
            out.append((name, SipTrunkEntry(**entry)))
        return cls(tuple(out))


@dataclass(frozen=True)
class SipSettings:
    listen: str = ""  # host:port; SIP is off when empty (env CALLBRIDGE_SIP_LISTEN)
    public_ip: str = ""  # IP in our Contact and SDP; "" = the listen host
    rtp_ports: str = "10000-10999"  # low-high, both ends inclusive
    codecs: str = "PCMU,PCMA"  # what we accept, in our order of preference when the offer allows
    allow: str = ""  # comma-separated CIDRs of the default trunk (env CALLBRIDGE_SIP_ALLOW)
    trunks: SipTrunks = SipTrunks()
    digest_user: str = ""  # digest auth for trunks that require it (env CALLBRIDGE_SIP_DIGEST_USER)
    digest_password: str = field(default="", repr=False)  # env CALLBRIDGE_SIP_DIGEST_PASSWORD only
    numbers: SipNumbers = SipNumbers()
    unknown_numbers: str = "default"  # "default": default voice and greeting; "reject": 404
    greeting: str = ""  # for numbers without their own
    media_timeout_s: float = 30.0  # no RTP from the caller for this long ends the call (BYE)
    max_message_bytes: int = 8192
    max_messages_per_s: int = 50  # per source IP (a trunk sends every call from a few IPs); more are dropped
    full_status: int = 503  # answer when the bridge is full: 503 (another instance may take it) or 486

    @property
    def enabled(self) -> bool:
        return bool(self.listen)

    def listen_addr(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]"), int(port)

    def rtp_range(self) -> tuple[int, int]:
        low, _, high = self.rtp_ports.partition("-")
        return int(low), int(high)

    def codec_list(self) -> tuple[str, ...]:
        return tuple(c.strip().upper() for c in self.codecs.split(",") if c.strip())


def _validate_sip(s: SipSettings) -> None:
    import ipaddress

    def bad(key: str, value: Any, why: str) -> SettingsError:
        return SettingsError(f"sip.{key} = {value!r}: {why}")

    if not s.enabled:
        return
    try:
        host, port = s.listen_addr()
        ipaddress.ip_address(host)
        if not 0 <= port <= 65535:
            raise ValueError
    except ValueError:
        raise bad("listen", s.listen, "expected IP:port, e.g. 0.0.0.0:5060 (CALLBRIDGE_SIP_LISTEN)") from None
    public = s.public_ip or host
    try:
        if ipaddress.ip_address(public).is_unspecified:
            raise bad("public_ip", s.public_ip, "set the address carriers reach us at when listening on 0.0.0.0 "
                      "(CALLBRIDGE_SIP_PUBLIC_IP)")
    except ValueError:
        raise bad("public_ip", s.public_ip, "expected an IP address (CALLBRIDGE_SIP_PUBLIC_IP)") from None
    try:
        low, high = s.rtp_range()
    except ValueError:
        raise bad("rtp_ports", s.rtp_ports, "expected low-high, e.g. 10000-10999 (CALLBRIDGE_SIP_RTP_PORTS)") from None
    if not 1024 <= low < high <= 65535:
        raise bad("rtp_ports", s.rtp_ports, "expected 1024 <= low < high <= 65535")
    codecs = s.codec_list()
    if not codecs or set(codecs) - {"PCMU", "PCMA"}:
        raise bad("codecs", s.codecs, "use PCMU and/or PCMA, comma-separated")
    cidrs = [("allow", s.allow)] + [(f"trunks.{name}.allow", t.allow) for name, t in s.trunks.entries]
    for key, text in cidrs:
        for item in filter(None, (i.strip() for i in text.split(","))):
            try:
                ipaddress.ip_network(item, strict=False)
            except ValueError:
                raise bad(key, text, f"{item!r} is not an IP address or CIDR block") from None
    if not any(text.strip() for _, text in cidrs):
        raise bad("allow", s.allow, "SIP is on but no source may call: list your carrier's or PBX's "
                  "addresses (CALLBRIDGE_SIP_ALLOW=203.0.113.0/24)")
    if bool(s.digest_user) != bool(s.digest_password):
        raise bad("digest_user", s.digest_user, "set both CALLBRIDGE_SIP_DIGEST_USER and "
                  "CALLBRIDGE_SIP_DIGEST_PASSWORD, or neither")
    if s.unknown_numbers not in ("default", "reject"):
        raise bad("unknown_numbers", s.unknown_numbers, 'use "default" or "reject"')
    if s.full_status not in (486, 503):
        raise bad("full_status", s.full_status, "use 486 or 503")
    if s.media_timeout_s <= 0:
        raise bad("media_timeout_s", s.media_timeout_s, "must be > 0")
    if s.max_message_bytes < 1500:
        raise bad("max_message_bytes", s.max_message_bytes, "must be at least 1500")
    if s.max_messages_per_s < 1:
        raise bad("max_messages_per_s", s.max_messages_per_s, "must be at least 1")


@dataclass(frozen=True)
class SpeechSettings:
    """Caller speech: endpointing and speech-to-text (callbridge.speech)."""

    enabled: bool = False  # needs a model (and the speech extra for faster-whisper)
    backend: str = "faster-whisper"  # or "openai-whisper"
    model: str = ""  # faster-whisper: a model folder; openai-whisper: a .pt file or a cached name
    device: str = "cpu"  # cpu or cuda
    compute_type: str = "default"  # faster-whisper: default (int8 on CPU, float16 on CUDA), int8, float16, float32
    cpu_threads: int = 2  # faster-whisper's own threads (the TTS keeps the rest)
    beam_size: int = 1
    word_timestamps: bool = True
    silence_ms: int = 500
    max_utterance_s: float = 15.0
    pre_roll_ms: int = 300
    min_speech_ms: int = 100
    aggressiveness: int = 2
    no_speech_threshold: float = 0.6
    logprob_threshold: float = -1.0
    compression_ratio_threshold: float = 2.4
    queue_size: int = 8


@dataclass(frozen=True)
class ClusterSettings:
    """Many instances sharing Redis (callbridge.cluster); off (one instance, all in memory) without redis_url."""

    redis_url: str = field(default="", repr=False)  # redis://[:password@]host:6379/0 (env CALLBRIDGE_REDIS_URL)
    instance_id: str = ""  # "" = host name + port; unique per instance
    internal_url: str = ""  # http://host:port other instances reach this one at (forwarding)
    public_url: str = ""  # https:// URL Twilio reaches THIS instance at (its stream URL); "" = server.public_base_url
    heartbeat_s: float = 1.0  # how often this instance refreshes its capacity and its calls in Redis
    ttl_s: float = 5.0  # entries of an instance that stops refreshing expire after this
    key_prefix: str = "callbridge:"
    forward_timeout_s: float = 5.0  # a forwarded control request waits this long for the owner

    @property
    def enabled(self) -> bool:
        return bool(self.redis_url)


@dataclass(frozen=True)
class VoiceCheckSettings:
    """``callbridge voice check`` thresholds (why each default: config/callbridge.toml [voice_check])."""

    stt_model: str = ""  # empty: [speech] model (same backend); nothing is downloaded
    max_wer: float = 0.4  # overall word error rate, all turns together
    max_turn_wer: float = 0.75  # any one turn
    max_leak_turns: int = 0  # turns that open with the prompt's own words
    leak_words: int = 3  # consecutive prompt words that make a leak
    max_pre_speech_ms: int = 300  # non-silent audio before the first word
    min_prompt_similarity: float = 0.75  # speaker similarity of each turn to the prompt audio
    min_turn_similarity: float = 0.75  # of each turn to the other turns (mean)
    max_clipped_fraction: float = 0.001  # samples at full scale
    min_level_dbfs: float = -35.0  # speech RMS level; quieter is hard to hear on a phone line
    min_words_per_s: float = 1.5  # speaking rate bounds (heard words over the speech time)
    max_words_per_s: float = 5.0
    max_ttfa_s: float = 0.0  # time to first audio; 0 = reported, not judged (it depends on the machine)
    build_check_turns: int = 3  # sentences `voice build` checks at its end


@dataclass(frozen=True)
class AppSettings:
    """The app connection (web/app_link.py): a WebSocket the bridge opens to the app for every call."""

    websocket_url: str = ""  # ws:// or wss://; "" = no app connection (env CALLBRIDGE_APP_WS_URL)
    secret: str = field(default="", repr=False)  # env CALLBRIDGE_APP_SECRET only: the HMAC key of the upgrade
    connect_timeout_s: float = 3.0  # one connection attempt
    connect_attempts: int = 3  # at call start; then the unreachable message and a hang-up
    reconnect_grace_s: float = 10.0  # after a drop mid-call: reconnect (resume) within this, else message + hang-up
    unreachable_message: str = "Sorry, we cannot take your call right now. Please call again later."
    message_drain_timeout_s: float = 15.0  # how long that message may play before the hang-up
    audio_buffer_frames: int = 50  # subscribed caller audio waiting to be sent (20 ms each); the oldest is dropped


@dataclass(frozen=True)
class Settings:
    server: ServerSettings = ServerSettings()
    auth: AuthSettings = AuthSettings()
    twilio: TwilioSettings = TwilioSettings()
    model: ModelSettings = ModelSettings()
    voices: VoiceSettings = VoiceSettings()
    tts: TtsSettings = TtsSettings()
    audio: AudioSettings = AudioSettings()
    bargein: BargeInSettings = BargeInSettings()
    calls: CallSettings = CallSettings()
    agent: AgentSettings = AgentSettings()
    speech: SpeechSettings = SpeechSettings()
    sip: SipSettings = SipSettings()
    cluster: ClusterSettings = ClusterSettings()
    voice_check: VoiceCheckSettings = VoiceCheckSettings()
    app: AppSettings = AppSettings()

    def with_(self, **sections: dict[str, Any]) -> Settings:
        """A copy with some keys replaced, e.g. ``with_(server={"port": 0})`` (validated)."""
        out = self
        for name, values in sections.items():
            out = replace(out, **{name: _section(name, values, getattr(out, name), from_file=False)})
        validate(out)
        return out


# Environment variables → (section, key). Secrets come only from here.
ENV_OVERRIDES: dict[str, tuple[str, str]] = {
    "CALLBRIDGE_HOST": ("server", "host"),
    "CALLBRIDGE_PORT": ("server", "port"),
    "CALLBRIDGE_PUBLIC_BASE_URL": ("server", "public_base_url"),
    "CALLBRIDGE_MODEL": ("model", "model"),
    "CALLBRIDGE_DEVICE": ("model", "device"),
    "CALLBRIDGE_CACHE_DIR": ("model", "cache_dir"),
    "CALLBRIDGE_VOICE": ("voices", "default"),
    "CALLBRIDGE_VOICES_DIR": ("voices", "dir"),
    "CALLBRIDGE_API_TOKEN": ("auth", "api_token"),
    "CALLBRIDGE_AUTH": ("auth", "enabled"),
    "CALLBRIDGE_MAX_CALLS": ("calls", "max_calls"),
    "CALLBRIDGE_AGENT_SECRET": ("agent", "secret"),
    "CALLBRIDGE_AGENT_WEBHOOK_URL": ("agent", "webhook_url"),
    "CALLBRIDGE_SPEECH": ("speech", "enabled"),
    "CALLBRIDGE_SPEECH_MODEL": ("speech", "model"),
    "CALLBRIDGE_REDIS_URL": ("cluster", "redis_url"),
    "CALLBRIDGE_INSTANCE_ID": ("cluster", "instance_id"),
    "CALLBRIDGE_INTERNAL_URL": ("cluster", "internal_url"),
    "CALLBRIDGE_INSTANCE_PUBLIC_URL": ("cluster", "public_url"),
    "CALLBRIDGE_CLUSTER_HEARTBEAT_S": ("cluster", "heartbeat_s"),
    "CALLBRIDGE_CLUSTER_TTL_S": ("cluster", "ttl_s"),
    "CALLBRIDGE_APP_WS_URL": ("app", "websocket_url"),
    "CALLBRIDGE_APP_SECRET": ("app", "secret"),
    "TWILIO_AUTH_TOKEN": ("twilio", "auth_token"),
    "TWILIO_ACCOUNT_SID": ("twilio", "account_sid"),
    "TWILIO_API_BASE_URL": ("twilio", "api_base_url"),
    "CALLBRIDGE_SIP_LISTEN": ("sip", "listen"),
    "CALLBRIDGE_SIP_PUBLIC_IP": ("sip", "public_ip"),
    "CALLBRIDGE_SIP_ALLOW": ("sip", "allow"),
    "CALLBRIDGE_SIP_RTP_PORTS": ("sip", "rtp_ports"),
    "CALLBRIDGE_SIP_DIGEST_USER": ("sip", "digest_user"),
    "CALLBRIDGE_SIP_DIGEST_PASSWORD": ("sip", "digest_password"),
}
SECRET_KEYS = {("auth", "api_token"), ("twilio", "auth_token"), ("agent", "secret"), ("sip", "digest_password"),
               ("app", "secret")}


def _coerce(value: Any, default: Any, key: str) -> Any:
    target = type(default)
    if hasattr(target, "from_config"):  # a nested table (sip.numbers, sip.trunks) parses itself
        return target.from_config(value, key)
    if target is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("1", "true", "yes", "on", "0", "false", "no", "off"):
            return value.lower() in ("1", "true", "yes", "on")
        raise SettingsError(f"{key}: expected true/false, got {value!r}")
    if target is int:
        if isinstance(value, bool):
            raise SettingsError(f"{key}: expected an integer, got {value!r}")
        try:
            return int(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{key}: expected an integer, got {value!r}") from None
    if target is float:
        try:
            return float(value)
        except (TypeError, ValueError):
            raise SettingsError(f"{key}: expected a number, got {value!r}") from None
    if not isinstance(value, str):
        raise SettingsError(f"{key}: expected a string, got {value!r}")
    return value


def _section(name: str, values: Any, base: Any, *, from_file: bool) -> Any:
    """``base`` (a section dataclass) with ``values`` applied and type-checked."""
    if not isinstance(values, dict):
        raise SettingsError(f"[{name}] must be a table")
    known = {f.name for f in fields(base)}
    kwargs = {}
    for key, value in values.items():
        if key not in known:
            raise SettingsError(f"unknown setting {name}.{key} (known: {', '.join(sorted(known))})")
        if from_file and (name, key) in SECRET_KEYS and value:
            raise SettingsError(f"{name}.{key} is a secret: set it in the environment, not in the config file")
        kwargs[key] = _coerce(value, getattr(base, key), f"{name}.{key}")
    return replace(base, **kwargs)


def validate(s: Settings) -> None:
    def bad(key: str, value: Any, why: str) -> SettingsError:
        return SettingsError(f"{key} = {value!r}: {why}")

    if not 0 <= s.server.port <= 65535:
        raise bad("server.port", s.server.port, "must be 0…65535")
    url = s.server.public_base_url
    if url and not url.startswith(("https://", "http://")):
        raise bad("server.public_base_url", url, "must start with https:// (or http:// for local tests)")
    if url and ("?" in url or "#" in url):
        raise bad("server.public_base_url", url, "must not carry a query string or fragment")
    if s.model.device not in DEVICES and not (s.model.device.startswith("cuda:") and s.model.device[5:].isdigit()):
        raise bad("model.device", s.model.device, "use auto, cpu, cuda or cuda:N (env CALLBRIDGE_DEVICE)")
    if s.model.dtype not in DTYPES:
        raise bad("model.dtype", s.model.dtype, "use auto, float32 or bfloat16")
    if s.tts.max_streams < 1:
        raise bad("tts.max_streams", s.tts.max_streams, "must be at least 1")
    if s.calls.max_calls < 1:
        raise bad("calls.max_calls", s.calls.max_calls, "must be at least 1")
    if s.audio.resampler_quality not in ("LQ", "MQ", "HQ", "VHQ"):
        raise bad("audio.resampler_quality", s.audio.resampler_quality, "use LQ, MQ, HQ or VHQ")
    if not 0 <= s.audio.lead_ms <= 2000:
        raise bad("audio.lead_ms", s.audio.lead_ms, "must be 0…2000")
    if s.audio.mark_every_frames < 1:
        raise bad("audio.mark_every_frames", s.audio.mark_every_frames, "must be at least 1")
    if not 0 <= s.bargein.aggressiveness <= 3:
        raise bad("bargein.aggressiveness", s.bargein.aggressiveness, "must be 0…3")
    if s.tts.top_k < 0:
        raise bad("tts.top_k", s.tts.top_k, "must be >= 0")
    if s.twilio.max_message_bytes < 1024:
        raise bad("twilio.max_message_bytes", s.twilio.max_message_bytes, "must be at least 1024")
    if s.audio.send_timeout_s <= 0:
        raise bad("audio.send_timeout_s", s.audio.send_timeout_s, "must be > 0")
    if not 4096 <= s.audio.send_buffer_bytes <= 4 * 1024 * 1024:
        raise bad("audio.send_buffer_bytes", s.audio.send_buffer_bytes, "must be 4096…4194304")
    if s.calls.max_call_s <= 0:
        raise bad("calls.max_call_s", s.calls.max_call_s, "must be > 0")
    if not 1 <= s.calls.max_word_chars <= 256:
        raise bad("calls.max_word_chars", s.calls.max_word_chars, "must be 1…256")
    if s.agent.callable and s.agent.webhook_url:
        raise bad("agent.callable", s.agent.callable, "configure either agent.callable or agent.webhook_url, not both")
    if s.agent.callable and ":" not in s.agent.callable:
        raise bad("agent.callable", s.agent.callable, "must look like package.module:function")
    if s.agent.webhook_url and not s.agent.webhook_url.startswith(("https://", "http://")):
        raise bad("agent.webhook_url", s.agent.webhook_url, "must be an http(s) URL")
    if s.calls.max_turn_chars < 1:
        raise bad("calls.max_turn_chars", s.calls.max_turn_chars, "must be at least 1")
    _validate_speech(s.speech)
    _validate_sip(s.sip)
    _validate_app(s.app)
    for number, entry in s.sip.numbers.entries:  # a number's own app is reached like the default one
        if entry.app_websocket_url:
            _check_app_url(f'sip.numbers."{number}".app_websocket_url', entry.app_websocket_url, s.app.secret)
    _validate_cluster(s.cluster, s.server)
    _validate_voice_check(s.voice_check)


def _validate_cluster(c: ClusterSettings, server: ServerSettings) -> None:
    def bad(key: str, value: Any, why: str) -> SettingsError:
        return SettingsError(f"cluster.{key} = {value!r}: {why}")

    if c.redis_url and not c.redis_url.startswith(("redis://", "rediss://", "unix://")):
        # Only the scheme is shown: the URL may carry a password.
        raise SettingsError(f"cluster.redis_url (CALLBRIDGE_REDIS_URL) starts with {c.redis_url.split(':')[0]!r}: "
                            "use redis://host:6379/0, rediss:// (TLS) or unix:///path")
    if c.heartbeat_s <= 0 or c.heartbeat_s > 60:
        raise bad("heartbeat_s", c.heartbeat_s, "must be > 0 and <= 60 (CALLBRIDGE_CLUSTER_HEARTBEAT_S)")
    if c.ttl_s < 2 * c.heartbeat_s:
        raise bad("ttl_s", c.ttl_s, f"must be at least twice cluster.heartbeat_s ({c.heartbeat_s}): one lost "
                  "heartbeat must not drop a live instance (CALLBRIDGE_CLUSTER_TTL_S)")
    if c.forward_timeout_s <= 0:
        raise bad("forward_timeout_s", c.forward_timeout_s, "must be > 0")
    for key in ("internal_url", "public_url"):
        url = getattr(c, key)
        if url and (not url.startswith(("https://", "http://")) or "?" in url or "#" in url):
            raise bad(key, url, "must be an http(s):// URL without a query string")
    if any(ch.isspace() for ch in c.instance_id) or len(c.instance_id) > 64:
        raise bad("instance_id", c.instance_id, "must be at most 64 characters without spaces")
    if not c.redis_url:
        return
    if not c.internal_url:
        raise bad("internal_url", c.internal_url, "with CALLBRIDGE_REDIS_URL set, other instances must reach this "
                  "one: set CALLBRIDGE_INTERNAL_URL (e.g. http://gpu1:8080)")
    if not (c.public_url or server.public_base_url):
        raise bad("public_url", c.public_url, "with CALLBRIDGE_REDIS_URL set, Twilio must reach this instance: set "
                  "CALLBRIDGE_INSTANCE_PUBLIC_URL (or CALLBRIDGE_PUBLIC_BASE_URL)")


def _validate_voice_check(vc: VoiceCheckSettings) -> None:
    def bad(key: str, value: Any, why: str) -> SettingsError:
        return SettingsError(f"voice_check.{key} = {value!r}: {why}")

    for key in ("max_wer", "max_turn_wer"):
        if getattr(vc, key) < 0:
            raise bad(key, getattr(vc, key), "must be >= 0 (a word error rate; 0 = every word right)")
    if vc.max_leak_turns < 0:
        raise bad("max_leak_turns", vc.max_leak_turns, "must be >= 0")
    if not 1 <= vc.leak_words <= 20:
        raise bad("leak_words", vc.leak_words, "must be 1…20")
    if vc.max_pre_speech_ms < 0:
        raise bad("max_pre_speech_ms", vc.max_pre_speech_ms, "must be >= 0")
    for key in ("min_prompt_similarity", "min_turn_similarity"):
        if not -1.0 <= getattr(vc, key) <= 1.0:
            raise bad(key, getattr(vc, key), "must be -1…1 (a cosine similarity)")
    if not 0.0 <= vc.max_clipped_fraction <= 1.0:
        raise bad("max_clipped_fraction", vc.max_clipped_fraction, "must be 0…1")
    if vc.min_level_dbfs > 0:
        raise bad("min_level_dbfs", vc.min_level_dbfs, "must be <= 0 (dB below full scale)")
    if not 0 <= vc.min_words_per_s <= vc.max_words_per_s:
        raise bad("min_words_per_s", vc.min_words_per_s, "must be >= 0 and at most max_words_per_s")
    if vc.max_ttfa_s < 0:
        raise bad("max_ttfa_s", vc.max_ttfa_s, "must be >= 0 (0 = not judged)")
    if not 1 <= vc.build_check_turns <= 20:
        raise bad("build_check_turns", vc.build_check_turns, "must be 1…20")


MIN_APP_SECRET_CHARS = 16


def _check_app_url(key: str, url: str, secret: str, hint: str = "") -> None:
    if not url.startswith(("wss://", "ws://")):
        raise SettingsError(f"{key} = {url!r}: must be a ws:// or wss:// URL {hint}".rstrip())
    if len(secret) < MIN_APP_SECRET_CHARS:
        raise SettingsError(f"{key} is set: set CALLBRIDGE_APP_SECRET to a random secret of at least "
                            f"{MIN_APP_SECRET_CHARS} characters (e.g. openssl rand -hex 24); the app checks the "
                            "bridge's signature with it")


def _validate_app(a: AppSettings) -> None:
    def bad(key: str, value: Any, why: str) -> SettingsError:
        return SettingsError(f"app.{key} = {value!r}: {why}")

    if a.websocket_url:
        _check_app_url("app.websocket_url", a.websocket_url, a.secret, "(env CALLBRIDGE_APP_WS_URL)")
    if not 0.1 <= a.connect_timeout_s <= 60:
        raise bad("connect_timeout_s", a.connect_timeout_s, "must be 0.1…60")
    if not 1 <= a.connect_attempts <= 10:
        raise bad("connect_attempts", a.connect_attempts, "must be 1…10")
    if not 0 <= a.reconnect_grace_s <= 300:
        raise bad("reconnect_grace_s", a.reconnect_grace_s, "must be 0…300 (0: no reconnection)")
    if not a.unreachable_message.strip():
        raise bad("unreachable_message", a.unreachable_message, "must say something: the caller must never get a silent line")
    if not 1 <= a.message_drain_timeout_s <= 120:
        raise bad("message_drain_timeout_s", a.message_drain_timeout_s, "must be 1…120")
    if not 1 <= a.audio_buffer_frames <= 3000:
        raise bad("audio_buffer_frames", a.audio_buffer_frames, "must be 1…3000 (20 ms each)")


def _validate_speech(sp: SpeechSettings) -> None:
    def bad(key: str, value: Any, why: str) -> SettingsError:
        return SettingsError(f"speech.{key} = {value!r}: {why}")

    if sp.backend not in ("faster-whisper", "openai-whisper"):
        raise bad("backend", sp.backend, "use faster-whisper or openai-whisper")
    if sp.enabled and not sp.model:
        raise bad("model", sp.model, "speech is enabled: name a model (see config/callbridge.toml [speech])")
    if sp.device not in ("cpu", "cuda"):
        raise bad("device", sp.device, "use cpu or cuda")
    if sp.compute_type not in ("default", "int8", "int8_float16", "float16", "float32"):
        raise bad("compute_type", sp.compute_type, "use default, int8, int8_float16, float16 or float32")
    if not 0 <= sp.cpu_threads <= 64:
        raise bad("cpu_threads", sp.cpu_threads, "must be 0…64 (0 = CTranslate2 picks)")
    if not 1 <= sp.beam_size <= 10:
        raise bad("beam_size", sp.beam_size, "must be 1…10")
    if not 100 <= sp.silence_ms <= 5000:
        raise bad("silence_ms", sp.silence_ms, "must be 100…5000 (peers end a turn after 300-800)")
    if not 1.0 <= sp.max_utterance_s <= 30.0:
        raise bad("max_utterance_s", sp.max_utterance_s, "must be 1…30 (Whisper hears 30 s at most)")
    if not 0 <= sp.pre_roll_ms <= 1000:
        raise bad("pre_roll_ms", sp.pre_roll_ms, "must be 0…1000")
    if not 20 <= sp.min_speech_ms <= 1000:
        raise bad("min_speech_ms", sp.min_speech_ms, "must be 20…1000")
    if not 0 <= sp.aggressiveness <= 3:
        raise bad("aggressiveness", sp.aggressiveness, "must be 0…3")
    if not 0.0 <= sp.no_speech_threshold <= 1.0:
        raise bad("no_speech_threshold", sp.no_speech_threshold, "must be 0…1")
    if sp.logprob_threshold > 0.0:
        raise bad("logprob_threshold", sp.logprob_threshold, "must be <= 0")
    if sp.compression_ratio_threshold <= 1.0:
        raise bad("compression_ratio_threshold", sp.compression_ratio_threshold, "must be > 1")
    if not 1 <= sp.queue_size <= 1024:
        raise bad("queue_size", sp.queue_size, "must be 1…1024")


def default_cache_dir(environ: dict[str, str] | None = None) -> Path:
    """``$XDG_CACHE_HOME/callbridge``, else ``~/.cache/callbridge``."""
    env = os.environ if environ is None else environ
    base = env.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "callbridge"


def load_settings(path: str | Path | None = None, env: dict[str, str] | None = None) -> Settings:
    """File (``path``, else $CALLBRIDGE_CONFIG, else config/callbridge.toml) + environment overrides."""
    environ = dict(os.environ) if env is None else env
    chosen = Path(path or environ.get("CALLBRIDGE_CONFIG") or DEFAULT_CONFIG)
    raw: dict[str, Any] = {}
    if chosen.exists():
        try:
            raw = tomllib.loads(chosen.read_text())
        except tomllib.TOMLDecodeError as exc:
            raise SettingsError(f"{chosen}: invalid TOML ({exc})") from None
    elif path or environ.get("CALLBRIDGE_CONFIG"):
        raise SettingsError(f"config file not found: {chosen}")
    settings = Settings()
    known_sections = {f.name for f in fields(Settings)}
    for name, values in raw.items():
        if name not in known_sections:
            raise SettingsError(f"{chosen}: unknown section [{name}] (known: {', '.join(sorted(known_sections))})")
        current = getattr(settings, name)
        settings = replace(settings, **{name: _section(name, values, current, from_file=True)})
    for var, (section, key) in ENV_OVERRIDES.items():
        if var in environ and environ[var] != "":
            current = getattr(settings, section)
            value = _coerce(environ[var], getattr(current, key), f"{var} ({section}.{key})")
            settings = replace(settings, **{section: replace(current, **{key: value})})
    if not settings.model.cache_dir:
        settings = replace(settings, model=replace(settings.model, cache_dir=str(default_cache_dir(environ))))
    validate(settings)
    return settings
