#!/usr/bin/env python3
"""torch_sync_bench: synchronized batch norm for PyTorch on CPU, forward + backward per call.

    launch/run_local.sh -n 2 --threads 1 -- build/venv/bin/python bench/torch_sync_bench.py \\
        [--batch 32] [-n 10] [-w 3] [--csv FILE]

In one run, on the same ranks, threads and tensors, for the 12 distinct batch-norm input shapes
of torchvision's ResNet-50 (float32, NCHW, --batch images per rank):
  syncbn-mpi  syncbn.torch.SyncBatchNorm over MPI (Communicator.from_mpi4py)
  syncbn-gloo syncbn.torch.SyncBatchNorm over torch.distributed's gloo (from_process_group)
  fairscale   fairscale.experimental.nn.SyncBatchNorm (gloo; the CPU SyncBN a PyTorch user can
              install: torch.nn.SyncBatchNorm refuses CPU tensors)
  local       torch.nn.BatchNorm2d, each rank on its own batch (no synchronization)
A call is y = bn(x); y.backward(dy) in training mode. Each iteration runs every variant once,
in an order that rotates from one iteration to the next, each call after a barrier, and its
time is the slowest rank's; the table gives the
median over -n iterations after -w warm-up iterations, in microseconds, and the ratios
fairscale / syncbn-mpi (goal: >= 4 on every shape) and syncbn-mpi / local (goal: <= 1).
"#wrong" counts the syncbn outputs (y, dx, weight.grad and bias.grad summed over ranks) that
differ from fairscale's by more than 1e-3 relative to the tensor's largest value.

Needs mpi4py, torch >= 1.13, syncbn (pip install .) and fairscale (pip install fairscale
--no-deps, which keeps the installed torch). Exit status 0; 1 if a check failed; 77 (what ctest
takes as skipped) without fairscale.
"""

import argparse
import csv
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

RESNET50_SHAPES = [  # (C, H, W) per image, and how many of ResNet-50's BN layers have it
    ((64, 112, 112), 1), ((64, 56, 56), 6), ((256, 56, 56), 4), ((128, 56, 56), 1),
    ((128, 28, 28), 7), ((512, 28, 28), 5), ((256, 28, 28), 1), ((256, 14, 14), 11),
    ((1024, 14, 14), 7), ((512, 14, 14), 1), ((512, 7, 7), 5), ((2048, 7, 7), 4),
]


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, default=32, help="images per rank (N)")
    p.add_argument("-n", "--iters", type=int, default=10, help="timed iterations")
    p.add_argument("-w", "--warmup", type=int, default=3, help="warm-up iterations")
    p.add_argument("--shapes", type=int, default=len(RESNET50_SHAPES),
                   help="the first K shapes only")
    p.add_argument("--csv", help="also write the table to this CSV file (rank 0)")
    return p.parse_args()


def init():
    from mpi4py import MPI

    import syncbn.torch

    rank, size = syncbn.torch.init_process_group_mpi("gloo")
    torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "1")))
    return MPI.COMM_WORLD, rank, size


def variants(C, mpi_comm):
    import fairscale.experimental.nn as fairscale_nn

    import syncbn
    import syncbn.torch

    if not hasattr(variants, "comms"):
        variants.comms = (syncbn.Communicator.from_mpi4py(mpi_comm),
                          syncbn.Communicator.from_process_group())
    mpi, gloo = variants.comms
    return {
        "syncbn-mpi": syncbn.torch.SyncBatchNorm(C, communicator=mpi),
        "syncbn-gloo": syncbn.torch.SyncBatchNorm(C, communicator=gloo),
        "fairscale": fairscale_nn.SyncBatchNorm(C),
        "local": torch.nn.BatchNorm2d(C),
    }


def call(bn, x, dy):
    x.grad = None
    bn.zero_grad(set_to_none=True)
    y = bn(x)
    y.backward(dy)
    return y


def outputs(bn, x, y):
    grads = torch.cat([bn.weight.grad, bn.bias.grad]).double()
    dist.all_reduce(grads)
    return [y.detach(), x.grad.detach(), grads]


