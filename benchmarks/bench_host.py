"""The host's share of a training step: what an eager GPU step waits on, measured on any CPU.

    python benchmarks/bench_host.py [--rounds 7] [--steps 200] [--gpu-path]

On a GPU an eager step of the default network is bound by its host, not by its arithmetic:
the captured floor's whole step runs in ~0.4 ms on an H200 while the eager floor takes
~3.5 ms (benchmarks/README.md), the time Python and the dispatcher take to issue a few
hundred kernels. This measures that cost where no GPU is needed: each variant's step on a
network so small that its arithmetic is negligible (784-8-2, batch 4, one CPU thread), so a
step's time is its host work, side by side in rotated rounds (the fastest round of each,
microseconds). ``ops`` counts the ATen operations one step issues, views left out: on a GPU
roughly one kernel launch each (a multi-tensor or fused operation may launch several). Variants: the plain-PyTorch ``floor`` and ``floor-same-kernels``
(bench_train.py), and pyro_vae's ``trace`` and ``meanfield`` with the host reads deferred
as on CUDA (``train.sync_every = 50``). ``--gpu-path``: the softplus that only the CPU
uses (``networks._Softplus``, 13 operations) swapped for torch's kernel, as on a GPU.
"""

import argparse
import contextlib
import time

import torch
from torch.nn import functional as F
from torch.utils._python_dispatch import TorchDispatchMode

from bench_train import floor_loss
from pyro_vae import networks
from pyro_vae.config import load_config
from pyro_vae.training import TrainState, build, make_loss, make_optimizer, train_step

TINY = ["model.hidden=[8]", "model.latent_dim=2", "train.batch_size=4", "train.sync_every=50"]
HOST_ONLY = {"_record_function_enter_new", "_record_function_exit", "lift_fresh"}


class LaunchCount(TorchDispatchMode):
    """Counts the ATen operations that would launch a kernel: no views, no profiler marks."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        view = any(r.alias_info is not None and not r.alias_info.is_write
                   for r in func._schema.returns)
        self.count += not view and func.overloadpacket.__name__ not in HOST_ONLY
        return func(*args, **(kwargs or {}))


def pyro_vae_step(elbo: str):
    """One deferred-read training step of ``train.elbo = elbo`` on a fixed minibatch."""
    cfg = load_config(None, [*TINY, f"train.elbo={elbo}"])
    state = TrainState.create(cfg, torch.device("cpu"))
    loss = make_loss(cfg, state.vae, defer_reads=True)
    x = state.dataset.x_train[:4].bernoulli()
    return lambda: train_step(state, loss, x, None, 1.0)


def floor_step(same_kernels: bool):
    """bench_train's floor step (its loss, backward, Adam; the loss summed on the device).
    ``floor``: the multi-tensor Adam torch picks on a GPU (on the CPU it would loop over the
    parameters); ``floor-same-kernels``: pyro_vae's fused Adam."""
    ds, vae = build(load_config(None, TINY), "cpu")
    x = ds.x_train[:4].bernoulli()
    opt = (make_optimizer(vae.parameters(), 1e-3) if same_kernels
           else torch.optim.Adam(vae.parameters(), lr=1e-3, foreach=True))  # torch's GPU default
    total = x.new_zeros(())

    def step():
        loss = floor_loss(vae, x, same_kernels)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        total.add_(loss.detach())
    return step


def measure(steps: dict, rounds: int, n: int) -> dict:
    """name -> (fastest round's microseconds per step, ATen ops per step)."""
    ops = {}
    for name, step in steps.items():
        for _ in range(20):  # warm-up: the first (validating) step, allocator, Adam's state
            step()
        with LaunchCount() as counter:
            step()
        ops[name] = counter.count
    best = {name: float("inf") for name in steps}
    names = list(steps)
    for r in range(rounds):
        for name in names[r % len(names):] + names[:r % len(names)]:
            t0 = time.perf_counter()
            for _ in range(n):
                steps[name]()
            best[name] = min(best[name], (time.perf_counter() - t0) / n * 1e6)
    return {name: (best[name], ops[name]) for name in steps}


@contextlib.contextmanager
def gpu_path():
    """Within: ``networks.softplus`` on the CPU runs torch's kernel, as it does on a GPU."""
    networks._Softplus.apply = F.softplus
    try:
        yield
    finally:
        del networks._Softplus.apply  # torch.autograd.Function's own again


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=200)
    p.add_argument("--gpu-path", action="store_true",
                   help="torch's softplus instead of the CPU-only vectorized node, as on a GPU")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    with gpu_path() if args.gpu_path else contextlib.nullcontext():
        steps = {"floor": floor_step(False), "floor-same-kernels": floor_step(True),
                 "trace": pyro_vae_step("trace"), "meanfield": pyro_vae_step("meanfield")}
        result = measure(steps, args.rounds, args.steps)
    floor_us, floor_ops = result["floor"]
    print("| variant | host us / step | ratio to floor | ATen ops / step (no views) |")
    print("| --- | --- | --- | --- |")
    for name, (us, ops) in result.items():
        print(f"| {name} | {us:.0f} | {us / floor_us:.2f}x | {ops} ({ops - floor_ops:+d}) |")


if __name__ == "__main__":
    main()
