"""The three places a pack's SAEs read, and everything that differs between them.

A residual feature at R_L is matched against R_{L-1}, M_L and A_L. Everything else
(the Neo4j label, the edge type, the sae-lens hook, which layer holds the
predecessor) is read from this table, so nothing re-codes the vocabulary.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Module:
    name: str  # res | mlp | att: the manifest key and the MODULE part of a feature key
    label: str  # Neo4j node label of its features (besides :Feature)
    edge_type: str  # relationship type from its features into residual features
    hook: str  # where its SAE reads in layer L: blocks.L.<hook>
    title: str  # what people call it
    predecessor_offset: int  # a residual feature at L finds its predecessor here at L + offset

    @property
    def kind(self) -> str:
        """The edge kind as query results and exports spell it."""
        return self.edge_type.lower()

    def predecessor_layer(self, layer: int) -> int:
        return layer + self.predecessor_offset


RESIDUAL = Module("res", "Residual", "RESIDUAL", "hook_resid_post", "residual", -1)
MLP = Module("mlp", "MLP", "MLP", "hook_mlp_out", "MLP", 0)
ATTENTION = Module("att", "Attention", "ATTENTION", "hook_attn_out", "attention", 0)

MODULES: dict[str, Module] = {m.name: m for m in (RESIDUAL, MLP, ATTENTION)}
NAMES = tuple(MODULES)  # ("res", "mlp", "att"), also the predecessor places R_{L-1}, M_L, A_L
BY_KIND: dict[str, Module] = {m.kind: m for m in MODULES.values()}


def feature_key(pack: str, layer: int, module: str, index: int) -> str:
    return f"{pack}/{layer}/{module}/{index}"


def sae_key(pack: str, layer: int, module: str) -> str:
    return f"{pack}/{layer}/{module}"
