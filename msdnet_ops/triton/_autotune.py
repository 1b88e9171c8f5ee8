"""Autotuning of the GPU GEMM kernels, in one place: the config tables, their pruning by problem
size, and the autotuned wrappers.

Tables are per kernel, operand width and shape class (1x1, 3x3, pooled 1x1), because the
register and shared-memory budgets are: a float32 (TF32) operand tile takes twice the registers
and shared memory of a bfloat16/float16 one, a pooled operand four loads per step. Every entry compiles without spilling
on sm_80 and sm_90 (``benches/gpu_compile.py`` checks each one the models launch, in CI).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from . import _runtime as rt

# (kernel, operand class, shape class) -> [(block sizes..., num_warps, num_stages)]
# block sizes: conv_fwd/conv_dgrad (BLOCK_M, BLOCK_N, BLOCK_K); conv_wgrad (BLOCK_CO, BLOCK_CI, BLOCK_P).
# Rules found with benches/gpu_compile.py: at most 32 accumulator elements per thread
# (BM*BN <= 32 * 32 * warps: the dgrad epilogue holds ~5 tiles of that size), at most 16 for a
# 3x3 dgrad (its phase/tap index math is live too); the pooled forward (4 loads per step)
# pipelined 2 deep, or with BLOCK_K 16 in float32 (else it spills, and its shared memory
# passes sm_80's 163 KiB); BLOCK_CO >= 64 in wgrad (a wgmma is 64 rows).
# Triton 3.6 (gpu_compile --all: every divisibility variant) spilled 8-24 B more, hence: the
# float32 pooled forward 64x64 with 8 warps (64x64x32 with 4 spilled on sm_90; 64x64x16 with 4,
# 3 deep, on sm_80, under 3.8 too); the pooled wgrad's 8-warp tiles with BLOCK_P 16 in 16-bit
# (32 spilled at any depth on sm_80) and 2 deep in float32; the float32 1x1 forward 128x64x32
# and the 16-bit 3x3 wgrad 64x64x32 2 deep (3 deep spilled on sm_80: ptxas capped at 96-128).
_GEMM = [(128, 64, 32, 8, 3), (64, 64, 32, 4, 3), (64, 32, 32, 4, 3)]
_FWD_1X1 = {"16bit": _GEMM,
            "tf32": [(128, 64, 32, 8, 2), (64, 64, 32, 4, 3), (64, 32, 32, 4, 3)]}
_FWD_3X3 = {"16bit": [(128, 64, 32, 8, 3), (64, 64, 32, 8, 3), (64, 32, 32, 4, 2)],
            # 64x32x32 with 4 warps spilled 8 B in float32 (stride 2, transform, sm_80)
            "tf32": [(128, 64, 32, 8, 3), (64, 64, 32, 8, 3), (64, 32, 16, 4, 2)]}
_DGRAD_3X3 = [(64, 64, 32, 8, 3), (64, 32, 32, 4, 3), (128, 32, 32, 8, 3)]
_POOL2 = {"16bit": [(128, 64, 32, 8, 2), (64, 64, 32, 4, 2), (64, 32, 32, 4, 2)],
          "tf32": [(64, 64, 16, 8, 3), (64, 32, 32, 4, 2), (64, 64, 32, 8, 2)]}
_WGRAD = [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3)]
_WGRAD_3X3 = {"16bit": [(64, 64, 32, 4, 2), (128, 64, 32, 8, 3), (64, 128, 32, 8, 3)], "tf32": _WGRAD}
_WGRAD_POOL2 = {"16bit": [(64, 64, 32, 4, 3), (128, 64, 16, 8, 3), (64, 128, 16, 8, 3)],
                "tf32": [(64, 64, 32, 4, 3), (128, 64, 32, 8, 2), (64, 128, 32, 8, 2)]}
CONFIGS = {}
for _ops in ("16bit", "tf32"):
    CONFIGS.update({("conv_fwd", _ops, "1x1"): _FWD_1X1[_ops], ("conv_fwd", _ops, "3x3"): _FWD_3X3[_ops],
                    ("conv_fwd", _ops, "pool2"): _POOL2[_ops],
                    ("conv_dgrad", _ops, "1x1"): _GEMM, ("conv_dgrad", _ops, "3x3"): _DGRAD_3X3,
                    ("conv_dgrad", _ops, "pool2"): _GEMM,
                    ("conv_wgrad", _ops, "1x1"): _WGRAD, ("conv_wgrad", _ops, "3x3"): _WGRAD_3X3[_ops],
                    ("conv_wgrad", _ops, "pool2"): _WGRAD_POOL2[_ops]})

BLOCK_NAMES = {"conv_fwd": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
               "conv_dgrad": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
               "conv_wgrad": ("BLOCK_CO", "BLOCK_CI", "BLOCK_P")}


@dataclass(frozen=True)
class Tuning:
    """How one launch of a GEMM kernel is autotuned."""
    table: str                  # "conv_fwd" | "conv_dgrad" | "conv_wgrad"
    operands: str               # "16bit" | "tf32" (float32 features): operand_class
    shape: str                  # "1x1" | "3x3" | "pool2": shape_class
    width: tuple                # (size argument, block): column tiles much wider than the size are dropped
    key: tuple                  # arguments the best config depends on
    restore: tuple = ()         # outputs accumulated into: restored between tuning runs
    reset: tuple = ()           # outputs atomically accumulated from zero: zeroed between runs


def operand_class(dtype: torch.dtype) -> str:
    return "tf32" if dtype == torch.float32 else "16bit"


def shape_class(ksize: int, pool: int) -> str:
    return "pool2" if pool == 2 else f"{ksize}x{ksize}"


def configs(tuning: Tuning) -> list:
    """The table of ``tuning``: dicts of block sizes, num_warps and num_stages."""
    names = BLOCK_NAMES[tuning.table]
    return [dict(zip(names, row[:3]), num_warps=row[3], num_stages=row[4])
            for row in CONFIGS[(tuning.table, tuning.operands, tuning.shape)]]


def candidates(tuning: Tuning, named_args: dict) -> list:
    """The configs the autotuner tries for a launch with ``named_args``: those whose column
    tile is at most max(32, next_pow2(size)) (a wider tile would mostly hold masked columns),
    or the first one when none is."""
    size_arg, block = tuning.width
    limit = max(32, rt.next_pow2(named_args[size_arg]))
    table = configs(tuning)
    return [c for c in table if c[block] <= limit] or table[:1]


def _as_dict(config) -> dict:
    return dict(config.kwargs, num_warps=config.num_warps, num_stages=config.num_stages)


# Timing of each candidate config: 5 ms of warm-up, then repetitions for 25 ms. Triton's
# default (25 + 100 ms) adds up in a model's first training step: MSDNet cifar100-anytime
# (batch 64) tunes 192 GEMM shapes, 399 candidate timings (~50 s at the default; counted on
# the CPU by capturing its launches as benches/gpu_launches.py does).
TUNE_WARMUP_MS, TUNE_REP_MS = 5, 25


def bench_candidate(kernel_call, quantiles):
    """The autotuner's timer (Triton's ``do_bench`` with this module's shorter budget)."""
    import triton.testing
    return triton.testing.do_bench(kernel_call, warmup=TUNE_WARMUP_MS, rep=TUNE_REP_MS, quantiles=quantiles)


@functools.lru_cache(maxsize=None)
def autotuned(kernel, tuning: Tuning):
    """``triton.autotune`` of ``kernel`` over ``tuning``'s table, built once per (kernel, tuning)."""
    def as_config(d):
        blocks = {k: v for k, v in d.items() if k not in ("num_warps", "num_stages")}
        return triton.Config(blocks, num_warps=d["num_warps"], num_stages=d["num_stages"])

    def prune(configs, named_args, **kwargs):
        kept = candidates(tuning, named_args)  # dicts, as _as_dict makes of a Config
        return [c for c in configs if _as_dict(c) in kept]

    return triton.autotune(configs=[as_config(c) for c in configs(tuning)], key=list(tuning.key),
                           prune_configs_by={"early_config_prune": prune},
                           restore_value=list(tuning.restore) or None,
                           reset_to_zero=list(tuning.reset) or None, do_bench=bench_candidate)(kernel)
