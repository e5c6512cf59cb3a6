"""syncbn.torch.SyncBatchNormReLU and SyncBatchNormAddReLU (the C API's fused activations,
SYNCBN_ACTIVATION_RELU and _ADD_RELU) against torch's relu(batch_norm(x) [+ z]) over the global
batch (reference.py, float64): y, the gradients of x, z, and the sum over ranks of weight's and
bias's, running statistics, for (N, C) to (N, C, D, H, W) input, channels_last and
channels_last_3d (and z in another memory format than x), float32 and float64, uneven, empty
and spatially different batches; outputs exactly 0 (relu'(0) = 0); y changed in place after the
forward (backward reads the forward's mask); gradcheck; evaluation; bad z on one rank; convert_sync_batchnorm of timm's BatchNormAct2d; state_dict; Join's shadow."""

import copy
import dataclasses

import pytest
import torch

import syncbn
import syncbn.torch as sbt
from reference import GlobalBatchNorm, assert_close, draw

C = 3
CLASSES = {"relu": sbt.SyncBatchNormReLU, "add_relu": sbt.SyncBatchNormAddReLU}


@dataclasses.dataclass
class Shape:
    name: str
    shape: object  # (rank) -> this rank's input shape
    channels_last: bool = False

    def __str__(self):
        return self.name


SHAPES = [
    Shape("nc", lambda r: (r + 2, C)),
    Shape("ncl", lambda r: (2, C, 5)),
    Shape("nchw", lambda r: (2, C, 3, 4)),
    Shape("nchw_channels_last", lambda r: (r + 1, C, 3, 4), channels_last=True),
    Shape("ncdhw", lambda r: (2, C, 2, 3, 2)),
    Shape("ncdhw_channels_last_3d", lambda r: (2, C, 2, 2, 3), channels_last=True),
    Shape("empty_rank1", lambda r: (0 if r == 1 else 3, C, 4)),
    Shape("different_spatial", lambda r: (2, C, r + 2, 3)),
]


def memory_format(x):
    return torch.channels_last if x.dim() == 4 else torch.channels_last_3d


def make_layer(activation, comm, seed, dtype, **kwargs):
    layer = CLASSES[activation](C, communicator=comm, dtype=dtype, **kwargs)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        if layer.affine:
            layer.weight.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
            layer.bias.copy_(torch.randn(C, generator=g, dtype=torch.float64))
        if layer.track_running_stats:
            layer.running_mean.copy_(torch.randn(C, generator=g, dtype=torch.float64))
            layer.running_var.copy_(torch.rand(C, generator=g, dtype=torch.float64) + 0.5)
    return layer


def reference_of(layer):
    return GlobalBatchNorm(C, layer.eps, layer.momentum, layer.affine, layer.track_running_stats,
                           weight=layer.weight.detach() if layer.affine else None,
                           bias=layer.bias.detach() if layer.affine else None,
                           running_mean=layer.running_mean,
                           running_var=layer.running_var,
                           num_batches_tracked=int(layer.num_batches_tracked)
                           if layer.track_running_stats else 0)


def call(layer, x, z):
    return layer(x, z) if z is not None else layer(x)


def check_step(job, layer, activation, xs, dys, zs, ref, dtype, what, x_format=None,
               z_format=None):
    """One training step of layer on this rank's slices against ref on the global batch."""
    x, dy = xs[job.rank].clone(), dys[job.rank]
    z = zs[job.rank].clone() if zs is not None else None
    if x_format is not None:
        x = x.contiguous(memory_format=x_format)
    if z is not None and z_format is not None:
        z = z.contiguous(memory_format=z_format)
    x.requires_grad_(True)
    if z is not None:
        z.requires_grad_(True)
    y = call(layer, x, z)
    (y * dy).sum().backward()
    ys, dxs, dw, db, dzs = ref.train_step_act(xs, dys, activation, zs)
    assert y.dtype == dtype and y.shape == x.shape
    if x_format is not None:
        assert y.is_contiguous(memory_format=x_format), f"{what}: y's memory format"
    assert (y >= 0).all(), f"{what}: y has negative values"
    cut, kept = job.sum(torch.tensor([(y == 0).sum().item(), (y > 0).sum().item()]))
    assert cut > 0 and kept > 0, f"{what}: the batch does not test the activation"
    assert_close(y, ys[job.rank], dtype, f"{what}: y")
    assert_close(x.grad, dxs[job.rank], dtype, f"{what}: dx")
    if z is not None:
        assert_close(z.grad, dzs[job.rank], dtype, f"{what}: dz")
    count = sum(t.shape[0] * torch.Size(t.shape[2:]).numel() for t in xs)
    if layer.affine:
        sums = job.sum(torch.stack([layer.weight.grad, layer.bias.grad]))
        assert_close(sums[0], dw, dtype, f"{what}: sum of dweight", scale=count)
        assert_close(sums[1], db, dtype, f"{what}: sum of dbias", scale=count)
        layer.weight.grad = layer.bias.grad = None
    if layer.track_running_stats:
        assert_close(layer.running_mean, ref.running_mean, dtype, f"{what}: running_mean")
        assert_close(layer.running_var, ref.running_var, dtype, f"{what}: running_var")
        assert int(layer.num_batches_tracked) == ref.num_batches_tracked
    return y, x, z


