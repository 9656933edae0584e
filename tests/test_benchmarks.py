"""The benchmarks run (they are not tests of speed: a broken benchmark is what fails here)."""

import math
import os
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from conftest import benchmark

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.slow
def test_bench_train_runs_every_eager_variant_and_writes_its_png(tmp_path):
    png = tmp_path / "throughput.png"
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_train.py"), "--epochs", "1",
         "--rounds", "1", "--networks", "784-400-50 softplus", "--phases", "eager",
         "--batch-sizes", "1024", "--png", str(png), "--peak-tflops", "1"],
        capture_output=True, text=True, timeout=600, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-2000:]
    rows = [line for line in out.stdout.splitlines() if line.startswith("| 1024 |")]
    assert {r.split(" | ")[3] for r in rows} == {"floor", "floor-same-kernels", "trace",
                                                 "meanfield", "jit", "iwae"}
    assert png.stat().st_size > 10_000
    assert all(r.split(" | ")[8] == "n/a: not on a GPU" for r in rows)  # never "nan"
    assert all(float(r.split(" | ")[9]) < 0 for r in rows)
    assert all(r.split(" | ")[10] == "n/a: no graph-floor |" for r in rows)  # CUDA only


def test_bench_train_holds_each_row_against_both_floors_of_its_round(monkeypatch):
    bench = benchmark("bench_train")
    seconds = {"floor": 1.0, "graph-floor": 0.1, "trace+compile": 0.8,
               "meanfield+compile": 0.7, "trace+compile+cuda_graph": 0.15}

    def fake_run(variant, net_args, args, batch):
        bench.PEAK_MIB[variant] = 1.0
        return [seconds[variant]], -100.0

    monkeypatch.setattr(bench, "resolve_device", lambda device: torch.device("cuda"))
    monkeypatch.setattr(bench, "run_variant", fake_run)
    args = SimpleNamespace(rounds=2, skip=[], verbose=False, device="cuda")
    rows = {w.variant: w for w in bench.measure("compiled", "784-400-50 softplus", 256, args)}
    assert set(rows) == set(seconds)  # graph-floor is measured beside the compiled graph mode
    assert rows["trace+compile+cuda_graph"].to_graph == pytest.approx([1.5, 1.5])
    assert rows["trace+compile"].ratios == pytest.approx([0.8, 0.8])


def test_one_epoch_of_the_default_network_is_37_gflop():
    bench = benchmark("bench_train")
    flops = bench.flops_per_image(bench.NETWORKS["784-400-50 softplus"])
    assert flops * bench.N_TRAIN == pytest.approx(37.1e9, rel=0.01)


@pytest.mark.filterwarnings("ignore::pyro_vae.graphs.UncapturedGraphWarning")
def test_the_host_only_row_runs_every_graph_step_without_its_device_work(monkeypatch):
    from pyro_vae.graphs import StepGraphs

    bench, body, step, stubbed = benchmark("bench_train"), StepGraphs._body, StepGraphs.step, []
    monkeypatch.setattr(StepGraphs, "step", lambda self, *args: stubbed.append(
        StepGraphs._body is not body) or step(self, *args))
    args = SimpleNamespace(epochs=2, device="cpu")
    secs, test_elbo = bench.run_variant("trace+cuda_graph-host", ["data.subset=600"], args, 256)
    assert stubbed == [True] * 5  # 2 epochs of 3 steps, the first eager
    assert StepGraphs._body is body  # put back
    assert len(secs) == 1 and secs[0] > 0 and math.isnan(test_elbo)
    assert "trace+cuda_graph-host" in bench.CUDA_ONLY["eager"]
    assert math.isnan(bench.PEAK_MIB["trace+cuda_graph-host"])  # a CPU run has no GPU peak
    assert bench.known(test_elbo, ".2f", "n/a: not trained") == "n/a: not trained"
    assert bench.known(-85.126, ".2f", "n/a: not trained") == "-85.13"


