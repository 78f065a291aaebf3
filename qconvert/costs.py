"""What a conversion job costs on a runner: bytes downloaded, disk, memory, time.

Computed from the plan (safetensors headers only) before any weight is read, for
``qconvert release --dry-run`` and for the check that makes a staging job fail before its
first download when the machine it runs on has less disk or memory than the variant needs.

* download: every weight byte the conversion reads (streamed once, range requests) plus the
  copied components; 0 for a local source.
* disk (staging, upload as you go): one shard of the largest quantized component -- the whole
  component for a backend whose shard headers are known only at its end (torchao) -- plus
  the copied components, which stay until the commit, plus a margin for the small files; a
  GGUF file must exist whole, so its whole output. Without staging: the whole output.
* memory: the measured peak anonymous memory of a conversion (bench/convert_bench.json:
  0.45-0.69 GB on full-size FLUX.1-dev, every backend) + the chunks in flight ((jobs + 1) x 2
  x 16 MB) + the hash's out-of-order buffer + two copies of the largest tensor (its read and
  encoded forms, which a backend's finish_tensor holds together).
* time: the tensor parameters at the rate measured per core (bench/convert_bench.json, 2
  cores; assumed to scale with cores) + the download and upload at an assumed bandwidth.
  An estimate, said to be one.
"""

from __future__ import annotations

import shutil
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from .errors import InputError

GB = 10**9
MARGIN = 256 * 10**6  # small files, configs, the manifest, the hidden upload record
BASE_MEMORY = 700 * 10**6  # bench/convert_bench.json: peak anonymous memory, full size, <= 0.69 GB
CHUNK_BYTES = (1 << 22) * 4  # schedule.CHUNK_VALUES as float32
PENDING = 64 << 20  # remote._PENDING_LIMIT
BANDWIDTH = 100 * 10**6  # bytes/s to and from the Hub: an assumption, not a measurement

# Mparam/s on 2 cores (bench/convert_bench.json, full-size FLUX.1-dev shapes, --jobs 2)
RATES_2_CORES = {
    ("torchao", "int8wo"): 52.4, ("torchao", "fp8wo"): 63.5, ("bnb", "nf4"): 32.9, ("bnb", "nf4-dq"): 30.4,
    ("bnb", "int8"): 60.4, ("gguf", "Q8_0"): 46.7, ("gguf", "Q4_K_S"): 15.5, ("gguf", "Q2_K"): 12.9,
}  # fmt: skip
DEFAULT_RATE = 12.0  # a scheme not measured: the slowest measured one


@dataclass(frozen=True)
class Runner:
    label: str
    cores: int
    memory: int
    disk: int


# GitHub's runner reference: the standard hosted runner of public repositories
RUNNERS = {
    "standard": Runner("GitHub standard runner (ubuntu-24.04, public repo)", 4, 16 * GB, 14 * GB),
    # the workflow's large-runner input: its size is the user's; the job checks the machine it
    # gets (check_fits), the estimate assumes 4 cores
    "large": Runner("large runner (the workflow's large-runner label)", 4, 1 << 62, 1 << 62),
}


@dataclass
class Costs:
    download: int
    disk: int
    memory: int
    seconds: float
    runner: str
    fits: bool
    why: str = ""

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        from .plan import human_bytes

        fit = "fits" if self.fits else f"does NOT fit ({self.why}): give it runner = \"large\""
        return (f"download {human_bytes(self.download)}, disk {human_bytes(self.disk)}, memory {human_bytes(self.memory)}, "
                f"~{_duration(self.seconds)} on the {self.runner} runner: {fit}")  # fmt: skip


def _duration(seconds: float) -> str:
    return f"{seconds / 3600:.1f} h" if seconds >= 5400 else f"{max(1, round(seconds / 60))} min"


def _params(plan: Any) -> int:
    from .sources import DTYPE_SIZES

    return sum(t.bytes_in // DTYPE_SIZES.get(t.dtype, 2) for c in plan.components if c.action == "quantize" for t in c.tensors)


def disk_needed(plan: Any, backend: Any, *, staged: bool) -> int:
    """Disk the conversion of ``plan`` needs at its peak (see the module docstring)."""
    from .convert.base import DIFFUSERS_SHARD, Backend
    from .convert.writers import parse_size

    if backend.container != "pipeline" or not staged:
        return plan.bytes_out + MARGIN
    shard = parse_size(backend.options.get("max_shard_size") or DIFFUSERS_SHARD)
    early = type(backend).shard_metadata is Backend.shard_metadata
    quantized = [c.bytes_out for c in plan.components if c.action == "quantize"]
    largest = max(quantized, default=0)
    biggest_tensor = max((t.bytes_out for c in plan.components for t in c.tensors), default=0)
    one = min(largest, shard + biggest_tensor) if early else largest
    copied = sum(c.bytes_out for c in plan.components if c.action == "copy")
    return one + copied + MARGIN


def memory_needed(plan: Any, jobs: int) -> int:
    largest = max((t.bytes_in + t.bytes_out for c in plan.components for t in c.tensors), default=0)
    return BASE_MEMORY + (jobs + 1) * 2 * CHUNK_BYTES + PENDING + largest


def estimate(plan: Any, backend: Any, *, streamed: bool, staged: bool, runner: str = "standard") -> Costs:
    kind = RUNNERS[runner]
    # a GGUF's "from-base" components are not read; a copied one is streamed whole
    download = sum(c.bytes_in for c in plan.components if c.action in ("quantize", "copy")) if streamed else 0
    jobs = int(backend.options.get("jobs") or kind.cores)
    disk, memory = disk_needed(plan, backend, staged=staged), memory_needed(plan, jobs)
    rate = RATES_2_CORES.get((plan.backend, plan.scheme), DEFAULT_RATE) / 2 * kind.cores * 1e6
    upload = plan.bytes_out if staged else 0
    seconds = _params(plan) / rate + (download + upload) / BANDWIDTH
    why = []
    if disk > kind.disk:
        why.append(f"disk {disk / GB:.1f} > {kind.disk / GB:.0f} GB")
    if memory > kind.memory:
        why.append(f"memory {memory / GB:.1f} > {kind.memory / GB:.0f} GB")
    return Costs(download, disk, memory, seconds, runner, not why, ", ".join(why))


# --- the check on the machine itself -----------------------------------------------------------


def available_memory() -> int | None:
    """MemAvailable (bytes) from /proc/meminfo; None where there is none."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None


def check_fits(name: str, costs: Costs, workdir: Path) -> None:
    """Fail before the first download when this machine has less disk or memory than needed."""
    from .plan import human_bytes

    workdir = Path(workdir)
    probe = workdir if workdir.exists() else next(p for p in workdir.absolute().parents if p.exists())
    free = shutil.disk_usage(probe).free
    if costs.disk > free:
        raise InputError(f"variant {name} needs ~{human_bytes(costs.disk)} of disk, {probe} has {human_bytes(free)} free",
                         hint="run it on a larger runner (the workflow's large-runner input), or lower max_shard_size in its options")  # fmt: skip
    mem = available_memory()
    if mem is not None and costs.memory > mem:
        raise InputError(f"variant {name} needs ~{human_bytes(costs.memory)} of memory, this machine has {human_bytes(mem)} available",
                         hint="run it on a larger runner, or pass fewer jobs in its options")  # fmt: skip
