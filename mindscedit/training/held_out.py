"""The loss on held-out samples (--validation_loss_samples): does the run learn, or overfit?

N records are set aside with the seed before anything else picks from the data (max_train_samples,
the split between cards), so no card ever trains on them. Each is loaded once as training loads
a sample (the same resolution and crop, no flip), with its own VAE, noise and timestep draws,
fixed for the whole run. Every evaluation then runs the training network's forward on the same
inputs, so two evaluations of the same weights give the same loss and a change in it is the
weights' doing. The forward is compiled once, for one sample: the loss is the mean of the
per-sample losses, whatever N is. Only the main rank evaluates (under msrun every rank holds the
same weights; the forward has no collective operation).
"""
from typing import Callable, List, Sequence, Tuple, TypeVar

import numpy as np
import mindspore as ms
from mindspore import nn

from ..errors import UserError

T = TypeVar("T")

# The held-out set's generator: a key no epoch permutation, sample subset or step's draw uses.
HELD_OUT_STREAM = 2**32 - 2


def split_held_out(records: Sequence[T], num_samples: int, seed: int) -> Tuple[List[T], List[T]]:
    """(held-out records, the rest in their order): the first `num_samples` of a permutation seeded by `seed`."""
    if num_samples >= len(records):
        raise UserError(f"validation_loss_samples {num_samples} leaves nothing to train on: the data has "
                        f"{len(records)} samples")
    chosen = np.random.default_rng([seed, HELD_OUT_STREAM]).permutation(len(records))[:num_samples]
    held = set(int(i) for i in chosen)
    return [records[int(i)] for i in chosen], [r for i, r in enumerate(records) if i not in held]


class ForwardLoss(nn.Cell):
    """The training network's forward alone (no gradients, no update), as a graph of its own.

    auto_prefix=False: wrapping renames no parameter, so checkpoints and the step are unaffected.
    """

    def __init__(self, network):
        super().__init__(auto_prefix=False)
        self.network = network

    def construct(self, *inputs):
        return self.network(*inputs)


class HeldOutLoss:
    """`evaluate()`: the mean loss of the training network over the held-out samples.

    samples: per sample, the network's data inputs (pixel values, token ids, then the model
    family's size conditions and the condition image, where there are any);
    draw(k): sample k's fixed randomness (VAE noise, diffusion noise, timestep).
    """

    def __init__(self, network, samples: Sequence[tuple], draw: Callable[[int], tuple]):
        self.forward = ForwardLoss(network)
        self.inputs = []
        for k, sample in enumerate(samples):
            data = [ms.Tensor(np.asarray(x)[None]) for x in sample]
            latent_eps, noise, timestep = (np.asarray(x)[None] for x in draw(k))
            randomness = [ms.Tensor(latent_eps), ms.Tensor(noise), ms.Tensor(timestep.astype(np.int32))]
            self.inputs.append((*data[:2], *randomness, *data[2:]))

    def __len__(self):
        return len(self.inputs)

    def evaluate(self) -> float:
        losses = [float(self.forward(*inputs).asnumpy()) for inputs in self.inputs]
        return float(np.mean(losses))