@pytest.mark.slow
def test_bench_command_splits_each_variants_wall_time(tmp_path):
    out = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_command.py"), "--set", "train.epochs=3",
         "--set", "data.subset=600", "--variant", "cpu: train.device=cpu",
         "--variant", "one-core@1: train.device=cpu", "--variant", "broken: train.lr=-1"],
        capture_output=True, text=True, timeout=300, cwd=tmp_path)
    # a variant that fails is named and left out; the others are measured all the same
    assert out.returncode == 1 and "variant broken failed" in out.stderr, out.stderr[-2000:]
    assert "train.lr" in out.stderr and "| broken |" not in out.stdout
    rows = {cells[0]: cells[1:] for cells in (
        [c.strip() for c in line.strip("|").split("|")] for line in out.stdout.splitlines()
        if line.startswith(("| cpu |", "| one-core |")))}
    assert set(rows) == {"cpu", "one-core"} and rows["cpu"][1] == "1.00x"
    for wall, _, to_first, epoch_wall, training, after, fixed, test_elbo in rows.values():
        # the run's own training seconds lie inside the gaps between its epoch lines, and
        # start-up (imports, data, model) makes the first line come later than one epoch
        assert 0 < float(training) <= float(epoch_wall) < float(to_first) < float(wall)
        assert 0 < float(after) and 0 < float(fixed) <= float(wall) and float(test_elbo) < 0


def test_bench_command_names_a_missing_reference_instead_of_dividing_by_it():
    bench = benchmark("bench_command")
    t = bench.Timing(10.0, 3.0, 0.2, 0.15, 1.0, 40, -107.5)
    assert "| 2.00x |" in bench.row("gpu", t, [t._replace(wall=20.0)])
    assert "| n/a: the first variant failed |" in bench.row("gpu", t, [])
    assert "nan" not in bench.table({"cpu": [], "gpu": [t]})


def test_bench_command_pins_a_variant_to_its_cores():
    bench = benchmark("bench_command")
    count = ["-c", "import os; print(len(os.sched_getaffinity(0)))"]
    run = lambda cores: subprocess.run(bench.launch(count, cores), capture_output=True,  # noqa: E731
                                       text=True, check=True).stdout.strip()
    assert run(1) == "1" and run(None) == str(len(os.sched_getaffinity(0)))
    with pytest.raises(ValueError, match="may use"):
        bench.launch(count, len(os.sched_getaffinity(0)) + 1)


def test_bench_command_reads_variants_and_refuses_malformed_ones(capsys):
    bench = benchmark("bench_command")
    assert bench.parse_variant("cpu@2: train.device=cpu train.epochs=5") == bench.Variant(
        "cpu", 2, ["train.device=cpu", "train.epochs=5"])
    assert bench.parse_variant("cuda+graph: train.cuda_graph=true").cores is None
    for bad in ["cpu train.device=cpu", "cpu@0: train.device=cpu", "cpu: train.device",
                "two words: train.device=cpu"]:
        with pytest.raises(SystemExit) as exited:
            bench.main(["--variant", bad])
        assert exited.value.code == 2 and repr(bad) in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--variant", "a: train.epochs=1", "--variant", "a: train.epochs=2"])
    assert "NAME 'a' is given twice" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--variant", "a: train.epochs=1", "--rounds", "0"])
    assert "--rounds 0: must be >= 1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        bench.main(["--variant", f"big@{len(os.sched_getaffinity(0)) + 1}: train.epochs=1"])
    assert "--variant 'big': @" in capsys.readouterr().err


def test_bench_host_counts_launches_but_not_views_and_times_each_step():
    bench = benchmark("bench_host")
    x = torch.randn(3, 4)
    with bench.LaunchCount() as views:
        x.t(), x.view(12), x[1:], x.detach(), x.unsqueeze(0)
    with bench.LaunchCount() as launches:
        x + 1, x.add_(1), x.sum(), torch.mm(x, x.t())
    assert views.count == 0 and launches.count == 4
    steps = {("floor", "gpu"): bench.floor_step(False),
             ("trace", "gpu"): bench.pyro_vae_step("trace")}
    result = bench.measure(steps, rounds=1, n=2)
    (floor_us, floor_ops), (trace_us, trace_ops) = result.values()
    # Pyro's trace computes a Monte Carlo KL and its own sums: more operations than the floor
    assert 0 < floor_ops < trace_ops and floor_us > 0 and trace_us > 0


