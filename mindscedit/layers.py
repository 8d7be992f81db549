"""Small Cells shared by the tuners and the UNet's fast layers."""
import math

from mindspore import nn, ops

SQRT_HALF = math.sqrt(0.5)
INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


class ExactGELU(nn.Cell):
    """x * Phi(x), Phi the standard normal CDF (torch's default GELU), backward Phi(x) + x * phi(x).

    The same formula as MindSpore's `ops.gelu(approximate="none")`, which builds it from products
    with 0-d tensors: on CPU each such implicit broadcast keeps 16 bytes of index per element for
    as long as the graph lives (about 40 bytes per element over forward and backward). Python
    scalars and a hand-written backward that keeps only x avoid that.
    """

    def construct(self, x):
        return x * (0.5 + 0.5 * ops.erf(x * SQRT_HALF))

    def bprop(self, x, out, dout):
        cdf = 0.5 + 0.5 * ops.erf(x * SQRT_HALF)
        pdf = ops.exp(x * x * -0.5) * INV_SQRT_2PI
        return (dout * (cdf + x * pdf),)
