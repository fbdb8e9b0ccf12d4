"""What an experiment tracker costs a run: milliseconds per evaluation record, per built-in writer.

    .venv/bin/python benchmarks/tracking.py [--config examples/quickstart.yaml] [--repeats 5] [--set key=value ...]

One untimed ``run_experiment`` of the config gives real records (its ``metrics.jsonl``: one per evaluation). Then,
for each writer (``csv``, ``tensorboard``, ``mlflow`` on a local SQLite store, batched as by default, and
``mlflow-each``, ``flush_s=0``: a send per record) and each of ``--repeats`` repeats, a fresh tracker in a fresh
folder is told ``on_start``, every record through ``Trackers.metrics`` (as ``Run`` calls it: a JSON copy per
tracker) and ``on_end``; timed: the records' calls (ms per record, what the run waits for between evaluations)
and the whole, start to end, per record (``total ms/record``: what the tracker adds to the run's wall time). The
MLflow store's tables are created once, untimed, before the repeats (the first run into a new store pays that:
printed separately). Reported: median, min and max over repeats. The last line is one JSON object. Nothing here
asserts a time.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

from hetfl.config import load_config
from hetfl.engine.run import _flatten, run_experiment
from hetfl.results.tracking import CSVTracker, MLflowTracker, RunInfo, Trackers, TensorBoardTracker


def make(writer: str, folder: Path, db: Path):
    if writer == "csv":
        return CSVTracker(folder / "m.csv")
    if writer == "tensorboard":
        return TensorBoardTracker(folder / "tb")
    return MLflowTracker(db, flush_s=0 if writer == "mlflow-each" else 5.0)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="examples/quickstart.yaml")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--set", action="append", default=[])
    args = parser.parse_args()
    cfg = load_config(args.config, args.set)
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        summary = run_experiment(cfg, root / "run", show_progress=False)
        records = [json.loads(line) for line in (root / "run" / "metrics.jsonl").read_text().splitlines()]
        info = RunInfo("run", root / "run", cfg.name, summary["algorithm"], None, cfg.seed,
                       _flatten(cfg.model_dump(mode="json")), {"algorithm": summary["algorithm"]})
        db = root / "mlflow.db"
        t0 = time.perf_counter()
        MLflowTracker(db).client.search_experiments()
        create_s = time.perf_counter() - t0
        results = {}
        for writer in ("csv", "tensorboard", "mlflow", "mlflow-each"):
            per_record, total = [], []
            for r in range(args.repeats):
                folder = root / f"{writer}-{r}"
                folder.mkdir()
                trackers = Trackers([(writer, make(writer, folder, db))])
                t0 = time.perf_counter()
                trackers.start(info)
                t1 = time.perf_counter()
                for record in records:
                    trackers.metrics(record)
                t2 = time.perf_counter()
                trackers.end(summary)
                t3 = time.perf_counter()
                assert trackers.active, f"{writer} raised"
                per_record.append((t2 - t1) / len(records) * 1e3)
                total.append((t3 - t0) / len(records) * 1e3)
            results[writer] = {
                "ms_per_record_median": statistics.median(per_record), "ms_per_record_min": min(per_record),
                "ms_per_record_max": max(per_record), "total_ms_per_record_median": statistics.median(total),
                "total_ms_per_record_min": min(total), "total_ms_per_record_max": max(total),
            }
            print(f"{writer:12s} {statistics.median(per_record):8.2f} ms/record (min {min(per_record):.2f}, max "
                  f"{max(per_record):.2f}); total {statistics.median(total):.2f} ms/record (min {min(total):.2f}, max "
                  f"{max(total):.2f})", flush=True)
        keys = len(records[0])
        print(f"{len(records)} records of {keys} keys; the run itself: wall {summary['wall_time_s']:.2f} s; "
              f"a new MLflow SQLite store: {create_s:.2f} s once", flush=True)
        json.dump({"records": len(records), "keys": keys, "run_wall_s": summary["wall_time_s"],
                   "mlflow_store_create_s": create_s, "writers": results}, sys.stdout)
        print()


if __name__ == "__main__":
    main()
