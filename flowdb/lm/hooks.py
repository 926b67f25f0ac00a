"""Hook points on Hugging Face causal LMs, named as sae-lens/TransformerLens name them.

    blocks.L.hook_resid_pre    input of decoder block L            (R_{L-1})
    blocks.L.hook_resid_post   output of decoder block L           (R_L)
    blocks.L.hook_attn_out     what attention adds to the residual (A_L)
    blocks.L.hook_mlp_out      what the MLP adds to the residual   (M_L)
    blocks.L.attn.hook_z       concatenated head outputs, the input of the output projection

Each architecture says which module produces each of these. Gemma 2 normalises
attention and MLP outputs before adding them (post_attention_layernorm,
post_feedforward_layernorm), so A_L and M_L are those norms' outputs; Llama-family
models and GPT-2 add the attention and MLP outputs directly. Hooks are applied only
inside `capture` and `intervene`, which remove them on exit, errors included.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

from flowdb.errors import FlowdbError
from flowdb.modules import MODULES

# Where the SAE of each pack module reads: R_L, M_L and A_L of layer L.
MODULE_HOOKS = {module.name: module.hook for module in MODULES.values()}
HOOK_NAME = re.compile(r"^blocks\.(\d+)\.(hook_resid_pre|hook_resid_post|hook_attn_out|hook_mlp_out|attn\.hook_z)$")


def hook_point(module: str, layer: int) -> str:
    return f"blocks.{layer}.{MODULE_HOOKS[module]}"


@dataclass(frozen=True)
class Architecture:
    blocks: str  # dotted path to the list of decoder blocks
    attn_out: str  # in a block: the module whose output is A_L
    mlp_out: str  # in a block: the module whose output is M_L
    z_input: str  # in a block: the module whose input is hook_z


_LLAMA = Architecture("model.layers", "self_attn", "mlp", "self_attn.o_proj")
ARCHITECTURES = {
    "llama": _LLAMA,
    "mistral": _LLAMA,
    "qwen2": _LLAMA,
    "gemma2": Architecture("model.layers", "post_attention_layernorm", "post_feedforward_layernorm",
                           "self_attn.o_proj"),
    "gpt2": Architecture("transformer.h", "attn", "mlp", "attn.c_proj"),
}


def architecture(model) -> Architecture:
    model_type = getattr(model.config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise FlowdbError(f"no hook map for model type {model_type!r}; "
                          f"known: {', '.join(sorted(ARCHITECTURES))}")
    return ARCHITECTURES[model_type]


def _get(module, dotted: str):
    for part in dotted.split("."):
        module = getattr(module, part)
    return module


def blocks(model):
    return _get(model, architecture(model).blocks)


def resolve(model, hook_name: str):
    """The module and whether the hook reads its input ('input') or output ('output')."""
    match = HOOK_NAME.match(hook_name)
    if not match:
        raise FlowdbError(f"unknown hook point {hook_name!r}; expected blocks.L.hook_resid_pre|"
                          "hook_resid_post|hook_attn_out|hook_mlp_out or blocks.L.attn.hook_z")
    layer, point = int(match.group(1)), match.group(2)
    arch = architecture(model)
    layers = _get(model, arch.blocks)
    if layer >= len(layers):
        raise FlowdbError(f"hook point {hook_name}: the model has {len(layers)} blocks")
    block = layers[layer]
    return {
        "hook_resid_pre": (block, "input"),
        "hook_resid_post": (block, "output"),
        "hook_attn_out": (_get(block, arch.attn_out), "output"),
        "hook_mlp_out": (_get(block, arch.mlp_out), "output"),
        "attn.hook_z": (_get(block, arch.z_input), "input"),
    }[point]


def _first(value):
    return value[0] if isinstance(value, tuple) else value


def _replace_first(value, new):
    return (new, *value[1:]) if isinstance(value, tuple) else new


@contextmanager
def intervene(model, edits: dict[str, Callable]) -> Iterator[None]:
    """Within the block, each hook point's activation [batch, pos, d] passes through
    its edit function (which returns the new activation)."""
    handles = []
    try:
        for name, edit in edits.items():
            module, where = resolve(model, name)
            if where == "output":
                handles.append(module.register_forward_hook(
                    lambda _m, _args, output, edit=edit: _replace_first(output, edit(_first(output)))))
            else:
                handles.append(module.register_forward_pre_hook(
                    lambda _m, args, kwargs, edit=edit: _edit_input(args, kwargs, edit), with_kwargs=True))
        yield
    finally:
        for handle in handles:
            handle.remove()


def _edit_input(args, kwargs, edit):
    if args:
        return (edit(args[0]), *args[1:]), kwargs
    key = "hidden_states" if "hidden_states" in kwargs else next(iter(kwargs))
    return args, {**kwargs, key: edit(kwargs[key])}


@contextmanager
def capture(model, hook_names: list[str]) -> Iterator[dict]:
    """Record the activations at the named hook points (detached, float32)."""
    recorded: dict = {}

    def recorder(name):
        def record(activation):
            recorded[name] = activation.detach().float()
            return activation
        return record

    with intervene(model, {name: recorder(name) for name in hook_names}):
        yield recorded


class _StopForward(Exception):
    pass


def forward_until(model, ids, last_layer: int) -> None:
    """Run the model on ids only as far as block last_layer (what a capture of hooks
    up to that layer needs): the later blocks and the unembedding are skipped."""
    def stop(_module, _args, _output):
        raise _StopForward

    handle = blocks(model)[last_layer].register_forward_hook(stop)
    try:
        model(ids, use_cache=False)
    except _StopForward:
        pass
    finally:
        handle.remove()
