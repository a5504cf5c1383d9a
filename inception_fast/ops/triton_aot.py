"""Ahead-of-time compilation of the Triton kernels for a GPU architecture, without a GPU.

`compile_ahead_of_time` compiles one kernel config for sm_<capability> and reads the
cubin's resource usage with the cuobjdump shipped in the triton wheel: registers, stack
and local memory (spills), shared memory, and whether the PTX uses tensor cores.
`KERNELS` lists every kernel the branch-graph op ships (branch_graph_triton.py) with the
configs and compile-time variants it launches; tests/test_triton_aot.py compiles them all.

Tooling only: kernel files never import this module (it imports them).
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from typing import NamedTuple

import torch
import triton

from . import branch_graph_triton as graph
from .triton_gemm import KernelConfig

__all__ = ["AotConfig", "CompiledKernel", "KERNELS", "ODD_CHANNELS", "SHARED_MEMORY_LIMIT", "compile_ahead_of_time",
           "cuda_tool"]

#: Opt-in shared memory per block, bytes (CUDA programming guide, compute capabilities).
SHARED_MEMORY_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


class CompiledKernel(NamedTuple):
    kernel: str
    config: KernelConfig
    dtype: str  # with "-ieee" for exact fp32 dots
    capability: int
    registers: int
    stack: int  # bytes of stack frame per thread: > 0 means spills
    local: int  # bytes of local memory per thread
    shared: int  # bytes of shared memory per block
    ptx: str

    @property
    def tensor_core_op(self) -> str | None:
        for op in ("wgmma", "mma.sync"):
            if op in self.ptx:
                return op
        return None


class AotConfig(NamedTuple):
    """One shipped launch of a kernel: its tile config, whether it is the exact-fp32 list's
    (FMA dots: compiled for fp32 "ieee" only; else for fp16, bf16 and tf32), its other
    compile-time arguments, and the int arguments a real network's launch has divisible by
    16 (the JIT specializes those: vectorized, pipelined loads), as name tuples."""

    config: KernelConfig
    exact_fp32: bool
    constexprs: tuple[tuple[str, int], ...] = ()
    divisible: tuple[str, ...] = ()
    dot: bool = True  # whether this variant has a tl.dot (then it must run on tensor cores)


def _configs(configs_of, **variant) -> list[AotConfig]:
    """Both precisions' lists of a launch shape: configs_of(exact_fp32) -> configs."""
    constexprs = tuple(sorted(variant.pop("constexprs", {}).items()))
    divisible = tuple(variant.pop("divisible", ()))
    dot = variant.pop("dot", True)
    return [AotConfig(cfg, exact, constexprs, divisible, dot) for exact in (False, True) for cfg in configs_of(exact)]


def _graph_kernels() -> dict:
    """Every launch shape of branch_graph_triton.py: each stage variant that GoogLeNet's,
    Inception-v3's and Inception-ResNet's plans launch (graph.SHIPPED_STAGES), the backward's data gradient (as a
    fan-out's last consumer: accumulate + mask, the most registers) and the fused max-pool
    backward's two kernels; each with channel counts divisible by 16 (real networks) and
    with odd ones (name + ODD_CHANNELS)."""
    kernels = {}
    for name, kinds, segments, epilogue in graph.SHIPPED_STAGES:
        constexprs = graph.stage_constexprs(kinds, segments, epilogue)
        kernels[f"graph_stage_{name}"] = (graph.STAGE_KERNEL, _configs(
            lambda exact, kinds=kinds: graph.stage_configs(kinds, exact), constexprs=constexprs,
            divisible=graph.stage_channel_args(kinds, segments)))
    kernels["graph_dgrad"] = (graph.DGRAD_KERNEL, _configs(
        lambda exact: graph.graph_configs(3, 3, False, exact), constexprs=dict(ACCUMULATE=True, MASK=True),
        divisible=("K_g", "cols")))
    for dx in (True, False):  # without DX (no dx wanted) the pool-grad kernel has no dot
        kernels[f"graph_pool_grad{'' if dx else '_no_dx'}"] = (graph.POOL_GRAD_KERNEL, _configs(
            graph.max_pool_backward_configs, constexprs=dict(DX=dx), divisible=("C", "cp"), dot=dx))
    kernels["graph_input_grad"] = (graph.INPUT_GRAD_KERNEL, _configs(
        graph.max_pool_backward_configs, divisible=("C", "K")))
    # The same launches with odd channel counts (no int argument divisible by 16): what
    # awkward shapes launch, unvectorized, with more registers.
    for name, (fn, aots) in list(kernels.items()):
        kernels[f"{name}{ODD_CHANNELS}"] = (fn, [aot._replace(divisible=()) for aot in aots])
    return kernels


