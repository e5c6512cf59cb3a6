#!/usr/bin/env python3
"""Plots launch/scaling.sh's CSV: time per step and scaling efficiency against the number of ranks.

    python3 bench/plot_scaling.py CSV [CSV...] [--out DIR] [--no-plots] [--threshold R]

For each experiment (weak | strong) and network (local | netns) in the CSV, one PNG,
<csv stem>-<experiment>-<network>.png, with a row per layer shape (C x H x W, dtype, layout,
threads per rank, batch) and two panels: time per step (fwd_us + bwd_us, milliseconds) against P
on a log2 axis for sync, allgather and local, and the efficiency against P
(weak: t(1) / t(P); strong: t(1) / (P * t(P)); t of the same mode and shape; without a P = 1 row
the smallest P measured stands in for 1). A last PNG, <csv stem>-crossover.png, draws the step-time
ratio allgather / sync against P, one line per experiment, network and shape: above 1, the
allgather exchange (PyTorch / Apex) is slower than syncbn's one allreduce.

To stdout (Markdown, ready for README): the crossover table (for each experiment, network and
shape, the smallest P from which allgather stays slower than sync, by more than --threshold,
at every larger P measured),
then the per-P table it is taken from (times, the ratio, and each mode's exchange cost over local).

The PNGs go next to the first CSV, or to --out DIR. Needs matplotlib (Debian python3-matplotlib;
Agg backend, no display) unless --no-plots. A CSV without the experiment / network columns (a
bare syncbn_bench --csv) is read as weak scaling on the local network.
"""

import argparse
import csv
import math
import os
import sys
from collections import defaultdict

MODES = ("sync", "allgather", "local")
STYLE = {  # colour, line style, marker
    "sync": ("tab:blue", "-", "o"),
    "allgather": ("tab:red", "--", "s"),
    "local": ("tab:gray", ":", "^"),
}
REQUIRED = ("mode", "ranks", "fwd_us", "bwd_us", "n", "c", "h", "w")


def fnum(x):
    try:
        v = float(x)
    except (TypeError, ValueError):
        return math.nan
    return v


def read_rows(paths):
    rows = []
    for path in paths:
        with open(path, newline="") as f:
            lines = [ln for ln in f if ln.strip() and not ln.lstrip().startswith("#")]
        reader = csv.DictReader(lines)
        missing = [c for c in REQUIRED if c not in (reader.fieldnames or [])]
        if missing:
            sys.exit(f"plot_scaling: {path}: no column {', '.join(missing)} "
                     f"(columns: {', '.join(reader.fieldnames or [])})")
        for r in reader:
            r = {k.strip(): (v.strip() if isinstance(v, str) else v) for k, v in r.items() if k}
            try:
                p = int(r["ranks"])
                n = int(r["n"])
            except ValueError:
                print(f"plot_scaling: {path}: skipping a row with ranks={r['ranks']!r} "
                      f"n={r['n']!r}", file=sys.stderr)
                continue
            step = fnum(r["fwd_us"]) + fnum(r["bwd_us"])
            if not math.isfinite(step) or step <= 0:
                print(f"plot_scaling: {path}: skipping a row without times "
                      f"({r.get('shape', '?')} {r['mode']} P={p})", file=sys.stderr)
                continue
            exp = r.get("experiment") or "weak"
            rows.append({
                "experiment": exp,
                "network": r.get("network") or "local",
                "mode": r["mode"],
                "P": p,
                "step_us": step,
                "chw": f"{r['c']}x{r['h']}x{r['w']}",
                "c": int(r["c"]),
                "dtype": r.get("dtype", ""),
                "layout": r.get("layout", ""),
                "threads": r.get("threads", ""),
                # weak: the per-rank batch is fixed; strong: the global batch is
                "batch": n if exp != "strong" else n * p,
            })
    return rows


def config_label(cfg, exp):
    chw, dtype, layout, threads, batch = cfg
    b = f"N={batch}/rank" if exp != "strong" else f"N={batch} global"
    t = f", {threads} thr/rank" if threads else ""
    return f"{chw} {dtype} {layout}, {b}{t}"


def organize(rows):
    """{(experiment, network): {config: {mode: {P: step_us}}}}; later duplicates win."""
    data = defaultdict(lambda: defaultdict(lambda: defaultdict(dict)))
    for r in rows:
        cfg = (r["chw"], r["dtype"], r["layout"], r["threads"], r["batch"])
        series = data[(r["experiment"], r["network"])][cfg][r["mode"]]
        if r["P"] in series:
            print(f"plot_scaling: duplicate row {r['experiment']} {r['network']} {cfg} "
                  f"{r['mode']} P={r['P']}: keeping the later one", file=sys.stderr)
        series[r["P"]] = r["step_us"]
    return data


