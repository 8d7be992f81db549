#!/usr/bin/env bash
# The embedded default job, on any machine with Python 3.9-3.11 and pip: install into .venv,
# build a tiny random Stable Diffusion pipeline, fine-tune it with SCEdit for 40 steps on the
# 16 bundled photos, and print loss, s/step and img/s. Weights land in outputs/tiny-scedit/.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
"$VENV/bin/python" -m pip install --quiet --upgrade pip
"$VENV/bin/python" -m pip install --quiet -e .
export PATH="$PWD/$VENV/bin:$PATH"

[ -f outputs/tiny-sd/model_index.json ] || mindscedit make-tiny-model outputs/tiny-sd
mindscedit train --config configs/tiny_scedit.yaml "$@"
