"""Replica placement: CPUs capped by the cgroup quota, NeuronCores from the environment,
neuron-ls or /dev + sysfs. Fake cgroup, sysfs and /dev trees; a fake neuron-ls on PATH."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import re
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from batchjob.cores import Host, Placement, cgroup_cpu_quota, plan_placements
from batchjob.errors import UsageError
from batchjob.neuron_devices import format_core_list, parse_core_list
from batchjob.replicas import ReplicaPool
from tests.replica_fakes import Toy, all_ready

LOGGER = "batchjob.replicas"
REAL_CPUS = sorted(os.sched_getaffinity(0))


@pytest.fixture
def host(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Host:
    """An empty machine: no cgroup, no Neuron devices, no neuron-ls; 64 CPUs of affinity."""
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: set(range(64)))
    monkeypatch.delenv("NEURON_RT_VISIBLE_CORES", raising=False)
    monkeypatch.delenv("NEURON_LOGICAL_NC_CONFIG", raising=False)
    (tmp_path / "bin").mkdir()
    monkeypatch.setenv("PATH", str(tmp_path / "bin"))  # no real neuron-ls can answer
    return Host(
        cgroup_root=tmp_path / "cgroup",
        proc_self_cgroup=tmp_path / "proc-self-cgroup",
        neuron_sysfs=tmp_path / "sys-class-neuron_device",
        dev=tmp_path / "dev",
        neuron_bin=tmp_path / "opt-aws-neuron-bin",
    )


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def cgroup_v2(host: Host, self_path: str, cpu_max: dict[str, str]) -> None:
    """A unified hierarchy: cpu.max per cgroup directory ("" is the root, which has none)."""
    write(host.proc_self_cgroup, f"0::{self_path}\n")
    write(host.cgroup_root / "cgroup.controllers", "cpuset cpu io memory pids\n")
    (host.cgroup_root / self_path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for directory, value in cpu_max.items():
        write(host.cgroup_root / directory / "cpu.max", f"{value}\n")


def cgroup_v1(
    host: Host, self_path: str, quotas: dict[str, int], controllers: str = "cpu,cpuacct"
) -> None:
    """A v1 cpu hierarchy mounted at <root>/<controllers>: cfs quota per cgroup directory."""
    write(
        host.proc_self_cgroup,
        f"12:memory:{self_path}\n11:{controllers}:{self_path}\n1:name=systemd:{self_path}\n",
    )
    mount = host.cgroup_root / controllers
    (mount / self_path.lstrip("/")).mkdir(parents=True, exist_ok=True)
    for directory, quota in quotas.items():
        write(mount / directory / "cpu.cfs_quota_us", f"{quota}\n")
        write(mount / directory / "cpu.cfs_period_us", "100000\n")


def messages(caplog: pytest.LogCaptureFixture, level: int = logging.INFO) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER and r.levelno == level]


# --- CPU ----------------------------------------------------------------------------------


def test_cgroup_v2_quota_caps_the_default(host: Host, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    cgroup_v2(host, "/kubepods/pod1/ctr", {"kubepods/pod1/ctr": "400000 100000"})
    assert plan_placements(None, 1, "cpu", host=host) == [Placement(i, (i,)) for i in range(4)]
    assert messages(caplog) == [
        "4 replicas of 1 core: cgroup cpu.max quota 4.0 CPUs (64 in the affinity set)"
    ]


def test_cgroup_v2_without_quota_uses_the_affinity_set(
    host: Host, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {8, 9, 10})
    cgroup_v2(host, "/user.slice/session-1.scope", {"user.slice": "max 100000"})
    assert plan_placements(None, 1, "cpu", host=host) == [
        Placement(0, (8,)),
        Placement(1, (9,)),
        Placement(2, (10,)),
    ]
    assert messages(caplog) == [
        "3 replicas of 1 core: 3 CPUs in the affinity set, no cgroup CPU quota"
    ]


def test_cgroup_v2_a_tighter_parent_wins(host: Host) -> None:
    cgroup_v2(
        host,
        "/kubepods/burstable/pod1/ctr",
        {
            "kubepods": "6400000 100000",
            "kubepods/burstable/pod1": "200000 100000",  # the pod's limit
            "kubepods/burstable/pod1/ctr": "max 100000",
        },
    )
    quota = cgroup_cpu_quota(host)
    assert quota is not None
    assert (quota.cpus, quota.file) == (2.0, "cpu.max")
    assert quota.cgroup == host.cgroup_root / "kubepods/burstable/pod1"
    assert len(plan_placements(None, 1, "cpu", host=host)) == 2


def test_cgroup_v2_a_tighter_child_wins_and_fractions_round_down(host: Host) -> None:
    cgroup_v2(host, "/a/b", {"a": "800000 100000", "a/b": "250000 100000"})
    assert len(plan_placements(None, 1, "cpu", host=host)) == 2  # 2.5 CPUs → 2


def test_a_quota_under_one_cpu_still_gets_one_replica(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    cgroup_v2(host, "/job", {"job": "50000 100000"})
    assert plan_placements(None, 1, "cpu", host=host) == [Placement(0, (0,))]
    assert messages(caplog) == [
        "1 replica of 1 core: cgroup cpu.max quota 0.5 CPUs (64 in the affinity set)"
    ]


def test_cgroup_v2_in_a_cgroup_namespace_reads_the_mount_itself(host: Host) -> None:
    # /proc/self/cgroup names a host path that doesn't exist under the container's mount.
    cgroup_v2(host, "/", {"": "300000 100000"})
    write(host.proc_self_cgroup, "0::/kubepods/pod1/ctr\n")
    assert len(plan_placements(None, 1, "cpu", host=host)) == 3


def test_a_quota_looser_than_the_affinity_set_changes_nothing(
    host: Host, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {0, 1})
    cgroup_v2(host, "/job", {"job": "1600000 100000"})
    assert len(plan_placements(None, 1, "cpu", host=host)) == 2
    assert messages(caplog) == [
        "2 replicas of 1 core: 2 CPUs in the affinity set (cgroup cpu.max quota 16.0 CPUs)"
    ]


def test_cgroup_v1_cfs_quota(host: Host, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    cgroup_v1(host, "/docker/abc", {"": -1, "docker": -1, "docker/abc": 300000})
    assert len(plan_placements(None, 1, "cpu", host=host)) == 3
    assert messages(caplog) == [
        "3 replicas of 1 core: cgroup cpu.cfs_quota_us quota 3.0 CPUs (64 in the affinity set)"
    ]


def test_cgroup_v1_without_quota(host: Host) -> None:
    cgroup_v1(host, "/docker/abc", {"": -1, "docker": -1, "docker/abc": -1})
    assert cgroup_cpu_quota(host) is None
    assert len(plan_placements(None, 1, "cpu", host=host)) == 64


def test_cgroup_v1_a_tighter_parent_wins(host: Host) -> None:
    cgroup_v1(host, "/kubepods/pod1/ctr", {"kubepods/pod1": 150000, "kubepods/pod1/ctr": 400000})
    assert len(plan_placements(None, 1, "cpu", host=host)) == 1  # 1.5 CPUs → 1


def test_cgroup_v1_cpu_alone_and_hybrid_with_a_unified_tree(host: Host) -> None:
    # As on many hosts: cpu mounted alone at /sys/fs/cgroup/cpu, and a v2 tree without cpu.
    cgroup_v1(host, "/", {"": 200000}, controllers="cpu")
    write(host.proc_self_cgroup, "2:cpuacct:/\n1:cpu:/\n0::/\n")
    write(host.cgroup_root / "cgroup.controllers", "")
    quota = cgroup_cpu_quota(host)
    assert quota is not None
    assert (quota.cpus, quota.file) == (2.0, "cpu.cfs_quota_us")


def test_no_cgroup_information_means_no_quota(host: Host) -> None:
    assert cgroup_cpu_quota(host) is None  # no /proc/self/cgroup at all
    write(host.proc_self_cgroup, "0::/job\n")  # v2 named, but nothing mounted
    assert cgroup_cpu_quota(host) is None
    assert len(plan_placements(None, 1, "cpu", host=host)) == 64


def test_cores_per_replica_divides_the_budget(host: Host) -> None:
    cgroup_v2(host, "/job", {"job": "400000 100000"})
    assert plan_placements(None, 2, "cpu", host=host) == [
        Placement(0, (0, 1)),
        Placement(1, (2, 3)),
    ]
    assert plan_placements(None, 8, "cpu", host=host) == [Placement(0, tuple(range(8)))]


def test_plan_placements_cpu(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda _pid: {3, 1, 2, 0})
    assert plan_placements(None, 1, "cpu", host=host) == [Placement(i, (i,)) for i in range(4)]
    assert plan_placements(None, 2, "cpu", host=host) == [
        Placement(0, (0, 1)),
        Placement(1, (2, 3)),
    ]
    assert plan_placements(None, 8, "cpu", host=host) == [Placement(0, (0, 1, 2, 3))]
    assert plan_placements(3, 2, "cpu", host=host) == [
        Placement(0, (0, 1)),
        Placement(1, (2, 3)),
        Placement(2, (0, 1)),  # more replicas than cores wrap around: shared cores
    ]


def test_explicit_replicas_past_the_quota_warn_on_cpu(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    cgroup_v2(host, "/job", {"job": "200000 100000"})
    assert plan_placements(3, 1, "cpu", host=host) == [Placement(i, (i,)) for i in range(3)]
    assert messages(caplog) == ["3 replicas of 1 core: --replicas 3"]
    assert messages(caplog, logging.WARNING) == [
        "--replicas 3 × --cores-per-replica 1 wants 3 CPUs, more than the 2 this process may "
        "use, so threads share CPUs; found: cgroup cpu.max quota 2.0 CPUs (64 in the affinity "
        "set)"
    ]


def test_more_cores_per_replica_than_the_quota_warn_on_cpu(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    cgroup_v2(host, "/job", {"job": "400000 100000"})
    assert plan_placements(None, 4, "cpu", host=host) == [Placement(0, (0, 1, 2, 3))]
    assert messages(caplog, logging.WARNING) == []
    assert plan_placements(None, 6, "cpu", host=host) == [Placement(0, tuple(range(6)))]
    assert messages(caplog, logging.WARNING) == [
        "--cores-per-replica 6 wants 6 CPUs, more than the 4 this process may use, so threads "
        "share CPUs; found: cgroup cpu.max quota 4.0 CPUs (64 in the affinity set)"
    ]


# --- Neuron: NEURON_RT_VISIBLE_CORES ------------------------------------------------------


@pytest.mark.parametrize(
    ("visible", "cores_per_replica", "expected"),
    [
        ("3", 1, ["3"]),
        ("0-3", 1, ["0", "1", "2", "3"]),
        ("0,2-3", 1, ["0", "2", "3"]),
        ("4-7", 2, ["4-5", "6-7"]),
        (" 5, 4 ", 2, ["4-5"]),
        ("0,2-3", 2, ["0,2"]),  # core 3 left idle
    ],
)
def test_visible_cores_from_the_environment(
    host: Host,
    monkeypatch: pytest.MonkeyPatch,
    visible: str,
    cores_per_replica: int,
    expected: list[str],
) -> None:
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", visible)
    placements = plan_placements(None, cores_per_replica, "neuron", host=host)
    assert [p.neuron_cores for p in placements] == expected
    assert [p.index for p in placements] == list(range(len(expected)))
    assert all(p.cpus == tuple(range(64)) for p in placements)


def test_the_log_line_names_the_environment_and_idle_cores(
    host: Host, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "0-4")
    assert len(plan_placements(None, 2, "neuron", host=host)) == 2
    assert messages(caplog) == [
        "2 replicas of 2 NeuronCores: NEURON_RT_VISIBLE_CORES=0-4; 1 core left idle"
    ]


@pytest.mark.parametrize(
    ("visible", "message"),
    [
        ("a", r"NEURON_RT_VISIBLE_CORES must be a core \(3\), a range \(0-3\) .*got 'a'"),
        ("1,,2", r"NEURON_RT_VISIBLE_CORES must be a core .*got '1,,2'"),
        ("-1", r"NEURON_RT_VISIBLE_CORES must be a core .*got '-1'"),
        ("3-1", r"NEURON_RT_VISIBLE_CORES: the range '3-1' ends before it starts"),
    ],
)
def test_a_bad_visible_cores_value_is_a_usage_error(
    host: Host, monkeypatch: pytest.MonkeyPatch, visible: str, message: str
) -> None:
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", visible)
    with pytest.raises(UsageError, match=message):
        plan_placements(None, 1, "neuron", host=host)


def test_explicit_replicas_past_the_visible_cores_fail_on_neuron(
    host: Host, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "0-1")
    with pytest.raises(
        UsageError,
        match=r"^--replicas 3 × --cores-per-replica 1 needs 3 NeuronCores but only 2 are "
        r"visible \(NEURON_RT_VISIBLE_CORES=0-1\); a NeuronCore can't be shared$",
    ):
        plan_placements(3, 1, "neuron", host=host)
    with pytest.raises(UsageError, match=r"--cores-per-replica 4 needs 4 NeuronCores but only 2"):
        plan_placements(None, 4, "neuron", host=host)
    assert plan_placements(1, 2, "neuron", host=host) == [Placement(0, tuple(range(64)), "0-1")]
    assert messages(caplog) == ["1 replica of 2 NeuronCores: --replicas 1"]


# --- Neuron: neuron-ls --------------------------------------------------------------------

# `neuron-ls --json-output` as it prints on a trn1.2xlarge (one device, two NeuronCores).
TRN1_2XLARGE = """[
    {
        "neuron_device": 0,
        "bdf": "0000:00:1e.0",
        "cpu_affinity": "0-7",
        "numa_node": "-1",
        "connected_to": null,
        "nc_count": 2,
        "memory_size": 34359738368,
        "neuroncore_ids": [
            0,
            1
        ],
        "neuron_processes": []
    }
]"""


def inf2_devices(count: int, with_ids: bool = True) -> str:
    """The same shape for an Inf2 with `count` devices of two cores each."""
    devices: list[dict[str, Any]] = []
    for d in range(count):
        device: dict[str, Any] = {
            "neuron_device": d,
            "bdf": f"0000:{d + 16:02x}:00.0",
            "cpu_affinity": "0-95",
            "numa_node": "0",
            "connected_to": [(d - 1) % count, (d + 1) % count],
            "nc_count": 2,
            "memory_size": 34359738368,
            "neuron_processes": [],
        }
        if with_ids:
            device["neuroncore_ids"] = [2 * d, 2 * d + 1]
        devices.append(device)
    return json.dumps(devices, indent=4)


def fake_neuron_ls(directory: Path, stdout: str, exit_code: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    script = directory / "neuron-ls"
    script.write_text(
        f"#!{sys.executable}\n"
        "import sys\n"
        "if sys.argv[1:] != ['--json-output']:\n"
        "    sys.exit(f'unexpected arguments {sys.argv[1:]}')\n"
        f"sys.stdout.write({stdout!r})\n"
        f"sys.stderr.write('neuron-ls: no Neuron driver' if {exit_code} else '')\n"
        f"sys.exit({exit_code})\n"
    )
    script.chmod(0o755)
    return script


def test_neuron_ls_on_path(host: Host, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake_neuron_ls(tmp_path / "bin", TRN1_2XLARGE)
    placements = plan_placements(None, 1, "neuron", host=host)
    assert [p.neuron_cores for p in placements] == ["0", "1"]
    assert messages(caplog) == ["2 replicas of 1 NeuronCore: neuron-ls (2 cores on 1 device)"]


def test_neuron_ls_in_the_sdk_directory_and_core_ids(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake_neuron_ls(host.neuron_bin, inf2_devices(6))  # not on PATH: /opt/aws/neuron/bin
    placements = plan_placements(None, 2, "neuron", host=host)
    assert [p.neuron_cores for p in placements] == ["0-1", "2-3", "4-5", "6-7", "8-9", "10-11"]
    assert messages(caplog) == ["6 replicas of 2 NeuronCores: neuron-ls (12 cores on 6 devices)"]


def test_neuron_ls_without_core_ids_numbers_cores_in_device_order(
    host: Host, tmp_path: Path
) -> None:
    fake_neuron_ls(tmp_path / "bin", inf2_devices(2, with_ids=False))
    assert [p.neuron_cores for p in plan_placements(None, 1, "neuron", host=host)] == [
        "0",
        "1",
        "2",
        "3",
    ]


def test_the_environment_wins_over_neuron_ls(
    host: Host, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_neuron_ls(tmp_path / "bin", inf2_devices(6))
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "6,7")
    assert [p.neuron_cores for p in plan_placements(None, 1, "neuron", host=host)] == ["6", "7"]


@pytest.mark.parametrize(
    ("stdout", "exit_code", "warning"),
    [
        ("", 1, r"exited 1 \(neuron-ls: no Neuron driver\); looking for devices in /dev"),
        ("not json", 0, r"--json-output: Expecting value.*; looking for devices in /dev"),
        ('{"neuron_devices": []}', 0, r"expected a JSON list of devices, got dict"),
        ('[{"neuron_device": 0}]', 0, r"device 0 has no nc_count"),
    ],
)
def test_neuron_ls_that_fails_falls_back_to_dev(
    host: Host,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    stdout: str,
    exit_code: int,
    warning: str,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    fake_neuron_ls(tmp_path / "bin", stdout, exit_code)
    inf2_sysfs(host, devices=1)
    assert [p.neuron_cores for p in plan_placements(None, 1, "neuron", host=host)] == ["0", "1"]
    (logged,) = messages(caplog, logging.WARNING)
    assert logged.startswith(str(tmp_path / "bin" / "neuron-ls"))
    assert re.search(warning, logged), logged


# --- Neuron: /dev and sysfs ---------------------------------------------------------------


def inf2_sysfs(host: Host, devices: int, dev: list[int] | None = None) -> None:
    """Devices in sysfs as a non-root process sees them (core_count is root-only), and the
    ones in `dev` (default: all) under /dev."""
    for d in range(devices):
        base = host.neuron_sysfs / f"neuron{d}"
        write(base / "info" / "architecture" / "device_name", "Inferentia2\n")
        write(base / "info" / "architecture" / "instance_type", "Inf2\n")
        for c in range(2):
            (base / f"neuron_core{c}" / "stats").mkdir(parents=True)
    for d in range(devices) if dev is None else dev:
        write(host.dev / f"neuron{d}", "")


def test_devices_in_dev_with_core_counts_from_sysfs(
    host: Host, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    inf2_sysfs(host, devices=2)
    write(host.dev / "neuron_unrelated", "")
    assert [p.neuron_cores for p in plan_placements(None, 1, "neuron", host=host)] == [
        "0",
        "1",
        "2",
        "3",
    ]
    assert messages(caplog) == [
        f"4 replicas of 1 NeuronCore: {host.dev}/neuron* (4 cores on 2 devices; "
        "sysfs neuron_core* directories)"
    ]


def test_a_container_sees_only_its_devices_in_dev(host: Host) -> None:
    inf2_sysfs(host, devices=12, dev=[3])  # sysfs shows the host's twelve
    assert [p.neuron_cores for p in plan_placements(None, 1, "neuron", host=host)] == ["0", "1"]


@pytest.mark.parametrize(
    ("files", "cores", "source"),
    [
        ({"core_count": "4"}, 4, "sysfs core_count"),
        ({"info/architecture/device_name": "Inferentia"}, 4, "Inferentia devices"),
        ({"info/architecture/instance_type": "Trn1"}, 2, "Trn1 devices"),
        (
            {"info/architecture/device_name": "Trainium2", "core_count": "8"},
            4,
            "sysfs core_count, 2 physical per logical core",
        ),
    ],
)
def test_core_count_per_device_from_sysfs(
    host: Host,
    caplog: pytest.LogCaptureFixture,
    files: dict[str, str],
    cores: int,
    source: str,
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    for name, text in files.items():
        write(host.neuron_sysfs / "neuron0" / name, text + "\n")
    write(host.dev / "neuron0", "")
    assert len(plan_placements(None, 1, "neuron", host=host)) == cores
    assert messages(caplog) == [
        f"{cores} replicas of 1 NeuronCore: {host.dev}/neuron* ({cores} cores on 1 device; "
        f"{source})"
    ]


def test_trainium2_logical_core_config(host: Host, monkeypatch: pytest.MonkeyPatch) -> None:
    base = host.neuron_sysfs / "neuron0"
    write(base / "info" / "architecture" / "device_name", "Trainium2\n")
    for c in range(8):
        (base / f"neuron_core{c}").mkdir(parents=True)
    write(host.dev / "neuron0", "")
    assert len(plan_placements(None, 1, "neuron", host=host)) == 4
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "1")
    assert len(plan_placements(None, 1, "neuron", host=host)) == 8
    monkeypatch.setenv("NEURON_LOGICAL_NC_CONFIG", "4")
    with pytest.raises(UsageError, match="NEURON_LOGICAL_NC_CONFIG must be 1 or 2, got '4'"):
        plan_placements(None, 1, "neuron", host=host)


def test_a_device_with_no_readable_core_count_is_a_usage_error(host: Host) -> None:
    write(host.dev / "neuron0", "")
    with pytest.raises(
        UsageError,
        match=r"found .*/neuron0 but can't tell how many NeuronCores it has .*"
        r"set NEURON_RT_VISIBLE_CORES",
    ):
        plan_placements(None, 1, "neuron", host=host)


def test_no_neuron_cores_at_all_is_a_usage_error(host: Host) -> None:
    with pytest.raises(
        UsageError,
        match=r"^no NeuronCores found \(no neuron-ls, no .*/dev/neuron\* devices\); set "
        r"NEURON_RT_VISIBLE_CORES to the cores this process may use: a core \(0\), a range "
        r"\(0-3\) or a list \(0,2-3\)$",
    ):
        plan_placements(None, 1, "neuron", host=host)
    inf2_sysfs(host, devices=2, dev=[])
    with pytest.raises(UsageError, match=r"sysfs lists 2: not passed into this container\?"):
        plan_placements(2, 1, "neuron", host=host)


# --- the rest -----------------------------------------------------------------------------


def test_core_lists() -> None:
    assert parse_core_list("0,2-3", "X") == (0, 2, 3)
    assert parse_core_list("3-3,1", "X") == (1, 3)
    assert format_core_list((4,)) == "4"
    assert format_core_list((5, 4)) == "4-5"
    assert format_core_list((0, 2, 3, 4, 7)) == "0,2-4,7"


@pytest.mark.parametrize(
    ("replicas", "cores", "device", "message"),
    [
        (None, 0, "cpu", "--cores-per-replica must be ≥ 1, got 0"),
        (0, 1, "cpu", "--replicas must be ≥ 1, got 0"),
        (-1, 1, "neuron", "--replicas must be ≥ 1, got -1"),
        (1, 1, "gpu", "device must be 'cpu' or 'neuron', got 'gpu'"),
    ],
)
def test_plan_placements_rejects(
    replicas: int | None, cores: int, device: str, message: str
) -> None:
    with pytest.raises(ValueError, match=message):
        plan_placements(replicas, cores, device)


@pytest.mark.timeout(60)
def test_replicas_see_the_neuron_cores_planned_for_them(
    host: Host, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Planned from the environment, applied in real replica processes, each its own core."""
    monkeypatch.setenv("NEURON_RT_VISIBLE_CORES", "4-5")
    placements = plan_placements(None, 1, "neuron", host=host)
    # The fixture fakes 64 CPUs; pin the real replicas to a CPU this machine has.
    placements = [Placement(p.index, (REAL_CPUS[0],), p.neuron_cores) for p in placements]

    async def main() -> list[dict[str, Any]]:
        async with ReplicaPool(Toy(), placements) as pool:
            await all_ready(pool)
            seen: dict[int, dict[str, Any]] = {}
            for _ in range(20):
                outs = await asyncio.gather(*(pool.run({"probe": np.zeros(1)}) for _ in range(4)))
                seen.update({out[0]["pid"]: out[0] for out in outs})
                if len(seen) == 2:
                    break
            return list(seen.values())

    infos = asyncio.run(asyncio.wait_for(main(), 45))
    assert sorted(i["neuron_cores"] for i in infos) == ["4", "5"]
    assert os.environ["NEURON_RT_VISIBLE_CORES"] == "4-5"  # the parent's own is left alone
