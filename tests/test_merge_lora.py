"""LoRA merging (peft's add_weighted_adapter combinations) on weight files, NumPy only: no UNet, no graph."""
import math

import numpy as np
import pytest

from mindscedit.cli import MERGE_COMBINATIONS, main
from mindscedit.errors import UserError
from mindscedit.tuners.lora.formats import LoraModule
from mindscedit.tuners.lora.io import _unet_modules, lora_file, merge_lora_files, read_lora_file, write_lora_file
from mindscedit.tuners.lora.merge import COMBINATIONS, merge_adapters

MODULES = {  # module: (out, in)
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn1.to_q": (6, 5),
    "unet.down_blocks.0.attentions.0.transformer_blocks.0.attn2.to_k": (6, 7),
    "unet.mid_block.attentions.0.proj_in": (8, 8),
}


def make_adapter(seed, rank, alpha, modules=MODULES):
    rng = np.random.default_rng(seed)
    return {m: LoraModule(rng.standard_normal((rank, i)).astype(np.float32),
                          rng.standard_normal((o, rank)).astype(np.float32), float(alpha))
            for m, (o, i) in modules.items()}


def delta(m):
    return m.scaling * m.up.astype(np.float64) @ m.down.astype(np.float64)


@pytest.fixture
def pair():
    return [make_adapter(1, 4, 8.0), make_adapter(2, 4, 2.0)]


# -- independent transcriptions of peft.utils.merge_utils -------------------------------------

def ref_prune(t, density):
    if density >= 1:
        return t
    k = int(density * t.size)
    if k == 0:
        return np.zeros_like(t)
    threshold = np.sort(np.abs(t).ravel())[::-1][k - 1]
    return np.where(np.abs(t) >= threshold, t, 0.0)


def ref_ties(tensors, weights, density, method, pruned=None):
    ts = pruned if pruned is not None else [ref_prune(np.asarray(t, np.float64), density) for t in tensors]
    out = np.zeros_like(ts[0])
    for idx in np.ndindex(out.shape):
        values = [t[idx] for t in ts]
        elected = sum(values) if method == "total" else sum(np.sign(v) for v in values)
        sign = 1.0 if elected >= 0 else -1.0
        agree = [w * v for w, v in zip(weights, values) if np.sign(v) == sign]
        out[idx] = sum(agree) / max(len(agree), 1)
    return out


def ref_dare_drops(adapters, density, seed, per_matrix=True):
    """The DARE drops in the documented draw order: modules sorted; per module A then B (per-matrix) or the
    deltas (svd), adapter by adapter; each entry kept if a uniform draw < density, kept ones / density."""
    rng = np.random.default_rng(seed)
    drops = {}
    for module in sorted(adapters[0]):
        groups = ([[a[module].down for a in adapters], [a[module].up for a in adapters]] if per_matrix
                  else [[delta(a[module]) for a in adapters]])
        drops[module] = [[np.where(rng.random(t.shape) < density, np.asarray(t, np.float64), 0) / density for t in g]
                         for g in groups]
    return drops


def per_matrix_coefficients(adapters, module, weights):
    b = [math.sqrt(abs(w * a[module].alpha / a[module].rank)) for a, w in zip(adapters, weights)]
    return [c if w >= 0 else -c for c, w in zip(b, weights)], b


# -- formulas ---------------------------------------------------------------------------------

def test_the_cli_lists_every_combination():
    assert sorted(MERGE_COMBINATIONS) == sorted(COMBINATIONS)


def test_cat_is_exactly_the_weighted_sum_of_the_adapters():
    adapters = [make_adapter(1, 4, 8.0), make_adapter(2, 2, 3.0), make_adapter(3, 3, 3.0)]
    weights = [0.7, 0.3, -0.5]
    merged = merge_adapters(adapters, weights, "cat")
    for module, m in merged.items():
        want = sum(w * delta(a[module]) for a, w in zip(adapters, weights))
        assert m.rank == 9 and m.alpha == 9.0 and m.scaling == 1.0
        assert m.down.dtype == np.float32 and m.up.dtype == np.float32
        np.testing.assert_allclose(delta(m), want, rtol=1e-6, atol=1e-6)


