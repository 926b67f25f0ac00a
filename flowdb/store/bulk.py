"""`flowdb load --bulk`: a new database built by Neo4j's own importer.

neo4j-admin database import full writes store files directly, many times faster
than transactions, but only into an empty, stopped database. bulk_load checks that
the managed server's database holds no node, writes the packs' features, Nowhere
nodes and edges as CSV files, stops the server, imports, starts it again, creates
flowdb's constraints and indexes and writes each Pack node and its SAE nodes over
Bolt with flowdb.store.graph, exactly as an ingest would have: the graph is the same.

The import files, in one private directory (a header file per group, then its data,
written layer by layer with Arrow's CSV writer, so memory holds at most two layers):

    features-res.header.csv, features-res.csv      labels Feature:Residual
        :ID(flow),key,pack,layer:long,module,index:long,category,s_res:double,s_mlp:double,s_att:double
    features-mlp.*, features-att.*                  labels Feature:MLP, Feature:Attention
        :ID(flow),key,pack,layer:long,module,index:long
    nowhere.*                                       label Nowhere: :ID(flow),pack
    edges-RESIDUAL.*, edges-MLP.*, edges-ATTENTION.*
        :START_ID(flow),:END_ID(flow),cosine:double,rank:long,above:boolean
    edges-FROM_NOWHERE.*                            :START_ID(flow),:END_ID(flow)
    edges-ALIGNS.*                                  link sets (flowdb.flow.link_atlas), both ways
        :START_ID(flow),:END_ID(flow),link,cosine:double,rank:long,above:boolean,category

Node ids are integers from 0 up, numbered pack by pack and layer by layer (FeatureIds
keeps where each layer and module begins, for the link sets' ends), and become
the new store's own node ids (--id-type=actual: no id mapping, a third faster than
--id-type=integer here); the key property names a feature. Cosines are written
as the float64 of each float32 score, in the shortest text that reads back exactly,
as the Bolt path sends them. An empty field is a property the node does not have.
Link atlases go in only when both their packs do, by name and build fingerprint.
import.json records the files and what the importer does not write (Pack and SAE
nodes; LinkSet and LinkPlace nodes, as flowdb link writes them): for a Neo4j of the
user's own, run import_command(files) with its neo4j-admin, start it, then
finish_import(db, ImportFiles.open(directory)).
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from flowdb._version import __version__
from flowdb.errors import FlowdbError
from flowdb.files import regular_file
from flowdb.flow.atlas import Atlas
from flowdb.flow.layer import PACK_NODES, LayerBuild, built_layer_size
from flowdb.flow.link_atlas import LinkAtlas, common_places, link_set_properties
from flowdb.modules import MODULES, RESIDUAL
from flowdb.packs.plan import BuildPlan
from flowdb.settings import import_memory, import_threads, private_dir
from flowdb.store import graph
from flowdb.store.database import Database, neo4j_errors
from flowdb.store.server import BULK_COST, ManagedServer
from flowdb.writes import write_errors

ID_SPACE = "flow"
ID_TYPE = "actual"  # the ids in the files, dense from 0, are the node ids
FORMAT = 2  # of import.json; 2 added link sets
READABLE_FORMATS = (1, 2)
MANIFEST = "import.json"
DATABASE = "neo4j"  # Community edition: the one database there is
FROM_NOWHERE = "FROM_NOWHERE"
ALIGNS = "ALIGNS"
INDEX_WAIT_S = 3600

_FEATURE_COLUMNS = [("key", pa.string(), "key"), ("pack", pa.string(), "pack"),
                    ("layer", pa.int64(), "layer:long"), ("module", pa.string(), "module"),
                    ("index", pa.int64(), "index:long")]
_RESIDUAL_COLUMNS = [("category", pa.string(), "category"), ("s_res", pa.float64(), "s_res:double"),
                     ("s_mlp", pa.float64(), "s_mlp:double"), ("s_att", pa.float64(), "s_att:double")]
_EDGE_COLUMNS = [("start", pa.int64(), f":START_ID({ID_SPACE})"), ("end", pa.int64(), f":END_ID({ID_SPACE})"),
                 ("cosine", pa.float64(), "cosine:double"), ("rank", pa.int64(), "rank:long"),
                 ("above", pa.bool_(), "above:boolean")]
_ALIGNS_COLUMNS = [*_EDGE_COLUMNS[:2], ("link", pa.string(), "link"), *_EDGE_COLUMNS[2:],
                   ("category", pa.string(), "category")]
_ID = [("id", pa.int64(), f":ID({ID_SPACE})")]


@dataclass
class BulkPack:
    """One matched pack to import: its plan and its classified layers, in order."""

    name: str
    plan: dict  # BuildPlan.to_json()
    fingerprint: str
    backend: str  # the matcher backend, stored as the Pack's matcher (as begin_pack does)
    layers: Callable[[], Iterable[LayerBuild]]
    # The nodes and relationships of its layers, when known without reading them all
    # (Atlas.graph_size); else counted from `layers`.
    size: Callable[[], tuple[int, int]] | None = None

    def graph_size(self) -> tuple[int, int]:
        """The nodes and relationships this pack adds to a graph, its own nodes included."""
        if self.size is not None:
            nodes, relationships = self.size()
        else:
            sizes = [built_layer_size(layer) for layer in self.layers()]
            nodes, relationships = sum(n for n, _ in sizes), sum(r for _, r in sizes)
        return nodes + PACK_NODES, relationships

    @classmethod
    def from_atlas(cls, atlas: Atlas) -> BulkPack:
        """A stored flow atlas as the import reads it: its layers stream from Parquet."""
        return cls(atlas.plan.name, atlas.info["plan"], atlas.fingerprint, atlas.matchers(), atlas.layers,
                   atlas.graph_size)


@dataclass
class BulkReport:
    packs: list[str]
    nodes: int  # every node written: features, Nowhere, Pack and SAE nodes, LinkSet and LinkPlace nodes
    relationships: int  # match edges, FROM_NOWHERE, HAS_SAE, ALIGNS and HAS_PLACE
    import_seconds: float  # neo4j-admin alone
    total_seconds: float  # the whole bulk_load, checks and restarts included
    links: list[str] = field(default_factory=list)

    @property
    def rate(self) -> float:
        """Relationships per second of the whole load."""
        return self.relationships / self.total_seconds if self.total_seconds else 0.0


@dataclass
class PackRows:
    """What the importer does not write of a pack: its Pack node and SAE nodes."""

    name: str
    properties: dict  # graph.pack_properties
    layers: list[int] = field(default_factory=list)
    saes: list[dict] = field(default_factory=list)  # graph.sae_properties of every layer


@dataclass
class LinkRows:
    """A link set to import: its link atlas, and what the importer does not write of it
    (its LinkSet node and LinkPlace nodes)."""

    name: str
    atlas: str  # the link atlas directory, whose matches become ALIGNS rows
    a: str
    b: str
    properties: dict  # links.link_set_properties
    places: dict[str, dict]  # LinkPlace records by place key ("3-res"), in the atlas's order

    def graph_size(self) -> tuple[int, int]:
        """The nodes and relationships it adds: LinkSet and LinkPlace nodes; ALIGNS and HAS_PLACE."""
        aligns = sum(r["n_a"] * r["k"] + r["n_b"] for r in self.places.values())
        return 1 + len(self.places), aligns + len(self.places)


class FeatureIds:
    """The node ids the import files give features: per pack, layer and module, the id of
    index 0 and the width (index i has id first + i)."""

    def __init__(self):
        self._slots: dict[tuple[str, int, str], tuple[int, int]] = {}

    def add(self, pack: str, layer: int, module: str, first: int, width: int) -> None:
        self._slots[(pack, layer, module)] = (first, width)

    def get(self, pack: str, layer: int, module: str) -> tuple[int, int] | None:
        """(id of index 0, width), or None where the files have no such features."""
        return self._slots.get((pack, layer, module))


@dataclass
class ImportFiles:
    """Import files in `directory`: per node label set and relationship type, a header
    file and a data file (names relative to directory), and in import.json this and
    what finish_import writes once they are imported."""

    directory: Path
    nodes: dict[str, list[str]]
    relationships: dict[str, list[str]]
    packs: list[PackRows]
    n_nodes: int = 0  # nodes and relationships in the files
    n_relationships: int = 0
    links: list[LinkRows] = field(default_factory=list)

    def paths(self, names: list[str]) -> list[Path]:
        return [self.directory / name for name in names]

    def save(self) -> None:
        state = {"format": FORMAT, "nodes": self.nodes, "relationships": self.relationships,
                 "n_nodes": self.n_nodes, "n_relationships": self.n_relationships,
                 "packs": [vars(rows) for rows in self.packs], "links": [vars(rows) for rows in self.links]}
        with write_errors(self.directory / MANIFEST):
            _create_private(self.directory / MANIFEST).write_text(json.dumps(state, default=_plain))

    @classmethod
    def open(cls, directory: str | Path) -> ImportFiles:
        """Import files written before (by write_import_files, maybe in another process)."""
        directory = Path(directory).absolute()
        try:
            state = json.loads(regular_file(directory / MANIFEST, "import files").read_text())
        except (OSError, ValueError) as exc:
            raise FlowdbError(f"{directory} holds no flowdb import files ({exc})") from None
        if state.get("format") not in READABLE_FORMATS:
            raise FlowdbError(f"{directory}: import files of format {state.get('format')!r}, "
                              f"this flowdb reads {', '.join(map(str, READABLE_FORMATS))}; write them again")
        return cls(directory, state["nodes"], state["relationships"],
                   [PackRows(**rows) for rows in state["packs"]], state["n_nodes"], state["n_relationships"],
                   [LinkRows(**rows) for rows in state.get("links", [])])


# --- the import files ---------------------------------------------------------------------

class _Group:
    """One header file and one data file, the data streamed in Arrow tables."""

    def __init__(self, directory: Path, stem: str, columns: list[tuple[str, pa.DataType, str]]):
        self.header, self.data = f"{stem}.header.csv", f"{stem}.csv"
        self.paths = [directory / self.header, directory / self.data]
        self.schema = pa.schema([(name, kind) for name, kind, _ in columns])
        self.stream = self.writer = None
        try:
            with write_errors(self.paths[0]):
                _create_private(self.paths[0]).write_text(",".join(h for _, _, h in columns) + "\n")
            with write_errors(self.paths[1]):
                self.stream = pa.OSFile(str(_create_private(self.paths[1])), "wb")
                # Quoting only where needed: numbers go out bare, strings in quotes.
                self.writer = pacsv.CSVWriter(self.stream, self.schema, write_options=pacsv.WriteOptions(
                    include_header=False, batch_size=1 << 16))
        except BaseException:
            self.remove()
            raise
        self.rows = 0

    def write(self, columns: dict[str, object]) -> None:
        table = pa.Table.from_arrays([_arrow(columns[name], kind) for name, kind in
                                      zip(self.schema.names, self.schema.types)], schema=self.schema)
        if table.num_rows:
            with write_errors(self.paths[1]):
                self.writer.write_table(table)
            self.rows += table.num_rows

    def close(self) -> None:
        writer, stream, self.writer, self.stream = self.writer, self.stream, None, None
        with write_errors(self.paths[1]):
            try:
                if writer is not None:
                    writer.close()  # writes what it still holds
            finally:
                if stream is not None:
                    stream.close()

    def remove(self) -> None:
        """Close without a word (the failure that led here says more) and delete both files."""
        with contextlib.suppress(OSError, FlowdbError):
            self.close()
        for path in self.paths:
            path.unlink(missing_ok=True)


def write_import_files(directory: Path, packs: list[BulkPack], links: Sequence[LinkAtlas] = ()) -> ImportFiles:
    """Write the packs' features, Nowhere nodes and edges, and the link sets' ALIGNS, as
    neo4j-admin import files into `directory` (created private), layer by layer. Refuses,
    before anything is imported, packs that share a name, layers whose matches point
    outside their SAEs and link atlases that do not link two of these builds (link_rows)."""
    _check_names(packs)
    linked = link_rows(links, packs)
    directory = private_dir(Path(directory))
    groups: list[_Group] = []
    try:
        return _write_import_files(directory, packs, linked, groups)
    except BaseException:  # nothing half-written is left: every file this call made goes
        for group in groups:
            group.remove()
        (directory / MANIFEST).unlink(missing_ok=True)
        raise


def _write_import_files(directory: Path, packs: list[BulkPack], links: list[LinkRows],
                        groups: list[_Group]) -> ImportFiles:
    def add(stem: str, columns: list[tuple[str, pa.DataType, str]]) -> _Group:
        groups.append(_Group(directory, stem, columns))
        return groups[-1]

    labels = {m.name: f"Feature:{m.label}" for m in MODULES.values()}
    features = {m.name: add(f"features-{m.name}",
                            _ID + _FEATURE_COLUMNS + (_RESIDUAL_COLUMNS if m is RESIDUAL else []))
                for m in MODULES.values()}
    nowhere = add("nowhere", _ID + [("pack", pa.string(), "pack")])
    edges = {m.edge_type: add(f"edges-{m.edge_type}", _EDGE_COLUMNS) for m in MODULES.values()}
    edges[FROM_NOWHERE] = add(f"edges-{FROM_NOWHERE}", _EDGE_COLUMNS[:2])
    edges[ALIGNS] = add(f"edges-{ALIGNS}", _ALIGNS_COLUMNS)
    rows, next_id, pending, ids = [], 0, [], FeatureIds()
    # Arrow formats CSV without the GIL: a layer's groups are written side by side, while
    # the next layer's rows are made (so at most two layers are in memory).
    pool = ThreadPoolExecutor(min(os.cpu_count() or 2, 4), thread_name_prefix="flowdb-csv")
    try:
        for pack in packs:
            pack_rows = PackRows(pack.name, graph.pack_properties(
                pack.name, pack.plan, pack.fingerprint, __version__, pack.backend))
            nowhere_id, next_id = next_id, next_id + 1
            writes = [(nowhere, {"id": [nowhere_id], "pack": [pack.name]})]
            for layer in pack.layers():
                next_id, layer_writes = _layer_rows(pack.name, layer, nowhere_id, next_id, ids, features, edges)
                _finish(pending)
                pending = [pool.submit(group.write, columns) for group, columns in writes + layer_writes]
                writes = []
                pack_rows.layers.append(layer.layer)
                pack_rows.saes.extend(graph.sae_properties(pack.name, layer))
            if not pack_rows.layers:
                raise FlowdbError(f"pack {pack.name!r} has no layers to import")
            rows.append(pack_rows)
        for link in links:
            atlas = LinkAtlas(link.atlas)
            for key in link.places:
                columns = _link_place_rows(link, atlas.read_place(key), ids)
                _finish(pending)
                pending = [pool.submit(edges[ALIGNS].write, columns)]
        _finish(pending)
    finally:
        pool.shutdown(wait=True, cancel_futures=True)  # no write runs on when the files close
        for group in groups:
            group.close()
    files = ImportFiles(
        directory.absolute(),
        {labels[name]: [g.header, g.data] for name, g in features.items() if g.rows}
        | ({"Nowhere": [nowhere.header, nowhere.data]} if nowhere.rows else {}),
        {kind: [g.header, g.data] for kind, g in edges.items() if g.rows},
        rows, sum(g.rows for g in (*features.values(), nowhere)), sum(g.rows for g in edges.values()), links)
    files.save()
    return files


def _finish(writes: list[Future]) -> None:
    for write in writes:
        write.result()


def _layer_rows(pack: str, layer: LayerBuild, nowhere_id: int, next_id: int, ids: FeatureIds,
                features: dict[str, _Group], edges: dict[str, _Group]) -> tuple[int, list[tuple[_Group, dict]]]:
    """One layer's rows for each group (all checked first); its features get the ids from
    next_id on (recorded in ids). Returns the next free id and the rows."""
    number = layer.layer
    if layer.categories is None or layer.thresholds is None:
        raise FlowdbError(f"pack {pack!r}: layer {number} is not classified")
    if ids.get(pack, number, RESIDUAL.name) is not None:
        raise FlowdbError(f"pack {pack!r}: layer {number} comes twice")
    writes = []
    for module in MODULES.values():
        if module.name not in layer.widths:
            continue
        width = int(layer.widths[module.name])
        ids.add(pack, number, module.name, next_id, width)
        index = np.arange(width, dtype=np.int64)
        columns = {"id": next_id + index, "index": index, "pack": pa.repeat(pack, width),
                   "layer": np.full(width, number, dtype=np.int64), "module": pa.repeat(module.name, width),
                   "key": pc.binary_join_element_wise(f"{pack}/{number}/{module.name}/",
                                                      pc.cast(pa.array(index), pa.string()), "")}
        if module is RESIDUAL:
            columns |= {"category": pa.array(layer.categories, pa.string()),
                        **{f"s_{place}": layer.top1(place) for place in MODULES}}
        writes.append((features[module.name], columns))
        next_id += width
    res_first, n_res = ids.get(pack, number, RESIDUAL.name)
    for place, indices in layer.indices.items():
        module = MODULES[place]
        source = module.predecessor_layer(number)
        if ids.get(pack, source, place) is None:
            raise FlowdbError(f"pack {pack!r}: layer {number}'s {module.title} matches point into layer "
                              f"{source}, which is not written before it")
        first, width = ids.get(pack, source, place)
        n, k = indices.shape
        if n != n_res or (indices.size and (indices.min() < 0 or indices.max() >= width)):
            raise FlowdbError(f"pack {pack!r}: layer {number}'s {module.title} matches name features "
                              f"outside its {width} (or its residual rows are not {n_res})")
        writes.append((edges[module.edge_type], {
            "start": first + indices.reshape(-1).astype(np.int64),
            "end": res_first + np.repeat(np.arange(n_res, dtype=np.int64), k),
            "cosine": layer.scores[place].reshape(-1).astype(np.float64),
            "rank": np.tile(np.arange(1, k + 1, dtype=np.int64), n_res),
            "above": layer.above(place).reshape(-1)}))
    marked = np.flatnonzero(np.asarray(layer.categories) == "from-nowhere")
    writes.append((edges[FROM_NOWHERE], {"start": np.full(marked.size, nowhere_id, dtype=np.int64),
                                         "end": res_first + marked.astype(np.int64)}))
    return next_id, writes


def _link_place_rows(link: LinkRows, place, ids: FeatureIds) -> dict[str, object]:
    """The ALIGNS rows of one linked place (a links.PlaceLink), both ways, between the ids
    its two packs' features got; refused when a side's width is not its pack's."""
    starts, ends, sides = [], [], place.directions()
    for side, columns in sides.items():
        own, other = (link.a, link.b) if side == "a" else (link.b, link.a)
        (own_first, own_width), (other_first, other_width) = (
            ids.get(pack, place.layer, place.module) or (0, 0) for pack in (own, other))
        matched = columns["other"]
        if (place.n_a if side == "a" else place.n_b) != own_width or (
                matched.size and not 0 <= matched.min() <= matched.max() < other_width):
            raise FlowdbError(f"link atlas {link.atlas}: layer {place.layer} {place.module} does not fit "
                              f"{own}'s {own_width} and {other}'s {other_width} features there; "
                              "link these builds again")
        starts.append(own_first + columns["index"].astype(np.int64))
        ends.append(other_first + matched.astype(np.int64))
    start = np.concatenate(starts)

    def both(name: str) -> np.ndarray:
        return np.concatenate([columns[name] for columns in sides.values()])

    return {"start": start, "end": np.concatenate(ends), "link": pa.repeat(link.name, start.size),
            "cosine": both("cosine"), "rank": both("rank"), "above": both("above"), "category": both("category")}


