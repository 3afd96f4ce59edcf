"""Streaming turns: text pushed word by word in, complete 24 kHz frames out, many streams at once.

A :class:`StreamRunner` owns one :class:`StepEngine` and one :class:`MimiStreamDecoder`
sized for ``max_streams``. ``start`` restores a voice snapshot into a free slot (a memory
copy); every ``step`` advances all running streams in one batched forward pass and decodes
their newly complete frames in one Mimi call. Each :class:`Stream` is one turn: push text as
an LLM writes it, close it, read frames, or cancel it at any step.

Long turns: a turn whose text would pass the model context is cut into parts at sentence
ends. Each part starts again from the snapshot (same voice, fresh context), while the Mimi
decoder simply carries on, so the parts' audio joins without a gap.
"""

from __future__ import annotations

import contextlib
import enum
import itertools
import logging
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np
import torch

from .codec import MimiStreamDecoder
from .engine import FrameOut, SlotState, StepEngine, StepPlan, StepTicket
from .errors import DeviceLost, StreamError, raise_if_device_lost
from .mimi_step import MimiStepDecoder
from .runtime import Dia2
from .sampling import GenerationConfig
from .snapshot import VoiceSnapshot
from .state_machine import Entry, TextState, close_text, new_text_state, push_entries
from .text import ScriptCursor

log = logging.getLogger(__name__)

_SENTENCE_END = (".", "!", "?", "…")
_CLOSERS = "\"')]»”’"
# Close a part at the next sentence end once it has used this share of the context.
SOFT_PART_SHARE = 0.6


class StreamStatus(enum.Enum):
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"


@dataclass
class AudioFrame:
    """One complete 80 ms frame of a turn: ``index`` counts from the turn's first frame."""

    index: int
    pcm24k: np.ndarray  # float32 [1920]
    words: list[str]  # words whose audio starts in this frame
    codes: torch.Tensor  # [K] int64 Mimi codes of the frame (CPU)


@dataclass
class StreamStats:
    steps: int = 0
    held_steps: int = 0
    parts: int = 1
    steps_to_first_frame: int | None = None
    started_at: float = field(default_factory=time.perf_counter)
    first_frame_at: float | None = None


def ends_sentence(word: str) -> bool:
    return word.rstrip(_CLOSERS).endswith(_SENTENCE_END)


