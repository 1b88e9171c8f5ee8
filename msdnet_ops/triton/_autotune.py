"""Autotuning of the GPU GEMM kernels, in one place: the config tables, their pruning by problem
size, and the autotuned wrappers.

Tables are per kernel, per operand width and per kernel size, because the register budget is:
a float32 (TF32) operand tile takes twice the registers of a bfloat16/float16 one, and a 3x3
tap loop keeps more address math live than a 1x1 GEMM. Every entry compiles without spilling
on sm_80 and sm_90 (``benches/gpu_compile.py`` checks each one the models launch, in CI).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass

import torch
import triton

from . import _runtime as rt

# (kernel, operand class, kernel size) -> [(block sizes..., num_warps, num_stages)]
# block sizes: conv_fwd/conv_dgrad (BLOCK_M, BLOCK_N, BLOCK_K); conv_wgrad (BLOCK_CO, BLOCK_CI, BLOCK_P)
CONFIGS = {
    ("conv_fwd", "16bit", 1): [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 64, 32, 4, 4),
                               (128, 32, 32, 4, 4), (64, 32, 64, 4, 3)],
    ("conv_fwd", "16bit", 3): [(128, 64, 32, 8, 3), (64, 64, 32, 4, 3), (128, 32, 32, 4, 3),
                               (64, 32, 32, 4, 3)],
    ("conv_fwd", "tf32", 1): [(128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 64, 32, 4, 3),
                              (128, 32, 32, 4, 3), (64, 32, 32, 4, 3)],
    ("conv_fwd", "tf32", 3): [(128, 64, 32, 8, 3), (64, 64, 32, 4, 3), (128, 32, 16, 4, 3),
                              (64, 32, 32, 4, 3)],
    ("conv_dgrad", "16bit", 1): [(128, 128, 32, 8, 3), (128, 64, 32, 4, 4), (64, 64, 32, 4, 4),
                                 (128, 32, 32, 4, 4), (64, 64, 64, 4, 3)],
    ("conv_dgrad", "16bit", 3): [(128, 64, 32, 8, 3), (64, 64, 32, 4, 3), (128, 32, 32, 4, 3),
                                 (64, 32, 32, 4, 3)],
    ("conv_dgrad", "tf32", 1): [(128, 128, 32, 8, 3), (128, 64, 32, 4, 3), (64, 64, 32, 4, 3),
                                (128, 32, 32, 4, 3), (64, 64, 32, 4, 3)],
    ("conv_dgrad", "tf32", 3): [(128, 64, 32, 8, 3), (64, 64, 32, 4, 3), (128, 32, 16, 4, 3),
                                (64, 32, 32, 4, 3)],
    ("conv_wgrad", "16bit", 1): [(64, 64, 64, 4, 3), (128, 64, 32, 4, 4), (32, 64, 64, 4, 4),
                                 (64, 128, 32, 8, 3)],
    ("conv_wgrad", "16bit", 3): [(64, 64, 64, 4, 3), (128, 64, 32, 4, 4), (32, 64, 64, 4, 4),
                                 (64, 128, 32, 8, 3)],
    ("conv_wgrad", "tf32", 1): [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (32, 64, 32, 4, 3),
                                (64, 128, 32, 8, 3)],
    ("conv_wgrad", "tf32", 3): [(64, 64, 32, 4, 3), (128, 64, 32, 8, 3), (32, 64, 32, 4, 3),
                                (64, 128, 32, 8, 3)],
}

BLOCK_NAMES = {"conv_fwd": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
               "conv_dgrad": ("BLOCK_M", "BLOCK_N", "BLOCK_K"),
               "conv_wgrad": ("BLOCK_CO", "BLOCK_CI", "BLOCK_P")}


@dataclass(frozen=True)
class Tuning:
    """How one launch of a GEMM kernel is autotuned."""
    table: str                  # "conv_fwd" | "conv_dgrad" | "conv_wgrad"
    operands: str               # "16bit" | "tf32" (float32 features)
    ksize: int
    width: tuple                # (size argument, block): column tiles much wider than the size are dropped
    key: tuple                  # arguments the best config depends on
    restore: tuple = ()         # outputs accumulated into: restored between tuning runs
    reset: tuple = ()           # outputs atomically accumulated from zero: zeroed between runs


def operand_class(dtype: torch.dtype) -> str:
    return "tf32" if dtype == torch.float32 else "16bit"


def configs(tuning: Tuning) -> list:
    """The table of ``tuning``: dicts of block sizes, num_warps and num_stages."""
    names = BLOCK_NAMES[tuning.table]
    return [dict(zip(names, row[:3]), num_warps=row[3], num_stages=row[4])
            for row in CONFIGS[(tuning.table, tuning.operands, tuning.ksize)]]


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


@functools.lru_cache(maxsize=None)
def autotuned(kernel, tuning: Tuning):
    """``triton.autotune`` of ``kernel`` over ``tuning``'s table, built once per (kernel, tuning)."""
    def as_config(d):
        blocks = {k: v for k, v in d.items() if k not in ("num_warps", "num_stages")}
        return triton.Config(blocks, num_warps=d["num_warps"], num_stages=d["num_stages"])

    def prune(configs, named_args, **kwargs):
        kept = [_as_dict(c) for c in candidates(tuning, named_args)]
        return [c for c in configs if _as_dict(c) in kept]

    return triton.autotune(configs=[as_config(c) for c in configs(tuning)], key=list(tuning.key),
                           prune_configs_by={"early_config_prune": prune},
                           restore_value=list(tuning.restore) or None,
                           reset_to_zero=list(tuning.reset) or None)(kernel)
