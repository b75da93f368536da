"""diffkern._autotune.pick's logic on CPU: tuning switched on, a fake CUDA device, fake compiled kernels (n_spills)
and a fake triton.testing.do_bench whose times the test sets, so every rule is checked without a GPU: spilling
and out-of-resources candidates dropped, the fastest kept per key (in memory and on disk), nothing timed or
cached while a CUDA graph is being captured, one tuning per key under threads, and configs[0] wherever
tuning is off."""
import threading
import time
import types

import pytest
import torch
import triton.testing
from triton.runtime.errors import OutOfResources

from diffkern import _autotune, _triton
from diffkern._autotune import Config

CONFIGS = (Config({"BLOCK": 64}, 4), Config({"BLOCK": 128}, 4), Config({"BLOCK": 128}, 8), Config({"BLOCK": 256}, 8))


def kernel_a(x):  # stand-ins for @triton.jit kernels: the disk cache hashes their source
    return x


def kernel_b(x):
    return x + 1


class FakeGPU:
    """Launches that record their config, with per-config spills and do_bench milliseconds."""

    def __init__(self, ms, spills=None, out_of_resources=(), delay_s=0.0):
        self.ms, self.spills, self.oor, self.delay_s = ms, spills or {}, set(out_of_resources), delay_s
        self.launched, self.timed, self.capturing = [], [], False
        self.lock = threading.Lock()

    def launch(self, config):
        if config in self.oor:
            raise OutOfResources(300000, 232448, "shared memory")
        with self.lock:
            self.launched.append(config)
        return types.SimpleNamespace(n_spills=self.spills.get(config, 0))

    def do_bench(self, fn, warmup, rep, return_mode):
        assert return_mode == "median"
        fn()
        time.sleep(self.delay_s)
        with self.lock:
            config = self.launched[-1]
            self.timed.append(config)
        return self.ms[config]


@pytest.fixture
def gpu(monkeypatch, tmp_path):
    """Tuning on, a fake cuda:0 (H100-like) under the device guard, an empty choice table, the disk cache in
    tmp_path; returns a factory of FakeGPUs wired into do_bench and stream capture."""
    monkeypatch.setattr(_triton, "interpreting", lambda: False)
    monkeypatch.delenv("DIFFKERN_AUTOTUNE", raising=False)
    monkeypatch.setenv("DIFFKERN_AUTOTUNE_CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_triton, "guarded_device", lambda: torch.device("cuda", 0))
    monkeypatch.setattr(_autotune, "_choices", {})
    props = types.SimpleNamespace(name="Fake H100", major=9, minor=0, multi_processor_count=132)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: props)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: props.name)
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    made = []

    def make(*args, **kwargs):
        fake = FakeGPU(*args, **kwargs)
        made.append(fake)
        monkeypatch.setattr(triton.testing, "do_bench", fake.do_bench)
        monkeypatch.setattr(torch.cuda, "is_current_stream_capturing", lambda: fake.capturing)
        return fake

    make.dir = tmp_path
    return make


def ms(*values):
    return dict(zip(CONFIGS, values))


def test_fastest_config_that_does_not_spill(gpu):
    fake = gpu(ms(1.0, 0.5, 0.7, 0.9), spills={CONFIGS[1]: 8})
    assert _autotune.pick("k", ("bf16", 1024), CONFIGS, fake.launch, kernel=kernel_a) == CONFIGS[2]
    assert CONFIGS[1] not in fake.timed and set(fake.timed) == {CONFIGS[0], CONFIGS[2], CONFIGS[3]}
    [entry] = _autotune.chosen()
    assert entry["config"] == CONFIGS[2].describe() and entry["source"] == "timed"
    assert entry["dropped"] == {CONFIGS[1].describe(): "spills 8 registers"}
    assert entry["ms"] == {c.describe(): t for c, t in ms(1.0, 0.5, 0.7, 0.9).items() if c != CONFIGS[1]}
    assert entry["key"] == ("bf16", 1024) and entry["capability"] == (9, 0)
    assert CONFIGS[2].describe() in _autotune.summary()[0]


