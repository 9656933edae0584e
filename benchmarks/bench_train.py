"""Training speed of pyro_vae against the plain-PyTorch floor, side by side in one process.

    python benchmarks/bench_train.py [--epochs 3] [--rounds 12] [--device cpu|cuda]
        [--batch-sizes 256 1024 4096] [--png throughput.png --peak-tflops 67]

(a) the floor: the same VAE module (same init, same data order) trained by a hand-written
    loss, BCE(x, dec(z)) + closed-form Gaussian KL, and torch Adam (default update);
    ``floor-same-kernels`` is that loop with pyro_vae's fused Adam update and its Bernoulli
    log-density, i.e. pyro_vae's arithmetic without Pyro: the gap to it is Pyro's own cost;
(b) pyro_vae's training loop for each ``train.elbo`` (iwae with one particle: the
    same bound through RenyiELBO), and with ``train.compile = true``
    (``+compile``) for the two estimators it supports;
(c) on CUDA only, one whole step (loss, backward, capturable Adam) captured as one CUDA graph
    and replayed: ``graph-floor``, the floor's loop so captured, and pyro_vae's
    ``train.cuda_graph = true`` (``trace+cuda_graph``, ``meanfield+cuda_graph``; with
    ``train.compile = true`` too, ``trace+compile+cuda_graph`` in the compiled phase, where
    ``graph-floor`` is measured again beside it); ``trace+cuda_graph-host`` is that mode
    with the step's device work taken out: the host's share of its epoch. Every row's
    ratio to ``graph-floor`` of the same round is printed too (the speed issue's "at most
    2x the CUDA-graph floor").
Both networks: 784-400-50 softplus (Pyro's example) and 784-200-200-50 tanh (Burda et al.).

Two phases, eager then compiled, each with its own floor measured in the same rounds: on
the project's machine plain eager PyTorch runs ~20% faster in a process once Inductor has
compiled anything (cause not pinned down), so compiled rows are held against a floor
measured in that same state, and eager rows against one measured before any compilation.
(The compiled phase starts by compiling a one-line function, so that its floor is timed in
that state from its first round on.) Rows print as each network and batch size is measured.
Rounds run in rotated order; the table gives the median seconds per epoch (the first epoch,
with any compilation, is left out), the ratio to the phase's floor in the same round (median
and min-max over rounds), the ratio of the fastest epoch of each variant over all rounds to
the floor's (interference from other tenants only ever slows an epoch down, so this is the
least noisy estimate of the intrinsic cost) and the test ELBO after the same epochs.
"""

import argparse
import math
import statistics
import time
import warnings
from typing import NamedTuple

import pyro
import torch
from torch.nn import functional as F

from pyro_vae.config import load_config
from pyro_vae.data import epoch_inputs
from pyro_vae.evaluate import elbo
from pyro_vae.graphs import StepGraphs
from pyro_vae.likelihoods import Bernoulli
from pyro_vae.objectives import OneParticleIWAEWarning
from pyro_vae.training import build, epoch_generator, make_optimizer, resolve_device, train

NETWORKS = {"784-400-50 softplus": ["model.hidden=[400]", "model.activation=softplus"],
            "784-200-200-50 tanh": ["model.hidden=[200,200]", "model.activation=tanh"]}
PHASES = {"eager": ["floor", "floor-same-kernels", "trace", "meanfield", "jit", "iwae"],
          "compiled": ["floor", "trace+compile", "meanfield+compile"]}
CUDA_ONLY = {"eager": ["graph-floor", "trace+cuda_graph", "trace+cuda_graph-host",
                       "meanfield+cuda_graph"],
             "compiled": ["graph-floor", "trace+compile+cuda_graph"]}


