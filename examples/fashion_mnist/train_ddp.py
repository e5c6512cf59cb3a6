#!/usr/bin/env python3
"""train_ddp: data-parallel Fashion-MNIST training in PyTorch (DistributedDataParallel), with
batch norm synchronized by syncbn, by fairscale, or local to each rank.

    # under mpirun: syncbn talks MPI, DDP averages gradients over gloo
    launch/run_local.sh -n 4 -- build/venv/bin/python examples/fashion_mnist/train_ddp.py \\
        --model mlp --bn syncbn --batch-per-rank 2
    # under torch.distributed.run: both over gloo
    build/venv/bin/python -m torch.distributed.run --standalone --nproc_per_node 4 \\
        --redirects 1 --tee 1 examples/fashion_mnist/train_ddp.py --bn syncbn

The models are the C++ trainer's (train_fashion_mnist): mlp (784-128-BN-64-BN-10) and cnn (two
conv-BN-ReLU-maxpool blocks, then linear); the layers that feed a BN have no bias. Each epoch the
training set is shuffled with a permutation drawn from --seed and the epoch (the same on every
rank); global batch k is samples [k P b, (k + 1) P b) of it, of which rank r takes
[r b, (r + 1) b); an incomplete last global batch is dropped. Each rank minimizes the mean
cross-entropy over its own samples, DDP averages the gradients, SGD steps. Evaluation: each rank
classifies its share of the test set, with DDP's broadcast of rank 0's buffers for --bn local and
fairscale (their running statistics differ between ranks), and the counts are summed. Rank 0
prints a line per epoch and a final JSON line with the C++ trainer's keys.
"""

import argparse
import gzip
import json
import os
import sys
import time

import numpy as np
import torch
import torch.distributed as dist
import torch.nn as nn

PIXEL_MEAN, PIXEL_STD = 0.2860, 0.3530  # of the training set, pixels scaled to [0, 1]
EVAL_BATCH = 1000


def parse():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=["mlp", "cnn"], default="mlp")
    p.add_argument("--bn", choices=["syncbn", "local", "fairscale"], default="syncbn",
                   help="syncbn: syncbn.torch.SyncBatchNorm (global batch statistics); local: "
                        "torch.nn.BatchNorm per rank; fairscale: "
                        "fairscale.experimental.nn.SyncBatchNorm")
    p.add_argument("--comm", choices=["auto", "mpi", "gloo"], default="auto",
                   help="syncbn's communication: mpi (Communicator.from_mpi4py, under mpirun), "
                        "gloo (from_process_group); auto: mpi under mpirun, else gloo")
    p.add_argument("--batch-per-rank", type=int, default=32)
    p.add_argument("--epochs", type=int, default=1)
    p.add_argument("--max-steps", type=int, default=0, help="stop after this many steps (0: no limit)")
    p.add_argument("--lr", type=float, default=0.01)
    p.add_argument("--momentum", type=float, default=0.9)
    p.add_argument("--seed", type=int, default=1)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--threads", type=int, default=0,
                   help="torch threads per rank (0: OMP_NUM_THREADS, which run_local.sh sets)")
    p.add_argument("--data", default="/usr/share/datasets/fashion-mnist",
                   help="directory of the gzipped Fashion-MNIST IDX files")
    return p.parse_args()


# ---- the job ---------------------------------------------------------------------------------

def init_distributed():
    """torch.distributed over gloo, from torchrun's environment or from mpirun's (then with
    mpi4py for the rendezvous port). Returns (rank, size, mpi4py communicator or None)."""
    if "OMPI_COMM_WORLD_SIZE" in os.environ:
        from mpi4py import MPI

        import syncbn.torch

        rank, size = syncbn.torch.init_process_group_mpi("gloo")
        return rank, size, MPI.COMM_WORLD
    dist.init_process_group("gloo")  # RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT
    return dist.get_rank(), dist.get_world_size(), None


# ---- data ------------------------------------------------------------------------------------

def read_idx(path):
    """An IDX file (gzipped) as a uint8 array of its dimensions."""
    with gzip.open(path, "rb") as f:
        data = f.read()
    ndim = data[3]
    dims = [int.from_bytes(data[4 + 4 * i:8 + 4 * i], "big") for i in range(ndim)]
    return np.frombuffer(data, dtype=np.uint8, offset=4 + 4 * ndim).reshape(dims)


def load_split(directory, split, dtype):
    try:
        images = read_idx(os.path.join(directory, f"{split}-images-idx3-ubyte.gz"))
        labels = read_idx(os.path.join(directory, f"{split}-labels-idx1-ubyte.gz"))
    except OSError as e:
        raise SystemExit(f"cannot load Fashion-MNIST: {e} (install the Debian package "
                         "dataset-fashion-mnist, or pass --data DIR)")
    x = torch.from_numpy(images.copy()).to(dtype).div_(255).sub_(PIXEL_MEAN).div_(PIXEL_STD)
    return x.unsqueeze(1), torch.from_numpy(labels.astype(np.int64))


# ---- models ----------------------------------------------------------------------------------

