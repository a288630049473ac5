"""``ctscreen run --scheduler``: the same batch on a Dask distributed cluster (a local one
with two worker processes); one worker is killed mid-batch and the batch still finishes
with nothing lost or duplicated, equal to a run in one process."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path

import pytest
from batch_kit import check_final_equal, finish, prepare, snapshot, start, states, write_batch

pytestmark = pytest.mark.heavy  # outside the quick tier (docs/development.md)

distributed = pytest.importorskip("distributed")


@pytest.fixture(scope="module")
def source(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_batch(tmp_path_factory.mktemp("dask-source") / "archive", n=5)


def test_a_worker_killed_mid_batch_loses_nothing(source: Path, tmp_path: Path) -> None:
    ref_archive, ref_config = prepare(source, tmp_path / "reference")
    finish(start(ref_archive, ref_config, "--workers", "0"))
    reference = snapshot(ref_archive)

    archive, config = prepare(source, tmp_path / "cluster")
    with distributed.LocalCluster(
        n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None,
    ) as cluster, distributed.Client(cluster) as client:
        run = start(archive, config, "--scheduler", cluster.scheduler_address)
        deadline = time.monotonic() + 180
        while time.monotonic() < deadline:  # until a worker is inside a study
            if any(s == "retrieved" for s in states(archive).values()):
                break
            time.sleep(0.05)
        else:
            pytest.fail("no study reached 'retrieved' on the cluster")
        pids = client.run(os.getpid)
        victim = sorted(pids.values())[0]
        os.kill(victim, signal.SIGKILL)
        summary = finish(run, timeout=600)
        assert summary["studies_found"] == 5
        assert summary["screened"] == 5
        assert summary["by_status"] == {"analysed": 4, "not-analysed": 1}
        # the nanny started a fresh worker in place of the killed one
        client.wait_for_workers(2, timeout=60)
        assert victim not in client.run(os.getpid).values()
    check_final_equal(archive, reference, n_studies=5)
