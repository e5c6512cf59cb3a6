#!/usr/bin/env python3
"""torch_bn_bench: PyTorch's own batch-norm kernels on the shapes of bench/cuda_bench.

The PyTorch side of the GPU comparison: the same problems as cuda_bench (the 12 distinct BN input
shapes of torchvision ResNet-50, per-GPU batch 2, 8, 32, f32 and bf16, NCHW and channels_last),
timed the same way, written as a CSV that `cuda_bench --torch-csv FILE` joins on
(shape, n, dtype, layout) to print its xtorchK / xtorchF columns.

Variants (every one computes y, the batch statistics and the running statistics forward, and
dx, dweight, dbias backward; weight, bias and statistics are fp32 as in AMP training):
  tk   SyncBatchNorm's kernels without its collectives. Forward: torch.batch_norm_stats,
       torch.batch_norm_gather_stats_with_counts (one rank; it also updates the running
       statistics), torch.batch_norm_elemt. Backward: torch.batch_norm_backward_reduce,
       torch.batch_norm_backward_elemt. What torch.nn.SyncBatchNorm runs on each GPU, minus its
       all_gather / all_reduce and the small cat/split/mask glue around them.
  F    F.batch_norm(training=True) (cuDNN or PyTorch's native kernels, PyTorch's choice);
       backward = torch.autograd.grad of its output (the forward that builds the graph is
       enqueued before the timed region, outside the events).
  sbn  torch.nn.modules._functions.SyncBatchNorm (the autograd function behind nn.SyncBatchNorm)
       on a one-rank NCCL process group: the kernels above plus all_gather_into_tensor /
       all_reduce and the host synchronization it makes to drop empty ranks. Off with --no-dist.
  copy y.copy_(x), a device-to-device copy of the tensor (cross-check with cuda_bench's copy).

Timing (as cuda_bench): median over -n iterations of per-iteration CUDA event times after -w
warm-up iterations. Before each group of --chunk iterations the stream is held by
torch.cuda._sleep, sized from the measured host enqueue time, so that the events measure device
time rather than Python's launch latency; a measurement whose hold ran out before the host had
enqueued the group is flagged "h" (its times include launch gaps). sbn synchronizes the host on
every forward by design, so it is timed without the hold: its time includes that stall.
Without --cold-l2 buffers are reused back to back (tensors smaller than L2 partly hit L2).

Byte model (as cuda_bench): forward moves 3 x tensor bytes (x read twice, y written), backward
5 x (x and dy read twice, dx written), the copy 2 x.

Exit status: 0, 1 on an unexpected error, 2 without a CUDA device or PyTorch.
"""

import argparse
import csv
import math
import os
import statistics
import sys
import tempfile
import time

RESNET50_SHAPES = [  # (C, H, W) per sample, BN layers of torchvision ResNet-50 with this shape
    ((64, 112, 112), 1),
    ((64, 56, 56), 6),
    ((256, 56, 56), 4),
    ((128, 56, 56), 1),
    ((128, 28, 28), 7),
    ((512, 28, 28), 5),
    ((256, 28, 28), 1),
    ((256, 14, 14), 11),
    ((1024, 14, 14), 7),
    ((512, 14, 14), 1),
    ((512, 7, 7), 5),
    ((2048, 7, 7), 4),
]

EPS = 1e-5
MOMENTUM = 0.1
COLUMNS = [
    "shape", "n", "dtype", "layout", "bytes", "copy_us",
    "tk_fwd_us", "tk_bwd_us", "F_fwd_us", "F_bwd_us", "sbn_fwd_us", "sbn_bwd_us",
    "tk_fwd_host_us", "tk_bwd_host_us", "F_fwd_host_us", "F_bwd_host_us",
    "host_bound", "status",
]


def shape_name(chw):
    return "x".join(str(v) for v in chw)


def parse_list(text, conv, what):
    items = [t for t in text.split(",") if t]
    if not items:
        raise argparse.ArgumentTypeError(f"empty {what} list")
    return [conv(t) for t in items]


def parse_shape(text):
    parts = text.split("x")
    if len(parts) != 3 or not all(p.isdigit() and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"expected CxHxW (per sample), got '{text}'")
    return tuple(int(p) for p in parts)


