"""The host's share of a training step: what an eager GPU step waits on, measured on any CPU.

    python benchmarks/bench_host.py [--rounds 7] [--steps 200]

On a GPU an eager step of the default network is bound by its host, not by its arithmetic:
the captured floor's whole step runs in ~0.4 ms on an H200 while the eager floor takes
~3.5 ms (benchmarks/README.md), the time Python and the dispatcher take to issue its 80 to
180 operations, forward and backward, and Adam. This measures that cost where no GPU is
needed: each variant's step on a network so small that its arithmetic is negligible
(784-8-2, batch 4, one CPU thread), so a step's time is its host work, side by side in
rotated rounds (the fastest round of each, microseconds). ``ops`` counts the ATen
operations one step issues, views left out: on a GPU roughly one kernel launch each (a
multi-tensor or fused operation may launch several). Variants: the plain-PyTorch ``floor``
and ``floor-same-kernels`` (bench_train.py), and pyro_vae's ``trace`` and ``meanfield``
with the host reads deferred as on CUDA (``train.sync_every = 50``). Each is measured on
two paths: the CPU's, and the GPU's, where ``networks.softplus`` is torch's kernel instead
of the CPU-only vectorized node (``networks._Softplus``, 13 operations); the ratio to the
floor is the GPU path's.
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
    """Records the ATen operations that would launch a kernel: no views, no profiler marks."""

    def __init__(self):
        super().__init__()
        self.names = []

    @property
    def count(self) -> int:
        return len(self.names)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        view = any(r.alias_info is not None and not r.alias_info.is_write
                   for r in func._schema.returns)
        if not view and func.overloadpacket.__name__ not in HOST_ONLY:
            self.names.append(func.overloadpacket.__name__)
        return func(*args, **(kwargs or {}))


def pyro_vae_step(elbo: str):
    """One deferred-read training step of ``train.elbo = elbo`` on a fixed minibatch."""
    cfg = load_config(None, [*TINY, f"train.elbo={elbo}"])
    state = TrainState.create(cfg, torch.device("cpu"))
    loss = make_loss(cfg, state.vae)
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


@contextlib.contextmanager
def gpu_path():
    """Within: ``networks.softplus`` on the CPU runs torch's kernel, as it does on a GPU."""
    networks._Softplus.apply = F.softplus
    try:
        yield
    finally:
        del networks._Softplus.apply  # torch.autograd.Function's own again


def on_path(path: str):
    """The context a step of ``path`` ("cpu" or "gpu") runs in."""
    return gpu_path() if path == "gpu" else contextlib.nullcontext()


def measure(steps: dict, rounds: int, n: int) -> dict:
    """(name, path) -> (fastest round's microseconds per step, ATen ops per step), every
    step run on its path (:func:`on_path`) and all of them side by side in rotated rounds,
    so that a noisy machine slows each alike."""
    ops = {}
    for (name, path), step in steps.items():
        with on_path(path):
            for _ in range(20):  # warm-up: the first (validating) step, allocator, Adam's state
                step()
            with LaunchCount() as counter:
                step()
        ops[name, path] = counter.count
    best = dict.fromkeys(steps, float("inf"))
    keys = list(steps)
    for r in range(rounds):
        for key in keys[r % len(keys):] + keys[:r % len(keys)]:
            with on_path(key[1]):
                t0 = time.perf_counter()
                for _ in range(n):
                    steps[key]()
                best[key] = min(best[key], (time.perf_counter() - t0) / n * 1e6)
    return {key: (best[key], ops[key]) for key in steps}


def variants() -> dict:
    """name -> step."""
    return {"floor": floor_step(False), "floor-same-kernels": floor_step(True),
            "trace": pyro_vae_step("trace"), "meanfield": pyro_vae_step("meanfield")}


def main(argv=None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--steps", type=int, default=200)
    args = p.parse_args(argv)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        steps = {(name, path): step for path in ("cpu", "gpu")
                 for name, step in variants().items()}
        result = measure(steps, args.rounds, args.steps)
    finally:
        torch.set_num_threads(threads)
    floor_us, floor_ops = result["floor", "gpu"]
    print("| variant | host us / step (CPU path) | ATen ops (CPU path) | host us / step "
          "(GPU path) | ratio to floor | ATen ops (GPU path) |")
    print("| --- | --- | --- | --- | --- | --- |")
    for name in dict.fromkeys(name for name, _ in steps):  # in order, each once
        (cpu_us, cpu_ops), (us, ops) = result[name, "cpu"], result[name, "gpu"]
        print(f"| {name} | {cpu_us:.0f} | {cpu_ops} | {us:.0f} | {us / floor_us:.2f}x | "
              f"{ops} ({ops - floor_ops:+d}) |")


if __name__ == "__main__":
    main()
