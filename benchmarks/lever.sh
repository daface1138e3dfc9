#!/usr/bin/env bash
# One lever run, as in benchmarks/README.md's lever tables: a fresh clone of this repository's
# HEAD, params set, the stages run, the model scored.
#
#   benchmarks/lever.sh NAME [section.key=VALUE ...]
#   e.g. benchmarks/lever.sh k6s43 prepare.k_folds=6 train.seed=43
#
# Environment:
#   LEVERS      where the clones go (default: ../levers, beside this checkout); NAME's folder is
#               replaced
#   STAGES      stages run with `dvc repro -s`, in order (default: ingest prepare train
#               evaluate; tune is not rerun, so every lever trains at the committed tuned rate)
#   PAIRS       real CT/mask pairs to score, as "CT MASK CT MASK ..." (default: none)
#   HELDOUT     a folder of benchmarks/synth_heldout.py output (seed-* folders) to score
#
# Writes NAME/result.txt (stage times, CV and test metrics, the real table, the held-out mean),
# NAME/real.csv and NAME/heldout.csv (real_ct.py's tables: benchmarks/flag_calibration.py reads
# them). The venv of this checkout runs everything.
set -euo pipefail
name=$1
shift
repo=$(git rev-parse --show-toplevel)
venv=$repo/.venv
out=$(realpath -m "${LEVERS:-$repo/../levers}")/$name
rm -rf "$out"
git clone -q "$repo" "$out"
cd "$out"
export PATH=$venv/bin:$PATH PYTHONPATH=$out/src MLFLOW_TRACKING_URI=sqlite:///mlruns/mlflow.db TF_CPP_MIN_LOG_LEVEL=2
"$venv/bin/python" - "$@" <<'PY'
import sys

import yaml

params = yaml.safe_load(open("params.yaml"))
for item in sys.argv[1:]:
    key, value = item.split("=", 1)
    *path, last = key.split(".")
    section = params
    for part in path:
        section = section[part]
    if last not in section:
        sys.exit(f"lever.sh: params.yaml has no {key}")
    section[last] = yaml.safe_load(value)
yaml.safe_dump(params, open("params.yaml", "w"), sort_keys=False)
PY
echo "$name $*" > result.txt
for stage in ${STAGES:-ingest prepare train evaluate}; do
    start=$(date +%s)
    "$venv/bin/dvc" repro -s "$stage" >> repro.log 2>&1
    echo "$stage $(($(date +%s) - start)) s" >> result.txt
done
"$venv/bin/python" -c "
import json
train = json.load(open('reports/train/metrics.json'))
test = json.load(open('reports/evaluate/metrics.json'))
print(f\"CV Dice {train['cv_val_dice_mean']:.4f}, test Dice {test['dice_mean']:.4f} \"
      f\"(n {test['n_scans']}), lr {train['learning_rate']:.3g}, batch {train['batch_size']}\")
" >> result.txt
pairs=()
for path in ${PAIRS:-}; do pairs+=("$path"); done
if ((${#pairs[@]})); then
    args=()
    for ((i = 0; i < ${#pairs[@]}; i += 2)); do args+=(--pair "${pairs[i]}" "${pairs[i + 1]}"); done
    "$venv/bin/python" benchmarks/real_ct.py --model models "${args[@]}" --csv real.csv >> result.txt
fi
if [[ -n ${HELDOUT:-} ]]; then
    dirs=()
    for d in "$HELDOUT"/seed-*; do dirs+=(--dir "$d"); done
    "$venv/bin/python" benchmarks/real_ct.py --model models "${dirs[@]}" --csv heldout.csv > heldout.txt
    tail -n 1 heldout.txt >> result.txt
    "$venv/bin/python" -c "
import csv
dice = [float(r['dice']) for r in csv.DictReader(open('heldout.csv'))]
print(f'held-out: n {len(dice)}, mean Dice {sum(dice) / len(dice):.4f}, lowest {min(dice):.3f}')
" >> result.txt
fi
cat result.txt
