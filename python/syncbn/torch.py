"""syncbn.torch: synchronized batch norm for PyTorch on syncbn's C library.

    model = syncbn.torch.convert_sync_batchnorm(model)                  # torch.distributed
    model = syncbn.torch.convert_sync_batchnorm(                        # or MPI under mpirun
        model, communicator=syncbn.Communicator.from_mpi4py())

SyncBatchNorm is torch.nn.SyncBatchNorm's signature and behaviour (a subclass of
torch.nn.modules.batchnorm._BatchNorm: the same parameters, buffers and state_dict keys), with
the statistics computed by syncbn (Ioffe & Szegedy 2015, Algorithm 1, over the group's global
batch): one allreduce of 2C + 18 float64 per forward and one per backward, whatever the number
of ranks (torch.nn.SyncBatchNorm allgathers P x (2C + 1) values), on CPU (float32, float64) and
CUDA (float16, bfloat16, float32, float64 data; float32 parameters for the 16-bit types).
Input (N, C), (N, C, L), (N, C, H, W) or (N, C, D, H, W), contiguous or in torch.channels_last /
channels_last_3d memory (no copy; the output keeps the input's strides); N may be 0 on any rank.

SyncBatchNormReLU (relu(bn(x))) and SyncBatchNormAddReLU (relu(bn(x) + z), z the residual) are
SyncBatchNorm with the activation fused into syncbn's passes (syncbn_activation_t): the same
statistics, allreduces, parameters and buffers, one read and write of the tensor fewer per op
than batch norm followed by separate ops. convert_sync_batchnorm maps timm's BatchNormAct2d with
a ReLU onto SyncBatchNormReLU.
"""

import math

import torch
import torch.nn.functional as F
from torch.autograd.function import once_differentiable
from torch.nn.modules.batchnorm import _BatchNorm

from . import _capi
from ._capi import SyncBNError, Status
from .comm import Communicator

try:  # torch.distributed is optional in some torch builds
    import torch.distributed as dist
    from torch.distributed.algorithms.join import Join, JoinHook, Joinable
except ImportError:  # pragma: no cover
    dist = None
    Join = JoinHook = Joinable = object

__all__ = ["SyncBatchNorm", "SyncBatchNormReLU", "SyncBatchNormAddReLU", "convert_sync_batchnorm",
           "SyncBatchNormJoinable", "check_async_errors", "init_process_group_mpi"]

_DTYPE_CODES = {torch.float32: _capi.FLOAT32, torch.float64: _capi.FLOAT64,
                torch.float16: _capi.FLOAT16, torch.bfloat16: _capi.BFLOAT16}


def _data_dtypes(param_dtype, device_type):
    """The data dtypes a layer with parameters of param_dtype takes (syncbn.h, "Dtypes")."""
    if param_dtype == torch.float64:
        return (torch.float64,)
    if device_type == "cuda":
        return (torch.float32, torch.float16, torch.bfloat16)
    return (torch.float32,)


def _address(t):
    return t.data_ptr() if t is not None else None


def _layout(x, hint):
    """x dense in one of syncbn's layouts, that layout, and whether x's strides alone decided it
    (then it becomes the layer's hint): channels-first if x is contiguous, channels-last if it
    is (N, *spatial, C) in memory, else a contiguous copy. When x is both (an empty tensor,
    C == 1, or spatial size 1: the same bytes either way), the strides decide where they can,
    else hint (the layer's last unambiguous layout) does, so that every rank picks the same
    plan."""
    if x.dim() <= 2:
        return x, _capi.CHANNELS_FIRST, False
    first = x.is_contiguous()
    last = x.movedim(1, -1).is_contiguous()
    if first and not last:
        return x, _capi.CHANNELS_FIRST, True
    if last and not first:
        return x, _capi.CHANNELS_LAST, True
    if not first:
        return x.contiguous(), _capi.CHANNELS_FIRST, True
    if x.shape[1] > 1 and math.prod(x.shape[2:]) > 1:  # empty: the strides still tell
        return x, _capi.CHANNELS_LAST if x.stride(1) == 1 else _capi.CHANNELS_FIRST, False
    return x, hint, False


