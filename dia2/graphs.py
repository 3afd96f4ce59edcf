"""CUDA graphs for the step engine: one small wrapper, one process-wide switch, and the device
half of a batched step written as ONE function over static buffers.

Why: a Dia2 step is ~30 decoder layers plus 31 depformer stages of tiny kernels; launched
one by one from Python the GPU mostly waits for the host. Replaying a captured graph
launches the whole step at once (dia2-format.md §9).

- :class:`CUDAGraphed` runs a function through one CUDA graph: pre-capture eager runs and capture on
  the first call, then copy the new inputs into the captured tensors and replay. Unlike
  upstream (§9.2) the capturing call replays right away, so its results are real.
- :func:`no_cuda_graphs` and the ``DIA2_CUDA_GRAPHS=0`` env var turn every graph off (moshi
  ``utils/compile.py``); CPU never uses graphs.
- :class:`DeviceStep` is the device part of a step for a fixed bucket of n slots (1, 2, 4, …,
  32): transformer over the first L cache slots, L one of a few length buckets
  (:func:`length_buckets`: 64, 128, …, the whole cache), action and cb0 CFG + sampling, the 31
  depformer stages, the masked writes into the audio buffer and the gather of the frames to
  emit. No ``.item()``, ``.cpu()``, ``.tolist()`` or Python ``if`` on a tensor value inside:
  the host reads one small tensor per step, after the step (:attr:`StepTensors.edge`).

Shapes: n slots, 2n rows (cond, uncond interleaved), K codebooks, C = 2 + K channels,
S = K - 1 depformer stages, Vx/Va/V' action/cb0/stage vocabularies, Tmax cache slots.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Generic, NamedTuple, TypeVar

import torch

from .model import Dia2Model, KVCache
from .sampling import (
    SLOT_ACTION,
    SLOT_CB0,
    CfgRule,
    DrawRule,
    Window,
    cell_keys,
    cfg_filter_with,
    gumbel,
    keyed_uniforms,
    sample_with,
    stage_slot,
)

ENV_VAR = "DIA2_CUDA_GRAPHS"
_OFF_VALUES = ("0", "false", "no", "off")
_switched_off = 0  # depth of open no_cuda_graphs() blocks: the one process-wide switch

# The sampled actions (state_machine.process: 1 = new word, 0 = pad).
ACTION_PAD = 0
ACTION_NEW_WORD = 1

BUCKETS: tuple[int, ...] = (1, 2, 4, 8, 16, 32)
# The smallest attention-length bucket: a graphed step reads at least this many cache slots.
SHORTEST_LENGTH = 64

T = TypeVar("T")


# ---------------------------------------------------------------------- switch


def env_allows_cuda_graphs() -> bool:
    """False when ``DIA2_CUDA_GRAPHS`` is 0/false/no/off. Read when an engine is built, not per step."""
    return os.environ.get(ENV_VAR, "1").strip().lower() not in _OFF_VALUES


def cuda_graphs_enabled() -> bool:
    """The process-wide switch: on unless the env var says off or a :func:`no_cuda_graphs` block is open."""
    return _switched_off == 0 and env_allows_cuda_graphs()


@contextmanager
def no_cuda_graphs() -> Iterator[None]:
    """Run every :class:`CUDAGraphed` eagerly inside the block (already captured graphs are kept)."""
    global _switched_off
    _switched_off += 1
    try:
        yield
    finally:
        _switched_off -= 1


def resolve_use_cuda_graphs(requested: bool | None, device: torch.device) -> bool:
    """An engine's ``use_cuda_graphs`` option: None = on for CUDA devices unless switched off.

    True on a non-CUDA device is a mistake and says so; the switch (env var, context) wins
    over an explicit True, so one variable turns graphs off in a whole deployment.
    """
    if requested and device.type != "cuda":
        raise ValueError(
            f"use_cuda_graphs=True needs a CUDA device, the model is on {device}; "
            "pass use_cuda_graphs=None (auto) or False"
        )
    if requested is False or device.type != "cuda":
        return False
    return cuda_graphs_enabled()


def use_tf32(device: torch.device) -> None:
    """On CUDA, let float32 matmuls and convolutions use TF32 (the fp32 heads, Mimi), as the
    reference runtime does (dia2-format.md §3.1). Process-wide PyTorch flags; a no-op elsewhere."""
    if device.type != "cuda":
        return
    matmul = torch.backends.cuda.matmul
    if hasattr(matmul, "fp32_precision"):  # the newer API; PyTorch refuses a mix of old and new
        matmul.fp32_precision = "tf32"
        torch.backends.cudnn.conv.fp32_precision = "tf32"  # type: ignore[attr-defined]
    else:  # pragma: no cover - older PyTorch
        matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True


def bucket_for(slots: int) -> int:
    """The batch bucket that holds ``slots`` slots: the next power of two (1, 2, 4, …, 32, 64, …)."""
    if slots < 1:
        raise ValueError(f"a bucket holds at least one slot, got {slots}")
    return 1 << (slots - 1).bit_length()


def buckets_upto(capacity: int) -> tuple[int, ...]:
    """Every bucket an engine of ``capacity`` slots uses (capacity is itself a bucket)."""
    return tuple(1 << i for i in range(bucket_for(capacity).bit_length()))


def length_buckets(context: int) -> tuple[int, ...]:
    """The attention lengths a fixed-shape step is built for, for a cache of ``context`` slots:
    powers of two from :data:`SHORTEST_LENGTH` below ``context``, then ``context`` itself
    (1500 → 64, 128, 256, 512, 1024, 1500). The one ladder: a step reads the cache slots
    0…L-1 of the smallest L that holds every row's position, so its KV reads grow with the
    turn instead of always covering the whole cache."""
    if context < 1:
        raise ValueError(f"a cache holds at least one slot, got {context}")
    ladder = []
    length = SHORTEST_LENGTH
    while length < context:
        ladder.append(length)
        length *= 2
    return (*ladder, context)


def length_bucket_for(needed: int, ladder: tuple[int, ...]) -> int:
    """The smallest length of ``ladder`` that is at least ``needed`` (cache slots a step must read)."""
    for length in ladder:
        if length >= needed:
            return length
    raise ValueError(f"a step needs {needed} cache slots but the longest length bucket is {ladder[-1]}")


# ---------------------------------------------------------------------- wrapper


class GraphShapeError(ValueError):
    """A :class:`CUDAGraphed` was called with inputs unlike the ones it was built for."""


def _describe(x: torch.Tensor) -> str:
    return f"{list(x.shape)} {str(x.dtype).removeprefix('torch.')} on {x.device}"


class OutputsUnread(RuntimeError):
    """A device step was about to run while the outputs of the previous one were still unread."""


class OutputGuard:
    """The rule that makes one graph memory pool safe to share between every bucket's graphs:
    a step's outputs (captured tensors, overwritten by the next replay of any graph in the
    pool) are read, or cloned, before the next step runs. :meth:`claim` when a step runs,
    :meth:`release` once its outputs are read; a claim while another is held raises instead of
    silently handing out overwritten tensors. Applied on every device (on CPU the outputs are
    fresh tensors, but the same order is enforced so the rule is tested where tests run)."""

    def __init__(self) -> None:
        self.holder: str | None = None

    def claim(self, name: str) -> None:
        if self.holder is not None:
            raise OutputsUnread(
                f"{name} would run while the outputs of {self.holder} are unread (they share one graph "
                "memory pool): read or clone a step's outputs, then release(), before the next step"
            )
        self.holder = name

    def release(self) -> None:
        self.holder = None


@dataclass(frozen=True)
class GraphMemory:
    """A graph memory pool and the one side stream that every capture into it uses (PyTorch
    shares a pool's memory across captures only when they run on the same stream). Share one
    between graphs that never run concurrently and whose outputs are read before the next replay."""

    pool: Any  # torch.cuda.graph_pool_handle()
    stream: torch.cuda.Stream

    @classmethod
    def new(cls, device: torch.device) -> GraphMemory:
        with torch.cuda.device(device):
            return cls(pool=torch.cuda.graph_pool_handle(), stream=torch.cuda.Stream(device))


class CUDAGraphed(Generic[T]):
    """Run ``fn(*tensors)`` through one CUDA graph (moshi ``CUDAGraphed``).

    First call: ``pre_capture_runs`` eager runs on a side stream (lazy inits, cuBLAS workspaces,
    allocator), capture, then replay, so the first call's results are real (capture alone
    runs nothing). Later calls copy the inputs into the captured tensors and replay. The
    outputs are the captured tensors themselves: valid until the next replay of any graph
    sharing the pool; clone what must live longer.

    Contract: ``fn`` takes tensors, keeps no Python state that changes between calls, does
    no host sync, and is idempotent for one input (the first call runs it 1 + pre_capture_runs
    times on the same inputs). Input shapes, dtypes and devices are fixed at the first call,
    with or without graphs, so misuse fails the same way on CPU and GPU.

    Eager (fn called directly) when ``disable``, on CPU, or while the switch is off.
    """

    def __init__(
        self,
        fn: Callable[..., T],
        *,
        name: str = "graph",
        pre_capture_runs: int = 1,
        disable: bool = False,
        memory: GraphMemory | None = None,
    ) -> None:
        self.fn = fn
        self.name = name
        self.pre_capture_runs = pre_capture_runs
        self.disable = disable
        self.memory = memory  # None: a pool and stream of its own, made at capture
        self._signature: list[tuple[torch.Size, torch.dtype, torch.device]] | None = None
        self._graph: torch.cuda.CUDAGraph | None = None
        self._static_inputs: list[torch.Tensor] = []
        self._static_output: T | None = None

    @property
    def captured(self) -> bool:
        return self._graph is not None

    def __call__(self, *inputs: torch.Tensor) -> T:
        self._check(inputs)
        if self.disable or not cuda_graphs_enabled() or inputs[0].device.type != "cuda":
            return self.fn(*inputs)
        if self._graph is None:
            return self._capture(inputs)
        for static, x in zip(self._static_inputs, inputs):
            if x is not static:
                static.copy_(x, non_blocking=True)
        self._graph.replay()
        return self._static_output  # type: ignore[return-value]

    def _check(self, inputs: tuple[torch.Tensor, ...]) -> None:
        got = [(x.shape, x.dtype, x.device) for x in inputs]
        if self._signature is None:
            if not inputs:
                raise GraphShapeError(f"{self.name}: call it with at least one tensor")
            self._signature = got
            return
        if len(got) != len(self._signature):
            raise GraphShapeError(
                f"{self.name}: called with {len(got)} tensors, built for {len(self._signature)}; pass the same inputs"
            )
        for i, (x, want) in enumerate(zip(inputs, self._signature)):
            if (x.shape, x.dtype, x.device) != want:
                expected = f"{list(want[0])} {str(want[1]).removeprefix('torch.')} on {want[2]}"
                raise GraphShapeError(
                    f"{self.name}: input {i} is {_describe(x)} but the graph is fixed to {expected}. "
                    "Pad the input to that shape, or build one CUDAGraphed per shape "
                    "(e.g. one per batch bucket, see bucket_for)."
                )

    def _capture(self, inputs: tuple[torch.Tensor, ...]) -> T:
        device = inputs[0].device
        with torch.inference_mode(False):  # plain tensors: copy_ into them works in and out of inference mode
            self._static_inputs = [x.clone() for x in inputs]
        memory = self.memory or GraphMemory.new(device)
        side = memory.stream
        with torch.cuda.device(device):
            current = torch.cuda.current_stream(device)
            side.wait_stream(current)
            with torch.cuda.stream(side):  # pre-capture runs on the capture stream (cuBLAS workspace, allocator)
                for _ in range(self.pre_capture_runs):
                    self.fn(*self._static_inputs)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=memory.pool, stream=side):
                self._static_output = self.fn(*self._static_inputs)
            current.wait_stream(side)
            graph.replay()  # the capture recorded the work without running it (dia2-format.md §9.2)
        self._graph = graph
        return self._static_output


# ---------------------------------------------------------------------- the device step


@dataclass
class EngineBuffers:
    """Every preallocated device tensor of an engine; captured graphs hold their addresses,
    so they are filled in place (copy_, fill_), never replaced."""

    decoder: KVCache  # rows 2*slot (cond) and 2*slot+1 (uncond)
    depformer: KVCache
    audio: torch.Tensor  # [slots, K, columns] int64 delayed buffer
    seed_keys: torch.Tensor  # [slots] int64: sampling.seed_keys of each stream's seed
    # Each stream's sampling settings as per-row constants ([slots, 1] tensors), built when it starts.
    cfg_text: CfgRule  # over the action head
    cfg_cb0: CfgRule  # over codebook 0's whole head (BOS and PAD take part in the ranking, as upstream)
    cfg_audio: CfgRule  # over a depformer stage's head (the logit limit)
    draw_text: DrawRule  # the action
    draw_audio: DrawRule  # codebook 0 and every stage, over the logit limit


class In(enum.IntEnum):
    """Columns of the step's input tensor [n, len(In)] int64, one row per slot."""

    POSITION = 0  # step index = RoPE position = KV slot
    PROMPT_FRAMES = 1  # aligned frames < this belong to the voice prompt (never overwritten)
    LISTED = 2  # 1: the slot steps; 0: computed and ignored (nothing written to its audio)
    MAIN = 3  # text ids fed on the conditional row
    SECOND = 4
    EMIT_FRAME = 5  # aligned frame whose codes the host wants after this step; -1: none
    PAD_MAIN = 6  # text of column t+1 if the action is pad (depformer text embedding only)
    PAD_SECOND = 7
    WORD_MAIN = 8  # … if the action starts a word
    WORD_SECOND = 9


