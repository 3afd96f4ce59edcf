"""The step engine: steps any set of streams together, one Dia2 step (80 ms frame) per call.

One engine owns every preallocated tensor for ``max_streams`` streams: decoder and
depformer KV caches (two rows per stream: conditional, unconditional), the delayed audio
buffer, and the per-stream sampling settings. A stream occupies a slot; slots join and
leave between steps; each keeps its own position, RNG seed, text state machine and end.

Index bookkeeping (dia2-format.md §5), with M = max delay and d_c the delay of codebook c:
- step t feeds delayed column t (BOS where t < d_c) and writes column t+1;
- column j of codebook c holds aligned frame j - d_c;
- aligned frame f is complete at the end of step f + M - 1.

A voice prompt of P frames occupies aligned frames 0…P-1. Its codes stay in the buffer:
a write is skipped whenever it would land on a prompt frame (the "continuation zone" of
the first M steps after the prompt), and frames < P are never emitted. That is what stops
the model from re-speaking the prompt's last words.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch

from .errors import StreamError
from .model import Dia2Model, KVCache
from .sampling import SLOT_ACTION, SLOT_CB0, GenerationConfig, cfg_filter, sample, stage_slot, stream_uniforms
from .state_machine import StateRules, TextState, needs_text, process

UNGENERATED = -2  # buffer sentinel: never fed, never decoded


@dataclass
class FrameOut:
    """One complete aligned frame of one stream: codes [K] int64 (CPU) and the words that start in it."""

    slot: int
    frame: int
    codes: torch.Tensor
    words: list[str]


@dataclass
class StepRecord:
    """What one step of one stream fed and produced (for traces and tests)."""

    step: int
    tokens: torch.Tensor  # [2, C] int64 fed at this step
    action_logits: torch.Tensor  # [2, Vx]
    cb0_logits: torch.Tensor  # [2, Va]
    stage_logits: torch.Tensor | None  # [2, S, V'] or None when the depformer was skipped
    action: int


@dataclass
class SlotState:
    """Host-side state of one stream slot (the device side lives in the engine's tensors)."""

    config: GenerationConfig
    text: TextState
    position: int  # next step index = RoPE position = KV slot
    prompt_frames: int  # aligned frames < prompt_frames belong to the voice prompt
    next_frame: int  # next aligned frame to emit
    main: int  # text tokens the next step feeds on the conditional row
    second: int
    last_frame: int | None = None  # set once the script ended: end_step + max_padding
    truncated: bool = False  # stopped by the context limit
    record: list[StepRecord] | None = None

    @property
    def finished(self) -> bool:
        return self.last_frame is not None and self.next_frame > self.last_frame


@dataclass
class EngineBuffers:
    """Every preallocated device tensor of an engine."""

    decoder: KVCache  # rows 2*slot (cond) and 2*slot+1 (uncond)
    depformer: KVCache
    audio: torch.Tensor  # [slots, K, columns] int64 delayed buffer
    seeds: torch.Tensor  # [slots] int64
    text_temp: torch.Tensor  # [slots] float32
    text_top_k: torch.Tensor  # [slots] int64
    audio_temp: torch.Tensor
    audio_top_k: torch.Tensor
    cfg_scale: torch.Tensor  # [slots] float32
    cfg_k: torch.Tensor  # [slots] int64


@dataclass
class PromptState:
    """Everything a stream needs to continue after a teacher-forced voice prompt (one slot's worth).

    Tensors are on the engine's device; cache tensors are [2, layers, H, P, D] stacks of the
    slot's two rows up to the prompt length only (a restore copies P slots, not the context).
    """

    prompt_frames: int
    keys: torch.Tensor  # [L, 2, Hkv, P, D]
    values: torch.Tensor
    audio: torch.Tensor  # [K, P + M] delayed columns of the prompt (PAD where a delay leaves a gap)
    text: TextState
    main: int
    second: int
    extra: dict[str, object] = field(default_factory=dict)


@dataclass
class _HostPlan:
    """A slot's host state after a step, computed on copies and committed only if the step succeeds."""

    text: TextState
    main: int
    second: int
    position: int
    next_frame: int
    last_frame: int | None
    truncated: bool
    emit_frame: int | None  # aligned frame this step emits, if any

    def commit(self, st: SlotState) -> None:
        """Write the plan into ``st``. The text state is updated in place (callers may hold it)."""
        _assign_text(st.text, self.text)
        st.main, st.second = self.main, self.second
        st.position = self.position
        st.next_frame = self.next_frame
        st.last_frame = self.last_frame
        st.truncated = self.truncated


def _assign_text(dst: TextState, src: TextState) -> None:
    """Make ``dst`` equal to ``src`` keeping ``dst``'s containers (plain copies: cannot raise)."""
    for f in fields(TextState):
        value, current = getattr(src, f.name), getattr(dst, f.name)
        if isinstance(current, deque):
            current.clear()
            current.extend(value)
        elif isinstance(current, list):
            current[:] = value
        else:
            setattr(dst, f.name, value)


class StepEngine:
    def __init__(self, model: Dia2Model, rules: StateRules, max_streams: int = 1) -> None:
        cfg = model.config
        self.model = model
        self.config = cfg
        self.rules = rules
        self.max_streams = max_streams
        self.device = model.device
        self.delays = list(cfg.data.delay_pattern)
        self.max_delay = max(self.delays)
        self.num_codebooks = cfg.num_codebooks
        self.context = cfg.runtime.max_context_steps
        self.bos = cfg.data.audio_bos_token_id
        self.pad = cfg.data.audio_pad_token_id
        self.logit_limit = cfg.audio_logit_limit
        dev = self.device
        self.delay_tensor = torch.tensor(self.delays, device=dev)
        columns = self.context + self.max_delay + 2
        n = max_streams
        self.buffers = EngineBuffers(
            decoder=model.allocate_decoder_cache(2 * n),
            depformer=model.allocate_depformer_cache(2 * n),
            audio=torch.full((n, self.num_codebooks, columns), UNGENERATED, dtype=torch.long, device=dev),
            seeds=torch.zeros(n, dtype=torch.long, device=dev),
            text_temp=torch.zeros(n, device=dev),
            text_top_k=torch.zeros(n, dtype=torch.long, device=dev),
            audio_temp=torch.zeros(n, device=dev),
            audio_top_k=torch.zeros(n, dtype=torch.long, device=dev),
            cfg_scale=torch.ones(n, device=dev),
            cfg_k=torch.zeros(n, dtype=torch.long, device=dev),
        )
        self.slots: list[SlotState | None] = [None] * n
        self.check_invariants = False  # tests turn this on: asserts nothing ungenerated is ever fed

    # ------------------------------------------------------------------ slots

    def free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is None]

    def _load_settings(self, slot: int, gen: GenerationConfig) -> None:
        b = self.buffers
        b.seeds[slot] = gen.seed
        b.text_temp[slot] = gen.text.temperature
        b.text_top_k[slot] = gen.text.top_k
        b.audio_temp[slot] = gen.audio.temperature
        b.audio_top_k[slot] = gen.audio.top_k
        b.cfg_scale[slot] = gen.cfg_scale
        b.cfg_k[slot] = gen.cfg_filter_k

    def start_fresh(self, slot: int, gen: GenerationConfig, text: TextState, bos: int) -> SlotState:
        """A stream with no voice prompt: step 0 feeds BOS text and BOS audio."""
        self._claim(slot)
        self.buffers.audio[slot].fill_(UNGENERATED)
        self._load_settings(slot, gen)
        state = SlotState(
            config=gen, text=text, position=0, prompt_frames=0, next_frame=0,
            main=bos, second=self.config.data.text_pad_token_id,
        )
        self.slots[slot] = state
        return state

    def start_from_prompt(self, slot: int, gen: GenerationConfig, prompt: PromptState, text: TextState) -> SlotState:
        """Continue after a prompt: copy its KV rows and buffer columns into the slot (a memory copy)."""
        self._claim(slot)
        p = prompt.prompt_frames
        b = self.buffers
        for layer, (k, v) in enumerate(zip(b.decoder.k, b.decoder.v)):
            k[2 * slot : 2 * slot + 2, :, :p].copy_(prompt.keys[layer])
            v[2 * slot : 2 * slot + 2, :, :p].copy_(prompt.values[layer])
        b.audio[slot].fill_(UNGENERATED)
        b.audio[slot, :, : prompt.audio.shape[1]].copy_(prompt.audio)
        self._load_settings(slot, gen)
        state = SlotState(
            config=gen, text=text, position=p, prompt_frames=p, next_frame=p,
            main=prompt.main, second=prompt.second,
        )
        self.slots[slot] = state
        return state

    def _claim(self, slot: int) -> None:
        if not 0 <= slot < self.max_streams:
            raise StreamError(f"slot {slot} out of range 0…{self.max_streams - 1}")
        if self.slots[slot] is not None:
            raise StreamError(f"slot {slot} is in use; release it first")

    def release(self, slot: int) -> None:
        self.slots[slot] = None

    # ------------------------------------------------------------------ prompt

    def teacher_force_prompt(
        self, slot: int, codes: torch.Tensor, text: TextState, new_word_steps: set[int], bos: int, chunk: int = 64
    ) -> PromptState:
        """Run the prompt through the transformer (text and audio forced), then capture its state.

        ``codes`` [K, P] aligned Mimi codes of the prompt. Uses the slot's cache rows as scratch.
        The returned PromptState holds everything the first generated step reads.
        """
        d = self.config.data
        k_count, p = codes.shape
        if k_count != self.num_codebooks:
            raise ValueError(f"prompt codes have {k_count} codebooks, the model has {self.num_codebooks}")
        if p < 1:
            raise ValueError("prompt has no frames")
        if p + self.max_delay + 2 > self.context:
            raise ValueError(f"prompt of {p} frames leaves no room in the {self.context}-step context")
        self._claim(slot)
        try:
            delayed = torch.full((k_count, p + self.max_delay), self.pad, dtype=torch.long, device=self.device)
            for c, dc in enumerate(self.delays):
                delayed[c, dc : dc + p] = codes[c].to(self.device)
            # Text of every warm-up step, from the forced state machine: step t feeds the output of t-1.
            mains, seconds = [bos], [d.text_pad_token_id]
            for t in range(p):
                token = d.text_new_word_token_id if t in new_word_steps else d.text_pad_token_id
                m, s = process(self.rules, text, t, token, forced=True)
                mains.append(m)
                seconds.append(s)
            tokens = torch.empty((2, 2 + k_count, p), dtype=torch.long, device=self.device)
            tokens[0, 0] = torch.tensor(mains[:p], device=self.device)
            tokens[0, 1] = torch.tensor(seconds[:p], device=self.device)
            tokens[1, 0] = d.text_zero_token_id
            tokens[1, 1] = d.text_pad_token_id
            steps = torch.arange(p, device=self.device)
            feed = torch.where(steps[None, :] < self.delay_tensor[:, None], self.bos, delayed[:, :p])
            tokens[:, 2:] = feed
            cache = self._slot_cache_view(slot)
            with torch.inference_mode():
                for start in range(0, p, chunk):
                    stop = min(p, start + chunk)
                    self.model.transformer(
                        tokens[:, :, start:stop],
                        torch.full((2,), start, dtype=torch.long, device=self.device),
                        cache,
                        slots=stop,
                    )
            keys = torch.stack([k[:, :, :p].clone() for k in cache.k])
            values = torch.stack([v[:, :, :p].clone() for v in cache.v])
            return PromptState(
                prompt_frames=p, keys=keys, values=values, audio=delayed, text=text,
                main=mains[p], second=seconds[p],
            )
        finally:
            self.slots[slot] = None

    def _slot_cache_view(self, slot: int) -> KVCache:
        b = self.buffers.decoder
        return KVCache(k=[k[2 * slot : 2 * slot + 2] for k in b.k], v=[v[2 * slot : 2 * slot + 2] for v in b.v])

    # ------------------------------------------------------------------ stepping

    def step(self, slots: list[int], hold: Callable[[int], bool] | None = None) -> list[FrameOut]:
        """Advance each listed active slot by one step, all in one batched forward pass.

        Returns the frames that became complete (at most one per slot), in slot order.

        Safe to retry: if it raises, no listed slot's host state has changed, and running the
        same step again (for all or some of the slots) gives the same result, since the RNG is
        counter-based and the device writes (KV at each slot's position, buffer column t+1) are
        a function of the same inputs. ``hold`` must be pure: a retried step calls it again.
        """
        if not slots:
            return []
        states = [self._active(s) for s in slots]
        n = max(slots) + 1  # run rows of slots 0…n-1; slots not listed are computed and ignored
        rows = 2 * n
        dev = self.device
        d = self.config.data
        b = self.buffers
        for s, st in zip(slots, states):
            if st.position >= self.context:
                raise StreamError(f"slot {s} reached the context limit; it should have finished")

        # Slots in range but not listed are computed and ignored. An active one keeps its own
        # position so that its only write is the KV slot it will overwrite at its next step.
        positions = torch.zeros(n, dtype=torch.long)
        for i in range(n):
            other = self.slots[i]
            if other is not None:
                positions[i] = min(other.position, self.context - 1)
        text = torch.empty((n, 2), dtype=torch.long)
        text[:, 0] = d.text_pad_token_id
        text[:, 1] = d.text_pad_token_id
        listed = torch.zeros(n, dtype=torch.bool)
        prompt_frames = torch.zeros(n, dtype=torch.long)
        for s, st in zip(slots, states):
            positions[s] = st.position
            text[s, 0], text[s, 1] = st.main, st.second
            listed[s] = True
            prompt_frames[s] = st.prompt_frames
        max_pos = int(positions.max())
        positions = positions.to(dev)
        listed_dev = listed.to(dev)

        # Inputs [2n, C, 1]: both rows read the same audio column; row 1 has the unconditional text.
        audio_in = b.audio[:n].gather(2, positions[:, None, None].expand(n, self.num_codebooks, 1))[..., 0]
        audio_in = torch.where(positions[:, None] < self.delay_tensor[None, :], self.bos, audio_in)
        audio_in = torch.where(listed_dev[:, None], audio_in, self.bos)
        if self.check_invariants:
            bad = (audio_in[listed_dev] < 0) | (audio_in[listed_dev] > self.bos)
            assert not bool(bad.any()), f"ungenerated or invalid audio fed at positions {positions.tolist()}"
        tokens = torch.empty((rows, 2 + self.num_codebooks), dtype=torch.long, device=dev)
        text_dev = text.to(dev)
        tokens[0::2, :2] = text_dev
        tokens[1::2, 0] = d.text_zero_token_id
        tokens[1::2, 1] = d.text_pad_token_id
        tokens[0::2, 2:] = audio_in
        tokens[1::2, 2:] = audio_in
        row_pos = positions.repeat_interleave(2)

        with torch.inference_mode():
            out = self.model.transformer(tokens[:, :, None], row_pos, b.decoder, slots=max_pos + 1)
            cond_a, uncond_a = out.action_logits[0::2, 0], out.action_logits[1::2, 0]
            guided = cfg_filter(cond_a, uncond_a, b.cfg_scale[:n], b.cfg_k[:n])
            actions = sample(
                guided, b.text_temp[:n], b.text_top_k[:n], stream_uniforms(b.seeds[:n], positions, SLOT_ACTION)
            )
            actions_host = actions.cpu().tolist()

            # Which codebooks of column t+1 may be written: not a prompt frame, and the slot is listed.
            frame_of_next = positions[:, None] + 1 - self.delay_tensor[None, :]  # [n, K]
            writable = (frame_of_next >= prompt_frames.to(dev)[:, None]) & listed_dev[:, None]

            cond_c, uncond_c = out.cb0_logits[0::2, 0], out.cb0_logits[1::2, 0]
            guided = cfg_filter(cond_c, uncond_c, b.cfg_scale[:n], b.cfg_k[:n])
            guided[:, self.logit_limit :] = float("-inf")  # never BOS/PAD as a code
            cb0 = sample(guided, b.audio_temp[:n], b.audio_top_k[:n], stream_uniforms(b.seeds[:n], positions, SLOT_CB0))
            next_col = (positions + 1)[:, None]
            column = b.audio[:n].gather(2, next_col[:, None, :].expand(n, self.num_codebooks, 1))[..., 0]  # [n, K]
            column[:, 0] = torch.where(writable[:, 0], cb0, column[:, 0])

            # The depformer only runs when some listed slot has a codebook>0 frame to write.
            need_depformer = any(
                st.position + 1 - min(self.delays[1:] or [0]) >= st.prompt_frames for st in states
            )
            stage_logits_all: list[torch.Tensor] = []
            if need_depformer:
                hidden = out.hidden[:, 0]
                # Each stage is teacher-forced from column t+1 as it now stands (the sampled
                # code, or the prompt's own code in the continuation zone). Clamp: rows of
                # unlisted slots may hold the ungenerated sentinel; their outputs are ignored.
                prev = column[:, 0].clamp(min=0).repeat_interleave(2)
                text_next: tuple[torch.Tensor, torch.Tensor] | None = None
                for stage in range(self.config.num_stages):
                    if stage == 0 and self.model.depformer.text_embed is not None:
                        text_next = self._text_after_step(slots, states, actions_host, n)
                    logits = self.model.depformer.stage(stage, hidden, prev, b.depformer, text=text_next)
                    guided = cfg_filter(logits[0::2], logits[1::2], b.cfg_scale[:n], b.cfg_k[:n])
                    tok = sample(
                        guided, b.audio_temp[:n], b.audio_top_k[:n],
                        stream_uniforms(b.seeds[:n], positions, stage_slot(stage)),
                    )
                    c = stage + 1
                    column[:, c] = torch.where(writable[:, c], tok, column[:, c])
                    prev = column[:, c].clamp(min=0).repeat_interleave(2)
                    if any(st.record is not None for st in states):
                        stage_logits_all.append(logits)
            b.audio[:n].scatter_(2, next_col[:, None, :].expand(n, self.num_codebooks, 1), column[:, :, None])

        # Host side, staged: each slot's next host state is computed on copies, the step's last
        # device reads (records, emitted codes) are done, and only then is everything committed
        # with plain assignments that cannot raise. So a step that raises anywhere leaves every
        # slot's host state as it was, and the same step can be run again (alone, by the runner).
        plans = [self._plan_host(s, st, actions_host[s], hold) for s, st in zip(slots, states)]
        records: list[StepRecord | None] = []
        for s, st in zip(slots, states):
            if st.record is None:
                records.append(None)
                continue
            records.append(
                StepRecord(
                    step=st.position,
                    tokens=tokens[2 * s : 2 * s + 2].cpu(),
                    action_logits=out.action_logits[2 * s : 2 * s + 2, 0].cpu(),
                    cb0_logits=out.cb0_logits[2 * s : 2 * s + 2, 0].cpu(),
                    stage_logits=(
                        torch.stack([lg[2 * s : 2 * s + 2] for lg in stage_logits_all], dim=1).cpu()
                        if stage_logits_all
                        else None
                    ),
                    action=actions_host[s],
                )
            )
        frames: list[FrameOut] = []
        emit = [(s, plan) for s, plan in zip(slots, plans) if plan.emit_frame is not None]
        if emit:
            idx_slot = torch.tensor([s for s, _ in emit], device=dev)
            idx_col = torch.tensor([plan.emit_frame for _, plan in emit], device=dev)[:, None] + self.delay_tensor[None, :]
            codes = b.audio[idx_slot[:, None], torch.arange(self.num_codebooks, device=dev)[None, :], idx_col]
            codes = codes.cpu()
            for i, (s, plan) in enumerate(emit):
                assert plan.emit_frame is not None
                words = [w for w, step in plan.text.transcript if step + 1 == plan.emit_frame]
                frames.append(FrameOut(slot=s, frame=plan.emit_frame, codes=codes[i], words=words))
        # Commit: nothing below raises.
        for st, plan, record in zip(states, plans, records):
            plan.commit(st)
            if record is not None and st.record is not None:
                st.record.append(record)
        return frames

    def _plan_host(
        self, slot: int, st: SlotState, action: int, hold: Callable[[int], bool] | None
    ) -> _HostPlan:
        """One slot's host-side step on copies: state machine, position, emission, context limit."""
        t = st.position
        text = st.text.copy()
        last_frame = st.last_frame
        if last_frame is None:
            held = hold(slot) if hold is not None else needs_text(self.rules, text)
            main, second = process(self.rules, text, t, action, hold=held)
            if text.end_step is not None:
                last_frame = text.end_step + self.rules.max_padding
        else:
            # After the script ended the text stream only pads (the flush tail).
            main, second = process(self.rules, text, t, 0)
        position = t + 1
        next_frame = st.next_frame
        emit_frame: int | None = None
        complete = position - self.max_delay  # newest complete aligned frame after this step
        if complete >= next_frame and (last_frame is None or next_frame <= last_frame):
            emit_frame = next_frame
            next_frame += 1
        truncated = st.truncated
        finished = last_frame is not None and next_frame > last_frame
        if position >= self.context and not finished:
            # Out of context: emit what is complete, then stop.
            truncated = True
            done = next_frame - 1
            last_frame = done if last_frame is None else min(last_frame, done)
        return _HostPlan(
            text=text, main=main, second=second, position=position, next_frame=next_frame,
            last_frame=last_frame, truncated=truncated, emit_frame=emit_frame,
        )

    def _text_after_step(
        self, slots: list[int], states: list[SlotState], actions: list[int], n: int
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Text of column t+1 (for checkpoints whose depformer embeds text), computed on copies."""
        d = self.config.data
        main = torch.full((2 * n,), d.text_pad_token_id, dtype=torch.long)
        second = torch.full((2 * n,), d.text_pad_token_id, dtype=torch.long)
        main[1::2] = d.text_zero_token_id
        for s, st in zip(slots, states):
            if st.last_frame is None:
                m, sc = process(self.rules, st.text.copy(), st.position, actions[s])
                main[2 * s], second[2 * s] = m, sc
        return main.to(self.device), second.to(self.device)

    def _active(self, slot: int) -> SlotState:
        st = self.slots[slot] if 0 <= slot < self.max_streams else None
        if st is None:
            raise StreamError(f"slot {slot} has no stream")
        return st
