"""The speaker: a call's turns, one after another, through the TTS worker into the playout.

For each turn it opens a stream on the worker (on the call's reservation), feeds it the
turn's text as it arrives, converts every 80 ms frame to 20 ms mu-law chunks, and puts the
chunks into the playout with a marker every ``audio.mark_every_frames`` frames carrying the
words of those frames. A turn that fails on the worker ends ``failed`` and the caller hears
the fallback through the same paced path; the speaker goes on with the next turn.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from typing import Any

from ..audio import CHUNK_BYTES, OutboundAudio
from ..config import Settings
from ..tts import Reservation, TtsWorker, TurnFailed, TurnHandle, WorkerClosed, WorkerFull, generation_config
from ..voices import Voice
from .playout import CallStats, Playout
from .turns import Turn, TurnQueue, TurnState

__all__ = ["Speaker"]


class Speaker:
    """Turns → TTS → playout, for one call. :meth:`run` is the call's speaker task."""

    def __init__(
        self,
        *,
        worker: TtsWorker,
        voice: Voice,
        settings: Settings,
        reservation: Reservation | None,
        turns: TurnQueue,
        playout: Playout,
        fallback_ulaw8k: bytes,
        stats: CallStats,
        emit: Callable[[dict[str, Any]], None],
        speaking: Callable[[], bool],
        on_progress: Callable[[], None],
        log: logging.LoggerAdapter[logging.Logger],
    ) -> None:
        self.worker = worker
        self.voice = voice
        self.settings = settings
        self.reservation = reservation
        self.turns = turns
        self.playout = playout
        self.fallback_ulaw8k = fallback_ulaw8k
        self.stats = stats
        self._emit = emit
        self._speaking = speaking  # whether the call still speaks turns (active or draining)
        self._on_progress = on_progress  # a turn all queued, or no longer current: a drain looks again
        self.log = log
        self._outbound = OutboundAudio(quality=settings.audio.resampler_quality)

    async def run(self) -> None:
        while self._speaking():
            turn = await self.turns.next()
            if turn is not None:
                await self._speak(turn)

    async def _speak(self, turn: Turn) -> None:
        self.turns.current = turn
        turn.state = TurnState.SPEAKING
        epoch = self.playout.epoch
        self._emit({"event": "turn_started", "turn_id": turn.id})
        try:
            handle = await self.worker.open_turn(
                self.voice.snapshot, generation_config(self.settings.tts, seed=self.settings.tts.seed + turn.seq),
                turn_id=turn.id, reservation=self.reservation,
            )
        except (WorkerFull, WorkerClosed, TurnFailed) as exc:
            turn.error = str(exc)
            self.log.warning("turn %s could not start in the TTS worker: %s", turn.id, exc)
            await self._fail(turn, epoch)
            return
        turn.handle = handle
        feeder = asyncio.create_task(self._feed_text(turn, handle), name=f"feed-{turn.id}")
        every = self.settings.audio.mark_every_frames
        words: list[str] = []
        frames = 0
        marker_no = 0
        try:
            async for frame in handle.frames():
                if epoch != self.playout.epoch or turn.state is not TurnState.SPEAKING:
                    break
                words.extend(frame.words)
                turn.words_sent.extend(frame.words)
                for chunk in self._outbound.push(frame.pcm24k):
                    await self.playout.put_audio(epoch, chunk, turn)
                frames += 1
                if frames % every == 0:
                    marker_no += 1
                    await self.playout.put_marker(epoch, f"t{turn.seq}-g{epoch}-m{marker_no}", turn, words)
                    words = []
            if epoch == self.playout.epoch and turn.state is TurnState.SPEAKING:
                for chunk in self._outbound.finish():
                    await self.playout.put_audio(epoch, chunk, turn)
                await self.playout.put_marker(epoch, f"t{turn.seq}-g{epoch}-end", turn, words, end_of_turn=True)
                turn.state = TurnState.SENT
                self._on_progress()
            else:
                self._outbound.drop()
        except TurnFailed as exc:
            self._outbound.drop()
            turn.error = str(exc)
            self.log.warning("turn %s failed in the TTS worker: %s", turn.id, exc)
            await self._fail(turn, epoch)
        finally:
            # Cancelled (call ended), cut, or done: a no-op once the turn has ended on the
            # worker, else its slot is free before the worker's next step.
            handle.cancel()
            feeder.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await feeder
            if self.turns.current is turn and turn.state is not TurnState.SENT:
                self.turns.current = None
                self._on_progress()

    async def _fail(self, turn: Turn, epoch: int) -> None:
        """The turn failed on the worker: play the fallback through the normal path, end it failed.

        The fallback chunks carry no turn (they count in no turn's audio or time to first
        audio); the marker after them lets a drain wait for them and a cut stop them.
        """
        self.stats.failed_turns += 1
        if epoch == self.playout.epoch and self._speaking() and self.fallback_ulaw8k:
            audio = self.fallback_ulaw8k
            for i in range(0, len(audio), CHUNK_BYTES):
                await self.playout.put_audio(epoch, audio[i : i + CHUNK_BYTES], None)
            await self.playout.put_marker(epoch, f"t{turn.seq}-g{epoch}-fallback", turn, [])
        self.turns.finish(turn, TurnState.FAILED)

    @staticmethod
    async def _feed_text(turn: Turn, handle: TurnHandle) -> None:
        while True:
            part = await turn.text_parts.get()
            if part is None:
                handle.close_text()
                return
            handle.push_text(part)