def plain_pytorch(cfg, same_kernels=False):
    """The floor: returns (seconds per epoch list, test ELBO). ``same_kernels``: the same
    loop with pyro_vae's optimizer (fused Adam where torch has it) and Bernoulli log-density."""
    device = resolve_device(cfg.train.device)
    pyro.set_rng_seed(cfg.train.seed)
    ds, vae = build(cfg, device)
    if same_kernels:
        opt = make_optimizer(vae.parameters(), cfg.train.lr)
    else:
        opt = torch.optim.Adam(vae.parameters(), lr=cfg.train.lr)
    n, bs = ds.x_train.shape[0], cfg.train.batch_size
    seconds = []
    for epoch in range(cfg.train.epochs):
        g = epoch_generator(cfg.train.seed, epoch, device)
        x_epoch = epoch_inputs(ds, g)
        perm = torch.randperm(n, generator=g, device=device)
        t0 = time.perf_counter()
        total = x_epoch.new_zeros(())
        for i in range(math.ceil(n / bs)):
            x = x_epoch[perm[i * bs:(i + 1) * bs]]
            loss = floor_loss(vae, x, same_kernels)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if device.type == "cuda":
                total += loss.detach()  # summed on the device, as pyro_vae's deferred reads do
            else:
                loss.item()  # the one read per step of pyro_vae's CPU default (sync_every 1)
        if device.type == "cuda":
            torch.cuda.synchronize()
        seconds.append(time.perf_counter() - t0)
    return seconds, elbo(vae, ds.x_test, seed=cfg.train.seed)


def floor_loss(vae, x, same_kernels=False):
    """The floor's loss: BCE(x, dec(z)) + closed-form KL, z = loc + scale * eps;
    ``same_kernels``: the reconstruction by pyro_vae's Bernoulli log-density."""
    loc, scale = vae.encode_gaussian(x)
    z = loc + scale * torch.randn_like(loc)
    logits = vae.decoder(z)
    if same_kernels:
        rec = -Bernoulli(logits=logits, validate_args=False).log_prob(x).sum()
    else:
        rec = F.binary_cross_entropy_with_logits(logits, x, reduction="sum")
    return rec + 0.5 * (loc**2 + scale**2 - 1 - 2 * scale.log()).sum()


def graph_step(cfg, loss_fn=floor_loss):
    """One training step, ``loss_fn(vae, x)``, its backward and a capturable Adam update,
    captured once as one CUDA graph and replayed per minibatch (the noise drawn inside the
    graph; Pyro's validation off, as a capture allows no host read). Full batches only (the
    last partial batch is left out and the epoch's seconds scaled up to all images).
    Returns (seconds per epoch list, test ELBO)."""
    device = resolve_device(cfg.train.device)
    pyro.set_rng_seed(cfg.train.seed)
    ds, vae = build(cfg, device)
    opt = torch.optim.Adam(vae.parameters(), lr=cfg.train.lr, capturable=True)
    n, bs = ds.x_train.shape[0], cfg.train.batch_size
    x_static = ds.x_train[:bs].bernoulli()  # (B, X): each step copies its minibatch in
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with pyro.validation_enabled(False):
        with torch.cuda.stream(side):  # warm-up outside the graph (allocates Adam's state)
            for _ in range(3):
                opt.zero_grad(set_to_none=False)
                loss_fn(vae, x_static).backward()
                opt.step()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):  # grads stay allocated: zeroed, then written in place
            for p in vae.parameters():
                p.grad.zero_()
            loss_fn(vae, x_static).backward()
            opt.step()
    seconds, full = [], n // bs
    for epoch in range(cfg.train.epochs):
        g = epoch_generator(cfg.train.seed, epoch, device)
        x_epoch = epoch_inputs(ds, g)
        perm = torch.randperm(n, generator=g, device=device)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        for i in range(full):
            torch.index_select(x_epoch, 0, perm[i * bs:(i + 1) * bs], out=x_static)
            graph.replay()
        torch.cuda.synchronize()
        seconds.append((time.perf_counter() - t0) * n / (full * bs))
    return seconds, elbo(vae, ds.x_test, seed=cfg.train.seed)


def pyro_vae(cfg):
    with warnings.catch_warnings():  # the iwae row's one particle is chosen: the same bound
        warnings.simplefilter("ignore", OneParticleIWAEWarning)
        result = train(cfg)
    return [m["seconds"] for m in result.metrics], result.metrics[-1]["test_elbo"]


