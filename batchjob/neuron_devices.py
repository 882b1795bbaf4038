"""The NeuronCores this process may reserve, and their ids as the Neuron runtime numbers them.

In order: `NEURON_RT_VISIBLE_CORES` when set (the user's or the orchestrator's choice), else
`neuron-ls --json-output` (the SDK's own view), else the devices in /dev with each device's
core count from sysfs. /dev, not sysfs, says which devices: a container sees only the
devices passed into it under /dev, while /sys/class/neuron_device lists all of the host's.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
import subprocess
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from batchjob.errors import UsageError

log = logging.getLogger("batchjob.replicas")

NEURON_LS_TIMEOUT = 30.0  # seconds; it answers in well under one

# Cores per device by sysfs device name (info/architecture/device_name) or instance family
# (instance_type), as the Neuron driver reports them: physical cores.
CORES_BY_DEVICE_NAME = {"Inferentia": 4, "Inferentia2": 2, "Trainium1": 2, "Trainium2": 8}
CORES_BY_INSTANCE_FAMILY = {"Inf1": 4, "Inf2": 2, "Trn1": 2, "Trn2": 8}


@dataclass(frozen=True, slots=True)
class NeuronCores:
    ids: tuple[int, ...]  # sorted, distinct
    source: str  # where they were found, for the start-up log line and errors


def visible_neuron_cores(
    environ: Mapping[str, str], *, neuron_sysfs: Path, dev: Path, neuron_bin: Path
) -> NeuronCores:
    text = environ.get("NEURON_RT_VISIBLE_CORES", "").strip()
    if text:
        ids = parse_core_list(text, "NEURON_RT_VISIBLE_CORES")
        return NeuronCores(ids, f"NEURON_RT_VISIBLE_CORES={text}")
    search = os.pathsep.join([environ.get("PATH", os.defpath), str(neuron_bin)])
    neuron_ls = shutil.which("neuron-ls", path=search)
    if neuron_ls is not None:
        found = _from_neuron_ls(neuron_ls)
        if found is not None:
            return found
    return _from_devices(environ, neuron_sysfs, dev)


def parse_core_list(text: str, where: str) -> tuple[int, ...]:
    """'3', '0-3' or '0,2-3' → (0, 2, 3): the forms the Neuron runtime accepts."""
    ids: set[int] = set()
    for item in text.split(","):
        match = re.fullmatch(r"\s*(\d+)\s*(?:-\s*(\d+)\s*)?", item)
        if match is None:
            raise UsageError(
                f"{where} must be a core (3), a range (0-3) or a list (0,2-3), got {text!r}"
            )
        first = int(match[1])
        last = first if match[2] is None else int(match[2])
        if last < first:
            raise UsageError(f"{where}: the range {item.strip()!r} ends before it starts")
        ids.update(range(first, last + 1))
    return tuple(sorted(ids))


def format_core_list(ids: tuple[int, ...]) -> str:
    """(4,) → '4', (4, 5) → '4-5', (0, 2, 3) → '0,2-3'."""
    runs: list[list[int]] = []
    for core in sorted(ids):
        if runs and core == runs[-1][1] + 1:
            runs[-1][1] = core
        else:
            runs.append([core, core])
    return ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)


def _from_neuron_ls(executable: str) -> NeuronCores | None:
    """Cores from `neuron-ls --json-output`; None (with a warning) when it gives no answer.

    Its output is a list of devices such as {"neuron_device": 0, "nc_count": 2,
    "neuroncore_ids": [0, 1], ...}; older releases have no neuroncore_ids, and their cores
    are numbered in device order.
    """
    try:
        done = subprocess.run(
            [executable, "--json-output"],
            capture_output=True,
            text=True,
            timeout=NEURON_LS_TIMEOUT,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as e:
        log.warning("%s --json-output failed (%s); looking for devices in /dev", executable, e)
        return None
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1]
        log.warning(
            "%s --json-output exited %d (%s); looking for devices in /dev",
            executable, done.returncode, last,
        )  # fmt: skip
        return None
    try:
        devices = _neuron_ls_devices(json.loads(done.stdout))
    except ValueError as e:
        log.warning("%s --json-output: %s; looking for devices in /dev", executable, e)
        return None
    ids: list[int] = []
    for count, given in devices:
        start = max(ids, default=-1) + 1
        ids.extend(given if given is not None else range(start, start + count))
    return NeuronCores(
        tuple(sorted(set(ids))),
        f"neuron-ls ({_count(len(set(ids)), 'core')} on {_count(len(devices), 'device')})",
    )


def _neuron_ls_devices(data: Any) -> list[tuple[int, list[int] | None]]:
    """(core count, core ids or None) per device; ValueError naming what is not as expected."""
    if not isinstance(data, list):
        raise ValueError(f"expected a JSON list of devices, got {type(data).__name__}")
    devices: list[tuple[int, list[int] | None]] = []
    for i, device in enumerate(data):
        count = device.get("nc_count") if isinstance(device, dict) else None
        if not isinstance(count, int) or isinstance(count, bool) or count < 0:
            raise ValueError(f"device {i} has no nc_count")
        given = device.get("neuroncore_ids")
        valid = (
            isinstance(given, list)
            and len(given) == count
            and all(isinstance(c, int) and not isinstance(c, bool) and c >= 0 for c in given)
        )
        devices.append((count, list(given) if valid else None))
    return devices


def _from_devices(environ: Mapping[str, str], neuron_sysfs: Path, dev: Path) -> NeuronCores:
    numbers = _device_numbers(dev, "neuron")
    if not numbers:
        listed = _device_numbers(neuron_sysfs, "neuron")
        note = f"; sysfs lists {len(listed)}: not passed into this container?" if listed else ""
        return NeuronCores((), f"no neuron-ls, no {dev}/neuron* devices{note}")
    counts, how = [], set()
    for number in numbers:
        count, source = _cores_of_device(neuron_sysfs / f"neuron{number}", environ)
        if count is None:
            raise UsageError(
                f"found {dev}/neuron{number} but can't tell how many NeuronCores it has "
                f"(nothing readable under {neuron_sysfs}/neuron{number}); set "
                "NEURON_RT_VISIBLE_CORES to the cores this process may use, e.g. 0-1"
            )
        counts.append(count)
        how.add(source)
    # The runtime numbers the cores of the devices it can open in device order, from 0.
    total = sum(counts)
    return NeuronCores(
        tuple(range(total)),
        f"{dev}/neuron* ({_count(total, 'core')} on {_count(len(numbers), 'device')}; "
        f"{', '.join(sorted(how))})",
    )


def _cores_of_device(sysfs: Path, environ: Mapping[str, str]) -> tuple[int | None, str]:
    """A device's NeuronCores as the runtime counts them, and which sysfs entry said so."""
    name = _read(sysfs / "info" / "architecture" / "device_name")
    family = _read(sysfs / "info" / "architecture" / "instance_type")
    count: int | None = None
    core_count = _read(sysfs / "core_count")  # readable by root only
    if core_count is not None and core_count.isdigit():
        count, source = int(core_count), "sysfs core_count"
    elif cores := _device_numbers(sysfs, "neuron_core"):  # one directory per enabled core
        count, source = len(cores), "sysfs neuron_core* directories"
    elif name in CORES_BY_DEVICE_NAME:
        count, source = CORES_BY_DEVICE_NAME[name], f"{name} devices"
    elif family in CORES_BY_INSTANCE_FAMILY:
        count, source = CORES_BY_INSTANCE_FAMILY[family], f"{family} devices"
    else:
        return None, ""
    if name == "Trainium2" or family == "Trn2":
        # The runtime groups Trainium2's physical cores into logical ones (2 by default).
        lnc_text = environ.get("NEURON_LOGICAL_NC_CONFIG", "2").strip()
        if lnc_text not in ("1", "2"):
            raise UsageError(f"NEURON_LOGICAL_NC_CONFIG must be 1 or 2, got {lnc_text!r}")
        count //= int(lnc_text)
        source += f", {lnc_text} physical per logical core"
    return count, source


def _device_numbers(directory: Path, prefix: str) -> list[int]:
    """N for each entry named <prefix>N in directory, sorted; none when it can't be listed."""
    try:
        names = os.listdir(directory)
    except OSError:
        return []
    pattern = re.compile(re.escape(prefix) + r"(\d+)")
    return sorted(int(m[1]) for name in names if (m := pattern.fullmatch(name)))


def _read(path: Path) -> str | None:
    try:
        return path.read_text().strip()
    except OSError:  # absent, or not ours to read (core_count is mode 0400)
        return None


def _count(n: int, noun: str) -> str:
    return f"{n} {noun}" + ("" if n == 1 else "s")
