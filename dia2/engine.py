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

A step has a device half and a host half. The device half is one function over the
engine's buffers (:class:`dia2.graphs.DeviceStep`: forward, CFG, sampling, all depformer
stages, buffer writes), replayed as a CUDA graph on GPUs. The host half (text state machine,
emission, context limit) reads one small tensor per step, computes each slot's next state on
copies and commits only when the whole step succeeded.
"""

from __future__ import annotations

import enum
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, fields

import torch

from .errors import StreamError, raise_if_device_lost
from .graphs import (
    ACTION_NEW_WORD,
    ACTION_PAD,
    DeviceStep,
    Edge,
    EngineBuffers,
    GraphMemory,
    OutputGuard,
    SlotInputs,
    StepTensors,
    bucket_for,
    buckets_upto,
    resolve_use_cuda_graphs,
    use_tf32,
)
from .model import Dia2Model, KVCache
from .sampling import (
    MAX_TOP_K,
    CfgRule,
    DrawRule,
    GenerationConfig,
    cfg_rule,
    check_top_k,
    draw_rule,
    seed_keys,
)
from .state_machine import StateRules, TextState, action_decides, needs_text, process

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

    def state_after(self, st: SlotState) -> SlotState:
        """The state ``st`` would have after the step: what the next step is planned from before
        this one is committed (it shares this plan's text state)."""
        return SlotState(
            config=st.config, text=self.text, position=self.position, prompt_frames=st.prompt_frames,
            next_frame=self.next_frame, main=self.main, second=self.second, last_frame=self.last_frame,
            truncated=self.truncated,
        )

    def commit(self, st: SlotState) -> None:
        """Write the plan into ``st``. The text state is updated in place (callers may hold it)."""
        _assign_text(st.text, self.text)
        st.main, st.second = self.main, self.second
        st.position = self.position
        st.next_frame = self.next_frame
        st.last_frame = self.last_frame
        st.truncated = self.truncated


@dataclass
class _Outcome:
    """One slot's step from one starting state: the row it feeds (None: the state has finished,
    the slot does not step) and its state after each action (indexed by the action taken:
    pad 0, new word 1)."""

    base: SlotState
    row: SlotInputs | None
    after: tuple[_HostPlan, ...]


@dataclass
class StepPlan:
    """A step's host half, prepared before it runs (:meth:`StepEngine.prepare`): per slot one
    outcome, or two when the slot's previous step (``after``) has not been read yet (indexed by
    whether that step's action started a word)."""

    slots: list[int]
    states: list[SlotState]
    outcomes: list[tuple[_Outcome, ...]]
    after: StepTicket | None
    generation: int  # the engine's count of slot and text changes when this was prepared


class _Ticket(enum.Enum):
    LAUNCHED = "launched"  # on the device; its copy out not yet read
    READ = "read"  # actions on the host; host state not yet committed
    COMMITTED = "committed"
    FAILED = "failed"


@dataclass
class StepTicket:
    """A launched step (:meth:`StepEngine.launch`): :meth:`StepEngine.wait` reads it, then
    :meth:`StepEngine.commit` applies it. Keyed by slot: the stream state it stepped and the
    outcome it ran."""

    states: dict[int, SlotState]
    outcomes: dict[int, _Outcome]
    status: _Ticket = _Ticket.LAUNCHED
    device_step: DeviceStep | None = None
    kept: dict[int, tuple[torch.Tensor | None, ...]] = field(default_factory=dict)  # record copies
    edge: torch.Tensor | None = None  # host copy of the step's edge, once read
    actions: list[int] | None = None
    error: Exception | None = None  # why it failed, if it did

    @property
    def failed(self) -> bool:
        return self.status is _Ticket.FAILED

    def took_word(self, slot: int) -> int:
        """1 if the slot's action started a word, else 0 (any other action counts as pad)."""
        assert self.actions is not None
        return int(self.actions[slot] == ACTION_NEW_WORD)

    def plan_taken(self, slot: int) -> _HostPlan:
        """The slot's state after this step, for the action it took (once read)."""
        return self.outcomes[slot].after[self.took_word(slot)]

    def branches(self, slot: int, st: SlotState) -> tuple[_HostPlan, ...] | None:
        """The states a next step of ``slot`` may start from: the one this step's action chose
        once read, both before; None if this step did not step ``st`` (or it failed)."""
        if self.status not in (_Ticket.LAUNCHED, _Ticket.READ) or self.states.get(slot) is not st:
            return None
        if self.status is _Ticket.READ:
            return (self.plan_taken(slot),)
        return self.outcomes[slot].after


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
    """Steps up to ``max_streams`` streams together; owns every preallocated tensor.

    The device half of a step is one function (:class:`DeviceStep`); how it runs:

    - eager (CPU default): rows for slots 0…max(listed), attention over the filled cache slots;
    - static (``static_shapes``): rows for the batch bucket of max(listed) + 1 slots (1, 2, 4, …,
      32; buffers are sized for ``bucket_for(max_streams)`` slots) and attention over the
      smallest length bucket that holds every row's position (64, 128, …, the whole cache;
      :func:`dia2.graphs.length_buckets`): the fixed shapes a CUDA graph replays, run eagerly;
    - graphed (``use_cuda_graphs``, CUDA default): static, through captured graphs, one per
      (batch bucket, length bucket, depformer or not), all captured at construction
      (:meth:`capture_graphs`) so the first caller pays nothing.

    ``use_cuda_graphs``: None = on for a CUDA model unless ``DIA2_CUDA_GRAPHS=0`` or
    :func:`dia2.graphs.no_cuda_graphs`. ``static_shapes``: None = same as graphs (it must be on
    with graphs). The host copies one row per slot in and one [n, 1 + K] tensor out per step.

    ``compile_step`` (opt-in, static shapes only): each bucket's step runs through
    ``torch.compile`` (compiled at its first run; captured into the CUDA graph after that). It
    launches far fewer kernels (bench/RESULTS.md) but has not yet been checked under CUDA graphs
    on a GPU, and compiling takes minutes per bucket: off by default.
    """

    def __init__(
        self,
        model: Dia2Model,
        rules: StateRules,
        max_streams: int = 1,
        *,
        use_cuda_graphs: bool | None = None,
        static_shapes: bool | None = None,
        max_top_k: int = MAX_TOP_K,
        compile_step: bool = False,
    ) -> None:
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
        self.text_vocab = cfg.data.text_vocab_size
        self.use_cuda_graphs = resolve_use_cuda_graphs(use_cuda_graphs, self.device)
        if self.use_cuda_graphs and static_shapes is False:
            raise ValueError("CUDA graphs replay fixed shapes: use static_shapes=None or True with use_cuda_graphs")
        self.static_shapes = self.use_cuda_graphs if static_shapes is None else static_shapes
        self.max_top_k = max_top_k
        if compile_step and not self.static_shapes:
            raise ValueError("compile_step=True compiles the fixed-shape step: pass static_shapes=True "
                             "(or use CUDA graphs, which imply it)")
        self.compile_step = compile_step
        dev = self.device
        use_tf32(dev)
        self.delay_tensor = torch.tensor(self.delays, device=dev)
        columns = self.context + self.max_delay + 2
        # Static shapes: slots up to the next bucket exist on the device and are never listed.
        n = bucket_for(max_streams) if self.static_shapes else max_streams
        self.capacity = n
        self.buffers = EngineBuffers(
            decoder=model.allocate_decoder_cache(2 * n),
            depformer=model.allocate_depformer_cache(2 * n),
            audio=torch.full((n, self.num_codebooks, columns), UNGENERATED, dtype=torch.long, device=dev),
            seed_keys=torch.zeros(n, dtype=torch.long, device=dev),
            # Idle rows: greedy, no cut (a slot's own rules are written when its stream starts).
            **self._sampling_rules(torch.zeros(n, device=dev), torch.zeros(n, dtype=torch.long, device=dev),
                                   torch.ones(n, device=dev), torch.zeros(n, dtype=torch.long, device=dev),
                                   torch.zeros(n, device=dev), torch.zeros(n, dtype=torch.long, device=dev)),
        )
        self.slots: list[SlotState | None] = [None] * max_streams
        self._in_flight: list[StepTicket] = []  # launched and not yet committed (or dropped)
        self._generation = 0  # counts slot claims, releases and text edits: a prepared step is stale after one
        self.check_invariants = False  # tests turn this on: asserts nothing ungenerated is ever fed
        # One graph memory pool for every bucket: graphs run one at a time and the engine reads
        # a step's outputs before the next replay.
        self.graph_memory = GraphMemory.new(dev) if self.use_cuda_graphs else None
        self.outputs = OutputGuard()  # that rule, enforced: one step's outputs are read before the next runs
        self._device_steps: list[DeviceStep | None] = [None] * (n + 1)  # index: rows of slots
        if self.use_cuda_graphs:
            self.capture_graphs()

    # ------------------------------------------------------------------ slots

    def free_slots(self) -> list[int]:
        return [i for i, s in enumerate(self.slots) if s is None]

    def _load_settings(self, slot: int, gen: GenerationConfig) -> None:
        cfg = self.config
        try:
            check_top_k("text top_k", gen.text.top_k, cfg.data.action_vocab_size, self.max_top_k)
            check_top_k("audio top_k", gen.audio.top_k, cfg.audio_logit_limit, self.max_top_k)
            check_top_k("cfg_filter_k", gen.cfg_filter_k, cfg.audio_logit_limit, self.max_top_k)
        except ValueError as exc:
            raise StreamError(f"{exc} (or build the StepEngine with a larger max_top_k)") from None
        b = self.buffers
        b.seed_keys[slot] = int(seed_keys(torch.tensor([gen.seed]))[0])
        rules = self._sampling_rules(
            torch.tensor([gen.text.temperature]), torch.tensor([gen.text.top_k]),
            torch.tensor([gen.cfg_scale]), torch.tensor([gen.cfg_filter_k]),
            torch.tensor([gen.audio.temperature]), torch.tensor([gen.audio.top_k]),
        )
        for name, rule in rules.items():
            getattr(b, name).write(slot, rule)

    def _sampling_rules(
        self, text_temp: torch.Tensor, text_top_k: torch.Tensor, cfg_scale: torch.Tensor, cfg_k: torch.Tensor,
        audio_temp: torch.Tensor, audio_top_k: torch.Tensor,
    ) -> dict[str, CfgRule | DrawRule]:
        """The :class:`EngineBuffers` sampling rules of streams with these settings (tensors [n])."""
        d, k = self.config.data, self.max_top_k
        return dict(
            cfg_text=cfg_rule(cfg_scale, cfg_k, d.action_vocab_size, k),
            cfg_cb0=cfg_rule(cfg_scale, cfg_k, d.audio_vocab_size, k),
            cfg_audio=cfg_rule(cfg_scale, cfg_k, self.logit_limit, k),
            draw_text=draw_rule(text_temp, text_top_k, d.action_vocab_size, k),
            draw_audio=draw_rule(audio_temp, audio_top_k, self.logit_limit, k),
        )

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
        self._generation += 1

    def release(self, slot: int) -> None:
        self.slots[slot] = None
        self._generation += 1

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
            # Text of every prefill step, from the forced state machine: step t feeds the output of t-1.
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
        return b.row_range(2 * slot, 2 * slot + 2)

    # ------------------------------------------------------------------ device steps

    def device_step(self, rows: int) -> DeviceStep:
        """The device step that runs slots 0…rows-1 (static shapes: that bucket's), built once."""
        n = bucket_for(rows) if self.static_shapes else rows
        if not 1 <= n <= self.capacity:
            raise StreamError(f"cannot step {rows} slots: the engine holds {self.capacity}")
        step = self._device_steps[n]
        if step is None:
            step = DeviceStep(self.model, self.buffers, n, graphed=self.use_cuda_graphs, memory=self.graph_memory,
                              guard=self.outputs, compiled=self.compile_step)
            self._device_steps[n] = step
        return step

    def capture_graphs(self) -> None:
        """Capture every bucket's graphs (each length bucket, with and without the depformer) now,
        at start-up.

        Runs on idle rows, so it changes nothing a stream reads; it must run before any stream
        starts. A no-op without CUDA graphs. Graphs not captured here are captured by the first
        step that needs them (correct, only slower for that caller).
        """
        if not self.use_cuda_graphs:
            return
        if any(s is not None for s in self.slots):
            raise StreamError("capture_graphs must run before any stream starts (it uses every slot's rows)")
        for n in buckets_upto(self.capacity):
            self.device_step(n).capture()
        torch.cuda.synchronize(self.device)

    # ------------------------------------------------------------------ stepping

    def step(self, slots: list[int], hold: Callable[[int], bool] | None = None) -> list[FrameOut]:
        """Advance each listed active slot by one step, all in one batched forward pass.

        Returns the frames that became complete (at most one per slot), in slot order.

        Safe to retry: if it raises, no listed slot's host state has changed, and running the
        same step again (for all or some of the slots) gives the same result, since the RNG is
        counter-based and the device writes (KV at each slot's position, buffer column t+1) are
        a function of the same inputs. ``hold`` must be pure: a retried step calls it again.

        Host↔device traffic: one copy in (the staged rows) and one copy out (actions and the
        codes of the frames to emit, the step's only sync). Records and ``check_invariants``
        read more, for tests and traces only.

        The same step in its four parts, for a caller that overlaps steps (dia2/stream.py):
        :meth:`prepare`, :meth:`launch`, :meth:`wait`, :meth:`commit`.
        """
        if not slots:
            return []
        ticket = self.launch(self.prepare(slots, hold))
        self.wait(ticket)
        frames = self.frames(ticket)
        self.commit(ticket)
        return frames

    # The overlapped step. While step t runs on the device, the host prepares step t+1 from both
    # outcomes of each slot's action at t (the only thing t decides that t+1's inputs depend on);
    # once t's actions are read, t+1 is launched with the matching rows, and t's host work
    # (commit, frames, the Mimi decode's read, the streams' bookkeeping) runs while t+1 computes.

    def prepare(
        self, slots: list[int], hold: Callable[[int], bool] | None = None, *, after: StepTicket | None = None
    ) -> StepPlan:
        """The host half of the next step of ``slots``, before it runs: each slot's input row and
        its state after either action. Changes nothing.

        ``after``: a launched step not yet committed. A slot it steps is planned from both of its
        outcomes (its rows are picked by that step's action at :meth:`launch`); a slot it leaves
        finished in an outcome does not step in that outcome.
        """
        if after is not None and after.status not in (_Ticket.LAUNCHED, _Ticket.READ):
            raise StreamError(f"cannot plan after a step that is {after.status.value}")
        states = [self._active(s) for s in slots]
        outcomes: list[tuple[_Outcome, ...]] = []
        for s, st in zip(slots, states):
            branches = after.branches(s, st) if after is not None else None
            if branches is None:
                if self._steps_in_flight(s, st):
                    raise StreamError(f"slot {s} has a step in flight: plan its next step after that one")
                if st.position >= self.context:
                    raise StreamError(f"slot {s} reached the context limit; it should have finished")
                outcomes.append((self._outcome(s, st, hold, planned=False),))
            else:
                first = self._outcome(s, branches[0].state_after(st), hold, planned=True)
                if len(branches) == 1 or branches[1] is branches[0]:  # the pending action changes nothing
                    outcomes.append((first,))
                else:
                    outcomes.append((first, self._outcome(s, branches[1].state_after(st), hold, planned=True)))
        return StepPlan(slots=list(slots), states=states, outcomes=outcomes, after=after, generation=self._generation)

    def launch(self, plan: StepPlan) -> StepTicket:
        """Run the planned step on the device: stage the rows (picked by the ``after`` step's
        actions, which must have been read), start the step and queue its one copy out. Does
        not wait for the device. Nothing on the host changes until :meth:`commit`."""
        if plan.generation != self._generation:
            raise StreamError("slots or their text changed since this step was prepared; prepare it again")
        after = plan.after
        if after is not None and after.status is not _Ticket.READ:
            raise StreamError("read the previous step (wait) before launching the one planned after it")
        if any(t.status is _Ticket.LAUNCHED for t in self._in_flight):
            raise StreamError("a step is running whose outputs are unread: wait for it first")
        states: dict[int, SlotState] = {}
        chosen: dict[int, _Outcome] = {}
        # Slots whose stream (or part) ends with the step being read: the plain order has released
        # or restarted them by now, so their idle rows sit at 0 as a free slot's do (a finished
        # stream's step then reads the plain order's cache length; a next part starts a step later).
        ended: set[int] = set()
        for s, st, outs in zip(plan.slots, plan.states, plan.outcomes):
            picked = outs[0] if len(outs) == 1 else outs[after.took_word(s)]  # type: ignore[union-attr]
            if picked.row is not None:
                states[s], chosen[s] = st, picked
            else:
                ended.add(s)
        ticket = StepTicket(states=states, outcomes=chosen)
        if not chosen:
            ticket.status = _Ticket.READ  # nothing to run (every slot finished): nothing in flight
            return ticket
        device_step = self.device_step(max(chosen) + 1)
        rows = [device_step.idle_row(0 if i in ended else self._idle_position(i)) for i in range(device_step.n)]
        for s, outcome in chosen.items():
            rows[s] = outcome.row  # type: ignore[assignment]
        device_step.stage(rows)
        # The depformer only runs when some listed slot has a codebook>0 frame to write.
        first_delay = min(self.delays[1:] or [0])
        need_depformer = any(o.base.position + 1 - first_delay >= o.base.prompt_frames for o in chosen.values())
        # Cache slots the step must read: every row's, listed or not (each writes the KV slot at
        # its position). The host knows the positions, so choosing a length costs no sync.
        needed = max(r.position for r in rows) + 1
        try:
            if self.static_shapes:
                out = device_step(depformer=need_depformer, length=device_step.length_for(needed))
            else:
                out = device_step(depformer=need_depformer, attend_slots=needed)
            try:
                device_step.copy_edge(out)  # queued first: the next step rewrites the outputs
                if self.check_invariants:
                    self._check_fed(out, list(chosen))
                ticket.kept = {s: self._keep(s, out) for s, st in ticket.states.items() if st.record is not None}
            finally:
                self.outputs.release()
        except RuntimeError as exc:
            raise_if_device_lost(self.device, exc, "during a step")
            raise
        ticket.device_step = device_step
        self._in_flight.append(ticket)
        return ticket

    def wait(self, ticket: StepTicket) -> None:
        """Wait for a launched step's copy out and read it: each slot's action and validity.
        A slot fed or emitting an id outside its table fails the step (StreamError); a step
        that raises here is dropped, and nothing on the host has changed."""
        if ticket.status is _Ticket.READ:
            return  # read already (or a step of no slots, which ran nothing)
        if ticket.status is _Ticket.FAILED and ticket.error is not None:
            raise ticket.error  # a second wait sees the same failure
        if ticket.status is not _Ticket.LAUNCHED:
            raise StreamError(f"cannot wait for a step that is {ticket.status.value}")
        assert ticket.device_step is not None
        try:
            try:
                edge = ticket.device_step.wait_edge().clone()  # the next step reuses the buffer
            except RuntimeError as exc:
                raise_if_device_lost(self.device, exc, "during a step")
                raise
            bad = [s for s in ticket.outcomes if not edge[s, Edge.VALID]]
            if bad:
                raise StreamError(f"slots {bad} fed or emitted an id outside its table (clamped on the device); "
                                  "their state is corrupt")
        except BaseException as exc:  # (an interrupt too: the step must not stay in flight)
            ticket.status = _Ticket.FAILED
            ticket.error = exc if isinstance(exc, Exception) else None
            self._in_flight.remove(ticket)
            raise
        ticket.edge = edge
        ticket.actions = edge[:, Edge.ACTION].tolist()
        ticket.status = _Ticket.READ

    def frames(self, ticket: StepTicket) -> list[FrameOut]:
        """The frames a read step completes, in slot order, for the slots still holding the
        stream it stepped (a slot released or restarted since gets nothing)."""
        if ticket.status is not _Ticket.READ:
            raise StreamError(f"cannot take the frames of a step that is {ticket.status.value}")
        frames: list[FrameOut] = []
        for s in sorted(ticket.outcomes):
            if self.slots[s] is not ticket.states[s]:
                continue
            plan = ticket.plan_taken(s)
            if plan.emit_frame is not None:
                assert ticket.edge is not None
                words = [w for w, step in plan.text.transcript if step + 1 == plan.emit_frame]
                frames.append(FrameOut(slot=s, frame=plan.emit_frame, codes=ticket.edge[s, Edge.CODES :].clone(),
                                       words=words))
        return frames

    def commit(self, ticket: StepTicket) -> None:
        """Apply a read step to the host state of every slot still holding its stream (take its
        :meth:`frames` first). Nothing here raises but the records' copies (tests and traces)."""
        if ticket.status is not _Ticket.READ:
            raise StreamError(f"cannot commit a step that is {ticket.status.value}")
        try:
            records = {s: self._record(ticket, s) for s in ticket.kept}
        except Exception as exc:  # nothing committed; the step is gone (its streams cannot go on)
            ticket.status, ticket.error = _Ticket.FAILED, exc
            raise
        finally:
            if ticket in self._in_flight:  # (a step of no slots never was)
                self._in_flight.remove(ticket)
        ticket.status = _Ticket.COMMITTED
        for s, st in ticket.states.items():  # plain assignments: nothing below raises
            if self.slots[s] is not st:
                continue
            ticket.plan_taken(s).commit(st)
            if s in records and st.record is not None:
                st.record.append(records[s])

    def edit_text(self, slot: int, edit: Callable[[TextState], None]) -> None:
        """Change a slot's text state (queue words, close the text): in its live state and in
        each outcome of its steps in flight, so the edit holds whichever way they went."""
        st = self._active(slot)
        edit(st.text)
        seen = {id(st.text)}
        for ticket in self._in_flight:
            if ticket.states.get(slot) is st:
                for plan in ticket.outcomes[slot].after:
                    if id(plan.text) not in seen:
                        seen.add(id(plan.text))
                        edit(plan.text)
        self._generation += 1

    def next_position(self, slot: int) -> int:
        """The position the slot's next planned step runs at: its committed position plus its
        steps in flight."""
        st = self._active(slot)
        return st.position + self._steps_in_flight(slot, st)

    def _steps_in_flight(self, slot: int, st: SlotState) -> int:
        """How many launched, uncommitted steps stepped ``st`` in ``slot``."""
        return sum(1 for t in self._in_flight if t.states.get(slot) is st)

    def planned_texts(self, slot: int) -> list[TextState]:
        """The text states the slot's next step may start from: its live one, or with a step in
        flight that step's outcomes (one once read or where the action cannot matter, else two)."""
        st = self._active(slot)
        for ticket in reversed(self._in_flight):  # the latest step of this stream
            branches = ticket.branches(slot, st)
            if branches is not None:
                return list({id(p.text): p.text for p in branches}.values())
        return [st.text]

    def _idle_position(self, slot: int) -> int:
        """Where the row of a slot that is not stepped writes its KV: the slot it will overwrite
        at its own next step (0 for a free slot)."""
        st = self.slots[slot] if slot < self.max_streams else None
        if st is None:
            return 0
        return min(st.position + self._steps_in_flight(slot, st), self.context - 1)

    def _outcome(self, slot: int, base: SlotState, hold: Callable[[int], bool] | None, *, planned: bool) -> _Outcome:
        """One slot's step from ``base``: its input row and its state after either action. A
        ``planned`` base (a step in flight's outcome) that has finished gets no row: the stream
        ends when that step is committed, and does not step again."""
        if planned and (base.finished or base.position >= self.context):
            return _Outcome(base=base, row=None, after=())
        emit = self._emit_frame(base)
        # Whether the step holds for text (asked once: both actions' plans use the answer).
        ended = base.last_frame is not None  # after the end the text only pads, whatever the action
        held = not ended and (hold(slot) if hold is not None else needs_text(self.rules, base.text))
        pad = self._plan_host(base, ACTION_PAD, held, emit)
        # Most steps (inside a word, forced padding, a hold, the flush tail) ignore the action:
        # one plan serves both outcomes.
        decides = not ended and action_decides(base.text, hold=held)
        word = self._plan_host(base, ACTION_NEW_WORD, held, emit) if decides else pad
        # The depformer's text of column t+1 is the state machine's output for the sampled
        # action; both are staged and the device picks (checkpoints without text embedding ignore them).
        row = SlotInputs(
            position=base.position, prompt_frames=base.prompt_frames, listed=True, main=base.main,
            second=base.second, emit_frame=emit, next_if_pad=(pad.main, pad.second),
            next_if_word=(word.main, word.second),
        )
        # An id outside the table would be a device-side assert on CUDA (the context is lost
        # for every stream); here it fails this slot's step alone.
        for token in (base.main, base.second, pad.main, pad.second, word.main, word.second):
            if not 0 <= token < self.text_vocab:
                raise IndexError(f"slot {slot} would feed text id {token}, outside the text vocabulary "
                                 f"0…{self.text_vocab - 1}")
        return _Outcome(base=base, row=row, after=(pad, word))

    def _emit_frame(self, st: SlotState) -> int | None:
        """The aligned frame a slot emits at its next step, from its state before the step: the
        one frame-emission rule (the device gathers this frame; the host plan advances past it).

        The step's action cannot change it: an end found at step t sets last_frame to
        t + max_padding, past any frame complete by then (t + 1 - max_delay).
        """
        last = st.last_frame
        if last is None and st.text.end_step is not None:
            last = st.text.end_step + self.rules.max_padding
        complete = st.position + 1 - self.max_delay  # newest complete aligned frame after the step
        if complete >= st.next_frame and (last is None or st.next_frame <= last):
            return st.next_frame
        return None

    def _advance_text(self, st: SlotState, action: int, held: bool) -> tuple[TextState, int, int, int | None]:
        """The text side of one step for ``action``, on a copy of the slot's text state:
        (new text state, main, second, last_frame); ``held``: the step holds for text. The one
        rule behind both the step and the depformer's text of column t+1 (:meth:`_outcome`), so
        the two cannot disagree."""
        text = st.text.copy()
        last_frame = st.last_frame
        if last_frame is None:
            main, second = process(self.rules, text, st.position, action, hold=held)
            if text.end_step is not None:
                last_frame = text.end_step + self.rules.max_padding
        else:
            # After the script ended the text stream only pads (the flush tail).
            main, second = process(self.rules, text, st.position, ACTION_PAD)
        return text, main, second, last_frame

    def _check_fed(self, out: StepTensors, slots: list[int]) -> None:
        """Debug check (a host sync): no listed slot was fed an ungenerated or invalid audio code."""
        audio = out.tokens[0::2, 2:][slots]
        bad = (audio < 0) | (audio > self.bos)
        assert not bool(bad.any()), f"ungenerated or invalid audio fed to slots {slots}: {audio.tolist()}"

    @staticmethod
    def _keep(s: int, out: StepTensors) -> tuple[torch.Tensor | None, ...]:
        """Device copies of slot ``s``'s rows of the step's outputs, queued before the next step
        rewrites them (read by :meth:`_record` once the step is committed)."""
        rows = slice(2 * s, 2 * s + 2)
        return tuple(None if x is None else x[rows].clone()
                     for x in (out.tokens, out.action_logits, out.cb0_logits, out.stage_logits))

    def _record(self, ticket: StepTicket, s: int) -> StepRecord:
        tokens, action_logits, cb0_logits, stage_logits = (None if x is None else x.to("cpu", copy=True)
                                                           for x in ticket.kept[s])
        assert tokens is not None and action_logits is not None and cb0_logits is not None
        assert ticket.actions is not None
        return StepRecord(step=ticket.outcomes[s].base.position, tokens=tokens, action_logits=action_logits,
                          cb0_logits=cb0_logits, stage_logits=stage_logits, action=ticket.actions[s])

    def _plan_host(self, st: SlotState, action: int, held: bool, emit_frame: int | None) -> _HostPlan:
        """One slot's host-side step on copies: state machine, position, emission (``emit_frame``,
        from :meth:`_emit_frame`), context limit."""
        text, main, second, last_frame = self._advance_text(st, action, held)
        position = st.position + 1
        next_frame = st.next_frame if emit_frame is None else emit_frame + 1
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

    def _active(self, slot: int) -> SlotState:
        st = self.slots[slot] if 0 <= slot < self.max_streams else None
        if st is None:
            raise StreamError(f"slot {slot} has no stream")
        return st
