"""GPU figures shared by the benchmarks: how busy the device was while a stage ran."""
from __future__ import annotations

import shutil
import statistics
import subprocess
import threading
import time

import torch


class BusySampler:
    """GPU utilisation samples (time, percent) every ``interval`` seconds, from NVML or nvidia-smi."""

    def __init__(self, interval: float = 0.1):
        self.interval, self.samples = interval, []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._proc = None

    def _run(self) -> None:
        try:
            torch.cuda.utilization()
            while not self._stop.is_set():
                self.samples.append((time.perf_counter(), float(torch.cuda.utilization())))
                time.sleep(self.interval)
        except Exception:  # no pynvml: nvidia-smi's own sampling loop
            if shutil.which("nvidia-smi") is None:
                return
            index = torch.cuda.current_device()
            self._proc = subprocess.Popen(
                ["nvidia-smi", f"--id={index}", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits",
                 f"-lms={int(self.interval * 1000)}"], stdout=subprocess.PIPE, text=True)
            for line in self._proc.stdout:
                if self._stop.is_set():
                    break
                if line.strip().isdigit():
                    self.samples.append((time.perf_counter(), float(line)))

    def __enter__(self) -> BusySampler:
        if torch.cuda.is_available():  # no samples (None figures) on a CPU
            self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._stop.set()
        if self._proc is not None:
            self._proc.terminate()
        if self._thread.is_alive():
            self._thread.join(timeout=2)

    def mean_between(self, start: float, end: float) -> float | None:
        values = [v for t, v in self.samples if start <= t <= end]
        return statistics.mean(values) / 100 if values else None