@pytest.mark.parametrize("shape", SHAPES, ids=str)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("activation", ["relu", "add_relu"])
def test_fused_matches_torch(job, seed, activation, dtype, shape):
    """Two training steps and an evaluation step against torch.relu(bn(x) [+ z]) on the global
    batch. With channels_last, x is channels_last and z contiguous at the second step (z is
    copied into x's memory format, its gradient comes back in its own)."""
    layer = make_layer(activation, job.comm, seed, dtype)
    ref = reference_of(layer)
    shapes = [shape.shape(r) for r in range(job.size)]
    for step in range(2):
        xs = draw(seed + step, shapes, dtype, offset=step)
        dys = draw(seed + 1000 + step, shapes, dtype)
        zs = draw(seed + 2000 + step, shapes, dtype) if activation == "add_relu" else None
        if zs is not None:  # residuals around 0, so that relu cuts about half of y + z
            zs = [z - torch.arange(C, dtype=dtype).view([1, C] + [1] * (z.dim() - 2))
                  for z in zs]
        x_format = z_format = None
        if shape.channels_last:
            x_format = memory_format(xs[0])
            z_format = x_format if step == 0 else torch.contiguous_format
        what = f"{activation} {shape} {dtype}, step {step}, rank {job.rank}"
        check_step(job, layer, activation, xs, dys, zs, ref, dtype, what, x_format, z_format)
    layer.eval()
    shapes = [(s[0] + 4,) + s[1:] for s in shapes]  # around the running mean
    view = [1, C] + [1] * (len(shapes[0]) - 2)
    x = draw(seed + 99, shapes, dtype)[job.rank] - torch.arange(C, dtype=dtype).view(view) + \
        layer.running_mean.view(view)
    z = draw(seed + 98, shapes, dtype)[job.rank] - 1 if activation == "add_relu" else None
    if shape.channels_last:
        x = x.contiguous(memory_format=memory_format(x))
    with torch.no_grad():
        y = call(layer, x, z)
    assert_close(y, ref.eval_step_act(x, activation, z), dtype,
                 f"{activation} {shape}, eval, rank {job.rank}")
    if shape.channels_last:
        assert y.is_contiguous(memory_format=memory_format(x))
    cut, kept = job.sum(torch.tensor([(y == 0).sum().item(), (y > 0).sum().item()]))
    assert cut > 0 and kept > 0, "the evaluation batch does not test the activation"


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["fp32", "fp64"])
@pytest.mark.parametrize("activation", ["relu", "add_relu"])
def test_outputs_exactly_zero_have_zero_gradient(job, seed, activation, dtype):
    """relu'(0) = 0, as torch's: channel 0 is constant over the global batch (2.0: it normalizes
    to exactly 0) with bias 0, channel 1 has weight 0 and bias 0, so bn(x) is exactly 0 there
    (and with add_relu, z is 0 at every other element and negative or positive elsewhere):
    y is exactly 0 there and its gradient does not reach x, z, weight or bias (dx of channel
    0 is 0, not weight * invstd * (dy - mean dy); dbias of both channels 0, not sum dy)."""
    layer = make_layer(activation, job.comm, seed, dtype)
    with torch.no_grad():
        layer.bias[:2] = 0
        layer.weight[1] = 0
    ref = reference_of(layer)
    shapes = [(r + 2, C, 4) for r in range(job.size)]
    xs = draw(seed, shapes, dtype)
    for x in xs:
        x[:, 0] = 2.0
    dys = [d + 1 for d in draw(seed + 1, shapes, dtype)]  # mostly positive: sum dy is not 0
    zs = None
    if activation == "add_relu":
        zs = draw(seed + 2, shapes, dtype)
        for z in zs:
            z[:, :2, ::2] = 0.0
    y, x, z = check_step(job, layer, activation, xs, dys, zs, ref, dtype,
                         f"{activation} {dtype}, rank {job.rank}")
    zero = torch.zeros_like(y, dtype=torch.bool)
    zero[:, :2] = True if zs is None else (z[:, :2] <= 0)
    assert torch.equal(y[zero], torch.zeros_like(y[zero])), "bn(x) [+ z] == 0 is not exactly 0"
    if zs is None:
        assert torch.equal(x.grad[:, 0], torch.zeros_like(x.grad[:, 0])), "dx of channel 0"
    else:
        assert torch.equal(z.grad[zero], torch.zeros_like(z.grad[zero])), "dz where y == 0"


