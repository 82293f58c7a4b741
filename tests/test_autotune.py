"""Opt-in autotuning with an on-disk cache (``kernels.autotune``), on CPU:
the GPU-specific parts (device name, CUDA-event timer) are replaced by
stand-ins; which config wins, what is cached and when nothing is tuned are
the contract checked here."""

import json
import warnings

import pytest
import torch

import torch_moe_quant as tmq
from torch_moe_quant.kernels import autotune
from torch_moe_quant.kernels.config import GemmProblem, KernelConfig, block_k_for, select_config

CUDA = torch.device("cuda")
PROBLEM = GemmProblem(num_tokens=16, n=1536, k=2048, num_experts=128, top_k=8)
SPEC = tmq.get_scheme("int4_w4a16_g128").weight


@pytest.fixture(autouse=True)
def fresh(monkeypatch):
    monkeypatch.delenv(autotune.ENV_VAR, raising=False)
    monkeypatch.setattr(autotune, "_cache", autotune._UNSET)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: "Fake GPU")
    yield
    autotune.disable_autotune()


def fake_timer(log):
    """Times ``fn`` as 1 / block_n + block_m / 1000 ms of the config it ran:
    the widest N tile with the smallest M tile wins."""

    def timer(fn):
        cfg = fn()
        log.append(cfg)
        return 1 / cfg.block_n + cfg.block_m / 1000

    return timer


def test_off_by_default_uses_the_heuristic():
    assert autotune.active_cache() is None
    calls = []
    cfg = autotune.config_for(PROBLEM, SPEC, CUDA, run=lambda c: calls.append(c) or c)
    assert cfg == select_config(PROBLEM, SPEC, CUDA) and calls == []


def test_env_var_turns_it_on(tmp_path, monkeypatch):
    monkeypatch.setenv(autotune.ENV_VAR, str(tmp_path / "tune.json"))
    cache = autotune.active_cache()
    assert isinstance(cache, autotune.AutotuneCache) and cache.path == tmp_path / "tune.json"


def test_tunes_once_caches_on_disk_and_reuses(tmp_path):
    path = tmp_path / "sub" / "tune.json"
    autotune.enable_autotune(path)
    log = []
    best = autotune.config_for(PROBLEM, SPEC, CUDA, run=lambda c: c, timer=fake_timer(log))
    cands = autotune.candidates(PROBLEM, SPEC)
    assert log == cands  # every candidate timed once
    assert best == min(cands, key=lambda c: 1 / c.block_n + c.block_m / 1000)
    data = json.loads(path.read_text())
    assert data["version"] == autotune.VERSION and len(data["entries"]) == 1
    key = str(autotune.TuneKey.of(PROBLEM, SPEC, CUDA))
    assert KernelConfig(**data["entries"][key]) == best
    # same process: a hit, nothing timed
    log.clear()
    assert autotune.config_for(PROBLEM, SPEC, CUDA, run=lambda c: c, timer=fake_timer(log)) == best
    assert log == []
    # another process (a new cache object on the same file), and M rounded to the same power of two
    autotune.enable_autotune(path)
    same_bucket = GemmProblem(num_tokens=9, n=1536, k=2048, num_experts=128, top_k=8)
    assert autotune.config_for(same_bucket, SPEC, CUDA, run=lambda c: c, timer=fake_timer(log)) == best
    assert log == []


def test_no_tuning_on_cpu_even_when_on(tmp_path):
    autotune.enable_autotune(tmp_path / "tune.json")
    calls = []
    cfg = autotune.config_for(PROBLEM, SPEC, torch.device("cpu"), run=lambda c: calls.append(c) or c)
    assert cfg == select_config(PROBLEM, SPEC, "cpu") and calls == []
    assert not (tmp_path / "tune.json").exists()


def test_a_failing_candidate_is_skipped(tmp_path):
    autotune.enable_autotune(tmp_path / "tune.json")
    log = []

    def run(c):
        if c.num_warps == 8:
            raise RuntimeError("out of resources")
        return c

    with pytest.warns(UserWarning, match="autotune: skipping"):
        best = autotune.config_for(PROBLEM, SPEC, CUDA, run=run, timer=fake_timer(log))
    assert best.num_warps == 4


def test_unreadable_file_is_ignored_with_a_warning_then_rewritten(tmp_path):
    path = tmp_path / "tune.json"
    path.write_text("{not json")
    with pytest.warns(UserWarning, match="cannot be read"):
        cache = autotune.enable_autotune(path)
    assert len(cache) == 0
    autotune.config_for(PROBLEM, SPEC, CUDA, run=lambda c: c, timer=fake_timer([]))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert len(autotune.AutotuneCache(path)) == 1


@pytest.mark.parametrize("name", sorted(tmq.SCHEMES))
def test_candidates_are_valid_for_every_scheme(name):
    spec = tmq.get_scheme(name).weight
    for problem in (PROBLEM, GemmProblem(4096, 4096, 7168, 256, 8), GemmProblem(1, 2880, 2880, 128, 4)):
        cands = autotune.candidates(problem, spec)
        assert cands[0] == select_config(problem, spec, "cuda")
        assert len(set(cands)) == len(cands)
        for c in cands[1:]:
            assert c.block_k in (block_k_for(spec, 64, problem.dtype), block_k_for(spec, 128, problem.dtype))
