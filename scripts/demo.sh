#!/usr/bin/env bash
# The main job end to end on a fresh machine: install, start flowdb's local
# Neo4j (unless NEO4J_URI names one), build a planted pack, ingest it, print a lineage.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh    # the core only: no torch, transformers or sae-lens
flowdb=.venv/bin/flowdb
work="${FLOWDB_DEMO_DIR:-${FLOWDB_HOME:-$HOME/.flowdb}/demo}"

[ -n "${NEO4J_URI:-}" ] || "$flowdb" neo4j start
"$flowdb" synth "$work/pack" --layers 6 --width 4096 --d-model 256
"$flowdb" ingest "$work/pack/manifest.toml"
"$flowdb" export planted --out "$work/edges.csv"
echo "Lineage of planted/5/res/0 (a residual feature in the last layer):"
"$flowdb" query lineage -p feature=planted/5/res/0
"$flowdb" plot flow planted/5/res/0 --out "$work/flow.html"
"$flowdb" plot origins planted --out "$work/origins.png"