def _arrow(values, kind: pa.DataType) -> pa.Array:
    if isinstance(values, pa.Array | pa.ChunkedArray):
        return values.cast(kind) if values.type != kind else values
    if pa.types.is_floating(kind):
        values = np.asarray(values, dtype=np.float64)
        return pa.array(values, kind, mask=np.isnan(values))  # NaN: no such property
    return pa.array(values, kind)


def _check_names(packs: list[BulkPack]) -> None:
    if not packs:
        raise FlowdbError("bulk load needs at least one pack")
    names = [pack.name for pack in packs]
    twice = sorted({name for name in names if names.count(name) > 1})
    if twice:
        raise FlowdbError(f"bulk load got pack {twice[0]!r} more than once; a database holds one "
                          "build of each pack")


def link_rows(atlases: Sequence[LinkAtlas], packs: list[BulkPack]) -> list[LinkRows]:
    """The link sets of these link atlases, each refused in one line unless both its packs
    are among `packs` in the builds it linked (name and fingerprint), it has every place
    the two builds share, and no other link set here has its name."""
    by_name = {pack.name: pack for pack in packs}
    linked: list[LinkRows] = []
    for atlas in atlases:
        info = atlas.info
        name, where = info["name"], atlas.root
        for side in ("a", "b"):
            pack, fingerprint = by_name.get(info[side]), info[f"{side}_fingerprint"]
            if pack is None:
                raise FlowdbError(f"link atlas {where} links pack {info[side]!r}, which is not among the atlases "
                                  f"being imported ({', '.join(by_name)}); import its atlas too or leave the link out")
            if pack.fingerprint != fingerprint:
                raise FlowdbError(f"link atlas {where} links build {fingerprint} of pack {info[side]!r}; the atlas "
                                  f"being imported holds build {pack.fingerprint}: link that build (flowdb link)")
        if name in {rows.name for rows in linked}:
            raise FlowdbError(f"bulk load got link set {name!r} more than once; a database holds one of each name")
        shared = common_places(BuildPlan.from_json(by_name[info["a"]].plan), BuildPlan.from_json(
            by_name[info["b"]].plan), tuple(info["spec"]["modules"]))
        done = atlas.places_done()
        missing = [f"{layer}-{module}" for layer, module in shared if f"{layer}-{module}" not in done]
        if missing:
            raise FlowdbError(f"link atlas {where} lacks layer-module {', '.join(missing)}; finish it "
                              "(flowdb.flow.link_atlas.link_atlas) before importing it")
        linked.append(LinkRows(name, str(where), info["a"], info["b"], link_set_properties(info, atlas.matchers()),
                               {key: atlas.place_record(key) for key in done}))
    return linked