def _shape(x, layout):
    """x's shape as the C API takes it: (N, C, *spatial) or (N, *spatial, C)."""
    shape = tuple(x.shape)
    if layout == _capi.CHANNELS_LAST and len(shape) > 2:
        return (shape[0],) + shape[2:] + (shape[1],)
    return shape


def _stream(device):
    if device.type == "cuda":
        return torch.cuda.current_stream(device).cuda_stream
    return None


class _PlanSet:
    """One layer's plans on one communicator: a plan per (data dtype, layout) the layer can
    meet. Plan creation is collective, so all of them are made at once, in a fixed order, on
    every rank alike, whatever each rank's input is; a call then picks the plan of its input,
    and ranks whose inputs disagree fail with SYNCBN_ERROR_CALL_MISMATCH instead of waiting."""

    def __init__(self, comm, num_features, key, name=None):
        param_dtypes, device, eps, momentum, affine, track, activation = key
        self.comm = comm
        self.key = key
        self.device = device
        self.plans = {}
        with _on_device(device):
            for param_dtype in param_dtypes:
                for dtype in _data_dtypes(param_dtype, device.type):
                    for layout in (_capi.CHANNELS_FIRST, _capi.CHANNELS_LAST):
                        config = _capi.make_config(
                            num_features, _DTYPE_CODES[dtype], layout,
                            _capi.DEVICE_CUDA if device.type == "cuda" else _capi.DEVICE_CPU,
                            eps, momentum, affine, track, activation)
                        plan = _capi.Plan(comm, config)
                        if name:
                            plan.set_name(name)
                        self.plans[(dtype, layout)] = (plan, param_dtype)
        self.default_dtype = _data_dtypes(param_dtypes[0], device.type)[0]

    def pick(self, x, layout):
        """The key (data dtype, layout) of x's plan, the plan, its parameter dtype, and what is
        wrong with x if the layer cannot take it: None, or (argument, problem, detail) for
        syncbn_plan_reject_call, with the key of the plan to reject the call on."""
        key = (x.dtype, layout)
        if x.device != self.device:
            problem = ("x", _capi.PROBLEM_DEVICE, f"x is on {x.device}, the layer on {self.device}")
        elif key not in self.plans:
            takes = sorted(set(str(d) for d, _ in self.plans))
            problem = ("x", _capi.PROBLEM_DTYPE, f"x is {x.dtype}, the layer takes {takes}")
        else:
            return key, self.plans[key][0], self.plans[key][1], None
        key = (self.default_dtype, layout)
        return key, self.plans[key][0], self.plans[key][1], problem

    def async_errors(self):
        for plan, _ in self.plans.values():
            plan.async_error(_stream(self.device))


class _on_device:
    """Makes a CUDA device current (CUDA plans are made and called on their device)."""

    def __init__(self, device):
        self.guard = torch.cuda.device(device) if device.type == "cuda" else None

    def __enter__(self):
        if self.guard is not None:
            self.guard.__enter__()

    def __exit__(self, *exc):
        if self.guard is not None:
            self.guard.__exit__(*exc)


