"""bench/e2e_decode.py on CPU: the tiny eager decode path end to end (one
scheme against transformers' own experts), and the table / JSON / guard
helpers. The GPU numbers come from running the script on the H200.

The end-to-end test builds a (tiny) transformers model, so it carries the
``slow`` marker like the other model tests (tests/conftest.py); it takes a
few seconds. The helper tests need no model and stay in the fast subset."""

import importlib.util
import io
import json
import pathlib
import sys
import time

import pytest
import torch

_PATH = pathlib.Path(__file__).resolve().parents[1] / "bench" / "e2e_decode.py"


def _load():
    spec = importlib.util.spec_from_file_location("e2e_decode_bench", _PATH)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


e2e = _load()


def _row(variant, mode, batch, ms, **extra):
    return {"variant": variant, "mode": mode, "batch": batch, "step_ms": ms, "tok_s": batch * 1e3 / ms,
            "layers": 2, "tiny": True,
            "env": {"gpu": "none"}, **extra}


def test_speedups_are_per_mode_and_batch():
    rows = [
        _row("hf", "eager", 1, 10.0),
        _row("bf16", "eager", 1, 5.0),
        _row("int4_w4a16_g128", "eager", 1, 4.0),
        _row("int4_w4a16_g128", "compiled", 1, 2.0),  # no compiled reference: no speed-up
        _row("hf", "eager", 16, 20.0),
    ]
    e2e.add_speedups(rows)
    assert rows[2]["vs_hf"] == 2.5 and rows[2]["vs_bf16"] == 1.25
    assert "vs_hf" not in rows[3] and "vs_bf16" not in rows[3]
    assert rows[4]["vs_hf"] == 1.0
    table = e2e.markdown_table(rows)
    assert "| ours int4_w4a16_g128 | eager | 1 | 4.00 | 250 | 2.50x | 1.25x |" in table


def test_table_flags_errors_skipped_cudagraphs_and_recompiles():
    rows = [
        {"variant": "mxfp4_w4a16", "mode": "compiled", "batch": 1, "error": "RowTimeout: took longer than 1 s"},
        _row("hf", "compiled", 1, 3.0, cudagraph_skips=2, graphs=3),
    ]
    table = e2e.markdown_table(rows)
    assert "**RowTimeout: took longer than 1 s**" in table
    assert "CUDA graphs skipped (2)" in table and "3 graphs compiled" in table


def test_time_limit_interrupts_python():
    t0 = time.perf_counter()
    with pytest.raises(e2e.RowTimeout):
        with e2e.time_limit(0.2):
            while True:
                time.sleep(0.01)
    assert time.perf_counter() - t0 < 5
    with e2e.time_limit(None):  # no limit: a no-op
        pass


def test_param_bytes_matches_the_config_of_qwen3_30b_a3b():
    config = e2e.qwen3_config()
    assert (config.num_hidden_layers, config.hidden_size, config.num_experts, config.num_experts_per_tok,
            config.moe_intermediate_size, config.head_dim, config.vocab_size) == (48, 2048, 128, 8, 768, 128, 151936)
    # ~30.5 B parameters in bf16
    assert 60e9 < e2e.param_bytes(config) < 62e9


@pytest.mark.slow
def test_tiny_eager_decode_end_to_end(tmp_path):
    out_json = tmp_path / "rows.jsonl"
    argv = ["--tiny", "--device", "cpu", "--modes", "eager", "--batch", "1", "--steps", "2", "--warmup", "1",
            "--experts", "hf", "int4_w4a16_g128", "--json", str(out_json), "--timeout-per-variant", "120"]
    args = e2e.parse_args(argv)
    buf = io.StringIO()
    t0 = time.perf_counter()
    rows = e2e.run(args, out=buf)
    assert time.perf_counter() - t0 < 60
    assert [(r["variant"], r["mode"], r["batch"]) for r in rows] == [
        ("hf", "eager", 1), ("int4_w4a16_g128", "eager", 1)]
    for r in rows:
        assert "error" not in r, r["error"]
        assert r["step_ms"] > 0 and r["tok_s"] > 0 and r["steps"] == 2
    assert rows[1]["modules"] == 2 and rows[1]["experts_gib_after"] <= rows[1]["experts_gib_before"]
    assert rows[1]["vs_hf"] > 0
    text = buf.getvalue()
    assert "Command: `python bench/e2e_decode.py --tiny --device cpu --modes eager" in text
    assert "| ours int4_w4a16_g128 | eager | 1 |" in text
    lines = [json.loads(line) for line in out_json.read_text().splitlines()]
    assert [r["variant"] for r in lines] == ["hf", "int4_w4a16_g128"]
    assert lines[0]["env"]["torch"] == torch.__version__

    # --report rebuilds the same table from the JSON lines
    merged = io.StringIO()
    again = e2e.report([str(out_json)], out=merged)
    assert [r["step_ms"] for r in again] == [r["step_ms"] for r in rows]
    assert "| ours int4_w4a16_g128 | eager | 1 |" in merged.getvalue()


@pytest.mark.slow
def test_variants_swap_the_experts_and_put_them_back():
    model = e2e.build_model(e2e.qwen3_config(2, tiny=True), torch.device("cpu"))
    originals = e2e.experts_modules(model)
    assert sorted(originals) == ["model.layers.0.mlp.experts", "model.layers.1.mlp.experts"]
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in model.parameters())
    info = e2e.apply_variant(model, "mxfp4_w4a16")
    assert info["modules"] == 2
    swapped = e2e.experts_modules(model)
    assert all(type(m).__name__ == "TransformersQuantizedExperts" for m in swapped.values())
    e2e.restore_experts(model, originals)
    assert all(e2e.experts_modules(model)[k] is m for k, m in originals.items())
    assert e2e.apply_variant(model, "hf") == {"experts_impl": "grouped_mm"}


@pytest.mark.slow
def test_budget_skips_rows_instead_of_running_them():
    args = e2e.parse_args(["--tiny", "--device", "cpu", "--modes", "eager", "--batch", "1", "--steps", "1",
                           "--experts", "hf", "bf16", "--budget", "0"])
    buf = io.StringIO()
    rows = e2e.run(args, out=buf)
    assert rows == []
    assert "Skipped (--budget 0 s spent): hf/eager/1, bf16/eager/1" in buf.getvalue()