@dataclass(frozen=True)
class SlotInputs:
    """One slot's row of the step inputs (host side). The defaults describe an idle row."""

    position: int = 0
    prompt_frames: int = 0
    listed: bool = False
    main: int = 0
    second: int = 0
    emit_frame: int | None = None
    next_if_pad: tuple[int, int] = (0, 0)
    next_if_word: tuple[int, int] = (0, 0)

    def row(self) -> list[int]:
        emit = -1 if self.emit_frame is None else self.emit_frame
        return [self.position, self.prompt_frames, int(self.listed), self.main, self.second, emit,
                *self.next_if_pad, *self.next_if_word]


class Edge(enum.IntEnum):
    """Columns of :attr:`StepTensors.edge`, the one tensor the host reads after a step."""

    ACTION = 0
    VALID = 1  # 1: every id this slot fed, and the codes it emits, were in range (see DeviceStep.forward)
    CODES = 2  # K columns from here: the emitted frame's codes (0…V'-1, safe for Mimi)


class StepTensors(NamedTuple):
    """What a device step produced. With graphs these are the captured tensors: read them
    (or clone) before the next step."""

    edge: torch.Tensor  # [n, Edge.CODES + K] int64: action, validity flag, codes of the frame to emit
    tokens: torch.Tensor  # [2n, C] int64 fed at this step
    column: torch.Tensor  # [n, K] int64 column t+1 as written
    action_logits: torch.Tensor  # [2n, Vx] float32
    cb0_logits: torch.Tensor  # [2n, Va] float32
    stage_logits: torch.Tensor | None  # [2n, S, V'] float32; None when the depformer was skipped


