import re

import pytest
from click.testing import CliRunner

from flowdb.cli import cli
from flowdb.flow import calibration, doctor, matching
from flowdb.flow.doctor import BackendRate, BlasLibrary, _package
from flowdb.flow.matching import Matcher, choose_backend


def cpu_with(monkeypatch, flags):
    """doctor and auto as on a CPU (no GPU) with these flags."""
    monkeypatch.setattr(matching, "_faiss_gpus", lambda: 0)
    monkeypatch.setattr(matching, "_torch_cuda", lambda: False)
    monkeypatch.setattr(matching, "cpu_flags", lambda: frozenset(flags))
    monkeypatch.setattr(doctor, "cpu_flags", lambda: frozenset(flags))


@pytest.fixture
def home(tmp_path, monkeypatch):
    monkeypatch.setenv("FLOWDB_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(calibration, "_memo", {})
    return tmp_path / "home"


def test_doctor_names_the_blas_numpy_loaded_and_the_default_backend(monkeypatch):
    cpu_with(monkeypatch, {"avx2", "fma"})
    result = CliRunner().invoke(cli, ["doctor", "--no-measure"])
    assert result.exit_code == 0, result.output
    # numpy's PyPI wheels carry their own OpenBLAS; the line must say which kernels it chose.
    assert re.search(r"^loaded by numpy: openblas [\d.]+, \w+ kernels, \d+ threads$", result.output, re.M)
    assert "no bf16 instructions" in result.output
    assert re.search(r"^--device auto searches with numpy-cpu: no bf16 instructions on this CPU .* "
                     r"measures nothing$", result.output, re.M)
    assert "GFLOP/s" not in result.output  # --no-measure times nothing


def test_doctor_on_a_bf16_cpu_says_what_auto_measured_and_chose(home, monkeypatch):
    pytest.importorskip("torch")
    cpu_with(monkeypatch, {"avx2", "avx512_bf16"})
    calibrate = calibration.calibrate
    monkeypatch.setattr(calibration, "calibrate", lambda *a: pytest.fail("--no-measure times nothing"))
    runner = CliRunner()
    before = runner.invoke(cli, ["doctor", "--no-measure"])
    assert before.exit_code == 0, before.output
    assert "--device auto: not measured on this machine yet; its first search times numpy-cpu, torch-bf16" \
        in before.output
    assert not (home / "cache" / "backend.json").exists()
    monkeypatch.setattr(calibration, "calibrate", calibrate)
    for name, value in (("QUERIES", 128), ("BASE", 512), ("D_MODEL", 48)):
        monkeypatch.setattr(calibration, name, value)
    chosen = choose_backend("auto")  # measures, and caches
    after = runner.invoke(cli, ["doctor", "--no-measure"])
    assert after.exit_code == 0, after.output
    line = re.search(r"^--device auto searches with (\S+), measured [\d: -]+: numpy-cpu (\d+)%, torch-bf16 "
                     r"(\d+)% of numpy's fp32 GEMM \(128 x 512, d 48\); cached in (.+)$", after.output, re.M)
    assert line and line[1] == chosen and line[4] == str(home / "cache" / "backend.json")


def test_doctor_measures_every_installed_cpu_backend_against_the_gemm_rate():
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 0, result.output
    gemm = float(re.search(r"fp32 GEMM, numpy .*: ([\d,]+) GFLOP/s", result.output)[1].replace(",", ""))
    lines = re.findall(r"^matching (\S+)(?: \((.*)\))?: top-5 of [\d,]+ x 4,096, d 2304: ([\d,]+) GFLOP/s = "
                       r"(\d+)% of the GEMM rate", result.output, re.M)
    assert [backend for backend, *_ in lines] == ["numpy-cpu", "faiss-cpu", "torch-cpu", "torch-bf16"]
    assert "the CPU default" in lines[0][1] and not lines[1][1] and not lines[2][1]
    assert [backend for backend, roles, *_ in lines if "auto's choice" in roles] == [choose_backend("auto")]
    for _, _, gflops, share in lines:
        rate = float(gflops.replace(",", ""))
        ratio = rate / gemm * 100
        # Each printed figure is rounded to a whole number: the ratio of two carries both errors.
        assert abs(ratio - int(share)) <= ratio * (0.5 / max(rate, 0.5) + 0.5 / gemm) + 0.5


def test_a_backend_under_half_the_gemm_rate_is_called_slow():
    assert BackendRate("faiss-cpu", 37.0, 0.18).slow and not BackendRate("numpy-cpu", 200.0, 0.95).slow
    emulated = BackendRate("torch-bf16", 4.0, 0.1).describe("numpy-cpu", "numpy-cpu", queries=256)
    assert emulated == ("matching torch-bf16: top-5 of 256 x 4,096, d 2304: 4 GFLOP/s = 10% of the GEMM rate; "
                        "slow: under 50%, this CPU has no bf16 instructions: torch emulates them")
    assert BackendRate("torch-bf16", 800.0, 3.2).describe("numpy-cpu", "torch-bf16").startswith(
        "matching torch-bf16 (auto's choice): top-5 of 4,096 x 4,096")


def test_every_backend_doctor_measures_is_a_matcher():
    assert all(Matcher(backend) for backend in doctor.cpu_backends())


def test_libraries_are_named_by_the_wheel_that_carries_them():
    assert _package("/x/lib/python3.11/site-packages/numpy.libs/libscipy_openblas64_-1.so") == "numpy"
    assert _package("/x/site-packages/faiss_cpu.libs/libopenblas-r0.3.15.so") == "faiss_cpu"
    assert _package("/x/site-packages/torch/lib/libgomp.so.1") == "torch"
    assert BlasLibrary("faiss_cpu", "openblas", "0.3.15", "Prescott", 2).describe() == \
        "openblas 0.3.15, Prescott kernels, 2 threads"
    assert BlasLibrary("torch", "openmp", None, None, 2).describe() == "openmp, 2 threads"
