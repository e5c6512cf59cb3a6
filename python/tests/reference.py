"""The references the suite checks syncbn.torch against, and the data every rank draws.

Every rank draws the whole global batch from the same seed and keeps its own slice, so nothing
but syncbn's own traffic (and the tests' sums over ranks) travels between ranks.
"""

import torch


def draw(seed, shapes, dtype, offset=0.0):
    """One tensor per shape (every rank's batch), float64 draws rounded to dtype; channel c has
    mean offset + c and a spread that differs per channel."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for shape in shapes:
        x = torch.randn(shape, generator=g, dtype=torch.float64)
        if len(shape) > 1:
            C = shape[1]
            view = [1, C] + [1] * (len(shape) - 2)
            scale = torch.linspace(0.5, 2.0, C, dtype=torch.float64).view(view)
            center = (offset + torch.arange(C, dtype=torch.float64)).view(view)
            x = x * scale + center
        out.append(x.to(dtype))
    return out


def bn_class(ndim):
    return {2: torch.nn.BatchNorm1d, 3: torch.nn.BatchNorm1d, 4: torch.nn.BatchNorm2d,
            5: torch.nn.BatchNorm3d}[ndim]


def channel_values(x):
    """(C, count) float64: x's values per channel."""
    return x.to(torch.float64).transpose(0, 1).reshape(x.shape[1], -1)


class GlobalBatchNorm:
    """Batch norm over the concatenation of every rank's batch, in float64: torch.nn.BatchNorm
    itself on torch.cat(xs) when the ranks' spatial sizes agree, else the same formulas
    (Ioffe & Szegedy 2015, Alg. 1) written over the per-channel values, with autograd for the
    gradients."""

    def __init__(self, C, eps, momentum, affine, track, weight=None, bias=None,
                 running_mean=None, running_var=None, num_batches_tracked=0):
        self.C, self.eps, self.momentum, self.affine, self.track = C, eps, momentum, affine, track
        def own(t, default):  # a float64 copy, never an alias of the layer's tensors
            return (t if t is not None else default).detach().to(torch.float64).clone()

        self.weight = own(weight, torch.ones(C))
        self.bias = own(bias, torch.zeros(C))
        self.running_mean = own(running_mean, torch.zeros(C))
        self.running_var = own(running_var, torch.ones(C))
        self.num_batches_tracked = int(num_batches_tracked)

    def train_step(self, xs, dys):
        """ys, dxs for every rank's batch, and dweight, dbias over the global batch; updates the
        running statistics."""
        ys, dxs, dw, db, _ = self.train_step_act(xs, dys, None)
        return ys, dxs, dw, db

    def train_step_act(self, xs, dys, activation, zs=None):
        """train_step of act(bn(x)): activation None (bn alone), "relu" (torch.relu(bn(x))) or
        "add_relu" (torch.relu(bn(x) + z), zs every rank's residual); torch's relu backward is
        threshold_backward, relu'(0) = 0. Returns ys, dxs, dweight, dbias and dzs (None
        without zs)."""
        xs = [x.detach().to(torch.float64).requires_grad_(True) for x in xs]
        if zs is not None:
            zs = [z.detach().to(torch.float64).requires_grad_(True) for z in zs]
        w = self.weight.clone().requires_grad_(self.affine)
        b = self.bias.clone().requires_grad_(self.affine)
        same_spatial = len({tuple(x.shape[2:]) for x in xs}) == 1
        if same_spatial:
            bn = bn_class(xs[0].dim())(self.C, eps=self.eps, momentum=self.momentum,
                                       affine=self.affine, track_running_stats=self.track,
                                       dtype=torch.float64)
            if self.affine:
                bn.weight, bn.bias = torch.nn.Parameter(w), torch.nn.Parameter(b)
                w, b = bn.weight, bn.bias
            if self.track:
                bn.running_mean.copy_(self.running_mean)
                bn.running_var.copy_(self.running_var)
                bn.num_batches_tracked.fill_(self.num_batches_tracked)
            y = bn(torch.cat(xs))
            ys = list(torch.split(y, [x.shape[0] for x in xs]))
            if self.track:
                self.running_mean = bn.running_mean.detach().clone()
                self.running_var = bn.running_var.detach().clone()
                self.num_batches_tracked = int(bn.num_batches_tracked)
        else:
            values = torch.cat([channel_values(x) for x in xs], dim=1)
            m = values.shape[1]
            mean = values.mean(dim=1)
            var = values.var(dim=1, unbiased=False)
            invstd = 1.0 / torch.sqrt(var + self.eps)
            ys = []
            for x in xs:
                view = [1, self.C] + [1] * (x.dim() - 2)
                ys.append((x - mean.view(view)) * (invstd * w).view(view) + b.view(view))
            if self.track:
                self.num_batches_tracked += 1
                a = 1.0 / self.num_batches_tracked if self.momentum is None else self.momentum
                with torch.no_grad():
                    self.running_mean = (1 - a) * self.running_mean + a * mean
                    self.running_var = (1 - a) * self.running_var + a * var * m / (m - 1)
        if activation == "add_relu":
            ys = [y + z for y, z in zip(ys, zs)]
        if activation is not None:
            ys = [torch.relu(y) for y in ys]
        loss = sum((y * dy.to(torch.float64)).sum() for y, dy in zip(ys, dys))
        inputs = xs + ([w, b] if self.affine else []) + (zs if zs is not None else [])
        grads = torch.autograd.grad(loss, inputs, allow_unused=True)
        dxs = [g if g is not None else torch.zeros_like(x) for g, x in zip(grads, xs)]
        dw, db = (grads[len(xs)], grads[len(xs) + 1]) if self.affine else (None, None)
        dzs = None
        if zs is not None:
            dzs = [g if g is not None else torch.zeros_like(z)
                   for g, z in zip(grads[len(inputs) - len(zs):], zs)]
        return [y.detach() for y in ys], dxs, dw, db, dzs

    def eval_step_act(self, x, activation, z=None):
        """eval_step followed by the activation (None, "relu", "add_relu" with z)."""
        y = self.eval_step(x)
        if activation == "add_relu":
            y = y + z.to(torch.float64)
        return torch.relu(y) if activation is not None else y

    def eval_step(self, x):
        """Evaluation on one rank's batch: running statistics, or its own batch statistics."""
        x = x.to(torch.float64)
        view = [1, self.C] + [1] * (x.dim() - 2)
        if self.track:
            mean, var = self.running_mean, self.running_var
        else:
            values = channel_values(x)
            mean, var = values.mean(dim=1), values.var(dim=1, unbiased=False)
        return (x - mean.view(view)) / torch.sqrt(var.view(view) + self.eps) * \
            self.weight.view(view) + self.bias.view(view)


def tolerances(dtype):
    """rtol, atol for results of that dtype (atol on values of order one)."""
    return {torch.float32: (2e-5, 2e-5), torch.float64: (1e-10, 1e-10)}[dtype]


def assert_close(got, want, dtype, what, scale=1.0):
    rtol, atol = tolerances(dtype)
    torch.testing.assert_close(got.to(torch.float64), want.to(torch.float64), rtol=rtol,
                               atol=atol * scale, equal_nan=True, msg=lambda m: f"{what}: {m}")
