"""Rebuild the embedded sample (data/sample/) from the shared Kermany data, by a seeded rule.

    python scripts/make_sample.py [--source ../shared/data/chest_xray_224] [--out data/sample]
    python scripts/make_sample.py --check      # the sample on disk is what the rule gives

The rule, so anyone with the data can rebuild the same bytes:

- train/: whole patients (patient ids from file names, pneumoscope.data.discover), never
  part of one. The patients of each stratum are sorted, shuffled with random.Random(SEED)
  and taken in that order until the stratum holds its target number of images. Strata:
  NORMAL films named IM-* and NORMAL2-IM-* (the two naming styles); PNEUMONIA patient ids
  holding only bacterial films, only viral films, or both.
- val/: the 16 official val images, all of them.
- Files are byte copies (never re-encoded); MANIFEST.csv lists each with its SHA-256 and
  patient. The whole folder (images, manifest, licence) must stay under MAX_BYTES (it lives in git).
"""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import random
import shutil
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from pneumoscope.data.discover import discover_split  # noqa: E402

SEED = 2018
# images per stratum; whole patients, so a stratum may end a few images above its target
TARGETS = {
    "NORMAL/IM": 100,
    "NORMAL/NORMAL2-IM": 100,
    "PNEUMONIA/bacteria": 90,
    "PNEUMONIA/virus": 50,
    "PNEUMONIA/both": 90,
}
MAX_BYTES = 5_000_000  # the "at most 5 MB", every file of the folder counted
DEFAULT_SOURCE = REPO.parent / "shared" / "data" / "chest_xray_224"
DEFAULT_OUT = REPO / "data" / "sample"
MANIFEST = "MANIFEST.csv"


def stratum(cls: str, files: list[Path]) -> str:
    """NORMAL by file-name style; PNEUMONIA by the kinds of film a patient id holds
    (many person ids carry both bacterial and viral films)."""
    if cls == "NORMAL":
        return "NORMAL/NORMAL2-IM" if files[0].name.upper().startswith("NORMAL2-") else "NORMAL/IM"
    kinds = {"virus" if "_virus_" in f.name.lower() else "bacteria" for f in files}
    return "PNEUMONIA/" + ("both" if len(kinds) == 2 else kinds.pop())


def select_train(source: Path, seed: int = SEED, targets: dict[str, int] = TARGETS) -> list[Path]:
    """Files of the seeded, patient-whole selection from source/train, sorted."""
    patients: dict[tuple[str, str], list[Path]] = {}
    for s in discover_split(source / "train", "train"):
        patients.setdefault((s.path.parent.name, s.patient), []).append(s.path)
    by_stratum: dict[str, list[tuple[str, str]]] = {}
    for key in sorted(patients):
        files = sorted(patients[key])
        by_stratum.setdefault(stratum(key[0], files), []).append(key)
    rng = random.Random(seed)
    chosen: list[Path] = []
    for name in sorted(targets):
        keys = by_stratum.get(name, [])
        rng.shuffle(keys)
        taken = 0
        for key in keys:
            if taken >= targets[name]:
                break
            chosen += patients[key]
            taken += len(patients[key])
    return sorted(chosen)


def planned(source: Path) -> list[tuple[Path, str]]:
    """(source file, path inside the sample) for the whole sample."""
    rows = [(f, f"train/{f.parent.name}/{f.name}") for f in select_train(source)]
    rows += [
        (s.path, f"val/{s.path.parent.name}/{s.path.name}")
        for s in discover_split(source / "val", "val")
    ]
    return rows


def manifest_text(out: Path, rows: list[tuple[Path, str]]) -> str:
    from pneumoscope.data.discover import patient_id

    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["path", "sha256", "bytes", "patient"])
    for _, rel in rows:
        data = (out / rel).read_bytes()
        w.writerow([rel, hashlib.sha256(data).hexdigest(), len(data), patient_id(Path(rel).name)])
    return buf.getvalue()


def counts(rows: list[tuple[Path, str]]) -> dict[str, int]:
    found: dict[str, int] = {}
    for _, rel in rows:
        split, cls, name = rel.split("/")
        kind = (
            "virus"
            if "_virus_" in name
            else "bacteria"
            if "_bacteria_" in name
            else "NORMAL2-IM"
            if name.startswith("NORMAL2-")
            else "IM"
        )
        key = f"{split}/{cls}/{kind}"
        found[key] = found.get(key, 0) + 1
    return found


def build(source: Path, out: Path) -> list[tuple[Path, str]]:
    rows = planned(source)
    for split in ("train", "val"):
        shutil.rmtree(out / split, ignore_errors=True)
    for src, rel in rows:
        (out / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(src, out / rel)  # the JPEG bytes as they are
    (out / MANIFEST).write_text(manifest_text(out, rows))
    return rows


def check(source: Path, out: Path) -> list[str]:
    """Differences between the sample on disk and what the rule gives from `source`."""
    rows = planned(source)
    problems = []
    on_disk = {p.relative_to(out).as_posix() for p in out.glob("*/*/*") if p.is_file()}
    wanted = {rel for _, rel in rows}
    problems += [f"missing: {r}" for r in sorted(wanted - on_disk)]
    problems += [f"not in the rule: {r}" for r in sorted(on_disk - wanted)]
    for src, rel in rows:
        if rel in on_disk and (out / rel).read_bytes() != src.read_bytes():
            problems.append(f"bytes differ from {src}: {rel}")
    if not problems and (out / MANIFEST).read_text() != manifest_text(out, rows):
        problems.append(f"{MANIFEST} is stale")
    return problems


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument(
        "--source", type=Path, default=DEFAULT_SOURCE, help="DATA_ROOT with train/ and val/"
    )
    p.add_argument(
        "--out", type=Path, default=DEFAULT_OUT, help="sample folder (default %(default)s)"
    )
    p.add_argument(
        "--check",
        action="store_true",
        help="compare the sample on disk with the rule; change nothing",
    )
    args = p.parse_args(argv)
    if not (args.source / "train").is_dir():
        print(f"make_sample: no train/ under {args.source}", file=sys.stderr)
        return 2
    if args.check:
        problems = check(args.source, args.out)
        print("\n".join(problems) or f"{args.out} matches the rule (seed {SEED})")
        return 1 if problems else 0
    rows = build(args.source, args.out)
    size = sum(p.stat().st_size for p in args.out.rglob("*") if p.is_file())  # what git will hold
    for key, n in sorted(counts(rows).items()):
        print(f"{key:32s} {n:4d}")
    print(f"{len(rows)} images, {size / 1e6:.2f} MB in the folder, written to {args.out}")
    if size > MAX_BYTES:
        print(f"make_sample: {size} bytes is over the {MAX_BYTES} byte limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
