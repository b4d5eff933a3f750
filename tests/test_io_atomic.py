"""route.utils.io atomic writes: a replaced directory is never missing or half-written, whatever step a crash hits."""

import json
import os

import pytest
import torch

from route.utils import io as rio
from route.utils.io import atomic_dir, write_json_atomic

STEPS = ("written", "synced", "linked", "swapped")


def _tiny_model(seed):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(LlamaConfig(vocab_size=16, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                                        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=16))


def _save(path, seed):
    with atomic_dir(path) as tmp:
        _tiny_model(seed).save_pretrained(tmp)


def _loads_as(path, seed):
    from transformers import AutoModelForCausalLM

    loaded = AutoModelForCausalLM.from_pretrained(path)
    want = _tiny_model(seed).state_dict()
    return all(torch.equal(v, want[k]) for k, v in loaded.state_dict().items())


class Crash(BaseException):
    """Stands for the process dying at a step (BaseException: nothing in the writer may swallow it)."""


@pytest.mark.parametrize("step", ["body", *STEPS, "rename"])
def test_a_crash_at_any_step_leaves_a_complete_checkpoint(tmp_path, monkeypatch, step):
    dest = tmp_path / "deployed"
    _save(dest, seed=0)
    hit = []

    def crash_at(name):
        if name == step:
            hit.append(name)
            raise Crash(name)

    monkeypatch.setattr(rio, "_crash_point", crash_at)
    if step == "rename":  # the atomic rename itself fails (e.g. the disk is gone)
        real = os.replace

        def failing_replace(src, dst):
            if os.path.basename(str(src)).startswith(".deployed.link"):
                hit.append(step)
                raise Crash(step)
            return real(src, dst)

        monkeypatch.setattr(rio.os, "replace", failing_replace)
    with pytest.raises(Crash):
        with atomic_dir(dest) as tmp:
            _tiny_model(1).save_pretrained(tmp)
            if step == "body":
                hit.append(step)
                raise Crash("body")
    assert hit == [step]
    # "swapped": the new version is in place (only the clean-up of old versions was lost); else the old one
    assert _loads_as(dest, seed=1 if step == "swapped" else 0)
    monkeypatch.undo()
    _save(dest, seed=2)  # and the next write works and cleans up what the crash left
    assert _loads_as(dest, seed=2)
    hidden = sorted(p.name for p in tmp_path.iterdir() if p.name != "deployed")
    assert len(hidden) <= 2 and os.readlink(dest) in hidden, hidden  # the current version and the previous one


def test_a_reader_finds_the_destination_complete_between_every_filesystem_step(tmp_path, monkeypatch):
    """After each rename, link, unlink or delete the writer makes, a reader opening the destination reads a whole
    version (the old one or the new one), never nothing."""
    dest = tmp_path / "cell"
    with atomic_dir(dest) as tmp:
        (tmp / "value.json").write_text(json.dumps({"i": 0}))
    seen = []

    def read_after(fn):
        def wrapped(*args, **kwargs):
            out = fn(*args, **kwargs)
            seen.append(json.loads((dest / "value.json").read_text())["i"])  # raises if missing or half-written
            return out
        return wrapped

    for name in ("replace", "rename", "symlink", "unlink", "rmdir"):
        monkeypatch.setattr(rio.os, name, read_after(getattr(os, name)))
    monkeypatch.setattr(rio.shutil, "rmtree", read_after(rio.shutil.rmtree))
    for i in (1, 2, 3):
        with atomic_dir(dest) as tmp:
            (tmp / "value.json").write_text(json.dumps({"i": i}))
    assert len(seen) >= 6 and seen == sorted(seen) and seen[-1] == 3, seen  # checked at every step, in order


def test_a_directory_from_before_versions_is_replaced(tmp_path):
    dest = tmp_path / "org"
    dest.mkdir()
    (dest / "old.txt").write_text("old")
    with atomic_dir(dest) as tmp:
        (tmp / "new.txt").write_text("new")
    assert dest.is_symlink() and (dest / "new.txt").read_text() == "new" and not (dest / "old.txt").exists()


def test_files_and_directories_are_fsynced(tmp_path, monkeypatch):
    synced = []
    real = os.fsync

    def record(fd):
        synced.append(os.readlink(f"/proc/self/fd/{fd}"))
        return real(fd)

    monkeypatch.setattr(rio.os, "fsync", record)
    with atomic_dir(tmp_path / "d") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"a")
    version = os.path.realpath(tmp_path / "d")
    for p in (f"{version}/sub/a.bin", f"{version}/sub", version, str(tmp_path)):
        assert p in synced, (p, synced)
    synced.clear()
    write_json_atomic(tmp_path / "r.json", {"a": 1})
    assert str(tmp_path) in synced and any(p.startswith(str(tmp_path / ".r.json.")) for p in synced)


def test_pop_config_arg_refuses_a_missing_file_before_any_heavy_import(tmp_path):
    from route.utils.io import pop_config_arg

    cfg = tmp_path / "run.yaml"
    cfg.write_text("seed: 1\n")
    assert pop_config_arg(["--config", str(cfg), "--seed", "2"]) == (str(cfg), ["--seed", "2"])
    assert pop_config_arg([f"--config={cfg}"]) == (str(cfg), [])
    assert pop_config_arg(["--seed", "2"], default="d.yaml") == ("d.yaml", ["--seed", "2"])
    with pytest.raises(ValueError, match="--config: no such file: nope.yaml"):
        pop_config_arg(["--config", "nope.yaml"])


def test_a_figure_that_fails_to_render_leaves_the_old_png_and_is_closed(tmp_path):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = tmp_path / "plots" / "curve.png"
    fig, ax = plt.subplots()
    ax.plot([0, 1], [1, 0])
    assert rio.save_figure(fig, path, dpi=50) == path and path.read_bytes().startswith(b"\x89PNG")
    assert not plt.fignum_exists(fig.number)  # closed after saving
    old = path.read_bytes()
    bad, ax = plt.subplots()
    ax.set_title("$\\unknowncommand$")  # mathtext fails inside savefig, after the temporary file was opened
    with pytest.raises(ValueError):
        rio.save_figure(bad, path, dpi=50)
    assert path.read_bytes() == old and not plt.fignum_exists(bad.number)
    assert sorted(p.name for p in path.parent.iterdir()) == ["curve.png"]  # no temporary file left behind