def host_only(cfg):
    """pyro_vae's graph mode with the step's device work taken out (``StepGraphs._body``
    does nothing, so each capture records an empty graph): the host's share of an epoch,
    its Python, copies, noise and replay launches. If it is well under the full mode's time,
    the mode waits on the device, which several steps per replay would not shorten. The
    model is not trained: test ELBO nan."""
    body = StepGraphs._body
    StepGraphs._body = lambda self, b: None
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "The CUDA Graph is empty")  # as intended
            return pyro_vae(cfg)[0], math.nan
    finally:
        StepGraphs._body = body


def run_variant(variant, net_args, args, batch):
    """(seconds of each epoch after the first, test ELBO) of one variant."""
    elbo_name = "trace" if "floor" in variant else variant.split("+")[0]
    cfg = load_config(None, [*net_args, f"train.epochs={args.epochs}",
                             f"train.batch_size={batch}", f"train.device={args.device}",
                             f"train.elbo={elbo_name}",
                             f"train.compile={'true' if '+compile' in variant else 'false'}",
                             f"train.cuda_graph={'true' if '+cuda_graph' in variant else 'false'}"])
    if "+compile" in variant:
        torch._dynamo.reset()  # a fresh compile cache: no recompile limit across runs
    on_gpu = resolve_device(args.device).type == "cuda"
    if on_gpu:
        torch.cuda.reset_peak_memory_stats()
    if variant == "graph-floor":
        secs, test_elbo = graph_step(cfg)
    elif variant.endswith("-host"):
        secs, test_elbo = host_only(cfg)
    elif variant.startswith("floor"):
        secs, test_elbo = plain_pytorch(cfg, same_kernels=variant == "floor-same-kernels")
    else:
        secs, test_elbo = pyro_vae(cfg)
    PEAK_MIB[variant] = torch.cuda.max_memory_allocated() / 2**20 if on_gpu else math.nan
    return secs[1:] if len(secs) > 1 else secs, test_elbo


PEAK_MIB = {}  # variant -> peak GPU memory of its last run (MiB); nan off the GPU
N_TRAIN = 9000  # mnist-10k's training images


class Row(NamedTuple):
    batch: int
    phase: str
    network: str
    variant: str
    times: list  # median s / epoch of each round
    ratios: list  # each round's ratio to the floor of the same round
    fastest: float  # fastest epoch over all rounds, over the floor's
    test_elbo: float
    peak_mib: float
    to_graph: list  # each round's ratio to graph-floor of the same round (CUDA), else []


def warm_inductor(device) -> None:
    """Compile a one-line function once: the compiled phase's floor is then timed in the
    state its compiled rows run in (see the module docstring), from its first round on."""
    torch.compile(lambda t: t + 1)(torch.ones(1, device=resolve_device(device)))


def measure(phase, net, batch, args) -> list[Row]:
    """The variants of ``phase`` for one network and batch size, in rotated rounds; with
    ``--verbose`` each variant's seconds are printed as it finishes."""
    cuda = resolve_device(args.device).type == "cuda"
    variants = PHASES[phase] + (CUDA_ONLY[phase] if cuda else [])
    variants = [v for v in variants if v not in args.skip]
    times, ratios, to_graph = ({v: [] for v in variants} for _ in range(3))
    fastest = {v: math.inf for v in variants}
    elbos, peaks = {}, {}
    for r in range(args.rounds):
        order = variants[r % len(variants):] + variants[: r % len(variants)]
        per_round = {}
        for v in order:
            epochs, elbos[v] = run_variant(v, NETWORKS[net], args, batch)
            per_round[v], peaks[v] = statistics.median(epochs), PEAK_MIB[v]
            fastest[v] = min(fastest[v], *epochs)
            if args.verbose:
                print(f"batch {batch} {phase} {net} round {r + 1}: {v} {per_round[v]:.4f} s/epoch",
                      flush=True)
        for v in variants:
            times[v].append(per_round[v])
            ratios[v].append(per_round[v] / per_round["floor"])
            if "graph-floor" in per_round:
                to_graph[v].append(per_round[v] / per_round["graph-floor"])
    return [Row(batch, phase, net, v, times[v], ratios[v], fastest[v] / fastest["floor"],
                elbos[v], peaks[v], to_graph[v]) for v in variants]


