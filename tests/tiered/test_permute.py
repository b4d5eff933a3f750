"""apply_key / unapply_key on plain GPT-Neo, Llama (grouped KV) and Qwen2 (biases, config.head_dim), and on the
SGTM model class: every parameter randomised, compared with a state dict permuted here by parameter name."""

import pytest
import torch
from transformers import GPTNeoForCausalLM, LlamaForCausalLM, Qwen2ForCausalLM

from route.models.sgtm import GPTNeoForCausalLMSGTM
from route.models.tiered import PermutationKey, apply_key, unapply_key
from tests.tiny_sgtm import gpt_neo_config, ids, llama_config, randomize

# every field, disjoint slots; heads index KV heads (2 per layer in the Llama-family configs)
KEY = {
    "attn_heads": [[[0, 1], [1, 0]]],
    "mlp_cols": [[[0, 3], [1, 60]], [[1, 5], [0, 7]]],
    "attn_out_heads": [[[0, 0], [1, 1]]],
    "mlp_up_cols": [[[0, 9], [1, 9]], [[0, 10], [0, 11]]],
    "mlp_down_cols": [[[1, 20], [0, 21]]],
}


def names(arch, layer):
    if arch == "gpt_neo":
        a, m = f"transformer.h.{layer}.attn.attention.", f"transformer.h.{layer}.mlp."
        return {
            "q": a + "q_proj",
            "k": a + "k_proj",
            "v": a + "v_proj",
            "o": a + "out_proj",
            "up": [m + "c_fc"],
            "down": m + "c_proj",
        }
    a, m = f"model.layers.{layer}.self_attn.", f"model.layers.{layer}.mlp."
    return {
        "q": a + "q_proj",
        "k": a + "k_proj",
        "v": a + "v_proj",
        "o": a + "o_proj",
        "up": [m + "gate_proj", m + "up_proj"],
        "down": m + "down_proj",
    }


def permuted(state, arch, key, group, head_dim):
    """The keyed state dict, written from the parameter names only (independent of route.models.tiered.layout)."""
    sd = {k: v.clone() for k, v in state.items()}

    def swap(name_a, name_b, dim, ia, ib, n):
        for suffix in ("weight", "bias") if dim == 0 else ("weight",):
            ka, kb = f"{name_a}.{suffix}", f"{name_b}.{suffix}"
            if ka not in sd:
                continue
            a, b = sd[ka].narrow(dim, ia * n, n).clone(), sd[kb].narrow(dim, ib * n, n).clone()
            sd[ka].narrow(dim, ia * n, n).copy_(b)
            sd[kb].narrow(dim, ib * n, n).copy_(a)

    for field, swaps in key.items():
        for (la, ia), (lb, ib) in swaps:
            na, nb = names(arch, la), names(arch, lb)
            if field == "attn_heads":
                swap(na["q"], nb["q"], 0, ia, ib, group * head_dim)
                swap(na["k"], nb["k"], 0, ia, ib, head_dim)
                swap(na["v"], nb["v"], 0, ia, ib, head_dim)
            if field in ("attn_heads", "attn_out_heads"):
                swap(na["o"], nb["o"], 1, ia, ib, group * head_dim)
            if field in ("mlp_cols", "mlp_up_cols"):
                for ua, ub in zip(na["up"], nb["up"]):
                    swap(ua, ub, 0, ia, ib, 1)
            if field in ("mlp_cols", "mlp_down_cols"):
                swap(na["down"], nb["down"], 1, ia, ib, 1)
    return sd


FAMILIES = [
    ("gpt_neo", lambda: GPTNeoForCausalLM(gpt_neo_config()), 1, 8),
    ("llama", lambda: LlamaForCausalLM(llama_config()), 2, 8),
    ("qwen2", lambda: Qwen2ForCausalLM(llama_config(qwen=True, head_dim=12)), 2, 12),  # head_dim != 32 / 4
]


