"""``Dia2``: a loaded model (network, tokenizer, Mimi) and whole-utterance generation.

Whole-utterance generation is the reference path: text (+ an optional voice prompt) in,
24 kHz audio and word times out. It runs on the same :class:`StepEngine` the streaming
path uses, with one stream, so the two agree by construction.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from .checkpoint import CheckpointFiles, load_model, pick_device_and_dtype, resolve_checkpoint
from .codec import MimiCodec
from .engine import PromptState, StepEngine
from .errors import PromptError, ScriptError
from .model import Dia2Model
from .sampling import GenerationConfig
from .state_machine import Entry, StateRules, TokenIds, new_text_state
from .text import TextTokenizer, WordTiming, parse_script, prompt_entries

log = logging.getLogger(__name__)



@dataclass(frozen=True)
class PromptClip:
    """One speaker's prompt: 24 kHz mono float32 samples and their word timings (seconds)."""

    audio: np.ndarray
    words: tuple[WordTiming, ...]


@dataclass(frozen=True)
class VoicePrompt:
    """An S1 clip (the voice to clone) and optionally an S2 clip placed after it (the other side)."""

    s1: PromptClip
    s2: PromptClip | None = None


@dataclass
class GenerationResult:
    audio: np.ndarray  # float32 [N] at sample_rate, only the new speech (never the prompt)
    codes: torch.Tensor  # [K, T] aligned Mimi codes of the generated frames
    words: list[tuple[str, float]]  # (word, start in seconds from the start of ``audio``)
    steps: int
    truncated: bool
    sample_rate: int = 24000
    prompt_frames: int = 0
    records: list = field(default_factory=list)


