"""The device-table cache (diffkern._tables and its C++ twin csrc/include/diffkern/table_cache.h): hits,
misses, LRU eviction, and entries made or used under CUDA-graph capture never evicted. Both caches run
the same traces: a fresh cache per trace, values numbering the misses."""
import pytest
import torch

from diffkern import _tables, _triton
from diffkern.testing import cuda_harness

# (capacity, [(key, capturing), ...], the value each get returns)
TRACES = {
    "hits and LRU eviction": (2, [(1, 0), (2, 0), (1, 0), (3, 0), (2, 0), (1, 0), (2, 0), (3, 0)],
                              [0, 1, 0, 2, 3, 4, 3, 5]),
    "made under capture: never evicted": (1, [(1, 1), (2, 0), (3, 0), (1, 0), (2, 0)], [0, 1, 2, 0, 3]),
    "used under capture: never evicted": (1, [(1, 0), (1, 1), (2, 0), (3, 0), (1, 0)], [0, 0, 1, 2, 0]),
    "capacity 0 keeps nothing outside capture": (0, [(1, 0), (1, 0), (2, 1), (2, 0)], [0, 1, 2, 2]),
}


def python_trace(capacity, steps):
    cache, made = _tables.TableCache(capacity), []

    def make():
        made.append(len(made))
        return made[-1]
    return [cache.get(key, bool(capturing), make) for key, capturing in steps]


def cpp_trace(capacity, steps):
    if not cuda_harness.loaded():
        pytest.skip("the C++ cache is driven through the host harness extension (built by the tests)")
    keys, capturing = zip(*steps)
    return list(torch.ops.diffkern_harness.table_cache_trace(capacity, list(keys), list(capturing)))


@pytest.mark.parametrize("trace", (python_trace, cpp_trace), ids=("python", "cpp"))
@pytest.mark.parametrize("name", TRACES)
def test_cache_rules(name, trace):
    capacity, steps, expected = TRACES[name]
    assert trace(capacity, steps) == expected


def test_cpu_table_is_a_plain_host_tensor():
    xs = [torch.zeros(2, 3), torch.zeros(4, 5).t()]
    table = _triton.tensor_table(xs, torch.device("cpu"), stride_dims=(0, 1))
    assert table.device.type == "cpu" and not table.is_pinned()
    assert table.tolist() == [[x.data_ptr(), x.stride(0), x.stride(1)] for x in xs]


@pytest.mark.gpu
def test_captured_table_survives_eviction_pressure_and_replays():
    dev = torch.device("cuda", torch.cuda.current_device())
    xs = [torch.zeros(3, 4, device=dev), torch.zeros(4, 3, device=dev).t()]
    expected = torch.tensor([[x.data_ptr(), x.stride(0)] for x in xs], device=dev)
    out = torch.zeros_like(expected)
    stream = torch.cuda.Stream(dev)
    stream.wait_stream(torch.cuda.current_stream(dev))
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        out.copy_(_triton.tensor_table(xs, dev, stride_dims=(0,)))
    other = torch.zeros(4 * _tables.CAPACITY, device=dev)
    with torch.cuda.stream(stream):
        for i in range(2 * _tables.CAPACITY):  # fill the LRU of the capture's stream twice over
            _triton.tensor_table([other[i:]], dev, stride_dims=(0,))
    out.zero_()
    graph.replay()
    torch.cuda.synchronize(dev)
    assert torch.equal(out, expected)
