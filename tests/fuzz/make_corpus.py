#!/usr/bin/python3
"""Writes the seed corpus of tests/fuzz/fuzz_c_api.cpp into tests/fuzz/corpus/.

    /usr/bin/python3 tests/fuzz/make_corpus.py [output directory]

Each seed is a program in the target's encoding (see the comments in fuzz_c_api.cpp, which this
file mirrors operation by operation): full valid sequences (create, train, backward, evaluate,
destroy) for each dtype and layout, and one or more programs per class of error the C API
documents. The directory is emptied first; the file names say what each seed does.
"""
import os
import struct
import sys

# Opcodes (fuzz_c_api.cpp, Harness::step).
CONFIG_INIT, CONFIG_EDIT, PLAN_CREATE, PLAN_DESTROY, COMM_SELF, COMM_CUSTOM, COMM_DESTROY, \
    COMM_SPLIT, COMM_QUERY, SET_TIMEOUT, COMM_ABORT, GET_CONFIG, FWD_TRAIN, FWD_INFER, BACKWARD, \
    REJECT, SET_NAME, ASYNC_ERROR, FULL_STEP = range(19)
NULL_SLOT = 4  # comm_index / plan_index value for the NULL handle (kCommSlots, kPlanSlots)
MAX_ELEMENTS = 4096

F32, F64, F16, BF16 = 0, 1, 2, 3
CF, CL = 0, 1
CPU, CUDA = 0, 1


def u8(v):
    return bytes([v & 0xff])


def i32(v):
    return struct.pack("<i", v)


def i64(v):
    return struct.pack("<q", v)


def f64(v):
    return struct.pack("<d", v)


# count_like: selector % 12 and its operand.
def cl_byte(v):  # 0..255
    return u8(0) + u8(v)


def cl_zero():
    return u8(2)


def cl_neg(k=0):  # -1 - k
    return u8(3) + u8(k)


def cl_min():
    return u8(4)


def cl_max():
    return u8(5)


def cl_over(k=0):  # the library's limit + 1 + k
    return u8(6) + u8(k)


def cl_2p32():
    return u8(7)


def cl_raw(v):
    return u8(8) + i64(v)


def cl_sqrt():  # 3037000500
    return u8(9)


def cl_ctx():  # the plan's C for a dimension
    return u8(11)


# special_double: selector % 20 into the table, 19: raw.
DOUBLES = [0.0, -0.0, 1e-5, 1e-3, 0.1, 0.5, 1.0, 1.5, -1.0, "nan", "-nan", "inf", "-inf",
           "dbl_min", "denorm", "dbl_max", 1e-300, 2.0, 600.0]


def dbl(name):
    return u8(DOUBLES.index(name))


def dbl_raw(v):
    return u8(19) + f64(v)


def enum(v):  # a valid-range selector (< 200)
    return u8(v)


def enum_raw(v):
    return u8(200) + i32(v)


# fill: mode % 6 and a u32 seed (mode 3: plus a special_double).
def fill(mode=2, seed=12345, special=None):
    b = u8(mode) + struct.pack("<I", seed)
    if mode == 3:
        b += special if special is not None else dbl(1.0)
    return b


MADE = u8(1)  # a pointer choice: the buffer
NULL = u8(0)  # a pointer choice: NULL
ALIAS = u8(3)  # y = x / dx = dy


