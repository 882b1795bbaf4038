"""How many replicas start and where each runs: every core this process may use, and no more.

CPU: the affinity set, capped by the cgroup CPU quota (a container limited to 4 CPUs on a
64-CPU node gets 4 replicas, not 64). Neuron: the NeuronCores this process can reserve, from
`NEURON_RT_VISIBLE_CORES`, else `neuron-ls`, else the devices in /dev (see `neuron_devices`).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from batchjob.errors import UsageError
from batchjob.neuron_devices import NeuronCores, format_core_list, visible_neuron_cores

log = logging.getLogger("batchjob.replicas")


@dataclass(frozen=True, slots=True)
class Placement:
    index: int
    cpus: tuple[int, ...]
    neuron_cores: str | None = None  # NEURON_RT_VISIBLE_CORES: "2", "2-3" or "2,5"


@dataclass(frozen=True, slots=True)
class Host:
    """Where the facts about this machine are read: the real paths, or a fake tree in tests."""

    cgroup_root: Path = Path("/sys/fs/cgroup")
    proc_self_cgroup: Path = Path("/proc/self/cgroup")
    neuron_sysfs: Path = Path("/sys/class/neuron_device")
    dev: Path = Path("/dev")
    neuron_bin: Path = Path("/opt/aws/neuron/bin")  # the Neuron tools; not always on PATH


@dataclass(frozen=True, slots=True)
class CpuQuota:
    cpus: float  # quota ÷ period: 4.0 means four CPUs' worth of time per period
    file: str  # "cpu.max" (cgroup v2) or "cpu.cfs_quota_us" (v1)
    cgroup: Path  # the directory that set it: the process's cgroup or an ancestor


def plan_placements(
    replicas: int | None,
    cores_per_replica: int,
    device: str,
    *,
    host: Host | None = None,
) -> list[Placement]:
    """One placement per replica: CPU ids to pin to, and NeuronCores on Neuron devices."""
    if cores_per_replica < 1:
        raise ValueError(f"--cores-per-replica must be ≥ 1, got {cores_per_replica}")
    if replicas is not None and replicas < 1:
        raise ValueError(f"--replicas must be ≥ 1, got {replicas}")
    if device not in ("cpu", "neuron"):  # a backend's `device`: how its replicas are placed
        raise ValueError(f"device must be 'cpu' or 'neuron', got {device!r}")
    host = host or Host()
    available = sorted(os.sched_getaffinity(0))
    if device == "cpu":
        return _plan_cpu(replicas, cores_per_replica, available, cgroup_cpu_quota(host))
    cores = visible_neuron_cores(
        os.environ, neuron_sysfs=host.neuron_sysfs, dev=host.dev, neuron_bin=host.neuron_bin
    )
    return _plan_neuron(replicas, cores_per_replica, available, cores)


def _plan_cpu(
    replicas: int | None, k: int, available: list[int], quota: CpuQuota | None
) -> list[Placement]:
    m = len(available)
    usable = m if quota is None else max(1, min(m, math.floor(quota.cpus)))
    if quota is None:
        why = f"{_count(m, 'CPU')} in the affinity set, no cgroup CPU quota"
    elif usable < m:
        why = f"cgroup {quota.file} quota {_cpus(quota.cpus)} CPUs ({m} in the affinity set)"
    else:
        quota_text = f"cgroup {quota.file} quota {_cpus(quota.cpus)} CPUs"
        why = f"{_count(m, 'CPU')} in the affinity set ({quota_text})"
    if replicas is None:
        n, asked = max(1, usable // k), f"--cores-per-replica {k}"
        log.info("%s of %s: %s", _count(n, "replica"), _count(k, "core"), why)
    else:
        n, asked = replicas, f"--replicas {replicas} × --cores-per-replica {k}"
        log.info("%s of %s: --replicas %d", _count(n, "replica"), _count(k, "core"), n)
    if n * k > usable:
        log.warning(
            "%s wants %d CPUs, more than the %d this process may use, so threads share "
            "CPUs; found: %s",
            asked, n * k, usable, why,
        )  # fmt: skip
    # Pinning takes CPUs from the affinity set in order; more replicas (or cores) than CPUs
    # wrap around, and the CPUs are then shared.
    cpus = [tuple(dict.fromkeys(available[(i * k + j) % m] for j in range(k))) for i in range(n)]
    return [Placement(i, c) for i, c in enumerate(cpus)]


def _plan_neuron(
    replicas: int | None, k: int, available: list[int], cores: NeuronCores
) -> list[Placement]:
    ids, found = cores.ids, len(cores.ids)
    if not ids:
        raise UsageError(
            f"no NeuronCores found ({cores.source}); set NEURON_RT_VISIBLE_CORES to the cores "
            "this process may use: a core (0), a range (0-3) or a list (0,2-3)"
        )
    if replicas is None:
        n = found // k
        if n == 0:
            raise UsageError(
                f"--cores-per-replica {k} needs {k} NeuronCores but only {found} are visible "
                f"({cores.source})"
            )
        idle = found - n * k
        log.info(
            "%s of %s: %s%s", _count(n, "replica"), _count(k, "NeuronCore"), cores.source,
            f"; {_count(idle, 'core')} left idle" if idle else "",
        )  # fmt: skip
    else:
        n = replicas
        if n * k > found:
            # The runtime reserves a core for one process until it exits: no sharing.
            raise UsageError(
                f"--replicas {n} × --cores-per-replica {k} needs {n * k} NeuronCores but only "
                f"{found} are visible ({cores.source}); a NeuronCore can't be shared"
            )
        log.info("%s of %s: --replicas %d", _count(n, "replica"), _count(k, "NeuronCore"), n)
    return [
        Placement(i, tuple(available), format_core_list(ids[i * k : (i + 1) * k])) for i in range(n)
    ]


def cgroup_cpu_quota(host: Host) -> CpuQuota | None:
    """The tightest CPU quota on this process's cgroup or its ancestors; None when unlimited."""
    try:
        lines = host.proc_self_cgroup.read_text().splitlines()
    except OSError:  # no /proc (not Linux): nothing to cap with
        return None
    unified: str | None = None
    for line in lines:
        hierarchy, _, rest = line.partition(":")
        controllers, _, path = rest.partition(":")
        if hierarchy == "0" and controllers == "":
            unified = path
        elif "cpu" in controllers.split(","):
            # cgroup v1 (or hybrid: v1 owns the cpu controller even where a v2 tree exists).
            for name in dict.fromkeys((controllers, "cpu,cpuacct", "cpuacct,cpu", "cpu")):
                if (host.cgroup_root / name).is_dir():
                    return _tightest(host.cgroup_root / name, path, "cpu.cfs_quota_us", _v1_cpus)
            return None
    if unified is not None and (host.cgroup_root / "cgroup.controllers").is_file():
        return _tightest(host.cgroup_root, unified, "cpu.max", _v2_cpus)
    return None


