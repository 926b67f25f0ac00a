"""Pack manifests: what to build, as typed, strictly checked TOML.

    name = "gpt2-small-jb-oai"        # unique pack name
    model = "gpt2-small"              # model id (Neuronpedia modelId where one exists)
    layers = [0, 11]                  # inclusive
    [match]                           # optional
    k = 1
    [classify]                        # optional, see flowdb.classify
    t_res = 0.5
    [modules.res]                     # modules: res, mlp, att
    release = "gpt2-small-res-jb"     # exactly one source: path, npz, or release + sae_id
    sae_id = "blocks.{layer+1}.hook_resid_pre"
    neuronpedia = "{layer+1}-res-jb"  # optional Neuronpedia source
    [modules.res.at.11]               # optional per-layer override of the source
    sae_id = "blocks.11.hook_resid_post"

Templates may use {layer}, {layer+N}, {layer-N} and {flowdb_home} (FLOWDB_HOME, for
packs that flowdb builds and caches there).
"""

from __future__ import annotations

import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from flowdb.classify import Thresholds
from flowdb.errors import ManifestError
from flowdb.settings import flowdb_home

MODULES = ("res", "mlp", "att")
MAX_K = 10
PACK_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*$")
_TEMPLATE_FIELD = re.compile(r"\{([^{}]*)\}")
_LAYER_FIELD = re.compile(r"^layer(?:([+-])(\d+))?$")
_SOURCE_KEYS = ("path", "npz", "release")
_MODULE_KEYS = {"path", "npz", "release", "sae_id", "neuronpedia", "at"}
_OVERRIDE_KEYS = {"path", "npz", "release", "sae_id", "neuronpedia"}
_TOP_KEYS = {"name", "model", "layers", "match", "classify", "modules"}


@dataclass(frozen=True)
class SourceRef:
    """Where the SAE of one module at one layer comes from."""

    module: str
    layer: int
    kind: str  # "path" | "npz" | "release"
    location: str  # file or directory path, or the release name
    sae_id: str | None = None
    neuronpedia: str | None = None  # Neuronpedia source, e.g. "12-gemmascope-res-16k"

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
        if kind in ("path", "npz"):
            location = str((base_dir / location).resolve())
        sae_id = render(merged["sae_id"], layer, where) if kind == "release" else None
        neuronpedia = render(merged["neuronpedia"], layer, where) if "neuronpedia" in merged else None
        return SourceRef(self.name, layer, kind, location, sae_id, neuronpedia)


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

    @property
    def layers(self) -> range:
        return range(self.first_layer, self.last_layer + 1)

    def source(self, module: str, layer: int) -> SourceRef | None:
        spec = self.modules.get(module)
        return spec.resolve(layer, self.path.parent) if spec else None

    def sources(self) -> list[SourceRef]:
        return [self.source(m, layer) for layer in self.layers for m in MODULES if m in self.modules]


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
        return str(value)

    return _TEMPLATE_FIELD.sub(substitute, template)


