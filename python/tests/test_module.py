"""syncbn.torch as a drop-in: checkpoints, convert_sync_batchnorm on torchvision's resnet18, one
DistributedDataParallel step equal to one process, errors on every rank for one rank's bad
input, evaluation on one rank alone, inputs without grad, double backward, .to() / .double()."""

import copy

import pytest
import torch
import torchvision

import syncbn
import syncbn.torch as sbt
from reference import GlobalBatchNorm, assert_close, draw


def test_state_dict_round_trips(job):
    """The same keys as BatchNorm2d and torch.nn.SyncBatchNorm, and checkpoints load both ways."""
    for track in (True, False):
        ours = sbt.SyncBatchNorm(4, track_running_stats=track, communicator=job.comm)
        theirs = [torch.nn.BatchNorm2d(4, track_running_stats=track),
                  torch.nn.SyncBatchNorm(4, track_running_stats=track)]
        for other in theirs:
            with torch.no_grad():
                for t in other.state_dict().values():
                    if t.is_floating_point():
                        t.copy_(torch.randn_like(t))
            assert list(ours.state_dict()) == list(other.state_dict())
            ours.load_state_dict(other.state_dict())
            for k, v in other.state_dict().items():
                assert torch.equal(ours.state_dict()[k], v), k
            again = type(other)(4, track_running_stats=track)
            again.load_state_dict(ours.state_dict())
            for k, v in ours.state_dict().items():
                assert torch.equal(again.state_dict()[k], v), k


def _resnet18():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=10)


def test_convert_resnet18_keeps_parameters_and_buffers(job):
    model = _resnet18()
    model.layer1[0].bn1.weight.requires_grad_(False)
    model.layer2.eval()
    before = {name: m for name, m in model.named_modules()
              if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    tensors = {name: (m.weight, m.bias, m.running_mean, m.running_var, m.num_batches_tracked,
                      m.training) for name, m in before.items()}
    converted = sbt.convert_sync_batchnorm(model, communicator=job.comm)
    after = {name: m for name, m in converted.named_modules()
             if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)}
    assert len(before) == 20 and set(after) == set(before)
    for name, m in after.items():
        assert type(m) is sbt.SyncBatchNorm, name
        w, b, rm, rv, nbt, training = tensors[name]
        assert m.weight is w and m.bias is b and m.running_mean is rm and m.running_var is rv
        assert m.num_batches_tracked is nbt and m.training == training, name
        assert m.communicator is job.comm
    assert not converted.layer1[0].bn1.weight.requires_grad
    # torch's own SyncBatchNorm converts too; syncbn's layers are kept as they are.
    model = torch.nn.SyncBatchNorm.convert_sync_batchnorm(_resnet18())
    converted = sbt.convert_sync_batchnorm(model)
    assert sum(type(m) is sbt.SyncBatchNorm for m in converted.modules()) == 20
    layer = sbt.SyncBatchNorm(3)
    assert sbt.convert_sync_batchnorm(layer) is layer


def test_convert_refuses_batch_norm_with_extra_behaviour():
    """A subclass whose forward adds an activation (timm's BatchNormAct2d) is not replaced by a
    plain batch norm (pytorch #187298: a model fell from 0.82 to 0.00 F1 that way)."""

    class BatchNormAct2d(torch.nn.BatchNorm2d):
        def forward(self, x):
            return torch.relu(super().forward(x))

    class Renamed(torch.nn.BatchNorm2d):  # only a name: converted
        pass

    with pytest.raises(TypeError, match="BatchNormAct2d overrides forward"):
        sbt.convert_sync_batchnorm(torch.nn.Sequential(torch.nn.Conv2d(1, 2, 1), BatchNormAct2d(2)))
    assert type(sbt.convert_sync_batchnorm(Renamed(2))) is sbt.SyncBatchNorm
    with pytest.raises(TypeError, match="lazy module"):
        sbt.convert_sync_batchnorm(torch.nn.LazyBatchNorm2d())


