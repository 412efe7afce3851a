"""Benchmark the preprocess stage on the simulated Queensland-Health-style extract (``qh`` config).

    python -m bench.preprocess                       # 100k and 1M patients
    python -m bench.preprocess --sizes 100000 --profile

For each size the simulator's ``encounters.csv`` is written first (setup, not timed); then one fresh
subprocess per size runs the full ``synthehr_core.data.preprocess.preprocess`` (adapter + canonical tables + parquet)
and reports wall time and peak RSS (``getrusage`` maximum resident set, so nothing from setup or the other
size leaks in). Goal (issue 2): 1M patients (~5M visits) in under 2 minutes and under 4 GB on 2 cores.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def setup_raw(n_patients: int, seed: int, where: Path) -> dict:
    """Simulate ``n_patients`` and write ``encounters.csv`` under ``where``; returns setup facts."""
    from synthehr_core.data.fixtures.qh import simulate, write_encounters

    t0 = time.perf_counter()
    df = simulate(n_patients, seed)
    t_sim = time.perf_counter() - t0
    path = write_encounters(df, where / "encounters.csv")
    return {"rows": len(df), "simulate_s": t_sim, "csv_mb": Path(path).stat().st_size / 2**20}


class RssTracer:
    """Sample RSS and where the main thread is in synthehr_core every few ms: which line owns the peak."""

    def __init__(self, every_s: float = 0.02):
        import threading

        self.every_s, self.samples, self._stop = every_s, [], threading.Event()
        self._main = threading.main_thread().ident
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        import psutil

        proc = psutil.Process()
        while not self._stop.wait(self.every_s):
            frame, where = sys._current_frames().get(self._main), "?"
            while frame is not None:
                if "synthehr_core" in frame.f_code.co_filename:
                    where = f"{Path(frame.f_code.co_filename).name}:{frame.f_lineno} {frame.f_code.co_name}"
                    break
                frame = frame.f_back
            self.samples.append((proc.memory_info().rss / 2**20, where))

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()

    def top(self, k: int = 8) -> list[tuple[float, str]]:
        best: dict[str, float] = {}
        for rss, where in self.samples:
            best[where] = max(best.get(where, 0.0), rss)
        return sorted(((v, w) for w, v in best.items()), reverse=True)[:k]


def worker(raw: str, out: str, profile: bool, memtrace: bool = False) -> None:
    """Run in a fresh process: time the adapter alone, then the full preprocess; print one JSON line."""
    import resource

    sys.path.insert(0, str(ROOT))
    from synthehr_core.data.adapters import qh
    from synthehr_core.data.adapters.base import DropReport
    from synthehr_core.data.preprocess import preprocess

    def cpu() -> float:
        r = resource.getrusage(resource.RUSAGE_SELF)
        return r.ru_utime + r.ru_stime

    t0 = time.perf_counter()
    cohort = qh.load(raw, {"ed_los_clip_hours": 168}, DropReport())
    t_adapter = time.perf_counter() - t0
    del cohort
    if profile:
        import cProfile
        import pstats

        prof = cProfile.Profile()
        prof.enable()
    t0, c0 = time.perf_counter(), cpu()
    if memtrace:
        with RssTracer() as tracer:
            meta = preprocess("qh", out, raw=raw, overwrite=True)
        for rss, where in tracer.top():
            print(f"peak RSS {rss:8,.0f} MB at {where}", file=sys.stderr)
    else:
        meta = preprocess("qh", out, raw=raw, overwrite=True)
    t_total, c_total = time.perf_counter() - t0, cpu() - c0
    if profile:
        prof.disable()
        pstats.Stats(prof, stream=sys.stderr).sort_stats("cumulative").print_stats(30)
    peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps({"adapter_s": t_adapter, "preprocess_s": t_total, "preprocess_cpu_s": c_total,
                      "peak_rss_mb": peak_mb, "load_avg": os.getloadavg()[0],
                      "n_patients": meta["n_patients"], "n_visits": meta["n_visits"], "n_codes": meta["n_codes"]}))


def time_preprocess(n_patients: int, seed: int = 0, profile: bool = False, memtrace: bool = False) -> dict:
    with tempfile.TemporaryDirectory(prefix="bench-preprocess-") as tmp:
        raw = Path(tmp, "raw")
        raw.mkdir()
        facts = setup_raw(n_patients, seed, raw)
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", str(raw), str(Path(tmp, "tables"))]
        cmd += ["--profile"] * profile + ["--memtrace"] * memtrace
        r = subprocess.run(cmd, check=False, capture_output=True, text=True, cwd=ROOT)
        if r.returncode != 0:
            raise RuntimeError(f"preprocess worker failed for {n_patients} patients:\n{r.stderr[-3000:]}")
        if profile or memtrace:
            print(r.stderr, file=sys.stderr)
        res = json.loads(r.stdout.strip().splitlines()[-1])
    return {**facts, **res}


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.preprocess", description=__doc__.split("\n\n")[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[100_000, 1_000_000])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile", action="store_true", help="print a cProfile of preprocess (slower)")
    ap.add_argument("--memtrace", action="store_true", help="print the synthehr_core lines at the highest RSS")
    ap.add_argument("--worker", nargs=2, metavar=("RAW", "OUT"), help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(*a.worker, profile=a.profile, memtrace=a.memtrace)
        return
    rows = [(n, time_preprocess(n, a.seed, a.profile, a.memtrace)) for n in a.sizes]
    # wall time suffers when the machine is shared; CPU time (user + sys of the worker) much less so
    print(f"{'patients':>10} {'visits':>10} {'codes':>10} {'simulate s':>10} {'csv MB':>7} {'adapter s':>9} {'preprocess s':>12} "
          f"{'cpu s':>7} {'visits/s':>10} {'peak RSS MB':>11} {'load':>5}")
    for n, r in rows:
        print(f"{n:>10,} {r['n_visits']:>10,} {r['n_codes']:>10,} {r['simulate_s']:>10.1f} {r['csv_mb']:>7.0f} {r['adapter_s']:>9.1f} "
              f"{r['preprocess_s']:>12.1f} {r['preprocess_cpu_s']:>7.1f} {r['n_visits'] / r['preprocess_s']:>10,.0f} "
              f"{r['peak_rss_mb']:>11,.0f} {r['load_avg']:>5.1f}")


if __name__ == "__main__":
    main()