def parse_dtype(text):
    aliases = {"f32": "f32", "fp32": "f32", "float32": "f32", "bf16": "bf16",
               "bfloat16": "bf16", "f16": "f16", "fp16": "f16", "float16": "f16"}
    if text not in aliases:
        raise argparse.ArgumentTypeError(f"unknown dtype '{text}' (f32, bf16, f16)")
    return aliases[text]


def parse_layout(text):
    aliases = {"nchw": "nchw", "channels_first": "nchw", "nhwc": "nhwc",
               "channels_last": "nhwc"}
    if text not in aliases:
        raise argparse.ArgumentTypeError(f"unknown layout '{text}' (nchw, nhwc)")
    return aliases[text]


def parse_args(argv):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("-n", "--iters", type=int, default=200,
                   help="timed iterations per measurement (median reported)")
    p.add_argument("-w", "--warmup", type=int, default=20, help="warm-up iterations")
    p.add_argument("--batches", default=[2, 8, 32],
                   type=lambda s: parse_list(s, int, "batch"), help="default 2,8,32")
    p.add_argument("--dtypes", default=["f32", "bf16"],
                   type=lambda s: parse_list(s, parse_dtype, "dtype"), help="default f32,bf16")
    p.add_argument("--layouts", default=["nchw", "nhwc"],
                   type=lambda s: parse_list(s, parse_layout, "layout"),
                   help="default nchw,nhwc")
    p.add_argument("--shapes", default=[s for s, _ in RESNET50_SHAPES],
                   type=lambda s: parse_list(s, parse_shape, "shape"),
                   help="CxHxW per sample; default the 12 ResNet-50 BN shapes")
    p.add_argument("--csv", help="write one CSV row per problem to this file")
    p.add_argument("--no-dist", action="store_true",
                   help="skip the SyncBatchNorm function on a one-rank NCCL group")
    p.add_argument("--cold-l2", action="store_true",
                   help="overwrite 2 x L2 before every timed iteration")
    p.add_argument("--chunk", type=int, default=64,
                   help="iterations enqueued behind one stream hold")
    p.add_argument("--device", type=int, default=0)
    # Flags of cuda_bench that mean nothing here, accepted so one argument list serves both.
    p.add_argument("--comm", help=argparse.SUPPRESS)
    p.add_argument("--cudnn-mode", help=argparse.SUPPRESS)
    p.add_argument("--capture-mode", help=argparse.SUPPRESS)
    p.add_argument("--hold-timeout-ms", help=argparse.SUPPRESS)
    p.add_argument("--no-graph", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--no-check", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.iters < 1 or args.warmup < 0 or args.chunk < 1:
        p.error("-n and --chunk must be >= 1, -w >= 0")
    if any(b < 1 for b in args.batches):
        p.error("--batches must be >= 1")
    return args


class Timer:
    """Per-iteration CUDA event times with the stream held while the host enqueues."""

    def __init__(self, torch, iters, warmup, chunk, flush):
        self.torch = torch
        self.iters = iters
        self.warmup = warmup
        self.chunk = min(chunk, iters)
        self.flush = flush
        self.starts = [torch.cuda.Event(enable_timing=True) for _ in range(self.chunk)]
        self.stops = [torch.cuda.Event(enable_timing=True) for _ in range(self.chunk)]
        self.cycles_per_us = self._calibrate_sleep()

    def _calibrate_sleep(self):
        torch = self.torch
        a = torch.cuda.Event(enable_timing=True)
        b = torch.cuda.Event(enable_timing=True)
        cycles = 20_000_000
        torch.cuda._sleep(cycles // 10)  # warm up
        a.record()
        torch.cuda._sleep(cycles)
        b.record()
        b.synchronize()
        return cycles / (a.elapsed_time(b) * 1e3)

    def time(self, op, setup=None, hold=True):
        """op() enqueues one iteration; setup() (not timed) enqueues what it needs first.

        Returns (median_us, min_us, host_median_us, host_bound)."""
        torch = self.torch
        t0 = time.perf_counter()
        for _ in range(self.warmup):
            if setup is not None:
                setup()
            op()
        torch.cuda.synchronize()
        per_iter_s = (time.perf_counter() - t0) / max(self.warmup, 1)
        dev, host = [], []
        host_bound = False
        done = 0
        while done < self.iters:
            length = min(self.chunk, self.iters - done)
            held = None
            if hold:
                # Hold for 1.5x the expected enqueue time of the group, plus 2 ms, at most 1 s.
                hold_us = min(1.5 * length * per_iter_s * 1e6 + 2000.0, 1e6)
                torch.cuda._sleep(int(hold_us * self.cycles_per_us))
                held = torch.cuda.Event()
                held.record()
            for i in range(length):
                if setup is not None:
                    setup()
                if self.flush is not None:
                    self.flush.fill_(float(i & 0xFF))
                self.starts[i].record()
                h0 = time.perf_counter()
                op()
                host.append((time.perf_counter() - h0) * 1e6)
                self.stops[i].record()
            if held is not None and held.query():
                host_bound = True
            torch.cuda.synchronize()
            dev.extend(self.starts[i].elapsed_time(self.stops[i]) * 1e3 for i in range(length))
            done += length
        return statistics.median(dev), min(dev), statistics.median(host), host_bound


def init_dist(torch):
    """A one-rank NCCL process group (FileStore: no network needed). (group, why-not)."""
    import torch.distributed as dist
    if not dist.is_available() or not dist.is_nccl_available():
        return None, "torch.distributed or NCCL not available"
    store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="torch_bn_bench_"), "store"), 1)
    device = torch.device("cuda", torch.cuda.current_device())
    try:
        try:
            dist.init_process_group("nccl", store=store, rank=0, world_size=1, device_id=device)
        except TypeError:  # PyTorch without device_id
            dist.init_process_group("nccl", store=store, rank=0, world_size=1)
    except Exception as e:  # noqa: BLE001 - report it and run without the sbn variant
        return None, f"init_process_group failed: {e}"
    return dist.group.WORLD, ""


