"""How many CPU threads a process uses (``torch.set_num_threads``).

On a small CPU shared with other work, more intra-op threads than free cores is disastrous
for small convolutions: OpenMP threads spin at every barrier while their partner is
descheduled. Measured on the 2-core development machine, training the digits model: one
step took 0.073 s with 2 threads on an idle machine, 0.125 s with 1 thread, but 0.6-2.4 s
with 2 threads while two other processes were running (1 thread: 0.12-0.27 s).

So the CPU default (``--threads`` not given) is :class:`ThreadTuner`: it times training
steps with the full share of cores (cores / local processes) and with one thread, uses the
faster, re-measures every few epochs, and switches at once when the one in use slows down to
more than twice the other's last time. A fixed ``--threads N`` turns tuning off (use it when
bit-for-bit reproducibility across runs matters: results may depend on the thread count).
"""
from __future__ import annotations

import os
from typing import Optional

import torch


def available_cores() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def cores_per_process(local_world_size: int = 1) -> int:
    return max(1, available_cores() // max(1, local_world_size))


def idle_aware_threads(local_world_size: int = 1) -> int:
    """A static choice for short jobs (evaluation): the process's share of cores, minus the
    cores the 1-minute load average says are busy (at least 1)."""
    share = cores_per_process(local_world_size)
    try:
        load = os.getloadavg()[0]
    except (AttributeError, OSError):  # pragma: no cover
        return share
    free = int(available_cores() - load + 0.5)
    return max(1, min(share, free))


class ThreadTuner:
    """Chooses between ``candidates`` thread counts by timing training steps (see module doc).

    Use: ``start_epoch(epoch)`` at each epoch start, ``before_step()`` before each step,
    ``after_step(seconds, samples)`` after it (``seconds`` of wall time).
    """

    def __init__(self, candidates, explore_every: int = 4, probe_steps: int = 2, switch_ratio: float = 2.0):
        cands = []
        for c in candidates:
            if int(c) >= 1 and int(c) not in cands:
                cands.append(int(c))
        self.candidates = cands or [1]
        self.explore_every = max(1, explore_every)
        self.probe_steps = probe_steps
        self.switch_ratio = switch_ratio
        self.per_sample: dict[int, float] = {}
        self.current = self.candidates[0]
        self._plan: list[int] = []
        self._fresh: set[int] = set()
        self._step = 0
        self.active = len(self.candidates) > 1
        torch.set_num_threads(self.current)

    def start_epoch(self, epoch: int) -> None:
        self._step = 0
        self._plan = []
        if self.active and (epoch % self.explore_every == 0 or len(self.per_sample) < len(self.candidates)):
            # step 0 of an epoch warms up (loader start, allocator); probe after it
            for c in self.candidates:
                self._plan += [c] * self.probe_steps
            self._fresh = set(self.candidates)

    def before_step(self) -> None:
        if not self.active:
            return
        if self._step >= 1 and self._plan:
            self._set(self._plan[0])

    def after_step(self, seconds: float, samples: int) -> None:
        if not self.active:
            return
        t = seconds / max(1, samples)
        step = self._step
        self._step += 1
        if step == 0:
            return
        if self._plan:
            c = self._plan.pop(0)
            # keep the best probe of this exploration round (less noise than the mean)
            self.per_sample[c] = t if c in self._fresh else min(self.per_sample[c], t)
            self._fresh.discard(c)
            if not self._plan:
                self._set(min(self.per_sample, key=self.per_sample.get))
            return
        c = self.current
        self.per_sample[c] = 0.7 * self.per_sample.get(c, t) + 0.3 * t
        others = [o for o in self.candidates if o != c and o in self.per_sample]
        if others:
            best = min(others, key=self.per_sample.get)
            if t > self.switch_ratio * self.per_sample[best] and self.per_sample[c] > self.switch_ratio * self.per_sample[best]:
                self._set(best)

    def _set(self, n: int) -> None:
        if n != self.current:
            self.current = n
            torch.set_num_threads(n)


def make_thread_policy(threads: Optional[int], device: torch.device, local_world_size: int = 1) -> ThreadTuner:
    """``--threads N``: fixed N. Otherwise on the CPU: tune between the process's share of
    cores and 1; on a GPU: the share of cores, fixed (the host only feeds the device)."""
    if threads is not None:
        return ThreadTuner([threads])
    share = cores_per_process(local_world_size)
    if device.type != "cpu":
        return ThreadTuner([share])
    return ThreadTuner([share, 1])
