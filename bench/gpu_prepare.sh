#!/usr/bin/env bash
# Here, before bench/gpu_run.sh runs on a lent GPU machine: the wheels that machine lacks
# (Python 3.12, manylinux x86-64) into .whl/, and the bundled model's tokenizer into
# .gpu/tokenizer (the GGUF itself is 98 MB, over what travels). Both folders are ignored.
set -eu
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
mkdir -p .whl .gpu
grep -qx '/.gpu/' .git/info/exclude 2>/dev/null || { mkdir -p .git/info; echo '/.gpu/' >> .git/info/exclude; }
versions=$("$PY" -m pip list --format=freeze 2>/dev/null | grep -iE '^(annotated-types|hiredis|platformdirs|pydantic|pydantic_core|pydantic-core|pydantic-settings|python-dotenv|redis|typing-inspection|typer|click|rich)==')
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl $versions
"$PY" - <<'PY'
from transformers import AutoTokenizer
from persona.models import bundled_gguf_path
gguf = bundled_gguf_path()
AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name).save_pretrained(".gpu/tokenizer")
PY
du -sh .whl .gpu
