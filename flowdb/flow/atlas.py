"""A flow atlas: a pack's matched, classified build on disk as Parquet.

    DIR/atlas.json                     pack, build fingerprint, plan, flowdb version
    DIR/edges/layer=L/part.parquet     every stored match: source, target, kind,
                                       cosine, rank, above, source_layer,
                                       source_module, source_index, target_index
    DIR/residual/layer=L/part.parquet  residual features: key, index, category,
                                       s_res, s_mlp, s_att
    DIR/layers/L.json                  written last: the layer is complete; widths,
                                       SAE provenance, thresholds and the matcher
    DIR/saes.parquet, DIR/thresholds.parquet   every layer's, once all are done

Useful without Neo4j: pandas.read_parquet("DIR/edges") (or DuckDB's
read_parquet('DIR/edges/*/*.parquet', hive_partitioning=1), or Polars) reads all
layers with a `layer` column. A build is resumable and idempotent: a layer is
searched only when its layers/L.json is missing, and files are written under
dot-names (which Parquet readers skip) and renamed into place.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa

from flowdb._version import __version__
from flowdb.errors import FlowdbError
from flowdb.files import regular_file
from flowdb.flow.build import classified, match_layer
from flowdb.flow.layer import LayerBuild, layer_size, threshold_properties
from flowdb.flow.matching import Matcher
from flowdb.modules import MODULES, RESIDUAL, feature_key
from flowdb.packs.plan import BuildPlan, layer_ranges
from flowdb.settings import home_dir
from flowdb.writes import atomic_write, writer_lock

FORMAT = 1
LAYER_KEYS = frozenset({"layer", "widths", "saes", "searched", "matcher", "edges", "thresholds"})


class Atlas:
    """An atlas directory: what it holds, and its layers read back as LayerBuilds."""

    def __init__(self, root: str | Path):
        self.root = Path(root).absolute()
        self.checked = False  # require_complete read every layer back already

    @classmethod
    def open(cls, root: str | Path) -> Atlas:
        atlas = cls(root)
        if not (atlas.root / "atlas.json").is_file():
            raise FlowdbError(f"{atlas.root} is not a flow atlas (no atlas.json); "
                              "write one with flowdb match MANIFEST --out DIR")
        return atlas

    @property
    def info(self) -> dict:
        try:
            info = json.loads(regular_file(self.root / "atlas.json", "atlas").read_text())
        except (OSError, ValueError) as exc:
            raise FlowdbError(f"{self.root / 'atlas.json'} is unreadable ({exc})") from None
        if not isinstance(info, dict) or not {"format", "pack", "fingerprint", "plan"} <= info.keys():
            raise self._damaged("atlas.json is not an atlas record (a JSON object with format, pack, "
                                "fingerprint and plan)")
        if info.get("format") != FORMAT:
            raise FlowdbError(f"{self.root}: atlas format {info.get('format')!r}, "
                              f"this flowdb reads {FORMAT}; match it again")
        return info

    @property
    def plan(self) -> BuildPlan:
        try:
            return BuildPlan.from_json(self.info["plan"])
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise self._damaged(f"atlas.json holds no readable build plan ({type(exc).__name__}: {exc})") from None

    @property
    def fingerprint(self) -> str:
        return self.info["fingerprint"]

    def layers_done(self) -> list[int]:
        folder = self.root / "layers"
        return sorted(int(p.stem) for p in folder.glob("*.json") if p.stem.isdigit()) if folder.is_dir() else []

    def missing(self) -> list[int]:
        done = set(self.layers_done())
        return [layer for layer in self.plan.layers if layer not in done]

    def require_complete(self) -> None:
        """Refuse an atlas that lacks a layer or holds a damaged one, before anything is
        loaded from it: every layer is read back whole (footers, pages, row counts against
        layers/L.json, categories against edges), one at a time."""
        if self.checked:  # flowdb load checks every atlas before any is written, then loads each
            return
        missing = self.missing()
        if missing:
            raise FlowdbError(f"atlas {self.root} lacks layers {layer_ranges(missing)}; "
                              "run flowdb match on its manifest again to finish it")
        for layer in self.layers_done():
            self.read_layer(layer)
        self.checked = True

    def layer_meta(self, layer: int) -> dict:
        name = f"layers/{layer}.json"
        try:
            meta = json.loads(regular_file(self.root / name, "atlas").read_text())
        except (OSError, ValueError) as exc:
            raise self._damaged(f"{name} is unreadable ({exc})") from None
        if not (isinstance(meta, dict) and LAYER_KEYS <= meta.keys() and isinstance(meta["widths"], dict)
                and _count(meta["widths"].get(RESIDUAL.name), low=1) and _count(meta["edges"])):
            raise self._damaged(f"{name} is not a layer record (a JSON object with "
                                f"{', '.join(sorted(LAYER_KEYS))}; widths.res and edges counts)")
        return meta

    def _damaged(self, what: str) -> FlowdbError:
        return FlowdbError(f"atlas {self.root} is damaged: {what}; match it again "
                           "(flowdb match MANIFEST --out a new directory)")

    def _read_part(self, table: str, layer: int, columns: list[str], rows: int) -> pd.DataFrame:
        """One layer's Parquet file of a table, whole, holding the rows its layer record says."""
        path = self._part(table, layer)
        name = path.relative_to(self.root)
        try:
            frame = pd.read_parquet(regular_file(path, "atlas"), columns=columns)
        except FileNotFoundError:
            raise self._damaged(f"{name} is missing") from None
        except (OSError, ValueError, pa.ArrowException) as exc:  # truncated, bad footer, bad pages
            raise self._damaged(f"{name} is unreadable ({str(exc).strip().splitlines()[0]})") from None
        if len(frame) != rows:
            raise self._damaged(f"{name} holds {len(frame)} rows, layers/{layer}.json records {rows}")
        return frame

    def matchers(self) -> str:
        """The backends that searched this atlas's layers, e.g. "faiss-cpu"."""
        return ",".join(sorted({self.layer_meta(layer)["matcher"] for layer in self.layers_done()}))

    def n_edges(self) -> int:
        return sum(self.layer_meta(layer)["edges"] for layer in self.layers_done())

    def search_rate(self) -> float | None:
        """GFLOP/s of the searches over the layers that recorded their time (None: none did)."""
        timed = [self.read_layer_header(layer) for layer in self.layers_done()]
        timed = [built for built in timed if built.search_seconds > 0]
        seconds = sum(built.search_seconds for built in timed)
        return sum(built.search_flops() for built in timed) / seconds / 1e9 if seconds else None

    def read_layer_header(self, layer: int, meta: dict | None = None) -> LayerBuild:
        """A layer's widths, searches, provenance and matcher, without its edges."""
        meta = meta or self.layer_meta(layer)
        return LayerBuild(layer, meta["widths"], saes=meta["saes"],
                          searched={p: tuple(v) for p, v in meta["searched"].items()},
                          matcher=meta["matcher"], search_seconds=meta.get("search_seconds", 0.0))

    def graph_size(self, layers: list[int] | None = None) -> tuple[int, int]:
        """The nodes and relationships these layers (default: all done) add to a graph,
        from each layer's record and its residual categories (no edge is read)."""
        nodes = relationships = 0
        for layer in self.layers_done() if layers is None else layers:
            meta = self.layer_meta(layer)
            categories = self._read_part("residual", layer, ["category"], meta["widths"][RESIDUAL.name])["category"]
            n, r = layer_size(meta["widths"], len(meta["saes"]), meta["edges"],
                              int((categories == "from-nowhere").sum()))
            nodes, relationships = nodes + n, relationships + r
        return nodes, relationships

    def read_layer(self, layer: int) -> LayerBuild:
        meta = self.layer_meta(layer)
        built = self.read_layer_header(layer, meta)
        edges = self._read_part("edges", layer, ["source_module", "target_index", "rank", "source_index", "cosine"],
                                meta["edges"])
        n_res = built.widths[RESIDUAL.name]
        for place, part in edges.groupby("source_module", sort=False):
            part = part.sort_values(["target_index", "rank"])
            if place not in MODULES or len(part) % n_res:
                raise self._damaged(f"layer {layer}'s edges from {place!r} do not give each of its "
                                    f"{n_res} residual features the same number of matches")
            built.indices[place] = part["source_index"].to_numpy(np.int32).reshape(n_res, -1)
            built.scores[place] = part["cosine"].to_numpy(np.float32).reshape(n_res, -1)
        built = classified(built, self.plan)
        stored = self._read_part("residual", layer, ["category"], n_res)["category"]
        if not np.array_equal(stored.to_numpy(object), built.categories):
            raise self._damaged(f"layer {layer}'s stored categories differ from its edges under its thresholds")
        return built

    def layers(self) -> Iterator[LayerBuild]:
        for layer in self.layers_done():
            yield self.read_layer(layer)

    def _part(self, table: str, layer: int) -> Path:
        return self.root / table / f"layer={layer}" / "part.parquet"

    # --- writing ----------------------------------------------------------------------

    def write_layer(self, built: LayerBuild) -> None:
        """Store one classified layer; its layers/L.json, renamed in last, marks it done."""
        pack = self.plan.name
        frames = [_edges_frame(pack, built, place) for place in built.indices]
        # A pack's first layer with no MLP or attention SAE (a residual-only pack) has no matches.
        edges = pd.concat(frames, ignore_index=True) if frames else \
            pd.DataFrame({column: pd.Series(dtype=dtype) for column, dtype in EDGE_SCHEMA.items()})
        s = {place: built.top1(place) for place in MODULES}
        residual = pd.DataFrame({
            "key": [feature_key(pack, built.layer, RESIDUAL.name, i) for i in range(built.widths["res"])],
            "index": np.arange(built.widths["res"], dtype=np.int32), "category": built.categories,
            "s_res": s["res"], "s_mlp": s["mlp"], "s_att": s["att"]})
        for table, frame in (("edges", edges), ("residual", residual)):
            with atomic_write(self._part(table, built.layer), private=True) as partial:
                frame.to_parquet(partial, index=False)
        meta = {"layer": built.layer, "widths": built.widths, "saes": built.saes,
                "searched": built.searched, "matcher": built.matcher,
                "search_seconds": built.search_seconds, "edges": len(edges),
                "thresholds": threshold_properties(built)}
        with atomic_write(self.root / "layers" / f"{built.layer}.json", private=True) as partial:
            partial.write_text(json.dumps(meta, indent=1))

    def write_summaries(self) -> None:
        """saes.parquet and thresholds.parquet over all layers."""
        metas = [self.layer_meta(layer) for layer in self.layers_done()]
        saes = pd.DataFrame([{"layer": m["layer"], "module": module, **sae}
                             for m in metas for module, sae in m["saes"].items()])
        thresholds = pd.DataFrame([{"layer": m["layer"], **m["thresholds"]} for m in metas])
        for name, frame in (("saes.parquet", saes), ("thresholds.parquet", thresholds)):
            with atomic_write(self.root / name, private=True) as partial:
                frame.to_parquet(partial, index=False)


