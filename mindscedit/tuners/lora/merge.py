"""Merge several LoRAs into one, as plain NumPy: the combinations of peft's `add_weighted_adapter`.

Every adapter i has weight w_i and scale s_i = alpha_i / r_i; its update is s_i B_i A_i. The merged
adapter gets alpha = its rank, so its scale is 1 and B A is the merged update itself.

cat              A = [w_1 s_1 A_1; w_2 s_2 A_2; ...], B = [B_1, B_2, ...] along the rank: exactly
                 sum_i w_i s_i B_i A_i, rank = sum of the ranks.
linear, ties, dare_linear, dare_ties, magnitude_prune
                 (equal ranks only) A = merge([c_i A_i]), B = merge([c_i B_i]) with the merge
                 function below applied to A and to B separately, c_i = sqrt(|w_i s_i|) (a negative
                 weight puts its sign on A's coefficient). Keeps the rank; not the sum of the
                 updates (cross terms B_i A_j).
svd, ties_svd, dare_linear_svd, dare_ties_svd, magnitude_prune_svd
                 the merge function on the full updates D_i = s_i B_i A_i with weights w_i, then a
                 truncated SVD D = U S V^T to `rank` (default: the largest input rank): B = U_r S_r,
                 A = V_r^T (zero-padded where `rank` exceeds the layer's sizes); `svd_clamp` q clamps B and A to +-quantile(q) of their joint entries.

Merge functions over task tensors T_i with weights c_i (peft.utils.merge_utils):
  linear (task arithmetic)  sum_i c_i T_i
  magnitude_prune           each T_i keeps its int(density * size) largest |entries|, then sum_i c_i T_i
  ties                      magnitude prune; majority sign per entry = sign of sum_i T_i ("total") or of
                            sum_i sign(T_i) ("frequency"), 0 counting as +; disjoint mean: the sum of
                            c_i T_i over the i whose sign agrees, divided by how many agree (at least 1)
  dare_linear               each entry of T_i kept with probability density (Bernoulli, `seed`),
                            the kept ones divided by density; then sum_i c_i T_i
  dare_ties                 DARE's random drop, then ties' sign election and disjoint mean
density >= 1 prunes and drops nothing.
"""
import math
from typing import Dict, List, Optional, Sequence

import numpy as np

from ...errors import UserError
from .formats import LoraModule

PER_MATRIX = ("linear", "ties", "dare_linear", "dare_ties", "magnitude_prune")
SVD = ("svd", "ties_svd", "dare_linear_svd", "dare_ties_svd", "magnitude_prune_svd")
COMBINATIONS = ("cat",) + PER_MATRIX + SVD
SIGN_METHODS = ("total", "frequency")


# -- merge functions (peft.utils.merge_utils) -------------------------------------------------

def magnitude_prune_tensor(tensor: np.ndarray, density: float) -> np.ndarray:
    """Keep the int(density * size) entries of largest magnitude, zero the rest."""
    if density >= 1:
        return tensor
    flat = tensor.reshape(-1)
    k = int(density * flat.size)
    mask = np.zeros(flat.size, dtype=tensor.dtype)
    if k > 0:
        mask[np.argsort(-np.abs(flat), kind="stable")[:k]] = 1
    return tensor * mask.reshape(tensor.shape)


def random_prune_tensor(tensor: np.ndarray, density: float, rng: np.random.Generator) -> np.ndarray:
    """DARE: keep each entry with probability `density` and divide the kept ones by it."""
    if density >= 1:
        return tensor
    keep = rng.random(tensor.shape) < density
    return np.where(keep, tensor, 0.0) / density if density > 0 else np.zeros_like(tensor)


def majority_sign_mask(stacked: np.ndarray, method: str = "total") -> np.ndarray:
    sign = np.sign(stacked)
    if method == "total":
        magnitude = stacked.sum(axis=0)
    elif method == "frequency":
        magnitude = sign.sum(axis=0)
    else:
        raise UserError(f"majority_sign_method '{method}' is not one of {', '.join(SIGN_METHODS)}")
    return sign == np.where(magnitude >= 0, 1.0, -1.0)


def disjoint_merge(weighted: np.ndarray, mask: np.ndarray) -> np.ndarray:
    return (weighted * mask).sum(axis=0) / np.maximum(mask.sum(axis=0), 1.0)


def merge_tensors(tensors: Sequence[np.ndarray], weights: Sequence[float], method: str, density: float = 1.0,
                  majority_sign_method: str = "total", rng: Optional[np.random.Generator] = None) -> np.ndarray:
    """One of linear, ties, dare_linear, dare_ties, magnitude_prune over `tensors` (float64)."""
    tensors = [np.asarray(t, np.float64) for t in tensors]
    if method in ("ties", "magnitude_prune"):
        tensors = [magnitude_prune_tensor(t, density) for t in tensors]
    elif method in ("dare_linear", "dare_ties"):
        rng = rng if rng is not None else np.random.default_rng(0)
        tensors = [random_prune_tensor(t, density, rng) for t in tensors]
    elif method != "linear":
        raise UserError(f"unknown merge method '{method}'")
    stacked = np.stack(tensors)
    weighted = stacked * np.asarray(weights, np.float64).reshape((-1,) + (1,) * (stacked.ndim - 1))
    if method in ("ties", "dare_ties"):
        return disjoint_merge(weighted, majority_sign_mask(stacked, majority_sign_method))
    return weighted.sum(axis=0)


# -- merging adapters -------------------------------------------------------------------------