class Dia2:
    """A loaded Dia2 checkpoint. Build with :meth:`load`."""

    def __init__(self, model: Dia2Model, tokenizer: TextTokenizer, codec: MimiCodec, files: CheckpointFiles) -> None:
        self.model = model
        self.tokenizer = tokenizer
        self.codec = codec
        self.files = files
        self.config = model.config
        d = self.config.data
        self.token_ids = TokenIds(
            new_word=d.text_new_word_token_id,
            pad=d.text_pad_token_id,
            zero=d.text_zero_token_id,
            bos=tokenizer.bos_id,
            speaker1=tokenizer.speaker1_id,
            speaker2=tokenizer.speaker2_id,
        )
        self._engine: StepEngine | None = None

    @classmethod
    def load(
        cls,
        source: str | Path,
        *,
        device: str | None = None,
        dtype: str | None = None,
        mimi: str | None = None,
        progress: bool = True,
        say: Callable[[str], None] | None = None,
    ) -> Dia2:
        """Load from a model folder or a hub repo id; ``mimi`` overrides where Mimi comes from."""
        tell = say or (lambda msg: log.info("%s", msg))
        files = resolve_checkpoint(source, progress=tell if progress else None)
        dev, dt = pick_device_and_dtype(device, dtype)
        tell(f"loading Dia2 from {files.root} on {dev} ({str(dt).removeprefix('torch.')})")
        model = load_model(files, device=dev, dtype=dt, progress=progress)
        tokenizer = TextTokenizer.from_pretrained(files.tokenizer)
        if tokenizer.vocab_size > model.config.data.text_vocab_size:
            from .errors import CheckpointError

            raise CheckpointError(
                f"tokenizer at {files.tokenizer} has {tokenizer.vocab_size} ids but the model's text vocabulary "
                f"is {model.config.data.text_vocab_size}"
            )
        tell(f"loading Mimi from {mimi or files.mimi}")
        codec = MimiCodec.load(mimi or files.mimi, device=dev, progress=progress)
        return cls(model, tokenizer, codec, files)

    # ------------------------------------------------------------------ pieces

    @property
    def device(self) -> torch.device:
        return self.model.device

    @property
    def frame_rate(self) -> float:
        return self.codec.frame_rate

    @property
    def flush_steps(self) -> int:
        """Steps a stream runs after its end marker: max delay + max padding (dia2-format.md §6.4)."""
        return self.config.data.max_delay + self.rules().max_padding

    def rules(self, initial_padding: int = 2) -> StateRules:
        return StateRules.from_config(self.config.data, self.token_ids, initial_padding=initial_padding)

    def script_entries(self, text: str, *, open_with_s1: bool = True) -> list[Entry]:
        return parse_script(self.tokenizer, text, open_with_s1=open_with_s1)

    def tag_first_word(self, entry: Entry) -> Entry:
        """The entry re-encoded as a turn's first word, ``[S1] word`` (for parts after the first)."""
        if entry.is_pause or entry.tokens[:1] == (self.token_ids.speaker1,):
            return entry
        tokens = self.tokenizer.encode_word(entry.text, 1)
        return Entry(tokens=tuple(tokens), text=entry.text, padding=len(tokens))

    def engine(self, rules: StateRules) -> StepEngine:
        """A one-stream engine, allocated once and reused (its rules are swapped per call)."""
        if self._engine is None:
            self._engine = StepEngine(self.model, rules, max_streams=1)
        self._engine.rules = rules
        return self._engine

    def min_steps(self, entries: list[Entry], initial_padding: int) -> int:
        """A lower bound on the steps a script needs (each word takes at least tokens + 1 steps)."""
        steps = initial_padding + self.flush_steps
        for e in entries:
            steps += e.padding if e.is_pause else len(e.tokens) + 1
        return steps

    def check_fits(self, entries: list[Entry], initial_padding: int, prompt_frames: int = 0) -> None:
        need = self.min_steps(entries, initial_padding)
        room = self.config.runtime.max_context_steps - prompt_frames
        if need > room:
            raise ScriptError(
                f"text too long: it needs at least {need} steps ({need / self.frame_rate:.1f} s of audio) but "
                f"the model context leaves {room} steps after the {prompt_frames}-frame prompt; "
                "split it into shorter turns"
            )

    def encode_prompt_audio(self, audio: np.ndarray) -> torch.Tensor:
        """24 kHz mono float32 [N] → aligned codes [K, T]."""
        if audio.ndim != 1:
            raise PromptError(f"prompt audio must be mono [N], got shape {audio.shape}")
        if audio.size < self.codec.samples_per_frame:
            raise PromptError("prompt audio is shorter than one 80 ms frame")
        with torch.inference_mode():
            return self.codec.encode(torch.from_numpy(np.ascontiguousarray(audio, dtype=np.float32)))

    def prompt_plan(self, prompt: VoicePrompt) -> tuple[torch.Tensor, list[Entry], set[int]]:
        """Aligned codes [K, P] of S1 (+ S2), their text entries, and the forced new-word steps (§7.2)."""
        if not prompt.s1.words:
            raise PromptError("the S1 prompt has no words: a voice prompt needs speech with its transcript")
        s1_codes = self.encode_prompt_audio(prompt.s1.audio)
        p1 = s1_codes.shape[1]
        entries, steps = prompt_entries(
            self.tokenizer, list(prompt.s1.words), speaker=1, frame_rate=self.frame_rate
        )
        codes = [s1_codes]
        all_steps = set(steps)
        if prompt.s2 is not None:
            if not prompt.s2.words:
                raise PromptError("the S2 clip has no words")
            s2_codes = self.encode_prompt_audio(prompt.s2.audio)
            e2, st2 = prompt_entries(
                self.tokenizer, list(prompt.s2.words), speaker=2, frame_rate=self.frame_rate, frame_offset=p1
            )
            entries += e2
            all_steps |= set(st2)
            codes.append(s2_codes)
        return torch.cat(codes, dim=1), entries, all_steps

    def prefill_prompt(self, engine: StepEngine, slot: int, prompt: VoicePrompt) -> tuple[PromptState, torch.Tensor]:
        """Prefill: teacher-force the prompt in ``slot``; returns its state and its aligned codes [K, P]."""
        codes, entries, steps = self.prompt_plan(prompt)
        p = codes.shape[1]
        room = self.config.runtime.max_context_steps - p - self.flush_steps
        if room < 1:
            raise PromptError(
                f"prompt is {p / self.frame_rate:.1f} s ({p} frames): too long for the "
                f"{self.config.runtime.max_context_steps}-step context"
            )
        text = new_text_state(engine.rules, entries, initial_padding=0, closed=True)
        state = engine.teacher_force_prompt(slot, codes, text, steps, self.token_ids.bos)
        dropped = len(text.entries)
        if dropped:
            # Words whose forced start falls at or after the prompt's end were never fed; they are
            # the prompt's, so they must not leak into the turn (dia2-format.md §5.5).
            log.debug("prompt prefill left %d prompt word(s) unconsumed; dropped", dropped)
        state.extra["dropped_prompt_words"] = dropped
        return state, codes

    # ------------------------------------------------------------------ generation

    def generate(
        self,
        text: str,
        *,
        prompt: VoicePrompt | None = None,
        config: GenerationConfig | None = None,
        open_with_s1: bool = True,
        progress: Callable[[int, int], None] | None = None,
        record: bool = False,
    ) -> GenerationResult:
        """Speak ``text`` (a Dia2 script: ``[S1] …``), optionally continuing a voice prompt."""
        cfg = config or GenerationConfig()
        rules = self.rules(cfg.initial_padding)
        entries = self.script_entries(text, open_with_s1=open_with_s1)
        engine = self.engine(rules)
        prompt_codes: torch.Tensor | None = None
        if prompt is not None:
            pstate, prompt_codes = self.prefill_prompt(engine, 0, prompt)
            self.check_fits(entries, cfg.initial_padding, pstate.prompt_frames)
            turn = new_text_state(rules, entries, initial_padding=cfg.initial_padding, closed=True)
            slot = engine.start_from_prompt(0, cfg, pstate, turn)
        else:
            self.check_fits(entries, cfg.initial_padding)
            turn = new_text_state(rules, entries, initial_padding=cfg.initial_padding, closed=True)
            slot = engine.start_fresh(0, cfg, turn, self.token_ids.bos)
        slot.record = [] if record else None
        estimate = self.min_steps(entries, cfg.initial_padding) + 2 * len(entries)
        frames: list[torch.Tensor] = []
        words: list[tuple[str, int]] = []
        steps = 0
        try:
            while not slot.finished:
                for frame in engine.step([0]):
                    frames.append(frame.codes)
                    words.extend((w, frame.frame) for w in frame.words)
                steps += 1
                if progress is not None:
                    progress(steps, max(estimate, steps))
        finally:
            engine.release(0)
        first = slot.prompt_frames
        codes = torch.stack(frames, dim=1) if frames else torch.zeros((self.config.num_codebooks, 0), dtype=torch.long)
        audio = self.decode_codes(codes, prompt_codes)
        return GenerationResult(
            audio=audio,
            codes=codes,
            words=[(w, (f - first) / self.frame_rate) for w, f in words],
            steps=steps,
            truncated=slot.truncated,
            sample_rate=self.codec.sample_rate,
            prompt_frames=first,
            records=slot.record or [],
        )

    def decode_codes(self, codes: torch.Tensor, prompt_codes: torch.Tensor | None = None) -> np.ndarray:
        """Batch-decode frames [K, T]; with a prompt, decode it first (so the decoder's context is
        the prompt's, as in streaming) and return only the new frames' samples."""
        if codes.shape[1] == 0:
            return np.zeros(0, dtype=np.float32)
        full = codes if prompt_codes is None else torch.cat([prompt_codes.cpu(), codes], dim=1)
        with torch.inference_mode():
            pcm = self.codec.decode(full.to(self.device))[0].float().cpu().numpy()
        skip = 0 if prompt_codes is None else prompt_codes.shape[1] * self.codec.samples_per_frame
        return pcm[skip:].astype(np.float32)