def test_bench_host_measures_both_paths_and_leaves_softplus_and_threads_as_they_were(capsys):
    from pyro_vae import networks

    bench, threads = benchmark("bench_host"), torch.get_num_threads()
    torch.set_num_threads(3)  # not 1, which main sets: a missing restore must show
    try:
        bench.main(["--rounds", "1", "--steps", "2"])
        assert torch.get_num_threads() == 3  # main measures on one thread, then restores
    finally:
        torch.set_num_threads(threads)
    rows = [line.split("|") for line in capsys.readouterr().out.splitlines()[2:]]
    cpu_ops = {r[1].strip(): int(r[3]) for r in rows}
    gpu_ops = {r[1].strip(): int(r[6].split()[0]) for r in rows}
    assert set(gpu_ops) == {"floor", "floor-same-kernels", "trace", "meanfield"}
    # softplus calls a step: the encoder's and decoder's hidden layers, the encoder's scale
    # and (not in the floor, which uses torch's BCE) the Bernoulli log-density; each is
    # one operation forward and one backward on the GPU path instead of 13
    calls = {"floor": 3, "floor-same-kernels": 4, "trace": 4, "meanfield": 4}
    assert {name: cpu_ops[name] - gpu_ops[name] for name in calls} == {
        name: 11 * n for name, n in calls.items()}
    assert "apply" not in vars(networks._Softplus)  # the CPU node is back


def _wheel(folder: Path, name: str, version: str, requires=(), tag="py3-none-any") -> Path:
    """A wheel holding only its METADATA, with ``requires`` as Requires-Dist lines."""
    import zipfile

    path = folder / f"{name}-{version}-{tag}.whl"
    meta = "".join([f"Metadata-Version: 2.1\nName: {name}\nVersion: {version}\n"]
                   + [f"Requires-Dist: {r}\n" for r in requires])
    with zipfile.ZipFile(path, "w") as z:
        z.writestr(f"{name}-{version}.dist-info/METADATA", meta)
    return path


def test_gpu_wheels_follows_requirements_for_the_target_only(tmp_path):
    from packaging.requirements import Requirement

    gw, index, dest = benchmark("gpu_wheels"), tmp_path / "index", tmp_path / "dest"
    index.mkdir(), dest.mkdir()
    _wheel(index, "app", "1.0", ["lib[fast]>=2", "numpy>=1", 'old; python_version < "3.12"',
                                 'win; sys_platform == "win32"', 'docs; extra == "docs"'])
    _wheel(index, "lib", "2.5", ['speedup; extra == "fast"', 'slow; extra == "slow"'])
    _wheel(index, "speedup", "0.1", ["app"])  # a cycle back: fetched once
    _wheel(index, "old", "1.0"), _wheel(index, "slow", "1.0")
    fetched = []

    def download(req):  # the index's wheel for req into dest, as pip download does
        fetched.append(req.name)
        wheel = next(index.glob(f"{req.name}-*.whl"))
        (dest / wheel.name).write_bytes(wheel.read_bytes())

    kit, edges = gw.resolve([Requirement("app")], {"numpy"}, dest, gw.target("3.12"), download)
    # numpy is on the machine; old (< 3.12), win (Windows) and the unasked extras are not needed
    assert list(kit) == ["app", "lib", "speedup"] and fetched == ["app", "lib", "speedup"]
    assert gw.version_conflicts(kit, edges) == []
    kit, edges = gw.resolve([Requirement("app")], {"numpy"}, dest, gw.target("3.11"), download)
    assert list(kit) == ["app", "lib", "old", "speedup"]  # for Python 3.11 (in dest: reused)
    assert fetched == ["app", "lib", "speedup", "old"]
    # a new extra of a name already followed brings its requirements
    kit, _ = gw.resolve([Requirement("app"), Requirement("lib[slow]")], {"numpy"}, dest,
                        gw.target("3.12"), download)
    assert "slow" in kit and fetched[4:] == ["slow"]
    edges.append(("pyro_vae", Requirement("lib>=3")))
    assert gw.version_conflicts(kit, edges) == [
        "pyro_vae needs lib>=3, the kit has lib-2.5-py3-none-any.whl (put a matching wheel "
        "there instead: pip download --no-deps 'lib>=3')"]


