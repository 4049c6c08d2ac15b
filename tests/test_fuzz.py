"""Seeded fuzzing at CI size: every kind of user input, a few hundred cases each.

The cases come from ``tests/fuzzing.py``; ``benchmarks/fuzz.py`` runs thousands of them,
each in its own process under a memory cap and a timeout, and writes the table in
docs/reliability.md. Here they run in-process: a crash is any error that is not a
:class:`~analysis.errors.TokenScopeError` (or a wrong result), and there must be none.
"""

from __future__ import annotations

import collections
import os

import pytest

from tests.fuzzing import KINDS, Harness

CASES = int(os.environ.get("TOKENSCOPE_FUZZ_CASES", "200"))
SLOW_KINDS = {"checkpoint": 0.6}  # each builds a model: fewer cases


@pytest.fixture(scope="module")
def harness(tmp_path_factory) -> Harness:
    return Harness(seed=0, folder=tmp_path_factory.mktemp("fuzz"))


@pytest.mark.parametrize("kind", KINDS)
def test_no_input_crashes(harness, kind):
    count = int(CASES * SLOW_KINDS.get(kind, 1.0))
    outcomes = [harness.judge(kind, index) for index in range(count)]
    statuses = collections.Counter(outcome.status for outcome in outcomes)
    crashes = [f"case {o.index}: {o.detail}" for o in outcomes if o.status == "crash"]
    assert not crashes, "\n".join(crashes[:10])
    assert statuses["skipped"] == 0, [o.detail for o in outcomes if o.status == "skipped"][:3]
    # Both sides are exercised: some inputs are accepted, most broken ones refused.
    assert statuses["ok"] > 0 and statuses["clean"] > count // 4, statuses
    for outcome in outcomes:
        if outcome.status == "clean":
            assert "object at 0x" not in outcome.detail, outcome.detail
            assert "Traceback" not in outcome.detail, outcome.detail


def test_cases_are_reproducible(harness):
    again = Harness(seed=0, folder=harness.folder / "again")
    for kind in KINDS:
        for index in (0, 7, 123):
            first, second = harness.case(kind, index), again.case(kind, index)
            assert repr(first)[:2000] == repr(second)[:2000], (kind, index)


def test_the_fuzzers_find_what_was_broken(harness):
    """Known crashes of the old code, rebuilt by hand: each is now a clean refusal."""
    from tests.fuzzing import png_claiming

    cases = [
        ("schedule_json", '{"parts": [{"method": "tome", "params": {"r": [[8]]}}]}'),
        ("schedule_json", "[" * 5000),
        ("schedule_text", "tome@0-99999999"),
        ("image", png_claiming(1, 30000)),
        ("image", png_claiming(15000, 15000)),
        ("image", b""),
    ]
    for kind, case in cases:
        with pytest.raises(Exception) as error:
            harness.check(kind, case)
        from analysis.errors import TokenScopeError

        assert isinstance(error.value, TokenScopeError), (kind, repr(error.value))
