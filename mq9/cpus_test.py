"""Usable CPUs from cgroup files written to a temp dir (v2, v1, nested, none) and from
the real affinity mask."""

from __future__ import annotations

import os

import pytest

from mq9 import cpus


def write(path, text):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


@pytest.fixture
def fake(tmp_path):
    root = tmp_path / "cgroup"
    root.mkdir()
    own = tmp_path / "self-cgroup"
    return root, own


def test_v2_quota_rounds_up(fake):
    root, own = fake
    write(own, "0::/kubepods/pod1/ctr\n")
    write(root / "kubepods/pod1/ctr/cpu.max", "150000 100000\n")  # 1.5 CPUs
    assert cpus.cgroup_quota(str(own), str(root)) == 1.5
    assert cpus.usable(str(own), str(root)) == min(2, len(os.sched_getaffinity(0)))


def test_v2_max_is_no_quota_and_an_ancestor_limit_applies(fake):
    root, own = fake
    write(own, "0::/a/b\n")
    write(root / "a/b/cpu.max", "max 100000\n")
    assert cpus.cgroup_quota(str(own), str(root)) is None
    write(root / "a/cpu.max", "50000 100000\n")  # half a CPU set on the parent
    assert cpus.cgroup_quota(str(own), str(root)) == 0.5
    assert cpus.usable(str(own), str(root)) == 1  # rounded up, never 0


def test_container_sees_its_cgroup_at_the_root(fake):
    root, own = fake
    write(own, "0::/\n")
    write(root / "cpu.max", "100000 100000\n")
    assert cpus.usable(str(own), str(root)) == 1


def test_v1_cfs_quota(fake):
    root, own = fake
    write(own, "4:memory:/docker/x\n3:cpu,cpuacct:/docker/x\n")
    write(root / "cpu,cpuacct/docker/x/cpu.cfs_quota_us", "200000\n")
    write(root / "cpu,cpuacct/docker/x/cpu.cfs_period_us", "100000\n")
    assert cpus.cgroup_quota(str(own), str(root)) == 2.0
    write(root / "cpu,cpuacct/docker/x/cpu.cfs_quota_us", "-1\n")
    assert cpus.cgroup_quota(str(own), str(root)) is None


def test_no_cgroup_files_means_affinity(fake, tmp_path):
    root, own = fake
    assert cpus.cgroup_quota(str(tmp_path / "absent"), str(root)) is None
    write(own, "0::/x\n")
    write(root / "x/cpu.max", "garbage\n")
    assert cpus.cgroup_quota(str(own), str(root)) is None
    assert cpus.usable(str(own), str(root)) == len(os.sched_getaffinity(0))


def test_affinity_limits_the_count():
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {min(before)})
        assert cpus.usable() == 1
    finally:
        os.sched_setaffinity(0, before)
