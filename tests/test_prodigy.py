"""Prodigy: the MindSpore optimizer against a float64 NumPy transcription of prodigyopt 1.1.x's
step, its gate, its checkpointed state, its settings, and a short run on the tiny model."""
import json
import math
import shutil

import numpy as np
import mindspore as ms
import pytest
from safetensors.numpy import load_file

from mindscedit.cli import main
from mindscedit.errors import UserError
from mindscedit.training.config import load_config, to_dict
from mindscedit.training.prodigy import GatedProdigy

BASE = dict(pretrained_model_name_or_path="m", train_data_dir="d")


class ReferenceProdigy:
    """prodigyopt 1.1.x's Prodigy.step for one parameter group, in float64 NumPy (the lr of a
    call is the next entry of `lrs`; a call is one step the optimizer runs).

    The weights are stored in fp32 after every step, as the optimizer under test stores them:
    d's numerator starts from p0 - p, a difference of ~1e-6 between weights of ~1, which fp32
    storage alone resolves to ~10%. Stored alike, both sides see the same differences (exact, by
    Sterbenz's lemma) and everything else is computed in float64 here."""

    def __init__(self, weights, lrs, betas=(0.9, 0.999), beta3=None, eps=1e-8, weight_decay=0.0, decouple=True,
                 use_bias_correction=False, safeguard_warmup=False, d0=1e-6, d_coef=1.0, growth_rate=math.inf):
        self.p = [np.array(w, np.float64) for w in weights]
        self.lrs, (self.beta1, self.beta2) = lrs, betas
        self.beta3 = math.sqrt(self.beta2) if beta3 is None else beta3
        self.eps, self.decay, self.decouple = eps, weight_decay, decouple
        self.bias_correction, self.safeguard, self.d0 = use_bias_correction, safeguard_warmup, d0
        self.d_coef, self.growth_rate = d_coef, growth_rate
        self.d, self.d_max, self.numerator, self.k, self.calls = d0, d0, 0.0, 0, 0
        self.p0 = None
        self.m = [np.zeros_like(p) for p in self.p]
        self.v = [np.zeros_like(p) for p in self.p]
        self.s = [np.zeros_like(p) for p in self.p]

    def step(self, grads):
        lr = self.lrs[self.calls]
        self.calls += 1
        if self.p0 is None:  # prodigyopt's state initialisation, on the first call
            self.p0 = [p.copy() for p in self.p]
        if lr == 0:  # a group whose lr is 0 is skipped
            return
        b1, b2, b3, d, d0 = self.beta1, self.beta2, self.beta3, self.d, self.d0
        bc = math.sqrt(1 - b2 ** (self.k + 1)) / (1 - b1 ** (self.k + 1)) if self.bias_correction else 1.0
        dlr = d * lr * bc
        grads = [np.array(g, np.float64) for g in grads]
        if not self.decouple:
            grads = [g + self.decay * p for g, p in zip(grads, self.p)]
        numerator, denominator = self.numerator * b3, 0.0
        for i, g in enumerate(grads):
            numerator += (d / d0) * dlr * np.dot(g.ravel(), (self.p0[i] - self.p[i]).ravel())
            self.m[i] = b1 * self.m[i] + d * (1 - b1) * g
            self.v[i] = b2 * self.v[i] + d * d * (1 - b2) * g * g
            self.s[i] = b3 * self.s[i] + (d / d0) * (d if self.safeguard else dlr) * g
            denominator += np.abs(self.s[i]).sum()
        if denominator == 0:  # no gradient yet: return before r, d and the weights
            return
        d_hat = self.d_coef * numerator / denominator
        if d == d0:
            d = max(d, d_hat)
        self.d_max = max(self.d_max, d_hat)
        self.d = min(self.d_max, d * self.growth_rate)
        self.numerator = numerator
        for i in range(len(self.p)):
            if self.decouple:
                self.p[i] = self.p[i] - self.decay * dlr * self.p[i]
            if b1 > 0:
                self.p[i] = self.p[i] - dlr * self.m[i] / (np.sqrt(self.v[i]) + self.d * self.eps)
            else:  # prodigyopt keeps no m: the gradient, times the new d (m holds the old one)
                self.p[i] = self.p[i] - dlr * self.d * grads[i] / (np.sqrt(self.v[i]) + self.d * self.eps)
            self.p[i] = self.p[i].astype(np.float32).astype(np.float64)
        self.k += 1


