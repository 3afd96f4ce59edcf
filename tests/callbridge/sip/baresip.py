"""A real SIP client for integration tests: headless baresip driven over its ctrl_tcp socket.

baresip (Debian ``baresip-core``) plays a WAV as the caller (``aufile``), records what it hears
(``sndfile``: ``dump-*-dec.wav``), and takes commands (dial, DTMF, hold, hang up) as netstrings
on ``ctrl_tcp``; it reports call progress there as events, which the tests wait on (never a
sleep). Everything binds to 127.0.0.1 on ports the OS reports free.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import shutil
from pathlib import Path
from typing import Any

from callbridge.sim.ports import free_tcp_port, free_udp_port, free_udp_range

BARESIP = shutil.which("baresip")
MODULES = Path("/usr/lib/baresip/modules")


class Baresip:
    """One baresip process with its own config folder; ``async with`` starts and stops it."""

    def __init__(self, folder: Path, *, caller_wav: Path, auth: tuple[str, str] | None = None) -> None:
        self.folder = folder
        self.record_dir = folder / "heard"
        self.sip_port = free_udp_port()
        self.ctrl_port = free_tcp_port()
        self.rtp_ports = free_udp_range(20)
        self.caller_wav = caller_wav
        self.auth = auth
        self.events: asyncio.Queue[dict[str, Any]] = asyncio.Queue()
        self._responses: dict[str, asyncio.Future[dict[str, Any]]] = {}
        self._tokens = itertools.count(1)
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.StreamReader | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._read_task: asyncio.Task[None] | None = None
        self.log: list[str] = []

    def _write_config(self) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.record_dir.mkdir(exist_ok=True)
        low, high = self.rtp_ports
        config = f"""poll_method epoll
net_interface 127.0.0.1
sip_listen 127.0.0.1:{self.sip_port}
call_local_timeout 30
call_max_calls 1
audio_source aufile,{self.caller_wav}
audio_player aubridge,nil
audio_alert aubridge,nil
ausrc_srate 8000
auplay_srate 8000
ausrc_channels 1
auplay_channels 1
audio_buffer 20-160
rtp_ports {low}-{high}
rtcp_mux no
jitter_buffer_delay 1-10
module_path {MODULES}
module g711.so
module aufile.so
module aubridge.so
module sndfile.so
module_tmp account.so
module_app menu.so
module_app ctrl_tcp.so
ctrl_tcp_listen 127.0.0.1:{self.ctrl_port}
snd_path {self.record_dir}
"""
        (self.folder / "config").write_text(config)
        account = f"<sip:caller@127.0.0.1:{self.sip_port}>;regint=0;audio_codecs=PCMU,PCMA;answermode=manual"
        if self.auth:
            account += f";auth_user={self.auth[0]};auth_pass={self.auth[1]}"
        (self.folder / "accounts").write_text(account + "\n")

    async def __aenter__(self) -> Baresip:
        assert BARESIP is not None
        self._write_config()
        # stdbuf: baresip's log is block-buffered into a pipe; line buffering lets us see "ready".
        self._proc = await asyncio.create_subprocess_exec(
            "stdbuf", "-oL", BARESIP, "-f", str(self.folder), stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
        assert self._proc.stdout is not None
        self._log_task = asyncio.create_task(self._collect_log(self._proc.stdout))
        # ctrl_tcp listens once the modules are loaded, before baresip says it is ready.
        await self._wait_log("baresip is ready.")
        self._reader, self._writer = await asyncio.open_connection("127.0.0.1", self.ctrl_port)
        self._read_task = asyncio.create_task(self._read_netstrings())
        return self

    async def __aexit__(self, *exc: object) -> None:
        with contextlib.suppress(Exception):
            await asyncio.wait_for(self.command("quit"), 2)
        if self._proc is not None and self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.terminate()
            try:
                await asyncio.wait_for(self._proc.wait(), 5)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        if self._writer is not None:
            self._writer.close()
        for task in (self._read_task, self._log_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task

    async def _collect_log(self, stream: asyncio.StreamReader) -> None:
        self._log_cond = getattr(self, "_log_cond", asyncio.Condition())
        async for raw in stream:
            async with self._log_cond:
                self.log.append(raw.decode(errors="replace").rstrip())
                self._log_cond.notify_all()

    async def _wait_log(self, text: str) -> None:
        self._log_cond = getattr(self, "_log_cond", asyncio.Condition())
        async with self._log_cond:
            await self._log_cond.wait_for(lambda: any(text in line for line in self.log)
                                          or (self._proc is not None and self._proc.returncode is not None))
        if not any(text in line for line in self.log):
            raise RuntimeError("baresip exited:\n" + "\n".join(self.log[-30:]))

    async def _read_netstrings(self) -> None:
        assert self._reader is not None
        while True:
            length = await self._reader.readuntil(b":")
            body = await self._reader.readexactly(int(length[:-1]))
            await self._reader.readexactly(1)  # the trailing comma
            msg = json.loads(body)
            if msg.get("event"):
                await self.events.put(msg)
            elif msg.get("response") and msg.get("token") in self._responses:
                self._responses.pop(msg["token"]).set_result(msg)

    async def command(self, command: str, params: str = "") -> dict[str, Any]:
        assert self._writer is not None
        token = str(next(self._tokens))
        fut: asyncio.Future[dict[str, Any]] = asyncio.get_running_loop().create_future()
        self._responses[token] = fut
        body = json.dumps({"command": command, "params": params, "token": token}).encode()
        self._writer.write(str(len(body)).encode() + b":" + body + b",")
        await self._writer.drain()
        return await fut

    async def wait_event(self, *types: str) -> dict[str, Any]:
        """The next event of one of ``types`` (others are skipped)."""
        while True:
            event = await self.events.get()
            if event.get("type") in types:
                return event

    def heard_files(self) -> list[Path]:
        return sorted(self.record_dir.glob("dump-*-dec.wav"))
