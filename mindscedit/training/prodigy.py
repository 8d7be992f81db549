"""Prodigy (Mishchenko and Defazio, https://arxiv.org/abs/2306.06101): Adam whose step size d is
estimated as it trains, so `--learning_rate 1.0` needs no tuning. The update is prodigyopt
1.1.x's, written for the branch-free step (see optimizers.py for the protocol).

Per step, with lr the schedule's value, k the number of steps that made progress so far,
bc = sqrt(1 - beta2^(k+1)) / (1 - beta1^(k+1)) with bias correction (else 1) and dlr = d * lr * bc:

1. every weight (skipped entirely while lr is 0, as prodigyopt skips a group whose lr is 0):
   g += wd * p (coupled decay only); m = beta1 m + d (1 - beta1) g; v = beta2 v + d^2 (1 - beta2) g^2;
   s = beta3 s + (d / d0) (safeguard_warmup ? d : dlr) g; and the sums <g, p0 - p> and |s|_1.
2. if the sum of |s|_1 over every weight is 0 (no gradient yet) the step stops here: no change to
   r, d or the weights, and k does not count it (m, v and s keep step 1's values, as in prodigyopt).
   Otherwise r = beta3 r + (d / d0) dlr sum <g, p0 - p>; d_hat = d_coef r / sum |s|_1; d jumps to
   max(d, d_hat) only while it is still d0; d_max = max(d_max, d_hat); d = min(d_max, d growth_rate).
3. every weight, with dlr from before d changed and d after: p -= wd dlr p (decoupled decay only);
   p -= dlr m / (sqrt(v) + d eps); k += 1. With beta1 = 0 prodigyopt keeps no m and steps by
   dlr d g / (sqrt(v) + d eps) with the new d; m is then d_old g, so the step here is scaled by
   d_new / d_old to match (it differs from m's formula once d moves).

p0 is each weight's value when the optimizer first runs (prodigyopt's state initialisation); it is
taken from the weight at the first applied step while k is 0, which is that value even if weights
were loaded after the optimizer was built, since nothing moves a weight before the first progress.

One d for all trainable weights: r and sum |s|_1 run over every weight, as in prodigyopt 1.1.x,
which shares one d across its parameter groups. Groups (param_groups.py: the method's weights, pivotal
tuning's token embeddings) share the schedule's lr, as prodigyopt computes dlr once and refuses a
group whose lr is neither the largest nor 0; each keeps its own weight decay. A group set to lr 0
(`set_group_lr_scale`, the end of pivotal tuning) drops out entirely: no update, no part in r or
|s|_1, its m, v and s kept. prodigyopt differs there: a group at lr 0 stops accumulating but still
steps by the shared dlr with its last m, so its weights keep drifting.

A gated-off step (non-finite gradients) changes nothing, d included: its gradient is replaced by
zeros and every update's coefficients by those of the identity (betas 1, increments 0, step 0).
"""
import logging
import math
from typing import Dict, Optional, Sequence

import mindspore as ms
from mindspore import nn, ops
from mindspore.ops import composite as C
from mindspore.ops import functional as F

from .param_groups import GroupScales, as_groups, flatten_groups

logger = logging.getLogger(__name__)

_accumulate = C.MultitypeFuncGraph("prodigy_accumulate")
_step = C.MultitypeFuncGraph("prodigy_step")


@_accumulate.register("Bool", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                      "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _accumulate_one(coupled, apply, take_p0, grad_factor, decay, beta1, m_coef, beta2, v_coef, beta3, s_coef,
                    param, grad, p0, exp_avg, exp_avg_sq, s):
    """Step 1 for one weight: writes m, v, s (and p0 on the first step), returns
    [<g, p0 - p>, |s|_1]. The betas and coefficients arrive already gated (1 and 0 when nothing
    may change); the gradient is zeroed then, since 0 * NaN would not be 0."""
    g = grad.astype(ms.float32) * grad_factor
    g = ops.select(ops.broadcast_to(apply, g.shape), g, ops.zeros_like(g))
    if coupled:  # a compile-time constant: decoupled runs get no node for it
        g = g + decay * param
    start = ops.select(ops.broadcast_to(take_p0, param.shape), param, p0)
    new_s = beta3 * s + s_coef * g
    sums = ops.stack([ops.reduce_sum(g * (start - param)), ops.reduce_sum(ops.abs(new_s))])
    sums = F.depend(sums, ops.assign(exp_avg, beta1 * exp_avg + m_coef * g))
    sums = F.depend(sums, ops.assign(exp_avg_sq, beta2 * exp_avg_sq + v_coef * ops.square(g)))
    sums = F.depend(sums, ops.assign(s, new_s))
    return F.depend(sums, ops.assign(p0, start))


