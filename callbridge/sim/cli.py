"""``callbridge simulate …``: arguments to a :class:`SimConfig`, calls placed, one line each."""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from .app_server import DEFAULT_REPLY, ScriptedApp
from .call import run_simulation
from .config import DEFAULT_ACCOUNT_SID, SimConfig, SimulatorError
from .report import CallReport, summarize_reports
from .rest import FakeTwilioRest


def _parse_dtmf(value: str) -> tuple[float, str]:
    at, sep, digit = value.partition(":")
    try:
        if not sep:
            raise ValueError
        return float(at), digit
    except ValueError:
        raise argparse.ArgumentTypeError(f"--dtmf {value!r}: expected SECONDS:DIGIT, e.g. 1.5:7") from None


def _parse_query(value: str) -> tuple[str, str]:
    key, sep, val = value.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"--query {value!r}: expected KEY=VALUE")
    return key, val


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="callbridge simulate", description="Call a local callbridge as Twilio would.",
        epilog="Exit status: 0 when no call had an error, a protocol violation or a lost mark (calls with "
               "underruns are reported, not counted clean), 1 otherwise, 2 for bad arguments.",
    )
    p.add_argument("--base-url", required=True, help="where the service listens, e.g. http://127.0.0.1:8080")
    p.add_argument("--public-base-url", default=os.environ.get("CALLBRIDGE_PUBLIC_BASE_URL") or None,
                   help="the URL Twilio would use: signatures are computed over it, nothing is sent to it "
                        "(default: $CALLBRIDGE_PUBLIC_BASE_URL, as the service checks, else --base-url)")
    p.add_argument("--text", action="append", default=[], help="a turn to speak (repeatable)")
    p.add_argument("--stream-text", action="store_true", help="stream turns word by word over the text socket")
    p.add_argument("--word-delay-ms", type=float, default=50.0, help="pause between streamed words")
    p.add_argument("--caller-wav", type=Path,
                   help="caller audio (any WAV; converted to 8 kHz mu-law): played as the caller's reply once the "
                        "bot's last turn has played, or with --barge-in-at over the bot")
    p.add_argument("--await-answer", action="store_true",
                   help="after the --caller-wav reply, wait for the service's transcript of it and for the answer "
                        "(a turn its app or agent queues) to play")
    p.add_argument("--barge-in-at", type=float, metavar="S",
                   help="S seconds after start the caller talks over the bot (the --caller-wav, else generated speech)")
    p.add_argument("--dtmf", type=_parse_dtmf, action="append", default=[], help="SECONDS:DIGIT (repeatable)")
    p.add_argument("--calls", type=int, default=1, help="concurrent calls")
    p.add_argument("--stagger-s", type=float, default=0.0, help="delay between call starts")
    p.add_argument("--query", type=_parse_query, action="append", default=[],
                   help="KEY=VALUE added to the webhook URL, e.g. greeting=Hello (repeatable)")
    p.add_argument("--greeting", action=argparse.BooleanOptionalAction, default=None,
                   help="wait for a greeting before the first turn (default: if one is passed)")
    p.add_argument("--auth-token", default=os.environ.get("TWILIO_AUTH_TOKEN", ""),
                   help="Twilio auth token to sign with (env TWILIO_AUTH_TOKEN)")
    p.add_argument("--api-token", default=os.environ.get("CALLBRIDGE_API_TOKEN", ""),
                   help="control API bearer token (env CALLBRIDGE_API_TOKEN)")
    p.add_argument("--account-sid", default=os.environ.get("TWILIO_ACCOUNT_SID") or DEFAULT_ACCOUNT_SID,
                   help="the account the calls come from (env TWILIO_ACCOUNT_SID)")
    p.add_argument("--rest-port", type=int, help="also serve Twilio's REST hang-up on 127.0.0.1:PORT")
    p.add_argument("--drop-network", action="store_true", help="end by cutting the connection, no stop")
    p.add_argument("--hold", type=float, default=0.0, metavar="SECONDS",
                   help="keep the call open this long after its turns, for curl experiments (prints the CallSid)")
    p.add_argument("--max-call-s", type=float, default=None,
                   help="hard bound on each call (default: 60 s plus --hold)")
    p.add_argument("--turn-timeout-s", type=float, default=30.0)
    p.add_argument("--out", type=Path, help="WAV of what the caller heard (heard-N.wav per call if several)")
    p.add_argument("--report", type=Path, help="JSON report")
    p.add_argument("--allow-remote", action="store_true", help="allow a base URL that is not loopback")
    p.add_argument("--app-server", type=int, metavar="PORT",
                   help="also act as the app: serve the connection the service opens for each call on "
                        "127.0.0.1:PORT (start the service with CALLBRIDGE_APP_WS_URL=ws://127.0.0.1:PORT/), "
                        "print its events, answer each caller_transcript with --app-reply")
    p.add_argument("--app-secret", default=os.environ.get("CALLBRIDGE_APP_SECRET", ""),
                   help="the secret the service signs the app connection with (env CALLBRIDGE_APP_SECRET)")
    p.add_argument("--app-reply", default=DEFAULT_REPLY,
                   help="the app's answer to a transcript; {text} is what the caller said (default: %(default)r)")
    p.add_argument("--app-hangup", action="store_true", help="the app hangs up once its answer has played")
    return p


