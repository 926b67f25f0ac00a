#!/usr/bin/env bash
# The test command: set up a fresh machine, then run every test against a real
# Neo4j (testcontainers when Docker answers, else flowdb's managed server).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh full    # core, model and test extras, and the offline SmolLM2-135M
.venv/bin/ruff check flowdb tests benchmarks    # lint first: it takes a second
exec .venv/bin/python -m pytest "$@"