def make_model(name):
    if name == "mlp":
        return nn.Sequential(
            nn.Flatten(), nn.Linear(28 * 28, 128, bias=False), nn.BatchNorm1d(128), nn.ReLU(),
            nn.Linear(128, 64, bias=False), nn.BatchNorm1d(64), nn.ReLU(), nn.Linear(64, 10))
    return nn.Sequential(
        nn.Conv2d(1, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Flatten(), nn.Linear(32 * 7 * 7, 10))


def with_batch_norm(model, bn, comm_kind, mpi_comm):
    """The model with its batch norm as --bn asks, and a name for the communication."""
    if bn == "local":
        return model, "gloo"
    if bn == "fairscale":
        from fairscale.experimental.nn import SyncBatchNorm as FairscaleSyncBatchNorm

        if any(isinstance(m, nn.BatchNorm1d) for m in model.modules()):
            raise SystemExit("--bn fairscale: fairscale's SyncBatchNorm takes 4-D input only "
                             "(a BatchNorm2d); use --model cnn")

        return FairscaleSyncBatchNorm.convert_sync_batchnorm(model), "gloo"
    import syncbn
    import syncbn.torch

    if comm_kind == "auto":
        comm_kind = "mpi" if mpi_comm is not None else "gloo"
    if comm_kind == "mpi":
        if mpi_comm is None:
            raise SystemExit("--comm mpi needs a job started by mpirun")
        communicator = syncbn.Communicator.from_mpi4py(mpi_comm)
    else:
        communicator = syncbn.Communicator.from_process_group()
    return syncbn.torch.convert_sync_batchnorm(model, communicator=communicator), comm_kind


# ---- training --------------------------------------------------------------------------------

def epoch_order(n, seed, epoch):
    return torch.randperm(n, generator=torch.Generator().manual_seed(seed * 1000003 + epoch))


def evaluate(model, images, labels, rank, size):
    model.eval()
    n = labels.shape[0]
    begin, end = n * rank // size, n * (rank + 1) // size
    correct = 0
    with torch.no_grad():
        for b in range(begin, end, EVAL_BATCH):
            e = min(end, b + EVAL_BATCH)
            correct += int((model(images[b:e]).argmax(1) == labels[b:e]).sum())
    total = torch.tensor([correct], dtype=torch.float64)
    dist.all_reduce(total)
    model.train()
    return total.item() / n


def main():
    o = parse()
    rank, size, mpi_comm = init_distributed()
    if o.threads > 0:
        torch.set_num_threads(o.threads)
    elif "OMP_NUM_THREADS" in os.environ:
        torch.set_num_threads(int(os.environ["OMP_NUM_THREADS"]))
    dtype = torch.float64 if o.dtype == "float64" else torch.float32
    train_x, train_y = load_split(o.data, "train", dtype)
    test_x, test_y = load_split(o.data, "t10k", dtype)
    b, global_batch = o.batch_per_rank, o.batch_per_rank * size
    steps_per_epoch = train_y.shape[0] // global_batch
    if steps_per_epoch == 0:
        raise SystemExit(f"global batch {global_batch} exceeds the training set")

    torch.manual_seed(o.seed)
    model, comm_name = with_batch_norm(make_model(o.model).to(dtype), o.bn, o.comm, mpi_comm)
    # syncbn keeps running statistics identical on every rank; the others need rank 0's.
    ddp = nn.parallel.DistributedDataParallel(model, broadcast_buffers=o.bn != "syncbn")
    optimizer = torch.optim.SGD(ddp.parameters(), lr=o.lr, momentum=o.momentum)
    if rank == 0:
        print(f"train_ddp: {size} ranks x batch {b} = global batch {global_batch}, model "
              f"{o.model}, bn {o.bn}, comm {comm_name}, lr {o.lr}, momentum {o.momentum}, "
              f"{steps_per_epoch} steps/epoch, {torch.get_num_threads()} threads/rank", flush=True)
    steps, train_loss, accuracy = 0, float("nan"), float("nan")
    start = time.perf_counter()
    for epoch in range(1, o.epochs + 1):
        if o.max_steps and steps >= o.max_steps:
            break
        clock = time.perf_counter()
        order = epoch_order(train_y.shape[0], o.seed, epoch)
        loss_sum, epoch_steps = 0.0, 0
        for k in range(steps_per_epoch):
            if o.max_steps and steps >= o.max_steps:
                break
            index = order[k * global_batch + rank * b:k * global_batch + (rank + 1) * b]
            optimizer.zero_grad(set_to_none=True)
            loss = nn.functional.cross_entropy(ddp(train_x[index]), train_y[index])
            loss.backward()
            optimizer.step()
            loss_sum += loss.item()
            epoch_steps += 1
            steps += 1
        total = torch.tensor([loss_sum], dtype=torch.float64)
        dist.all_reduce(total)
        train_loss = total.item() / (size * epoch_steps)
        accuracy = evaluate(ddp, test_x, test_y, rank, size)
        if rank == 0:
            print(f"epoch {epoch}  steps {epoch_steps}  train_loss {train_loss:.4f}  "
                  f"test_accuracy {accuracy:.4f}  seconds {time.perf_counter() - clock:.1f}",
                  flush=True)
    if rank == 0:
        print(json.dumps({"ranks": size, "model": o.model, "bn": o.bn, "device": "cpu",
                          "comm": comm_name, "batch_per_rank": b, "global_batch": global_batch,
                          "steps": steps, "test_accuracy": round(accuracy, 7),
                          "train_loss": round(train_loss, 7),
                          "seconds": round(time.perf_counter() - start, 3)}), flush=True)
    dist.barrier()
    return 0


if __name__ == "__main__":
    sys.exit(main())