_accumulate_per_weight = C.MultitypeFuncGraph("prodigy_accumulate_per_weight")
_step_per_weight = C.MultitypeFuncGraph("prodigy_step_per_weight")


@_accumulate_per_weight.register("Bool", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                                 "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor",
                                 "Tensor")
def _accumulate_one_in_group(coupled, apply, take_p0, grad_factor, beta1, m_coef, beta2, v_coef, beta3, s_coef,
                             on, decay, param, grad, p0, exp_avg, exp_avg_sq, s):
    """Step 1 for a weight of a group that is `on` (lr above 0) or not (every coefficient the identity's)."""
    one, zero = _scalar(1.0), _scalar(0.0)
    sums = _accumulate_one(coupled, ops.logical_and(apply, on), take_p0, grad_factor, decay,
                           ops.select(on, beta1, one), ops.select(on, m_coef, zero), ops.select(on, beta2, one),
                           ops.select(on, v_coef, zero), ops.select(on, beta3, one), ops.select(on, s_coef, zero),
                           param, grad, p0, exp_avg, exp_avg_sq, s)
    return sums * on.astype(ms.float32)  # a group at lr 0 adds nothing to r or |s|_1


@_step_per_weight.register("Bool", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _step_one_in_group(decoupled, m_lr, step_lr, d_eps, on, decay, param, exp_avg, exp_avg_sq):
    zero = _scalar(0.0)
    return _step_one(decoupled, ops.select(on, m_lr, zero), ops.select(on, decay * step_lr, zero), d_eps, param,
                     exp_avg, exp_avg_sq)


@_step.register("Bool", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor", "Tensor")
def _step_one(decoupled, m_lr, decay_lr, d_eps, param, exp_avg, exp_avg_sq):
    """Step 3 for one weight; m_lr and decay_lr are 0 when the step made no progress. The decay
    joins the step before it meets the weight: early on it is below the weight's last bit, and
    subtracted on its own it would round away."""
    delta = m_lr * exp_avg / (ops.sqrt(exp_avg_sq) + d_eps)
    if decoupled:
        delta = delta + decay_lr * param
    return ops.assign(param, param - delta)


def _scalar(value, dtype=ms.float32) -> ms.Tensor:
    return ms.Tensor(value, dtype)


class GatedProdigy(nn.Optimizer, GroupScales):
    """Prodigy with the branch-free step's `apply` gate, `grad_factor` and step-set learning rate
    (optimizers.py). Its state: p0, m, v, s per weight; d, d_max, r (prodigyopt's d_numerator),
    k and the count of applied steps as scalars, all in checkpoints, so a resumed run continues
    exactly."""

    def __init__(self, params, learning_rate, betas=(0.9, 0.999), beta3: Optional[float] = None, eps: float = 1e-8,
                 weight_decay: float = 0.0, decouple: bool = True, use_bias_correction: bool = False,
                 safeguard_warmup: bool = False, d0: float = 1e-6, d_coef: float = 1.0,
                 growth_rate: float = math.inf):
        groups = as_groups(params)
        other = [g.name for g in groups if g.lr_ratio != 1.0]
        if other:
            raise ValueError(f"Prodigy estimates one d for all weights on one learning rate: the {other[0]} group's "
                             "learning rate must be the others' (prodigyopt refuses it too)")
        # decay is applied below, as prodigyopt does
        super().__init__(learning_rate, flatten_groups(groups), weight_decay=0.0)
        self.init_groups(groups, weight_decay)
        beta3 = math.sqrt(betas[1]) if beta3 is None else beta3
        # Constants of the graph: public attributes, so the compile cache's key sees them. 1 - beta
        # and log(beta) are taken in double precision: 1 - float32(0.999) is 1.3e-5 off 0.001.
        self.beta1, self.beta2, self.beta3 = _scalar(betas[0]), _scalar(betas[1]), _scalar(beta3)
        self.one_minus_beta1, self.one_minus_beta2 = _scalar(1 - betas[0]), _scalar(1 - betas[1])
        self.log_beta1 = _scalar(math.log(betas[0]) if betas[0] > 0 else -math.inf)
        self.log_beta2 = _scalar(math.log(betas[1]) if betas[1] > 0 else -math.inf)
        self.eps, self.decay = _scalar(eps), _scalar(weight_decay)
        self.d0, self.d_coef, self.growth_rate = _scalar(d0), _scalar(d_coef), _scalar(growth_rate)
        self.decouple, self.use_bias_correction = bool(decouple), bool(use_bias_correction)
        self.beta1_is_zero = bool(betas[0] == 0)  # prodigyopt's other update (see step 3 above)
        self.safeguard_warmup = bool(safeguard_warmup)
        self.p0 = self._parameters.clone(prefix="prodigy_p0", init="same")
        self.exp_avg = self._parameters.clone(prefix="prodigy_m", init="zeros")
        self.exp_avg_sq = self._parameters.clone(prefix="prodigy_v", init="zeros")
        self.s = self._parameters.clone(prefix="prodigy_s", init="zeros")
        self.d = ms.Parameter(_scalar(d0), name="prodigy_d", requires_grad=False)
        self.d_max = ms.Parameter(_scalar(d0), name="prodigy_d_max", requires_grad=False)
        self.d_numerator = ms.Parameter(_scalar(0.0), name="prodigy_d_numerator", requires_grad=False)
        self.k = ms.Parameter(_scalar(0, ms.int32), name="prodigy_k", requires_grad=False)

    def construct(self, gradients, apply=True, grad_factor=1.0):
        apply = ops.logical_and(ms.Tensor(True), apply)  # a bool Tensor whether given a constant or not
        grad_factor = ops.cast(grad_factor, ms.float32).reshape(())
        one, zero = _scalar(1.0), _scalar(0.0)
        lr = self.get_lr().reshape(()).astype(ms.float32)
        # prodigyopt leaves a group whose lr is 0 untouched (the first step of a warm-up).
        active = ops.logical_and(apply, lr > 0)
        d, k = self.d, self.k
        dlr = d * lr * self._bias_correction(k)
        s_step = (d / self.d0) * (d if self.safeguard_warmup else dlr)
        # Spelled out: star-unpacking a tuple of Parameters does not compile.
        beta1, m_coef = ops.select(active, self.beta1, one), ops.select(active, d * self.one_minus_beta1, zero)
        beta2, v_coef = ops.select(active, self.beta2, one), ops.select(active, d * d * self.one_minus_beta2, zero)
        beta3, s_coef = ops.select(active, self.beta3, one), ops.select(active, s_step, zero)
        take_p0 = ops.logical_and(apply, k == 0)
        gradients = self.flatten_gradients(gradients)
        if self.num_groups == 1:  # a constant of the graph: one group compiles as before groups existed
            sums = ops.addn(self.hyper_map(
                F.partial(_accumulate, not self.decouple, apply, take_p0, grad_factor, self.decay,
                          beta1, m_coef, beta2, v_coef, beta3, s_coef),
                self._parameters, gradients, self.p0, self.exp_avg, self.exp_avg_sq, self.s))
        else:
            on = tuple(scale > 0 for scale in self.per_weight_lr_scales())
            decays = tuple(_scalar(decay) for decay in self.param_decays)
            sums = ops.addn(self.hyper_map(
                F.partial(_accumulate_per_weight, not self.decouple, apply, take_p0, grad_factor,
                          beta1, m_coef, beta2, v_coef, beta3, s_coef),
                on, decays, self._parameters, gradients, self.p0, self.exp_avg, self.exp_avg_sq, self.s))
        dot, s_norm = sums[0], sums[1]
        # No |s| yet means no gradient yet: prodigyopt returns before touching r, d or the weights.
        progress = ops.logical_and(active, s_norm > 0)
        d_numerator = self.beta3 * self.d_numerator + (d / self.d0) * dlr * dot
        d_hat = self.d_coef * d_numerator / ops.select(progress, s_norm, one)
        new_d = ops.select(d == self.d0, ops.maximum(d, d_hat), d)
        d_max = ops.maximum(self.d_max, d_hat)
        new_d = ops.minimum(d_max, new_d * self.growth_rate)
        step_lr, d_after = ops.select(progress, dlr, zero), ops.select(progress, new_d, d)
        m_lr = step_lr * (d_after / d) if self.beta1_is_zero else step_lr
        if self.num_groups == 1:
            updated = self.hyper_map(
                F.partial(_step, self.decouple, m_lr, self.decay * step_lr, d_after * self.eps),
                self._parameters, self.exp_avg, self.exp_avg_sq,
            )
        else:
            updated = self.hyper_map(
                F.partial(_step_per_weight, self.decouple, m_lr, step_lr, d_after * self.eps),
                on, decays, self._parameters, self.exp_avg, self.exp_avg_sq,
            )
        updated = F.depend(updated, ops.assign(self.d_numerator, ops.select(progress, d_numerator, self.d_numerator)))
        updated = F.depend(updated, ops.assign(self.d_max, ops.select(progress, d_max, self.d_max)))
        updated = F.depend(updated, ops.assign(self.d, d_after))
        updated = F.depend(updated, ops.assign_add(self.k, progress.astype(ms.int32)))
        return F.depend(updated, ops.assign_add(self.global_step, apply.astype(self.global_step.dtype)))

    def _bias_correction(self, k):
        if not self.use_bias_correction:
            return _scalar(1.0)
        step = (k + 1).astype(ms.float32)
        # 1 - beta^step as -expm1(step * log(beta)): no cancellation when beta^step is near 1.
        return ops.sqrt(-ops.expm1(step * self.log_beta2)) / -ops.expm1(step * self.log_beta1)

    def state_slots(self) -> Dict[str, Sequence[ms.Parameter]]:
        """Per-weight state, one list per slot in the order of `self.parameters` (checkpoint key
        prefixes: `prodigy_m/<weight path>`)."""
        return {"prodigy_p0": self.p0, "prodigy_m": self.exp_avg, "prodigy_v": self.exp_avg_sq, "prodigy_s": self.s}

    def scalar_state(self) -> Dict[str, ms.Parameter]:
        return {"optimizer/global_step": self.global_step, "optimizer/prodigy_d": self.d,
                "optimizer/prodigy_d_max": self.d_max, "optimizer/prodigy_d_numerator": self.d_numerator,
                "optimizer/prodigy_k": self.k}


def check_prodigy_settings(config) -> None:
    """What Prodigy cannot run with, refused in one line when the config is validated."""
    from ..errors import UserError

    # It divides by sqrt(v) + d * eps, and v is 0 wherever a gradient has been 0 (LoRA's A while B is 0).
    if config.adam_epsilon <= 0:
        raise UserError(f"adam_epsilon must be > 0 with --optimizer prodigy, got {config.adam_epsilon}")
    if config.text_encoder_lr not in (None, config.learning_rate):
        raise UserError(f"text_encoder_lr {config.text_encoder_lr} with --optimizer prodigy: Prodigy estimates one "
                        "step size for all weights on one learning rate; give it learning_rate's value (1.0) or "
                        "leave it unset")


def prodigy_from_config(params, learning_rate: float, config) -> GatedProdigy:
    """Prodigy with diffusers' flags: adam_* for the betas, epsilon and weight decay, prodigy_* for the rest."""
    c = config
    if c.learning_rate <= 0.1:  # diffusers warns at the same point
        logger.warning("--learning_rate %g with Prodigy: its step is d x lr with d estimated, so 1.0 is the usual "
                       "value; to take smaller steps lower --prodigy_d_coef instead", c.learning_rate)
    return GatedProdigy(params, float(learning_rate), (c.adam_beta1, c.adam_beta2), c.prodigy_beta3, c.adam_epsilon,
                        c.adam_weight_decay, c.prodigy_decouple, c.prodigy_use_bias_correction,
                        c.prodigy_safeguard_warmup, c.prodigy_d0, c.prodigy_d_coef, c.prodigy_growth_rate)
