"""Every Triton launch of the CUDA pipeline compiles for Hopper, without a GPU.

The interpreter tests check what the kernels compute, but the interpreter
runs the Python of a kernel as numpy: what only the compiler rejects (a
loop-carried value that changes type, an unsupported cast or layout, a
ptxas error) shows up first on a GPU. (Checked: a GEMM whose per-row scale
turned from a scalar into a tile inside the K loop passed the interpreter
tests and failed here.) Here the launches are recorded instead
of run (each kernel object is swapped for a recorder, and the launchers are
told the kernels are interpreted so CPU tensors pass their device checks),
then every distinct launch is compiled by Triton's own compiler and ptxas
for ``sm_90`` (``triton.compile`` on an ``ASTSource`` with the launch's
argument types and constexprs, as ``JITFunction.run`` would build it).
fp16 activations: with bf16 the launcher's interpreter workaround would
compute in fp32, a variant the GPU never compiles. It runs in its own
process (``kernel_compile_check.py``): the interpreter tests set
``TRITON_INTERPRET=1`` before the kernels are first imported, and
interpreted kernels cannot be compiled.
"""

import json
import os
import pathlib
import subprocess
import sys

import triton

HELPER = pathlib.Path(__file__).parent / "kernel_compile_check.py"


def test_pipeline_kernels_compile_for_sm90():
    if "nvidia" not in triton.backends.backends:  # pragma: no cover - every Linux triton wheel has it
        raise AssertionError("this triton has no NVIDIA backend to compile with")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, str(HELPER)], env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    summary = json.loads(proc.stdout.strip().splitlines()[-1])
    assert summary["kernels"] == sorted(
        ["moe_gemm_kernel", "moe_decode_kernel", "act_quant_kernel", "align_kernel", "combine_kernel", "route_kernel"]
    ), summary["kernels"]
    # the decode kernel compiles its PTX decoders (ASM) for int4 and fp4 (mxfp4 / nvfp4) weights
    decode = {(c["ELEMENT"], c["SCALE_CODEC"], c["ASM"]) for c in summary["decode_constexprs"]}
    assert {("3", "1", "True"), ("4", "2", "True"), ("4", "3", "True")} <= decode, sorted(decode)
    assert summary["compiled"] >= 30, summary["compiled"]
    gemms = summary["gemm_constexprs"]
    # every dot kind and activation form is among the compiled GEMMs: native fp8 on group
    # codes (ActInput.CODES), native fp8 / int8 on row codes, the prologue, the compute dot
    forms = {(c["A_SCALE"], c["DOT"]) for c in gemms}
    assert {("7", "1"), ("2", "1"), ("2", "2"), ("3", "1"), ("0", "0")} <= forms, sorted(forms)
