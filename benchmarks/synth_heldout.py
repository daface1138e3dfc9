"""More synthetic scans of the held-out test patients' anatomy, for calibrating the review flag.

    python benchmarks/synth_heldout.py --cases e01 e03 e14 --seeds 10 --out /tmp/heldout
    python benchmarks/real_ct.py --model models $(for d in /tmp/heldout/seed-*; do
        echo --dir $d; done) --csv heldout.csv

Each seed folder holds one synthetic CT per case, drawn as the ingest stage draws them
(``ingest.synth`` of ``--params``) but with seed ``1000 + k``, so none of them is a scan the
pipeline made. Only patients of ``prepare.test_cases``/the evaluate stage's test split should be
given: their anatomy never trained a model.
"""

from __future__ import annotations

import argparse
import dataclasses
import tempfile
from pathlib import Path

from liverseg.data.labelmaps import labelmap_paths
from liverseg.data.synth import write_synth
from liverseg.params import load_section


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--cases", nargs="+", required=True, help="case ids, e.g. e01 e03")
    ap.add_argument("--seeds", type=int, default=10)
    ap.add_argument("--labelmaps", type=Path, default=Path("labelmaps"))
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    ap.add_argument("--out", type=Path, required=True)
    args = ap.parse_args(argv)
    synth = load_section("ingest", args.params).synth
    with tempfile.TemporaryDirectory() as tmp:
        for case in args.cases:  # a folder of just these maps
            for src in labelmap_paths(args.labelmaps, case):
                (Path(tmp) / src.name).symlink_to(src.resolve())
        for k in range(args.seeds):
            out = args.out / f"seed-{k}"
            out.mkdir(parents=True, exist_ok=True)
            write_synth(out, dataclasses.replace(synth, seed=1000 + k, draws=1), Path(tmp))
            print(f"synth_heldout: {out}")


if __name__ == "__main__":
    main()
