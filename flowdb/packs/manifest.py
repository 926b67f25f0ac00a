"""Pack manifests: what to build, as typed, strictly checked TOML.

    name = "gpt2-small-jb-oai"        # unique pack name
    model = "gpt2-small"              # model id (Neuronpedia modelId where one exists)
    layers = [0, 11]                  # inclusive
    [match]                           # optional
    k = 1
    score = "decoder"                 # or "encoder": query with R_L's W_enc columns, not its W_dec rows
    [classify]                        # optional, see flowdb.classify
    t_res = 0.5
    [modules.res]                     # modules: res, mlp, att
    release = "gpt2-small-res-jb"     # exactly one source: path, npz, or release + sae_id
    sae_id = "blocks.{layer+1}.hook_resid_pre"
    neuronpedia = "{layer+1}-res-jb"  # optional Neuronpedia source
    [modules.res.at.11]               # optional per-layer override of the source
    sae_id = "blocks.11.hook_resid_post"
    [modules.mlp]                     # or a circuit-tracer transcoder set (mlp only):
    transcoders = "path/to/set"       # config.yaml + layer_{i}.safetensors, see flowdb.packs.transcoders

Templates may use {layer}, {layer+N}, {layer-N} and {flowdb_home} (FLOWDB_HOME, for
packs that flowdb builds and caches there).
"""

from __future__ import annotations

import os
import re
import tomllib
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import Field, ValidationError

from flowdb.classify import ClassifyTable, Thresholds
from flowdb.errors import ManifestError
from flowdb.files import read_small_text
from flowdb.modules import NAMES as MODULES
from flowdb.schema import NonEmpty, Strict, explain
from flowdb.settings import flowdb_home

MAX_K = 10
# What a residual feature is matched by: its decoder row (the paper's cosine) or its
# encoder column (the direction it reads); the base is always the predecessors' decoder rows.
SCORES = ("decoder", "encoder")
DEFAULT_SCORE = "decoder"
# A pack name becomes part of file names (the atlas FLOWDB_HOME/atlas/NAME-FINGERPRINT
# and its lock and dot-files), so it is short and plain: far below the 255 bytes of a name.
MAX_PACK_NAME = 100
PACK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
PACK_NAME_RULE = (f"at most {MAX_PACK_NAME} characters: letters, digits, '.', '_' or '-', "
                  "starting with a letter or digit")
_TEMPLATE_FIELD = re.compile(r"\{([^{}]*)\}")
_LAYER_FIELD = re.compile(r"^layer(?:([+-])(\d+))?$")
_SOURCE_KEYS = ("path", "npz", "release", "transcoders")
TRANSCODER_MODULE = "mlp"  # a transcoder writes the MLP output: the one slot a set fills


@dataclass(frozen=True)
class SourceRef:
    """Where the SAE of one module at one layer comes from."""

    module: str
    layer: int
    kind: str  # "path" | "npz" | "release" | "transcoders"
    location: str  # file or directory path (a transcoder set's directory), or the release name
    sae_id: str | None = None
    neuronpedia: str | None = None  # Neuronpedia source, e.g. "12-gemmascope-res-16k"
    project_model: str | None = None  # a hook_z SAE projected through this model's W_O

    def describe(self) -> str:
        if self.kind == "release":
            return f"release {self.location} / {self.sae_id}"
        return f"{self.kind} {self.location}"


@dataclass(frozen=True)
class ModuleSpec:
    name: str
    fields: dict[str, str]
    overrides: dict[int, dict[str, str]] = field(default_factory=dict)

    def resolve(self, layer: int, base_dir: Path) -> SourceRef:
        merged = merge_override(self.fields, self.overrides.get(layer, {}))
        kind = next(k for k in _SOURCE_KEYS if k in merged)
        where = f"modules.{self.name}"
        location = render(merged[kind], layer, where)
        if kind in ("path", "npz", "transcoders"):
            # Absolute without following links: a symlink loop is reported by the
            # source check, not raised here.
            location = os.path.abspath(base_dir / location)
        sae_id = render(merged["sae_id"], layer, where) if kind == "release" else None
        neuronpedia = render(merged["neuronpedia"], layer, where) if "neuronpedia" in merged else None
        project_model = None
        if "project" in merged:
            project_model = render(merged["project_model"], layer, where)
            if project_model.startswith((".", "/")) or (base_dir / project_model).is_dir():
                project_model = os.path.abspath(base_dir / project_model)  # a local checkpoint
        return SourceRef(self.name, layer, kind, location, sae_id, neuronpedia, project_model)


