"""A second CUDA stream for work that may run beside the current stream's, within one layer.

The fused selector's scores and top-k read only the query and the prefix keys already in the cache, not the
exact pass's output, so they can run while FlashInfer's exact pass runs: on the Fast-dLLM-v2 shapes that pass
reads HBM at about 1.2-1.3 TB/s of the H200's 4.8 (it is limited by its tensor-core rate; docs/performance.md),
which leaves bandwidth for the block-mean-query GEMV over K.

`fork()` orders the side stream after everything already queued on the current stream and makes it current;
`join()` makes the current stream wait for the side stream. Both are event record / wait pairs, which
CUDA-graph capture records as a fork and a join inside the captured graph (each captured side branch rejoins
the capture stream before capture ends, as capture requires). Tensors allocated on the side stream during
the fork stay on its allocator pool; the join orders any later reuse of the inputs on the current stream
after the side work. On a device that is not CUDA both are no-ops and the work runs inline.
"""

from __future__ import annotations

import contextlib

import torch


class SideStream:
    def __init__(self) -> None:
        self._streams: dict[torch.device, torch.cuda.Stream] = {}

    @staticmethod
    def _key(device: torch.device | str) -> torch.device | None:
        device = torch.device(device)
        if device.type != "cuda":
            return None
        # "cuda" and "cuda:0" must name one stream
        return device if device.index is not None else torch.device("cuda", torch.cuda.current_device())

    def prepare(self, device: torch.device | str) -> torch.cuda.Stream | None:
        """Create the side stream now (at backend set-up), not at the first fork, which may be under capture.
        Returns it (None off CUDA)."""
        key = self._key(device)
        if key is not None and key not in self._streams:
            self._streams[key] = torch.cuda.Stream(key)
        return self._streams.get(key) if key is not None else None

    @contextlib.contextmanager
    def fork(self, device: torch.device):
        """Run the body on the side stream, after the work already queued on the current stream."""
        side = self.prepare(device)
        if side is None:
            yield
            return
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):
            yield

    def join(self, device: torch.device) -> None:
        """The current stream waits for everything queued on the side stream so far."""
        key = self._key(device)
        side = self._streams.get(key) if key is not None else None
        if side is not None:
            torch.cuda.current_stream(device).wait_stream(side)