def _plain(value):
    if isinstance(value, np.generic):  # a numpy number among the provenance
        return value.item()
    raise TypeError(f"cannot store {type(value).__name__} in {MANIFEST}")


def _create_private(path: Path) -> Path:
    os.close(os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600))
    return path


# --- the importer -------------------------------------------------------------------------

def import_command(files: ImportFiles, database: str = DATABASE, *, overwrite: bool = False,
                   relative: bool = False) -> list[str]:
    """The neo4j-admin argv that imports `files` into `database` (stopped, and empty or
    absent; overwrite=True adds --overwrite-destination, which deletes whatever store it
    has). relative: file names relative to files.directory, to run from there."""
    def where(names: list[str]) -> str:
        return ",".join(names if relative else (str(p) for p in files.paths(names)))

    return ["neo4j-admin", "database", "import", "full", database, f"--id-type={ID_TYPE}",
            *(["--overwrite-destination"] if overwrite else []),
            *(f"--nodes={labels}={where(names)}" for labels, names in files.nodes.items()),
            *(f"--relationships={kind}={where(names)}" for kind, names in files.relationships.items())]


def bulk_load(server: ManagedServer, packs: list[BulkPack],
              progress: Callable[[str], None] | None = None, links: Sequence[LinkAtlas] = ()) -> BulkReport:
    """Build the managed server's database from packs, and link sets of theirs from link
    atlases, with neo4j-admin's importer.

    Refuses (FlowdbError, nothing changed) when the database holds any node, or a link
    atlas does not link two of these builds (link_rows). The server
    is stopped (while the import files are written) and started again after the import;
    a failed import leaves the database as it was. progress, if given, gets a short line
    as each step begins."""
    say = progress or _quiet
    started = time.perf_counter()
    _check_names(packs)
    linked = link_rows(links, packs)
    with server.importing():
        _require_empty(server)
        _require_space(server, packs, linked)
        work = Path(tempfile.mkdtemp(prefix="files-", dir=private_dir(server.root / "bulk")))
        try:
            say(f"writing import files into {work}; Neo4j is stopped meanwhile")
            # Stopping takes seconds (a checkpoint); it runs while the files are written.
            with ThreadPoolExecutor(1) as pool:
                stopping = pool.submit(server.stop)
                try:
                    files = write_import_files(work, packs, links)
                except BaseException:
                    if stopping.result():  # it was running: it goes on running
                        _restart(server)
                    raise
                stopping.result()
            return _load(server, files, say, started)
        finally:
            shutil.rmtree(work, ignore_errors=True)