def _check_options(combination: str, density: float, majority_sign_method: str, rank: Optional[int],
                   svd_clamp: Optional[float]) -> None:
    if combination not in COMBINATIONS:
        raise UserError(f"combination '{combination}' is not one of {', '.join(COMBINATIONS)}")
    if not 0 <= density <= 1:
        raise UserError(f"density must be in [0, 1], got {density}")
    if majority_sign_method not in SIGN_METHODS:
        raise UserError(f"majority_sign_method '{majority_sign_method}' is not one of {', '.join(SIGN_METHODS)}")
    if rank is not None and rank < 1:
        raise UserError(f"rank must be >= 1, got {rank}")
    if svd_clamp is not None and not 0 <= svd_clamp <= 1:
        raise UserError(f"svd_clamp is a quantile in [0, 1], got {svd_clamp}")


def merge_adapters(adapters: List[Dict[str, LoraModule]], weights: Sequence[float], combination: str = "cat",
                   density: float = 1.0, majority_sign_method: str = "total", rank: Optional[int] = None,
                   svd_clamp: Optional[float] = None, seed: int = 0, names: Optional[Sequence[str]] = None,
                   same_modules: bool = True) -> Dict[str, LoraModule]:
    """{module: LoraModule} merging `adapters` ({module: LoraModule} each) with `weights`.

    With `same_modules` all adapters must cover the same modules; without, a module is merged from
    the adapters that have it (as peft does). `names` (e.g. the files) name the adapters in errors.
    DARE draws from one generator seeded with `seed`, module by module in sorted order (A then B,
    adapter by adapter), so a merge is repeatable.
    """
    weights = [float(w) for w in weights]
    names = list(names) if names is not None else [f"adapter {i}" for i in range(len(adapters))]
    if len(adapters) != len(weights):
        raise UserError(f"{len(adapters)} adapters but {len(weights)} weights")
    if not adapters:
        raise UserError("nothing to merge: no adapters given")
    _check_options(combination, density, majority_sign_method, rank, svd_clamp)
    keys = [set(a) for a in adapters]
    for name, k in zip(names[1:], keys[1:]):
        if same_modules and k != keys[0]:
            extra, missing = sorted(k - keys[0]), sorted(keys[0] - k)
            what = f"has '{extra[0]}' which {names[0]} lacks" if extra else f"lacks '{missing[0]}' of {names[0]}"
            raise UserError(f"{name} {what}: LoRAs to merge must adapt the same modules")
    modules = sorted(set().union(*keys))
    if combination in PER_MATRIX:
        for module in modules:
            ranks = [(n, a[module].rank) for n, a in zip(names, adapters) if module in a]
            if len({r for _, r in ranks}) != 1:
                listed = ", ".join(f"{n} (rank {r})" for n, r in ranks)
                raise UserError(f"combination {combination} needs equal ranks, '{module}' has {listed}; "
                                "use cat or an svd combination")
    rng = np.random.default_rng(seed)
    out = {}
    for module in modules:
        have = [i for i, a in enumerate(adapters) if module in a]
        present, weights_here = [adapters[i][module] for i in have], [weights[i] for i in have]
        for name, m in zip([names[i] for i in have], present):
            if m.magnitude is not None:
                raise UserError(f"{name}: '{module}' is DoRA; DoRA adapters cannot be merged (their magnitudes do not add)")
            shape = (m.up.shape[0], m.down.shape[1])
            if shape != (present[0].up.shape[0], present[0].down.shape[1]):
                raise UserError(f"{name}: '{module}' has shape {shape}, {names[have[0]]} has "
                                f"{(present[0].up.shape[0], present[0].down.shape[1])}")
        if combination == "cat":
            down = np.concatenate([w * m.scaling * m.down.astype(np.float64) for m, w in zip(present, weights_here)], axis=0)
            up = np.concatenate([m.up.astype(np.float64) for m in present], axis=1)
        elif combination in PER_MATRIX:
            coef = [math.sqrt(abs(w * m.scaling)) for m, w in zip(present, weights_here)]
            coef_a = [math.copysign(c, w) for c, w in zip(coef, weights_here)]
            down = merge_tensors([m.down for m in present], coef_a, combination, density, majority_sign_method, rng)
            up = merge_tensors([m.up for m in present], coef, combination, density, majority_sign_method, rng)
        else:
            deltas = [m.scaling * m.up.astype(np.float64) @ m.down.astype(np.float64) for m in present]
            method = "linear" if combination == "svd" else combination[: -len("_svd")]
            delta = merge_tensors(deltas, weights_here, method, density, majority_sign_method, rng)
            up, down = svd_factors(delta, rank or max(m.rank for m in present), svd_clamp)
        out[module] = LoraModule(down.astype(np.float32), up.astype(np.float32), float(down.shape[0]))
    return out


def svd_factors(delta: np.ndarray, rank: int, clamp: Optional[float] = None):
    """(B [out, rank], A [rank, in]) with B A the best rank-`rank` approximation of `delta`; a rank above
    min(out, in) is padded with zero rows/columns (B A is then `delta` itself)."""
    u, s, vt = np.linalg.svd(delta, full_matrices=False)
    keep = min(rank, s.size)
    up, down = np.zeros((delta.shape[0], rank)), np.zeros((rank, delta.shape[1]))
    up[:, :keep], down[:keep] = u[:, :keep] * s[:keep], vt[:keep]
    if clamp is not None:
        high = np.quantile(np.concatenate([up.reshape(-1), down.reshape(-1)]), clamp)
        up, down = np.clip(up, -high, high), np.clip(down, -high, high)
    return up, down