def test_ddp_step_equals_one_process(job, seed):
    """resnet18 with syncbn under DistributedDataParallel, one SGD step on 2 images of 64 x 64
    per rank, equals torch's resnet18 with BatchNorm2d on the concatenated batch in one process
    (float64; the last stage normalizes 2 x 2 maps of few images, which amplifies rounding, hence
    a tolerance of 1e-8 relative to the step)."""
    reference = _resnet18().double()
    model = sbt.convert_sync_batchnorm(copy.deepcopy(reference), communicator=job.comm)
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    shapes = [(2, 3, 64, 64)] * job.size
    images = draw(seed, shapes, torch.float64)
    labels = [torch.arange(2) + 2 * r for r in range(job.size)]
    for net, xs, ys in ((ddp, images[job.rank], labels[job.rank]),
                        (reference, torch.cat(images), torch.cat(labels))):
        optimizer = torch.optim.SGD(net.parameters(), lr=0.01)
        torch.nn.functional.cross_entropy(net(xs), ys).backward()
        optimizer.step()
    ours, theirs = dict(model.state_dict()), reference.state_dict()
    assert set(ours) == set(theirs)
    for name, want in theirs.items():
        torch.testing.assert_close(ours[name].double(), want.double(), rtol=1e-8, atol=1e-10,
                                   msg=lambda m: f"{name}: {m}")


def _bad_inputs(job):
    """(name, what this rank feeds a 3-channel float32 layer, words of the message)."""
    good = torch.randn(2 + job.rank, 3, 4)
    bad_rank = job.size - 1
    cases = [
        ("wrong_C", torch.randn(2, 4, 4), "shape: channel dimension differs from num_features"),
        ("wrong_dtype", torch.randn(2, 3, 4, dtype=torch.float64),
         "x is not of the plan's dtype"),
        ("wrong_device", torch.empty(2, 3, 4, device="meta"),
         "x is not in the memory of the plan's device"),
        ("one_dim", torch.randn(3), "ndim must be 2 to 5"),
        ("six_dims", torch.randn(1, 3, 1, 1, 1, 2), "ndim must be 2 to 5"),
    ]
    for name, bad, words in cases:
        yield name, bad if job.rank == bad_rank else good, f"rank {bad_rank}: " if words else "", words


@pytest.mark.parametrize("case", ["wrong_C", "wrong_dtype", "wrong_device", "one_dim", "six_dims"])
def test_bad_input_on_one_rank_raises_everywhere(job, case):
    layer = sbt.SyncBatchNorm(3, communicator=job.comm)
    before = copy.deepcopy(layer.state_dict())
    name, x, who, words = next(c for c in _bad_inputs(job) if c[0] == case)
    with pytest.raises(syncbn.SyncBNError) as error:
        layer(x)
    assert error.value.status == syncbn.Status.INVALID_ARGUMENT
    assert who in error.value.message and words in error.value.message, error.value.message
    for k, v in layer.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed"
    layer(torch.randn(2, 3, 4)).sum().backward()  # and the layer still works
    assert int(layer.num_batches_tracked) == 1


def test_nan_propagates_like_torch(job, seed):
    """NaN in one rank's input: the channel's statistics, y and running statistics are NaN on
    every rank, as torch's BatchNorm1d gives on the whole batch; nothing crashes."""
    shapes = [(3, 2)] * job.size
    xs = draw(seed, shapes, torch.float32)
    xs[job.size - 1][1, 0] = float("nan")
    layer = sbt.SyncBatchNorm(2, communicator=job.comm)
    y = layer(xs[job.rank])
    reference = torch.nn.BatchNorm1d(2)
    want = reference(torch.cat(xs))[3 * job.rank:3 * job.rank + 3]
    assert torch.equal(torch.isnan(y), torch.isnan(want))
    assert torch.equal(torch.isnan(layer.running_mean), torch.isnan(reference.running_mean))
    assert torch.isnan(layer.running_var[0]) and not torch.isnan(layer.running_var[1])
    assert_close(y[:, 1], want[:, 1], torch.float32, "y of the clean channel")


