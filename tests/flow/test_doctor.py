import re

from click.testing import CliRunner

from flowdb.cli import cli
from flowdb.flow.doctor import BackendRate, BlasLibrary, _package


def test_doctor_names_the_blas_numpy_loaded_and_the_default_backend():
    result = CliRunner().invoke(cli, ["doctor", "--no-measure"])
    assert result.exit_code == 0, result.output
    # numpy's PyPI wheels carry their own OpenBLAS; the line must say which kernels it chose.
    assert re.search(r"^loaded by numpy: openblas [\d.]+, \w+ kernels, \d+ threads$", result.output, re.M)
    assert "--device auto searches with numpy-cpu" in result.output
    assert "GFLOP/s" not in result.output  # --no-measure times nothing


def test_doctor_measures_every_installed_cpu_backend_against_the_gemm_rate():
    result = CliRunner().invoke(cli, ["doctor"])
    assert result.exit_code == 0, result.output
    gemm = float(re.search(r"fp32 GEMM, numpy .*: ([\d,]+) GFLOP/s", result.output)[1].replace(",", ""))
    lines = re.findall(r"^matching (\S+)( \(the CPU default\))?: .*: ([\d,]+) GFLOP/s = (\d+)% of the GEMM rate",
                       result.output, re.M)
    assert [backend for backend, *_ in lines] == ["numpy-cpu", "faiss-cpu", "torch-cpu"]
    assert lines[0][1] and not lines[1][1]
    for _, _, gflops, share in lines:
        assert abs(float(gflops.replace(",", "")) / gemm * 100 - int(share)) <= 2  # rounding of both figures


def test_a_backend_under_half_the_gemm_rate_is_called_slow():
    assert BackendRate("faiss-cpu", 37.0, 0.18).slow and not BackendRate("numpy-cpu", 200.0, 0.95).slow


def test_libraries_are_named_by_the_wheel_that_carries_them():
    assert _package("/x/lib/python3.11/site-packages/numpy.libs/libscipy_openblas64_-1.so") == "numpy"
    assert _package("/x/site-packages/faiss_cpu.libs/libopenblas-r0.3.15.so") == "faiss_cpu"
    assert _package("/x/site-packages/torch/lib/libgomp.so.1") == "torch"
    assert BlasLibrary("faiss_cpu", "openblas", "0.3.15", "Prescott", 2).describe() == \
        "openblas 0.3.15, Prescott kernels, 2 threads"
    assert BlasLibrary("torch", "openmp", None, None, 2).describe() == "openmp, 2 threads"