@pytest.mark.parametrize("activation", ["relu", "add_relu"])
def test_output_changed_in_place_keeps_its_gradient(job, seed, activation):
    """Backward reads the mask the forward wrote, not y: y changed in place after the forward
    (y += 1 turns its zeros positive) leaves the gradients those of relu(bn(x) [+ z]), where a
    saved y would make autograd refuse the backward."""
    dtype = torch.float64
    layer = make_layer(activation, job.comm, seed, dtype)
    ref = reference_of(layer)
    shapes = [(r + 2, C, 4) for r in range(job.size)]
    xs = draw(seed, shapes, dtype)
    dys = draw(seed + 1000, shapes, dtype)
    zs = draw(seed + 2000, shapes, dtype) if activation == "add_relu" else None
    x = xs[job.rank].clone().requires_grad_(True)
    z = zs[job.rank].clone().requires_grad_(True) if zs is not None else None
    y = call(layer, x, z)
    cut = job.sum(torch.tensor([(y == 0).sum().item()]))[0]
    assert cut > 0, "the batch does not test the activation"
    y.add_(1.0)
    (y * dys[job.rank]).sum().backward()
    _, dxs, _, _, dzs = ref.train_step_act(xs, dys, activation, zs)
    what = f"{activation}, y changed in place, rank {job.rank}"
    assert_close(x.grad, dxs[job.rank], dtype, f"{what}: dx")
    if z is not None:
        assert_close(z.grad, dzs[job.rank], dtype, f"{what}: dz")


@pytest.mark.parametrize("activation", ["relu", "add_relu"])
def test_gradcheck_float64(activation):
    """torch.autograd.gradcheck of x, (z,) weight and bias through the autograd Function, on the
    self communicator, with and without running statistics."""
    torch.manual_seed(5)
    for track in (True, False):
        layer = CLASSES[activation](2, track_running_stats=track, dtype=torch.float64,
                                    communicator=syncbn.Communicator.self())
        x = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
        z = torch.randn(3, 2, 4, dtype=torch.float64, requires_grad=True)
        w = (torch.rand(2, dtype=torch.float64) + 0.5).requires_grad_()
        b = torch.randn(2, dtype=torch.float64, requires_grad=True)
        key, plan, param_dtype, problem = layer._plan_set(layer._communicator(), x).pick(
            x, syncbn._capi.CHANNELS_FIRST)
        assert problem is None and plan.config.activation == layer._activation

        if activation == "add_relu":
            def fn(x, z, w, b):
                return sbt._Function.apply(x, z, w, b, layer, key, plan, param_dtype,
                                           layer._activation)
            inputs = (x, z, w, b)
        else:
            def fn(x, w, b):
                return sbt._Function.apply(x, None, w, b, layer, key, plan, param_dtype,
                                           layer._activation)
            inputs = (x, w, b)
        assert torch.autograd.gradcheck(fn, inputs)