class Stream:
    """One turn. Created by :meth:`StreamRunner.start`; not thread-safe (the runner's thread owns it)."""

    _ids = itertools.count(1)

    def __init__(self, runner: StreamRunner, snapshot: VoiceSnapshot | None, config: GenerationConfig) -> None:
        self.id = next(Stream._ids)
        self.runner = runner
        self.snapshot = snapshot
        self.config = config
        self.status = StreamStatus.RUNNING
        self.error: str | None = None
        self.stats = StreamStats()
        self.frames: deque[AudioFrame] = deque()
        self.slot: int | None = None
        self._cursor = ScriptCursor(runner.runtime.tokenizer, open_with_s1=self.opens_with_s1)
        self._text_closed = False
        self._part_open = True  # the current part still takes words
        self._staged: list[Entry] = []  # words waiting for the next part
        self._frames_out = 0

    # ------------------------------------------------------------------ public

    @property
    def opens_with_s1(self) -> bool:
        return self.snapshot.opens_with_s1 if self.snapshot is not None else True

    @property
    def done(self) -> bool:
        return self.status is not StreamStatus.RUNNING

    @property
    def text_closed(self) -> bool:
        return self._text_closed

    def push_text(self, text: str) -> None:
        """Add text (any chunking: words may be split across calls)."""
        self._check_open("push text to")
        self._route(self._cursor.feed(text))

    def close_text(self) -> None:
        """No more text will come: the turn ends after its last word and the flush tail."""
        self._check_open("close")
        self._route(self._cursor.close())
        self._text_closed = True
        if not self._staged and self._part_open:
            self._close_part()

    def cancel(self) -> None:
        """Stop now; the slot is free for another stream before the next step."""
        if self.done:
            return
        self.status = StreamStatus.CANCELLED
        self.runner._release(self)

    def pop_frames(self) -> list[AudioFrame]:
        out = list(self.frames)
        self.frames.clear()
        return out

    # ------------------------------------------------------------------ parts

    def _check_open(self, verb: str) -> None:
        if self.status is StreamStatus.CANCELLED:
            raise StreamError(f"cannot {verb} stream {self.id}: it was cancelled")
        if self.done:
            raise StreamError(f"cannot {verb} stream {self.id}: it has ended ({self.status.value})")
        if self._text_closed:
            raise StreamError(f"cannot {verb} stream {self.id}: its text is already closed")

    def _slot_state(self) -> SlotState:
        assert self.slot is not None
        state = self.runner.engine.slots[self.slot]
        assert state is not None
        return state

    def _upper_steps(self, entry: Entry) -> int:
        """Most steps an entry can take (a word waits at most max_padding, then one per token)."""
        if entry.is_pause:
            return entry.padding
        return max(len(entry.tokens), self.runner.engine.rules.max_padding) + 1

    def _fits(self, entry: Entry) -> bool:
        """Whether ``entry`` still fits the current part: from the state the slot's next step
        starts from. With a step in flight whose unread action the answer depends on, that step
        is read first (the host waits for it, at most one step), so the overlapped order cuts
        parts where the plain order does."""
        assert self.slot is not None
        verdicts = {self._fits_after(text, entry) for text in self.runner.engine.planned_texts(self.slot)}
        if len(verdicts) > 1:
            self.runner._read_in_flight()
            verdicts = {self._fits_after(text, entry) for text in self.runner.engine.planned_texts(self.slot)}
        return all(verdicts)

    def _fits_after(self, text: TextState, entry: Entry) -> bool:
        engine = self.runner.engine
        queued = sum(self._upper_steps(e) for e in text.entries)
        flush = engine.max_delay + engine.rules.max_padding + 1
        need = queued + len(text.pending_tokens) + text.forced_padding + self._upper_steps(entry) + flush
        return engine.next_position(self.slot) + need <= engine.context  # type: ignore[arg-type]

    def _route(self, entries: list[Entry]) -> None:
        for entry in entries:
            if self._part_open and not self._staged and not self._part_has_words() and not self._fits(entry):
                # Not even an empty part can hold it: refuse rather than start parts forever.
                raise StreamError(
                    f"the word {entry.text[:40]!r} ({len(entry.tokens)} tokens) cannot fit the model context; "
                    "split it with spaces"
                )
            if self._part_open and not self._staged and self._fits(entry):
                self._edit_text(lambda text, entry=entry: push_entries(text, [entry]))
                if ends_sentence(entry.text) and self._past_soft_limit():
                    self._close_part()
            else:
                if self._part_open:
                    self._close_part()
                self._staged.append(entry)

    def _part_has_words(self) -> bool:
        st = self._slot_state()
        return bool(st.text.entries or st.text.transcript or st.text.pending_tokens)

    def _past_soft_limit(self) -> bool:
        st = self._slot_state()
        room = self.runner.engine.context - st.prompt_frames
        return self.runner.engine.next_position(self.slot) - st.prompt_frames > SOFT_PART_SHARE * room  # type: ignore[arg-type]

    def _close_part(self) -> None:
        self._part_open = False
        self._edit_text(close_text)

    def _edit_text(self, edit: Callable[[TextState], None]) -> None:
        """Words and closes go through the engine: a step in flight must see them too."""
        assert self.slot is not None
        self.runner.engine.edit_text(self.slot, edit)

    def _next_part(self) -> None:
        """The current part has played out: start the next one from the snapshot in the same slot."""
        staged, self._staged = self._staged, []
        if staged and self.opens_with_s1:
            staged[0] = self.runner.runtime.tag_first_word(staged[0])
        self.stats.parts += 1
        self.runner._restart_slot(self, part=self.stats.parts - 1)
        self._part_open = True
        self._route(staged)
        if self._text_closed and not self._staged and self._part_open:
            self._close_part()

    # ------------------------------------------------------------------ runner side

    def _on_frame(self, frame: FrameOut, pcm: np.ndarray) -> None:
        if self.stats.steps_to_first_frame is None:
            self.stats.steps_to_first_frame = self.stats.steps + 1  # this step counts
            self.stats.first_frame_at = time.perf_counter()
        self.frames.append(AudioFrame(index=self._frames_out, pcm24k=pcm, words=frame.words, codes=frame.codes))
        self._frames_out += 1

    def _after_step(self) -> None:
        st = self._slot_state()
        self.stats.steps += 1
        self.stats.held_steps = st.text.held_steps
        if not st.finished:
            return
        if self._staged or not self._text_closed:
            self._next_part()
        else:
            self.status = StreamStatus.DONE
            self.runner._release(self)