def import_files(server: ManagedServer, files: ImportFiles,
                 progress: Callable[[str], None] | None = None) -> BulkReport:
    """Import files from write_import_files into the managed server's database (refused
    when it holds any node), then create the schema and the Pack and SAE nodes."""
    started = time.perf_counter()
    with server.importing():
        _require_empty(server)
        server.stop()
        return _load(server, files, progress or _quiet, started)


def _load(server: ManagedServer, files: ImportFiles, say: Callable[[str], None], started: float) -> BulkReport:
    """Import into the stopped server's empty database, start it and finish the graph."""
    say(f"importing {files.n_nodes:,} nodes and {files.n_relationships:,} relationships with neo4j-admin")
    import_started = time.perf_counter()
    try:
        _import(server, files)
    except BaseException:
        _restart(server)  # on the store as it was
        raise
    import_seconds = time.perf_counter() - import_started
    say("starting Neo4j")
    server.stop()  # the old process, should it still be shutting down its connector
    server.start()
    say("creating constraints and indexes, the Pack and SAE nodes" + (" and the link sets" if files.links else ""))
    with _connect(server) as db:
        nodes, relationships = finish_import(db, files)
    return BulkReport([rows.name for rows in files.packs], files.n_nodes + nodes,
                      files.n_relationships + relationships, import_seconds, time.perf_counter() - started,
                      [rows.name for rows in files.links])