def _count(value, low: int = 0) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= low


# The edges table's columns and types, in the atlas and in flowdb export alike; read
# back as a directory, the atlas adds the target's `layer` from its partition names.
EDGE_SCHEMA = {"source": object, "target": object, "kind": object, "cosine": np.float32, "rank": np.int16,
               "above": bool, "source_layer": np.int32, "source_module": object, "source_index": np.int32,
               "target_index": np.int32}



def _edges_frame(pack: str, built: LayerBuild, place: str) -> pd.DataFrame:
    module = MODULES[place]
    scores, indices = built.scores[place], built.indices[place]
    n_res, k = indices.shape
    source_layer = module.predecessor_layer(built.layer)
    targets = np.repeat(np.arange(n_res, dtype=np.int32), k)
    sources = indices.reshape(-1).astype(np.int32)
    return pd.DataFrame({
        "source": [feature_key(pack, source_layer, place, i) for i in sources.tolist()],
        "target": [feature_key(pack, built.layer, RESIDUAL.name, i) for i in targets.tolist()],
        "kind": module.edge_type, "cosine": scores.reshape(-1).astype(np.float32),
        "rank": np.tile(np.arange(1, k + 1, dtype=np.int16), n_res),
        "above": built.above(place).reshape(-1), "source_layer": np.int32(source_layer),
        "source_module": place, "source_index": sources, "target_index": targets})