@pytest.mark.parametrize("activation", ["relu", "add_relu"])
def test_eval_applies_the_activation(job, seed, activation):
    """Evaluation with running statistics, with the rank's own batch statistics
    (track_running_stats=False), and with autograd (torch's batch norm, then the activation):
    relu(bn(x) [+ z]) each time; with autograd z gets its gradient."""
    for track in (True, False):
        layer = make_layer(activation, job.comm, seed, torch.float32, track_running_stats=track)
        shapes = [(2, C, 3, 2)] * job.size
        first = draw(seed, shapes, torch.float32)[job.rank]
        call(layer, first, first if activation == "add_relu" else None)  # a training step first
        layer.eval()
        ref = reference_of(layer)
        x = draw(seed + 1, shapes, torch.float32)[job.rank]
        z = draw(seed + 2, shapes, torch.float32)[job.rank] if activation == "add_relu" else None
        want = ref.eval_step_act(x, activation, z)
        with torch.no_grad():
            assert_close(call(layer, x, z), want, torch.float32, f"eval, track={track}")
        if z is not None:
            z.requires_grad_(True)
        x.requires_grad_(True)
        y = call(layer, x, z)
        assert_close(y, want, torch.float32, f"eval with autograd, track={track}")
        y.sum().backward()
        if z is not None:
            assert torch.equal(z.grad, (y > 0).to(z.dtype)), "eval dz"
            for bad in (None, z[:, :, :1].detach()):  # refused, as the library refuses it
                with pytest.raises(syncbn.SyncBNError, match="z"):
                    layer(x, bad)


@pytest.mark.parametrize("case", ["shape", "dtype", "device", "none"])
def test_bad_z_on_one_rank_raises_everywhere(job, case):
    """A residual z of another shape, dtype or device than x, or none at all, on the last rank
    only: every rank raises SyncBNError INVALID_ARGUMENT naming that rank and z, nothing
    changes, and the layer still works."""
    layer = sbt.SyncBatchNormAddReLU(C, communicator=job.comm)
    before = copy.deepcopy(layer.state_dict())
    x = torch.randn(2, C, 4)
    bad = {"shape": torch.randn(2, C, 5), "dtype": torch.randn(2, C, 4, dtype=torch.float64),
           "device": torch.empty(2, C, 4, device="meta"), "none": None}[case]
    last = job.size - 1
    z = bad if job.rank == last else torch.randn(2, C, 4)
    with pytest.raises(syncbn.SyncBNError) as error:
        layer(x, z)
    assert error.value.status == syncbn.Status.INVALID_ARGUMENT
    assert f"rank {last}: z" in error.value.message, error.value.message
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    layer(x, torch.randn(2, C, 4)).sum().backward()
    assert int(layer.num_batches_tracked) == 1


def test_plain_layer_has_no_activation(job):
    """SyncBatchNorm's plans are made with SYNCBN_ACTIVATION_NONE and take one input."""
    layer = sbt.SyncBatchNorm(C, communicator=job.comm)
    layer(torch.randn(2, C))
    assert all(p.config.activation == syncbn._capi.ACTIVATION_NONE
               for p, _ in layer._plans.plans.values())
    fused = sbt.SyncBatchNormReLU(C, communicator=job.comm)
    fused(torch.randn(2, C))
    assert all(p.config.activation == syncbn._capi.ACTIVATION_RELU
               for p, _ in fused._plans.plans.values())
    with pytest.raises(TypeError):
        sbt.SyncBatchNormAddReLU(C, communicator=job.comm)(torch.randn(2, C))


def test_state_dict_is_batch_norms(job):
    for cls in CLASSES.values():
        ours, theirs = cls(4, communicator=job.comm), torch.nn.BatchNorm2d(4)
        with torch.no_grad():
            for t in theirs.state_dict().values():
                if t.is_floating_point():
                    t.copy_(torch.randn_like(t))
        assert list(ours.state_dict()) == list(theirs.state_dict())
        ours.load_state_dict(theirs.state_dict())
        for k, v in theirs.state_dict().items():
            assert torch.equal(ours.state_dict()[k], v), k
        assert isinstance(ours, sbt.SyncBatchNorm) and cls.__name__ in sbt.__all__


class BatchNormAct2d(torch.nn.BatchNorm2d):
    """timm's convention: batch norm, then self.drop, then self.act."""

    def __init__(self, num_features, act=None, drop=None, with_drop=True):
        super().__init__(num_features)
        if with_drop:
            self.drop = drop if drop is not None else torch.nn.Identity()
        self.act = act if act is not None else torch.nn.ReLU(inplace=True)

    def forward(self, x):
        x = super().forward(x)
        return self.act(self.drop(x) if hasattr(self, "drop") else x)


