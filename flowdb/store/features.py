"""Feature references a researcher can type, resolved to stored keys.

Accepted wherever a feature is:
    PACK/LAYER/MODULE/INDEX                               flowdb's own key
    https://www.neuronpedia.org/MODEL/SOURCE/INDEX        a Neuronpedia feature page
    MODEL/SOURCE/INDEX                                    Neuronpedia's (modelId, source, index)
The last two resolve through each stored SAE's Neuronpedia source. A reference that
names no stored feature is an error naming what does exist (packs, layers, width).
"""

from __future__ import annotations

import re
from urllib.parse import urlparse

from flowdb.errors import NotFound, QueryError
from flowdb.modules import feature_key
from flowdb.store import graph

# The forms as a reader recognises them: numbers are any run of digits (\d takes "٣" and "３"
# too), so that a number written wrongly (a leading zero, a non-ASCII digit) is read as one and
# refused by number() with what is wrong, not looked up as a feature that is not there.
_KEY = re.compile(r"^([^/\s]+)/(\d+)/([a-z]+)/(\d+)$")
_NEURONPEDIA = re.compile(r"^([^/\s]+)/([^/\s]+)/(\d+)$")
_CANONICAL = re.compile(r"(0|[1-9][0-9]*)")


def number(text: str, part: str, name: str) -> int:
    """One number of a reference (a layer, an index) as a stored key writes it: ASCII digits,
    no leading zero. QueryError naming the fault otherwise."""
    if not (part.isascii() and part.isdigit()):
        raise QueryError(f"{text!r}: the {name} {part!r} is not written in ASCII digits 0-9")
    if not _CANONICAL.fullmatch(part):
        raise QueryError(f"{text!r}: the {name} {part!r} has a leading zero; write {int(part)}")
    return int(part)


def parse_key(text: str) -> tuple[str, int, str, int]:
    """PACK/LAYER/MODULE/INDEX as (pack, layer, module, index): the one reader of flowdb's key;
    QueryError naming the fault in a key-shaped text that is not one."""
    match = _KEY.match(text)
    if not match:
        raise QueryError(f"{text!r} is not a feature key PACK/LAYER/MODULE/INDEX (e.g. planted/3/res/0)")
    pack, layer, module, index = match.groups()
    return pack, number(text, layer, "layer"), module, number(text, index, "index")


def is_key(text: str) -> bool:
    """Whether text is flowdb's own key, PACK/LAYER/MODULE/INDEX, written as stored."""
    try:
        parse_key(text)
    except QueryError:
        return False
    return True


def is_reference(text: str) -> bool:
    """Whether text reads as a feature reference (any of the three forms), not as words."""
    text = str(text).strip()
    return bool(text.startswith(("http://", "https://")) or _KEY.match(text) or _NEURONPEDIA.match(text))


def resolve_feature(db, reference: str) -> str:
    """The stored key a reference names; QueryError (one line) when it names none."""
    text = str(reference).strip()
    if text.startswith(("http://", "https://")):
        path = urlparse(text).path.strip("/")
        if not _NEURONPEDIA.match(path):
            raise QueryError(f"{text!r} is not a Neuronpedia feature URL (…/MODEL/SOURCE/INDEX)")
        return _from_neuronpedia(db, text, *_NEURONPEDIA.match(path).groups())
    if _KEY.match(text):
        pack, layer, module, index = parse_key(text)
        if graph.feature_exists(db, text):
            return text
        raise NotFound(_missing(db, text, pack, str(layer), module, str(index)))
    neuronpedia = _NEURONPEDIA.match(text)
    if neuronpedia:
        return _from_neuronpedia(db, text, *neuronpedia.groups())
    raise QueryError(f"{text!r} is not a feature reference: use PACK/LAYER/MODULE/INDEX (e.g. "
                     "planted/3/res/0), a Neuronpedia URL, or MODEL/SOURCE/INDEX")


def _from_neuronpedia(db, text: str, model: str, source: str, index: str) -> str:
    index = str(number(text, index, "index"))
    matches = graph.saes_with_neuronpedia_source(db, model, source)
    if not matches:
        raise NotFound(f"{text!r}: no stored pack has Neuronpedia source {model}/{source}")
    in_range = [m for m in matches if int(index) < (m["n"] or 0)]
    if not in_range:
        raise NotFound(f"{text!r}: index {index} is beyond the SAE's width {matches[0]['n']}")
    chosen = in_range[0]  # several packs may share a source: the first by name
    return feature_key(chosen["pack"], chosen["layer"], chosen["module"], int(index))


def _missing(db, text: str, pack: str, layer: str, module: str, index: str) -> str:
    """What a key that names nothing gets wrong, with what does exist."""
    record = graph.read_pack(db, pack) if "~" not in pack else None
    if record is None:
        names = [row["name"] for row in graph.list_packs(db)]
        return f"no feature {text!r}: no pack named {pack!r}; stored packs: {', '.join(names) or 'none'}"
    if not record.first_layer <= int(layer) <= record.last_layer:
        return (f"no feature {text!r}: pack {pack!r} has layers {record.first_layer}-{record.last_layer}")
    widths = graph.module_widths(db, pack, int(layer))
    if module not in widths:
        return (f"no feature {text!r}: pack {pack!r} has modules {', '.join(sorted(widths)) or 'none'} "
                f"at layer {layer}")
    return f"no feature {text!r}: {module} at layer {layer} of pack {pack!r} has indexes 0-{widths[module] - 1}"