def _tightest(
    mount: Path, path: str, file: str, read: Callable[[Path], float | None]
) -> CpuQuota | None:
    parts = [p for p in path.split("/") if p]
    if ".." in parts or not mount.joinpath(*parts).is_dir():
        # In a container the mount is usually the container's own cgroup (a cgroup namespace
        # or a bind mount), so the host's path for it doesn't exist below it: start there.
        parts = []
    best: CpuQuota | None = None
    for depth in range(len(parts), -1, -1):  # the process's cgroup, then each parent
        cgroup = mount.joinpath(*parts[:depth])
        cpus = read(cgroup)
        if cpus is not None and (best is None or cpus < best.cpus):
            best = CpuQuota(cpus, file, cgroup)
    return best


def _v2_cpus(cgroup: Path) -> float | None:
    try:  # "max 100000" (no quota) or "400000 100000": quota and period in µs
        quota, period = (cgroup / "cpu.max").read_text().split()
        return None if quota == "max" else _ratio(quota, period)
    except (OSError, ValueError):  # the root cgroup has no cpu.max
        return None


def _v1_cpus(cgroup: Path) -> float | None:
    try:  # a quota of -1 means none
        quota = (cgroup / "cpu.cfs_quota_us").read_text()
        return _ratio(quota, (cgroup / "cpu.cfs_period_us").read_text())
    except (OSError, ValueError):
        return None


def _ratio(quota: str, period: str) -> float | None:
    q, p = int(quota.strip()), int(period.strip())
    return q / p if q > 0 and p > 0 else None


def _cpus(value: float) -> str:
    return f"{value:.1f}" if round(value, 1) == value else f"{value:.2f}"


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