def test_convert_batch_norm_act2d(seed):
    """BatchNormAct2d with a ReLU (and drop an Identity, or no drop) becomes a SyncBatchNormReLU
    with the same Parameter objects, buffers and training flag, computing what it computed;
    with another activation or a real dropout it is refused as before."""
    comm = syncbn.Communicator.self()
    for with_drop in (True, False):
        torch.manual_seed(seed)
        model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1),
                                    BatchNormAct2d(3, with_drop=with_drop))
        with torch.no_grad():
            model[1].bias.uniform_(-1, 1)
            model[1].weight.uniform_(0.5, 1.5)
        model[1].weight.requires_grad_(False)
        original = copy.deepcopy(model)
        bn = model[1]
        tensors = (bn.weight, bn.bias, bn.running_mean, bn.running_var, bn.num_batches_tracked)
        converted = sbt.convert_sync_batchnorm(model, communicator=comm)
        layer = converted[1]
        assert type(layer) is sbt.SyncBatchNormReLU and layer.communicator is comm
        assert (layer.weight, layer.bias, layer.running_mean, layer.running_var,
                layer.num_batches_tracked) == tensors
        assert not layer.weight.requires_grad and layer.training and layer.name == "1"
        assert not hasattr(layer, "act") and not hasattr(layer, "drop")
        x = draw(seed, [(4, 2, 3, 3)], torch.float32)[0]
        for train in (True, False):
            converted.train(train)
            original.train(train)
            with torch.no_grad():
                want, got = original(x), converted(x)
            assert_close(got, want, torch.float32, f"converted, train={train}")
            assert_close(layer.running_var, original[1].running_var, torch.float32,
                         "running_var")
    for bad in (BatchNormAct2d(3, act=torch.nn.GELU()),
                BatchNormAct2d(3, act=torch.nn.Identity()),
                BatchNormAct2d(3, drop=torch.nn.Dropout(0.1))):
        with pytest.raises(TypeError, match="BatchNormAct2d overrides forward"):
            sbt.convert_sync_batchnorm(torch.nn.Sequential(bad), communicator=comm)

    class BatchNormAct1d(torch.nn.BatchNorm1d):  # not a BatchNorm2d: not timm's convention
        def __init__(self, n):
            super().__init__(n)
            self.act = torch.nn.ReLU()

        def forward(self, x):
            return self.act(super().forward(x))

    with pytest.raises(TypeError, match="overrides forward"):
        sbt.convert_sync_batchnorm(BatchNormAct1d(3), communicator=comm)


class Block(torch.nn.Module):
    """relu(bn2(relu(bn1(x))) + x), the fused way and torch's way."""

    def __init__(self, comm=None):
        super().__init__()
        if comm is None:
            self.bn1 = torch.nn.BatchNorm2d(C, dtype=torch.float64)
            self.bn2 = torch.nn.BatchNorm2d(C, dtype=torch.float64)
        else:
            self.bn1 = sbt.SyncBatchNormReLU(C, communicator=comm, dtype=torch.float64)
            self.bn2 = sbt.SyncBatchNormAddReLU(C, communicator=comm, dtype=torch.float64)
        self.fused = comm is not None

    def forward(self, x):
        if self.fused:
            return self.bn2(self.bn1(x), x)
        return torch.relu(self.bn2(torch.relu(self.bn1(x))) + x)


@pytest.mark.ranks(2)
def test_shadow_step_of_fused_layers(job, seed):
    """Join's replay with empty batches (N = 0: x, z, y, dz all NULL) through fused layers: every
    rank trains step 0, rank 0 alone trains step 1 while the others call shadow_step(); running
    statistics equal torch's over the global batch, then rank 0's, on every rank."""
    block, reference = Block(job.comm), Block()
    joinable = sbt.SyncBatchNormJoinable(block)
    shapes = [(2, C, 2, 3)] * job.size
    for step in range(2):
        xs = draw(seed + step, shapes, torch.float64)
        if step == 0 or job.rank == 0:
            block(xs[job.rank].requires_grad_()).sum().backward()
        else:
            joinable.shadow_step()
        reference(torch.cat(xs if step == 0 else xs[:1])).sum().backward()
        for name in ("bn1", "bn2"):
            ours, theirs = getattr(block, name), getattr(reference, name)
            for what in ("running_mean", "running_var"):
                assert_close(getattr(ours, what), getattr(theirs, what), torch.float64,
                             f"step {step}, {name}.{what}")
            assert int(ours.num_batches_tracked) == step + 1
