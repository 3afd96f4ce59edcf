"""``callbridge``: serve, simulate, demo, voice. Errors print one line and exit with status 2."""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import secrets
import signal
import socket
import sys
from pathlib import Path

from dia2 import Dia2Error

from .config import Settings, SettingsError, load_settings


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


def cmd_serve(args: argparse.Namespace) -> int:
    from .startup import check_secrets

    settings = load_settings(args.config)
    check_secrets(settings)
    return asyncio.run(_serve(settings))


async def _serve(settings: Settings) -> int:
    """Run until SIGINT/SIGTERM; then drain live calls *before* aiohttp stops reading sockets."""
    from aiohttp import web

    from .web.app import build_app, drain_calls

    app = build_app(settings, say=_say)
    runner = web.AppRunner(app, shutdown_timeout=settings.server.shutdown_timeout_s)
    await runner.setup()
    await web.TCPSite(runner, settings.server.host, settings.server.port).start()
    _say(f"callbridge listening on http://{settings.server.host}:{settings.server.port} "
         f"(public URL: {settings.server.public_base_url or 'not set'})")
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


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def run_demo(args: argparse.Namespace) -> int:
    """Start the service in-process, place one simulated call, write the WAV and the report."""
    from aiohttp import web

    from .sim import FakeTwilioRest, SimConfig, run_simulation
    from .web.app import build_app

    port = _free_port()
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
        )
        reports = await run_simulation(cfg)
    finally:
        await runner.cleanup()
        await rest.stop()
    report = reports[0].to_json()
    print(json.dumps(report, indent=2))
    _say(f"heard audio: {args.out}; report: {args.report}")
    return 0 if not report.get("protocol_errors") and report.get("lost_or_reordered", 0) == 0 else 1


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="callbridge", description="A phone line in one cloned voice (Dia2 + Twilio)")
    parser.add_argument("--log-level", default="INFO")
    sub = parser.add_subparsers(dest="command", required=True)

    serve = sub.add_parser("serve", help="run the service")
    serve.add_argument("--config", default=None, help="TOML config (default: $CALLBRIDGE_CONFIG or config/callbridge.toml)")
    serve.set_defaults(func=cmd_serve)

    demo = sub.add_parser("demo", help="service + one simulated call on loopback; writes what the caller heard")
    demo.add_argument("--config", default=None)
    demo.add_argument("--text", action="append", help="a turn to speak (repeatable)")
    demo.add_argument("--greeting", default="Hello! You are talking to the callbridge demo.")
    demo.add_argument("--out", default="out/heard.wav")
    demo.add_argument("--report", default="out/report.json")
    demo.set_defaults(func=lambda a: asyncio.run(run_demo(a)))

    sim = sub.add_parser("simulate", help="act as Twilio against a running service", add_help=False)
    sim.set_defaults(func=None)

    voice = sub.add_parser("voice", help="build, list, show and remove voices", add_help=False)
    voice.set_defaults(func=None)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # simulate and voice own their argument parsing.
    if argv[:1] == ["simulate"]:
        from .sim import main_simulate

        _setup_logging("WARNING")
        return main_simulate(argv[1:])
    if argv[:1] == ["voice"]:
        from .voices.cli import main_voice

        _setup_logging("INFO")
        return main_voice(argv[1:])
    args = build_parser().parse_args(argv)
    _setup_logging(args.log_level)
    try:
        return int(args.func(args))
    except (SettingsError, Dia2Error) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