@dataclass(frozen=True)
class Manifest:
    name: str
    model: str
    first_layer: int
    last_layer: int
    modules: dict[str, ModuleSpec]
    k: int
    thresholds: Thresholds
    path: Path
    score: str = DEFAULT_SCORE

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.last_layer + 1)

    def source(self, module: str, layer: int) -> SourceRef | None:
        spec = self.modules.get(module)
        return spec.resolve(layer, self.path.parent) if spec else None

    def sources(self) -> list[SourceRef]:
        return [self.source(m, layer) for layer in self.layers for m in MODULES if m in self.modules]

    def with_thresholds(self, overrides: dict) -> Manifest:
        """This manifest with some threshold settings replaced (t_res, t_mlp, t_att, rule),
        checked as the manifest's own are."""
        try:
            thresholds = replace(self.thresholds, **overrides)
        except ValueError as exc:
            raise ManifestError(f"threshold option: {exc}") from None
        return replace(self, thresholds=thresholds)


def render(template: str, layer: int, where: str) -> str:
    def substitute(match: re.Match) -> str:
        if match.group(1) == "flowdb_home":
            return str(flowdb_home())
        parsed = _LAYER_FIELD.match(match.group(1).replace(" ", ""))
        if not parsed:
            raise ManifestError(
                f"{where}: unknown template field {{{match.group(1)}}} in {template!r}; "
                "use {layer}, {layer+N}, {layer-N} or {flowdb_home}")
        sign, offset = parsed.groups()
        value = layer + (int(offset) if sign == "+" else -int(offset) if sign == "-" else 0)
        if value < 0:
            raise ManifestError(f"{where}: {template!r} names layer {value} at layer {layer}")
        return str(value)

    return _TEMPLATE_FIELD.sub(substitute, template)


def load_manifest(path: str | Path, *, k: int | None = None,
                  thresholds: Thresholds | None = None) -> Manifest:
    """Parse and check a manifest; k and thresholds given here override the file."""
    path = Path(path)
    try:
        raw = tomllib.loads(read_small_text(path, "manifest", error=ManifestError))
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest") from None
    except (OSError, UnicodeDecodeError, RuntimeError) as exc:
        raise ManifestError(f"{path}: cannot read manifest ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{path}: invalid TOML ({exc})") from None
    return parse_manifest(raw, path, k=k, thresholds=thresholds)


class SourceTable(Strict):
    """Where one module's SAE comes from: exactly one of path, npz, release (+ sae_id), or
    transcoders (a circuit-tracer transcoder set, in [modules.mlp] only)."""

    path: NonEmpty | None = None
    npz: NonEmpty | None = None
    release: NonEmpty | None = None
    transcoders: NonEmpty | None = None
    sae_id: NonEmpty | None = None
    neuronpedia: NonEmpty | None = None
    # hook_z SAEs: project decoder rows into the residual space through W_O of this
    # model (a Hub id, a local transformers directory, or "smollm2-135m").
    project: Literal["W_O"] | None = None
    project_model: NonEmpty | None = None


class ModuleTable(SourceTable):
    at: dict[str, SourceTable] = {}  # per-layer overrides, keyed by layer number


class MatchTable(Strict):
    k: Annotated[int, Field(strict=True, ge=1, le=MAX_K)] = 1
    score: Literal[SCORES] = DEFAULT_SCORE


class ManifestTable(Strict):
    """The whole manifest: the one schema every key is checked against."""

    name: Annotated[str, Field(strict=True, pattern=PACK_NAME.pattern, max_length=MAX_PACK_NAME)]
    model: NonEmpty
    layers: Annotated[list[Annotated[int, Field(strict=True, ge=0)]], Field(min_length=2, max_length=2)]
    match: MatchTable = MatchTable()
    classify: ClassifyTable = ClassifyTable()
    modules: dict[Literal["res", "mlp", "att"], ModuleTable]


