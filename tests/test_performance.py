"""Speed/memory optimisations change no numbers: same losses, same trained weights, same keys.

Each method trains the tiny UNet a few steps with the training step code (LatentTrainNet,
build_train_step) from identical weights and inputs, once as mindone builds it and once with
`apply_fast_layers`; loss trajectories and the trained weights must agree to fp32 rounding.
"""
import numpy as np
import pytest
import mindspore as ms

from mindscedit.config import TrainConfig
from mindscedit.losses import DiffusionLoss
from mindscedit.models import build_unet, unet_preset
from mindscedit.models.fast_layers import AttentionCore, CoreAttnProcessor, apply_fast_layers
from mindscedit.training.methods import freeze_all_but, get_method
from mindscedit.training.network import LatentTrainNet
from mindscedit.training.step import build_train_step, lr_schedule, make_optimizer
from mindscedit.tuners.lora.config import ATTENTION_TARGETS, FEED_FORWARD_TARGETS

STEPS = 4
BATCH = 2


@pytest.fixture(scope="module")
def base_weights():
    ms.set_seed(0)
    unet = build_unet(unet_preset("tiny"))
    # Non-zero everywhere, so a wrong attention would change the output.
    return {name: p.asnumpy().copy() for name, p in unet.parameters_and_names()}


def fresh_unet(weights):
    unet = build_unet(unet_preset("tiny"))
    for name, p in unet.parameters_and_names():
        p.set_data(ms.Tensor(weights[name]))
    return unet


def train(weights, method_name, fast, steps=STEPS):
    """(losses, {param name: trained value}) after `steps` steps of `method_name`."""
    unet = fresh_unet(weights)
    if fast:
        assert apply_fast_layers(unet) > 0
    method = get_method(TrainConfig(method=method_name, rank=4,
                                    lora_target_modules=ATTENTION_TARGETS + FEED_FORWARD_TARGETS))
    ms.set_seed(1)  # same tuner / LoRA initialisation in both runs
    trainable = method.prepare(unet)
    freeze_all_but((unet,), trainable)
    if method_name == "scedit":  # zero-initialised ln2 would hide the encoder path: start non-trivially
        for p in trainable:
            p.set_data(ms.Tensor(np.random.default_rng(2).normal(0, 0.05, p.shape).astype(np.float32)))
    from mindone.diffusers import DDPMScheduler
    from mindscedit.models.presets import SD_SCHEDULER

    alphas = DDPMScheduler(**SD_SCHEDULER).alphas_cumprod.asnumpy()
    network = LatentTrainNet(unet, DiffusionLoss(alphas, "epsilon"))
    optimizer = make_optimizer(trainable, lr_schedule(1e-3, "constant", 0, STEPS))
    names = {id(p): name for name, p in unet.parameters_and_names()}
    if steps == 0:
        return np.array([]), {names[id(p)]: p.asnumpy() for p in trainable}
    step = build_train_step(network, optimizer, "no", 1.0, 1, "O0")
    rng = np.random.default_rng(0)
    size, ctx = 8, unet.config.cross_attention_dim
    losses = []
    for _ in range(steps):
        latents = rng.standard_normal((BATCH, 4, size, size), dtype=np.float32)
        text = rng.standard_normal((BATCH, 77, ctx), dtype=np.float32)
        noise = rng.standard_normal((BATCH, 4, size, size), dtype=np.float32)
        t = rng.integers(0, 1000, (BATCH,), dtype=np.int32)
        loss = step(ms.Tensor(latents), ms.Tensor(text), ms.Tensor(noise), ms.Tensor(t))[1]
        losses.append(float(loss.asnumpy()))
    return np.array(losses), {names[id(p)]: p.asnumpy() for p in trainable}


@pytest.mark.parametrize("method_name", ["lora", "scedit"])  # LoRA: backward through every attention
def test_fast_layers_leave_the_loss_trajectory_and_trained_weights_unchanged(base_weights, method_name):
    start = {k: v for k, v in train(base_weights, method_name, fast=False, steps=0)[1].items()}
    losses, weights = train(base_weights, method_name, fast=False)
    fast_losses, fast_weights = train(base_weights, method_name, fast=True)
    assert np.all(np.isfinite(losses)) and len(set(np.round(losses, 6))) > 1  # it did train
    np.testing.assert_allclose(fast_losses, losses, rtol=1e-4, atol=1e-6)
    assert fast_weights.keys() == weights.keys()
    # AdamW moves a weight by ~lr whatever its gradient's size, so fp32 rounding of a near-zero
    # gradient can flip single entries: compare the whole update, not entry by entry.
    update = np.concatenate([(weights[k] - start[k]).ravel() for k in weights])
    fast_update = np.concatenate([(fast_weights[k] - start[k]).ravel() for k in weights])
    assert np.linalg.norm(update) > 0
    assert np.linalg.norm(fast_update - update) < 0.02 * np.linalg.norm(update)


def test_fast_layers_keep_state_dict_keys_and_replace_every_plain_attention(base_weights):
    unet = fresh_unet(base_weights)
    keys = [name for name, _ in unet.parameters_and_names()]
    from mindone.diffusers.models.attention_processor import Attention

    attentions = [c for _, c in unet.cells_and_names() if isinstance(c, Attention)]
    assert apply_fast_layers(unet) == len(attentions) > 0
    assert [name for name, _ in unet.parameters_and_names()] == keys
    assert all(isinstance(a.processor, CoreAttnProcessor) and isinstance(a.attention_core, AttentionCore)
               for a in attentions)
    assert apply_fast_layers(unet) == 0  # idempotent
