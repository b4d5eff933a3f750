"""Permutation keys: the seed's JSON read and written as is, validation errors naming the swap, keygen."""

import json

import pytest
from transformers import GPTNeoForCausalLM, LlamaForCausalLM

from route.models.tiered import FIELDS, PermutationKey, load_key, model_layout, random_key
from route.models.tiered.keygen import main as keygen_main
from tests.tiny_sgtm import gpt_neo_config, llama_config

SEED_EXAMPLE = {"attn_heads": [[[1, 0], [5, 3]]], "mlp_cols": [[[2, 10], [7, 42]]]}  # the seed's README example


def test_the_seed_json_round_trips_as_is(tmp_path):
    path = tmp_path / "key.json"
    path.write_text(json.dumps(SEED_EXAMPLE))
    key = load_key(path)
    assert key.attn_heads == [((1, 0), (5, 3))] and key.mlp_cols == [((2, 10), (7, 42))]
    assert key.attn_out_heads == key.mlp_up_cols == key.mlp_down_cols == [], "a missing field means no swaps"
    assert key.to_dict() == SEED_EXAMPLE
    full = {
        "attn_heads": [[[0, 1], [1, 2]]],
        "mlp_cols": [],
        "attn_out_heads": [[[0, 0], [1, 3]]],
        "mlp_up_cols": [[[0, 5], [0, 6]]],
        "mlp_down_cols": [[[1, 7], [0, 9]]],
    }
    PermutationKey.from_dict(full).save(tmp_path / "full.json")
    assert json.loads((tmp_path / "full.json").read_text()) == full
    assert len(load_key(tmp_path / "full.json")) == 4


@pytest.mark.parametrize(
    "data,match",
    [
        ({"attn_heads": [], "mlp_rows": []}, r"unknown fields \['mlp_rows'\].*allowed values"),
        ({"attn_heads": [[[0, 1], [1]]]}, r"attn_heads\[0\].*\[\[layer_a, idx_a\], \[layer_b, idx_b\]\]"),
        ({"mlp_cols": [[[0, 1.5], [1, 2]]]}, r"mlp_cols\[0\].*ints"),
        ({"mlp_cols": {"a": 1}}, r"mlp_cols: must be a list"),
    ],
)
def test_malformed_keys_are_refused_with_the_field(data, match):
    with pytest.raises(ValueError, match=match):
        PermutationKey.from_dict(data)


@pytest.mark.parametrize(
    "data,match",
    [
        ({"attn_heads": [[[0, 1], [2, 1]]]}, r"attn_heads\[0\] \[\[0, 1\], \[2, 1\]\]: layer 2 out of range.*0\.\.1"),
        ({"attn_heads": [[[0, 4], [1, 1]]]}, r"attn_heads\[0\].*index 4 out of range.*4 heads"),
        ({"mlp_cols": [[[0, 1], [1, 64]]]}, r"mlp_cols\[0\].*index 64 out of range.*64 cols"),
        (
            {"mlp_cols": [[[0, 1], [1, 2]], [[1, 2], [0, 3]]]},
            r"mlp_cols\[1\] \[\[1, 2\], \[0, 3\]\]: col \[1, 2\] is used "
            r"twice \(also in mlp_cols\[0\]",
        ),
        (
            {"attn_heads": [[[0, 1], [1, 2]]], "attn_out_heads": [[[1, 2], [0, 3]]]},
            r"attn_out_heads\[0\].*head \[1, 2\] is used twice \(also in attn_heads\[0\]",
        ),
        ({"mlp_up_cols": [[[0, 3], [1, 3]]], "mlp_down_cols": [[[0, 3], [1, 9]]]}, r"mlp_down_cols\[0\].*used twice"),
        ({"attn_heads": [[[1, 0], [1, 0]]]}, r"attn_heads\[0\].*head \[1, 0\] is used twice"),
        ({"mlp_down_cols": [[[0, 3], [0, 3]]]}, r"mlp_down_cols\[0\].*used twice"),
    ],
)
def test_validation_names_the_offending_swap(data, match):
    model = GPTNeoForCausalLM(gpt_neo_config())  # 2 layers, 4 heads, 64 MLP columns
    with pytest.raises(ValueError, match=match):
        PermutationKey.from_dict(data).validate(model)