def test_eval_on_one_rank_alone_returns(job, seed):
    """Evaluation makes no collective: rank 0 evaluates alone (with and without running
    statistics, before any training call and after one), and everyone trains afterwards."""
    layers = [sbt.SyncBatchNorm(3, track_running_stats=t, communicator=job.comm) for t in (True, False)]
    x = draw(seed, [(4, 3, 5)], torch.float32)[0]
    for trained in (False, True):
        if job.rank == 0:
            for layer in layers:
                layer.eval()
                with torch.no_grad():
                    y = layer(x)
                ref = GlobalBatchNorm(3, 1e-5, 0.1, True, layer.track_running_stats,
                                      running_mean=layer.running_mean, running_var=layer.running_var)
                assert_close(y, ref.eval_step(x), torch.float32, "eval y")
                layer.train()
        for layer in layers:
            layer(torch.randn(2, 3, 5)).sum().backward()


def test_input_without_grad_and_frozen_layers(job):
    layer = sbt.SyncBatchNorm(3, communicator=job.comm)
    x = torch.randn(2, 3, 4)  # no grad: weight and bias still get theirs
    layer(x).sum().backward()
    assert layer.weight.grad is not None and layer.bias.grad is not None
    frozen = sbt.SyncBatchNorm(3, communicator=job.comm)
    frozen.requires_grad_(False)
    with torch.no_grad():  # training mode without autograd: statistics still advance
        y = frozen(x)
    assert not y.requires_grad and int(frozen.num_batches_tracked) == 1
    # Evaluation with grad (fine-tuning with frozen statistics) is differentiable, locally.
    layer.eval()
    x = torch.randn(2, 3, 4, requires_grad=True)
    layer(x).sum().backward()
    want = layer.weight / torch.sqrt(layer.running_var + layer.eps)
    assert_close(x.grad[0, :, 0], want.detach(), torch.float32, "eval dx")


def test_double_backward_is_a_clear_error():
    layer = sbt.SyncBatchNorm(2, communicator=syncbn.Communicator.self())
    x = torch.randn(4, 2, requires_grad=True)
    (g,) = torch.autograd.grad(layer(x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="once_differentiable"):
        g.sum().backward()


def test_to_double_and_back(job, seed):
    """A layer moved with .double() computes in float64 (new plans, made collectively at the
    next call), and again in float32 after .float()."""
    layer = sbt.SyncBatchNorm(3, communicator=job.comm)
    for dtype in (torch.float64, torch.float32):
        layer.to(dtype)
        shapes = [(2, 3, 3)] * job.size
        xs = draw(seed, shapes, dtype)
        ref = GlobalBatchNorm(3, layer.eps, 0.1, True, True, running_mean=layer.running_mean,
                              running_var=layer.running_var,
                              num_batches_tracked=layer.num_batches_tracked)
        y = layer(xs[job.rank])
        ys, _, _, _ = ref.train_step(xs, [torch.zeros_like(x) for x in xs])
        assert y.dtype == dtype and layer.running_mean.dtype == dtype
        assert_close(y, ys[job.rank], dtype, f"y in {dtype}")
        assert_close(layer.running_var, ref.running_var, dtype, f"running_var in {dtype}")


def test_deepcopy_and_state(job):
    """copy.deepcopy of a trained layer (an EMA copy, say) makes its own plans and shares the
    communicator; the copy trains on its own."""
    layer = sbt.SyncBatchNorm(3, communicator=job.comm)
    layer(torch.randn(2, 3))
    twin = copy.deepcopy(layer)
    assert twin.communicator is job.comm and twin._plans is None
    twin(torch.randn(2, 3))
    assert int(twin.num_batches_tracked) == 2 and int(layer.num_batches_tracked) == 1
