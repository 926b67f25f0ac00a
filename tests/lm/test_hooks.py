import pytest
import torch

from flowdb.errors import FlowdbError
from flowdb.lm.hooks import blocks, capture, intervene, resolve

N_LAYERS = 3


def tiny_model(kind):
    from transformers import Gemma2Config, Gemma2ForCausalLM, GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if kind == "llama":
        config = LlamaConfig(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                             num_attention_heads=4, num_key_value_heads=2)
        return LlamaForCausalLM(config).eval()
    if kind == "gemma2":
        config = Gemma2Config(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=N_LAYERS,
                              num_attention_heads=4, num_key_value_heads=2, head_dim=8)
        return Gemma2ForCausalLM(config).eval()
    config = GPT2Config(vocab_size=64, n_embd=32, n_layer=N_LAYERS, n_head=4, n_positions=64)
    return GPT2LMHeadModel(config).eval()


def all_points(n_layers):
    return [f"blocks.{layer}.{point}" for layer in range(n_layers)
            for point in ("hook_resid_pre", "hook_resid_post", "hook_attn_out", "hook_mlp_out", "attn.hook_z")]


def check_mapping(model, input_ids, n_layers):
    with torch.no_grad(), capture(model, all_points(n_layers)) as acts:
        out = model(input_ids, output_hidden_states=True)
    for layer in range(n_layers):
        pre, post = acts[f"blocks.{layer}.hook_resid_pre"], acts[f"blocks.{layer}.hook_resid_post"]
        attn, mlp = acts[f"blocks.{layer}.hook_attn_out"], acts[f"blocks.{layer}.hook_mlp_out"]
        # transformers' own record of the residual stream entering each block
        torch.testing.assert_close(pre, out.hidden_states[layer].float(), rtol=1e-4, atol=1e-4)
        # R_L = R_{L-1} + A_L + M_L: the attention and MLP outputs are what the block adds
        torch.testing.assert_close(post, pre + attn + mlp, rtol=1e-4, atol=1e-4)
        # hook_z through the output projection gives the attention output
        block = blocks(model)[layer]
        z = acts[f"blocks.{layer}.attn.hook_z"]
        with torch.no_grad():
            if model.config.model_type == "gpt2":
                projected = block.attn.c_proj(z)
            else:
                projected = block.self_attn.o_proj(z)
                if model.config.model_type == "gemma2":
                    projected = block.post_attention_layernorm(projected)
        torch.testing.assert_close(projected, attn, rtol=1e-4, atol=1e-4)
        if layer + 1 < n_layers:
            torch.testing.assert_close(post, acts[f"blocks.{layer + 1}.hook_resid_pre"])


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gpt2"])
def test_hook_points_map_to_the_right_module_outputs(kind):
    model = tiny_model(kind)
    check_mapping(model, torch.randint(0, 64, (2, 7)), N_LAYERS)


@pytest.mark.parametrize("kind", ["llama", "gemma2", "gpt2"])
def test_intervene_edits_and_always_removes_hooks(kind):
    model = tiny_model(kind)
    ids = torch.randint(0, 64, (1, 6))
    with torch.no_grad():
        baseline = model(ids).logits
        with intervene(model, {"blocks.1.hook_mlp_out": torch.zeros_like}), \
                capture(model, ["blocks.1.hook_resid_pre", "blocks.1.hook_attn_out",
                                "blocks.1.hook_resid_post"]) as acts:
            ablated = model(ids).logits
        torch.testing.assert_close(acts["blocks.1.hook_resid_post"],
                                   acts["blocks.1.hook_resid_pre"] + acts["blocks.1.hook_attn_out"])
        assert not torch.allclose(ablated, baseline)
        with pytest.raises(RuntimeError, match="boom"):
            with intervene(model, {"blocks.0.hook_resid_pre": lambda h: h * 0}):
                raise RuntimeError("boom")
        torch.testing.assert_close(model(ids).logits, baseline)  # every hook was removed


def test_unknown_hook_points():
    model = tiny_model("llama")
    with pytest.raises(FlowdbError, match="unknown hook point"):
        resolve(model, "blocks.0.hook_resid_mid")
    with pytest.raises(FlowdbError, match="the model has 3 blocks"):
        resolve(model, "blocks.7.hook_mlp_out")


def test_smollm2_loads_offline_and_maps(smollm2):
    model, tokenizer = smollm2
    assert model.config.model_type == "llama" and len(blocks(model)) == 30
    ids = tokenizer("def parse(path):\n    return open(path).read()", return_tensors="pt").input_ids
    check_mapping(model, ids, n_layers=3)


def test_smollm2_steering_moves_the_next_token(smollm2):
    model, tokenizer = smollm2
    ids = tokenizer("I think that the biggest problem of contemporary theoretical physics is ",
                    return_tensors="pt").input_ids
    target = tokenizer(" cheese", add_special_tokens=False).input_ids[0]
    direction = model.lm_head.weight[target].detach()  # the unembedding of " cheese"
    direction = direction / direction.norm()
    with torch.no_grad():
        base = torch.log_softmax(model(ids).logits[0, -1], -1)[target]
        with intervene(model, {"blocks.20.hook_resid_post": lambda h: h + 40.0 * direction}):
            steered = torch.log_softmax(model(ids).logits[0, -1], -1)[target]
    assert steered > base + 1.0
