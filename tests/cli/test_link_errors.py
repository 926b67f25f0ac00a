"""flowdb link refuses what it cannot link in one line that names the real fault."""

from click.testing import CliRunner

from flowdb.cli import cli


def test_link_of_a_pack_that_is_not_stored_says_so(db, planted_pack):
    from flowdb.packs.manifest import load_manifest
    from flowdb.store.ingest import ingest

    ingest(load_manifest(planted_pack[0] / "manifest.toml"), db, show_progress=False)
    for a, b in (("planted' OR 1=1 //", "planted"), ("planted", "no such/pack")):
        result = CliRunner().invoke(cli, ["link", a, b, "--no-progress"])
        assert result.exit_code == 1, result.output
        missing = a if a != "planted" else b
        assert result.output.count("\n") == 1 and f"no pack named {missing!r}" in result.output, result.output
