"""SideStream: inline on the CPU; on the GPU, work forked beside the current stream is ordered after what
was queued before the fork, joined before what is queued after, and captured into a CUDA graph."""

import pytest
import torch

from sglang_mage.side_stream import SideStream


def test_cpu_runs_inline_and_join_is_a_noop():
    side, x = SideStream(), torch.zeros(4)
    with side.fork(x.device):
        x += 1
    side.join(x.device)
    assert x.tolist() == [1.0] * 4 and not side._streams and side.prepare("cpu") is None


@pytest.mark.gpu
def test_gpu_fork_join_orders_both_ways():
    dev = torch.device("cuda")
    side = SideStream()
    a = torch.zeros(1 << 24, device=dev)
    torch.cuda._sleep(50_000_000)  # a long kernel on the current stream before the fork
    a.fill_(2.0)
    with side.fork(dev):
        b = a * 3  # must see the fill queued before the fork
    side.join(dev)
    c = b + 1  # must see the side work
    assert side.prepare("cuda") is side.prepare(torch.device("cuda", torch.cuda.current_device()))
    assert torch.cuda.current_stream(dev) != side.prepare(dev)
    assert float(c[-1]) == 7.0 and bool((c == 7.0).all())


@pytest.mark.gpu
def test_gpu_fork_join_inside_graph_capture():
    dev = torch.device("cuda")
    side = SideStream()
    x = torch.randn(4096, device=dev)
    y, z = torch.empty_like(x), torch.empty_like(x)
    side_stream_warm = torch.cuda.Stream(dev)
    with torch.cuda.stream(side_stream_warm):  # capture needs a non-default stream and warm allocations
        with side.fork(dev):
            y.copy_(x * 2)
        z.copy_(x + 1)
        side.join(dev)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        with side.fork(dev):
            y.copy_(x * 2)
        z.copy_(x + 1)
        side.join(dev)
    x.copy_(torch.randn_like(x))
    y.fill_(float("nan"))
    z.fill_(float("nan"))
    graph.replay()
    torch.cuda.synchronize()
    assert torch.equal(y, x * 2) and torch.equal(z, x + 1)