class _Function(torch.autograd.Function):
    """One syncbn forward (training) and, in backward, one syncbn backward, through the named-
    argument calls (syncbn_forward_training_ex, syncbn_backward_ex) for every layer: activation
    is the plan's (_capi.ACTIVATION_*), z the residual (ADD_RELU; None otherwise). With an
    activation the forward also writes the relu's mask y > 0 (a torch.bool per element, in x's
    memory format), saved for backward, which applies it to dy (relu'(0) = 0, as torch's
    threshold_backward): a quarter of y's bytes (fp32) read instead of y."""

    @staticmethod
    def forward(ctx, x, z, weight, bias, layer, key, plan, param_dtype, activation):
        layout = key[1]
        shape = _shape(x, layout)
        C = layer.num_features
        y = torch.empty_like(x)  # dense x: y gets its strides, so its memory format
        save_mean = torch.empty(C, dtype=param_dtype, device=x.device)
        save_invstd = torch.empty(C, dtype=param_dtype, device=x.device)
        running_mean, running_var, num_batches_tracked = layer._running_statistics()
        fused = activation != _capi.ACTIVATION_NONE
        mask = torch.empty_like(x, dtype=torch.bool) if fused else None
        with _on_device(x.device):
            plan.forward_training(
                shape, x=x.data_ptr(), z=_address(z), weight=_address(weight),
                bias=_address(bias), y=y.data_ptr(), save_mean=save_mean.data_ptr(),
                save_invstd=save_invstd.data_ptr(), running_mean=running_mean,
                running_var=running_var, num_batches_tracked=num_batches_tracked,
                stream=_stream(x.device), mask=_address(mask))
        ctx.save_for_backward(x, weight, save_mean, save_invstd, mask)
        ctx.plan, ctx.key, ctx.layer = plan, key, layer
        ctx.activation = activation
        layer._record("forward", key)
        return y

    @staticmethod
    @once_differentiable
    def backward(ctx, dy):
        x, weight, save_mean, save_invstd, mask = ctx.saved_tensors
        if dy.stride() != x.stride():  # dy in x's layout (a copy only if it is not)
            dy = torch.empty_like(x).copy_(dy)
        dx = torch.empty_like(x)
        need_w = weight is not None and ctx.needs_input_grad[2]
        need_b = weight is not None and ctx.needs_input_grad[3]
        dweight = torch.empty_like(weight) if need_w else None
        dbias = torch.empty_like(weight) if need_b else None
        need_z = ctx.activation == _capi.ACTIVATION_ADD_RELU and ctx.needs_input_grad[1]
        dz = torch.empty_like(x) if need_z else None
        with _on_device(x.device):
            ctx.plan.backward(
                _shape(x, ctx.key[1]), x=x.data_ptr(), mask=_address(mask), dy=dy.data_ptr(),
                weight=_address(weight), save_mean=save_mean.data_ptr(),
                save_invstd=save_invstd.data_ptr(), dx=dx.data_ptr(), dz=_address(dz),
                dweight=_address(dweight), dbias=_address(dbias), stream=_stream(x.device))
        ctx.layer._record("backward", ctx.key)
        return ((dx if ctx.needs_input_grad[0] else None), dz, dweight, dbias,
                None, None, None, None, None)


