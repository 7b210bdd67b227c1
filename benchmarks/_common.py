"""Helpers shared by bench.py and its worker processes: clocks, memory, machine info, batch hashing."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import resource
import time
from pathlib import Path


def sync(device: str) -> None:
    if device == "cuda":
        import torch

        torch.cuda.synchronize()


def now(device: str) -> float:
    """A step boundary: waits for queued GPU work, then reads the monotonic clock."""
    sync(device)
    return time.perf_counter()


def cpu_now() -> float:
    """CPU time of this process (all its threads). With one torch thread on a shared machine this measures
    the work a step does, without the time spent waiting for a core that another process holds."""
    return time.process_time()


def _status_mib(key: str) -> float | None:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    return int(line.split()[1]) / 1024
    except OSError:
        pass
    return None


class PeakMemory:
    """Peak memory of a phase of this process.

    CPU: the process's peak resident set size (VmHWM) after resetting it at the start of the phase through
    /proc/self/clear_refs (Linux >= 4.0), so that loading, tokenization and the reference precompute do not
    count; falls back to ru_maxrss over the whole process when the reset is refused. CUDA:
    torch.cuda.max_memory_allocated after reset_peak_memory_stats."""

    def __init__(self, device: str):
        self.device = device
        self.reset_ok = False
        self.start_mib = None

    def start(self) -> None:
        if self.device == "cuda":
            import torch

            torch.cuda.reset_peak_memory_stats()
            self.start_mib = torch.cuda.memory_allocated() / 2**20
            self.reset_ok = True
            return
        try:
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
            self.reset_ok = True
        except OSError:
            self.reset_ok = False
        self.start_mib = _status_mib("VmRSS")

    def peak_mib(self) -> float:
        if self.device == "cuda":
            import torch

            return torch.cuda.max_memory_allocated() / 2**20
        hwm = _status_mib("VmHWM") if self.reset_ok else None
        return hwm if hwm is not None else process_peak_mib()

    def method(self) -> str:
        if self.device == "cuda":
            return "torch.cuda.max_memory_allocated (reset at the start of training)"
        if self.reset_ok:
            return "peak RSS (VmHWM) of the process, reset through /proc/self/clear_refs at the start of training"
        return "ru_maxrss of the whole process (the peak reset was refused)"


def process_peak_mib() -> float:
    """ru_maxrss of this process since it started (KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rows_digest(input_ids, attention_mask) -> tuple[str, int]:
    """(sha1 over the non-pad token ids of every row in order, number of non-pad tokens) of one batch."""
    h = hashlib.sha1()
    n = 0
    for ids, m in zip(input_ids.tolist(), attention_mask.tolist()):
        row = [t for t, keep in zip(ids, m) if keep]
        n += len(row)
        h.update(json.dumps(row).encode())
        h.update(b"|")
    return h.hexdigest()[:16], n


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info(device: str) -> dict:
    import torch

    info = {
        "cpu_model": cpu_model(),
        "cpu_cores": os.cpu_count(),
        "cpu_affinity": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "platform": platform.platform(),
        "device": device,
        "load_average_at_start": os.getloadavg() if hasattr(os, "getloadavg") else None,
    }
    for name in ("transformers", "trl", "accelerate", "datasets"):
        try:
            info[name] = __import__(name).__version__
        except Exception:  # noqa: BLE001 - absent or broken optional package
            info[name] = None
    if device == "cuda" and torch.cuda.is_available():
        info["gpu"] = torch.cuda.get_device_name()
    return info


def read_json(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def write_json(path: str | Path, obj) -> None:
    Path(path).write_text(json.dumps(obj, indent=1))