class DeviceStep:
    """The device half of one batched step for slots 0…n-1, as one function over static buffers.

    The host stages one int64 row per slot (:class:`SlotInputs`) in :attr:`staging`; a call
    copies it to the device (one host→device copy) and runs :meth:`forward`: through a graph
    when ``attend_slots`` is None and graphs are on, eagerly otherwise. A graph per
    (depformer or not, length bucket): ``length``, one of :attr:`lengths`
    (:func:`length_buckets` of the cache), is how many cache slots the step reads, each a view
    of the cache's first slots built here once, so a step slices nothing per layer; it must
    hold every row's position (:meth:`length_for`). ``attend_slots`` instead reads exactly
    that many slots (eager only: shapes change every step). Rows of slots that are not listed
    are computed and ignored: their only writes are the KV slot at their position and
    depformer scratch.
    """

    def __init__(
        self,
        model: Dia2Model,
        buffers: EngineBuffers,
        n: int,
        *,
        graphed: bool,
        memory: GraphMemory | None = None,
        guard: OutputGuard | None = None,
        compiled: bool = False,
    ) -> None:
        cfg = model.config
        dev = model.device
        self.model = model
        self.buffers = buffers
        self.n = n
        self.guard = guard or OutputGuard()
        self.text_vocab = cfg.data.text_vocab_size
        self.audio_vocab = cfg.data.audio_vocab_size
        # Views of this bucket's rows, made once: the step slices nothing per layer.
        self.decoder = buffers.decoder.first_rows(2 * n)
        # … and of each length bucket's first cache slots (the same memory): a step over length
        # L hands the model a cache of exactly L slots, which it reads whole.
        self.lengths = length_buckets(self.decoder.slots)
        self.decoder_by_length = {length: self.decoder if length == self.decoder.slots
                                  else self.decoder.first_slots(length) for length in self.lengths}
        self.depformer = buffers.depformer.first_rows(2 * n)
        # Where the layers write their GEMM outputs, and the depformer's per-(layer, stage) cache
        # slots: allocated once per bucket (static addresses under graphs), no view made per step.
        self.decoder_ws = model.transformer.workspace(2 * n)
        self.depformer_ws = model.depformer.workspace(self.depformer)
        self.pair_rows = torch.arange(n, device=dev).repeat_interleave(2)  # [2n]: row 2i and 2i+1 read slot i
        self.num_codebooks = cfg.num_codebooks
        self.num_stages = cfg.num_stages
        self.bos = cfg.data.audio_bos_token_id
        self.logit_limit = cfg.audio_logit_limit
        self.text_pad = cfg.data.text_pad_token_id
        self.text_zero = cfg.data.text_zero_token_id
        self.delays = torch.tensor(list(cfg.data.delay_pattern), device=dev)  # [K]
        self._init_sampling(cfg.data.action_vocab_size, dev)
        # Pinned on CUDA so the copy in is asynchronous. The engine rewrites it only after the
        # previous step's edge copy to the host synchronised the stream; after a step that raised
        # first, a copy still in flight goes to the same tensor as the next one, which lands later.
        self.staging = torch.zeros((n, len(In)), dtype=torch.long, pin_memory=dev.type == "cuda")
        self.inputs = torch.zeros((n, len(In)), dtype=torch.long, device=dev)
        # The copy out lands in a pinned buffer and the host waits on an event recorded after it,
        # not on the whole device: work queued later (the next step) is not waited for.
        self.edge_host = torch.zeros((n, Edge.CODES + self.num_codebooks), dtype=torch.long,
                                     pin_memory=dev.type == "cuda")
        self.edge_copied = torch.cuda.Event() if dev.type == "cuda" else None
        # Opt-in: the fixed-shape step through torch.compile (Inductor fuses the elementwise ops
        # between GEMMs), compiled on first use, before a graph captures it (the pre-capture runs).
        # One compiled entry per variant of this step, counted apart from other buckets' steps
        # (Dynamo's default allows 8 per function, and fullgraph makes the ninth an error).
        variants = [(depformer, length) for length in self.lengths for depformer in (True, False)]
        run = (torch.compile(self.forward, fullgraph=True, dynamic=False, recompile_limit=len(variants),
                             isolate_recompiles=True) if compiled else self.forward)
        self.compiled = compiled
        self.graphs: dict[tuple[bool, int], CUDAGraphed[StepTensors]] = {
            (depformer, length): CUDAGraphed(
                lambda x, d=depformer, length=length: run(x, depformer=d, length=length),
                name=f"step[{n}, {length}]" + ("+depformer" if depformer else ""),
                disable=not graphed,
                memory=memory,
            )
            for depformer, length in variants
        }

    def _init_sampling(self, action_vocab: int, dev: torch.device) -> None:
        """Everything the step's inputs, CFG and draws read or write besides the model, made once
        per bucket (captured graphs keep the addresses; a step slices and builds nothing here)."""
        n, b = self.n, self.buffers
        self.audio = b.audio[:n]  # [n, K, columns]
        self.keys = b.seed_keys[:n]
        self.rows = torch.arange(n, device=dev)  # [n]: index of each slot's own row
        self.slot_rows = self.rows[:, None]  # [n, 1]
        self.codebooks = torch.arange(self.num_codebooks, device=dev)  # [K]
        self.delays_less_one = self.delays - 1  # frame of column t+1 = t - (d - 1)
        self.cb0_only = self.codebooks == 0  # a step without the depformer writes codebook 0 only
        # Step tokens [C] per channel: the clamp bounds (text ids, audio ids) and the
        # unconditional row's text (zero, pad), its audio the conditional row's.
        c = 2 + self.num_codebooks
        self.token_min = torch.zeros(c, dtype=torch.long, device=dev)
        self.token_max = torch.tensor([self.text_vocab - 1] * 2 + [self.audio_vocab - 1] * self.num_codebooks,
                                      device=dev)
        self.text_channels = torch.arange(c, device=dev) < 2
        self.uncond_text = torch.tensor([self.text_zero, self.text_pad] + [0] * self.num_codebooks, device=dev)
        # The streams' sampling rules, this bucket's rows (views: the engine writes them in place).
        self.cfg_text, self.cfg_cb0, self.cfg_audio = (r.rows(n) for r in (b.cfg_text, b.cfg_cb0, b.cfg_audio))
        self.draw_text, self.draw_audio = b.draw_text.rows(n), b.draw_audio.rows(n)
        widths = {r.width for r in (self.cfg_text, self.cfg_cb0, self.cfg_audio, self.draw_text, self.draw_audio)}
        self.windows = {w: Window(n, w, dev) for w in sorted(widths)}  # topk scratch, one per width
        # The step's one RNG call: every slot (action, cb0, the S stages) × every id of the widest
        # head, [2 + S, W] hash keys; the action's and cb0's rows alone without the depformer.
        slots = torch.arange(2 + self.num_stages, device=dev)
        self.rng_cells = cell_keys(slots, torch.arange(max(action_vocab, self.logit_limit), device=dev))
        self.rng_cells_head = self.rng_cells[: SLOT_CB0 + 1]
        # The codes sampled for column t+1 (cb0, then each stage), written by the draws themselves.
        self.sampled = torch.zeros((n, self.num_codebooks), dtype=torch.long, device=dev)
        self.sampled_codes = self.sampled.unbind(1)

    @property
    def captured(self) -> bool:
        """Every variant's graph (with and without the depformer, each length bucket) is captured."""
        return all(g.captured for g in self.graphs.values())

    def length_for(self, needed: int) -> int:
        """The length bucket of a step whose rows read cache slots 0…needed-1 (max position + 1
        over every row, listed or not: an unlisted row still writes the KV slot at its position)."""
        return length_bucket_for(needed, self.lengths)

    def stage(self, rows: list[SlotInputs]) -> None:
        """Write the host rows (exactly n) into the staging tensor."""
        if len(rows) != self.n:
            raise GraphShapeError(
                f"DeviceStep for {self.n} slots got {len(rows)} rows; pass one row per slot 0…{self.n - 1} "
                "(SlotInputs() for idle ones) or use the DeviceStep of bucket_for(rows)"
            )
        self.staging.copy_(torch.tensor([r.row() for r in rows], dtype=torch.long))

    def __call__(self, *, depformer: bool, length: int | None = None, attend_slots: int | None = None) -> StepTensors:
        """Copy the staged rows to the device and run the step (no host sync): over ``length``
        cache slots (a length bucket; None: the whole cache) through that variant's graph, or
        eagerly over exactly ``attend_slots``. Claims the :class:`OutputGuard`: release it once
        the outputs are read."""
        graphed = None
        if attend_slots is None:
            graphed = self.graphs.get((depformer, self.lengths[-1] if length is None else length))
            if graphed is None:
                raise GraphShapeError(f"step[{self.n}] has no length bucket {length}; use one of "
                                      f"{self.lengths} (length_for)")
        self.guard.claim(f"step[{self.n}]")
        try:
            with torch.inference_mode():
                self.inputs.copy_(self.staging, non_blocking=True)
                if graphed is None:
                    return self.forward(self.inputs, depformer=depformer, attend_slots=attend_slots)
                return graphed(self.inputs)
        except BaseException:
            self.guard.release()  # no outputs to read: a step that raised must not block the next
            raise

    def copy_edge(self, out: StepTensors) -> None:
        """Queue the copy of ``out.edge`` into :attr:`edge_host` (the step's one device→host copy)
        and, on CUDA, record :attr:`edge_copied` after it. Call it right after the step, before
        anything else runs on the device: the next replay rewrites the captured edge, and work
        queued after this copy (the next step) waits behind it, the host does not."""
        self.edge_host.copy_(out.edge, non_blocking=self.edge_copied is not None)
        if self.edge_copied is not None:
            self.edge_copied.record()

    def wait_edge(self) -> torch.Tensor:
        """Wait until the queued edge copy has landed (that event only, not the whole device) and
        return :attr:`edge_host`. The next step's copy reuses the buffer: clone what must outlive it."""
        if self.edge_copied is not None:
            self.edge_copied.synchronize()
        return self.edge_host

    def capture(self) -> None:
        """Run (and, with graphs, capture) every variant (with and without the depformer, each
        length bucket) on idle rows: no slot listed, so nothing observable changes (KV slot 0 of
        each row and depformer scratch are rewritten before use)."""
        self.stage([self.idle_row()] * self.n)
        for depformer, length in self.graphs:
            self(depformer=depformer, length=length)
            self.guard.release()

    def idle_row(self, position: int = 0) -> SlotInputs:
        """The row of a slot that is computed and ignored (pad text; nothing written to its audio)."""
        pad = (self.text_pad, self.text_pad)
        return SlotInputs(position=position, main=pad[0], second=pad[1], next_if_pad=pad, next_if_word=pad)

    # ------------------------------------------------------------------ the function

    def forward(
        self, inputs: torch.Tensor, *, depformer: bool, length: int | None = None, attend_slots: int | None = None
    ) -> StepTensors:
        """inputs [n, len(In)] int64 → :class:`StepTensors`. Reads and writes the engine's buffers.
        Attention reads the first ``length`` cache slots (a length bucket; None: all of them) or,
        eagerly, exactly ``attend_slots``.

        First-run safety: every id that reaches an embedding is clamped into its table on the
        device, and :attr:`Edge.VALID` says whether clamping was needed (the host fails such a
        slot). An out-of-range index on CUDA is a device-side assert that loses the context for
        every stream; a clamp costs a kernel. The emitted codes are clamped to Mimi's codebook.
        """
        n = self.n
        audio = self.audio  # [n, K, columns]
        model = self.model
        col = inputs.unbind(1)  # one [n] view per In column
        at = inputs[:, :, None].unbind(1)  # … and one [n, 1] view per column (broadcasts against [K])
        positions = col[In.POSITION]
        idle = at[In.LISTED] == 0  # [n, 1]
        # The step's one RNG call: Gumbel noise per slot and id, [n, slots, W] → one [n, W] view per
        # slot (all 2 + S slots with the depformer, the action's and cb0's without).
        cells = self.rng_cells if depformer else self.rng_cells_head
        noise = gumbel(keyed_uniforms(self.keys, positions, cells)).unbind(1)

        # Inputs [2n, C]: both rows read the same audio column t; row 1 has the unconditional text.
        audio_in = audio[self.rows, :, positions]  # [n, K]
        bos = (at[In.POSITION] < self.delays) | idle
        raw = torch.cat([inputs[:, In.MAIN : In.SECOND + 1], torch.where(bos, self.bos, audio_in)], dim=1)
        cond = torch.clamp(raw, self.token_min, self.token_max)  # [n, C]
        valid = (cond == raw).all(dim=1, keepdim=True)  # [n, 1]: every id fed was in its table
        uncond = torch.where(self.text_channels, self.uncond_text, cond)
        tokens = torch.stack([cond, uncond], dim=1).view(2 * n, -1)  # [2n, C]: cond and uncond rows interleaved

        cache = self.decoder_by_length[self.lengths[-1] if length is None else length]
        out = model.transformer(tokens[:, :, None], positions[self.pair_rows], cache,
                                slots=attend_slots, ws=self.decoder_ws)
        action_logits, cb0_logits = out.action_logits[:, 0], out.cb0_logits[:, 0]  # [2n, Vx], [2n, Va]
        vocab = action_logits.shape[-1]
        guided = cfg_filter_with(*action_logits.view(n, 2, vocab).unbind(1), self.cfg_text,
                                 self.windows[self.cfg_text.width])
        actions = sample_with(guided, self.draw_text, self._noise(noise, SLOT_ACTION, vocab),
                              self.windows[self.draw_text.width])

        # Which codebooks of column t+1 may be written: not a prompt frame, and the slot is listed.
        writable = (at[In.POSITION] - self.delays_less_one >= at[In.PROMPT_FRAMES]) > idle  # [n, K]: ≥ and not idle
        next_positions = positions + 1
        column = audio[self.rows, :, next_positions]  # [n, K]: the prompt's codes where not writable

        guided = cfg_filter_with(*cb0_logits.view(n, 2, -1).unbind(1), self.cfg_cb0, self.windows[self.cfg_cb0.width])
        guided = guided[:, : self.logit_limit]  # never BOS/PAD as a code
        sample_with(guided, self.draw_audio, self._noise(noise, SLOT_CB0, self.logit_limit),
                    self.windows[self.draw_audio.width], out=self.sampled_codes[0])

        stage_logits: torch.Tensor | None = None
        if depformer:
            stage_logits = self._depformer(inputs, out.hidden[:, 0], actions, column, writable, noise)
        # Codebooks 1…K-1 of self.sampled are this step's only with the depformer.
        column = torch.where(writable if depformer else writable & self.cb0_only, self.sampled, column)
        torch.ops.aten.index_put_(audio, [self.rows, None, next_positions], column)  # (setitem adds a view at n = 1)

        # The frame the host emits after this step (its last column may be the one just written).
        emit = at[In.EMIT_FRAME]  # [n, 1]; -1: none
        emitted = audio[self.slot_rows, self.codebooks, emit.clamp(min=0) + self.delays]  # [n, K]
        codes = emitted.clamp(0, self.logit_limit - 1)
        valid = valid & ((codes == emitted).all(dim=1, keepdim=True) | (emit < 0))
        edge = torch.cat([actions[:, None], valid, codes], dim=1)  # (cat promotes the flag to int64)
        return StepTensors(edge, tokens, column, action_logits, cb0_logits, stage_logits)

    @staticmethod
    def _noise(noise: tuple[torch.Tensor, ...], slot: int, vocab: int) -> torch.Tensor:
        """A slot's noise [n, vocab] for a head of that width (a full-width slice would still cost a view op)."""
        return noise[slot] if noise[slot].shape[-1] == vocab else noise[slot][:, :vocab]

    def _depformer(
        self,
        inputs: torch.Tensor,
        hidden: torch.Tensor,
        actions: torch.Tensor,
        column: torch.Tensor,
        writable: torch.Tensor,
        noise: tuple[torch.Tensor, ...],
    ) -> torch.Tensor:
        """All S stages; draws codebooks 1…K-1 of column t+1 into :attr:`sampled`. hidden [2n, E];
        column [n, K] as it stands (cb0 not yet written); noise: one [n, W] per RNG slot.
        Returns the stage logits [2n, S, V']."""
        dep = self.model.depformer
        text: tuple[torch.Tensor, torch.Tensor] | None = None
        if dep.text_embed is not None:
            # Text of column t+1: the host staged both outcomes of the action; pick on device.
            word = (actions == ACTION_NEW_WORD)[:, None]
            nxt = torch.where(word, inputs[:, In.WORD_MAIN : In.WORD_SECOND + 1], inputs[:, In.PAD_MAIN : In.PAD_SECOND + 1])
            nxt = nxt.clamp(0, self.text_vocab - 1)  # the host checked these ids; this only keeps an embedding safe
            # Both CFG rows get the conditional row's text (as the reference runtime does: its
            # stage-0 text tensors are filled with the state machine's output for every branch).
            text = (nxt[:, 0], nxt[:, 1])  # one per CFG pair, as the codes
        # Each stage is teacher-forced from column t+1 as it will be written (the sampled code, or
        # the prompt's own code in the continuation zone). Clamp: rows of unlisted slots may
        # hold the ungenerated sentinel; their outputs are ignored.
        fixed = column.clamp(min=0).unbind(1)  # K × [n]: what a stage is fed where it may not write
        may_write = writable.unbind(1)
        cut, draw = self.cfg_audio, self.draw_audio
        cut_window, draw_window = self.windows[cut.width], self.windows[draw.width]
        prev = torch.where(may_write[0], self.sampled_codes[0], fixed[0])
        projected = dep.project(hidden, pairs=True)  # depformer_in once per weight set, not once per stage
        heads = self.depformer_ws.heads  # each stage's head writes its [2n, V'] part of heads.all
        for stage in range(self.num_stages):
            dep.stage(stage, hidden, prev, self.depformer, text=text, projected=projected,
                      ws=self.depformer_ws)  # both CFG rows are fed the slot's code
            guided = cfg_filter_with(heads.cond[stage], heads.uncond[stage], cut, cut_window)
            code = sample_with(guided, draw, self._noise(noise, stage_slot(stage), self.logit_limit), draw_window,
                               out=self.sampled_codes[stage + 1])
            if stage + 1 < self.num_stages:
                prev = torch.where(may_write[stage + 1], code, fixed[stage + 1])
        return heads.all