ODD_CHANNELS = "_odd_channels"
#: name -> (JIT function, [AotConfig]): every shipped kernel launch of branch_graph_triton.py.
KERNELS: dict[str, tuple[triton.runtime.JITFunction, list[AotConfig]]] = _graph_kernels()

_TRITON_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}
#: Pointer arguments that are not of the data dtype.
_POINTER_DTYPES = {"argmax_ptr": "i8"}


def cuda_tool(name: str) -> str:
    """The path of a CUDA binary (cuobjdump, ptxas) shipped in the triton wheel."""
    path = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", name)
    if not os.path.exists(path):
        raise FileNotFoundError(f"{name} is not in the triton wheel at {path}")
    return path


def compile_ahead_of_time(
    kernel, config: KernelConfig, dtype: torch.dtype, capability: int, precision: str | None = None,
    constexprs: dict | tuple | None = None, divisible: tuple[str, ...] = (), name: str | None = None,
) -> CompiledKernel:
    """Compile one kernel config for an sm_<capability> GPU, and read its resource usage.

    `kernel` is a name of KERNELS or a JIT function. `precision` is the dot's input
    precision; by default tf32 for fp32 (the tensor-core path) and "ieee" otherwise.
    `constexprs` sets a kernel's other compile-time arguments; `divisible` names int
    arguments to compile as multiples of 16, as the JIT specializes them at a launch where
    they are (pointers always are: torch allocations are 16-byte aligned).
    """
    if isinstance(kernel, str):
        name, fn = name or kernel, KERNELS[kernel][0]
    else:
        name, fn = name or kernel.__name__, kernel
    if not isinstance(fn, triton.runtime.JITFunction):
        raise RuntimeError("ahead-of-time compilation needs real JIT kernels: unset TRITON_INTERPRET")
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    meta = {"BLOCK_M": config.block_m, "BLOCK_N": config.block_n, "BLOCK_K": config.block_k,
            "INPUT_PRECISION": precision or ("tf32" if dtype == torch.float32 else "ieee"), "UPCAST_DOT": False,
            **dict(constexprs or {})}
    meta = {k: v for k, v in meta.items() if k in fn.arg_names}  # kernels without a dot take fewer
    unknown = set(divisible) - set(fn.arg_names)
    if unknown:
        raise ValueError(f"{name} has no arguments {sorted(unknown)}")
    pointers = [arg for arg in fn.arg_names if arg.endswith("_ptr")]
    signature = {arg: ("constexpr" if arg in meta
                       else f"*{_POINTER_DTYPES.get(arg, _TRITON_DTYPE[dtype])}" if arg in pointers else "i32")
                 for arg in fn.arg_names}
    attrs = {(fn.arg_names.index(arg),): [["tt.divisibility", 16]] for arg in (*pointers, *divisible)}
    source = ASTSource(fn=fn, signature=signature, constexprs=meta, attrs=attrs)
    compiled = triton.compile(source, target=GPUTarget("cuda", capability, 32),
                              options={"num_warps": config.num_warps, "num_stages": config.num_stages})
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(compiled.asm["cubin"])
        f.flush()
        usage = subprocess.run([cuda_tool("cuobjdump"), "-res-usage", f.name],
                               capture_output=True, text=True, check=True).stdout

    def field(label: str) -> int:
        match = re.search(rf"\b{label}:(\d+)", usage)
        if match is None:
            raise RuntimeError(f"cuobjdump -res-usage printed no {label}: {usage!r}")
        return int(match.group(1))

    return CompiledKernel(
        kernel=name, config=config, capability=capability,
        dtype=_TRITON_DTYPE[dtype] + ("-ieee" if dtype == torch.float32 and meta.get("INPUT_PRECISION") == "ieee" else ""),
        registers=field("REG"), stack=field("STACK"), local=field("LOCAL"),
        shared=max(field("SHARED"), compiled.metadata.shared), ptx=compiled.asm["ptx"],
    )
