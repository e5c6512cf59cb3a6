"""syncbn.torch.SyncBatchNorm against batch norm over the global batch (reference.py): y, the
input gradient, the sum over ranks of weight.grad and bias.grad (what DDP averages), running
statistics and num_batches_tracked, over several training steps and an evaluation step, for
equal, uneven and empty per-rank batches, different spatial sizes per rank, 0 to 3 spatial dims,
channels_last and channels_last_3d, momentum None, affine off, track_running_stats off, float64,
and subgroups."""

import dataclasses

import pytest
import torch

import syncbn
import syncbn.torch as sbt
from reference import GlobalBatchNorm, assert_close, draw

C = 3


@dataclasses.dataclass
class Case:
    name: str
    shape: object  # (rank) -> this rank's input shape
    dtype: torch.dtype = torch.float32
    affine: bool = True
    track: bool = True
    momentum: object = 0.1
    channels_last: bool = False
    group_size: int = 0  # 0: the whole job; k: Communicator.split(k)
    steps: int = 3

    def __str__(self):
        return self.name


CASES = [
    Case("equal_nc", lambda r: (3, C)),
    Case("equal_ncl", lambda r: (3, C, 5)),
    Case("equal_nchw", lambda r: (2, C, 3, 4)),
    Case("equal_ncdhw", lambda r: (2, C, 2, 3, 2)),
    Case("uneven_n", lambda r: (r + 1, C, 3, 3)),
    Case("uneven_n_fp64", lambda r: (r + 1, C, 3, 3), dtype=torch.float64),
    Case("empty_rank1", lambda r: (0 if r == 1 else 3, C, 4)),
    Case("only_rank0_has_data", lambda r: (4 if r == 0 else 0, C, 2, 2)),
    Case("different_spatial", lambda r: (2, C, r + 2, 3)),
    Case("different_n_and_spatial", lambda r: (r % 2 + 1, C, 2 * r + 2)),
    Case("momentum_none", lambda r: (r + 2, C, 2, 2), momentum=None, steps=4),
    Case("affine_off", lambda r: (2, C, 3), affine=False),
    Case("track_off", lambda r: (r + 2, C, 3), track=False),
    Case("affine_off_track_off_empty_rank1", lambda r: (0 if r == 1 else 2, C), affine=False,
         track=False),
    Case("channels_last", lambda r: (2, C, 3, 4), channels_last=True),
    Case("channels_last_3d", lambda r: (2, C, 2, 2, 3), channels_last=True),
    Case("channels_last_uneven_fp64", lambda r: (r + 1, C, 2, 3), dtype=torch.float64,
         channels_last=True),
    Case("channels_last_empty_rank1", lambda r: (0 if r == 1 else 2, C, 3, 3),
         channels_last=True),
    Case("subgroups_of_1", lambda r: (r + 2, C, 3), group_size=1),
    Case("subgroups_of_2", lambda r: (r + 1, C, 2, 2), group_size=2),
]


def memory_format(x):
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def make_layer(case, comm, seed):
    layer = sbt.SyncBatchNorm(C, momentum=case.momentum, affine=case.affine,
                              track_running_stats=case.track, communicator=comm,
                              dtype=case.dtype)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if case.affine:
            layer.weight.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
            layer.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))
        if case.track:
            layer.running_mean.copy_(torch.randn(C, generator=g, dtype=torch.float64))
            layer.running_var.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
            layer.num_batches_tracked.fill_(3)
    return layer


