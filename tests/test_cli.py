"""The ``annloader-gpu`` command line: info, bench (JSON, plot), errors, ``python -m``."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from annloader_gpu import cli

SMALL = ["--n-obs", "2000", "--n-vars", "500"]


@pytest.fixture(scope="module")
def cache_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("synthetic_cache")


@pytest.fixture(autouse=True)
def _tiny_cache(cache_dir, monkeypatch):
    # The synthetic module caches its datasets under $ANNLOADER_GPU_CACHE.
    monkeypatch.setenv("ANNLOADER_GPU_CACHE", str(cache_dir))


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    rc = cli.main(list(argv))
    captured = capsys.readouterr()
    return rc, captured.out, captured.err


def test_info_prints_compiled_state_and_storage_formats(capsys, tmp_path):
    out_json = tmp_path / "info.json"
    rc, out, _ = run_cli(capsys, "info", *SMALL, "--device", "cpu", "--json", str(out_json))
    assert rc == 0
    assert "CPU module:  compiled" in out
    assert "CUDA module:" in out
    assert "GPU usable:" in out
    for fmt in ("float32 + int32", "float32 + int64", "compact ("):
        assert fmt in out
    assert "residency 'auto' on cpu: host" in out
    info = json.loads(out_json.read_text())
    assert info["build_info"]["cpu_module"] is True
    formats = {f["format"].split(" (")[0]: f for f in info["storage_formats"]}
    assert formats["float32 + int32"]["bytes_per_nonzero"] == pytest.approx(8.0, abs=0.05)
    assert formats["float32 + int64"]["bytes_per_nonzero"] == pytest.approx(12.0, abs=0.05)
    assert formats["compact"]["bytes_per_nonzero"] < 4.1  # integer counts, 500 genes
    assert info["auto_residency"]["choice"] == "host"


def test_info_on_a_user_file(capsys, tmp_path):
    from annloader_gpu.synthetic import make_counts_adata

    path = tmp_path / "user.h5ad"
    make_counts_adata(300, 100, seed=3).write_h5ad(path)
    rc, out, _ = run_cli(capsys, "info", str(path), "--device", "cpu")
    assert rc == 0
    assert "300 cells x 100 genes" in out


def _check_result(r: dict) -> None:
    assert r["available"], r
    for key in ("cells_per_s", "batches_per_s", "output_gb_per_s", "roof_fraction", "resident_bytes",
                "bytes_per_nonzero"):
        assert r[key] is not None and r[key] > 0, (r["loader"], key, r[key])
    assert r["cells"] > 0 and r["batches"] > 0
    assert all(t > 0 for t in r["epoch_seconds"])


def test_bench_json_has_expected_fields(capsys, tmp_path):
    out_json = tmp_path / "bench.json"
    rc, out, err = run_cli(capsys, "bench", *SMALL, "--device", "cpu", "--epochs", "1", "--batch-size", "128",
                           "256", "--loaders", "ours", "inprocess", "--no-progress", "--json", str(out_json))
    assert rc == 0, err
    report = json.loads(out_json.read_text())
    for key in ("schema", "command", "date", "machine", "build_info", "data", "settings", "device", "roofs",
                "results", "ratios"):
        assert key in report
    assert report["device"] == "cpu"
    assert report["machine"]["cpu_model"]
    assert report["build_info"]["cpu_module"] is True
    assert report["data"]["n_obs"] == 2000 and report["data"]["n_vars"] == 500
    assert set(report["roofs"]) == {"128", "256"}
    assert all(roof["gb_per_s"] > 0 for roof in report["roofs"].values())
    by = {(r["loader"], r["batch_size"]): r for r in report["results"]}
    for bs in (128, 256):
        ours = by[("annloader_gpu", bs)]
        _check_result(ours)
        _check_result(by[("in-process scvi-style", bs)])
        # every cell of the epoch came out
        assert ours["cells"] == 2000
        assert ours["bytes_per_nonzero"] < 4.1
    ratios = {(r["batch_size"], r["theirs"]): r["ours_over_theirs"] for r in report["ratios"]}
    assert ratios[(128, "in-process scvi-style")] > 0
    # host memory is part of the report: the run's peak holds at least the data itself
    assert report["host_peak_bytes"] > report["data"]["n_obs"] * report["data"]["n_vars"] // 100
    assert isinstance(by[("annloader_gpu", 128)]["setup_host_bytes"], int)
    assert "Host memory:" in out
    # and the table was printed
    assert "cells/s" in out and "ours/theirs" in out and "annloader_gpu" in out


def test_bench_sparse_max_batches_and_plot(capsys, tmp_path):
    out_json, out_png = tmp_path / "b.json", tmp_path / "plot" / "b.png"
    rc, out, err = run_cli(capsys, "bench", *SMALL, "--device", "cpu", "--epochs", "1", "--batch-size", "64",
                           "512", "--sparse", "--max-batches", "3", "--loaders", "ours", "inprocess",
                           "--no-progress", "--json", str(out_json), "--plot", str(out_png))
    assert rc == 0, err
    assert out_png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = json.loads(out_json.read_text())
    assert report["settings"]["sparse"] is True
    for r in report["results"]:
        _check_result(r)
        assert r["output"] == "sparse"
        assert r["batches"] == 3
    assert "wrote" in out


def test_bench_progress_bar(capsys):
    rc, _out, err = run_cli(capsys, "bench", *SMALL, "--device", "cpu", "--epochs", "1", "--batch-size", "500",
                            "--loaders", "ours")
    assert rc == 0
    assert "batch 500" in err and "100%" in err


@pytest.mark.scvi
def test_bench_measures_scvi_and_annloader(capsys, tmp_path):
    pytest.importorskip("scvi")
    out_json = tmp_path / "b.json"
    rc, out, err = run_cli(capsys, "bench", *SMALL, "--device", "cpu", "--epochs", "1", "--batch-size", "256",
                           "--max-batches", "4", "--no-progress", "--json", str(out_json))
    assert rc == 0, err
    report = json.loads(out_json.read_text())
    by = {r["loader"]: r for r in report["results"]}
    _check_result(by["scvi-tools AnnDataLoader"])
    assert by["scvi-tools AnnDataLoader"]["cells"] == 4 * 256
    ann = by["anndata AnnLoader"]
    if ann["available"]:
        _check_result(ann)
    else:
        assert "not importable" in ann["reason"] and "not measured" in out
    assert all(r["ours_over_theirs"] > 0 for r in report["ratios"] if r["theirs"] != "anndata AnnLoader")


@pytest.mark.parametrize("bad", ["missing", "directory", "not_h5ad"])
def test_bad_data_path_is_a_clean_error(capsys, tmp_path, bad):
    if bad == "missing":
        path = tmp_path / "nope.h5ad"
    elif bad == "directory":
        path = tmp_path
    else:
        path = tmp_path / "garbage.h5ad"
        path.write_text("this is not an HDF5 file")
    rc, out, err = run_cli(capsys, "bench", "--data", str(path), "--device", "cpu", "--no-progress")
    assert rc == 2
    assert "annloader-gpu: error: --data" in err
    assert "Traceback" not in err + out


def test_bad_layer_is_a_clean_error(capsys):
    rc, _out, err = run_cli(capsys, "bench", *SMALL, "--layer", "counts", "--device", "cpu", "--no-progress")
    assert rc == 2
    assert "--layer 'counts'" in err


def test_bad_data_path_from_a_subprocess_has_no_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "annloader_gpu", "bench", "--data", str(tmp_path / "x.h5ad")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "no such file" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_python_m_help():
    env = {**os.environ}
    proc = subprocess.run([sys.executable, "-m", "annloader_gpu", "--help"], capture_output=True, text=True,
                          timeout=120, env=env)
    assert proc.returncode == 0, proc.stderr
    assert "bench" in proc.stdout and "info" in proc.stdout
    proc = subprocess.run([sys.executable, "-m", "annloader_gpu", "bench", "--help"], capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0
    for option in ("--data", "--layer", "--batch-size", "--device", "--residency", "--epochs", "--sparse",
                   "--json", "--plot", "--max-batches", "--n-obs", "--n-vars"):
        assert option in proc.stdout


def test_table_rendering():
    table = cli.render_table(["a", "bb"], [["x", "1"], ["yyy", "22"]])
    lines = table.splitlines()
    assert lines[0].startswith("a  ") and lines[2].startswith("x  ") and lines[3].startswith("yyy")
    assert cli.fmt_bytes(3 * (1 << 30)) == "3.00 GiB"
    assert cli.fmt_bytes(None) == "-"
