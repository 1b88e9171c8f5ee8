"""The MSDNet grid as a static program of *cells* over feature buffers.

A cell is one unit of work that appends channels to one buffer: the stem at one scale, one dense
layer at one scale (its strided and normal paths), one transition at one scale, or one
classifier. Buffers are keyed by ``(scale, generation)``: a scale starts a new generation after
each transition. Since buffers only grow, a cell reads fixed-width *prefixes*, so cells can run
in any order that respects their dependencies: this is what lets an exit run only the cells it
depends on (lazy evaluation) and leave the others for a later exit.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .msdnet_modules import MSDNetLayer, MSDNetStem, MSDNetTransition

BufferKey = tuple  # (scale, generation)


@dataclass
class Cell:
    index: int
    kind: str                  # 'stem', 'path', 'transition', 'classifier'
    name: str                  # qualified module name (MAC accounting)
    module: nn.Module
    scale: int
    reads: tuple               # ((BufferKey, width), ...): the strided path's read first
    writes: BufferKey | None
    deps: set = field(default_factory=set)


@dataclass
class MSDNetPlan:
    cells: list
    capacity: dict             # BufferKey -> channels
    exit_cells: list           # classifier cell index per exit
    last_reader: dict          # BufferKey -> index of the last cell reading it
    live: set                  # indices of the cells some exit needs (prune='max' leaves others)

    def closure(self, target: int, done: set) -> list:
        """Cells not in ``done`` that ``target`` needs (itself included), in program order."""
        need, stack = set(), [target]
        while stack:
            c = stack.pop()
            if c in done or c in need:
                continue
            need.add(c)
            stack.extend(self.cells[c].deps)
        return sorted(need)


def build_plan(model) -> MSDNetPlan:
    S = model.n_scales
    gen = [0] * S
    filled: dict = {}
    writers: dict = {}          # BufferKey -> [(stop, cell index)]
    cells: list = []
    exit_cells: list = []

    def key(s):
        return (s, gen[s])

    def add(kind, name, module, scale, reads, writes, new_channels: int):
        index = len(cells)
        cell = Cell(index, kind, name, module, scale, tuple(reads), writes)
        for buf, width in cell.reads:
            # the writer that completed channel width-1 (it depends on all earlier writers)
            cell.deps.add(next(i for stop, i in writers[buf] if stop >= width))
        if writes is not None:
            if writers.get(writes):
                cell.deps.add(writers[writes][-1][1])
            filled[writes] = filled.get(writes, 0) + new_channels
            writers.setdefault(writes, []).append((filled[writes], index))
        cells.append(cell)

    for b, block in enumerate(model.blocks):
        for i, (kind, m) in enumerate(zip(block.kinds, block)):
            prefix = f"blocks.{b}.{i}"
            if isinstance(m, MSDNetStem):
                for s, unit in enumerate(m.layers):
                    reads = [] if s == 0 else [(key(s - 1), m.out_channels[s - 1])]
                    add("stem", f"{prefix}.layers.{s}", unit, s, reads, key(s), m.out_channels[s])
            elif isinstance(m, MSDNetLayer):
                for spec, unit in zip(m.specs, m.layers):
                    s = spec.scale
                    reads = [(key(s), spec.in_channels)]
                    if spec.two_path:
                        reads.insert(0, (key(s - 1), spec.finer_channels))
                    add("path", f"{prefix}.layers.{spec.position}", unit, s, reads, key(s),
                        spec.out_channels - spec.in_channels)
            elif isinstance(m, MSDNetTransition):
                for j, s in enumerate(m.scales):
                    src = key(s)
                    gen[s] += 1
                    add("transition", f"{prefix}.m.{j}", m.m[j], s, [(src, m.in_channels[j])],
                        key(s), m.out_channels[j])
        cls = model.classifier[b]
        add("classifier", f"classifier.{b}", cls, S - 1, [(key(S - 1), cls.in_channels)], None, 0)
        exit_cells.append(len(cells) - 1)

    last_reader = {}
    for cell in cells:
        for buf, _ in cell.reads:
            last_reader[buf] = cell.index
    plan = MSDNetPlan(cells, dict(filled), exit_cells, last_reader, set())
    plan.live = set().union(*(plan.closure(e, set()) for e in exit_cells))  # others never run
    return plan
