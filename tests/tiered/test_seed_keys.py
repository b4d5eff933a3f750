"""Key files written by the seed's (the original Tiered Alignment implementation's) generator load, apply and unapply
here to the same weights as the seed gives, same-layer swaps included.

What the seed does, read from its generator script and `permutation/key.py` / `permute.py` (none of its code is used):

- its generator seeds Python's `random` with `--seed`, shuffles every (layer, head) slot, walks the shuffled list in
  consecutive pairs and keeps a pair only if its two slots are in different layers, until it has the number of swaps
  its parameter budget asks for; the same for the (layer, column) MLP slots; it writes
  `{"attn_heads": [...], "mlp_cols": [...]}` with `json.dump(..., indent=2)`, each swap `[[layer_a, idx_a],
  [layer_b, idx_b]]`. A slot is never used twice (each shuffled slot is looked at once).
- `apply_permutation` goes through `attn_heads`, then `mlp_cols`, in file order; each swap clones the two slots' slices
  and writes each into the other: a head h is rows [h * head_dim, (h + 1) * head_dim) of q_proj, k_proj and v_proj and
  the same columns of out_proj; an MLP column c is row c of c_fc with bias c, and column c of c_proj. A same-layer
  swap is applied like any other (the layout changes; the function does not).
- `unapply_permutation` applies the key again, in the same order: for a key that never repeats a slot every swap is
  its own inverse and the swaps commute, so the weights come back exactly. (With a repeated slot the seed's unapply
  does not restore the weights, and its batched variants order the swaps differently; route refuses such keys.)

The reference here is `tests.tiered.test_permute.permuted`: the same sequence of slice exchanges, written from the
parameter names, independent of `route.models.tiered.layout` and of the index plans `route.models.tiered.permute` runs.
"""

import json
import random
import warnings

import pytest
import torch
from transformers import GPTNeoForCausalLM

from route.models.tiered import apply_key, load_key, unapply_key
from tests.fp import assert_close_net64
from tests.tiered.test_permute import permuted, state
from tests.tiny_sgtm import gpt_neo_config, ids, randomize

LAYERS, HEADS, HEAD_DIM, MLP = 3, 4, 8, 64


def model():
    torch.manual_seed(0)
    return randomize(GPTNeoForCausalLM(gpt_neo_config(num_layers=LAYERS, attention_types=[[["global"], LAYERS]])),
                     seed=4)


def seed_generator_key(head_swaps: int, mlp_swaps: int, seed: int) -> dict:
    """A key drawn as the seed's generator draws one (its steps in the module docstring), as the JSON it writes."""
    rng = random.Random(seed)  # the seed calls random.seed(seed) and the module-level functions: the same stream

    def pairs(slots, wanted):
        rng.shuffle(slots)
        out = []
        for i in range(0, len(slots) - 1, 2):
            if len(out) >= wanted:
                break
            if slots[i][0] != slots[i + 1][0]:
                out.append([list(slots[i]), list(slots[i + 1])])
        return out

    heads = pairs([(layer, h) for layer in range(LAYERS) for h in range(HEADS)], head_swaps)
    cols = pairs([(layer, c) for layer in range(LAYERS) for c in range(MLP)], mlp_swaps)
    return {"attn_heads": heads, "mlp_cols": cols}


def with_same_layer_swaps(key: dict) -> dict:
    """The key plus one same-layer swap per field on slots it leaves free (the seed applies them like any other)."""
    out = {f: [list(s) for s in swaps] for f, swaps in key.items()}
    for field, units in (("attn_heads", HEADS), ("mlp_cols", MLP)):
        used = {tuple(slot) for swap in key[field] for slot in swap}
        free = next(
            [(layer, i) for i in range(units) if (layer, i) not in used][:2]
            for layer in range(LAYERS)
            if sum((layer, i) not in used for i in range(units)) >= 2
        )
        out[field].append([list(free[0]), list(free[1])])
    return out


def write(tmp_path, name, key):
    path = tmp_path / name
    path.write_text(json.dumps(key, indent=2))  # the seed's writer
    return path


@pytest.mark.parametrize("seed", [0, 42])
@pytest.mark.parametrize("same_layer", [False, True])
def test_a_seed_key_file_applies_and_unapplies_as_in_the_seed(tmp_path, seed, same_layer):
    drawn = seed_generator_key(head_swaps=3, mlp_swaps=20, seed=seed)
    assert len(drawn["attn_heads"]) == 3 and len(drawn["mlp_cols"]) == 20, "the draw found its swaps"
    data = with_same_layer_swaps(drawn) if same_layer else drawn
    same = [(f, s) for f, swaps in data.items() for s in swaps if s[0][0] == s[1][0]]
    assert len(same) == (2 if same_layer else 0)
    key = load_key(write(tmp_path, "key.json", data))
    m = model()
    public = state(m)
    expected = permuted(public, "gpt_neo", data, 1, HEAD_DIM)
    assert sum(not torch.equal(public[k], expected[k]) for k in public) >= 4 * LAYERS, "every layer is keyed"
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_key(m, key)
    said = [str(w.message) for w in caught if issubclass(w.category, UserWarning)]
    assert len(said) == len(same) and all("same-layer swap" in s and "unchanged" in s for s in said), said
    keyed = state(m)
    for k in public:
        assert torch.equal(keyed[k], expected[k]), f"{k}: the keyed weights are not the seed's"
    twin = GPTNeoForCausalLM(m.config)
    twin.load_state_dict(expected)
    x = ids()
    with torch.no_grad():  # the same weights in the same model class: the same ops, bit for bit
        assert torch.equal(m(input_ids=x).logits, twin(input_ids=x).logits)
    unapply_key(m, key)
    again = permuted(expected, "gpt_neo", data, 1, HEAD_DIM)  # the seed's unapply: the same swaps once more
    for k in public:
        assert torch.equal(again[k], public[k]) and torch.equal(state(m)[k], public[k]), f"{k}: not restored"


def test_same_layer_swaps_are_applied_and_leave_the_function_unchanged(tmp_path):
    data = with_same_layer_swaps({"attn_heads": [], "mlp_cols": []})
    key = load_key(write(tmp_path, "same.json", data))
    m = model().double()
    x = ids()
    with torch.no_grad():
        before = m(input_ids=x).logits
    public = state(m)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        apply_key(m, key)
    assert [str(w.message).split(" is applied")[0] for w in caught] == [
        "attn_heads[0] [[0, 0], [0, 1]]: a same-layer swap of a whole head",
        "mlp_cols[0] [[0, 0], [0, 1]]: a same-layer swap of a whole MLP column",
    ]
    keyed = state(m)
    moved = [k for k in public if not torch.equal(public[k], keyed[k])]
    assert sorted(moved) == sorted(
        f"transformer.h.0.{p}" for p in ("attn.attention.q_proj.weight", "attn.attention.k_proj.weight",
                                         "attn.attention.v_proj.weight", "attn.attention.out_proj.weight",
                                         "mlp.c_fc.weight", "mlp.c_fc.bias", "mlp.c_proj.weight")
    ), "the swap moves the slots' weights"
    with torch.no_grad():  # the same function, summed in another order: float64, tests/fp.py
        assert_close_net64(m(input_ids=x).logits, before)
    unapply_key(m, key)
    assert all(torch.equal(v, public[k]) for k, v in state(m).items())
