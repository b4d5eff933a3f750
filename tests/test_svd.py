"""route.targets.svd: exact factors, canonical signs, wide matrices, the on-disk cache."""

import pytest
import torch

import route.targets.svd as svd


@pytest.mark.parametrize("shape", [(12, 7), (7, 12), (9, 9)])
def test_full_rank_reconstructs_and_signs_are_canonical(shape, tmp_path):
    w = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    u, s, vh = svd.svd_factors(w, None, tmp_path)
    r = min(shape)
    assert u.shape == (shape[0], r) and s.shape == (r,) and vh.shape == (r, shape[1])
    torch.testing.assert_close(u @ torch.diag(s) @ vh, w, rtol=0, atol=1e-5)
    torch.testing.assert_close(u.T @ u, torch.eye(r), rtol=0, atol=1e-5)
    assert bool((s[:-1] >= s[1:]).all())
    top = vh.gather(1, vh.abs().argmax(1, keepdim=True))
    assert bool((top > 0).all()), "largest-magnitude entry of each Vh row must be positive"


def test_sign_convention_is_independent_of_the_input_signs():
    w = torch.randn(10, 6, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    u, s, vh = torch.linalg.svd(w, full_matrices=False)
    flip = torch.tensor([1.0, -1, -1, 1, -1, 1], dtype=torch.float64)
    a = svd.canonicalize_signs(u, vh)
    b = svd.canonicalize_signs(u * flip, vh * flip[:, None])
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_top_rank_is_a_prefix_and_rank_is_clamped(tmp_path):
    w = torch.randn(16, 8, generator=torch.Generator().manual_seed(2))
    full = svd.svd_factors(w, None, tmp_path / "a")
    top = svd.svd_factors(w, 3, tmp_path / "b")
    torch.testing.assert_close(top[0], full[0][:, :3])
    torch.testing.assert_close(top[1], full[1][:3])
    torch.testing.assert_close(top[2], full[2][:3])
    assert svd.svd_factors(w, 100, tmp_path / "c")[1].numel() == 8
    with pytest.raises(ValueError, match="svf_rank"):
        svd.svd_factors(w, 0, tmp_path)


def test_cache_hit_extension_and_corrupt_file(tmp_path, monkeypatch):
    w = torch.randn(20, 10, generator=torch.Generator().manual_seed(3))
    first = svd.svd_factors(w, 4, tmp_path)
    files = list(tmp_path.glob("*.pt"))
    assert len(files) == 1 and files[0].stem == svd.weight_hash(w)
    calls = []
    real = svd.compute_svd
    monkeypatch.setattr(svd, "compute_svd", lambda *a, **k: calls.append(a) or real(*a, **k))
    again = svd.svd_factors(w, 2, tmp_path)  # fewer pairs: served from the cache
    assert not calls and torch.equal(again[1], first[1][:2])
    more = svd.svd_factors(w, 6, tmp_path)  # more pairs: recomputed, the entry grows
    assert len(calls) == 1 and more[1].numel() == 6
    assert torch.load(files[0], weights_only=True)["rank"] == 6
    files[0].write_bytes(b"not a torch file")
    svd.svd_factors(w, 6, tmp_path)
    assert len(calls) == 2
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")], "temporary files left behind"


def test_default_cache_dir_follows_route_cache(tmp_path):
    w = torch.randn(5, 4)
    svd.svd_factors(w, None)
    assert (tmp_path / "cache" / "svd" / f"{svd.weight_hash(w)}.pt").exists()
    assert svd.weight_hash(w) != svd.weight_hash(w.double()) != svd.weight_hash(w.T.contiguous())
