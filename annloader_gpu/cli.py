"""``annloader-gpu`` command line: ``bench`` (throughput against scvi-tools and the hardware roof)
and ``info`` (build, GPU, resident sizes). Measurement code lives in :mod:`annloader_gpu.bench`;
this module parses arguments and prints."""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys
from collections.abc import Sequence
from pathlib import Path

PROG = "annloader-gpu"


# ---------------------------------------------------------------------------------------------
# Formatting helpers


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit, scale in (("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if abs(n) >= scale:
            return f"{n / scale:.2f} {unit}"
    return f"{int(n)} B"


def fmt_num(x: float | None, spec: str = ",.0f") -> str:
    return "-" if x is None else format(x, spec)


def render_table(headers: Sequence[str], rows: Sequence[Sequence[str]], align: str | None = None) -> str:
    """A plain-text table; ``align`` has one 'l' or 'r' per column (default: first left)."""
    align = align or "l" + "r" * (len(headers) - 1)
    widths = [max(len(str(h)), *(len(str(r[i])) for r in rows)) if rows else len(str(h))
              for i, h in enumerate(headers)]

    def line(cells):
        return "  ".join(str(c).ljust(w) if a == "l" else str(c).rjust(w) for c, w, a in zip(cells, widths, align))

    return "\n".join([line(headers), "  ".join("-" * w for w in widths), *(line(r) for r in rows)])


def _out(msg: str = "") -> None:
    print(msg, flush=True)


def _err(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------------------------------------
# Argument parsing


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    from . import bench

    parser = argparse.ArgumentParser(
        prog=PROG,
        description="GPU-resident AnnData loader: benchmark against scvi-tools and the hardware roof, "
                    "and show what was compiled.",
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--layer", default=None, help="use adata.layers[LAYER] instead of X")
    data.add_argument("--n-obs", type=_positive_int, default=200_000,
                      help="cells of the synthetic default dataset (default: %(default)s)")
    data.add_argument("--n-vars", type=_positive_int, default=20_000,
                      help="genes of the synthetic default dataset (default: %(default)s)")
    data.add_argument("--seed", type=int, default=0, help="synthetic data and shuffling seed (default: 0)")
    data.add_argument("--cache-dir", default=None,
                      help="where the synthetic dataset is cached (default: $ANNLOADER_GPU_CACHE, "
                           "else ~/.cache/annloader_gpu)")
    data.add_argument("--device", default="auto",
                      help="cpu, cuda, cuda:N or auto (a usable GPU if there is one; default: auto)")

    b = sub.add_parser(
        "bench", parents=[data],
        help="throughput of our loader against scvi-tools, anndata's AnnLoader and an in-process baseline",
        description="Iterates each loader over the data for a few epochs (after one warm-up pass) and "
                    "prints cells/s, batches/s, output GB/s, the fraction of the hardware roof measured "
                    "in the same run, resident bytes and bytes per non-zero, and ours/theirs ratios. "
                    "Without --data it uses the synthetic default dataset (generated once, cached).",
    )
    b.add_argument("--data", metavar="PATH.h5ad", default=None, help="benchmark on this .h5ad file")
    b.add_argument("--batch-size", type=_positive_int, nargs="+", default=[128, 1024], metavar="N",
                   help="one or more batch sizes (default: 128 1024)")
    b.add_argument("--epochs", type=_positive_int, default=2, help="timed epochs per loader (default: 2)")
    b.add_argument("--max-batches", type=_positive_int, default=None, metavar="N",
                   help="cap each epoch at N batches (keeps slow baselines bounded)")
    b.add_argument("--residency", default="auto", choices=["auto", "device", "pinned", "host"],
                   help="our loader's residency (default: auto)")
    b.add_argument("--sparse", action="store_true",
                   help="sparse X output (load_sparse_tensor=True for ours and scvi-tools')")
    b.add_argument("--batch-key", default=None, help="obs column registered as batch (default: 'batch' if present)")
    b.add_argument("--labels-key", default=None,
                   help="obs column registered as labels (default: 'labels' if present)")
    b.add_argument("--loaders", nargs="+", choices=list(bench.LOADER_CHOICES), default=list(bench.LOADER_CHOICES),
                   help="which loaders to measure (default: all)")
    b.add_argument("--threads", type=_positive_int, default=None,
                   help="threads for our CPU gathers (default: the library's default)")
    b.add_argument("--json", metavar="OUT.json", default=None, help="write machine-readable results here")
    b.add_argument("--plot", metavar="OUT.png", default=None, help="plot throughput against batch size here")
    b.add_argument("--no-progress", action="store_true", help="no progress bars")
    b.set_defaults(func=cmd_bench)

    i = sub.add_parser(
        "info", parents=[data],
        help="what was compiled, which GPU is visible, resident sizes of a dataset",
        description="Shows the build (CPU/CUDA modules), the visible GPUs and their free memory, and for "
                    "PATH.h5ad (default: the synthetic default dataset) the resident size of X in each "
                    "storage format and the residency 'auto' would choose on --device.",
    )
    i.add_argument("data", nargs="?", metavar="PATH.h5ad", default=None,
                   help="an .h5ad file (default: the synthetic default dataset)")
    i.add_argument("--no-data", action="store_true", help="only the build and GPU, no dataset")
    i.add_argument("--json", metavar="OUT.json", default=None, help="also write the information as JSON")
    i.set_defaults(func=cmd_info)
    return parser


# ---------------------------------------------------------------------------------------------
# info


def _print_build(info: dict) -> None:
    _out("Build")
    if "error" in info:
        _out(f"  compiled core could not be loaded: {info['error']}")
        return
    _out(f"  annloader_gpu {info.get('version')}  (python {info.get('python')}, torch {info.get('torch')}, "
         f"numpy {info.get('numpy')})")
    _out(f"  CPU module:  compiled ({info.get('cpu_compiler')}), {info.get('cpu_threads')} threads")
    if info.get("cuda_compiled"):
        _out(f"  CUDA module: compiled (runtime {info.get('cuda_runtime')}, architectures "
             f"{', '.join(info.get('cuda_architectures') or []) or '?'}; driver {info.get('cuda_driver')})")
    else:
        _out("  CUDA module: not compiled")
    _out(f"  GPU usable:  {'yes' if info.get('gpu_usable') else 'no'}"
         + (f" ({info.get('gpu_unusable_reason')})" if info.get("gpu_unusable_reason") else ""))


def _print_gpus(gpus: list[dict]) -> None:
    _out("GPUs visible to torch")
    if not gpus:
        import torch

        why = "torch has no CUDA support" if torch.version.cuda is None else "no CUDA device"
        _out(f"  none ({why}; torch {torch.__version__})")
    for g in gpus:
        _out(f"  cuda:{g['index']}  {g['name']}  free {fmt_bytes(g['free_bytes'])} of {fmt_bytes(g['total_bytes'])}")


def cmd_info(args) -> int:
    from . import bench

    report: dict = {"build_info": bench.safe_build_info(), "machine": bench.machine_info()}
    _print_build(report["build_info"])
    _print_gpus(report["machine"]["gpus"])
    device = bench.resolve_device(args.device)
    report["device"] = str(device)
    if not args.no_data:
        adata, source = bench.load_data(args.data, n_obs=args.n_obs, n_vars=args.n_vars, seed=args.seed,
                                        cache_dir=args.cache_dir)
        X = bench.x_matrix(adata, args.layer)
        label = args.data if args.data else f"synthetic default dataset ({args.n_obs} x {args.n_vars})"
        nnz = bench.matrix_nnz(X)
        _out(f"Data: {label}")
        _out(f"  {adata.n_obs:,} cells x {adata.n_vars:,} genes, X{'' if args.layer is None else f' (layer {args.layer})'}"
             f" {bench.matrix_format(X)} {X.dtype}, {fmt_num(nnz)} non-zeros"
             + (f" ({nnz / adata.n_obs:,.0f} per cell)" if nnz else ""))
        formats = bench.storage_formats(X)
        rows = []
        for f in formats:
            if "error" in f:
                rows.append([f["format"], "-", "-", f["error"]])
            else:
                rows.append([f["format"], fmt_bytes(f["bytes"]), fmt_num(f.get("bytes_per_nonzero"), ".2f"),
                             f"{f['bytes']:,} B"])
        _out("  Resident size of X by storage format")
        _out("    " + render_table(["format", "resident", "B/nnz", "exact"], rows).replace("\n", "\n    "))
        compact = [f for f in formats if f["format"].startswith("compact") and "bytes" in f]
        resident = compact[0]["bytes"] if compact else (formats[0].get("bytes") if formats else None)
        auto = bench.auto_residency(resident, str(device))
        report.update(data={"source": source, "path": args.data, "n_obs": int(adata.n_obs), "n_vars": int(adata.n_vars),
                            "nnz": nnz, "layer": args.layer, "format": bench.matrix_format(X), "dtype": str(X.dtype)},
                      storage_formats=formats, auto_residency=auto)
        choice = auto["choice"] or "unknown"
        _out(f"  residency 'auto' on {device}: {choice}  [{auto['how']}]")
    if args.json:
        _write_json(args.json, report)
    return 0


# ---------------------------------------------------------------------------------------------
# bench


def _print_bench(report: dict) -> None:
    from . import bench

    m, d = report["machine"], report["data"]
    gpu = ", ".join(g["name"] for g in m["gpus"]) or "no GPU"
    _out(f"Machine: {m['cpu_model']}, {m['usable_cores']} cores, {fmt_bytes(m['memory_bytes'])} RAM; {gpu}")
    _out(f"Data:    {d['n_obs']:,} x {d['n_vars']:,} {d['x_format']} {d['x_dtype']}, {fmt_num(d['nnz'])} non-zeros"
         f" ({d['source']}{': ' + d['path'] if d['path'] else ''})")
    s = report["settings"]
    _out(f"Device:  {report['device']}  residency={s['residency']}  output={'sparse' if s['sparse'] else 'dense'} "
         f"float32  epochs={s['epochs']} (+1 warm-up)  max_batches={s['max_batches']}")
    la = report.get("load_average") or {}
    if la.get("before") is not None:
        # Only the load before the run is other processes': the benchmark itself raises "after".
        busy = la["before"][0] > 0.5 * m["usable_cores"]
        _out(f"Load:    1-min load average {la['before'][0]:.2f} before, {(la.get('after') or ['?'])[0]} after"
             + ("  (other processes were competing for the cores: numbers are noisy)" if busy else ""))
    for bs, roof in report["roofs"].items():
        _out(f"Roof @ batch {bs}: {roof['kind']} {roof['gb_per_s']:.1f} GB/s ({roof['method']}, "
             f"buffer {fmt_bytes(roof['buffer_bytes'])})")
    _out()
    rows = []
    ratio = {(r["batch_size"], r["theirs"]): r["ours_over_theirs"] for r in report["ratios"]}
    for r in report["results"]:
        if not r["available"]:
            rows.append([r["loader"], r["batch_size"], "not measured", "", "", "", "", "", ""])
            continue
        rat = ratio.get((r["batch_size"], r["loader"]))
        rows.append([
            r["loader"], r["batch_size"], fmt_num(r["cells_per_s"]), fmt_num(r["batches_per_s"], ",.1f"),
            fmt_num(r["output_gb_per_s"], ".2f"), fmt_num(100 * r["roof_fraction"], ".1f") + "%",
            fmt_bytes(r["resident_bytes"]), fmt_num(r["bytes_per_nonzero"], ".2f"),
            "(ours)" if r["loader"] == bench.OURS else (f"{rat:.2f}x" if rat else "-"),
        ])
    _out(render_table(["loader", "batch", "cells/s", "batches/s", "out GB/s", "of roof", "resident", "B/nnz",
                       "ours/theirs"], rows))
    ours_setup = [r["setup_host_bytes"] for r in report["results"]
                  if r["loader"] == bench.OURS and r.get("setup_host_bytes") is not None]
    if ours_setup or report.get("host_peak_bytes"):
        _out(f"Host memory: our set-up grew the process by {fmt_bytes(max(ours_setup)) if ours_setup else '?'} "
             f"(first build of the prepared copy); peak resident set of the whole run "
             f"{fmt_bytes(report.get('host_peak_bytes'))} (data, every loader and baseline)")
    notes = []
    for r in report["results"]:
        if not r["available"]:
            notes.append(f"{r['loader']} (batch {r['batch_size']}): not measured: {r['reason']}")
        for n in r["notes"]:
            notes.append(f"{r['loader']} (batch {r['batch_size']}): {n}")
    if notes:
        _out()
        for n in dict.fromkeys(notes):
            _out(f"note: {n}")


def plot_results(report: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    from . import bench

    results = [r for r in report["results"] if r["available"]]
    fig, ax = plt.subplots(figsize=(10.5, 5.5), dpi=110)
    styles = {bench.OURS: ("C0", "o", 2.6), bench.SCVI: ("C3", "s", 1.8), bench.ANNLOADER: ("C2", "^", 1.8),
              bench.INPROCESS: ("C1", "D", 1.8)}
    for name in dict.fromkeys(r["loader"] for r in results):
        pts = sorted((r["batch_size"], r["cells_per_s"]) for r in results if r["loader"] == name)
        color, marker, lw = styles.get(name, ("C7", "x", 1.5))
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker=marker, color=color, lw=lw, ms=7, label=name)
        for x, y in pts:
            # scvi-tools' label goes below its point: it often coincides with the in-process baseline
            dy = -12 if name == bench.SCVI else 4
            ax.annotate(f"{y / 1e3:,.0f}k", (x, y), textcoords="offset points", xytext=(6, dy), fontsize=8, color=color)
    n_vars = report["data"]["n_vars"]
    if not report["settings"]["sparse"] and report["roofs"]:
        pts = sorted((int(bs), roof["gb_per_s"] * 1e9 / (4 * n_vars)) for bs, roof in report["roofs"].items())
        label = ("memory write roof" if report["device"] == "cpu" else "device copy roof") + " (dense float32 cells/s)"
        ax.plot([p[0] for p in pts], [p[1] for p in pts], ls="--", color="0.45", lw=1.2, label=label)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    bss = sorted({r["batch_size"] for r in results})
    if bss:
        ax.set_xticks(bss)
        ax.set_xticklabels([str(b) for b in bss])
        ax.set_xlim(bss[0] / 1.6, bss[-1] * 1.6)
    ax.set_xlabel("batch size (cells)")
    ax.set_ylabel("cells per second")
    ax.grid(True, which="both", alpha=0.3)
    m, d = report["machine"], report["data"]
    hw = ", ".join(g["name"] for g in m["gpus"]) if report["device"].startswith("cuda") else \
        f"{m['cpu_model']}, {m['usable_cores']} cores"
    out = "sparse" if report["settings"]["sparse"] else "dense"
    ax.set_title(f"Loader throughput on {report['device']} ({hw})\n"
                 f"{d['n_obs']:,} x {d['n_vars']:,}, {fmt_num(d['nnz'])} nnz, {out} float32 output", fontsize=10)
    ax.legend(fontsize=8.5, loc="upper left", bbox_to_anchor=(1.02, 1.0), borderaxespad=0.0)
    fig.tight_layout()
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)


def _write_json(path: str, obj: dict) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(obj, f, indent=2, default=str)
        f.write("\n")


def cmd_bench(args) -> int:
    from . import bench

    if args.plot is not None:
        try:
            import matplotlib  # noqa: F401
        except ImportError:
            raise bench.BenchError("--plot needs matplotlib (pip install 'annloader_gpu[plot]')") from None
    device = bench.resolve_device(args.device)
    if args.threads is not None:
        from .kernels import set_num_threads

        set_num_threads(args.threads)
    progress = not args.no_progress
    _err("loading data ..." if args.data else f"loading the synthetic default dataset {args.n_obs} x {args.n_vars} "
         "(generated and cached on first use) ...")
    with bench.quiet_third_party_warnings():
        adata, source = bench.load_data(args.data, n_obs=args.n_obs, n_vars=args.n_vars, seed=args.seed,
                                        cache_dir=args.cache_dir)
    bench.x_matrix(adata, args.layer)  # validates --layer
    batch_key, labels_key = bench.default_obs_keys(adata, args.batch_key, args.labels_key)
    loaders = [bench.LOADER_CHOICES[k] for k in args.loaders]
    cfg = bench.BenchConfig(batch_sizes=args.batch_size, epochs=args.epochs, device=str(device),
                            residency=args.residency, sparse=args.sparse, max_batches=args.max_batches,
                            layer=args.layer, batch_key=batch_key, labels_key=labels_key, loaders=loaders,
                            seed=args.seed, progress=progress)
    data = bench.describe_data(adata, source, args.data, args.layer, batch_key, labels_key)
    with bench.quiet_third_party_warnings():
        measured = bench.run_benchmark(adata, cfg, log=_err if progress else None)
    from dataclasses import asdict

    from .kernels import get_num_threads

    report = {
        "schema": bench.JSON_SCHEMA_VERSION,
        "command": " ".join([PROG, *map(shlex.quote, sys.argv[1:])]),
        "date": bench.timestamp(),
        "machine": bench.machine_info(),
        "build_info": bench.safe_build_info(),
        "our_cpu_threads": get_num_threads(),
        "data": asdict(data),
        "settings": {"batch_sizes": list(cfg.batch_sizes), "epochs": cfg.epochs, "device": str(device),
                     "residency": cfg.residency, "sparse": cfg.sparse, "max_batches": cfg.max_batches,
                     "loaders": list(cfg.loaders), "seed": cfg.seed, "warmup_passes": 1},
        **measured,
    }
    _out()
    _print_bench(report)
    if args.json:
        _write_json(args.json, report)
        _out(f"\nwrote {args.json}")
    if args.plot:
        plot_results(report, args.plot)
        _out(f"wrote {args.plot}")
    return 0


# ---------------------------------------------------------------------------------------------


def main(argv: Sequence[str] | None = None) -> int:
    from .bench import BenchError

    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        return int(args.func(args) or 0)
    except BenchError as exc:
        _err(f"{PROG}: error: {exc}")
        return 2
    except KeyboardInterrupt:
        _err(f"{PROG}: interrupted")
        return 130
    except BrokenPipeError:  # e.g. piped into head
        try:
            sys.stdout.close()
        except Exception:  # noqa: BLE001
            pass
        os._exit(0)


if __name__ == "__main__":
    sys.exit(main())