SETTINGS = {  # each lets d grow at least thirtyfold within the run
    "decoupled": dict(weight_decay=0.1),
    "coupled, bias correction, growth 1.3": dict(weight_decay=0.05, decouple=False, use_bias_correction=True,
                                                 growth_rate=1.3),
    "safeguard warmup, d_coef 2, beta3 0.95": dict(weight_decay=0.1, safeguard_warmup=True, d_coef=2.0, beta3=0.95),
    "beta1 0, beta2 0.99, bias correction": dict(betas=(0.0, 0.99), weight_decay=0.1, use_bias_correction=True),
}
# A warm-up from 0 (prodigyopt leaves that step alone), then a cosine decay: the schedule reaches
# the update through dlr = d * lr.
STEPS = 26
LRS = [0.0, 0.5] + [0.5 * (1 + math.cos(math.pi * i / STEPS)) for i in range(STEPS)]
ZERO_GRADIENT_STEP, SKIPPED_STEP, RESUME_STEP = 1, 7, 13


def start_weights(rng):
    """Random tensors and an all-zero one, as LoRA's B starts."""
    return [rng.standard_normal((3, 4)).astype(np.float32), np.zeros((6,), np.float32),
            rng.standard_normal((2, 3, 2)).astype(np.float32)]


def gradients(rng, weights, targets, call):
    """A noisy quadratic's gradients at the current weights (so that d has something to find).
    The last arrives in fp16, as with mixed precision."""
    if call == ZERO_GRADIENT_STEP:  # sum |s| stays 0: no progress, k stays 0
        grads = [np.zeros_like(w) for w in weights]
    else:
        grads = [(w - t + 0.1 * rng.standard_normal(w.shape)).astype(np.float32) for w, t in zip(weights, targets)]
    grads[-1] = grads[-1].astype(np.float16)
    return grads


def optimizer_state(optimizer):
    """Everything the optimizer declares, as a checkpoint saves it."""
    state = {f"{slot}/{i}": p.asnumpy().copy() for slot, ps in optimizer.state_slots().items()
             for i, p in enumerate(ps)}
    state.update({key: p.asnumpy().copy() for key, p in optimizer.scalar_state().items()})
    return state


def load_state(optimizer, state):
    for slot, ps in optimizer.state_slots().items():
        for i, p in enumerate(ps):
            p.set_data(ms.Tensor(state[f"{slot}/{i}"]))
    for key, p in optimizer.scalar_state().items():
        p.set_data(ms.Tensor(state[key]))


def make(weights, settings):
    params = [ms.Parameter(ms.Tensor(w), name=f"w{i}") for i, w in enumerate(weights)]
    return params, GatedProdigy(params, LRS[0], **settings)


def run_call(optimizer, reference, *args):
    """One optimizer call at the rate of the reference's next step, set as the training step sets
    it (a skipped call leaves the reference where it was, so the call after it gets the same rate)."""
    optimizer.learning_rate.set_data(ms.Tensor(reference.lrs[reference.calls], ms.float32))
    optimizer(*args)


