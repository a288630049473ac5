"""The per-study state machine and its leases (pipeline/state.py), on SQLite."""

from __future__ import annotations

import multiprocessing as mp
import os
import socket
import time
from pathlib import Path
from typing import Any

import pytest

from pipeline.state import Claim, LeaseLost, State, StateStore, new_owner, owner_dead

LEASE = 60.0


@pytest.fixture
def store(tmp_path: Path) -> StateStore:
    s = StateStore(tmp_path / "state.sqlite")
    yield s  # type: ignore[misc]
    s.close()


def test_a_study_goes_through_the_machine(store: StateStore) -> None:
    me = new_owner()
    assert store.claim("1.1", "fp", "lim", me, LEASE) is Claim.CLAIMED
    for st in (State.RETRIEVED, State.ANALYSED, State.WRITTEN, State.DELIVERED):
        store.advance("1.1", st, me)
        got = store.get("1.1")
        assert got is not None and got.state is st
    store.release("1.1", me)
    assert store.claim("1.1", "fp", "lim", new_owner(), LEASE) is Claim.DONE
    assert store.claim("1.1", "changed", "lim", new_owner(), LEASE) is Claim.CLAIMED
    assert store.counts() == {"discovered": 1}


@pytest.mark.parametrize(
    ("state", "reasons", "done"),
    [
        (State.NOT_ANALYSED, ("slice-too-thick:5.0mm",), True),
        (State.NOT_ANALYSED, ("incomplete-retrieval:198/200",), False),  # the archive's fault
        (State.FAILED, ("internal-error:ValueError",), False),
        (State.WRITTEN, (), True),  # the outbox delivers the rest
        (State.ANALYSED, (), False),  # interrupted: do it again
        (State.RETRIEVED, (), False),
    ],
)
def test_what_counts_as_done(
    store: StateStore, state: State, reasons: tuple[str, ...], done: bool
) -> None:
    me = new_owner()
    store.claim("1.1", "fp", "lim", me, LEASE)
    store.advance("1.1", state, me, reasons)
    store.release("1.1", me)
    assert (store.claim("1.1", "fp", "lim", new_owner(), LEASE) is Claim.DONE) is done


def test_a_limit_refusal_is_retried_only_when_the_limits_change(store: StateStore) -> None:
    me = new_owner()
    store.claim("1.1", "fp", "lim-a", me, LEASE)
    store.advance("1.1", State.NOT_ANALYSED, me, ("limit-exceeded:time",))
    store.release("1.1", me)
    assert store.claim("1.1", "fp", "lim-a", new_owner(), LEASE) is Claim.DONE
    assert store.claim("1.1", "fp", "lim-b", new_owner(), LEASE) is Claim.CLAIMED


def test_a_live_holder_keeps_its_study_and_a_lost_lease_refuses_transitions(
    store: StateStore,
) -> None:
    a, b = new_owner(), new_owner()  # both this (live) process
    assert store.claim("1.1", "fp", "lim", a, LEASE) is Claim.CLAIMED
    assert store.claim("1.1", "fp", "lim", b, LEASE) is Claim.BUSY
    # an expired lease passes on, even when its holder still lives
    store.claim("1.2", "fp", "lim", a, 0.01)
    time.sleep(0.05)
    assert store.claim("1.2", "fp", "lim", b, LEASE) is Claim.CLAIMED
    with pytest.raises(LeaseLost):
        store.advance("1.2", State.RETRIEVED, a)
    store.advance("1.2", State.RETRIEVED, b)


def _exit_at_once() -> None:
    os._exit(0)


def test_a_dead_holder_on_this_host_loses_its_lease_at_once(store: StateStore) -> None:
    p = mp.get_context("spawn").Process(target=_exit_at_once)
    p.start()
    p.join()
    dead = f"{socket.gethostname()}:{p.pid}:feedface"
    assert owner_dead(dead)
    assert not owner_dead(new_owner())
    assert not owner_dead(f"another-host:{p.pid}:feedface")  # only its lease can tell
    assert store.claim("1.1", "fp", "lim", dead, 3600) is Claim.CLAIMED
    assert store.claim("1.1", "fp", "lim", new_owner(), LEASE) is Claim.CLAIMED


def _claim_many(path: str, n: int, out: mp.Queue[list[str]], end: Any) -> None:
    s = StateStore(path)
    me = new_owner()
    uids = [f"1.{i}" for i in range(n)]
    out.put([u for u in uids if s.claim(u, "fp", "l", me, LEASE) is Claim.CLAIMED])
    end.wait(120)  # a holder that exits loses its leases at once: stay until all are done


def test_of_runs_that_claim_at_once_exactly_one_wins_each_study(tmp_path: Path) -> None:
    path = str(tmp_path / "state.sqlite")
    StateStore(path).close()
    ctx = mp.get_context("spawn")
    q: mp.Queue[list[str]] = ctx.Queue()
    end = ctx.Event()
    procs = [ctx.Process(target=_claim_many, args=(path, 200, q, end)) for _ in range(4)]
    for p in procs:
        p.start()
    won = [q.get(timeout=120) for _ in procs]
    end.set()
    for p in procs:
        p.join()
    claimed = [uid for w in won for uid in w]
    assert sorted(claimed) == sorted(f"1.{i}" for i in range(200))  # each once, none lost