async def _cli_run(cfg: SimConfig, rest_port: int | None, app: ScriptedApp | None = None) -> list[CallReport]:
    rest: FakeTwilioRest | None = None
    if rest_port is not None:
        rest = FakeTwilioRest(cfg.account_sid, cfg.twilio_auth_token, port=rest_port)
        print(f"Twilio REST stand-in at {await rest.start()}", flush=True)
    try:
        if app is not None:
            try:
                url = await app.start()
            except OSError as exc:
                raise SimulatorError(f"--app-server {app.port}: cannot listen on 127.0.0.1:{app.port} "
                                     f"({exc.strerror})") from None
            print(f"app server at {url}", flush=True)
        return await run_simulation(cfg, rest=rest)
    finally:
        if app is not None:
            await app.stop()
        if rest is not None:
            await rest.stop()


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.0f}"


def format_report(report: CallReport) -> str:
    """One human line per call, plus its protocol errors."""
    r = report
    head = f"call {r.index + 1} {r.call_sid}"
    if r.rejected and r.refusal == "not_configured":
        said = f" (it said {r.refusal_said!r})" if r.refusal_said else ""
        return (f"{head}: not configured: the service answered and hung up{said}; check the voice "
                "(?voice= / --query voice=...) and `callbridge voice list`")
    if r.rejected:
        return f"{head}: rejected by the service: busy (it is full: calls.max_calls or TTS capacity)"
    if r.stream_sid is None and r.error:
        return f"{head}: failed: {r.error}"
    interrupted = r.interrupted_turns
    verdict = "clean" if r.clean else ("NOT clean: underruns" if r.ok else "NOT clean")
    lines = [
        f"{head}: {verdict}; ended by {r.ended_by} after {r.duration_s:.1f} s; {r.ttfa_ms['n']} text turn(s)"
        + (f" ({interrupted} interrupted)" if interrupted else "") + ", "
        f"ttfa p50 {_fmt(r.ttfa_ms['p50'])} ms (heard {_fmt(r.ttfa_heard_ms['p50'])} ms), "
        f"{r.chunks} chunks, underruns {r.underruns} (max gap {r.gaps_ms['max']:.0f} ms), "
        f"marks {r.marks_echoed}/{r.marks_sent}, lost/reordered {r.lost_or_reordered}, "
        f"protocol errors {r.protocol_error_count}"
        + (f", barge-in->clear {_fmt(r.barge_in_to_clear_ms)} ms" if r.barge_in_to_clear_ms is not None else "")
    ]
    for t in r.transcripts:  # what the service made of the caller's speech
        if t["outcome"] == "transcript":
            lines.append(f"  caller said ({t['utterance_id']}): {t['text']!r} (final {_fmt(t['eos_to_final_ms'])} ms "
                         "after the end of speech)")
        else:
            lines.append(f"  caller speech {t['utterance_id']}: no transcript ({t['outcome']}: {t['reason']})")
    for turn in r.turns:
        if turn.get("kind") == "answer":
            heard = " ".join(turn.get("heard") or [])
            lines.append(f"  answered: {turn.get('chunks', 0)} chunks, state {turn.get('state')}"
                         + (f", heard words: {heard!r}" if heard else ""))
    lines += [f"  protocol error: {e}" for e in r.protocol_errors[:10]]
    if r.error:
        lines.append(f"  error: {r.error}")
    return "\n".join(lines)


