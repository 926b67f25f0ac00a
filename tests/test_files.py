"""Only regular files are read: a FIFO, a device, a socket or a directory where a file is
expected is refused in one line before it is opened (a FIFO would block the open, and
/dev/zero never ends), and small formats are refused above their size bound."""

import os
import socket
from pathlib import Path

import pytest

from flowdb.errors import FlowdbError
from flowdb.files import SMALL_FILE_BYTES, read_small_text, regular_file
from helpers import assert_one_line_error, run_flowdb

HANG = 60  # seconds: every refusal here takes well under one; a hang fails the test here


def special(kind: str, path: Path) -> Path:
    """A file of the given kind at `path` (or a symlink there to one)."""
    if kind == "fifo":
        os.mkfifo(path)
    elif kind == "socket":
        listener = socket.socket(socket.AF_UNIX)
        listener.bind(str(path))  # the socket file stays after the socket is closed
        listener.close()
    elif kind == "dev-zero":
        path.symlink_to("/dev/zero")
    elif kind == "symlink-to-fifo":
        os.mkfifo(path.with_name(path.name + ".fifo"))
        path.symlink_to(path.with_name(path.name + ".fifo"))
    elif kind == "directory":
        path.mkdir()
    elif kind == "oversize":
        path.write_text("#" * (SMALL_FILE_BYTES + 1))
    return path


# What the one line says each kind is (stat's view, symlinks followed).
SAID = {"fifo": "named pipe (FIFO)", "socket": "socket", "dev-zero": "character device",
        "symlink-to-fifo": "named pipe (FIFO)", "directory": "directory", "oversize": "bytes"}


@pytest.mark.parametrize("kind", sorted(SAID))
def test_regular_file_names_what_a_path_is_instead(tmp_path, kind):
    path = special(kind, tmp_path / "thing")
    with pytest.raises(FlowdbError) as caught:
        read_small_text(path, "manifest")
    message = str(caught.value)
    assert str(path) in message and SAID[kind] in message and "\n" not in message


def test_a_regular_file_and_a_symlink_to_one_pass(tmp_path):
    target = tmp_path / "real.toml"
    target.write_text("x = 1\n" * 10)
    link = tmp_path / "link.toml"
    link.symlink_to(target)
    assert read_small_text(link, "manifest") == target.read_text()
    assert regular_file(link, "manifest", max_bytes=60) == link
    with pytest.raises(FlowdbError, match="more than the 59 bytes"):
        regular_file(link, "manifest", max_bytes=59)


@pytest.mark.parametrize("kind", ["fifo", "dev-zero", "socket", "symlink-to-fifo", "oversize"])
def test_ingest_refuses_a_special_manifest_at_once(flowdb_home, tmp_path, kind):
    manifest = special(kind, tmp_path / "pack.toml")
    line = assert_one_line_error(run_flowdb("ingest", manifest, timeout=HANG), str(manifest), SAID[kind])
    assert "unexpected" not in line


def test_ingest_of_dev_zero_itself_is_refused(flowdb_home):
    assert_one_line_error(run_flowdb("ingest", "/dev/zero", timeout=HANG), "/dev/zero", "character device")


@pytest.mark.parametrize("name, kind", [("sae_weights.safetensors", "fifo"), ("cfg.json", "fifo"),
                                        ("cfg.json", "dev-zero"), ("cfg.json", "oversize"),
                                        ("sae_weights.safetensors", "directory")])
def test_ingest_refuses_a_special_sae_file_before_writing(db, pack_copy, name, kind):
    target = pack_copy / "saes" / "res" / "layer_2" / name
    target.unlink()
    special(kind, target)
    result = run_flowdb("ingest", pack_copy / "manifest.toml", "--no-progress", timeout=HANG)
    assert_one_line_error(result, "layer 2 module res", str(target), SAID[kind])
    assert db.read("MATCH (n) WHERE n:Pack OR n:Feature RETURN count(n) AS n")[0]["n"] == 0


def test_match_refuses_a_fifo_sae_file_without_neo4j(flowdb_home, pack_copy, tmp_path):
    target = pack_copy / "saes" / "mlp" / "layer_1" / "sae_weights.safetensors"
    target.unlink()
    os.mkfifo(target)
    result = run_flowdb("match", pack_copy / "manifest.toml", "--out", tmp_path / "atlas", "--no-progress",
                        timeout=HANG)
    assert_one_line_error(result, str(target), "FIFO")
    assert not (tmp_path / "atlas" / "layers").exists()


@pytest.mark.parametrize("part", ["layers/0.json", "edges/layer=0/part.parquet", "residual/layer=0/part.parquet"])
def test_load_refuses_a_fifo_atlas_part(db, pack_copy, tmp_path, part):
    from flowdb.flow.atlas import match
    from flowdb.packs.manifest import load_manifest
    from flowdb.packs.plan import make_plan

    atlas = match(make_plan(load_manifest(pack_copy / "manifest.toml")), tmp_path / "atlas")
    target = atlas.root / part
    target.unlink()
    os.mkfifo(target)
    assert_one_line_error(run_flowdb("load", atlas.root, timeout=HANG), str(target), "FIFO")
    assert db.read("MATCH (f:Feature) RETURN count(f) AS n")[0]["n"] == 0