def assert_matches(params, optimizer, reference, where):
    """fp32 against float64: every quantity carries float32 rounding (~1e-7 relative per
    operation) through 20+ steps, and d is a ratio of running sums. Tolerances: weights 1e-4
    relative + 1e-6 absolute (weights are O(1); the zero tensor starts at 0), d, d_max and r
    5e-5 relative (a wrong coefficient, order of updates or gate is off by far more)."""
    for p, w in zip(params, reference.p):
        np.testing.assert_allclose(p.asnumpy(), w, rtol=1e-4, atol=1e-6, err_msg=where)
    assert int(optimizer.k.asnumpy()) == reference.k, where
    np.testing.assert_allclose(float(optimizer.d.asnumpy()), reference.d, rtol=5e-5, err_msg=where)
    np.testing.assert_allclose(float(optimizer.d_max.asnumpy()), reference.d_max, rtol=5e-5, err_msg=where)
    np.testing.assert_allclose(float(optimizer.d_numerator.asnumpy()), reference.numerator, rtol=5e-5, atol=1e-30,
                               err_msg=where)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_matches_prodigyopt_step_by_step_through_a_skip_and_a_resume(name):
    settings = SETTINGS[name]
    rng = np.random.default_rng(0)
    weights = start_weights(rng)
    targets = [rng.standard_normal(w.shape) for w in weights]
    params, optimizer = make(weights, settings)
    reference = ReferenceProdigy(weights, LRS, **settings)
    resumed = None
    d_values = []
    for call in range(STEPS):
        if call == RESUME_STEP:  # a fresh optimizer on the checkpointed state goes on in its place
            saved_weights, saved_state = [p.asnumpy().copy() for p in params], optimizer_state(optimizer)
            params, resumed = make(saved_weights, settings)
            load_state(resumed, saved_state)
            optimizer = resumed
        grads = gradients(rng, [p.asnumpy() for p in params], targets, call)
        grad_factor = 0.5 if call % 3 == 0 else 1.0  # unscaling and clipping, folded into one factor
        if call == SKIPPED_STEP:
            grads[0][1, 2] = np.nan
            before = optimizer_state(optimizer), [p.asnumpy().copy() for p in params]
            run_call(optimizer, reference, tuple(ms.Tensor(g) for g in grads), ms.Tensor(False),
                     ms.Tensor(grad_factor, ms.float32))
            after = optimizer_state(optimizer), [p.asnumpy().copy() for p in params]
            for key in before[0]:  # weights, p0, m, v, s, d, d_max, r, k, step count: bitwise the same
                assert np.array_equal(before[0][key], after[0][key]), key
            assert all(np.array_equal(a, b) for a, b in zip(before[1], after[1]))
            continue
        run_call(optimizer, reference, tuple(ms.Tensor(g) for g in grads), ms.Tensor(True),
                 ms.Tensor(grad_factor, ms.float32))
        reference.step([g.astype(np.float64) * grad_factor for g in grads])
        assert_matches(params, optimizer, reference, f"{name}, call {call}")
        d_values.append(reference.d)
    # No progress on the lr-0 step, the skipped one and (without coupled decay, which makes the
    # gradient wd * p) the zero-gradient one; the step count moves on every step but the skipped one.
    assert resumed is not None and reference.k == STEPS - (3 if settings.get("decouple", True) else 2)
    assert int(optimizer.global_step.asnumpy().reshape(-1)[0]) == STEPS - 1
    # The run exercised what it claims to: d left d0 and grew over several steps.
    d0 = settings.get("d0", 1e-6)
    assert d_values[-1] > 30 * d0 and len(set(d_values)) > 3
    if "growth_rate" in settings:  # the cap holds once d has left d0 (the first jump is not capped)
        ratios, cap = np.array([b / a for a, b in zip(d_values, d_values[1:]) if a != d0]), settings["growth_rate"]
        assert ratios.max() <= cap * (1 + 1e-12) and np.isclose(ratios, cap).any()


def test_called_with_gradients_only_as_the_accumulating_step_calls_it():
    """mindone's step (gradient accumulation) calls optimizer(grads): apply and grad_factor default."""
    rng = np.random.default_rng(2)
    weights = start_weights(rng)
    params, optimizer = make(weights, {})
    reference = ReferenceProdigy(weights, LRS)
    for _ in range(4):
        grads = [rng.standard_normal(w.shape).astype(np.float32) + 1.0 for w in weights]
        run_call(optimizer, reference, tuple(ms.Tensor(g) for g in grads))
        reference.step(grads)
    assert_matches(params, optimizer, reference, "gradients only")
    assert reference.k == 3  # the lr-0 first step made none


def test_settings_reach_the_compile_cache_key():
    """A cached step is keyed by its cells' constants: each setting must be one of them."""
    import hashlib

    from mindscedit.models.graph_sharing import update_with_cell_constants

    def key(**settings):
        digest = hashlib.sha256()
        update_with_cell_constants(digest, make(start_weights(np.random.default_rng(0)), settings)[1])
        return digest.hexdigest()

    variants = [{}, dict(betas=(0.9, 0.99)), dict(beta3=0.9), dict(eps=1e-6), dict(weight_decay=0.1),
                dict(decouple=False), dict(use_bias_correction=True), dict(safeguard_warmup=True), dict(d0=1e-5),
                dict(d_coef=2.0), dict(growth_rate=1.02)]
    assert len({key(**v) for v in variants}) == len(variants)


