"""Callgrind instruction counts (harness.metrics.instructions): optional, deterministic, one clear line
when valgrind is missing. CI installs valgrind (.ci/run: apt-get install -y valgrind)."""

from __future__ import annotations

import shutil

import pytest
import torch

from harness.metrics.instructions import forward_instructions, valgrind_version
from search_spaces import build_supernet


def test_missing_valgrind_is_one_clear_line(monkeypatch, tmp_path):
    monkeypatch.setenv("PATH", str(tmp_path))  # an empty directory: no valgrind on the PATH
    assert valgrind_version() is None
    with pytest.raises(FileNotFoundError, match="needs valgrind on the PATH: install valgrind"):
        forward_instructions("pixel-base", "tiny", build_supernet("pixel-base", "tiny").space.smallest())


@pytest.mark.slow  # Callgrind runs the whole interpreter under valgrind: about 4 minutes on 2 cores
@pytest.mark.skipif(shutil.which("valgrind") is None, reason="valgrind is not installed")
def test_forward_instruction_count_repeats_exactly_enough_to_gate():
    net = build_supernet("pixel-base", "tiny")
    count = forward_instructions("pixel-base", "tiny", net.space.smallest(), batch=2, frames=4, repeats=2)
    a, b = count.repeats
    assert count.count > 10_000_000  # a UNet forward, not an empty statement
    assert abs(a - b) <= 0.005 * max(a, b)  # the bench gates at 0.5 %; two repeats differed by 0.02-0.15 %
    assert torch.is_grad_enabled()  # counting left this process's autograd as it found it
    assert (count.batch, count.frames, count.threads, count.subnet) == (2, 4, 1, net.space.smallest().key)
    assert count.valgrind_version.startswith("valgrind")