class SyncBatchNorm(_BatchNorm):
    r"""Batch normalization over the global batch of a group of processes, computed by syncbn.

    torch.nn.SyncBatchNorm's signature and behaviour; parameters (weight = gamma, bias = beta)
    and buffers (running_mean, running_var, num_batches_tracked) as torch.nn.BatchNorm*d, so
    checkpoints load both ways. Training (Ioffe & Szegedy 2015, Alg. 1), per channel over the
    m = sum_r N_r * S_r values of every rank r of the group:

        mean = sum(x) / m,  var = sum(x^2) / m - mean^2  (biased, for normalizing)
        y = (x - mean) / sqrt(var + eps) * weight + bias
        running_mean = (1 - a) running_mean + a mean
        running_var  = (1 - a) running_var  + a var m / (m - 1)   (unbiased, global m)

    with a = momentum, or 1 / num_batches_tracked when momentum is None. weight.grad and
    bias.grad are this rank's own (as torch.nn.SyncBatchNorm): DistributedDataParallel's
    averaging then gives the global batch's gradient. Evaluation, as PyTorch: the running
    statistics, or with track_running_stats=False this rank's own batch statistics; no
    communication either way, so one rank may evaluate alone.

    Args: as torch.nn.SyncBatchNorm (num_features C, eps, momentum, affine,
        track_running_stats, process_group, device, dtype), and
        communicator: a syncbn.Communicator (from_mpi4py under mpirun: the fast path). Default:
            a communicator over process_group (torch.distributed's world when None), made at the
            first training call and shared by every layer on the same group.
    Input: (N, C, *spatial) with 0 to 3 spatial dims, contiguous or channels_last (see the
        module docstring), float32/float64 on CPU, float16/bfloat16/float32/float64 on CUDA.
    Raises: syncbn.SyncBNError, on every rank of the group, when any rank's input is wrong (C,
        dtype, device, ndim), the group's batch is empty, or ranks make different calls
        (CALL_MISMATCH: the layer then makes new plans at its next call). Running statistics
        are unchanged on every rank then.
    """

    # The activation fused into the layer's passes (syncbn_activation_t): the subclasses below
    # set it; every plan of the layer is made with it.
    _activation = _capi.ACTIVATION_NONE

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True,
                 track_running_stats=True, process_group=None, device=None, dtype=None,
                 communicator=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats,
                         device=device, dtype=dtype)
        self.process_group = process_group
        self.communicator = communicator
        self._plans = None        # _PlanSet on the group, made at the first training call
        self._local_plans = None  # _PlanSet on a self communicator, for evaluation
        self._layout_hint = _capi.CHANNELS_FIRST
        self._recorder = None     # SyncBatchNormJoinable
        # The layer's name in syncbn's messages ("plan 'layer1.0.bn1': forward_training call
        # #17: ..."): convert_sync_batchnorm sets the module's qualified name.
        self.name = None

    def _check_input_dim(self, input):
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")

    def __getstate__(self):  # copies and pickles drop the C plans; they are made again
        state = self.__dict__.copy()
        state["_plans"] = state["_local_plans"] = state["_recorder"] = None
        return state

    def _tracking(self):
        return self.track_running_stats and self.running_mean is not None

    def _running_statistics(self):
        """The addresses of running_mean, running_var and num_batches_tracked for a training
        forward (None each when the layer does not track them)."""
        if not self._tracking():
            return None, None, None
        return (_address(self.running_mean), _address(self.running_var),
                _address(self.num_batches_tracked))

    def _key(self, x):
        tensors = [t for t in (self.weight, self.running_mean) if t is not None]
        if tensors:
            param_dtypes, device = (tensors[0].dtype,), tensors[0].device
        else:  # neither parameters nor running statistics: the input decides the device
            param_dtypes, device = (torch.float32, torch.float64), x.device
        return (param_dtypes, device, float(self.eps), self.momentum, bool(self.affine),
                self._tracking(), self._activation)

    def _plan_set(self, comm, x):
        """The layer's plans on comm for x's parameters, made (collectively) at the first call
        and again whenever the layer moved (.to(), .double()) or its options changed."""
        key = self._key(x)
        plans = self._plans
        if plans is None or plans.key != key or plans.comm is not comm:
            self._plans = None
            plans = self._plans = _PlanSet(comm, self.num_features, key, self.name)
        return plans

    def _communicator(self):
        if self.communicator is not None:
            return self.communicator
        return _default_communicator(self.process_group)

    def _record(self, op, key):
        if self._recorder is not None:
            self._recorder._record(op, self, key)

    def forward(self, input):
        return self._forward(input, None)

    def _forward(self, x, z):
        """The one path of every layer: z is the residual of SyncBatchNormAddReLU, else None."""
        if self.training:
            return self._forward_training(x, z)
        return self._forward_eval(x, z)

    def _forward_training(self, x, z):
        plans = self._plan_set(self._communicator(), x)
        x, layout, settles = _layout(x, self._layout_hint)
        key, plan, param_dtype, problem = plans.pick(x, layout)
        if problem is None and z is not None:
            z, problem = _residual(x, z, plans.device)
        try:
            if problem is not None:
                with _on_device(plans.device):
                    plan.reject_call(_capi.CALL_FORWARD_TRAINING, *problem, _stream(plans.device))
            y = _Function.apply(x, z, self.weight, self.bias, self, key, plan, param_dtype,
                                self._activation)
        except SyncBNError as e:
            if e.status == Status.CALL_MISMATCH:  # the plans' sequences are out of step
                self._plans = None
            raise
        if settles:
            self._layout_hint = layout
        return y

    def _forward_eval(self, x, z):
        track = self.running_mean is not None
        needs_grad = torch.is_grad_enabled() and (x.requires_grad or any(
            p is not None and p.requires_grad for p in (self.weight, self.bias, z)))
        if needs_grad or (track and not self._tracking()):
            # Differentiable evaluation (fine-tuning with frozen statistics), or buffers kept
            # while track_running_stats was turned off: torch's own batch norm (and activation),
            # exactly.
            y = F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias,
                             not track, 0.0, self.eps)
            if self._activation == _capi.ACTIVATION_ADD_RELU:  # z as the C API would take it
                problem = _residual(x, z, x.device)[1] if z is not None else (
                    "z", None, "z is null: SyncBatchNormAddReLU takes the residual z")
                if problem is not None:
                    raise SyncBNError(Status.INVALID_ARGUMENT, problem[2])
                y = y + z
            return F.relu(y) if self._activation != _capi.ACTIVATION_NONE else y
        key = self._key(x)
        if self._local_plans is None or self._local_plans.key != key:
            self._local_plans = _PlanSet(_local_communicator(), self.num_features, key)
        x, layout, _ = _layout(x, self._layout_hint)
        _, plan, _, problem = self._local_plans.pick(x, layout)
        device = self._local_plans.device
        if problem is None and z is not None:
            z, problem = _residual(x, z, device)
        with _on_device(device):
            if problem is not None:
                plan.reject_call(_capi.CALL_FORWARD_INFERENCE, *problem, _stream(device))
            y = torch.empty_like(x)
            plan.forward_inference(
                _shape(x, layout), x=x.data_ptr(), z=_address(z), weight=_address(self.weight),
                bias=_address(self.bias), running_mean=_address(self.running_mean),
                running_var=_address(self.running_var), y=y.data_ptr(), stream=_stream(device))
        return y

    # ---- Join: shadowing a step with empty batches ------------------------------------------

    def _shadow(self, op, key):
        """The collective call op of the plan of key with an empty batch (N = 0): this rank
        contributes nothing, and the group's result, running statistics included, is the same
        on every rank."""
        plan, param_dtype = self._plans.plans[key]
        device, C = self._plans.device, self.num_features
        with _on_device(device):
            stream = _stream(device)
            if op == "forward":
                self._shadow_saved = (torch.empty(C, dtype=param_dtype, device=device),
                                      torch.empty(C, dtype=param_dtype, device=device))
                running_mean, running_var, num_batches_tracked = self._running_statistics()
                plan.forward_training(
                    (0, C), weight=_address(self.weight), bias=_address(self.bias),
                    save_mean=self._shadow_saved[0].data_ptr(),
                    save_invstd=self._shadow_saved[1].data_ptr(), running_mean=running_mean,
                    running_var=running_var, num_batches_tracked=num_batches_tracked,
                    stream=stream)
            else:
                save_mean, save_invstd = self._shadow_saved
                plan.backward((0, C), weight=_address(self.weight),
                              save_mean=save_mean.data_ptr(), save_invstd=save_invstd.data_ptr(),
                              stream=stream)