def main_simulate(argv: Sequence[str] | None = None) -> int:
    """``callbridge simulate …``: 0 when every call is clean, 1 when any had an error, a
    protocol violation or a lost mark, 2 for bad arguments."""
    args = list(sys.argv[1:] if argv is None else argv)
    if args[:1] == ["simulate"]:
        args = args[1:]
    try:
        ns = _parser().parse_args(args)
    except SystemExit as exc:  # --help, or argparse's own usage error
        return exc.code if isinstance(exc.code, int) else 2
    try:
        cfg = SimConfig(
            base_url=ns.base_url, public_base_url=ns.public_base_url, twilio_auth_token=ns.auth_token,
            account_sid=ns.account_sid, api_token=ns.api_token, texts=ns.text, stream_text=ns.stream_text,
            caller_wav=ns.caller_wav, barge_in_at_s=ns.barge_in_at, dtmf=ns.dtmf, calls=ns.calls,
            max_call_s=ns.max_call_s if ns.max_call_s is not None else 60.0 + ns.hold, webhook_query=dict(ns.query), drop_network=ns.drop_network,
            out_wav=ns.out, report_path=ns.report, allow_remote=ns.allow_remote, expect_greeting=ns.greeting,
            word_delay_s=ns.word_delay_ms / 1000.0, turn_timeout_s=ns.turn_timeout_s, stagger_s=ns.stagger_s,
            hold_s=ns.hold, announce=lambda line: print(line, flush=True), await_answer=ns.await_answer,
        )
    except SimulatorError as exc:
        print(f"callbridge simulate: {exc}", file=sys.stderr)
        return 2
    if ns.caller_wav is not None and not ns.caller_wav.is_file():
        print(f"callbridge simulate: --caller-wav {ns.caller_wav}: no such file", file=sys.stderr)
        return 2
    app = None
    if ns.app_server is not None:
        if not ns.app_secret:
            print("callbridge simulate: --app-server needs the secret the service signs with: set "
                  "CALLBRIDGE_APP_SECRET (the same value as the service's) or pass --app-secret", file=sys.stderr)
            return 2
        app = ScriptedApp(ns.app_server, ns.app_secret, reply=ns.app_reply, hang_up=ns.app_hangup,
                          say=lambda line: print(line, flush=True))
    started = time.monotonic()
    try:
        reports = asyncio.run(_cli_run(cfg, ns.rest_port, app))
    except SimulatorError as exc:  # the app port is taken
        print(f"callbridge simulate: {exc}", file=sys.stderr)
        return 2
    for report in reports:
        print(format_report(report))
    s = summarize_reports(reports)
    print(
        f"{s['calls']} call(s) in {time.monotonic() - started:.1f} s: {s['clean']} clean, "
        f"{s['with_underruns']} with underruns, {s['failed']} failed, "
        f"{s['rejected']} refused; {s['interrupted_turns']} turn(s) interrupted; "
        f"ttfa p50/p95 {_fmt(s['ttfa_ms']['p50'])}/{_fmt(s['ttfa_ms']['p95'])} ms; "
        f"underruns {s['underruns']}; lost/reordered {s['lost_or_reordered']}; "
        f"protocol errors {s['protocol_errors']}"
    )
    written = [r.wav_path for r in reports if r.wav_path] + ([str(cfg.report_path)] if cfg.report_path else [])
    if written:
        print("wrote " + ", ".join(written))
    return 0 if all(r.ok and r.refusal != "not_configured" for r in reports) else 1