def nccl_version(torch):
    try:
        v = torch.cuda.nccl.version()
    except Exception:  # noqa: BLE001 - informational only
        return "?"
    return ".".join(map(str, v)) if isinstance(v, tuple) else str(v)


def measure(torch, timer, chw, n, dtype_name, layout, group):
    import torch.nn.functional as F
    dtype = {"f32": torch.float32, "bf16": torch.bfloat16, "f16": torch.float16}[dtype_name]
    c, h, w = chw
    dev = torch.device("cuda", torch.cuda.current_device())
    fmt = torch.channels_last if layout == "nhwc" else torch.contiguous_format
    gen = torch.Generator(device=dev)
    gen.manual_seed(1)

    def tensor():
        t = torch.randn((n, c, h, w), device=dev, dtype=torch.float32, generator=gen)
        return t.to(dtype=dtype, memory_format=fmt).contiguous(memory_format=fmt)

    x, dy = tensor(), tensor()
    weight = torch.rand(c, device=dev, generator=gen) + 0.5
    bias = torch.rand(c, device=dev, generator=gen) - 0.5
    running_mean = torch.zeros(c, device=dev)
    running_var = torch.ones(c, device=dev)
    row = {"shape": shape_name(chw), "n": n, "dtype": dtype_name, "layout": layout,
           "bytes": x.numel() * x.element_size()}
    notes = []
    host_bound = False

    def record(prefix, result):
        nonlocal host_bound
        med, _mn, host, hb = result
        row[prefix + "_us"] = med
        if prefix + "_host_us" in COLUMNS:
            row[prefix + "_host_us"] = host
        host_bound = host_bound or hb

    def attempt(label, fn):
        try:
            fn()
        except Exception as e:  # noqa: BLE001 - a variant PyTorch rejects is n/a, not fatal
            torch.cuda.synchronize()
            notes.append(f"{label}: {type(e).__name__}: {str(e).splitlines()[0][:200]}")

    y = torch.empty_like(x)
    attempt("copy", lambda: record("copy", timer.time(lambda: y.copy_(x))))

    # SyncBatchNorm's kernels, one rank, no collectives.
    counts = torch.full((1,), float(n * h * w), device=dev, dtype=torch.float32)
    count_int = torch.full((1,), n * h * w, device=dev, dtype=torch.int32)

    def tk_forward():
        mean, invstd = torch.batch_norm_stats(x, EPS)
        mean, invstd = torch.batch_norm_gather_stats_with_counts(
            x, mean.view(1, -1), invstd.view(1, -1), running_mean, running_var, MOMENTUM, EPS,
            counts)
        return torch.batch_norm_elemt(x, weight, bias, mean, invstd, EPS), mean, invstd

    def tk():
        record("tk_fwd", timer.time(tk_forward))
        _, mean, invstd = tk_forward()

        def backward():
            sum_dy, sum_dy_xmu, grad_weight, grad_bias = torch.batch_norm_backward_reduce(
                dy, x, mean, invstd, weight, True, True, True)
            return torch.batch_norm_backward_elemt(dy, x, mean, invstd, weight, sum_dy,
                                                   sum_dy_xmu, count_int)

        record("tk_bwd", timer.time(backward))

    attempt("tk", tk)

    # F.batch_norm and its autograd backward.
    def functional():
        xr = x.detach().requires_grad_(True)
        wr = weight.detach().requires_grad_(True)
        br = bias.detach().requires_grad_(True)

        def forward():
            return F.batch_norm(xr, running_mean, running_var, wr, br, True, MOMENTUM, EPS)

        record("F_fwd", timer.time(forward))
        state = {}

        def setup():
            state["y"] = forward()

        def backward():
            torch.autograd.grad(state["y"], (xr, wr, br), dy)

        record("F_bwd", timer.time(backward, setup=setup))

    attempt("F", functional)

    # The SyncBatchNorm autograd function on a one-rank group (collectives and host sync).
    if group is not None:
        def sync_bn():
            from torch.nn.modules._functions import SyncBatchNorm as SyncBNFunction
            xr = x.detach().requires_grad_(True)
            wr = weight.detach().requires_grad_(True)
            br = bias.detach().requires_grad_(True)

            def forward():
                return SyncBNFunction.apply(xr, wr, br, running_mean, running_var, EPS,
                                            MOMENTUM, group, 1)

            record("sbn_fwd", timer.time(forward, hold=False))
            state = {}

            def setup():
                state["y"] = forward()

            def backward():
                torch.autograd.grad(state["y"], (xr, wr, br), dy)

            record("sbn_bwd", timer.time(backward, setup=setup, hold=False))

        attempt("sbn", sync_bn)
    row["host_bound"] = int(host_bound)
    row["status"] = "ok" if not notes else "; ".join(notes).replace(",", ";")
    return row