class SyncBatchNormReLU(SyncBatchNorm):
    r"""relu(SyncBatchNorm(x)), with the ReLU fused into syncbn's normalize pass (forward) and
    its mask into the backward passes (SYNCBN_ACTIVATION_RELU): the statistics, running
    statistics, parameters, buffers, state_dict keys, arguments and errors of SyncBatchNorm.
    Backward gates the output gradient with the mask y > 0 that the forward saved (a
    torch.bool per element; relu'(0) = 0, as torch's relu). Evaluation applies the ReLU too.
    convert_sync_batchnorm makes one from timm's BatchNormAct2d with a ReLU.

    Input: as SyncBatchNorm. Output: relu(bn(x)), x's shape, dtype and memory format.
    """

    _activation = _capi.ACTIVATION_RELU


class SyncBatchNormAddReLU(SyncBatchNorm):
    r"""relu(SyncBatchNorm(x) + z), z the residual (shortcut) input of a ResNet block, with the
    addition and the ReLU fused into syncbn's passes (SYNCBN_ACTIVATION_ADD_RELU): the
    statistics (of x alone), running statistics, parameters, buffers, state_dict keys,
    arguments and errors of SyncBatchNorm. z gets its gradient, dy * (y > 0), and so do x,
    weight and bias (through the batch norm of that). Evaluation applies the addition and ReLU.

        out = bn2(conv2(out), identity)          # was: bn2(conv2(out)) + identity, then relu

    forward(x, z): z of x's shape, dtype and device (any strides: copied into x's memory format
    where they differ); a rank whose z is not raises syncbn.SyncBNError on every rank of the
    group (INVALID_ARGUMENT, "rank R: z ...").
    """

    _activation = _capi.ACTIVATION_ADD_RELU

    def forward(self, input, z):
        return self._forward(input, z)


