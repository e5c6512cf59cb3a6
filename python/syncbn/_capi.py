"""libsyncbn's C API through ctypes: the library, its prototypes, its enumerations and errors.

The one place where Python meets the C library. Nothing here knows torch: syncbn.comm builds
communicators on it and syncbn.torch builds the PyTorch layer on it. The contracts (shapes,
dtypes, errors) are those of include/syncbn/syncbn.h, which each wrapper names.
"""

import ctypes
import enum
import functools
import os
import threading

__all__ = ["Status", "SyncBNError", "Plan", "Config", "ForwardArgs", "BackwardArgs", "lib", "check",
           "library_path"]


class Status(enum.IntEnum):
    """syncbn_status_t."""

    SUCCESS = 0
    INVALID_ARGUMENT = 1
    CONFIG_MISMATCH = 2
    CALL_MISMATCH = 3
    BATCH_TOO_SMALL = 4
    NOT_SUPPORTED = 5
    COMM = 6
    OUT_OF_MEMORY = 7
    INTERNAL = 8
    TIMEOUT = 9
    COMM_BROKEN = 10


class SyncBNError(RuntimeError):
    """A syncbn call failed. ``status`` is the :class:`Status`, ``message`` the library's text
    (for collective calls the same on every rank of the group: "rank 2: weight is null")."""

    def __init__(self, status, message):
        self.status = Status(status)
        self.message = message
        super().__init__(f"SYNCBN_ERROR_{self.status.name}: {message}")


# syncbn_dtype_t, syncbn_layout_t, syncbn_device_t, syncbn_activation_t, syncbn_call_t,
# syncbn_problem_t
FLOAT32, FLOAT64, FLOAT16, BFLOAT16 = 0, 1, 2, 3
CHANNELS_FIRST, CHANNELS_LAST = 0, 1
DEVICE_CPU, DEVICE_CUDA = 0, 1
ACTIVATION_NONE, ACTIVATION_RELU, ACTIVATION_ADD_RELU = 0, 1, 2
CALL_FORWARD_TRAINING, CALL_FORWARD_INFERENCE, CALL_BACKWARD = 1, 2, 3
PROBLEM_DTYPE, PROBLEM_DEVICE, PROBLEM_LAYOUT, PROBLEM_SHAPE = 1, 2, 3, 4
MOMENTUM_CUMULATIVE = float("nan")


class Config(ctypes.Structure):
    """syncbn_config_t."""

    _fields_ = [
        ("num_features", ctypes.c_int64),
        ("dtype", ctypes.c_int),
        ("layout", ctypes.c_int),
        ("device", ctypes.c_int),
        ("eps", ctypes.c_double),
        ("momentum", ctypes.c_double),
        ("affine", ctypes.c_int),
        ("track_running_stats", ctypes.c_int),
        ("global_param_grads", ctypes.c_int),
        ("activation", ctypes.c_int),  # syncbn_activation_t (since 0.4)
    ]


_p = ctypes.c_void_p


class ForwardArgs(ctypes.Structure):
    """syncbn_forward_args_t: the arguments of syncbn_forward_training_ex and
    syncbn_forward_inference_ex (ctypes zero-initializes it: every field NULL until set)."""

    _fields_ = [
        ("ndim", ctypes.c_int),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("x", _p),
        ("z", _p),
        ("weight", _p),
        ("bias", _p),
        ("y", _p),
        ("save_mean", _p),
        ("save_invstd", _p),
        ("running_mean", _p),
        ("running_var", _p),
        ("num_batches_tracked", _p),  # int64_t*
        ("stream", _p),
        ("mask", _p),  # since 0.5
    ]


class BackwardArgs(ctypes.Structure):
    """syncbn_backward_args_t: the arguments of syncbn_backward_ex."""

    _fields_ = [
        ("ndim", ctypes.c_int),
        ("shape", ctypes.POINTER(ctypes.c_int64)),
        ("x", _p),
        ("y", _p),
        ("dy", _p),
        ("weight", _p),
        ("save_mean", _p),
        ("save_invstd", _p),
        ("dx", _p),
        ("dz", _p),
        ("dweight", _p),
        ("dbias", _p),
        ("stream", _p),
        ("mask", _p),  # since 0.5
    ]