# --- building ---------------------------------------------------------------------------

def default_dir(plan: BuildPlan) -> Path:
    """Where ingest keeps a pack's atlas: one per build fingerprint."""
    return home_dir("atlas") / f"{plan.name}-{plan.fingerprint()}"


def match(plan: BuildPlan, out: str | Path, matcher: Matcher | None = None, device: str = "auto",
          ray_address: str | None = None, progress: Callable[[int], None] | None = None) -> Atlas:
    """Write (or finish) the atlas of a plan in out; layers already there are kept.

    matcher: how to search here (default: the best backend for `device`); with
    ray_address, every missing layer is a Ray task that picks its backend for
    `device` on the worker that runs it."""
    atlas = Atlas(out)
    with writer_lock(atlas.root):
        _claim(atlas, plan)
        todo = atlas.missing()
        if ray_address is not None:
            from flowdb.flow.cluster import match_layers_on_ray

            built = match_layers_on_ray(plan, todo, device, ray_address)
        else:
            matcher = matcher or Matcher.for_device(device, plan.matching_gflop(todo))
            built = (match_layer(plan, layer, matcher) for layer in todo)
        for layer in built:
            atlas.write_layer(classified(layer, plan))
            if progress:
                progress(layer.layer)
        if todo or not (atlas.root / "thresholds.parquet").exists():
            atlas.write_summaries()
    return atlas


def _claim(atlas: Atlas, plan: BuildPlan) -> None:
    """Start an atlas for this build, or check the one there is of the same build."""
    fingerprint = plan.fingerprint()
    if (atlas.root / "atlas.json").exists():
        found = atlas.info
        if found["fingerprint"] != fingerprint:
            raise FlowdbError(f"{atlas.root} holds the atlas of another build of {found['pack']!r} "
                              f"({found['fingerprint']}; this manifest gives {fingerprint}); "
                              "choose another --out, or delete that directory first")
        return
    if atlas.root.exists() and any(p.name != ".lock" for p in atlas.root.iterdir()):
        raise FlowdbError(f"{atlas.root} is not empty and holds no atlas; choose another --out")
    info = {"format": FORMAT, "pack": plan.name, "fingerprint": fingerprint,
            "flowdb_version": __version__, "plan": plan.to_json()}
    with atomic_write(atlas.root / "atlas.json", private=True) as partial:
        partial.write_text(json.dumps(info, indent=1))