class Program:
    def __init__(self):
        self.b = b""
        self.plans = {}  # slot -> (C, dtype, layout)

    def op(self, code, *operands):
        self.b += u8(code) + b"".join(operands)
        return self

    def config_init(self, nf_bytes, dtype=F32, null=False):
        return self.op(CONFIG_INIT, u8(1 if null else 0), nf_bytes, enum(dtype))

    def edit(self, field, value_bytes):
        return self.op(CONFIG_EDIT, u8(field), value_bytes)

    def self_comm(self, slot=0, null=False):
        return self.op(COMM_SELF, u8(1 if null else 0), u8(slot))

    def plan(self, comm=0, slot=0, flags=0, valid=None):
        self.op(PLAN_CREATE, u8(comm), u8(flags), u8(slot))
        if valid is not None:
            self.plans[slot] = valid
        return self

    def destroy_plan(self, slot=0):
        self.plans.pop(slot, None)
        return self.op(PLAN_DESTROY, u8(slot))

    def destroy_comm(self, slot=0):
        return self.op(COMM_DESTROY, u8(slot))

    @staticmethod
    def shape_bytes(dims, ndim_sel=None, null=False):
        """dims: list of count_like byte strings; ndim from len(dims) unless ndim_sel given."""
        sel = {-1: 0, 0: 1, 1: 2, 2: 3, 3: 4, 4: 5, 5: 6, 6: 7, 100: 8}
        n = len(dims) if ndim_sel is None else ndim_sel
        b = u8(sel[n]) + u8(1 if null else 0)
        return b + b"".join(dims[:min(max(n, 0), 6)])  # the target reads this many

    def valid_dims(self, slot, n, spatial):
        c, _, layout = self.plans[slot]
        dims = [cl_byte(n)]
        if layout == CF:
            dims.append(cl_ctx())
        dims += [cl_byte(s) for s in spatial]
        if layout == CL:
            dims.append(cl_ctx())
        count = n * c
        for s in spatial:
            count *= s
        return dims, count <= MAX_ELEMENTS

    def fwd_train(self, slot=0, n=4, spatial=(3,), ptrs=None, nbt=(MADE, u8(0)), stream=False,
                  shape=None, data_ok=None, in_place=False):
        """ptrs: dict of overrides (NULL) for x, y, weight, bias, save_mean, save_invstd,
        running_mean, running_var."""
        ptrs = ptrs or {}
        if shape is None:
            dims, data_ok = self.valid_dims(slot, n, spatial)
            shape = self.shape_bytes(dims)
        b = shape
        for name in ["x", "y", "weight", "bias", "save_mean", "save_invstd", "running_mean",
                     "running_var"]:
            choice = ptrs.get(name, MADE)
            if name == "y" and in_place:
                choice = ALIAS
            b += choice
            is_data = name in ("x", "y")
            if choice == MADE and (data_ok or not is_data):
                b += fill(2 if name != "running_var" else 3, seed=len(self.b) + len(b),
                          special=dbl(1.0) if name == "running_var" else None)
        b += nbt[0]
        if nbt[0] == MADE:
            b += nbt[1]
        b += u8(1 if stream else 0)
        return self.op(FWD_TRAIN, u8(slot), b)

    def fwd_infer(self, slot=0, n=2, spatial=(3,), ptrs=None, stream=False, shape=None,
                  data_ok=None):
        ptrs = ptrs or {}
        if shape is None:
            dims, data_ok = self.valid_dims(slot, n, spatial)
            shape = self.shape_bytes(dims)
        b = shape
        for name in ["x", "y", "weight", "bias", "running_mean", "running_var"]:
            choice = ptrs.get(name, MADE)
            b += choice
            if choice == MADE and (data_ok or name not in ("x", "y")):
                b += fill(3 if name == "running_var" else 2, seed=len(self.b) + len(b),
                          special=dbl(1.0) if name == "running_var" else None)
        b += u8(1 if stream else 0)
        return self.op(FWD_INFER, u8(slot), b)

    def backward(self, slot=0, n=4, spatial=(3,), ptrs=None, stream=False, shape=None,
                 data_ok=None, in_place=False):
        ptrs = ptrs or {}
        if shape is None:
            dims, data_ok = self.valid_dims(slot, n, spatial)
            shape = self.shape_bytes(dims)
        b = shape
        for name in ["x", "dy", "weight", "save_mean", "save_invstd", "dx", "dweight", "dbias"]:
            choice = ptrs.get(name, MADE)
            if name == "dx" and in_place:
                choice = ALIAS
            b += choice
            if choice == MADE and (data_ok or name not in ("x", "dy", "dx")):
                b += fill(3 if name == "save_invstd" else 2, seed=len(self.b) + len(b),
                          special=dbl(1.0) if name == "save_invstd" else None)
        b += u8(1 if stream else 0)
        return self.op(BACKWARD, u8(slot), b)

    def full_step(self, slot=0, n=3, spatial_sel=1):
        self.op(FULL_STEP, u8(slot), u8(n), u8(spatial_sel))
        if slot in self.plans:
            c = self.plans[slot][0]
            count = n * c * (2 if spatial_sel % 4 else 1)
            if count <= MAX_ELEMENTS:
                for _ in range(5):  # x, y, weight, bias, dy
                    self.b += fill(2, seed=len(self.b))
        return self

    def reject(self, slot=0, call=1, arg=1, problem=1, detail=1, stream=False, raw_call=None,
               raw_problem=None):
        return self.op(REJECT, u8(slot), enum_raw(raw_call) if raw_call is not None else enum(call),
                       u8(arg), enum_raw(raw_problem) if raw_problem is not None else enum(problem),
                       u8(detail), u8(1 if stream else 0))