_status = ctypes.c_int
ALLREDUCE_FN = ctypes.CFUNCTYPE(ctypes.c_int, _p, ctypes.c_size_t, ctypes.c_int, _p, _p)
SPLIT_FN = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.c_int, _p, ctypes.POINTER(_p))
RELEASE_FN = ctypes.CFUNCTYPE(None, _p)


def library_path():
    """Where libsyncbn is: $SYNCBN_LIBRARY, else the copy installed inside this package."""
    env = os.environ.get("SYNCBN_LIBRARY")
    if env:
        return env
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_lib")
    for name in ("libsyncbn.so", "libsyncbn.dylib", "syncbn.dll"):
        path = os.path.join(here, name)
        if os.path.exists(path):
            return path
    raise ImportError(
        f"libsyncbn was not found in {here}: install syncbn with pip from the repository root "
        "(pip install .), which builds the library into the package, or set SYNCBN_LIBRARY to "
        "the path of a libsyncbn.so")


def _load():
    lib = ctypes.CDLL(library_path())
    protos = {
        "syncbn_status_string": (ctypes.c_char_p, [ctypes.c_int]),
        "syncbn_last_error": (ctypes.c_char_p, []),
        "syncbn_get_version": (_status, [ctypes.POINTER(ctypes.c_int)]),
        "syncbn_config_init": (_status, [ctypes.POINTER(Config), ctypes.c_int64, ctypes.c_int]),
        "syncbn_comm_create_self": (_status, [ctypes.POINTER(_p)]),
        "syncbn_comm_create_custom": (_status, [ctypes.c_int, ctypes.c_int, ALLREDUCE_FN,
                                                SPLIT_FN, RELEASE_FN, _p, ctypes.POINTER(_p)]),
        "syncbn_comm_split": (_status, [_p, ctypes.c_int, ctypes.POINTER(_p)]),
        "syncbn_comm_destroy": (_status, [_p]),
        "syncbn_comm_rank": (_status, [_p, ctypes.POINTER(ctypes.c_int)]),
        "syncbn_comm_size": (_status, [_p, ctypes.POINTER(ctypes.c_int)]),
        "syncbn_comm_set_timeout": (_status, [_p, ctypes.c_double]),
        "syncbn_comm_get_timeout": (_status, [_p, ctypes.POINTER(ctypes.c_double)]),
        "syncbn_comm_abort": (_status, [_p]),
        "syncbn_plan_set_name": (_status, [_p, ctypes.c_char_p]),
        "syncbn_plan_create": (_status, [_p, ctypes.POINTER(Config), ctypes.POINTER(_p)]),
        "syncbn_plan_destroy": (_status, [_p]),
        "syncbn_plan_get_async_error": (_status, [_p, _p, ctypes.POINTER(ctypes.c_int)]),
        "syncbn_forward_training_ex": (_status, [_p, ctypes.POINTER(ForwardArgs)]),
        "syncbn_forward_inference_ex": (_status, [_p, ctypes.POINTER(ForwardArgs)]),
        "syncbn_backward_ex": (_status, [_p, ctypes.POINTER(BackwardArgs)]),
        "syncbn_plan_reject_call": (_status, [_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_int,
                                              ctypes.c_char_p, _p]),
    }
    for name, (restype, argtypes) in protos.items():
        fn = getattr(lib, name)
        fn.restype = restype
        fn.argtypes = argtypes
    return lib


lib = _load()


def library_version():
    """The loaded libsyncbn's version, "MAJOR.MINOR.PATCH" (syncbn_get_version)."""
    code = ctypes.c_int(0)
    if lib.syncbn_get_version(ctypes.byref(code)) != 0:
        raise ImportError("syncbn_get_version failed")
    return f"{code.value // 10000}.{code.value // 100 % 100}.{code.value % 100}"

# A Python exception raised inside a callback (a custom communicator's allreduce or split) on
# this thread: the callback returns an error code to C, and check() raises it, chained.
_pending = threading.local()


def set_pending(exc):
    _pending.error = exc


