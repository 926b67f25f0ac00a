"""--device auto: measured once, cached under a machine key, never a bf16 pick without
bf16 hardware. Nothing here asserts a time: searches are counted, keys are changed."""

import json

import numpy as np
import pytest

from flowdb.flow import calibration, matching
from flowdb.flow.matching import Matcher, auto_candidates, choose_backend


@pytest.fixture
def home(tmp_path, monkeypatch):
    """A fresh FLOWDB_HOME, an empty per-process memo, and a small calibration problem."""
    monkeypatch.setenv("FLOWDB_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(calibration, "_memo", {})
    monkeypatch.setattr(calibration, "QUERIES", 192)
    monkeypatch.setattr(calibration, "BASE", 256)
    monkeypatch.setattr(calibration, "D_MODEL", 40)
    return tmp_path / "home"


class Counting:
    """search(backend) for calibration.auto: the real exact matcher, counting calls;
    a backend in `wrong` answers with the wrong rows."""

    def __init__(self, wrong=()):
        self.calls, self.wrong = [], set(wrong)

    def __call__(self, backend):
        def run(queries, base, k):
            self.calls.append(backend)
            scores, indices = Matcher("numpy-cpu").search(queries, base, k)
            return (scores, (indices + 1) % base.shape[0]) if backend in self.wrong else (scores, indices)
        return run


def test_the_cache_is_written_once_and_then_reused(home):
    search = Counting()
    first = calibration.auto(["numpy-cpu", "torch-bf16"], search)
    path = home / "cache" / "backend.json"
    assert path.is_file() and set(search.calls) == {"numpy-cpu", "torch-bf16"}
    stored = json.loads(path.read_text())
    assert stored["chosen"] == first.chosen and stored["key"]["candidates"] == ["numpy-cpu", "torch-bf16"]
    assert set(stored["rates"]) == {"numpy-cpu", "torch-bf16"} and stored["gemm"] > 0
    written = path.stat().st_mtime_ns
    calibration._memo.clear()  # as a new process would: read back from the file, nothing measured
    search.calls.clear()
    again = calibration.auto(["numpy-cpu", "torch-bf16"], search)
    assert search.calls == [] and again == first and path.stat().st_mtime_ns == written


@pytest.mark.parametrize("change", ["torch", "numpy", "flags", "cpu", "candidates"])
def test_a_cache_whose_key_differs_is_measured_again(home, monkeypatch, change):
    search = Counting()
    calibration.auto(["numpy-cpu", "torch-bf16"], search)
    calibration._memo.clear()
    search.calls.clear()
    candidates = ["numpy-cpu", "torch-bf16"]
    if change in ("torch", "numpy"):
        versions = calibration.library_versions()
        monkeypatch.setattr(calibration, "library_versions", lambda: {**versions, change: f"{change} 99.0"})
    elif change == "flags":
        monkeypatch.setattr(calibration, "cpu_flags", lambda: frozenset({"avx2", "avx512_bf16"}))
    elif change == "cpu":
        monkeypatch.setattr(calibration, "cpu_model", lambda: "Another CPU")
    else:
        candidates = ["numpy-cpu", "torch-bf16", "faiss-cpu"]
    found = calibration.auto(candidates, search)
    assert set(search.calls) == set(candidates)
    stored = json.loads((home / "cache" / "backend.json").read_text())
    assert stored["key"] == found.key == calibration.machine_key(candidates)
    assert calibration.cached(found.key) == found


def test_a_corrupt_cache_is_measured_again(home):
    (home / "cache").mkdir(parents=True)
    (home / "cache" / "backend.json").write_text("{not json")
    search = Counting()
    calibration.auto(["numpy-cpu", "torch-bf16"], search)
    assert set(search.calls) == {"numpy-cpu", "torch-bf16"}


def test_a_candidate_that_is_not_exact_is_never_chosen(home):
    found = calibration.auto(["numpy-cpu", "torch-bf16"], Counting(wrong={"torch-bf16"}))
    assert found.chosen == "numpy-cpu" and found.rates["torch-bf16"] is None
    assert "torch-bf16 not exact" in found.describe()


def test_a_candidate_that_fails_is_never_chosen(home):
    def search(backend):
        if backend == "torch-bf16":
            def broken(*args):
                raise RuntimeError("no kernel for this device")
            return broken
        return Matcher(backend).search

    found = calibration.auto(["numpy-cpu", "torch-bf16"], search)
    assert found.chosen == "numpy-cpu" and found.rates["torch-bf16"] is None


def test_the_fastest_wins_only_by_the_margin():
    assert calibration.choose({"numpy-cpu": 100.0, "torch-bf16": 300.0}) == "torch-bf16"
    assert calibration.choose({"numpy-cpu": 100.0, "torch-bf16": 105.0}) == "numpy-cpu"
    assert calibration.choose({"numpy-cpu": 100.0, "torch-bf16": None}) == "numpy-cpu"


def test_the_calibration_problem_ties_at_the_kth_place():
    queries, base = calibration.planted_problem(64, 512, 300)
    scores = np.sort(queries.astype(np.float64) @ base.astype(np.float64).T, axis=1)[:, ::-1]
    tied = np.abs(scores[:16, calibration.K - 1] - scores[:16, calibration.K]) < 1e-6
    assert tied.mean() > 0.8


def without_gpu(monkeypatch, flags):
    monkeypatch.setattr(matching, "_faiss_gpus", lambda: 0)
    monkeypatch.setattr(matching, "_torch_cuda", lambda: False)
    monkeypatch.setattr(matching, "cpu_flags", lambda: frozenset(flags))


@pytest.mark.parametrize("flags", [{"avx2", "fma"}, {"avx2", "avx512f", "avx512bw"}, set()])
def test_auto_on_a_cpu_without_bf16_keeps_fp32_and_measures_nothing(home, monkeypatch, flags):
    without_gpu(monkeypatch, flags)

    def refuse(*args):
        raise AssertionError("nothing may be measured on a CPU without bf16")

    monkeypatch.setattr(calibration, "calibrate", refuse)
    assert auto_candidates() == ["numpy-cpu"]
    assert choose_backend("auto") == Matcher.for_device("auto").backend == "numpy-cpu"
    assert matching.auto_calibration() is None and not (home / "cache" / "backend.json").exists()


def test_auto_without_torch_keeps_fp32(home, monkeypatch):
    without_gpu(monkeypatch, {"avx512_bf16"})
    real = matching.importlib.util.find_spec
    monkeypatch.setattr(matching.importlib.util, "find_spec", lambda name: None if name == "torch" else real(name))
    assert auto_candidates() == ["numpy-cpu"] and choose_backend("auto") == "numpy-cpu"


def test_auto_on_a_bf16_cpu_measures_both_and_is_exact_whatever_it_picks(home, monkeypatch):
    pytest.importorskip("torch")
    without_gpu(monkeypatch, {"avx2", "avx512_bf16"})
    assert auto_candidates() == ["numpy-cpu", "torch-bf16"]
    chosen = choose_backend("auto")
    stored = json.loads((home / "cache" / "backend.json").read_text())
    assert chosen == stored["chosen"] and set(stored["rates"]) == {"numpy-cpu", "torch-bf16"}
    assert all(rate is not None for rate in stored["rates"].values())  # both were exact
    queries, base = calibration.planted_problem(300, 700, 77)
    reference = calibration.brute_force(queries, base, 5)
    assert calibration.agrees(Matcher.for_device("auto").search(queries, base, 5), reference)


def test_cpu_and_cuda_devices_are_not_measured(home, monkeypatch):
    without_gpu(monkeypatch, {"avx512_bf16"})
    monkeypatch.setattr(calibration, "calibrate", lambda *a: pytest.fail("--device cpu measures nothing"))
    assert choose_backend("cpu") == "numpy-cpu"
    with pytest.raises(matching.FlowdbError, match="no CUDA GPU"):
        choose_backend("cuda")


def test_auto_keeps_fp32_for_small_work_and_measures_for_large(home, monkeypatch):
    """Below SMALL_WORK_GFLOP a bf16 CPU still searches in numpy-cpu, measuring nothing
    (torch's import would cost more than bf16 saves); from it on, or for work of unknown
    size, auto measures."""
    pytest.importorskip("torch")
    without_gpu(monkeypatch, {"avx2", "avx512_bf16"})
    measured = []
    real = calibration.calibrate
    monkeypatch.setattr(calibration, "calibrate", lambda *a: measured.append(1) or real(*a))
    small = matching.SMALL_WORK_GFLOP
    assert choose_backend("auto", small * 0.99) == "numpy-cpu" and not measured
    assert not (home / "cache" / "backend.json").exists()
    choose_backend("auto", small)
    choose_backend("auto", None)
    assert measured == [1]  # measured once, then cached


def test_a_plans_matching_work_counts_every_search(planted_pack):
    """4 layers of 512 features, d 256: layer 0 has no R_-1, so 2 + 3 x 3 = 11 searches of
    2 x 512 x 512 x 256 FLOP."""
    from flowdb.packs.manifest import load_manifest
    from flowdb.packs.plan import make_plan

    plan = make_plan(load_manifest(planted_pack[0] / "manifest.toml"))
    search = 2 * 512 * 512 * 256 / 1e9
    assert plan.matching_gflop() == pytest.approx(11 * search)
    assert plan.matching_gflop([0]) == pytest.approx(2 * search)
    assert plan.matching_gflop([2, 3]) == pytest.approx(6 * search)