def _restart(server: ManagedServer) -> None:
    """Start the server again after a failure; the failure's own error says more than this one's."""
    try:
        server.stop()
        server.start()
    except FlowdbError:
        pass


def _quiet(_line: str) -> None:
    pass


def finish_import(db: Database, files: ImportFiles) -> tuple[int, int]:
    """After neo4j-admin imported `files` (here, or into a server of the user's own, which
    then has been started): flowdb's constraints and indexes, online, each pack's Pack
    node and SAE nodes, and each link set's LinkSet and LinkPlace nodes, as flowdb link
    writes them; a pack whose Pack node is there already is left alone, a link set is
    finished where it stopped. Returns the nodes and relationships it wrote."""
    # graph.ensure_schema's statements, plain indexes first: on a full store they populate
    # in the background while each constraint builds its own index (2.5 s of 13 at 1.6M nodes).
    for statement in sorted(graph.SCHEMA, key=lambda cypher: "CONSTRAINT" in cypher):
        db.write(statement)
    db.write(f"CALL db.awaitIndexes({INDEX_WAIT_S})")
    nodes = relationships = 0
    for rows in files.packs:
        if graph.read_pack(db, rows.name) is None:
            graph.store_complete_pack(db, rows.properties, rows.layers, rows.saes)
            nodes, relationships = nodes + 1 + len(rows.saes), relationships + len(rows.saes)
    for link in files.links:
        stored = graph.read_link(db, link.name)
        if stored is None:
            graph.begin_link(db, link.properties)
            nodes += 1
        elif stored["status"] == "complete":
            continue
        done = set(stored["places_done"]) if stored else set()
        for key, record in link.places.items():
            if key not in done:
                graph.write_link_record(db, link.name, key, record)
                nodes, relationships = nodes + 1, relationships + 1
        graph.finish_link(db, link.name)
    return nodes, relationships