def test_gpu_wheels_refuses_a_kit_pip_cannot_install_and_bad_arguments(tmp_path):
    gw = benchmark("gpu_wheels")
    tags = {v: gw.target(v)[1] for v in ("3.11", "3.12")}
    _wheel(tmp_path, "fast", "1.0", tag="cp312-cp312-manylinux_2_17_x86_64")
    assert list(gw.kit_wheels(tmp_path, tags["3.12"])) == ["fast"]
    with pytest.raises(SystemExit, match="fast-1.0-cp312.*cannot install: one DEST per Python"):
        gw.kit_wheels(tmp_path, tags["3.11"])  # a kit built for 3.12, reused for 3.11
    _wheel(tmp_path, "lib", "1.0"), _wheel(tmp_path, "Lib", "1.1")
    with pytest.raises(SystemExit, match="holds two versions of lib: Lib-1.1.*lib-1.0"):
        gw.kit_wheels(tmp_path, tags["3.12"])
    env = gw.target("3.12.3")[0]
    assert env["python_version"] == "3.12" and env["python_full_version"] == "3.12.3"
    with pytest.raises(SystemExit, match="--python-version '3.x': allowed: X.Y or X.Y.Z"):
        gw.target("3.x")
    with pytest.raises(SystemExit, match="--have .*nope.txt: no such file"):
        gw.read_have(tmp_path / "nope.txt")
    (tmp_path / "pyproject.toml").write_text(
        '[project]\ndependencies = ["a", \'b; python_version < "3.12"\']\n'
        '[project.optional-dependencies]\ndev = ["c"]\n')
    assert [r.name for r in gw.roots(tmp_path / "pyproject.toml", env)] == ["a", "c"]
    roots = {r.name for r in gw.roots(ROOT / "pyproject.toml", env)}
    assert {"pyro-ppl", "arviz", "pytest", "pytest-xdist"} <= roots
    assert "torch" in gw.read_have(ROOT / "benchmarks" / "gpu_image_packages.txt")


def test_bench_ais_se_reads_an_se_half_the_spread_as_ratio_2_and_counts_coverage():
    bench = benchmark("bench_ais_se")
    torch.manual_seed(0)
    exact = torch.zeros(50)
    est = exact + 0.1 * torch.randn(4000, 50)  # spread 0.1 over repeats, no bias
    chains, ratio, covered, bias = bench.row(16, est, torch.full_like(est, 0.05), exact).split("|")
    assert int(chains) == 16 and float(ratio) == pytest.approx(2.0, abs=0.03)
    assert float(covered) == pytest.approx(0.68, abs=0.01)  # +- 2 SE = +- 1 spread
    assert float(bias) == pytest.approx(0.0, abs=0.005)
    honest = bench.row(16, est - 0.05, torch.full_like(est, 0.1), exact).split("|")
    assert float(honest[1]) == pytest.approx(1.0, abs=0.02) and float(honest[3]) == pytest.approx(-0.05, abs=0.005)


def test_bench_ais_times_the_pilot_against_the_same_run_given_its_step_sizes(tmp_path,
                                                                            monkeypatch):
    import pyro_vae.ais as ais_module
    from pyro_vae import train

    from conftest import small_config

    bench, calls, real = benchmark("bench_ais"), [], ais_module.ais
    train(small_config(), tmp_path / "run")

    def recording(vae, x, **kwargs):
        out = real(vae, x, **kwargs)
        calls.append((kwargs["steps"], kwargs.get("step_sizes"), out.step_sizes))
        return out

    monkeypatch.setattr(ais_module, "ais", recording)
    line = bench.pilot_overhead(str(tmp_path / "run"), steps=6, chains=2, device="cpu",
                                batch_size=3)
    assert [(steps, given is None) for steps, given, _ in calls] == [
        (10, True), (6, True), (6, False), (6, True), (6, False)]  # warm-up, 2 rounds
    for (_, _, pilots), (_, given, _) in (calls[1:3], calls[3:5]):
        assert given is pilots  # the given run reuses the pilot's step sizes
    assert "6 steps x 2 chains on 3 points (cpu): with 4 pilot chains" in line
    with_pilot, given = (float(v) for v in re.findall(r"([\d.]+) s\b", line))
    adds = float(re.search(r"the pilot adds (-?[\d.]+)x$", line).group(1))
    r = 0.0005  # the seconds are printed to 3 decimals, the ratio to 2
    low, high = (with_pilot - r) / (given + r) - 1, (with_pilot + r) / (given - r) - 1
    assert low - 0.005 <= adds <= high + 0.005
