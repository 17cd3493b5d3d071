#!/usr/bin/env bash
# The receipt example of docs/examples/receipts.md, end to end: data, teacher, KD student, export, profile,
# per-class report and predictions. Any argument after the output folder is passed to every training command
# (e.g. train.epochs=1 for a quick check). Usage: bash scripts/receipts_example.sh [OUT=runs/receipts] [key=value ...]
set -euo pipefail
OUT=${1:-runs/receipts}
shift || true
KD=${KDFORGE:-kdforge}
PY=${PYTHON:-python}
DATA="$OUT/data"
[ -d "$DATA/train" ] || "$PY" scripts/make_receipts.py --out "$DATA" ${RECEIPTS_ARGS:-}
$KD train --config configs/examples/receipts_teacher.yaml --out "$OUT/teacher" --force data.root="$DATA" "$@"
$KD distill --config configs/examples/receipts_student.yaml --out "$OUT/student" --force \
    data.root="$DATA" teacher.checkpoint="$OUT/teacher" "$@"
$KD train --config configs/examples/receipts_teacher.yaml --out "$OUT/student_alone" --force \
    model.name=resnet8 data.root="$DATA" "$@"
$KD export --checkpoint "$OUT/student" --format torchscript --teacher resnet56
# Parameters, MACs, size and CPU latency: the student against the teacher, and a plain CNN (vgg8) against it too.
$KD profile --model resnet8 --teacher resnet56 --num-classes 2 --image-size 64 --out "$OUT/profile_teacher.json"
$KD profile --model resnet8 --teacher vgg8 --num-classes 2 --image-size 64 --out "$OUT/profile_cnn.json"
$KD eval --checkpoint "$OUT/student" --report "$OUT/report"
$KD predict "$OUT/student/export/student.torchscript.pt" "$DATA/val" --out "$OUT/predictions.csv" --quiet