class StreamRunner:
    """Steps every running stream together. Single-threaded: call it from one thread only."""

    def __init__(self, runtime: Dia2, max_streams: int = 1, *, overlap: bool | None = None) -> None:
        self.runtime = runtime
        self.max_streams = max_streams
        self.engine = StepEngine(runtime.model, runtime.rules(), max_streams=max_streams)
        # Overlapped steps (see step): None = on where the device runs behind the host (CUDA).
        # On the CPU a step computes when it is launched, so overlapping would only hold each
        # step's frames back by one step.
        self.overlap = runtime.device.type == "cuda" if overlap is None else overlap
        self._in_flight: StepTicket | None = None  # overlapped: the step launched by the last call
        self.decoder = MimiStreamDecoder(runtime.codec, max_batch=max_streams)
        # Each step's frames: on CUDA one fixed-shape masked decode over every row, graphed with
        # the engine's graphs (same pool and output rule, see dia2/mimi_step.py); on CPU the
        # emitting rows only. Captured now, like the step's graphs: no row emits, nothing changes.
        engine = self.engine
        self.frame_decoder = MimiStepDecoder(
            self.decoder, graphed=engine.use_cuda_graphs and runtime.codec.device.type == "cuda",
            memory=engine.graph_memory, guard=engine.outputs,
        )
        self.frame_decoder.capture()
        self.streams: dict[int, Stream] = {}  # slot → stream

    @property
    def active(self) -> int:
        return len(self.streams)

    def start(
        self,
        snapshot: VoiceSnapshot | None,
        config: GenerationConfig | None = None,
        *,
        text: str | None = None,
        close: bool = False,
    ) -> Stream:
        """Start a turn in a free slot, restored from ``snapshot`` (None: no voice prompt)."""
        free = self.engine.free_slots()
        if not free:
            raise StreamError(f"all {self.max_streams} stream slots are busy")
        stream = Stream(self, snapshot, config or GenerationConfig())
        stream.slot = free[0]
        self._restart_slot(stream, part=0)
        if snapshot is not None:
            self.decoder.set_row_state(stream.slot, snapshot.mimi_state)
        else:
            self.decoder.reset_rows([stream.slot])
        self.streams[stream.slot] = stream
        if text:
            stream.push_text(text)
        if close:
            stream.close_text()
        return stream

    def _restart_slot(self, stream: Stream, part: int) -> None:
        assert stream.slot is not None
        cfg = stream.config
        if part:
            # Each part gets its own draws (its steps repeat the first part's positions).
            cfg = GenerationConfig(cfg.text, cfg.audio, cfg.cfg_scale, cfg.cfg_filter_k, cfg.initial_padding,
                                   cfg.seed + 1_000_003 * part)
        rules = self.engine.rules
        text = new_text_state(rules, (), initial_padding=cfg.initial_padding, closed=False)
        if self.engine.slots[stream.slot] is not None:
            self.engine.release(stream.slot)
        if stream.snapshot is not None:
            self.engine.start_from_prompt(stream.slot, cfg, stream.snapshot.prompt, text)
        else:
            self.engine.start_fresh(stream.slot, cfg, text, self.runtime.token_ids.bos)

    def _release(self, stream: Stream) -> None:
        if stream.slot is not None and self.streams.get(stream.slot) is stream:
            del self.streams[stream.slot]
            self.engine.release(stream.slot)

    def step(self) -> list[Stream]:
        """One batched step of every running stream; returns the streams that got new frames.

        Fault isolation: a stream whose step raises is FAILED (``error`` says why) and released;
        the others go on. When the batched step raises, the engine has left every slot's host
        state untouched, so each slot's step is run again alone and only the slots that raise
        alone fail (the others advance exactly as in the batch: counter-based RNG, idempotent
        device writes). A Mimi decode that raises fails the streams of that decode call.

        Overlapped (:attr:`overlap`): each call launches the next step before the host work of
        the one launched by the previous call, which ran on the device meanwhile: prepare the
        next step from both outcomes of each stream's pending action, read the pending step's
        actions, queue its frames' Mimi decode, launch the next step, then commit the pending
        one and hand out its PCM. The device never waits on the host's bookkeeping; the
        streams, their frames and their tokens are exactly those of the plain order (a call
        returns the frames of the step launched one call earlier). A step that fails as a batch
        is run again unoverlapped, as above.

        :class:`DeviceLost` is not isolated: it propagates (the device context is gone for every
        stream; the owner must rebuild the runtime in a new process).
        """
        if self.overlap:
            return self._step_overlapped()
        if not self.streams:
            return []
        return self._step_now(sorted(self.streams))

    def _step_now(self, slots: list[int], batch_error: Exception | None = None,
                  batch: int | None = None) -> list[Stream]:
        """One step of ``slots`` from start to end, with the fault isolation of :meth:`step`
        (``batch_error``: the batched step of ``batch`` slots, default ``slots``, already failed
        with it; go straight to the retries)."""
        frames: list[FrameOut] = []
        if batch_error is None:
            try:
                frames = self.engine.step(slots)
            except DeviceLost:
                raise
            except Exception as exc:  # isolation boundary: find the stream(s) that raise alone (below)
                batch_error = exc
        if batch_error is not None:
            if len(slots) == 1 and (batch is None or batch == 1):  # it failed alone: its own error
                self._fail(self.streams[slots[0]], batch_error)
            else:
                log.warning("batched step failed for slots %s (%s: %s); retrying each alone",
                            slots, type(batch_error).__name__, batch_error)
                for slot in slots:
                    try:
                        frames.extend(self.engine.step([slot]))
                    except DeviceLost:
                        raise
                    except Exception as exc:
                        self._fail(self.streams[slot], exc)
        failed = self._submit_decode(frames)
        touched = self._collect_decode(frames, failed)
        self._after_steps(slots)
        return touched

    def _step_overlapped(self, *, plan_next: bool = True) -> list[Stream]:
        engine = self.engine
        pending, self._in_flight = self._in_flight, None
        slots = sorted(self.streams)
        plan = None
        if plan_next and slots and not (pending is not None and pending.failed):
            try:
                plan = engine.prepare(slots, after=pending)
            except DeviceLost:
                raise
            except Exception as exc:  # e.g. a bad text id: that step runs on its own, isolated
                log.warning("could not plan the next step ahead (%s: %s)", type(exc).__name__, exc)
        if pending is None:
            if plan is None:
                return self._step_now(slots) if slots else []
            try:
                self._launch(plan)
            except DeviceLost:
                raise
            except Exception as exc:
                return self._step_now(slots, batch_error=exc)
            return []  # its frames come with the next call
        # The streams the pending step stepped and that still hold their slots.
        stepped = [s for s, st in pending.states.items() if engine.slots[s] is st and s in self.streams]
        try:
            engine.wait(pending)
        except DeviceLost:
            raise
        except Exception as exc:  # nothing committed: run that step again, each stream alone
            return self._step_now(stepped, batch_error=exc, batch=len(pending.states)) if stepped else []
        frames = engine.frames(pending)
        failed = self._submit_decode(frames)  # queued before the next step: its PCM is not held back
        if plan is not None:
            try:
                self._launch(plan)
            except DeviceLost:
                raise
            except Exception as exc:  # the next call plans that step again, unoverlapped
                log.warning("could not launch the next step ahead (%s: %s)", type(exc).__name__, exc)
        try:
            engine.commit(pending)
        except Exception as exc:  # only its records can raise (tests, traces): its streams cannot go on
            if failed is None and frames:
                with contextlib.suppress(Exception):
                    self.frame_decoder.collect()
            raise_if_device_lost(self.runtime.device, exc, "while committing a step")
            for slot in stepped:
                if slot in self.streams:
                    self._fail(self.streams[slot], exc)
            return []
        touched = self._collect_decode(frames, failed)
        self._after_steps(stepped)
        return touched

    def drain(self) -> list[Stream]:
        """Overlapped: finish the step in flight (read it, commit it, hand out its frames) without
        launching another, so the engine's host state is current and nothing runs on the device
        for this runner. A no-op otherwise. The worker calls it when its last stream has ended."""
        if self._in_flight is None:
            return []
        return self._step_overlapped(plan_next=False)

    def _read_in_flight(self) -> None:
        """Read the step in flight now (wait for its actions), so what depends on them is known.
        A step that fails here is handled by the next :meth:`step` (its error is kept)."""
        if self._in_flight is not None:
            try:
                self.engine.wait(self._in_flight)
            except DeviceLost:
                raise  # every stream's end: the owner must know now
            except Exception:
                pass

    def _launch(self, plan: StepPlan) -> None:
        ticket = self.engine.launch(plan)
        self._in_flight = ticket if ticket.outcomes else None  # every stream ended: nothing runs

    def _submit_decode(self, frames: list[FrameOut]) -> Exception | None:
        """Start the Mimi decode of ``frames``; the error if it raised."""
        if not frames:
            return None
        try:
            self.frame_decoder.submit([f.slot for f in frames], [f.codes for f in frames])
        except Exception as exc:
            return exc
        return None

    def _collect_decode(self, frames: list[FrameOut], failed: Exception | None) -> list[Stream]:
        """Hand each frame's PCM to its stream; returns those streams. A decode that raised
        fails the streams of its frames (their decoder rows may be half-updated)."""
        if not frames:
            return []
        if failed is None:
            try:
                pcm_host = self.frame_decoder.collect()
            except Exception as exc:
                failed = exc
        if failed is not None:
            raise_if_device_lost(self.runtime.device, failed, "in the Mimi decode")
            for frame in frames:
                if frame.slot in self.streams:
                    self._fail(self.streams[frame.slot], failed)
            return []
        touched: list[Stream] = []
        for i, frame in enumerate(frames):
            stream = self.streams.get(frame.slot)
            if stream is not None:
                stream._on_frame(frame, pcm_host[i])
                touched.append(stream)
        return touched

    def _after_steps(self, slots: list[int]) -> None:
        """Each stepped stream's bookkeeping: its step count, its end, the next part of a long turn."""
        for slot in slots:
            stream = self.streams.get(slot)
            if stream is None:
                continue
            try:
                stream._after_step()
            except Exception as exc:  # e.g. starting the next part of a long turn
                self._fail(stream, exc)

    def _fail(self, stream: Stream, exc: BaseException) -> None:
        """End ``stream`` as FAILED with the error's text, free its slot, log it with the traceback."""
        log.error("stream %s (slot %s) failed: %s: %s", stream.id, stream.slot, type(exc).__name__, exc,
                  exc_info=exc)
        stream.status = StreamStatus.FAILED
        stream.error = f"{type(exc).__name__}: {exc}"
        self._release(stream)

    def iter_frames(self, stream: Stream) -> Iterator[AudioFrame]:
        """Drive the runner until ``stream`` ends, yielding its frames as they complete."""
        while True:
            yield from stream.pop_frames()
            if stream.done:
                return
            self.step()

    def run_to_end(self, stream: Stream) -> np.ndarray:
        """Convenience: all of a closed stream's audio as one float32 array."""
        return np.concatenate([f.pcm24k for f in self.iter_frames(stream)] or [np.zeros(0, np.float32)])
