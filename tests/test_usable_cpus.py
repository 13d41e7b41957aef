"""How many CPUs inat may use: the affinity mask, not the node."""
import os

from inat.runs import usable_cpus


def test_usable_cpus_follow_the_affinity_mask(monkeypatch):
    # Under SLURM --cpus-per-task or taskset the node's CPU count would start too many decoders.
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 3}, raising=False)
    monkeypatch.setattr(os, "cpu_count", lambda: 128)
    assert usable_cpus() == 2
