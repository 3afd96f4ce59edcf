"""The Mimi decode of one runner step: the frames some streams emit → their PCM on the host.

Two paths, one per device (bench/mimi_decode.py measures both; docs/design.md says why):

- **CUDA** (``masked``): one fixed-shape decode over ALL ``max_batch`` rows with a per-row emit
  mask (:meth:`MimiStreamDecoder.decode_masked`), staged like the step's inputs (pinned host
  rows → one copy in) and run through one :class:`CUDAGraphed`, captured at start-up with no
  row emitting (so capturing changes no state). The output lands in a pinned host buffer and
  the host waits on an event recorded after that copy, not on the whole device. With graphs
  switched off the same masked function runs eagerly: one code path for the device.
- **CPU** (``subset``): decode only the emitting rows (``decode(codes, rows=…)``). Without
  graphs a fixed shape buys nothing, and decoding idle rows costs their full compute.

The masked graph may share the engine's :class:`GraphMemory`: the runner replays the step's
graph and this one one after the other on one stream (never concurrently), every capture
into the pool uses the pool's one side stream, and each graph's outputs are read before the
next replay. That last rule is the shared :class:`OutputGuard`: a decode claims it and
releases it once the PCM's copy to the host is queued, so a step queued later on the same
stream runs after that copy and never over unread PCM.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from .codec import MimiStreamDecoder
from .graphs import CUDAGraphed, GraphMemory, OutputGuard


def masked_by_default(device: torch.device) -> bool:
    """The per-device choice: the fixed-shape masked decode on CUDA, the emitting rows only elsewhere."""
    return device.type == "cuda"


class MimiStepDecoder:
    """Decodes one frame per emitting row of ``decoder`` per call (see the module doc for the paths).

    ``masked``: None picks per device (:func:`masked_by_default`). ``graphed`` (masked only):
    run the masked decode through a CUDA graph (CUDA only; the process-wide switch still wins).
    """

    def __init__(
        self,
        decoder: MimiStreamDecoder,
        *,
        masked: bool | None = None,
        graphed: bool = False,
        memory: GraphMemory | None = None,
        guard: OutputGuard | None = None,
    ) -> None:
        device = decoder.codec.device
        self.decoder = decoder
        self.masked = masked_by_default(device) if masked is None else masked
        if graphed and not (self.masked and device.type == "cuda"):
            raise ValueError("a graphed Mimi decode needs the masked path on a CUDA device")
        self.graphed = graphed
        self.guard = guard or OutputGuard()
        b, k = decoder.max_batch, decoder.codec.num_codebooks
        pinned = device.type == "cuda"
        # Host rows (pinned on CUDA, so the copy in is asynchronous); rewritten only after the
        # previous call's output copy synchronised the stream, which the input copy preceded.
        self.staging_codes = torch.zeros((b, k, 1), dtype=torch.long, pin_memory=pinned)
        self.staging_emit = torch.zeros(b, dtype=torch.bool, pin_memory=pinned)
        self.codes = torch.zeros((b, k, 1), dtype=torch.long, device=device)
        self.emit = torch.zeros(b, dtype=torch.bool, device=device)
        self.pcm_host = torch.zeros((b, decoder.codec.samples_per_frame), dtype=torch.float32, pin_memory=pinned)
        self.copied = torch.cuda.Event() if pinned else None
        self._graph = CUDAGraphed(self._masked_decode, name=f"mimi_decode[{b}]", disable=not graphed,
                                  memory=memory)
        # A submitted decode not yet collected: its rows (masked path) or its PCM (subset path).
        self._pending: tuple[list[int], np.ndarray | None] | None = None

    def _masked_decode(self, codes: torch.Tensor, emit: torch.Tensor) -> torch.Tensor:
        return self.decoder.decode_masked(codes, emit)  # [B, 1, 1920] → [B, 1920]

    @property
    def captured(self) -> bool:
        return self._graph.captured

    def capture(self) -> None:
        """Run (and with graphs, capture) the masked decode once with no row emitting: every
        row's state keeps its bits, so this can run at any time. A no-op on the subset path."""
        if not self.masked:
            return
        self.decode([], [])

    def decode(self, rows: Sequence[int], codes: Sequence[torch.Tensor]) -> np.ndarray:
        """Decode one frame for each of ``rows`` (distinct) from its codes [K] (any device, in
        range: the engine clamps them). Returns float32 PCM [len(rows), 1920] on the host, in
        the order of ``rows`` (a new array: nothing aliases the reused buffers)."""
        self.submit(rows, codes)
        return self.collect()

    def submit(self, rows: Sequence[int], codes: Sequence[torch.Tensor]) -> None:
        """:meth:`decode` in two halves: start the decode (on CUDA: queue it and its copy out,
        without waiting), then :meth:`collect` the PCM. Work queued on the device between the two
        (the next step) runs after the decode and does not delay the PCM."""
        if self._pending is not None:
            raise RuntimeError("collect the previous Mimi decode before submitting another")
        if len(rows) != len(codes):
            raise ValueError(f"{len(rows)} rows but {len(codes)} frames of codes")
        if not self.masked:
            if not rows:
                self._pending = ([], np.zeros((0, self.pcm_host.shape[1]), np.float32))
                return
            batch = torch.stack(list(codes))[:, :, None].to(self.decoder.codec.device)
            with torch.inference_mode():
                pcm = self.decoder.decode(batch, rows=list(rows), validate=False)
            self._pending = ([], pcm.float().cpu().numpy())
            return
        if self.graphed and not self._graph.captured and rows:
            self.capture()  # the first call captures; capture must not see an emitting row
        self.staging_emit.zero_()
        for row, frame in zip(rows, codes):
            self.staging_codes[row, :, 0] = frame
            self.staging_emit[row] = True
        # The output copy is queued before the guard is released: anything replayed later on
        # this stream (sharing the graph pool) runs after the PCM has left for the host.
        self.guard.claim(self._graph.name)
        try:
            with torch.inference_mode():
                self.codes.copy_(self.staging_codes, non_blocking=True)
                self.emit.copy_(self.staging_emit, non_blocking=True)
                pcm = self._graph(self.codes, self.emit)
                self.pcm_host.copy_(pcm, non_blocking=self.copied is not None)
                if self.copied is not None:
                    self.copied.record()
        finally:
            self.guard.release()
        self._pending = (list(rows), None)

    def collect(self) -> np.ndarray:
        """The PCM of the submitted decode (waits for its copy out only, not the whole device)."""
        if self._pending is None:
            raise RuntimeError("no Mimi decode was submitted")
        (rows, pcm), self._pending = self._pending, None
        if pcm is not None:
            return pcm
        if self.copied is not None:
            self.copied.synchronize()
        return self.pcm_host.numpy()[rows]
