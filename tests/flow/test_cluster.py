"""flowdb match --ray: layers as Ray tasks on a real local Ray cluster."""

import os
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pytest

from flowdb.errors import FlowdbError
from flowdb.flow.atlas import match
from flowdb.packs.manifest import load_manifest
from flowdb.packs.plan import make_plan

RAY = Path(sys.executable).with_name("ray")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def ray_cluster(tmp_path_factory):
    """A one-node Ray cluster started as users start one (`ray start --head`)."""
    port = _free_port()
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    temp = tmp_path_factory.mktemp("ray")
    subprocess.run([str(RAY), "start", "--head", "--num-cpus", "2", "--num-gpus", "0", "--port", str(port),
                    "--node-ip-address", "127.0.0.1", "--include-dashboard", "false",
                    "--temp-dir", str(temp), "--disable-usage-stats"],
                   check=True, env=env, capture_output=True, timeout=180)
    try:
        yield f"127.0.0.1:{port}"
    finally:
        subprocess.run([str(RAY), "stop", "--force"], env=env, capture_output=True, timeout=120)


def frames(root: Path) -> dict:
    return {table: pd.read_parquet(root / table).sort_values(["layer", *keys]).reset_index(drop=True)
            for table, keys in (("edges", ["kind", "target_index", "rank"]), ("residual", ["index"]))}


def test_ray_tasks_write_the_same_atlas_as_one_process(ray_cluster, planted_pack, tmp_path):
    plan = make_plan(load_manifest(planted_pack[0] / "manifest.toml", k=3))
    local = match(plan, tmp_path / "local")
    spread = match(plan, tmp_path / "ray", ray_address=ray_cluster)
    assert spread.layers_done() == local.layers_done() == [0, 1, 2, 3]
    for table, frame in frames(spread.root).items():
        pd.testing.assert_frame_equal(frame, frames(local.root)[table])
    for layer in local.layers_done():
        # Everything but the time the searches took, which each run measures for itself.
        spread_meta, local_meta = spread.layer_meta(layer), local.layer_meta(layer)
        assert spread_meta.pop("search_seconds") > 0 and local_meta.pop("search_seconds") > 0
        assert spread_meta == local_meta
    pd.testing.assert_frame_equal(pd.read_parquet(spread.root / "thresholds.parquet"),
                                  pd.read_parquet(local.root / "thresholds.parquet"))


def test_an_unreachable_cluster_is_one_clear_error(planted_pack, tmp_path):
    plan = make_plan(load_manifest(planted_pack[0] / "manifest.toml", k=1))
    with pytest.raises(FlowdbError, match="cannot join the Ray cluster at '127.0.0.1:9'"):
        match(plan, tmp_path / "atlas", ray_address="127.0.0.1:9")


def test_without_ray_installed_the_message_names_the_extra(planted_pack, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "ray", None)  # import ray now fails
    plan = make_plan(load_manifest(planted_pack[0] / "manifest.toml", k=1))
    with pytest.raises(FlowdbError, match=r"pip install 'flowdb\[ray\]'"):
        match(plan, tmp_path / "atlas", ray_address="auto")
