"""`--threads auto` (backbone/threads.py): fewer threads while other processes hold cores, and
texts that never depend on the thread count."""

from __future__ import annotations

import pytest
import torch

from clpdecode.backbone import kernels, load_backbone, threads
from clpdecode.decoding import GenerationConfig, generate, make_policy

from conftest import random_drafter, save_tiny_model


class FakeMachine:
    """/proc as the governor reads it: 2 CPUs; `others` and `ours` cores busy per tick."""

    def __init__(self, monkeypatch):
        self.busy = self.total = self.own = 0
        self.now = 0.0
        monkeypatch.setattr(threads, "_machine_ticks", lambda: (self.busy, self.total))
        monkeypatch.setattr(threads, "_own_ticks", lambda: self.own)
        monkeypatch.setattr(threads.time, "monotonic", lambda: self.now)
        monkeypatch.setattr(threads.os, "sched_getaffinity", lambda pid: {0, 1}, raising=False)

    def run(self, others: float, ours: float, seconds: float = 1.0) -> None:
        ticks = 100 * seconds
        self.total += int(2 * ticks)
        self.busy += int((others + ours) * ticks)
        self.own += int(ours * ticks)
        self.now += seconds


def test_the_governor_gives_a_core_up_while_another_process_holds_one(monkeypatch):
    machine = FakeMachine(monkeypatch)
    gov = threads.ThreadGovernor()
    assert gov.threads == 2 and torch.get_num_threads() == 2
    machine.run(others=0.0, ours=2.0)
    assert gov.tick() == 2  # alone: both cores
    machine.run(others=1.0, ours=1.0)
    assert gov.tick() == 1 and torch.get_num_threads() == 1 and gov.others == pytest.approx(1.0)
    machine.run(others=1.0, ours=1.0)
    assert gov.tick() == 1  # still busy: stays
    machine.run(others=0.45, ours=1.0)
    assert gov.tick() == 1  # hysteresis: half a core busy is not a free core
    machine.run(others=0.05, ours=1.0)
    assert gov.tick() == 2 and torch.get_num_threads() == 2
    machine.now += 0.1
    assert gov.tick() == 2  # read at most every INTERVAL_S


def test_threads_flag(capsys):
    from clpdecode.cli import main

    for bad in ("0", "many", "-2"):
        assert main(["generate", "--prompt", "hi", "--threads", bad]) == 2
        assert "--threads" in capsys.readouterr().err


@pytest.mark.skipif(kernels.load(quiet=True) is None, reason="the C++ kernels could not be built here")
def test_texts_do_not_depend_on_the_thread_count(tmp_path):
    path = save_tiny_model(tmp_path, "llama", seed=2, hidden_size=128, heads=2, kv_heads=1)
    bb = load_backbone(str(path), numerics="q4")
    drafter = random_drafter(bb, k=3, design="chained", seed=2)
    before = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append([generate(bb, [5, 6, 7, 8], make_policy(m, bb, drafter), GenerationConfig(max_new_tokens=30))
                         .token_ids for m in ("ar", "verified")])
        assert outs[0] == outs[1] == outs[2] and outs[0][0] == outs[0][1]
    finally:
        torch.set_num_threads(before)