def _residual(x, z, device):
    """z in x's memory layout, and what is wrong with it for syncbn_plan_reject_call (None if
    nothing): another device, dtype or shape than x."""
    if z.device != device:
        return z, ("z", _capi.PROBLEM_DEVICE, f"z is on {z.device}, the layer on {device}")
    if z.dtype != x.dtype:
        return z, ("z", _capi.PROBLEM_DTYPE, f"z is {z.dtype}, x {x.dtype}")
    if z.shape != x.shape:
        return z, ("z", _capi.PROBLEM_SHAPE,
                   f"z has shape {tuple(z.shape)}, x {tuple(x.shape)}")
    if z.stride() != x.stride():  # z in x's layout (a copy only if it is not)
        z = torch.empty_like(x).copy_(z)
    return z, None


_default_comms = {}
_self_comm = []


def _default_communicator(process_group):
    """The communicator of every layer without one: over process_group (the world's duplicate
    when None), made once per group and shared."""
    key = process_group if process_group is not None else "world"
    comm = _default_comms.get(key)
    if comm is None:
        if dist is None or not dist.is_available() or not dist.is_initialized():
            raise SyncBNError(
                Status.INVALID_ARGUMENT,
                "syncbn.torch.SyncBatchNorm in training needs a group: initialize "
                "torch.distributed (init_process_group), or pass communicator= (e.g. "
                "syncbn.Communicator.from_mpi4py() under mpirun, syncbn.Communicator.self() "
                "for one process)")
        comm = Communicator.from_process_group(process_group)
        _default_comms[key] = comm
    return comm


def _local_communicator():
    if not _self_comm:
        _self_comm.append(Communicator.self())
    return _self_comm[0]


def init_process_group_mpi(backend="gloo", mpi_comm=None):
    """COLLECTIVE over mpi_comm (default mpi4py's MPI.COMM_WORLD): torch.distributed's default
    process group over the ranks of an mpirun job, for DistributedDataParallel and Join next to
    syncbn's own MPI communicator. Rank and world size are MPI's; the rendezvous is TCP at
    MASTER_ADDR:MASTER_PORT when set, else at 127.0.0.1 (every rank on one host) or rank 0's
    host name, on a port rank 0 finds free. Returns (rank, world_size)."""
    import os
    import socket

    from mpi4py import MPI

    comm = MPI.COMM_WORLD if mpi_comm is None else mpi_comm
    rank, size = comm.Get_rank(), comm.Get_size()
    hosts = comm.allgather(socket.gethostname())
    address = os.environ.get("MASTER_ADDR") or ("127.0.0.1" if len(set(hosts)) == 1 else hosts[0])
    port = os.environ.get("MASTER_PORT")
    if port is None and rank == 0:
        with socket.socket() as s:
            s.bind(("", 0))
            port = s.getsockname()[1]
    port = comm.bcast(port, root=0)
    dist.init_process_group(backend, init_method=f"tcp://{address}:{port}", rank=rank,
                            world_size=size)
    return rank, size


def check_async_errors(module):
    """Raises SyncBNError if a CUDA layer in module recorded an error on the device
    (syncbn_plan_get_async_error: synchronizes each layer's current stream). CUDA layers over
    NCCL or torch.distributed only find other ranks' bad input, call mismatches and empty
    global batches on the device; call this once per step where you synchronize anyway. A no-op
    for CPU layers."""
    for m in module.modules():
        if isinstance(m, SyncBatchNorm) and m._plans is not None:
            m._plans.async_errors()


# ---- convert_sync_batchnorm -----------------------------------------------------------------

_PLAIN_FORWARDS = {_BatchNorm.forward, torch.nn.SyncBatchNorm.forward, SyncBatchNorm.forward}