def check(status):
    """Raises SyncBNError for a status other than SUCCESS, with syncbn_last_error() (call it
    right after the C call, on the same thread)."""
    pending = getattr(_pending, "error", None)
    _pending.error = None
    if status == 0:
        return
    error = SyncBNError(status, lib.syncbn_last_error().decode(errors="replace"))
    if pending is not None:
        raise error from pending
    raise error


@functools.lru_cache(maxsize=64)
def _shape_type(ndim):
    return ctypes.c_int64 * ndim


def shape_array(shape):
    return _shape_type(len(shape))(*shape)


class Plan:
    """A syncbn_plan_t: one layer's validated configuration on a communicator. Creation is
    COLLECTIVE over the communicator (syncbn_plan_create). Data arguments are addresses (ints,
    0 for NULL) of memory in the plan's dtype and layout; parameters and statistics of the
    parameter type (float32, or float64 for FLOAT64 data)."""

    def __init__(self, comm, config):
        self.comm = comm  # keeps the communicator (and its callbacks) alive
        self.config = config
        handle = _p()
        check(lib.syncbn_plan_create(comm.handle, ctypes.byref(config), ctypes.byref(handle)))
        self.handle = handle

    def __del__(self):
        handle, self.handle = getattr(self, "handle", None), None
        if handle:
            lib.syncbn_plan_destroy(handle)

    def set_name(self, name):
        """syncbn_plan_set_name: every message of this plan's calls starts with name."""
        check(lib.syncbn_plan_set_name(self.handle, (name or "").encode()))

    # The calls, by name: every layer (whatever its activation) goes through the _ex functions.
    # Arguments are addresses (int) or None for NULL; fields not given stay NULL.

    def forward_training(self, shape, **args):
        """syncbn_forward_training_ex (COLLECTIVE). args: the fields of syncbn_forward_args_t
        (x, z, weight, bias, y, save_mean, save_invstd, running_mean, running_var,
        num_batches_tracked, stream, mask)."""
        a = _args(ForwardArgs, shape, args)
        check(lib.syncbn_forward_training_ex(self.handle, ctypes.byref(a)))

    def forward_inference(self, shape, **args):
        """syncbn_forward_inference_ex (local): x, z, weight, bias, running_mean, running_var,
        y, stream."""
        a = _args(ForwardArgs, shape, args)
        check(lib.syncbn_forward_inference_ex(self.handle, ctypes.byref(a)))

    def backward(self, shape, **args):
        """syncbn_backward_ex (COLLECTIVE): x, y or mask, dy, weight, save_mean, save_invstd, dx,
        dz, dweight, dbias, stream."""
        a = _args(BackwardArgs, shape, args)
        check(lib.syncbn_backward_ex(self.handle, ctypes.byref(a)))

    def reject_call(self, call, argument, problem, detail, stream):
        """syncbn_plan_reject_call: always raises SyncBNError (on every rank of the group for
        forward training and backward)."""
        check(lib.syncbn_plan_reject_call(self.handle, call, argument.encode(), problem,
                                          detail.encode(), stream))
        raise SyncBNError(Status.INTERNAL, "syncbn_plan_reject_call returned SYNCBN_SUCCESS")

    def async_error(self, stream):
        """syncbn_plan_get_async_error: raises the error the device recorded, if any."""
        status = ctypes.c_int(0)
        check(lib.syncbn_plan_get_async_error(self.handle, stream, ctypes.byref(status)))
        check(status.value)


def _args(struct, shape, fields):
    """A ForwardArgs or BackwardArgs for shape with the given fields (addresses, None: NULL).
    The shape array is kept on the struct, alive for the call."""
    a = struct(**fields)
    a._shape = shape_array(shape)
    a.ndim = len(shape)
    a.shape = ctypes.cast(a._shape, ctypes.POINTER(ctypes.c_int64))
    return a


def make_config(num_features, dtype, layout, device, eps, momentum, affine, track,
                activation=ACTIVATION_NONE):
    """A syncbn_config_t from syncbn_config_init's defaults and the given fields."""
    config = Config()
    check(lib.syncbn_config_init(ctypes.byref(config), num_features, dtype))
    config.layout = layout
    config.device = device
    config.eps = eps
    config.momentum = MOMENTUM_CUMULATIVE if momentum is None else momentum
    config.affine = int(bool(affine))
    config.track_running_stats = int(bool(track))
    config.activation = activation
    return config
