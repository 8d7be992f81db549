"""LoRA / DoRA on one Dense layer, with runtime-adjustable adapter weights.

Built on mindone's peft `Linear` (same parameter layout: `lora_A.<adapter>.weight` [r, in],
`lora_B.<adapter>.weight` [out, r]), but every per-adapter number the forward reads is a
non-trainable Parameter instead of a Python attribute: a graph compiled once keeps seeing the
current weights, merge state and on/off switches (Python attributes are frozen into the graph
at its first compile).

Per adapter a:
  LoRA: y = W x + b + g_a * s_a * B_a A_a x
  DoRA: y = W x + b + g_a * [(m_a / n_a - 1) * W x + (m_a / n_a) * s_a * B_a A_a x]
        with n_a = ||W + s_a B_a A_a||_row (no gradient through n_a, as in peft / the DoRA paper
        section 4.3), i.e. W' = m_a * (W + s_a B_a A_a) / n_a.
s_a = weight_a * alpha_a / r_a; g_a is 1 while the adapter is active and not merged, else 0.
"""
from typing import Dict, List, Optional

import numpy as np
import mindspore as ms
from mindspore import nn, ops
from mindone.diffusers._peft.tuners.lora.layer import Linear as PeftLinear


def lora_delta(lora_a: np.ndarray, lora_b: np.ndarray, scaling: float) -> np.ndarray:
    """s * B A, the LoRA update of a [out, in] weight."""
    return scaling * (lora_b.astype(np.float64) @ lora_a.astype(np.float64))


def row_norm(weight: np.ndarray) -> np.ndarray:
    """||W||_row: the L2 norm of each output row of a [out, in] weight (DoRA's magnitude)."""
    return np.linalg.norm(weight.astype(np.float64), axis=1)


def dora_weight(weight, lora_a, lora_b, scaling, magnitude) -> np.ndarray:
    """m * (W + s B A) / ||W + s B A||_row."""
    adapted = weight.astype(np.float64) + lora_delta(lora_a, lora_b, scaling)
    return (np.asarray(magnitude, np.float64) / row_norm(adapted))[:, None] * adapted


class _Scalar(nn.Cell):
    """Holds one non-trainable float (a Parameter, so changing it needs no new graph)."""

    def __init__(self, value: float):
        super().__init__()
        self.value = ms.Parameter(ms.Tensor(value, ms.float32), name="value", requires_grad=False)


class _Magnitude(nn.Cell):
    """DoRA's learned magnitude vector m [out] (peft keeps it as `lora_magnitude_vector.<adapter>.weight`)."""

    def __init__(self, values: np.ndarray):
        super().__init__()
        self.weight = ms.Parameter(ms.Tensor(values.astype(np.float32)), name="weight")