def convert_sync_batchnorm(module, process_group=None, communicator=None):
    """Replaces, in place where it can and as torch.nn.SyncBatchNorm.convert_sync_batchnorm
    does, every BatchNorm1d/2d/3d and torch.nn.SyncBatchNorm in module (and module itself) by a
    syncbn.torch.SyncBatchNorm holding the same Parameter objects (so requires_grad and
    optimizer state carry over) and buffers, with the same training flag. Returns the module.

    A batch norm with a built-in ReLU in timm's BatchNormAct2d convention (a BatchNorm2d
    subclass whose attribute act is a torch.nn.ReLU and whose attribute drop, if any, is a
    torch.nn.Identity) becomes a SyncBatchNormReLU, with its parameters and buffers (act and
    drop are not carried over: the ReLU is the layer's own now). Any other _BatchNorm subclass
    whose forward is not batch norm's (another activation, a dropout, or no activation at all
    in a subclass that overrides forward) is refused with TypeError rather than silently
    replaced by a plain batch norm; so is an uninitialized lazy batch norm (run one forward
    first). syncbn's own layers are kept as they are. Each new layer's name (SyncBatchNorm.name,
    the first words of its messages) is its qualified name in module ("layer1.0.bn1").
    """
    return _convert(module, process_group, communicator, "")


def _is_batch_norm_relu(module):
    """Whether module follows timm's BatchNormAct2d convention with a ReLU: a BatchNorm2d
    subclass with act a torch.nn.ReLU and drop a torch.nn.Identity or absent."""
    act, drop = getattr(module, "act", None), getattr(module, "drop", None)
    return (isinstance(module, torch.nn.BatchNorm2d) and type(act) is torch.nn.ReLU and
            (drop is None or type(drop) is torch.nn.Identity))


def _convert(module, process_group, communicator, qualified_name):
    out = module
    skip = ()  # children not carried over
    if isinstance(module, _BatchNorm) and not isinstance(module, SyncBatchNorm):
        cls = type(module)
        if isinstance(module, torch.nn.modules.lazy.LazyModuleMixin) and \
                module.has_uninitialized_params():
            raise TypeError(f"convert_sync_batchnorm: {cls.__name__} is a lazy module that has "
                            "not been initialized; run one forward pass before converting it")
        if cls.forward in _PLAIN_FORWARDS:
            new_cls = SyncBatchNorm
        elif _is_batch_norm_relu(module):
            new_cls, skip = SyncBatchNormReLU, ("act", "drop")
        else:
            raise TypeError(
                f"convert_sync_batchnorm: {cls.__module__}.{cls.__qualname__} overrides forward, "
                "so it does more than batch norm (an activation, say); replacing it by a plain "
                "SyncBatchNorm would drop that. Only a ReLU in timm's BatchNormAct2d convention "
                "(act a torch.nn.ReLU, drop a torch.nn.Identity or absent) becomes a "
                "SyncBatchNormReLU; replace it yourself, e.g. by SyncBatchNorm followed by its "
                "extra layers")
        out = new_cls(module.num_features, module.eps, module.momentum, module.affine,
                      module.track_running_stats, process_group, communicator=communicator)
        if module.affine:
            with torch.no_grad():
                out.weight = module.weight
                out.bias = module.bias
        out.running_mean = module.running_mean
        out.running_var = module.running_var
        out.num_batches_tracked = module.num_batches_tracked
        out.training = module.training
        if hasattr(module, "qconfig"):
            out.qconfig = module.qconfig
        out.name = qualified_name or cls.__name__
    for name, child in module.named_children():
        if name in skip:
            continue
        child_name = f"{qualified_name}.{name}" if qualified_name else name
        out.add_module(name, _convert(child, process_group, communicator, child_name))
    return out


# ---- uneven inputs: torch.distributed.algorithms.Join ---------------------------------------