def load_manifest(path: str | Path, *, k: int | None = None,
                  thresholds: Thresholds | None = None) -> Manifest:
    """Parse and check a manifest; k and thresholds given here override the file."""
    path = Path(path)
    try:
        raw = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise ManifestError(f"{path}: no such manifest") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ManifestError(f"{path}: cannot read manifest ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise ManifestError(f"{path}: invalid TOML ({exc})") from None
    return parse_manifest(raw, path, k=k, thresholds=thresholds)


def parse_manifest(raw: dict[str, Any], path: Path, *, k: int | None = None,
                   thresholds: Thresholds | None = None) -> Manifest:
    def fail(message: str) -> ManifestError:
        return ManifestError(f"{path}: {message}")

    _reject_unknown(raw, _TOP_KEYS, "the manifest", fail)
    for key in ("name", "model", "layers", "modules"):
        if key not in raw:
            raise fail(f"missing required key '{key}'")
    name, model = raw["name"], raw["model"]
    if not isinstance(name, str) or not PACK_NAME.match(name):
        raise fail(f"name {name!r} must be letters, digits, '.', '_' or '-' (no '/')")
    if not isinstance(model, str) or not model:
        raise fail("model must be a non-empty string")
    layers = raw["layers"]
    if (not isinstance(layers, list) or len(layers) != 2
            or not all(isinstance(x, int) and not isinstance(x, bool) for x in layers)
            or not 0 <= layers[0] <= layers[1]):
        raise fail(f"layers must be [first, last] with 0 <= first <= last, got {layers!r}")

    match = raw.get("match", {})
    _reject_unknown(match, {"k"}, "[match]", fail)
    k = k if k is not None else match.get("k", 1)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_K:
        raise fail(f"k must be an integer from 1 to {MAX_K}, got {k!r}")

    if thresholds is None:
        try:
            thresholds = Thresholds.from_mapping(raw.get("classify", {}))
        except ValueError as exc:
            raise fail(f"[classify]: {exc}") from None

    modules_raw = raw["modules"]
    if not isinstance(modules_raw, dict):
        raise fail("[modules] must be a table")
    _reject_unknown(modules_raw, set(MODULES), "[modules]", fail)
    if "res" not in modules_raw:
        raise fail("[modules.res] is required: residual features are what gets matched")
    modules = {name: _parse_module(name, spec, fail) for name, spec in modules_raw.items()}
    return Manifest(name, model, layers[0], layers[1], modules, k, thresholds, path)


def _parse_module(name: str, spec: Any, fail) -> ModuleSpec:
    where = f"[modules.{name}]"
    if not isinstance(spec, dict):
        raise fail(f"{where} must be a table")
    _reject_unknown(spec, _MODULE_KEYS, where, fail)
    fields = {key: value for key, value in spec.items() if key != "at"}
    _check_source(fields, where, fail)
    for value in fields.values():
        render(value, 0, where)  # a bad template field fails now, not mid-build
    overrides: dict[int, dict[str, str]] = {}
    for layer_key, override in spec.get("at", {}).items():
        sub = f"[modules.{name}.at.{layer_key}]"
        if not str(layer_key).isdigit() or not isinstance(override, dict):
            raise fail(f"{sub}: per-layer overrides are tables keyed by a layer number")
        _reject_unknown(override, _OVERRIDE_KEYS, sub, fail)
        _check_source(merge_override(fields, override), sub, fail)
        overrides[int(layer_key)] = override
    return ModuleSpec(name, fields, overrides)


def merge_override(fields: dict[str, str], override: dict[str, str]) -> dict[str, str]:
    """A per-layer override; one that names a source replaces the whole source."""
    if any(key in override for key in _SOURCE_KEYS):
        fields = {k: v for k, v in fields.items() if k not in (*_SOURCE_KEYS, "sae_id")}
    return {**fields, **override}


def _check_source(fields: dict, where: str, fail) -> None:
    for key, value in fields.items():
        if not isinstance(value, str) or not value:
            raise fail(f"{where}: '{key}' must be a non-empty string")
    present = [k for k in _SOURCE_KEYS if k in fields]
    if len(present) != 1:
        found = ", ".join(present) or "none"
        raise fail(f"{where} needs exactly one source (path, npz, or release + sae_id); found: {found}")
    if present[0] == "release" and "sae_id" not in fields:
        raise fail(f"{where}: release needs sae_id")
    if present[0] != "release" and "sae_id" in fields:
        raise fail(f"{where}: sae_id goes with release only")


def _reject_unknown(table: Any, allowed: set[str], where: str, fail) -> None:
    if not isinstance(table, dict):
        raise fail(f"{where} must be a table")
    unknown = sorted(set(table) - allowed)
    if unknown:
        raise fail(f"unknown key(s) {', '.join(map(repr, unknown))} in {where}; "
                   f"valid keys: {', '.join(sorted(allowed))}")