def state(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


@pytest.mark.parametrize("arch,build,group,head_dim", FAMILIES)
def test_keyed_model_equals_an_independent_permutation_and_unapply_restores_bitwise(arch, build, group, head_dim):
    torch.manual_seed(0)
    model = randomize(build(), seed=1)
    if arch == "qwen2":
        assert (
            model.model.layers[0].self_attn.q_proj.weight.shape[0] == 4 * 12
            and model.model.layers[0].self_attn.q_proj.bias is not None
        )
    biases = [n for n, p in model.named_parameters() if n.endswith("bias")]
    assert all(model.get_parameter(n).abs().sum() > 0 for n in biases), "randomised biases: a missing swap shows"
    key = PermutationKey.from_dict(KEY if group == 2 else {**KEY, "attn_heads": [[[0, 1], [1, 3]]]})
    public = state(model)
    expected = permuted(public, arch, key.to_dict(), group, head_dim)
    moved = [k for k in public if not torch.equal(public[k], expected[k])]
    assert len(moved) >= 10, "the key touches q/k/v, the output projections and the MLP"
    x = ids()
    with torch.no_grad():
        public_logits = model(input_ids=x).logits
    assert apply_key(model, key) is model
    keyed = state(model)
    for k in public:
        assert torch.equal(keyed[k], expected[k]), f"{k}: keyed weights differ from the independent permutation"
    twin = build()
    twin.load_state_dict(expected)
    with torch.no_grad():
        keyed_logits = model(input_ids=x).logits
        assert torch.equal(keyed_logits, twin(input_ids=x).logits)
        assert not torch.allclose(keyed_logits, public_logits, atol=1e-3), "a cross-layer key changes the function"
    unapply_key(model, key)
    assert all(torch.equal(v, public[k]) for k, v in state(model).items()), "unapply restores every bit"


@pytest.mark.parametrize("split", [True, False])
def test_the_sgtm_model_methods_permute_split_weights_like_the_vanilla_model(split):
    torch.manual_seed(0)
    model = GPTNeoForCausalLMSGTM(gpt_neo_config(retain_mlp_dim=40, retain_attn_heads=2, split_masked_weights=split))
    randomize(model, seed=3)
    key = PermutationKey.from_dict({**KEY, "attn_heads": [[[0, 1], [1, 3]]]})  # a retain head with a forget head
    merged = model.sgtm_masks.merged_state_dict()
    expected = permuted(merged, "gpt_neo", key.to_dict(), 1, 8)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    model.apply_key(key)
    after = model.sgtm_masks.merged_state_dict()
    assert all(torch.equal(after[k], expected[k]) for k in expected)
    model.unapply_key(key)
    assert all(torch.equal(p.detach(), before[n]) for n, p in model.named_parameters())


def test_refusals_before_any_weight_moves():
    model = randomize(GPTNeoForCausalLM(gpt_neo_config()), seed=4)
    before = state(model)
    bad = PermutationKey.from_dict({"mlp_cols": [[[0, 1], [1, 2]], [[0, 1], [1, 3]]]})
    with pytest.raises(ValueError, match="used twice"):
        apply_key(model, bad)
    assert all(torch.equal(v, before[k]) for k, v in state(model).items())
    with pytest.raises(TypeError, match="PermutationKey"):
        apply_key(model, {"attn_heads": []})
    from transformers import Qwen3Config, Qwen3ForCausalLM

    qwen3 = Qwen3ForCausalLM(
        Qwen3Config(
            **{
                k: v
                for k, v in llama_config().to_dict().items()
                if k
                in (
                    "vocab_size",
                    "hidden_size",
                    "num_hidden_layers",
                    "num_attention_heads",
                    "num_key_value_heads",
                    "intermediate_size",
                )
            }
        )
    )
    with pytest.raises(ValueError, match="q_norm"):
        apply_key(qwen3, PermutationKey.from_dict({"attn_heads": [[[0, 0], [1, 1]]]}))