class SyncBatchNormJoinable(Joinable):
    """Uneven inputs for the SyncBatchNorm layers of a model (torch.distributed.algorithms.Join).

        joinable = syncbn.torch.SyncBatchNormJoinable(ddp_model)
        with Join([joinable, ddp_model]):        # this joinable first
            for x, y in my_batches:              # as many as this rank has
                loss_fn(ddp_model(x), y).backward(); optimizer.step(); ...

    It records the synchronized calls of each training step (the forward and backward of every
    layer, in the order they happen), and a rank that has run out of data replays the last
    step's calls with empty batches while others still train, so that no rank waits for it;
    DistributedDataParallel's own join hook shadows its gradient allreduces alike. Running
    statistics stay identical on every rank. torch.nn.SyncBatchNorm cannot do this.

    module: the model, or its DistributedDataParallel wrapper, which must then have
        broadcast_buffers=False (syncbn's running statistics are identical on every rank by
        construction; DDP's broadcast in forward would wait for a rank that is replaying).
        The joinable must come before DDP in Join's list (it runs its replay first).
    process_group: the group of Join's own "who is still training" allreduce (default: the
        world); the layers communicate over their own communicators.
    shadow_step() replays one step by hand, for loops without Join (MPI-only trainers).
    """

    def __init__(self, module, process_group=None):
        super().__init__()
        from torch.nn.parallel import DistributedDataParallel

        self._ddp = module if isinstance(module, DistributedDataParallel) else None
        if self._ddp is not None and self._ddp.broadcast_buffers:
            raise ValueError(
                "SyncBatchNormJoinable: construct DistributedDataParallel with "
                "broadcast_buffers=False. syncbn keeps running statistics identical on every "
                "rank, and DDP's buffer broadcast at each forward would wait for a rank that "
                "has joined and is replaying synchronized batch norm calls")
        root = self._ddp.module if self._ddp is not None else module
        self._layers = [m for m in root.modules() if isinstance(m, SyncBatchNorm)]
        if not self._layers:
            raise ValueError("SyncBatchNormJoinable: the module has no syncbn.torch.SyncBatchNorm")
        for m in self._layers:
            m._recorder = self
        self._process_group = process_group
        tensors = [t for m in self._layers for t in (m.weight, m.running_mean) if t is not None]
        self._device = tensors[0].device if tensors else torch.device("cpu")
        self._current, self._last = [], []
        # On DDP itself if given: Join's "still training" allreduce must come before DDP's own
        # allreduces in its forward, in the order a joined rank makes them.
        self._hook = module.register_forward_pre_hook(self._pre_forward)

    def _pre_forward(self, module, inputs):
        if not (module.training and torch.is_grad_enabled()):
            return
        config = self._join_config
        if config.enable and not config.is_first_joinable:  # on every rank, before any collective
            raise RuntimeError("SyncBatchNormJoinable must come first in Join([...]) (before "
                               "DistributedDataParallel), so that its replay of synchronized "
                               "batch norm runs before DDP's shadow of the gradient allreduces")
        if self._current:  # a new step: the previous one is complete
            self._last, self._current = self._current, []
        work = Join.notify_join_context(self)
        if work is not None and self._ddp is not None:
            self._ddp.reducer._set_forward_pass_work_handle(
                work, self._ddp._divide_by_initial_world_size)

    def _record(self, op, layer, key):
        self._current.append((op, layer, key))

    def shadow_step(self):
        """Takes part in one training step of the other ranks with empty batches: the
        synchronized calls of the last step this rank made, in the same order (before any
        step: every layer's forward in module order, then the backwards in reverse)."""
        if self._current:
            self._last, self._current = self._current, []
        calls = self._last
        if not calls:
            for m in self._layers:
                if m._plans is None:
                    m._plans = _PlanSet(m._communicator(), m.num_features, m._key(
                        torch.empty(0, device=self._device)))
            key = {m: (m._plans.default_dtype, _capi.CHANNELS_FIRST) for m in self._layers}
            calls = [("forward", m, key[m]) for m in self._layers] + \
                    [("backward", m, key[m]) for m in reversed(self._layers)]
        for op, layer, key in calls:
            layer._shadow(op, key)
        self._current = []

    def join_hook(self, **kwargs):
        return _ShadowHook(self)

    @property
    def join_device(self):
        backend = dist.get_backend(self.join_process_group)
        return self._device if backend == "nccl" else torch.device("cpu")

    @property
    def join_process_group(self):
        return self._process_group if self._process_group is not None else dist.group.WORLD


class _ShadowHook(JoinHook):
    def __init__(self, joinable):
        self.joinable = joinable

    def main_hook(self):
        self.joinable.shadow_step()
