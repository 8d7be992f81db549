"""Optimizer parameter groups: each group's learning-rate multiple and weight decay, and a group
set to lr 0 (the end of pivotal tuning) left exactly as it was, for AdamW and Prodigy."""
import numpy as np
import mindspore as ms
import pytest

from mindscedit.training.optimizers import adamw
from mindscedit.training.param_groups import ParamGroup
from mindscedit.training.prodigy import GatedProdigy

from test_prodigy import ReferenceProdigy

STEPS, PIVOT = 8, 5
PRODIGY_PIVOT = 16  # d needs a few steps to move


def weights(rng):
    return [rng.standard_normal((3, 4)).astype(np.float32), np.zeros((5,), np.float32),
            rng.standard_normal((2, 6)).astype(np.float32)]


def grads_at(rng, params):
    return tuple(ms.Tensor((p.asnumpy() - 0.5 + 0.1 * rng.standard_normal(p.shape)).astype(np.float32))
                 for p in params)


def reference_adamw(p, g, m, v, t, lr, decay, b1=0.9, b2=0.999, eps=1e-8):
    """torch.optim.AdamW's step in float64."""
    m = b1 * m + (1 - b1) * g
    v = b2 * v + (1 - b2) * g * g
    p = p * (1 - lr * decay) - lr / (1 - b1 ** t) * m / (np.sqrt(v / (1 - b2 ** t)) + eps)
    return p, m, v


def test_adamw_groups_have_their_own_rate_and_decay_and_a_stopped_group_stays_put():
    rng = np.random.default_rng(0)
    start = weights(rng)
    params = [ms.Parameter(ms.Tensor(w), name=f"w{i}") for i, w in enumerate(start)]
    lr = 1e-2
    groups = [ParamGroup(params[:2], name="unet"), ParamGroup(params[2:], lr_ratio=0.5, weight_decay=0.3, name="te")]
    optimizer = adamw(groups, lr, weight_decay=0.01)
    ratios, decays = [1.0, 1.0, 0.5], [0.01, 0.01, 0.3]
    ref = [(np.array(w, np.float64), np.zeros(w.shape), np.zeros(w.shape)) for w in start]
    for step in range(1, STEPS + 1):
        if step == PIVOT:
            optimizer.set_group_lr_scale(1, 0.0)
            frozen = (params[2].asnumpy().copy(), optimizer.exp_avg[2].asnumpy().copy(),
                      optimizer.exp_avg_sq[2].asnumpy().copy())
        grads = grads_at(rng, params)
        optimizer(grads, ms.Tensor(True), 1.0)
        for i, g in enumerate(grads):
            if i == 2 and step >= PIVOT:
                continue
            ref[i] = reference_adamw(*ref[i][:1], g.asnumpy().astype(np.float64), *ref[i][1:], step,
                                     lr * ratios[i], decays[i])
            np.testing.assert_allclose(params[i].asnumpy(), ref[i][0], rtol=2e-5, atol=1e-6,
                                       err_msg=f"weight {i} at step {step}")
    assert np.array_equal(params[2].asnumpy(), frozen[0])  # weights and moments untouched since the pivot
    assert np.array_equal(optimizer.exp_avg[2].asnumpy(), frozen[1])
    assert np.array_equal(optimizer.exp_avg_sq[2].asnumpy(), frozen[2])
    assert not np.array_equal(params[0].asnumpy(), start[0])


def prodigy_state(optimizer, indices):
    slots = {f"{slot}/{j}": ps[i].asnumpy().copy() for slot, ps in optimizer.state_slots().items()
             for j, i in enumerate(indices)}
    slots.update({key: p.asnumpy().copy() for key, p in optimizer.scalar_state().items()})
    return slots


def test_prodigy_groups_share_d_and_a_stopped_group_drops_out_of_it():
    """Before the pivot two groups at the same rate step as one (the reference over all weights); after it the
    running group steps as a one-group Prodigy started from the same state, and the stopped one stays put."""
    rng = np.random.default_rng(1)
    start = weights(rng)
    settings = dict(weight_decay=0.1, use_bias_correction=True)
    params = [ms.Parameter(ms.Tensor(w), name=f"w{i}") for i, w in enumerate(start)]
    optimizer = GatedProdigy([ParamGroup(params[:2]), ParamGroup(params[2:], name="te")], 1.0, **settings)
    reference = ReferenceProdigy(start, [1.0] * PRODIGY_PIVOT, **settings)
    for step in range(1, PRODIGY_PIVOT):
        grads = grads_at(rng, params)
        optimizer(grads, ms.Tensor(True), 1.0)
        reference.step([g.asnumpy() for g in grads])
    for p, w in zip(params, reference.p):
        np.testing.assert_allclose(p.asnumpy(), w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(float(optimizer.d.asnumpy()), reference.d, rtol=5e-5)
    d_at_pivot = float(optimizer.d.asnumpy())
    assert d_at_pivot > 1e-5  # d has moved: the groups' sums reached it

    optimizer.set_group_lr_scale(1, 0.0)
    alone_params = [ms.Parameter(ms.Tensor(p.asnumpy()), name=f"a{i}") for i, p in enumerate(params[:2])]
    alone = GatedProdigy(alone_params, 1.0, **settings)
    state = prodigy_state(optimizer, [0, 1])
    for slot, ps in alone.state_slots().items():
        for j, p in enumerate(ps):
            p.set_data(ms.Tensor(state[f"{slot}/{j}"]))
    for key, p in alone.scalar_state().items():
        p.set_data(ms.Tensor(state[key]))
    frozen = prodigy_state(optimizer, [2])
    frozen_weight = params[2].asnumpy().copy()
    for step in range(PRODIGY_PIVOT, PRODIGY_PIVOT + 8):
        grads = grads_at(rng, params)
        optimizer(grads, ms.Tensor(True), 1.0)
        alone(grads[:2], ms.Tensor(True), 1.0)
    for p, q in zip(params[:2], alone_params):
        np.testing.assert_allclose(p.asnumpy(), q.asnumpy(), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(float(optimizer.d.asnumpy()), float(alone.d.asnumpy()), rtol=1e-6)
    assert float(optimizer.d.asnumpy()) > d_at_pivot
    assert np.array_equal(params[2].asnumpy(), frozen_weight)
    after = prodigy_state(optimizer, [2])
    for key in frozen:
        if "/" in key and not key.startswith("optimizer/"):
            assert np.array_equal(after[key], frozen[key]), key


def test_prodigy_refuses_a_group_at_another_rate():
    params = [ms.Parameter(ms.Tensor(np.ones(2, np.float32)), name=f"w{i}") for i in range(2)]
    with pytest.raises(ValueError, match="the te group's learning rate must be the others'"):
        GatedProdigy([ParamGroup(params[:1]), ParamGroup(params[1:], lr_ratio=0.5, name="te")], 1.0)