def test_in_the_branch_free_step_fp16_unscaling_and_a_nan_step(gradients_are_inputs):
    """Through build_train_step: loss-scaled fp16 gradients, clipping, a NaN step skipped; every
    optimizer tensor in the step's cell tree (all a graph loaded from the compile cache binds)."""
    from mindscedit.training.step import build_train_step

    net, lrs, max_norm = gradients_are_inputs, [1.0] * 8, 1.0
    optimizer = GatedProdigy([net.w, net.b], lrs[0], weight_decay=0.01)
    step = build_train_step(net, optimizer, "fp16", max_norm, 1)
    registered = {id(p) for _, p in step.parameters_and_names()}
    declared = [p for ps in optimizer.state_slots().values() for p in ps] + list(optimizer.scalar_state().values())
    assert {id(p) for p in declared} <= registered
    reference = ReferenceProdigy([np.zeros(4), np.ones((2, 3))], lrs, weight_decay=0.01)
    rng = np.random.default_rng(1)
    direction = [rng.standard_normal(4), rng.standard_normal((2, 3))]  # steady gradients: d grows
    for scale in (10.0, 0.5, None, 3.0, 0.2):  # global norm above and below the clip; a NaN step
        grads = [g + 0.3 * rng.standard_normal(g.shape) for g in direction]
        if scale is None:
            grads[1][0, 0] = np.nan
        else:
            grads = [g * scale / np.sqrt(sum((x ** 2).sum() for x in grads)) for g in grads]
            reference.step([g * max_norm / max(scale, max_norm) for g in grads])
        step(*(ms.Tensor(g.astype(np.float32)) for g in grads), ms.Tensor(lrs[0], ms.float32))
        for p, w in zip((net.w, net.b), reference.p):
            np.testing.assert_allclose(p.asnumpy(), w, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(float(optimizer.d.asnumpy()), reference.d, rtol=1e-4)
    assert reference.d > 1e-6 and int(optimizer.k.asnumpy()) == 4


# ---------------------------------------------------------------------------- settings

def test_prodigy_settings_from_flags_and_a_yaml_section(tmp_path):
    config = load_config(None, dict(BASE, optimizer="prodigy", prodigy_growth_rate="inf", prodigy_d0="1e-5",
                                    prodigy_decouple="false", prodigy_beta3="0.99"))
    assert config.prodigy_growth_rate == math.inf and config.prodigy_d0 == 1e-5
    assert not config.prodigy_decouple and config.prodigy_beta3 == 0.99
    defaults = load_config(None, dict(BASE, optimizer="prodigy"))
    assert (defaults.prodigy_beta3, defaults.prodigy_decouple, defaults.prodigy_use_bias_correction,
            defaults.prodigy_safeguard_warmup, defaults.prodigy_d0, defaults.prodigy_d_coef,
            defaults.prodigy_growth_rate) == (None, True, False, False, 1e-6, 1.0, math.inf)
    grouped, flat = tmp_path / "grouped.yaml", tmp_path / "flat.yaml"
    grouped.write_text("optimizer: prodigy\nlearning_rate: 1.0\nprodigy:\n  beta3: 0.98\n  decouple: false\n"
                       "  use_bias_correction: true\n  safeguard_warmup: true\n  d0: 1.0e-5\n  d_coef: 0.5\n"
                       "  growth_rate: inf\n")
    flat.write_text("optimizer: prodigy\nlearning_rate: 1.0\nprodigy_beta3: 0.98\nprodigy_decouple: false\n"
                    "prodigy_use_bias_correction: true\nprodigy_safeguard_warmup: true\nprodigy_d0: 1.0e-5\n"
                    "prodigy_d_coef: 0.5\nprodigy_growth_rate: .inf\n")
    assert load_config(str(grouped), BASE) == load_config(str(flat), BASE)
    assert load_config(str(grouped), BASE).prodigy_growth_rate == math.inf
    # train_config.json holds strict JSON, and reads back.
    written = json.dumps(to_dict(config), allow_nan=False)
    assert json.loads(written)["prodigy_growth_rate"] == "inf"
    assert load_config(None, dict(BASE, prodigy_growth_rate=json.loads(written)["prodigy_growth_rate"])) \
        .prodigy_growth_rate == math.inf


@pytest.mark.parametrize("overrides,message", [
    ({"prodigy_d0": "0"}, r"^prodigy_d0 must be > 0, got 0.0$"),
    ({"prodigy_d0": "inf"}, r"^prodigy_d0 must be a finite number, got inf$"),
    ({"prodigy_d_coef": "-1"}, r"^prodigy_d_coef must be > 0, got -1.0$"),
    ({"prodigy_growth_rate": "0.5"}, r"^prodigy_growth_rate must be >= 1, got 0.5$"),
    ({"prodigy_growth_rate": "nan"}, r"^prodigy_growth_rate must be >= 1, got nan$"),
    ({"prodigy_growth_rate": "fast"}, r"^--prodigy_growth_rate: 'prodigy_growth_rate' must be a number, got 'fast'$"),
    ({"prodigy_beta3": "1"}, r"^prodigy_beta3 must be < 1, got 1.0$"),
    ({"prodigy_beta3": "-0.1"}, r"^prodigy_beta3 must be >= 0, got -0.1$"),
    ({"prodigy_decouple": "maybe"}, r"^--prodigy_decouple: 'prodigy_decouple' must be true or false, got 'maybe'$"),
    ({"optimizer": "prodigy", "adam_epsilon": "0"}, r"^adam_epsilon must be > 0 with --optimizer prodigy, got 0.0$"),
])
def test_bad_prodigy_settings_name_the_flag(overrides, message):
    with pytest.raises(UserError, match=message):
        load_config(None, dict(BASE, **overrides))


def test_cli_reports_a_bad_prodigy_flag_in_one_line(capsys):
    argv = ["train", "--pretrained_model_name_or_path", "m", "--train_data_dir", "d", "--optimizer", "prodigy",
            "--learning_rate", "1.0", "--prodigy_growth_rate", "0.9"]
    assert main(argv) == 2
    assert capsys.readouterr().err.strip() == "error: prodigy_growth_rate must be >= 1, got 0.9"


# ---------------------------------------------------------------------------- the tiny model

@pytest.mark.slow
def test_lr_1_lowers_the_loss_and_a_resumed_run_continues_exactly(tiny_model_dir, photos_dir, tmp_path):
    from mindscedit.training.checkpoint import load_training_state, save_training_state
    from mindscedit.training.trainer import Trainer

    def config(output_dir, **overrides):
        return load_config(None, dict(
            pretrained_model_name_or_path=tiny_model_dir, train_data_dir=photos_dir, output_dir=str(output_dir),
            resolution=32, center_crop=True, train_batch_size=2, device_target="CPU", method="lora",
            optimizer="prodigy", learning_rate=1.0, max_train_steps=20, checkpointing_steps=10, **overrides))

    # One fixed batch and fixed noise: with lr 1.0 Prodigy finds a step size and the loss falls.
    # The run below then starts over from the state saved here, so both share one compile.
    trainer = Trainer(config(tmp_path / "full")).build()
    (tmp_path / "start").mkdir()
    save_training_state(str(tmp_path / "start"), trainer.train_step, {"global_step": 0})
    comps, optimizer = trainer.components, trainer.train_step.optimizer
    rng = np.random.default_rng(0)
    pixels = ms.Tensor(rng.uniform(-1, 1, (2, 3, 32, 32)).astype(np.float32))
    ids = ms.Tensor(np.array([comps.tokenizer("a photo of a cat", padding="max_length", max_length=77).input_ids] * 2,
                             np.int32))
    randomness = trainer.draw_randomness(0, 2)
    lr = ms.Tensor(1.0, ms.float32)
    losses = [float(trainer.train_step(pixels, ids, *randomness, lr)[1].asnumpy()) for _ in range(20)]
    assert float(optimizer.d.asnumpy()) > 1e3 * 1e-6  # d grew from d0
    assert np.mean(losses[-3:]) < 0.85 * losses[0], losses

    # A run of 20 steps against one that stops after checkpoint-10 and resumes from it.
    load_training_state(str(tmp_path / "start"), trainer.train_step)
    assert float(optimizer.d.asnumpy()) == np.float32(1e-6) and int(optimizer.k.asnumpy()) == 0
    full = trainer.train()
    state = load_file(str(tmp_path / "full" / "checkpoint-10" / "training_state.safetensors"))
    assert {key.split("/")[0] for key in state} == {"param", "prodigy_p0", "prodigy_m", "prodigy_v", "prodigy_s",
                                                    "optimizer", "loss_scaler"}
    assert {"optimizer/prodigy_d", "optimizer/prodigy_d_max", "optimizer/prodigy_d_numerator",
            "optimizer/prodigy_k", "optimizer/global_step"} <= set(state)
    resumed_dir = tmp_path / "resumed"
    resumed_dir.mkdir()
    shutil.copytree(tmp_path / "full" / "checkpoint-10", resumed_dir / "checkpoint-10")
    resumed = Trainer(config(resumed_dir, resume_from_checkpoint="latest")).train()
    assert resumed.global_step == 20 and len(resumed.losses) == 10
    np.testing.assert_allclose(resumed.losses, full.losses[10:], rtol=1e-5)
    expected = load_file(str(tmp_path / "full" / "pytorch_lora_weights.safetensors"))
    got = load_file(str(resumed_dir / "pytorch_lora_weights.safetensors"))
    assert set(got) == set(expected)
    for key in expected:
        np.testing.assert_allclose(got[key], expected[key], rtol=1e-5, atol=1e-7, err_msg=key)
    final = load_file(str(tmp_path / "full" / "checkpoint-20" / "training_state.safetensors"))
    again = load_file(str(resumed_dir / "checkpoint-20" / "training_state.safetensors"))
    assert final["optimizer/prodigy_k"] == again["optimizer/prodigy_k"] == 20
    assert final["optimizer/prodigy_d"] > 1e-6  # d moved in this run too
    np.testing.assert_allclose(again["optimizer/prodigy_d"], final["optimizer/prodigy_d"], rtol=1e-5)