@pytest.mark.parametrize("case", CASES, ids=str)
def test_matches_global_batch_norm(job, seed, case):
    k = case.group_size or job.size
    if job.size % k != 0 or (case.group_size and k == job.size):
        pytest.skip(f"groups of {k} need a job of a larger multiple of {k} ranks")
    comm = job.comm.split(k) if case.group_size else job.comm
    first = job.rank // k * k  # this rank's group: ranks [first, first + k)
    layer = make_layer(case, comm, seed)
    ref = GlobalBatchNorm(C, layer.eps, case.momentum, case.affine, case.track,
                          weight=layer.weight.detach() if case.affine else None,
                          bias=layer.bias.detach() if case.affine else None,
                          running_mean=layer.running_mean if case.track else None,
                          running_var=layer.running_var if case.track else None,
                          num_batches_tracked=3 if case.track else 0)
    shapes = [case.shape(r) for r in range(job.size)]
    for step in range(case.steps):
        xs = draw(seed + step, shapes, case.dtype, offset=step)
        dys = draw(seed + 1000 + step, shapes, case.dtype)
        x, dy = xs[job.rank], dys[job.rank]
        if case.channels_last:
            x = x.contiguous(memory_format=memory_format(x))
        x.requires_grad_(True)
        y = layer(x)
        (y * dy).sum().backward()
        ys, dxs, dw, db = ref.train_step(xs[first:first + k], dys[first:first + k])
        what = f"{case.name}, step {step}, rank {job.rank}"
        assert y.dtype == case.dtype and y.shape == x.shape
        if case.channels_last:
            assert y.is_contiguous(memory_format=memory_format(x)), f"{what}: y's memory format"
        assert_close(y, ys[job.rank - first], case.dtype, f"{what}: y")
        assert_close(x.grad, dxs[job.rank - first], case.dtype, f"{what}: dx")
        count = sum(s[0] * torch.Size(s[2:]).numel() for s in shapes[first:first + k])
        if case.affine:
            # weight.grad and bias.grad are local; their sum over the group is the global one.
            group_sum = _group_sum(job, torch.stack([layer.weight.grad, layer.bias.grad]), first, k)
            assert_close(group_sum[0], dw, case.dtype, f"{what}: sum of dweight", scale=count)
            assert_close(group_sum[1], db, case.dtype, f"{what}: sum of dbias", scale=count)
            layer.weight.grad = layer.bias.grad = None
        if case.track:
            assert_close(layer.running_mean, ref.running_mean, case.dtype, f"{what}: running_mean")
            assert_close(layer.running_var, ref.running_var, case.dtype, f"{what}: running_var")
            assert int(layer.num_batches_tracked) == ref.num_batches_tracked
            # Every rank applies the same update to the same sums: bitwise equal everywhere.
            stats = torch.cat([layer.running_mean, layer.running_var]).to(torch.float64)
            assert torch.equal(_group_sum(job, stats, first, k), stats * k), \
                f"{what}: running statistics differ across the group"
    layer.eval()
    x = draw(seed + 99, shapes, case.dtype)[job.rank]
    if case.channels_last:
        x = x.contiguous(memory_format=memory_format(x))
    with torch.no_grad():
        y = layer(x)
    assert_close(y, ref.eval_step(x), case.dtype, f"{case.name}, eval, rank {job.rank}")


def _group_sum(job, t, first, k):
    """t summed over the ranks [first, first + k) of the job (torch.distributed)."""
    everyone = torch.zeros((job.size,) + tuple(t.shape), dtype=torch.float64)
    everyone[job.rank] = t.to(torch.float64)
    everyone = job.sum(everyone)
    return everyone[first:first + k].sum(dim=0)


def test_gradcheck_float64():
    """torch.autograd.gradcheck of x, weight and bias through the layer's autograd Function, on
    the self communicator (float64), with and without running statistics."""
    for track in (True, False):
        layer = sbt.SyncBatchNorm(2, track_running_stats=track, dtype=torch.float64,
                                  communicator=syncbn.Communicator.self())
        x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
        w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
        b = torch.randn(2, dtype=torch.float64, requires_grad=True)
        key, plan, param_dtype, problem = layer._plan_set(layer._communicator(), x).pick(
            x, syncbn._capi.CHANNELS_FIRST)
        assert problem is None

        def fn(x, w, b):
            return sbt._Function.apply(x, None, w, b, layer, key, plan, param_dtype,
                                       syncbn._capi.ACTIVATION_NONE)

        assert torch.autograd.gradcheck(fn, (x, w, b))