def test_linear_is_peft_sqrt_weights_on_a_and_b(pair):
    weights = [0.7, 0.3]
    merged = merge_adapters(pair, weights, "linear")
    for module, m in merged.items():
        ca, cb = per_matrix_coefficients(pair, module, weights)
        np.testing.assert_allclose(m.down, sum(c * a[module].down for c, a in zip(ca, pair)), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(m.up, sum(c * a[module].up for c, a in zip(cb, pair)), rtol=1e-6, atol=1e-6)
        assert m.rank == 4 and m.alpha == 4.0


def test_one_adapter_through_linear_gives_back_its_update():
    a = make_adapter(5, 4, 8.0)
    merged = merge_adapters([a, a], [0.5, 0.5], "linear")  # (sqrt(.5 s)(A+A)) (sqrt(.5 s)(B+B)) = 2 s B A
    for module, m in merged.items():
        np.testing.assert_allclose(delta(m), 2 * delta(a[module]), rtol=1e-5, atol=1e-5)


def test_a_negative_weight_puts_its_sign_on_a(pair):
    merged = merge_adapters(pair, [1.0, -0.5], "linear")
    for module, m in merged.items():
        ca, cb = per_matrix_coefficients(pair, module, [1.0, -0.5])
        assert ca[1] < 0 < cb[1]
        np.testing.assert_allclose(m.down, ca[0] * pair[0][module].down + ca[1] * pair[1][module].down, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(m.up, cb[0] * pair[0][module].up + cb[1] * pair[1][module].up, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("density", [0.5, 0.25])
def test_magnitude_prune_matches_numpy(pair, density):
    weights = [0.7, 0.3]
    merged = merge_adapters(pair, weights, "magnitude_prune", density=density)
    for module, m in merged.items():
        ca, cb = per_matrix_coefficients(pair, module, weights)
        want_a = sum(c * ref_prune(a[module].down.astype(np.float64), density) for c, a in zip(ca, pair))
        want_b = sum(c * ref_prune(a[module].up.astype(np.float64), density) for c, a in zip(cb, pair))
        np.testing.assert_allclose(m.down, want_a, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(m.up, want_b, rtol=1e-6, atol=1e-6)
        kept = int(density * m.down.size)
        assert np.count_nonzero(ref_prune(pair[0][module].down, density)) == kept


@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.5, 1.0])
def test_ties_matches_numpy(method, density):
    adapters = [make_adapter(1, 4, 8.0), make_adapter(2, 4, 2.0), make_adapter(3, 4, 4.0)]
    weights = [0.7, 0.3, 0.5]
    merged = merge_adapters(adapters, weights, "ties", density=density, majority_sign_method=method)
    for module, m in merged.items():
        ca, cb = per_matrix_coefficients(adapters, module, weights)
        want_a = ref_ties([a[module].down for a in adapters], ca, density, method)
        want_b = ref_ties([a[module].up for a in adapters], cb, density, method)
        np.testing.assert_allclose(m.down, want_a, rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(m.up, want_b, rtol=1e-6, atol=1e-6)


def test_density_one_leaves_magnitude_prune_and_dare_linear_equal_to_linear(pair):
    linear = merge_adapters(pair, [0.7, 0.3], "linear")
    for combination in ("magnitude_prune", "dare_linear"):
        merged = merge_adapters(pair, [0.7, 0.3], combination, density=1.0, seed=3)
        for module, m in merged.items():
            np.testing.assert_array_equal(m.down, linear[module].down)
            np.testing.assert_array_equal(m.up, linear[module].up)


def test_dare_linear_matches_numpy_and_is_repeatable(pair):
    weights, density = [0.7, 0.3], 0.5
    merged = merge_adapters(pair, weights, "dare_linear", density=density, seed=7)
    again = merge_adapters(pair, weights, "dare_linear", density=density, seed=7)
    other = merge_adapters(pair, weights, "dare_linear", density=density, seed=8)
    drops = ref_dare_drops(pair, density, 7)
    for module, m in merged.items():
        ca, cb = per_matrix_coefficients(pair, module, weights)
        (da, db) = drops[module]
        np.testing.assert_allclose(m.down, sum(c * t for c, t in zip(ca, da)), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(m.up, sum(c * t for c, t in zip(cb, db)), rtol=1e-6, atol=1e-6)
        np.testing.assert_array_equal(m.down, again[module].down)
        np.testing.assert_array_equal(m.up, again[module].up)
    assert any(not np.array_equal(m.down, other[k].down) for k, m in merged.items())


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_dare_ties_matches_numpy(pair, method):
    weights, density = [0.7, 0.3], 0.6
    merged = merge_adapters(pair, weights, "dare_ties", density=density, majority_sign_method=method, seed=11)
    drops = ref_dare_drops(pair, density, 11)
    for module, m in merged.items():
        ca, cb = per_matrix_coefficients(pair, module, weights)
        da, db = drops[module]
        np.testing.assert_allclose(m.down, ref_ties(None, ca, 1.0, method, pruned=da), rtol=1e-6, atol=1e-6)
        np.testing.assert_allclose(m.up, ref_ties(None, cb, 1.0, method, pruned=db), rtol=1e-6, atol=1e-6)


def test_svd_at_full_rank_reproduces_the_weighted_sum():
    adapters = [make_adapter(1, 4, 8.0), make_adapter(2, 2, 3.0)]
    weights = [0.7, -0.3]
    merged = merge_adapters(adapters, weights, "svd", rank=6)
    for module, m in merged.items():
        want = sum(w * delta(a[module]) for a, w in zip(adapters, weights))
        assert m.rank == 6 and m.alpha == 6.0
        np.testing.assert_allclose(delta(m), want, rtol=1e-5, atol=1e-5)


def test_svd_truncates_to_the_best_low_rank_approximation(pair):
    weights = [0.7, 0.3]
    default = merge_adapters(pair, weights, "svd")  # default rank: the largest input rank
    low = merge_adapters(pair, weights, "svd", rank=2)
    for module in default:
        total = sum(w * delta(a[module]) for a, w in zip(pair, weights))
        u, s, vt = np.linalg.svd(total)
        assert default[module].rank == 4 and low[module].rank == 2
        np.testing.assert_allclose(delta(low[module]), (u[:, :2] * s[:2]) @ vt[:2], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(np.linalg.svd(delta(low[module]), compute_uv=False)[:2], s[:2], rtol=1e-5)


def test_svd_clamp_clips_both_factors_at_the_quantile(pair):
    weights, q = [0.7, 0.3], 0.9
    merged = merge_adapters(pair, weights, "svd", rank=3, svd_clamp=q)
    for module, m in merged.items():
        total = sum(w * delta(a[module]) for a, w in zip(pair, weights))
        u, s, vt = np.linalg.svd(total)
        up, down = u[:, :3] * s[:3], vt[:3]
        high = np.quantile(np.concatenate([up.ravel(), down.ravel()]), q)
        # the SVD's sign per singular vector is free: compare up to a sign per column/row
        signs = np.sign(np.sum(m.up * np.clip(up, -high, high), axis=0))
        np.testing.assert_allclose(m.up * signs, np.clip(up, -high, high), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(m.down * signs[:, None], np.clip(down, -high, high), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("combination", ["ties_svd", "magnitude_prune_svd", "dare_linear_svd", "dare_ties_svd"])
def test_svd_variants_merge_the_full_updates(combination):
    adapters = [make_adapter(1, 4, 8.0), make_adapter(2, 2, 3.0)]
    weights, density = [0.7, 0.3], 0.5
    merged = merge_adapters(adapters, weights, combination, density=density, rank=8, seed=5)  # pruned: full rank
    drops = ref_dare_drops(adapters, density, 5, per_matrix=False)
    for module, m in merged.items():
        deltas = [delta(a[module]) for a in adapters]
        if combination == "ties_svd":
            want = ref_ties(deltas, weights, density, "total")
        elif combination == "magnitude_prune_svd":
            want = sum(w * ref_prune(d, density) for w, d in zip(weights, deltas))
        elif combination == "dare_linear_svd":
            want = sum(w * d for w, d in zip(weights, drops[module][0]))
        else:
            want = ref_ties(None, weights, 1.0, "total", pruned=drops[module][0])
        np.testing.assert_allclose(delta(m), want, rtol=1e-5, atol=1e-5)


# -- refusals ---------------------------------------------------------------------------------

def test_unequal_ranks_are_refused_for_the_per_matrix_combinations():
    adapters = [make_adapter(1, 4, 8.0), make_adapter(2, 2, 2.0)]
    for combination in ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune"):
        with pytest.raises(UserError, match=r"needs equal ranks.*a.safetensors \(rank 4\), b.safetensors \(rank 2\)"):
            merge_adapters(adapters, [0.5, 0.5], combination, density=0.5, names=["a.safetensors", "b.safetensors"])
    merge_adapters(adapters, [0.5, 0.5], "ties_svd", density=0.5)  # the svd variants take any ranks


def test_different_modules_and_bad_options_are_refused(pair):
    fewer = {k: v for k, v in pair[1].items() if "proj_in" not in k}
    with pytest.raises(UserError, match="b.safetensors lacks 'unet.mid_block.attentions.0.proj_in' of a.safetensors"):
        merge_adapters([pair[0], fewer], [1, 1], "cat", names=["a.safetensors", "b.safetensors"])
    other_shape = make_adapter(2, 4, 2.0, {k: (o + 1, i) for k, (o, i) in MODULES.items()})
    with pytest.raises(UserError, match="has shape"):
        merge_adapters([pair[0], other_shape], [1, 1], "cat")
    dora = {k: LoraModule(v.down, v.up, v.alpha, np.ones(v.up.shape[0], np.float32)) for k, v in pair[1].items()}
    with pytest.raises(UserError, match="DoRA"):
        merge_adapters([pair[0], dora], [1, 1], "cat")
    for options, message in (({"density": 1.5}, "density"), ({"majority_sign_method": "mean"}, "majority_sign"),
                             ({"rank": 0}, "rank"), ({"svd_clamp": 2.0}, "svd_clamp")):
        with pytest.raises(UserError, match=message):
            merge_adapters(pair, [1, 1], "ties_svd", **options)
    with pytest.raises(UserError, match="2 adapters but 1 weights"):
        merge_adapters(pair, [1], "cat")
    # within one UNet (combine_adapters) adapters may cover different layers: each module from those that have it
    merged = merge_adapters([pair[0], fewer], [1, 1], "cat", same_modules=False)
    np.testing.assert_allclose(delta(merged["unet.mid_block.attentions.0.proj_in"]),
                               delta(pair[0]["unet.mid_block.attentions.0.proj_in"]), rtol=1e-6, atol=1e-6)


# -- files and the command --------------------------------------------------------------------

@pytest.fixture
def files(tmp_path, pair):
    a = write_lora_file(pair[0], str(tmp_path / "a.safetensors"))
    b = write_lora_file(pair[1], str(tmp_path / "b.safetensors"), layout="kohya")
    c = write_lora_file(make_adapter(3, 2, 2.0), str(tmp_path / "c.safetensors"))
    return a, b, c


def test_the_command_writes_a_lora_the_sampler_reads(files, tmp_path, pair, capsys):
    a, b, _ = files
    out = tmp_path / "merged"
    assert main(["merge-lora", a, b, "--weights", "0.7", "0.3", "--combination", "cat", "--out", str(out)]) == 0
    assert "rank 8" in capsys.readouterr().out
    file = lora_file(str(out))  # the folder holds pytorch_lora_weights.safetensors
    modules, layout = read_lora_file(file)
    assert layout == "diffusers"
    unet_part = _unet_modules(modules, file)  # what add_lora (the sampler's --lora) injects
    assert len(unet_part) == len(MODULES)
    for module, m in modules.items():
        assert m.rank == 8 and m.alpha == 8.0
        want = 0.7 * delta(pair[0][module]) + 0.3 * delta(pair[1][module])
        np.testing.assert_allclose(delta(m), want, rtol=1e-5, atol=1e-5)


def test_the_command_writes_the_kohya_layout_with_alpha(files, tmp_path, pair):
    a, b, _ = files
    out = tmp_path / "ties.safetensors"
    assert main(["merge-lora", a, b, "--combination", "ties", "--density", "0.5", "--majority_sign_method",
                 "frequency", "--layout", "kohya", "--out", str(out)]) == 0
    modules, layout = read_lora_file(str(out))
    want = merge_adapters(pair, [1.0, 1.0], "ties", density=0.5, majority_sign_method="frequency")
    assert layout == "kohya" and set(modules) == set(want)
    for module, m in modules.items():
        assert m.rank == 4 and m.alpha == 4.0
        np.testing.assert_array_equal(m.down, want[module].down)
    svd = merge_lora_files([a, b], [0.5, 0.5], str(tmp_path / "svd"), "svd", rank=3, svd_clamp=0.99)
    assert {m.rank for m in read_lora_file(svd)[0].values()} == {3}


@pytest.mark.parametrize("argv, message", [
    (["--combination", "linear"], "needs equal ranks, .*a.safetensors \\(rank 4\\).*c.safetensors \\(rank 2\\)"),
    (["--combination", "ties"], "needs --density"),
    (["--density", "0.5"], "--density does nothing with --combination cat"),
    (["--combination", "linear", "--rank", "2"], "--rank is for the svd combinations"),
    (["--weights", "1"], "--weights has 1 values for 2 LoRA files"),
])
def test_the_command_refuses_in_one_line(files, tmp_path, capsys, argv, message):
    a, _, c = files
    assert main(["merge-lora", a, c, "--out", str(tmp_path / "x")] + argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and "\n" not in err
    assert __import__("re").search(message, err), err
    assert not (tmp_path / "x").exists()


def test_the_command_refuses_an_output_it_cannot_write(files, tmp_path, capsys):
    a, b, _ = files
    blocker = tmp_path / "file"
    blocker.write_text("")
    assert main(["merge-lora", a, b, "--out", str(blocker)]) == 2
    assert "is a file, not a folder" in capsys.readouterr().err
