"""The BLAS facts of ``engine info``: the kernels numpy's BLAS runs, and a hint when an
environment variable holds OpenBLAS below the CPU's AVX-512."""
import json

import numpy as np

from engine.cli.main import main
from engine.cli.system_report import blas_kernel_hint

AVX512 = frozenset({"avx2", "fma", "avx512f", "avx512bw", "avx512dq", "avx512vl"})


def test_a_core_type_forcing_avx2_kernels_on_an_avx512_cpu_gets_a_hint_naming_the_variables():
    hint = blas_kernel_hint(["Haswell"], "Haswell", AVX512)
    assert "OPENBLAS_CORETYPE=Haswell" in hint and "Haswell kernels" in hint
    assert "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE" in hint


def test_no_hint_without_the_variable_without_avx512_or_with_avx512_kernels():
    assert blas_kernel_hint(["Haswell"], None, AVX512) is None  # OpenBLAS's own choice
    assert blas_kernel_hint(["Haswell"], "Haswell", frozenset({"avx2", "fma"})) is None
    assert blas_kernel_hint(["SkylakeX"], "SkylakeX", AVX512) is None
    assert blas_kernel_hint([None], "Haswell", AVX512) is None  # a BLAS that names no kernels


def test_info_names_the_blas_kernels_numpy_runs(capsys):
    from threadpoolctl import threadpool_info
    expected = [pool["architecture"] for pool in threadpool_info() if pool["user_api"] == "blas"]
    assert main(["info", "--json", "--no-tensorflow"]) == 0
    info = json.loads(capsys.readouterr().out)
    assert [pool["architecture"] for pool in info["blas"]] == expected and expected
    assert main(["info", "--no-tensorflow"]) == 0
    text = capsys.readouterr().out
    assert f"{expected[0]} kernels" in text


def test_train_warns_once_when_the_core_type_holds_blas_below_avx512(monkeypatch, tmp_path, capsys):
    import engine.cli.system_report as report
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")
    monkeypatch.setattr(report, "_cpu_flags", lambda: AVX512)
    monkeypatch.setattr(report, "_blas_pools", lambda: [{"architecture": "Haswell"}])
    rng = np.random.default_rng(0)
    folder = tmp_path / "data"
    folder.mkdir()
    np.save(folder / "features.npy", rng.standard_normal((40, 4)).astype(np.float32))
    np.save(folder / "labels.npy", np.arange(40) % 2)
    argv = ["train", "--data", str(folder), "--model", "softmax_regression", "--epochs", "1",
            "--workers", "1", "--no-progress", "--output-dir", str(tmp_path / "run")]
    assert main(argv) == 0
    lines = [line for line in capsys.readouterr().err.splitlines() if "OPENBLAS_CORETYPE" in line]
    assert len(lines) == 1 and lines[0].startswith("engine train: warning: OPENBLAS_CORETYPE=")
    monkeypatch.setattr(report, "_blas_pools", lambda: [{"architecture": "SkylakeX"}])
    assert main(argv + ["--overwrite"]) == 0
    assert "OPENBLAS_CORETYPE" not in capsys.readouterr().err
