#!/usr/bin/env bash
# Wall time of `pneumoscope report` on a run's own validation part (manifest.csv role val).
#   bash benchmarks/report.sh RUN_DIR [OUT_DIR]
# Prints the wall time (and peak memory when GNU time is installed) and the seconds of
# each step (from OUT/report.json).
set -euo pipefail
cd "$(dirname "$0")/.."
RUN=${1:?usage: benchmarks/report.sh RUN_DIR [OUT_DIR]}
OUT=${2:-$RUN/report}
CMD=(.venv/bin/pneumoscope report "$RUN" --split val --out "$OUT")
echo "command: ${CMD[*]}"
if [ -x /usr/bin/time ]; then
  /usr/bin/time -f "report wall time: %e s, peak RSS: %M KiB" "${CMD[@]}"
else
  TIMEFORMAT='report wall time: %R s'
  time "${CMD[@]}"
fi
.venv/bin/python - "$OUT/report.json" <<'PY'
import json, sys
r = json.load(open(sys.argv[1]))
print(f"images: {r['n']}  threshold: {r['threshold']:.4f} ({r['threshold_rule']})  ECE: {r['ece']:.4f}")
print("seconds per step: " + ", ".join(f"{k} {v}" for k, v in r["timings_s"].items()))
PY
