"""The fuzz corpora (``fuzz/corpus/TARGET/``), replayed through their targets in
every test run: an input that once reached new coverage must still pass the
invariants (see ``fuzz/targets.py``); campaigns themselves are ``fuzz/run.py``."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

FUZZ = Path(__file__).resolve().parents[2] / "fuzz"
sys.path.insert(0, str(FUZZ))

import targets  # noqa: E402

CORPUS = sorted((FUZZ / "corpus").glob("*/*"))


def test_every_target_has_a_corpus():
    assert {path.parent.name for path in CORPUS} == set(targets.TARGETS)


@pytest.mark.parametrize("target", sorted(targets.TARGETS))
def test_the_corpus_replays_clean(target):
    inputs = [path for path in CORPUS if path.parent.name == target]
    for path in inputs:
        targets.run_one(target, path.read_bytes())  # raises, or trips an invariant, on a regression
    assert inputs
