"""Shared test helper: the quick tier of a parametrized test (docs/development.md).

A test run over every orientation (or pattern) keeps one of them in the quick tier
(``scripts/test.sh --quick``); the others are marked ``heavy`` and run in the full suite."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import pytest


def quick_one(values: Iterable[Any], quick: Any) -> list[Any]:
    """``values`` for a one-name ``pytest.mark.parametrize`` or a fixture's ``params``: those
    equal to ``quick`` (or, where ``quick`` is a function, those it accepts) in the quick
    tier, the others marked heavy."""
    keep = quick if callable(quick) else (lambda v: v == quick)
    return [v if keep(v) else pytest.param(v, marks=pytest.mark.heavy) for v in values]