def parse_manifest(raw: dict[str, Any], path: Path, *, k: int | None = None,
                   thresholds: Thresholds | None = None) -> Manifest:
    def fail(message: str) -> ManifestError:
        return ManifestError(f"{path}: {message}")

    try:
        table = ManifestTable.model_validate(raw)
    except ValidationError as exc:
        raise fail(_manifest_message(exc)) from None
    first, last = table.layers
    if first > last:
        raise fail(f"layers must be [first, last] with 0 <= first <= last, got {list(table.layers)!r}")
    if k is not None and not 1 <= k <= MAX_K:
        raise fail(f"k must be an integer from 1 to {MAX_K}, got {k!r}")
    if thresholds is None:
        try:
            thresholds = Thresholds.from_mapping(raw.get("classify", {}))
        except ValueError as exc:
            raise fail(str(exc)) from None
    modules = {name: _module_spec(name, spec, fail) for name, spec in table.modules.items()}
    if "res" not in table.modules:
        only = " (a transcoder set fills [modules.mlp] beside residual SAEs)" if any(
            "transcoders" in spec.fields for spec in modules.values()) else ""
        raise fail(f"[modules.res] is required: residual features are what gets matched{only}")
    manifest = Manifest(table.name, table.model, first, last, modules,
                        k if k is not None else table.match.k, thresholds, path, table.match.score)
    manifest.sources()  # every template rendered at every layer fails now, not mid-build
    return manifest


def _manifest_message(exc: ValidationError) -> str:
    problem = exc.errors()[0]
    loc = tuple(str(p) for p in problem["loc"])
    if loc == ("name",) and problem["type"] != "missing":
        return pack_name_problem(problem["input"])
    if loc[:1] == ("layers",) and problem["type"] != "missing":
        return f"layers must be [first, last] with 0 <= first <= last, got {raw_input(exc)!r}"
    if loc == ("match", "k"):
        return f"k must be an integer from 1 to {MAX_K}, got {problem['input']!r}"
    if loc == ("match", "score"):
        return f"[match] score must be {' or '.join(repr(s) for s in SCORES)}, got {problem['input']!r}"
    return explain(exc, ManifestTable, "the manifest")


def pack_name_problem(name) -> str:
    shown = repr(name) if not isinstance(name, str) or len(name) <= 40 else f"{name[:40]!r}... ({len(name)} characters)"
    return f"pack name {shown} is not allowed: {PACK_NAME_RULE}"


def check_pack_name(name: str) -> str:
    """The name, or ManifestError saying what a pack name may be."""
    if not isinstance(name, str) or len(name) > MAX_PACK_NAME or not PACK_NAME.match(name):
        raise ManifestError(pack_name_problem(name))
    return name


def raw_input(exc: ValidationError):
    return exc.errors()[0]["input"]


def _module_spec(name: str, table: ModuleTable, fail) -> ModuleSpec:
    where = f"[modules.{name}]"
    fields = {k: v for k, v in table.model_dump(exclude={"at"}).items() if v is not None}
    _check_source(fields, where, fail)
    for value in fields.values():
        render(value, 1 << 20, where)  # an unknown template field fails now (any layer will do)
    overrides: dict[int, dict[str, str]] = {}
    for layer_key, override in table.at.items():
        sub = f"[modules.{name}.at.{layer_key}]"
        if not layer_key.isdigit():
            raise fail(f"{sub}: per-layer overrides are tables keyed by a layer number")
        values = {k: v for k, v in override.model_dump().items() if v is not None}
        _check_source(merge_override(fields, values), sub, fail)
        for value in values.values():
            render(value, 1 << 20, sub)
        overrides[int(layer_key)] = values
    return ModuleSpec(name, fields, overrides)


def merge_override(fields: dict[str, str], override: dict[str, str]) -> dict[str, str]:
    """A per-layer override; one that names a source replaces the whole source."""
    if any(key in override for key in _SOURCE_KEYS):
        fields = {k: v for k, v in fields.items() if k not in (*_SOURCE_KEYS, "sae_id")}
    return {**fields, **override}


def _check_source(fields: dict, where: str, fail) -> None:
    present = [k for k in _SOURCE_KEYS if k in fields]
    if len(present) != 1:
        found = ", ".join(present) or "none"
        raise fail(f"{where} needs exactly one source (path, npz, transcoders, or release + sae_id); "
                   f"found: {found}")
    if present[0] == "release" and "sae_id" not in fields:
        raise fail(f"{where}: release needs sae_id")
    if present[0] != "release" and "sae_id" in fields:
        raise fail(f"{where}: sae_id goes with release only")
    if present[0] == "transcoders":
        module = where.removeprefix("[modules.").split(".")[0].rstrip("]")
        if module != TRANSCODER_MODULE:
            raise fail(f"{where}: a transcoder set writes the MLP output (hook_mlp_out), so it goes in "
                       f"[modules.{TRANSCODER_MODULE}] only")
        if "project" in fields:
            raise fail(f"{where}: project = \"W_O\" is for attention hook_z SAEs, not transcoders")
    if ("project" in fields) != ("project_model" in fields):
        raise fail(f"{where}: project = \"W_O\" and project_model (the model whose W_O is used) go together")