def fmt(v, width, prec=2):
    if v is None or (isinstance(v, float) and not math.isfinite(v)):
        return f"{'n/a':>{width}}"
    return f"{v:{width}.{prec}f}"


def main(argv):
    args = parse_args(argv)
    try:
        import torch
    except ImportError as e:
        print(f"torch_bn_bench: PyTorch not importable ({e}); this benchmark needs it",
              file=sys.stderr)
        return 2
    if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
        print("torch_bn_bench: no CUDA device available (torch.cuda.is_available() is False);"
              " this benchmark needs a GPU", file=sys.stderr)
        return 2
    if args.device >= torch.cuda.device_count():
        print(f"torch_bn_bench: --device {args.device}, but only "
              f"{torch.cuda.device_count()} device(s)", file=sys.stderr)
        return 2
    torch.cuda.set_device(args.device)
    props = torch.cuda.get_device_properties(args.device)
    flush = None
    if args.cold_l2:
        l2 = getattr(props, "L2_cache_size", 64 << 20) or (64 << 20)
        flush = torch.empty(2 * l2 // 4, device="cuda", dtype=torch.float32)
    timer = Timer(torch, args.iters, args.warmup, args.chunk, flush)
    group, why = (None, "--no-dist") if args.no_dist else init_dist(torch)

    print("# torch_bn_bench: PyTorch batch-norm kernels, shapes and timing of cuda_bench")
    print(f"# device {args.device}: {props.name}, {props.multi_processor_count} SMs; torch "
          f"{torch.__version__}, CUDA {torch.version.cuda}, cuDNN "
          f"{torch.backends.cudnn.version()}, NCCL {nccl_version(torch)}")
    print(f"# -n {args.iters} -w {args.warmup}: median of per-iteration CUDA event times, stream "
          f"held while enqueuing (sbn: not held, it syncs the host); "
          f"{'cold' if args.cold_l2 else 'warm'} L2")
    print("# tk = batch_norm_stats + gather_stats_with_counts + elemt / backward_reduce + "
          "backward_elemt; F = F.batch_norm + autograd; sbn = SyncBatchNorm function, one-rank "
          f"NCCL group{'' if group is not None else ' (n/a: ' + why + ')'}")
    print("# bytes moved: forward 3x tensor, backward 5x tensor, copy 2x tensor")
    sys.stdout.flush()

    problems = [(chw, n, d, lay) for chw in args.shapes for n in args.batches
                for d in args.dtypes for lay in args.layouts]
    out = open(args.csv, "w", newline="") if args.csv else None
    writer = None
    if out is not None:
        out.write(f"# torch {torch.__version__}, {props.name}, -n {args.iters} -w "
                  f"{args.warmup}, {'cold' if args.cold_l2 else 'warm'} L2\n")
        writer = csv.DictWriter(out, fieldnames=COLUMNS, restval="nan")
        writer.writeheader()
    rows = []
    try:
        for i, (chw, n, d, lay) in enumerate(problems):
            print(f"# [{i + 1}/{len(problems)}] {shape_name(chw)} N={n} {d} {lay}",
                  file=sys.stderr, flush=True)
            row = measure(torch, timer, chw, n, d, lay, group)
            rows.append(row)
            if writer is not None:
                writer.writerow({k: ("nan" if isinstance(v, float) and not math.isfinite(v)
                                     else (f"{v:.6g}" if isinstance(v, float) else v))
                                 for k, v in row.items()})
                out.flush()
    finally:
        if out is not None:
            out.close()

    head = (f"# {'shape':>10} {'N':>4} {'type':>4} {'lay':>4} {'size':>8} {'copy':>8} | "
            f"{'tk fwd':>8} {'F fwd':>8} {'sbn fwd':>8} {'tk GB/s':>8} | "
            f"{'tk bwd':>8} {'F bwd':>8} {'sbn bwd':>8} {'tk GB/s':>8} | flags")
    units = (f"# {'(CxHxW)':>10} {'':>4} {'':>4} {'':>4} {'(MB)':>8} {'(us)':>8} | "
             f"{'(us)':>8} {'(us)':>8} {'(us)':>8} {'':>8} | {'(us)':>8} {'(us)':>8} "
             f"{'(us)':>8} {'':>8} |")
    print("#")
    print(head)
    print(units)
    for r in rows:
        nbytes = r["bytes"]

        def bw(key, factor):
            t = r.get(key)
            return None if t is None else factor * nbytes / (t * 1e-6) / 1e9

        flags = ("h " if r["host_bound"] else "") + ("n/a " if r["status"] != "ok" else "")
        print(f"  {r['shape']:>10} {r['n']:>4} {r['dtype']:>4} {r['layout']:>4} "
              f"{fmt(nbytes / 1e6, 8)} {fmt(r.get('copy_us'), 8)} | "
              f"{fmt(r.get('tk_fwd_us'), 8)} {fmt(r.get('F_fwd_us'), 8)} "
              f"{fmt(r.get('sbn_fwd_us'), 8)} {fmt(bw('tk_fwd_us', 3), 8, 1)} | "
              f"{fmt(r.get('tk_bwd_us'), 8)} {fmt(r.get('F_bwd_us'), 8)} "
              f"{fmt(r.get('sbn_bwd_us'), 8)} {fmt(bw('tk_bwd_us', 5), 8, 1)} | {flags}")
    print("#")
    notes = sorted({f"{r['dtype']} {r['layout']}: {r['status']}" for r in rows
                    if r["status"] != "ok"})
    for note in notes:
        print(f"# n/a: {note}")
    hb = sum(1 for r in rows if r["host_bound"])
    if hb:
        print(f"# flag h: {hb} rows had a stream hold run out before the host finished "
              "enqueuing; their times include launch gaps")
    if group is not None:
        import torch.distributed as dist
        dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main(sys.argv[1:]))
    except KeyboardInterrupt:
        sys.exit(130)