def basic(nf=3, dtype=F32, layout=CF, edits=()):
    p = Program()
    p.config_init(cl_byte(nf), dtype)
    if layout != CF:
        p.edit(2, enum(layout))
    for field, value in edits:
        p.edit(field, value)
    p.self_comm(0)
    p.plan(comm=0, slot=0, valid=(nf, dtype, layout))
    return p


def seeds():
    out = {}

    # ---- valid full sequences ----------------------------------------------------------------
    for dtype, dn in ((F32, "f32"), (F64, "f64")):
        for layout, ln in ((CF, "nchw"), (CL, "nhwc")):
            p = basic(3, dtype, layout)
            p.fwd_train(0, n=4, spatial=(2, 3))
            p.backward(0, n=4, spatial=(2, 3))
            p.fwd_infer(0, n=2, spatial=(2, 3))
            p.op(GET_CONFIG, u8(0), u8(0))
            p.destroy_plan(0).destroy_comm(0)
            out[f"valid-train-backward-eval-{dn}-{ln}"] = p.b
    p = basic(5, F32, CF)
    for _ in range(3):
        p.full_step(0, n=4, spatial_sel=1)
    out["valid-full-steps-f32"] = p.b
    p = basic(2, F64, CL, edits=[(5, dbl("nan"))])  # cumulative momentum
    p.fwd_train(0, n=3, spatial=(2,), nbt=(MADE, u8(2) + u8(5)))
    p.fwd_train(0, n=3, spatial=(2,), nbt=(MADE, u8(2) + u8(6)))
    out["valid-cumulative-momentum"] = p.b
    p = basic(4, F32, CF, edits=[(6, u8(0)), (7, u8(0))])  # no affine, no running stats
    p.fwd_train(0, n=2, spatial=(3,), ptrs={"weight": NULL, "bias": NULL, "running_mean": NULL,
                                            "running_var": NULL}, nbt=(NULL, b""))
    p.fwd_infer(0, n=2, spatial=(3,), ptrs={"weight": NULL, "bias": NULL})
    p.backward(0, n=2, spatial=(3,), ptrs={"weight": NULL})
    out["valid-no-affine-no-stats"] = p.b
    p = basic(3, F32, CF, edits=[(8, u8(1))])  # global_param_grads
    p.fwd_train(0, n=2, spatial=(), in_place=True)  # (N, C), y = x
    p.backward(0, n=2, spatial=(), in_place=True)
    out["valid-2d-in-place-global-grads"] = p.b
    p = basic(2, F32, CF)
    p.fwd_train(0, n=2, spatial=(1, 2, 2))  # 5-d
    p.backward(0, n=2, spatial=(1, 2, 2))
    out["valid-5d"] = p.b
    p = basic(3, F32, CF)
    p.fwd_train(0, n=0, spatial=(3,), nbt=(MADE, u8(0)))  # empty batch: BATCH_TOO_SMALL
    p.fwd_train(0, n=1, spatial=(1,))  # m = 1 with running stats: BATCH_TOO_SMALL
    p.fwd_infer(0, n=0, spatial=(3,))
    out["error-batch-too-small"] = p.b

    # ---- configuration errors ------------------------------------------------------------------
    out["error-config-init-null"] = Program().config_init(cl_byte(3), F32, null=True).b
    for name, nf in (("zero", cl_zero()), ("negative", cl_neg(5)), ("int64-min", cl_min()),
                     ("int64-max", cl_max()), ("over-limit", cl_over(3)), ("2p32", cl_2p32())):
        p = Program().config_init(nf, F32).self_comm(0).plan(0, 0)
        p.fwd_train(0, shape=Program.shape_bytes([cl_byte(2), cl_byte(3)]), data_ok=True)
        out[f"error-num-features-{name}"] = p.b
    for name, field, value in (("dtype-5", 1, enum(5)), ("dtype-raw", 1, enum_raw(-7)),
                               ("layout-2", 2, enum(2)), ("layout-raw", 2, enum_raw(1 << 30)),
                               ("device-2", 3, enum(2)), ("device-cuda", 3, enum(CUDA)),
                               ("dtype-f16", 1, enum(F16)), ("dtype-bf16", 1, enum(BF16)),
                               ("eps-zero", 4, dbl(0.0)), ("eps-negative", 4, dbl(-1.0)),
                               ("eps-nan", 4, dbl("nan")), ("eps-inf", 4, dbl("inf")),
                               ("momentum-negative", 5, dbl(-1.0)),
                               ("momentum-above-one", 5, dbl(1.5)),
                               ("momentum-inf", 5, dbl("inf"))):
        p = Program().config_init(cl_byte(3), F32).edit(field, value).self_comm(0).plan(0, 0)
        out[f"error-config-{name}"] = p.b
    p = Program().config_init(cl_byte(3), F32).self_comm(0)
    p.plan(0, 0, flags=1).plan(0, 0, flags=2).plan(NULL_SLOT, 0).plan(1, 0)  # 1: empty slot
    out["error-plan-create-null-args"] = p.b

    # ---- call argument errors ------------------------------------------------------------------
    for name, ndim in (("minus1", -1), ("0", 0), ("1", 1), ("6", 6), ("100", 100)):
        p = basic(3)
        dims = [cl_byte(2), cl_ctx()] + [cl_byte(1)] * 4
        p.fwd_train(0, shape=Program.shape_bytes(dims, ndim_sel=ndim), data_ok=False)
        p.backward(0, shape=Program.shape_bytes(dims, ndim_sel=ndim), data_ok=False)
        p.fwd_infer(0, shape=Program.shape_bytes(dims, ndim_sel=ndim), data_ok=False)
        out[f"error-ndim-{name}"] = p.b
    # data_ok: whether the target makes data buffers (a valid form, at most 4096 elements; a
    # zero dimension makes the count 0 whatever the others are).
    for name, dims, data_ok in (("negative", [cl_neg(0), cl_ctx(), cl_byte(2)], False),
                                ("int64-min", [cl_byte(2), cl_ctx(), cl_min()], False),
                                ("channels", [cl_byte(2), cl_byte(7), cl_byte(2)], True),
                                ("overflow", [cl_max(), cl_ctx(), cl_max()], False),
                                ("overflow-sqrt", [cl_sqrt(), cl_ctx(), cl_sqrt(), cl_sqrt()],
                                 False),
                                ("huge-null-data", [cl_2p32(), cl_ctx(), cl_2p32()], False),
                                ("large-null-data", [cl_byte(200), cl_ctx(), cl_byte(200)],
                                 False),
                                ("zero-batch-huge-spatial",
                                 [cl_zero(), cl_ctx(), cl_max(), cl_max()], True)):
        p = basic(3)
        p.fwd_train(0, shape=Program.shape_bytes(dims), data_ok=data_ok)
        p.backward(0, shape=Program.shape_bytes(dims), data_ok=data_ok)
        p.fwd_infer(0, shape=Program.shape_bytes(dims), data_ok=data_ok)
        out[f"error-shape-{name}"] = p.b
    p = basic(3)
    p.fwd_train(0, shape=Program.shape_bytes([cl_byte(2), cl_ctx()], null=True), data_ok=False)
    out["error-shape-null"] = p.b
    for arg in ("x", "y", "weight", "bias", "running_mean", "running_var"):
        p = basic(3)
        p.fwd_train(0, ptrs={arg: NULL})
        p.fwd_infer(0, ptrs={arg: NULL} if arg != "y" else {"y": NULL})
        out[f"error-null-{arg}"] = p.b
    for arg in ("x", "dy", "save_mean", "save_invstd", "dx", "weight"):
        p = basic(3)
        p.fwd_train(0)
        p.backward(0, ptrs={arg: NULL})
        out[f"error-backward-null-{arg}"] = p.b
    p = basic(3, edits=[(5, dbl("nan"))])
    p.fwd_train(0, nbt=(NULL, b""))  # cumulative momentum needs num_batches_tracked
    out["error-cumulative-without-nbt"] = p.b
    for name, value in (("negative", u8(3)), ("int64-max", u8(4)), ("int64-max-1", u8(5)),
                        ("raw-min", u8(6) + i64(-(1 << 63)))):
        p = basic(3)
        p.fwd_train(0, nbt=(MADE, value))
        out[f"edge-nbt-{name}"] = p.b
    p = basic(3)
    p.fwd_train(0, stream=True).fwd_infer(0, stream=True).backward(0, stream=True)
    p.op(ASYNC_ERROR, u8(0), u8(1)).op(ASYNC_ERROR, u8(0), u8(2)).op(ASYNC_ERROR, u8(NULL_SLOT), u8(0))
    out["error-stream-on-cpu-plan"] = p.b
    p = basic(3)
    p.fwd_train(NULL_SLOT, shape=Program.shape_bytes([cl_byte(2), cl_byte(4)]), data_ok=True)
    p.backward(NULL_SLOT, shape=Program.shape_bytes([cl_byte(2), cl_byte(4)]), data_ok=True)
    out["error-null-plan"] = p.b

    # ---- syncbn_plan_reject_call, names, timeouts, abort ---------------------------------------
    p = basic(3)
    for call in (1, 2, 3):
        for problem in (1, 2, 3, 4, 0):
            p.reject(0, call=call, arg=1 + problem % 5, problem=problem, detail=problem % 3)
    p.reject(0, raw_call=0).reject(0, raw_call=99).reject(0, call=1, raw_problem=99)
    p.reject(NULL_SLOT, call=1).reject(0, call=1, stream=True)
    p.fwd_train(0)
    out["reject-call-all"] = p.b
    p = basic(3)
    for k in range(6):
        p.op(SET_NAME, u8(0), u8(k))
    p.op(SET_NAME, u8(NULL_SLOT), u8(2))
    p.fwd_train(0)
    out["plan-set-name"] = p.b
    p = basic(3)
    for d in (dbl(0.0), dbl(1.5), dbl(-1.0), dbl("nan"), dbl("inf"), dbl("dbl_max"),
              dbl("denorm"), dbl_raw(1e9)):
        p.op(SET_TIMEOUT, u8(0), d, u8(0))
    p.op(SET_TIMEOUT, u8(0), dbl(2.0), u8(1)).op(SET_TIMEOUT, u8(NULL_SLOT), dbl(2.0), u8(0))
    p.fwd_train(0)
    out["comm-timeouts"] = p.b
    p = basic(3)
    p.op(COMM_ABORT, u8(0))
    p.fwd_train(0).fwd_infer(0).backward(0).reject(0, call=1).plan(0, 1)
    p.op(COMM_SPLIT, u8(0), u8(0), u8(0), u8(1))
    p.op(COMM_ABORT, u8(NULL_SLOT))
    out["comm-abort-then-calls"] = p.b
    p = basic(3)
    p.destroy_comm(0)  # the plan keeps its communicator
    p.fwd_train(0).backward(0)
    p.op(COMM_DESTROY, u8(NULL_SLOT))
    out["comm-destroyed-before-plan"] = p.b
    p = Program().self_comm(0).self_comm(0, null=True)
    p.op(COMM_QUERY, u8(0), u8(0)).op(COMM_QUERY, u8(0), u8(3)).op(COMM_QUERY, u8(NULL_SLOT), u8(0))
    p.op(COMM_SPLIT, u8(0), u8(0), u8(0), u8(1))  # group 1: fine
    p.op(COMM_SPLIT, u8(0), u8(2), u8(0), u8(2))  # group 2 of 1: invalid
    p.op(COMM_SPLIT, u8(0), u8(3), u8(0), u8(2))  # group 0
    p.op(COMM_SPLIT, u8(0), u8(0), u8(1), u8(2))  # NULL sub
    p.op(COMM_SPLIT, u8(NULL_SLOT), u8(0), u8(0), u8(2))
    p.config_init(cl_byte(2), F64).plan(1, 0, valid=(2, F64, CF)).full_step(0, n=3, spatial_sel=0)
    out["comm-self-query-split"] = p.b

    # ---- custom communicators ------------------------------------------------------------------
    # comm_create_custom: size selector (0: 1, 1: 2, 2: 3, 3: 4, 4: 8), rank selector (0: rank 0),
    # flags, slot. Each allreduce then reads one selector byte (0: the identical-ranks sum).
    def custom(size_sel=3, rank_sel=0, flags=0, slot=0):
        return u8(size_sel) + u8(rank_sel) + u8(flags) + u8(slot)

    p = Program().config_init(cl_byte(3), F32).op(COMM_CUSTOM, custom(3))
    p.plan(0, 0, valid=(3, F32, CF)).b += u8(0)  # plan creation's allreduce
    p.fwd_train(0).b += u8(0)
    p.backward(0).b += u8(0)
    p.fwd_infer(0)
    p.op(COMM_QUERY, u8(0), u8(0))
    out["custom-4-ranks-valid"] = p.b
    p = Program().config_init(cl_byte(3), F32).op(COMM_CUSTOM, custom(0))
    p.plan(0, 0, valid=(3, F32, CF)).b += u8(0)
    p.fwd_train(0).b += u8(3)  # the allreduce reports a timeout: the communicator breaks
    p.fwd_train(0).backward(0).fwd_infer(0)
    out["custom-timeout-breaks"] = p.b
    p = Program().config_init(cl_byte(3), F32).op(COMM_CUSTOM, custom(1))
    p.plan(0, 0, valid=(3, F32, CF)).b += u8(0)
    p.fwd_train(0).b += u8(4) + u8(9)  # a transport error
    p.fwd_train(0)
    out["custom-transport-error"] = p.b
    p = Program().config_init(cl_byte(3), F32).op(COMM_CUSTOM, custom(0))
    p.plan(0, 0, valid=(3, F32, CF)).b += u8(0)
    p.fwd_train(0).b += u8(5) + struct.pack("<H", 3) + dbl("nan")  # a corrupted guard slot
    p.fwd_train(0).b += u8(6) + dbl("dbl_max")
    p.backward(0).b += u8(7)
    out["custom-corrupted-sums"] = p.b
    p = Program().config_init(cl_byte(3), F32).op(COMM_CUSTOM, custom(3))
    p.op(COMM_SPLIT, u8(0), u8(2), u8(0), u8(1)).b += u8(0) + u8(0) + u8(0)  # group 2
    p.plan(1, 0, valid=(3, F32, CF)).b += u8(0)
    p.fwd_train(0).b += u8(0)
    p.op(COMM_SPLIT, u8(0), u8(2), u8(0), u8(2)).b += u8(0) + u8(2) + u8(0)  # split fn fails
    p.op(COMM_SPLIT, u8(0), u8(2), u8(0), u8(2)).b += u8(0) + u8(3) + u8(0)  # stores, fails
    p.op(COMM_SPLIT, u8(0), u8(2), u8(0), u8(2)).b += u8(0) + u8(4) + u8(0)  # wrong size
    p.op(COMM_SPLIT, u8(0), u8(5) + i32(3), u8(0), u8(2)).b += u8(0)  # group 3 of 4
    out["custom-split"] = p.b
    p = Program()
    # size 0, size -1, rank -1, rank = size, NULL allreduce, NULL out (all fail); then valid ones
    # without a split function (slot 2), without release (slot 1), without both (slot 3)
    for sz, rk, fl, slot in ((5, 0, 0, 0), (6, 0, 0, 0), (3, 3, 0, 0), (3, 4, 0, 0),
                             (0, 0, 1, 0), (0, 0, 8, 0), (0, 0, 2, 2), (0, 0, 4, 1),
                             (0, 0, 6, 3)):
        p.op(COMM_CUSTOM, custom(sz, rk, fl, slot))
    p.op(COMM_SPLIT, u8(2), u8(0), u8(0), u8(0)).b += u8(0) + u8(0)  # no split function
    out["custom-create-errors"] = p.b
    return out


def main():
    here = os.path.dirname(os.path.abspath(__file__))
    target = sys.argv[1] if len(sys.argv) > 1 else os.path.join(here, "corpus")
    os.makedirs(target, exist_ok=True)
    for name in os.listdir(target):
        os.remove(os.path.join(target, name))
    all_seeds = seeds()
    for name, data in sorted(all_seeds.items()):
        with open(os.path.join(target, name), "wb") as f:
            f.write(data)
    print(f"make_corpus.py: {len(all_seeds)} seeds in {target}, "
          f"{min(map(len, all_seeds.values()))}-{max(map(len, all_seeds.values()))} bytes")


if __name__ == "__main__":
    main()
