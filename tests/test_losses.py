"""Loss: Min-SNR weights and targets against numpy references of the formulas."""
import numpy as np
import mindspore as ms
import pytest

from mindscedit.losses import DiffusionLoss, min_snr_weight_table


def _alphas_cumprod():
    betas = np.linspace(0.00085**0.5, 0.012**0.5, 1000) ** 2  # SD's scaled_linear schedule
    return np.cumprod(1.0 - betas)


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_min_snr_weights_match_reference(prediction_type):
    ac = _alphas_cumprod()
    gamma = 5.0
    weights = min_snr_weight_table(ac, gamma, prediction_type)
    for t in (0, 10, 250, 500, 999):
        snr = ac[t] / (1 - ac[t])
        denominator = snr if prediction_type == "epsilon" else snr + 1
        assert weights[t] == pytest.approx(min(snr, gamma) / denominator, rel=1e-6)
    assert weights[0] < 0.01  # low noise, huge SNR: clipped to gamma / SNR
    if prediction_type == "epsilon":
        assert weights[999] == pytest.approx(1.0)  # SNR < gamma: unweighted


@pytest.mark.parametrize("prediction_type,snr_gamma", [("epsilon", None), ("v_prediction", None), ("epsilon", 5.0)])
def test_loss_matches_numpy(prediction_type, snr_gamma):
    ac = _alphas_cumprod()
    rng = np.random.default_rng(0)
    latents, noise, pred = (rng.standard_normal((3, 4, 4, 4)).astype(np.float32) for _ in range(3))
    t = np.array([5, 400, 990], dtype=np.int32)
    loss = DiffusionLoss(ac, prediction_type, snr_gamma)

    a = np.sqrt(ac[t]).reshape(-1, 1, 1, 1)
    s = np.sqrt(1 - ac[t]).reshape(-1, 1, 1, 1)
    noisy = loss.add_noise(ms.Tensor(latents), ms.Tensor(noise), ms.Tensor(t)).asnumpy()
    np.testing.assert_allclose(noisy, a * latents + s * noise, rtol=1e-5, atol=1e-6)

    target = noise if prediction_type == "epsilon" else a * noise - s * latents
    per_sample = ((pred - target) ** 2).mean(axis=(1, 2, 3))
    if snr_gamma:
        per_sample = per_sample * min_snr_weight_table(ac, snr_gamma, prediction_type)[t]
    value = loss(ms.Tensor(pred), ms.Tensor(latents), ms.Tensor(noise), ms.Tensor(t)).asnumpy()
    assert value == pytest.approx(per_sample.mean(), rel=1e-5)