def test_grouped_kv_heads_index_kv_heads_and_partial_same_layer_swaps_are_allowed():
    model = LlamaForCausalLM(llama_config())  # 4 query heads in 2 KV groups
    PermutationKey.from_dict({"attn_heads": [[[0, 1], [1, 0]]], "mlp_down_cols": [[[0, 3], [0, 4]]]}).validate(model)
    with pytest.raises(ValueError, match="index 2 out of range; each layer has 2 KV heads"):
        PermutationKey.from_dict({"attn_heads": [[[0, 2], [1, 0]]]}).validate(model)


def test_random_keys_are_valid_cross_layer_seeded_and_cover_the_share():
    layout = model_layout(GPTNeoForCausalLM(gpt_neo_config(num_layers=3, attention_types=[[["global"], 3]])))
    key = random_key(3, 4, 64, head_share=0.5, mlp_share=0.25, seed=3)
    key.validate(layout)
    assert all(a[0] != b[0] for _, a, b in key.swaps())
    assert len(key.attn_heads) == 3 and len(key.mlp_cols) == 24  # 2 of 4 heads and 16 of 64 columns per layer
    assert key.to_dict() == random_key(3, 4, 64, 0.5, 0.25, seed=3).to_dict()
    assert key.to_dict() != random_key(3, 4, 64, 0.5, 0.25, seed=4).to_dict()
    with pytest.raises(ValueError, match="mlp_share"):
        random_key(3, 4, 64, 0.5, 1.5)


@pytest.mark.parametrize("head_field", ["attn_heads", "attn_out_heads"])
@pytest.mark.parametrize("mlp_field", ["mlp_cols", "mlp_up_cols", "mlp_down_cols"])
def test_random_keys_put_the_same_slots_in_the_chosen_fields(head_field, mlp_field):
    whole = random_key(3, 4, 64, 0.5, 0.25, seed=3)
    key = random_key(3, 4, 64, 0.5, 0.25, seed=3, head_field=head_field, mlp_field=mlp_field)
    key.validate(model_layout(GPTNeoForCausalLM(gpt_neo_config(num_layers=3, attention_types=[[["global"], 3]]))))
    assert getattr(key, head_field) == whole.attn_heads and getattr(key, mlp_field) == whole.mlp_cols
    filled = {f for f in FIELDS if getattr(key, f)}
    assert filled == {head_field, mlp_field}


def test_random_key_fields_are_checked():
    with pytest.raises(ValueError, match=r"head_field: invalid value 'mlp_cols'; allowed values: \['attn_heads'"):
        random_key(3, 4, 64, 0.5, 0.25, head_field="mlp_cols")
    with pytest.raises(ValueError, match=r"mlp_field: invalid value 'attn_heads'; allowed values: \['mlp_cols'"):
        random_key(3, 4, 64, 0.5, 0.25, mlp_field="attn_heads")


def test_keygen_cli_writes_a_valid_key(tmp_path, capsys):
    out, part = tmp_path / "k.json", tmp_path / "partial.json"
    sizes = "--num_layers 2 --num_heads 4 --mlp_dim 64 --head_share 0.5 --mlp_share 0.5 --seed 1".split()
    keygen_main([*sizes, "--out", str(out)])
    key = load_key(out)
    key.validate(GPTNeoForCausalLM(gpt_neo_config()))
    assert len(key.attn_heads) == 2 and len(key.mlp_cols) == 32
    keygen_main([*sizes, "--head_field", "attn_out_heads", "--mlp_field", "mlp_down_cols", "--out", str(part)])
    partial = load_key(part)
    assert (partial.attn_out_heads, partial.mlp_down_cols) == (key.attn_heads, key.mlp_cols)
    assert not partial.attn_heads and not partial.mlp_cols
    with pytest.raises(SystemExit):
        keygen_main(["--help"])
    text = capsys.readouterr().out
    for option in (
        "--num_layers",
        "--num_heads",
        "--num_kv_heads",
        "--mlp_dim",
        "--model",
        "--head_share",
        "--mlp_share",
        "--seed",
        "--head_field",
        "--mlp_field",
        "--out",
    ):
        assert option in text
    with pytest.raises(SystemExit) as exc:  # a user error: one line naming the flag, exit status 2
        keygen_main(["--num_heads", "4", "--mlp_dim", "8", "--out", str(out)])
    assert exc.value.code == 2 and "--num_layers" in capsys.readouterr().err
