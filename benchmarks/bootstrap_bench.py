"""Time the patient bootstrap of a run's validation predictions (what every model card,
evaluate and report computes): resamples scored by scikit-learn (binary_point_metrics, the old
path) against the numpy scorer bootstrap_ci uses (resample_metrics); both give the same
intervals (checked here to 1e-12).

    python benchmarks/bootstrap_bench.py RUN_DIR [--n-boot 1000]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import time

from pneumoscope.data.manifest import read_manifest
from pneumoscope.evaluation.metrics import CI_METRICS, binary_point_metrics, bootstrap_ci
from pneumoscope.report.model_card import read_val_predictions
from pneumoscope.rundir import MANIFEST, THRESHOLD


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run_dir")
    parser.add_argument("--n-boot", type=int, default=1000)
    args = parser.parse_args()
    paths, y, p = read_val_predictions(args.run_dir)
    patient_of = {
        str(s.path): s.patient for s in read_manifest(os.path.join(args.run_dir, MANIFEST))["val"]
    }
    patients = [patient_of.get(x, x) for x in paths]
    with open(os.path.join(args.run_dir, THRESHOLD)) as f:
        threshold = json.load(f)["threshold"]
    t0 = time.perf_counter()
    fast = bootstrap_ci(y, p, threshold, n_boot=args.n_boot, patients=patients)
    t1 = time.perf_counter()
    # the former path
    slow = bootstrap_ci(y, p, threshold, args.n_boot, patients=patients, score=binary_point_metrics)
    t2 = time.perf_counter()
    diff = max(abs(a - b) for k in CI_METRICS for a, b in zip(fast[k], slow[k]))
    assert diff < 1e-12, diff
    print(
        json.dumps(
            {
                "run_dir": args.run_dir,
                "images": len(y),
                "patients": len(set(patients)),
                "n_boot": args.n_boot,
                "numpy_s": round(t1 - t0, 2),
                "sklearn_s": round(t2 - t1, 2),
                "max_ci_diff": diff,
                "load_avg": os.getloadavg()[0],
                "machine": platform.node(),
            }
        )
    )


if __name__ == "__main__":
    main()