def _require_empty(server: ManagedServer) -> None:
    store, _ = server.store_dirs(DATABASE)
    if server.pid() is None and not store.exists():
        return  # never started: there is no store yet
    server.start()
    with _connect(server) as db:
        nodes = graph.count_nodes(db)
    if nodes:
        raise FlowdbError(
            f"the managed Neo4j under {server.root} already holds {nodes:,} node{'s' * (nodes != 1)}; "
            "a bulk load only builds a new database: use flowdb load without --bulk, "
            "or delete its packs first (flowdb packs lists them; flowdb delete PACK --yes)")


def _require_space(server: ManagedServer, packs: list[BulkPack], links: list[LinkRows]) -> None:
    """Refuse before the import files are written when the store's disk cannot take them
    and the store they become (BULK_COST counts both)."""
    sizes = [item.graph_size() for item in (*packs, *links)]
    nodes, relationships = sum(n for n, _ in sizes), sum(r for _, r in sizes)
    server.require_space(BULK_COST.bytes(nodes, relationships),
                         f"bulk-loading {', '.join(pack.name for pack in packs)} "
                         f"({nodes:,} nodes, {relationships:,} relationships)")


def _import(server: ManagedServer, files: ImportFiles) -> None:
    """Run the importer with the old store moved aside; put it back if the import fails."""
    work = Path(tempfile.mkdtemp(prefix="import-", dir=private_dir(server.root / "bulk")))
    moved = []
    try:
        for path in server.store_dirs(DATABASE):
            if path.exists():
                target = work / path.parent.name
                path.rename(target)
                moved.append((path, target))
        log = private_dir(server.root / "logs") / "bulk-import.log"
        args = import_command(files, DATABASE, relative=True)[1:]
        status = server.admin([*args, "--verbose", f"--report-file={work / 'import.report'}", *_tuning()],
                              log, cwd=files.directory)
        if status != 0:
            raise FlowdbError(f"neo4j-admin import failed: {_key_error(log)}; the database is as "
                              f"before (log: {log})")
    except BaseException:
        for path in server.store_dirs(DATABASE):
            shutil.rmtree(path, ignore_errors=True)
        for path, target in moved:
            target.rename(path)
        raise
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _tuning() -> list[str]:
    threads, memory = import_threads(), import_memory()
    return [*([f"--threads={threads}"] if threads else []),
            *([f"--max-off-heap-memory={memory}"] if memory else [])]


def _key_error(log: Path) -> str:
    """The line of the importer's output that says what went wrong."""
    try:
        lines = [line.strip() for line in log.read_text(errors="replace").splitlines() if line.strip()]
    except OSError:
        return "(no output)"
    for pattern in (r"^original error: (.+)", r"^Caused by: [\w.$]+: (?!.*ERROR in input)(.+)",
                    r"^(?:[\w.$]+(?:Exception|Error)): (.+)"):
        found = [m.group(1) for line in lines if (m := re.match(pattern, line))]
        if found:
            return found[-1]
    return lines[-1] if lines else "(no output)"


def _connect(server: ManagedServer) -> Database:
    from neo4j import GraphDatabase

    auth = server.auth()
    with neo4j_errors(uri=server.uri):
        driver = GraphDatabase.driver(server.uri, auth=auth, connection_timeout=10,
                                      notifications_min_severity="OFF")
    return Database(driver, None, server.uri, auth[0])