class LoraLinear(PeftLinear):
    """A Dense layer with any number of named LoRA / DoRA adapters."""

    def __init__(self, base_layer: nn.Dense, adapter_name: str, r: int, lora_alpha: float,
                 use_dora: bool = False, init_lora_weights="gaussian"):
        if not isinstance(base_layer, nn.Dense):
            raise ValueError(f"LoRA needs a Dense layer, got {type(base_layer).__name__}")
        super().__init__(base_layer, adapter_name, r=r, lora_alpha=lora_alpha, init_lora_weights=init_lora_weights)
        self.lora_gate = nn.CellDict({})
        self.lora_scaling = nn.CellDict({})
        self.lora_magnitude_vector = nn.CellDict({})
        self.adapter_order: List[str] = []  # static structure the graph loops over
        self.dora_adapters: List[str] = []
        self.weights: Dict[str, float] = {}  # user weight per adapter (set_adapters)
        self.merges: List[tuple] = []  # (adapters, scalings used, DoRA norms), newest last
        self.add_adapter(adapter_name, r, lora_alpha, use_dora, init_lora_weights, _created=True)

    def add_adapter(self, adapter_name: str, r: int, lora_alpha: float, use_dora: bool = False,
                    init_lora_weights="gaussian", _created: bool = False) -> None:
        if adapter_name in self.adapter_order:
            raise ValueError(f"adapter '{adapter_name}' already exists on this layer")
        if not _created:
            self.update_layer(adapter_name, r, lora_alpha, 0.0, init_lora_weights, False)
        self.adapter_order.append(adapter_name)
        self._active_adapter = list(self.adapter_order)  # all adapters stay trainable / listed
        self.weights[adapter_name] = 1.0
        self.lora_gate[adapter_name] = _Scalar(1.0)
        self.lora_scaling[adapter_name] = _Scalar(lora_alpha / r)
        if use_dora:
            self.dora_adapters.append(adapter_name)
            # m starts at ||W||_row, so a fresh DoRA adapter (B = 0) leaves the layer unchanged.
            self.lora_magnitude_vector[adapter_name] = _Magnitude(row_norm(self.base_weight()).astype(np.float32))

    # -- numbers on the host -------------------------------------------------------------------
    def base_weight(self) -> np.ndarray:
        return self.get_base_layer().weight.asnumpy()

    def arrays(self, adapter: str):
        """(A, B, magnitude or None) as numpy."""
        mag = self.lora_magnitude_vector[adapter].weight.asnumpy() if adapter in self.dora_adapters else None
        return self.lora_A[adapter].weight.asnumpy(), self.lora_B[adapter].weight.asnumpy(), mag

    def set_alpha(self, adapter: str, lora_alpha: float) -> None:
        self.lora_alpha[adapter] = lora_alpha
        self._apply_weight(adapter)

    def set_weight(self, adapter: str, weight: float, active: bool = True) -> None:
        """Adapter strength as in diffusers' set_adapters: s = weight * alpha / r; weight 0 switches it off."""
        self.weights[adapter] = float(weight)
        self._apply_weight(adapter, active and weight != 0)

    def _apply_weight(self, adapter: str, active: Optional[bool] = None) -> None:
        self.scaling[adapter] = self.weights[adapter] * self.lora_alpha[adapter] / self.r[adapter]
        self.lora_scaling[adapter].value.set_data(ms.Tensor(self.scaling[adapter], ms.float32))
        if active is not None:
            self._set_gate(adapter, active and adapter not in self.merged_adapters)

    def _set_gate(self, adapter: str, on: bool) -> None:
        self.lora_gate[adapter].value.set_data(ms.Tensor(1.0 if on else 0.0, ms.float32))

    def is_on(self, adapter: str) -> bool:
        return float(self.lora_gate[adapter].value.asnumpy()) != 0.0

    # -- merging -------------------------------------------------------------------------------
    def _merge_terms(self, names: List[str], scales: Dict[str, float], norms: Dict[str, np.ndarray]):
        """(k, C) with merged W = k * W + C: the forward's sum over `names`, linear in the base W."""
        out, inp = self.out_features, self.in_features
        k, c = np.ones(out), np.zeros((out, inp))
        for adapter in names:
            a, b, mag = self.arrays(adapter)
            delta = lora_delta(a, b, scales[adapter])
            if mag is None:
                c += delta
            else:
                ratio = mag.astype(np.float64) / norms[adapter]
                k += ratio - 1.0
                c += ratio[:, None] * delta
        return k, c

    def merge(self, safe_merge: bool = False, adapter_names: Optional[List[str]] = None, scale: float = 1.0) -> None:
        """Fold the active adapters (times `scale`) into the base weight and switch their runtime path off.

        All of them are folded in one step from the same base weight, so the merged layer computes
        exactly what the unmerged one did (DoRA norms included).
        """
        names = [a for a in (adapter_names or self.adapter_order) if a in self.adapter_order and self.is_on(a)]
        if not names:
            return
        base = self.get_base_layer().weight
        w = base.asnumpy().astype(np.float64)
        scales = {a: self.scaling[a] * scale for a in names}
        norms = {a: row_norm(w + lora_delta(*self.arrays(a)[:2], scales[a])) for a in names if a in self.dora_adapters}
        k, c = self._merge_terms(names, scales, norms)
        merged = k[:, None] * w + c
        if safe_merge and not np.isfinite(merged).all():
            raise ValueError(f"merging adapters {names} gives non-finite weights")
        base.set_data(ms.Tensor(merged.astype(np.float32), base.dtype))
        self.merges.append((names, scales, norms))
        for adapter in names:
            self.merged_adapters.append(adapter)
            self._set_gate(adapter, False)

    def unmerge(self) -> None:
        """Undo merges, newest first (exact up to fp32 rounding)."""
        base = self.get_base_layer().weight
        while self.merges:
            names, scales, norms = self.merges.pop()
            k, c = self._merge_terms(names, scales, norms)
            w = (base.asnumpy().astype(np.float64) - c) / k[:, None]
            base.set_data(ms.Tensor(w.astype(np.float32), base.dtype))
            for adapter in names:
                self.merged_adapters.remove(adapter)
                self._set_gate(adapter, True)

    # -- forward -------------------------------------------------------------------------------
    def construct(self, x: ms.Tensor, *args, **kwargs) -> ms.Tensor:
        # Mixed precision as in peft and mindone: the frozen base layer runs in its own (low)
        # precision, each adapter in its weights' dtype (fp32 master weights), and its update is
        # cast back to the base output's dtype before it is added.
        base = self.get_base_layer()
        result = base(x)
        for adapter in self.adapter_order:
            gate = self.lora_gate[adapter].value
            scaling = self.lora_scaling[adapter].value
            lora_a = self.lora_A[adapter]
            lora_b = self.lora_B[adapter]
            adapter_x = x.astype(lora_a.weight.dtype)
            if adapter in self.dora_adapters:
                weight = base.weight.astype(lora_a.weight.dtype)
                adapted = weight + scaling * ops.matmul(lora_b.weight, lora_a.weight)
                norm = ops.stop_gradient(ops.sqrt(ops.reduce_sum(adapted * adapted, 1)))
                ratio = self.lora_magnitude_vector[adapter].weight / norm
                base_out = ops.matmul(adapter_x, ops.transpose(weight, (1, 0)))
                update = (ratio - 1.0) * base_out + ratio * scaling * lora_b(lora_a(adapter_x))
                result = result + (gate * update).astype(result.dtype)
            else:
                result = result + ((gate * scaling) * lora_b(lora_a(adapter_x))).astype(result.dtype)
        return result
