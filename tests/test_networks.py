"""The networks' softplus and the Bernoulli log-density built on it, against float64 references."""

import pyro.distributions as dist
import pytest
import torch
from torch.nn import functional as F

from conftest import benchmark
from pyro_vae.likelihoods import Bernoulli
from pyro_vae.networks import ACTIVATIONS, Softplus, softplus


def test_softplus_matches_float64_over_the_whole_float32_range():
    x = torch.cat([torch.linspace(-100, 100, 400_001), torch.tensor([-88.0, -1e-8, 0.0, 1e-8, 88.0])])
    exact = F.softplus(x.double(), threshold=1000)  # log1p(exp(x)) in float64, no shortcut
    ours = softplus(x).double()
    tiny = torch.finfo(torch.float32).tiny
    rel = ((ours - exact).abs() / exact.clamp(min=tiny)).max().item()
    assert rel < 3e-7  # about two float32 ulps, where torch's float32 softplus is worse
    assert rel < ((F.softplus(x).double() - exact).abs() / exact.clamp(min=tiny)).max().item()


def test_softplus_gradient_is_the_sigmoid():
    x = torch.linspace(-30, 30, 1001, dtype=torch.float64, requires_grad=True)
    (g,) = torch.autograd.grad(softplus(x).sum(), x)
    assert torch.allclose(g, torch.sigmoid(x.detach()), rtol=1e-12, atol=1e-15)
    xs = torch.randn(5, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(softplus, (xs,))


@pytest.mark.parametrize("backend", ["aot_eager", "inductor"])
def test_compiled_softplus_has_the_eager_value_and_gradient(backend):
    # torch 2.11 zeroed the gradient of an autograd.Function whose output was modified in
    # place (pytorch/pytorch#180642): compiled training diverged. aot_eager isolates tracing.
    torch._dynamo.reset()
    weights = torch.linspace(-1, 2, 50)  # a gradient that is not all ones
    loss = lambda x: (softplus(x) * weights).sum()  # noqa: E731
    x = (5 * torch.randn(40, 50)).requires_grad_()
    (g_eager,) = torch.autograd.grad(loss(x), x)
    value = torch.compile(loss, backend=backend, dynamic=False)(x)
    (g_compiled,) = torch.autograd.grad(value, x)
    torch.testing.assert_close(value, loss(x), rtol=1e-6, atol=1e-3)
    torch.testing.assert_close(g_compiled, g_eager, rtol=1e-6, atol=1e-6)
    assert g_compiled.abs().max() > 1  # the bug gave zeros


def test_softplus_activation_is_a_parameter_free_layer():
    layer = ACTIVATIONS["softplus"]()
    assert isinstance(layer, Softplus) and not list(layer.parameters())
    assert layer.state_dict() == torch.nn.Softplus().state_dict() == {}


@pytest.mark.parametrize("grey", [False, True])
def test_bernoulli_log_density_and_gradient_equal_torchs(grey):
    torch.manual_seed(0)
    logits = (4 * torch.randn(3, 64, 784, dtype=torch.float64)).requires_grad_()
    x = torch.rand(64, 784, dtype=torch.float64)
    x = x if grey else (x > 0.5).double()
    ours = Bernoulli(logits=logits, validate_args=False).to_event(1).log_prob(x)  # (3, 64)
    ref = dist.Bernoulli(logits=logits, validate_args=False).to_event(1).log_prob(x)
    assert ours.shape == ref.shape == (3, 64)
    assert torch.allclose(ours, ref, rtol=1e-12)
    (g,) = torch.autograd.grad(ours.sum(), logits)
    assert torch.allclose(g, x - torch.sigmoid(logits.detach()), atol=1e-12)  # d/dl log p = x - p
    assert isinstance(Bernoulli(logits=logits[0, 0]).expand([5, 784]), Bernoulli)


@pytest.mark.parametrize("device", ["cpu", "meta"])
def test_softplus_is_the_vectorized_node_on_the_cpu_and_torchs_kernel_elsewhere(device):
    # meta stands in for a GPU (no data, same dispatch): there one launch forward and one
    # backward; the CPU node's log-based arithmetic would be eleven and two
    x = torch.randn(3, 4, device=device, requires_grad=True)
    with benchmark("bench_host").LaunchCount() as ops:  # the ATen operations run
        softplus(x).sum().backward()
    torchs = {"softplus", "softplus_backward"}
    if device == "cpu":
        assert not torchs & set(ops.names) and "log" in ops.names and "sigmoid" in ops.names
    else:
        assert torchs <= set(ops.names) and not {"log", "exp_", "sigmoid"} & set(ops.names)
