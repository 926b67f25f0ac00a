#!/usr/bin/env bash
# The main job end to end on a fresh machine: install, start flowdb's local
# Neo4j (unless NEO4J_URI names one), build a planted pack, ingest it, print the lineage of
# the end of its longest translated chain, and how to explore it in the browser.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh    # the core only: no torch, transformers or sae-lens
flowdb=.venv/bin/flowdb
work="${FLOWDB_DEMO_DIR:-${FLOWDB_HOME:-$HOME/.flowdb}/demo}"

[ -n "${NEO4J_URI:-}" ] || "$flowdb" neo4j start
"$flowdb" synth "$work/pack" --layers 6 --width 4096 --d-model 256
"$flowdb" ingest "$work/pack/manifest.toml"
"$flowdb" export planted --out "$work/edges.csv"
# The feature to show: the end of the longest translated chain with MLP or attention inputs.
feature=$("$flowdb" cypher "$(cat scripts/demo-feature.cypher)" -p pack=planted --format csv | sed -n 2p)
[ -n "$feature" ] || { echo "demo: the pack has no translated chain to show" >&2; exit 1; }
echo "Lineage of $feature (the end of the longest translated chain fed by MLP or attention):"
"$flowdb" query lineage -p "feature=$feature"
"$flowdb" plot flow "$feature" --out "$work/flow.html"
"$flowdb" plot origins planted --out "$work/origins.png"
echo "Explore it in the browser: $flowdb serve --feature $feature"