def print_header(args) -> None:
    print(f"device: {args.device}, {args.epochs} epochs, {args.rounds} rounds, torch threads "
          f"{torch.get_num_threads()}\n")
    print("| batch | phase | network | variant | s / epoch (median) | ratio to the phase's floor "
          "(median, min-max) | ratio of fastest epochs | images / s | peak GPU MiB | test ELBO "
          "| ratio to graph-floor (median) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |")


def print_rows(rows: list[Row]) -> None:
    """Table rows, printed as each (phase, network, batch) is measured: a run cut short
    keeps what it measured."""
    for w in rows:
        t, r = statistics.median(w.times), w.ratios
        graph = f"{statistics.median(w.to_graph):.2f}x" if w.to_graph else "n/a: no graph-floor"
        print(f"| {w.batch} | {w.phase} | {w.network} | {w.variant} | {t:.4f} | "
              f"{statistics.median(r):.2f}x ({min(r):.2f}-{max(r):.2f}) | {w.fastest:.2f}x | "
              f"{N_TRAIN / t:,.0f} | {known(w.peak_mib, '.0f', 'n/a: not on a GPU')} | "
              f"{known(w.test_elbo, '.2f', 'n/a: not trained')} | {graph} |", flush=True)


def known(value: float, spec: str, why: str) -> str:
    """``value`` formatted with ``spec``, or ``why`` where it was not measured (nan)."""
    return why if math.isnan(value) else format(value, spec)


def flops_per_image(net_args) -> float:
    """Forward and backward FLOPs of one image: 6 x the weights of the VAE's linear layers
    (a multiply-add each forward, two in backward); 784-400-50: 4.1 MFLOP, 37 GFLOP an epoch."""
    _, vae = build(load_config(None, net_args))
    return 6.0 * sum(m.weight.numel() for m in vae.modules() if isinstance(m, torch.nn.Linear))


def plot_throughput(rows: list[Row], path: str, peak_tflops: float | None) -> None:
    """Images per second against batch size, one line per (network, variant), and each
    network's arithmetic limit (``peak_tflops`` / FLOPs per image) where given."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.5))
    trained = [w for w in rows if not w.variant.endswith("-host")]  # a host-only row trains nothing
    for key in sorted({(w.network, w.phase, w.variant) for w in trained}):
        pts = sorted((w.batch, N_TRAIN / statistics.median(w.times)) for w in trained
                     if (w.network, w.phase, w.variant) == key)
        ax.plot(*zip(*pts), marker="o", label=f"{key[0]}: {key[2]}")
    for net in sorted({w.network for w in rows}) if peak_tflops else []:
        limit = peak_tflops * 1e12 / flops_per_image(NETWORKS[net])
        ax.axhline(limit, ls="--", color="grey")
        ax.annotate(f"{net}: FP32 limit at {peak_tflops:g} TFLOP/s", (min(w.batch for w in rows), limit),
                    va="bottom", fontsize=7)
    ax.set(xscale="log", yscale="log", xlabel="batch size", ylabel="training images / s")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    print(f"wrote {path}")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--epochs", type=int, default=3)
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--device", default="cpu")
    p.add_argument("--batch-sizes", type=int, nargs="+", default=[256])
    p.add_argument("--phases", nargs="+", default=list(PHASES), choices=list(PHASES))
    p.add_argument("--networks", nargs="+", default=list(NETWORKS), choices=list(NETWORKS))
    p.add_argument("--verbose", action="store_true", help="print every round's seconds")
    p.add_argument("--skip", nargs="*", default=[], help="variants to leave out, e.g. jit")
    p.add_argument("--png", help="write images/s against batch size to this PNG")
    p.add_argument("--peak-tflops", type=float, help="the device's FP32 peak, for the PNG's limit")
    args = p.parse_args()
    print_header(args)
    rows = []
    for phase in args.phases:  # every eager measurement before the first compilation
        if phase == "compiled":
            warm_inductor(args.device)
        for batch in args.batch_sizes:
            for net in args.networks:
                measured = measure(phase, net, batch, args)
                print_rows(measured)
                rows += measured
    if args.png:
        plot_throughput(rows, args.png, args.peak_tflops)


if __name__ == "__main__":
    main()