def test_out_of_resources_candidates_are_dropped(gpu):
    fake = gpu(ms(1.0, 0.5, 0.7, 0.9), out_of_resources=[CONFIGS[1], CONFIGS[2]])
    assert _autotune.pick("k", (1,), CONFIGS, fake.launch) == CONFIGS[3]
    assert set(_autotune.chosen()[0]["dropped"]) == {CONFIGS[1].describe(), CONFIGS[2].describe()}


def test_every_candidate_spilling_raises(gpu):
    fake = gpu(ms(1.0, 0.5, 0.7, 0.9), spills=dict.fromkeys(CONFIGS, 4))
    with pytest.raises(RuntimeError, match="k_spilly: no candidate configuration can run"):
        _autotune.pick("k_spilly", (1,), CONFIGS, fake.launch)
    assert not fake.timed and not _autotune.chosen()


def test_choice_cached_per_key(gpu):
    fake = gpu(ms(1.0, 0.5, 0.7, 0.9))
    assert _autotune.pick("k", (1,), CONFIGS, fake.launch) == CONFIGS[1]
    n = len(fake.launched)
    fake.ms = ms(0.1, 0.5, 0.7, 0.9)  # a second call must not time again, whatever the times would be now
    assert _autotune.pick("k", (1,), CONFIGS, fake.launch) == CONFIGS[1]
    assert len(fake.launched) == n
    assert _autotune.pick("k", (2,), CONFIGS, fake.launch) == CONFIGS[0]  # another key is tuned afresh
    assert _autotune.pick("other", (1,), CONFIGS, fake.launch) == CONFIGS[0]  # so is another kernel
    assert [(c["kernel"], c["key"]) for c in _autotune.chosen()] == [("k", (1,)), ("k", (2,)), ("other", (1,))]


def test_capture_uses_configs0_without_timing_or_caching(gpu):
    fake = gpu(ms(1.0, 0.5, 0.7, 0.9))
    fake.capturing = True
    assert _autotune.pick("k", (1,), CONFIGS, fake.launch, kernel=kernel_a) == CONFIGS[0]
    assert not fake.launched and not _autotune.chosen() and not any(gpu.dir.iterdir())
    fake.capturing = False
    assert _autotune.pick("k", (1,), CONFIGS, fake.launch, kernel=kernel_a) == CONFIGS[1]  # tuned once outside
    fake.capturing = True
    n = len(fake.launched)
    assert _autotune.pick("k", (1,), CONFIGS, fake.launch, kernel=kernel_a) == CONFIGS[1]  # the cached choice
    assert len(fake.launched) == n


def test_capture_uses_a_choice_on_disk(gpu, monkeypatch):
    fake = gpu(ms(1.0, 0.5, 0.7, 0.9))
    _autotune.pick("k", (1,), CONFIGS, fake.launch, kernel=kernel_a)
    monkeypatch.setattr(_autotune, "_choices", {})  # a new process
    fake.capturing = True
    n = len(fake.launched)
    assert _autotune.pick("k", (1,), CONFIGS, fake.launch, kernel=kernel_a) == CONFIGS[1]
    assert len(fake.launched) == n


