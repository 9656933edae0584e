"""The benchmarks run (they are not tests of speed: a broken benchmark is what fails here)."""

import subprocess
import sys
from pathlib import Path

import pytest

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


def test_one_epoch_of_the_default_network_is_37_gflop():
    sys.path.insert(0, str(ROOT / "benchmarks"))
    try:
        import bench_train
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))
    flops = bench_train.flops_per_image(bench_train.NETWORKS["784-400-50 softplus"])
    assert flops * bench_train.N_TRAIN == pytest.approx(37.1e9, rel=0.01)
