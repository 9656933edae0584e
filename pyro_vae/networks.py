"""Plain torch encoder and decoder networks (no Pyro inside).

Encoder: x ``[B, X]`` (and optional one-hot y ``[B, C]``) -> ``[B, P]`` raw parameters of
q(z|x), P as the guide asks (``guides.py``: 2D for the diagonal Gaussian, loc then raw scale).
Decoder: z ``[B, D]`` (and optional y) -> ``[B, K * X]`` raw likelihood parameters
(K outputs per pixel, as the likelihood asks; see ``likelihoods.py``).

``mlp`` is the default (Pyro's VAE example: 784-400-50 softplus; Burda et al. 2015:
784-200-200-50 tanh); ``conv`` is a small conv / transposed-conv pair for images of any
shape ``(C, H, W)`` with H and W divisible by 4 (two stride-2 layers: H/4 x W/4 features).

:func:`softplus` is log(1 + e^x) as one autograd node with a vectorized forward on the CPU,
where torch's softplus spends most of a training step's elementwise time in an unvectorized
log1p; torch's own elsewhere.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F

from .config import register_choices


class _Softplus(torch.autograd.Function):
    """softplus(x) = max(x, 0) + log1p(u), u = exp(-|x|) in (0, 1]; log1p(u) is computed
    as log(w) - ((w - 1) - u) / w with w = 1 + u (the rounding error of w corrected to
    first order), which needs only the vectorized log. d softplus / dx = sigmoid(x).

    The returned tensor is made by out-of-place ops: under ``torch.compile`` in torch 2.11,
    an autograd.Function whose output was modified in place gets a zero gradient (the
    output's gradient edge is misrouted; pytorch/pytorch#180642), which made compiled
    training diverge. ``tests/test_networks.py`` holds compiled against eager gradients."""

    @staticmethod
    def forward(ctx, x):
        ctx.save_for_backward(x)
        u = x.abs().neg_().exp_()  # in place on temporaries only
        w = u + 1
        correction = (w - 1).sub_(u).div_(w)
        return torch.log(w) - correction + x.clamp(min=0)

    @staticmethod
    def backward(ctx, grad):
        (x,) = ctx.saved_tensors
        return grad * torch.sigmoid(x)


def softplus(x: torch.Tensor) -> torch.Tensor:
    """log(1 + e^x) elementwise, any shape, gradient sigmoid(x). On the CPU the vectorized
    node above (it agrees with float64 to ~1e-7 relative over the float32 range, <= 1e-6
    for denormal outputs; no threshold switch); on any other device torch's own: there log1p
    is not the bottleneck, and torch's one fused kernel forward and one backward replace the
    node's eleven and two plus a Python autograd call. An eager GPU step is bound by its host
    launching kernels: on the CPU, with the arithmetic made negligible, the swap took ~0.4 ms
    off a `trace` step of ~2.5 ms (benchmarks/README.md)."""
    if x.device.type == "cpu":
        return _Softplus.apply(x)
    return F.softplus(x)


class Softplus(nn.Module):
    """:func:`softplus` as a layer (no parameters: state dicts match ``nn.Softplus``)."""

    def forward(self, x):
        return softplus(x)


ACTIVATIONS = {
    "softplus": Softplus,
    "tanh": nn.Tanh,
    "relu": nn.ReLU,
    "elu": nn.ELU,
    "gelu": nn.GELU,
}
register_choices("model.activation", ACTIVATIONS)

MIN_ENCODER_SCALE = 1e-4  # floor of q(z|x)'s scale


def mlp(sizes: list[int], activation: str) -> nn.Sequential:
    """Linear layers ``sizes[0] -> ... -> sizes[-1]`` with ``activation`` between them."""
    layers: list[nn.Module] = []
    for i, (n_in, n_out) in enumerate(zip(sizes[:-1], sizes[1:])):
        layers.append(nn.Linear(n_in, n_out))
        if i < len(sizes) - 2:
            layers.append(ACTIVATIONS[activation]())
    return nn.Sequential(*layers)


def _with_label(h: torch.Tensor, y: torch.Tensor | None) -> torch.Tensor:
    """Append the one-hot label ``[..., B, C]`` to ``h [..., X]``, the leading dims of the two
    broadcast (sample dims of h; a grid of z ``[G, 1, D]`` against B labels)."""
    if y is None:
        return h
    lead = torch.broadcast_shapes(h.shape[:-1], y.shape[:-1])
    return torch.cat([h.expand(*lead, h.shape[-1]), y.expand(*lead, y.shape[-1])], dim=-1)


def conv_features(image_shape) -> tuple[int, int, int]:
    """The conv encoder's feature map ``(64, H/4, W/4)`` for images ``(C, H, W)`` (H, W
    divisible by 4), which the conv decoder starts from."""
    _, h, w = image_shape
    return 64, h // 4, w // 4


class Encoder(nn.Module):
    """x ``[B, X]`` (+ y ``[B, C]``) -> the guide's ``out_dim`` = P raw parameters ``[B, P]``.
    With ``conv``, x is an image of ``image_shape`` ``(C, H, W)`` (default ``(1, 28, 28)``),
    X = C * H * W."""

    def __init__(self, x_dim, out_dim, hidden, activation, num_classes=0, conv=False,
                 image_shape=(1, 28, 28)):
        super().__init__()
        self.conv, self.image_shape = conv, tuple(image_shape)
        if conv:
            self.features = nn.Sequential(  # (B, C, H, W) -> (B, 64 * H/4 * W/4)
                nn.Conv2d(self.image_shape[0], 32, 4, stride=2, padding=1),
                ACTIVATIONS[activation](),
                nn.Conv2d(32, 64, 4, stride=2, padding=1),
                ACTIVATIONS[activation](),
                nn.Flatten(),
            )
            n_features = math.prod(conv_features(self.image_shape))
            self.net = mlp([n_features + num_classes, *hidden, out_dim], activation)
        else:
            self.net = mlp([x_dim + num_classes, *hidden, out_dim], activation)

    def forward(self, x, y=None):
        h = self.features(x.reshape(-1, *self.image_shape)) if self.conv else x
        return self.net(_with_label(h, y))  # (B, P)


class Decoder(nn.Module):
    """z ``[B, D]`` (+ y ``[B, C]``) -> raw likelihood parameters ``[B, K * X]``. With
    ``conv``, images of ``image_shape`` ``(C, H, W)`` (default ``(1, 28, 28)``)."""

    def __init__(self, x_dim, latent_dim, hidden, activation, outputs_per_pixel=1,
                 num_classes=0, conv=False, image_shape=(1, 28, 28)):
        super().__init__()
        self.conv, self.image_shape = conv, tuple(image_shape)
        self.k = outputs_per_pixel
        if conv:
            self.feature_shape = conv_features(self.image_shape)  # (64, H/4, W/4)
            self.net = mlp([latent_dim + num_classes, *hidden, math.prod(self.feature_shape)],
                           activation)
            self.deconv = nn.Sequential(  # (B, 64, H/4, W/4) -> (B, K * C, H, W)
                ACTIVATIONS[activation](),
                nn.ConvTranspose2d(64, 32, 4, stride=2, padding=1),
                ACTIVATIONS[activation](),
                nn.ConvTranspose2d(32, outputs_per_pixel * self.image_shape[0], 4, stride=2,
                                   padding=1),
            )
        else:
            self.net = mlp([latent_dim + num_classes, *hidden, outputs_per_pixel * x_dim],
                           activation)

    def forward(self, z, y=None):
        h = self.net(_with_label(z, y))
        if not self.conv:
            return h  # (B, K * X)
        out = self.deconv(h.reshape(-1, *self.feature_shape))  # (N, K*C, H, W), N: batch dims
        out = out.reshape(out.shape[0], self.k, -1).transpose(1, 2)  # (N, X, K): pixel-major,
        # like the MLP layout, with X = C*H*W in x's own (c, h, w) order
        return out.reshape(*h.shape[:-1], -1)  # (..., X * K)