def test_disk_cache_survives_the_process_keyed_by_source_candidates_and_device(gpu, monkeypatch):
    fake = gpu(ms(1.0, 0.5, 0.7, 0.9))
    assert _autotune.pick("k", (1,), CONFIGS, fake.launch, kernel=kernel_a) == CONFIGS[1]
    assert len(list(gpu.dir.iterdir())) == 1

    def new_process(times):
        monkeypatch.setattr(_autotune, "_choices", {})
        fake.launched.clear()
        fake.ms = times

    new_process(ms(0.1, 0.5, 0.7, 0.9))
    assert _autotune.pick("k", (1,), CONFIGS, fake.launch, kernel=kernel_a) == CONFIGS[1]  # read, not timed
    assert not fake.launched and _autotune.chosen()[0]["source"] == "disk"
    new_process(ms(0.1, 0.5, 0.7, 0.9))
    assert _autotune.pick("k", (1,), CONFIGS, fake.launch, kernel=kernel_b) == CONFIGS[0]  # other source: timed
    new_process(ms(0.1, 0.5, 0.7, 0.9))
    assert _autotune.pick("k", (1,), CONFIGS[:3], fake.launch, kernel=kernel_a) == CONFIGS[0]  # other candidates
    new_process(ms(0.1, 0.5, 0.7, 0.9))
    other = types.SimpleNamespace(name="Fake A100", major=8, minor=0, multi_processor_count=108)
    monkeypatch.setattr(torch.cuda, "get_device_properties", lambda device=None: other)
    assert _autotune.pick("k", (1,), CONFIGS, fake.launch, kernel=kernel_a) == CONFIGS[0]  # other device
    monkeypatch.setenv("DIFFKERN_AUTOTUNE_CACHE_DIR", "")  # disabled: nothing read or written
    new_process(ms(1.0, 0.5, 0.7, 0.1))
    assert _autotune.pick("k", (1,), CONFIGS, fake.launch, kernel=kernel_a) == CONFIGS[3]


def test_a_corrupt_or_stale_disk_entry_is_retimed(gpu, monkeypatch):
    fake = gpu(ms(1.0, 0.5, 0.7, 0.9))
    _autotune.pick("k", (1,), CONFIGS, fake.launch, kernel=kernel_a)
    [path] = gpu.dir.iterdir()
    for text in ("{not json", '{"config": "BLOCK=1,num_warps=1,num_stages=1"}'):
        path.write_text(text)
        monkeypatch.setattr(_autotune, "_choices", {})
        fake.launched.clear()
        assert _autotune.pick("k", (1,), CONFIGS, fake.launch, kernel=kernel_a) == CONFIGS[1]
        assert fake.launched


def test_one_tuning_per_key_under_threads(gpu):
    fake = gpu(ms(1.0, 0.5, 0.7, 0.9), delay_s=0.02)
    barrier = threading.Barrier(6)
    got = []

    def call():
        barrier.wait()
        got.append(_autotune.pick("k", (1,), CONFIGS, fake.launch))

    threads = [threading.Thread(target=call) for _ in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert got == [CONFIGS[1]] * 6
    assert sorted(map(CONFIGS.index, fake.timed)) == [0, 1, 2, 3]  # each candidate timed once, by one thread


@pytest.mark.parametrize("off", ("interpreter", "env", "cpu", "no guard", "one candidate"))
def test_configs0_wherever_tuning_is_off(gpu, monkeypatch, off):
    fake = gpu(ms(1.0, 0.5, 0.7, 0.9))
    configs = CONFIGS
    if off == "interpreter":
        monkeypatch.setattr(_triton, "interpreting", lambda: True)
    elif off == "env":
        monkeypatch.setenv("DIFFKERN_AUTOTUNE", "0")
    elif off == "cpu":
        monkeypatch.setattr(_triton, "guarded_device", lambda: torch.device("cpu"))
    elif off == "no guard":
        monkeypatch.setattr(_triton, "guarded_device", lambda: None)
    else:
        configs = CONFIGS[1:2]
    assert _autotune.pick("k", (1,), configs, fake.launch) == configs[0]
    assert not fake.launched and not _autotune.chosen()


def test_bad_arguments(gpu):
    fake = gpu(ms(1.0, 0.5, 0.7, 0.9))
    with pytest.raises(ValueError, match="k: no candidate"):
        _autotune.pick("k", (1,), (), fake.launch)
    with pytest.raises(TypeError, match="k: the autotune key"):
        _autotune.pick("k", (torch.bfloat16,), CONFIGS, fake.launch)
    with pytest.raises(TypeError, match="k: launch.config. must return the compiled kernel"):
        _autotune.pick("k", (1,), CONFIGS, lambda config: None)


def test_bucket():
    assert [_autotune.bucket(n) for n in (0, 1, 2, 3, 4, 5, 1000, 1024, 1025)] == [1, 1, 2, 4, 4, 8, 1024, 1024, 2048]