def wrong(ours, theirs):
    bad = 0
    for a, b in zip(ours, theirs):
        scale = max(b.abs().max().item(), 1e-30)
        bad += int(((a.double() - b.double()).abs().max() / scale).item() > 1e-3)
    return bad


def main():
    from mpi4py import MPI

    args = parse()
    try:
        import fairscale.experimental.nn  # noqa: F401
    except ImportError:
        print("torch_sync_bench: fairscale is not installed (pip install fairscale --no-deps)")
        return 77
    mpi_comm, rank, size = init()
    names = ["syncbn-mpi", "syncbn-gloo", "fairscale", "local"]
    rows = []
    if rank == 0:
        print(f"# torch_sync_bench: {size} ranks x {torch.get_num_threads()} threads, batch "
              f"{args.batch} per rank, float32 NCHW, forward + backward per call, median of "
              f"{args.iters} (after {args.warmup} warm-up), slowest rank; torch "
              f"{torch.__version__}")
        print(f"# {'shape (N,C,H,W)':>22} {'MB':>7} " + " ".join(f"{n + ' (us)':>16}" for n in names)
              + f" {'fairscale/mpi':>13} {'mpi/local':>9} {'#wrong':>6}")
    failures = 0
    for (C, H, W), _layers in RESNET50_SHAPES[:args.shapes]:
        g = torch.Generator().manual_seed(1000 + rank)
        x = torch.randn(args.batch, C, H, W, generator=g).requires_grad_()
        dy = torch.randn(args.batch, C, H, W, generator=g)
        bns = variants(C, mpi_comm)
        check = {}
        for name in names:  # first calls: plans, process groups; and the check
            y = call(bns[name], x, dy)
            check[name] = outputs(bns[name], x, y)
        bad = wrong(check["syncbn-mpi"], check["fairscale"]) + \
            wrong(check["syncbn-gloo"], check["fairscale"])
        failures += bad
        times = {n: [] for n in names}
        for it in range(args.warmup + args.iters):
            for name in names[it % 4:] + names[:it % 4]:  # each variant in every position
                mpi_comm.Barrier()
                t0 = time.perf_counter()
                call(bns[name], x, dy)
                elapsed = time.perf_counter() - t0
                slowest = mpi_comm.allreduce(elapsed, op=MPI.MAX)
                if it >= args.warmup:
                    times[name].append(slowest * 1e6)
        med = {n: statistics.median(times[n]) for n in names}
        row = {"n": args.batch, "c": C, "h": H, "w": W, "mbytes": x.numel() * 4 / 1e6,
               **{f"{n}_us": med[n] for n in names},
               "fairscale_over_syncbn": med["fairscale"] / med["syncbn-mpi"],
               "syncbn_over_local": med["syncbn-mpi"] / med["local"], "wrong": bad}
        rows.append(row)
        if rank == 0:
            shape = f"({args.batch},{C},{H},{W})"
            print(f"  {shape:>22} {row['mbytes']:7.1f} " +
                  " ".join(f"{med[n]:16.0f}" for n in names) +
                  f" {row['fairscale_over_syncbn']:13.2f} {row['syncbn_over_local']:9.2f} {bad:6d}",
                  flush=True)
    if rank == 0:
        fs = [r["fairscale_over_syncbn"] for r in rows]
        lo = [r["syncbn_over_local"] for r in rows]
        print(f"# fairscale / syncbn-mpi: {min(fs):.2f} - {max(fs):.2f} "
              f"(>= 4 on {sum(f >= 4 for f in fs)} of {len(fs)} shapes)")
        print(f"# syncbn-mpi / local:     {min(lo):.2f} - {max(lo):.2f} "
              f"(<= 1 on {sum(v <= 1 for v in lo)} of {len(lo)} shapes)")
        print(f"# Out of bounds values : {failures} {'OK' if failures == 0 else 'FAILED'}")
        if args.csv:
            with open(args.csv, "w", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(rows[0]))
                writer.writeheader()
                writer.writerows(rows)
    dist.barrier()
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