def efficiency(series, exp):
    """P -> efficiency against the smallest P measured (1 normally)."""
    p0 = min(series)
    t0 = series[p0]
    if exp == "strong":
        return {p: (p0 * t0) / (p * t) for p, t in series.items()}
    return {p: t0 / t for p, t in series.items()}


def sort_key_cfg(cfg):
    chw = cfg[0]
    c = int(chw.split("x")[0])
    return (c, cfg)


def crossover(ratios, threshold=1.0):
    """Smallest P > 1 from which ratio > threshold at every larger P measured, or None."""
    ps = sorted(p for p in ratios if p > 1)
    cross = None
    for p in reversed(ps):
        if ratios[p] > threshold:
            cross = p
        else:
            break
    return cross


def plain_log_labels(ax):
    """Log y axis labelled 2, 5, 40 rather than 2x10^0, 4x10^1 (minor ticks too, if < 1 decade)."""
    from matplotlib.ticker import FuncFormatter, NullFormatter
    plain = FuncFormatter(lambda v, _: f"{v:g}")
    ax.yaxis.set_major_formatter(plain)
    lo, hi = ax.get_ylim()
    ax.yaxis.set_minor_formatter(plain if lo > 0 and hi / lo < 10 else NullFormatter())


def plot_group(plt, exp, net, cfgs, path):
    keys = sorted(cfgs, key=sort_key_cfg)
    fig, axes = plt.subplots(len(keys), 2, figsize=(11, 3.6 * len(keys)), squeeze=False)
    for row, cfg in enumerate(keys):
        modes = cfgs[cfg]
        ax_t, ax_e = axes[row]
        allp = sorted({p for s in modes.values() for p in s})
        for mode in [m for m in MODES if m in modes] + sorted(set(modes) - set(MODES)):
            series = modes[mode]
            ps = sorted(series)
            colour, ls, mk = STYLE.get(mode, (None, "-.", "x"))
            ax_t.plot(ps, [series[p] / 1e3 for p in ps], color=colour, linestyle=ls, marker=mk,
                      label=mode)
            eff = efficiency(series, exp)
            ax_e.plot(ps, [eff[p] for p in ps], color=colour, linestyle=ls, marker=mk, label=mode)
        if exp == "strong" and "local" in modes and len(allp) > 1:
            s = modes["local"]
            p0 = min(s)
            ax_t.plot(allp, [s[p0] * p0 / p / 1e3 for p in allp], color="black", linewidth=0.7,
                      alpha=0.4, label="ideal (local t(1)/P)")
        ax_e.axhline(1.0, color="black", linewidth=0.7, alpha=0.4)
        title = f"{exp} scaling, {net}: {config_label(cfg, exp)}"
        for ax in (ax_t, ax_e):
            ax.set_xscale("log", base=2)
            ax.set_xticks(allp)
            ax.set_xticklabels([str(p) for p in allp])
            ax.set_xlabel("ranks P")
            ax.grid(True, which="both", alpha=0.3)
        ax_t.set_yscale("log")
        plain_log_labels(ax_t)
        ax_t.set_ylabel("time per step, fwd + bwd (ms)")
        ax_t.set_title(title, fontsize=9)
        ax_t.legend(fontsize=8)
        ax_e.set_ylabel("efficiency: t(1)/t(P)" if exp != "strong" else "efficiency: t(1)/(P t(P))")
        ax_e.set_ylim(bottom=0)
        ax_e.set_title(f"efficiency ({exp})", fontsize=9)
        ax_e.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_crossover(plt, data, path):
    fig, ax = plt.subplots(figsize=(8, 5))
    allp = set()
    drew = False
    for (exp, net), cfgs in sorted(data.items()):
        for cfg in sorted(cfgs, key=sort_key_cfg):
            modes = cfgs[cfg]
            if "sync" not in modes or "allgather" not in modes:
                continue
            ps = sorted(set(modes["sync"]) & set(modes["allgather"]))
            if not ps:
                continue
            allp.update(ps)
            ax.plot(ps, [modes["allgather"][p] / modes["sync"][p] for p in ps], marker="o",
                    linestyle="-" if net == "local" else "--",
                    label=f"{exp}, {net}: {config_label(cfg, exp)}")
            drew = True
    if not drew:
        plt.close(fig)
        return False
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.set_xscale("log", base=2)
    ps = sorted(allp)
    ax.set_xticks(ps)
    ax.set_xticklabels([str(p) for p in ps])
    ax.set_xlabel("ranks P")
    ax.set_ylabel("step time allgather / sync (> 1: allreduce wins)")
    ax.set_title("allgather exchange (PyTorch, Apex) against syncbn's allreduce", fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def fmt_ms(us):
    return "-" if us is None else f"{us / 1e3:.3f}"


def print_tables(data, threshold=1.0, out=sys.stdout):
    summary = []
    detail = []
    for (exp, net), cfgs in sorted(data.items()):
        for cfg in sorted(cfgs, key=sort_key_cfg):
            modes = cfgs[cfg]
            if "sync" not in modes or "allgather" not in modes:
                continue
            sync, ag, loc = modes["sync"], modes["allgather"], modes.get("local", {})
            ps = sorted(set(sync) & set(ag))
            if not ps:
                continue
            ratios = {p: ag[p] / sync[p] for p in ps}
            cross = crossover(ratios, threshold)
            pmax = ps[-1]
            chw, dtype, layout, threads, batch = cfg
            b = f"{batch}/rank" if exp != "strong" else f"{batch} global"
            if cross is not None:
                where = f"P = {cross}"
            elif pmax > 1:
                where = f"not up to P = {pmax}"
            else:
                where = "only P = 1 measured"
            summary.append((exp, net, chw.split("x")[0], chw, f"{dtype} {layout}", b, where,
                            f"{ratios[pmax]:.2f}x at P = {pmax}"))
            for p in ps:
                lo = loc.get(p)
                ov_s = f"{(sync[p] - lo) / 1e3:.3f}" if lo is not None else "-"
                ov_a = f"{(ag[p] - lo) / 1e3:.3f}" if lo is not None else "-"
                detail.append((exp, net, chw, b, str(p), fmt_ms(lo), fmt_ms(sync[p]), fmt_ms(ag[p]),
                               f"{ratios[p]:.3f}", ov_s, ov_a))

    def table(head, rows):
        print("| " + " | ".join(head) + " |", file=out)
        print("|" + "|".join("---" for _ in head) + "|", file=out)
        for r in rows:
            print("| " + " | ".join(r) + " |", file=out)

    if not summary:
        print("plot_scaling: no shape with both sync and allgather rows: no crossover table",
              file=out)
        return
    slower = "slower" if threshold == 1.0 else f"more than {threshold:g}x slower"
    print(f"Crossover: from which P the allgather exchange (PyTorch / Apex) is {slower} per step "
          "than syncbn's allreduce (and stays so at every larger P measured)\n", file=out)
    table(("experiment", "network", "C", "C x H x W", "type", "batch",
           "allgather slower from", "allgather / sync"), summary)
    print("\nPer P: time per step (fwd + bwd, ms, max over ranks of the median iteration); "
          "overhead = mode minus local (ms)\n", file=out)
    table(("experiment", "network", "C x H x W", "batch", "P", "local", "sync", "allgather",
           "allgather / sync", "sync overhead", "allgather overhead"), detail)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog="\n\n".join(__doc__.split("\n\n")[1:]))
    ap.add_argument("csv", nargs="+", help="launch/scaling.sh CSV(s); rows are concatenated")
    ap.add_argument("--out", help="directory for the PNGs (default: the first CSV's)")
    ap.add_argument("--no-plots", action="store_true", help="print the tables only")
    ap.add_argument("--threshold", type=float, default=1.0, metavar="R",
                    help="crossover: allgather / sync step-time ratio that counts as slower "
                         "(default 1.0; e.g. 1.05 to ignore noise)")
    args = ap.parse_args()

    plt = None
    if not args.no_plots:
        try:
            import matplotlib
            matplotlib.use("Agg")
            import matplotlib.pyplot as plt
        except ImportError:
            hint = ""
            if os.path.realpath(sys.executable) != os.path.realpath("/usr/bin/python3") and \
                    os.path.exists("/usr/bin/python3"):
                hint = (f"; this is {sys.executable}, Debian's package is for /usr/bin/python3 "
                        f"(run: /usr/bin/python3 {sys.argv[0]} ...)")
            sys.exit("plot_scaling: needs matplotlib (Debian: apt-get install python3-matplotlib, "
                     f"or ./install_deps.sh){hint}; --no-plots prints the tables without it")

    rows = read_rows(args.csv)
    if not rows:
        sys.exit("plot_scaling: no usable rows")
    data = organize(rows)
    print_tables(data, args.threshold)
    if plt is None:
        return

    out = args.out or os.path.dirname(os.path.abspath(args.csv[0]))
    os.makedirs(out, exist_ok=True)
    stem = os.path.splitext(os.path.basename(args.csv[0]))[0]
    written = []
    for (exp, net), cfgs in sorted(data.items()):
        path = os.path.join(out, f"{stem}-{exp}-{net}.png")
        plot_group(plt, exp, net, cfgs, path)
        written.append(path)
    path = os.path.join(out, f"{stem}-crossover.png")
    if plot_crossover(plt, data, path):
        written.append(path)
    print("", file=sys.stderr)
    for p in written:
        print(f"plot_scaling: wrote {p}", file=sys.stderr)


if __name__ == "__main__":
    main()
