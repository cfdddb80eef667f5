"""`--threads auto`: as many compute threads as the machine leaves us, revised as it runs.

A decode step is a few hundred short parallel regions (each kernel call splits its rows or
tiles over the threads and waits for all of them). When another process holds a core, a
thread of ours is descheduled and every region waits for it: on 2 cores with one busy
process, 2 threads decoded 3.7x slower than alone, and 1 thread barely slower (issue 27).
So the governor watches how much of the machine other processes use (/proc/stat against
this process's own CPU time, steal time counted as theirs) and runs on the cores they leave,
switching with some hysteresis. A kernel's result does not depend on the thread count (each
output is computed by one thread, in a fixed order), so neither does any text.
"""

from __future__ import annotations

import os
import time

import torch

# Others' share of the machine, in cores, at which a core is given up / taken back.
GIVE_UP_AT, TAKE_BACK_AT = 0.6, 0.3
INTERVAL_S = 0.5  # how often the share is read again


def _machine_ticks() -> tuple[int, int] | None:
    """(busy, total) CPU ticks of the whole machine since boot (steal counts as busy)."""
    try:
        with open("/proc/stat", encoding="ascii") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except (OSError, ValueError):
        return None
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)  # idle + iowait
    total = sum(fields[:8])  # user .. steal (guest time is already in user)
    return total - idle, total


def _own_ticks() -> int | None:
    try:
        with open("/proc/self/stat", encoding="ascii") as f:
            fields = f.read().rsplit(")", 1)[1].split()
        return int(fields[11]) + int(fields[12])  # utime + stime, every thread of this process
    except (OSError, ValueError, IndexError):
        return None


class ThreadGovernor:
    """Sets torch's thread count from the cores other processes leave (see the module docstring).

    Args:
        max_threads: the most threads to use (default: the CPUs this process may run on).
    """

    def __init__(self, max_threads: int | None = None):
        cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
        self.cpus = cpus
        self.max = max(1, min(max_threads or cpus, cpus))
        self.threads = self.max
        self.others = 0.0  # cores other processes used over the last interval
        self._last = self._sample()
        self._next = time.monotonic() + INTERVAL_S
        torch.set_num_threads(self.threads)

    def _sample(self):
        machine, own = _machine_ticks(), _own_ticks()
        return None if machine is None or own is None else (*machine, own)

    def tick(self) -> int:
        """Called between steps: every INTERVAL_S, re-read the machine and adjust. Returns the
        thread count in use."""
        now = time.monotonic()
        if now < self._next:
            return self.threads
        self._next = now + INTERVAL_S
        sample = self._sample()
        if sample is None or self._last is None:  # no /proc (not Linux): keep what we have
            return self.threads
        (busy0, total0, own0), (busy1, total1, own1) = self._last, sample
        self._last = sample
        if total1 <= total0:
            return self.threads
        share = ((busy1 - busy0) - (own1 - own0)) / (total1 - total0)  # of the whole machine
        self.others = max(0.0, share * self.cpus)
        want = self.threads
        free = self.cpus - self.threads  # cores we leave idle
        if self.threads > 1 and self.others > free + GIVE_UP_AT:  # they need one of ours
            want = self.threads - 1
        elif self.threads < self.max and self.others < free - 1 + TAKE_BACK_AT:  # one more core is idle
            want = self.threads + 1
        if want != self.threads:
            self.threads = want
            torch.set_num_threads(want)
        return self.threads


_governor: ThreadGovernor | None = None


def set_threads(threads: int | str | None) -> None:
    """torch's CPU threads: a count (fixed), "auto" (a ThreadGovernor that revises it between
    steps) or None (torch's default, fixed)."""
    global _governor
    _governor = None
    if threads == "auto":
        _governor = ThreadGovernor()
    elif threads is not None:
        torch.set_num_threads(threads)


def freeze() -> int:
    """Stop revising (a benchmark's methods must run on the same threads): keeps the count
    in use now. Returns it."""
    global _governor
    _governor = None
    return torch.get_num_threads()


def tick() -> None:
    """Between decode steps: lets `--threads auto` revise the thread count (cheap otherwise)."""
    if _governor is not None:
        _governor.tick()


def governor() -> ThreadGovernor | None:
    return _governor
