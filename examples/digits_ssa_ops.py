"""Train a 64-256-10 SSA network on scikit-learn's digits with the ssa_kernels ops alone.

No autograd and no backpropagation: each layer's update comes from the fused ops
(DESIGN §3, §5, §6) and a torch.optim.Adam step:

    h, t  = lowrank_linear(x, U, s, V, b, "relu")                 # forward, keep t
    e     = (softmax(z) − onehot(y)) / p                          # output error
    delta = dfa_project(e, P, sigma, Q, h, "relu")                # hidden: DFA feedback
    grads = svd_factor_grads(x, t, delta, U, s, V, BU=…, align=…, ortho=…)

The training layer of the package (``ssa.Trainer``) does the same for any model; this
script shows the ops' contract end to end. Usage: ``python examples/digits_ssa_ops.py
[--epochs 30] [--backend auto]``.
"""

from __future__ import annotations

import argparse
import math
import time

import torch

import ssa_kernels


def digits(seed: int = 0):
    """DESIGN §11: 1437/360 seeded split, standardised with the training statistics."""
    from sklearn.datasets import load_digits

    data = load_digits()
    x = torch.tensor(data.data, dtype=torch.float32)
    y = torch.tensor(data.target, dtype=torch.long)
    perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed))
    tr, te = perm[:1437], perm[1437:]
    mean, std = x[tr].mean(0), x[tr].std(0) + 1e-6
    return (x[tr] - mean) / std, y[tr], (x[te] - mean) / std, y[te]


class Layer:
    """One SSA layer: factors from the SVD of a dense init, targets and feedback frames."""

    def __init__(self, n: int, m: int, classes: int, gen: torch.Generator):
        bound = 1 / math.sqrt(n)
        W = (torch.rand(m, n, generator=gen) * 2 - 1) * bound  # nn.Linear's init
        U, s, Vh = torch.linalg.svd(W, full_matrices=False)
        self.U = torch.nn.Parameter(U)
        self.s = torch.nn.Parameter(s)
        self.V = torch.nn.Parameter(Vh.t().contiguous())
        self.b = torch.nn.Parameter((torch.rand(m, generator=gen) * 2 - 1) * bound)
        # Alignment targets: SVD of a fixed Gaussian matrix with unit-norm columns.
        B = torch.randn(m, n, generator=gen)
        B = B / B.norm(dim=0, keepdim=True)
        BU, BS, BVh = torch.linalg.svd(B, full_matrices=False)
        self.BU, self.BS, self.BV = BU, BS, BVh.t().contiguous()
        # DFA feedback B_i = P diag(sigma) Qᵀ from the alignment frame, ‖B_i‖_F² = C.
        k = min(classes, m)
        self.P = BU[:, :k].contiguous()
        sigma = BS[:k].clone()
        self.sigma = sigma * math.sqrt(classes) / sigma.norm()
        self.Q = torch.linalg.qr(torch.randn(classes, k, generator=gen))[0]

    def params(self):
        return [self.U, self.s, self.V, self.b]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=30)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--backend", default="auto")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    torch.manual_seed(args.seed)
    gen = torch.Generator().manual_seed(args.seed)
    xtr, ytr, xte, yte = digits(args.seed)
    classes = 10
    hidden = Layer(64, 256, classes, gen)
    out = Layer(256, classes, classes, gen)
    layers = [hidden, out]
    opt = torch.optim.Adam([p for layer in layers for p in layer.params()], lr=args.lr)
    loss_kw = dict(ce=1.0, align=0.01, ortho=1.0, scaling="euclidean", projection="stiefel")
    print(f"backends on cpu: {ssa_kernels.available_backends('cpu')}; using {args.backend!r}")

    def forward(x):
        h, t1 = ssa_kernels.lowrank_linear(x, hidden.U, hidden.s, hidden.V, hidden.b, "relu",
                                           backend=args.backend)
        z, t2 = ssa_kernels.lowrank_linear(h, out.U, out.s, out.V, out.b, backend=args.backend)
        return h, t1, z, t2

    start = time.perf_counter()
    for epoch in range(args.epochs):
        order = torch.randperm(len(xtr), generator=gen)
        total = 0.0
        for i in range(0, len(xtr), args.batch_size):
            idx = order[i:i + args.batch_size]
            x, y = xtr[idx], ytr[idx]
            with torch.no_grad():
                h, t1, z, t2 = forward(x)
                p = z.softmax(1)
                total += torch.nn.functional.cross_entropy(z, y, reduction="sum").item()
                e = (p - torch.nn.functional.one_hot(y, classes).float()) / len(y)
                deltas = [ssa_kernels.dfa_project(e, hidden.P, hidden.sigma, hidden.Q, h, "relu",
                                                  backend=args.backend), e]
                for layer, inp, t, delta in zip(layers, (x, h), (t1, t2), deltas):
                    grads = ssa_kernels.svd_factor_grads(
                        inp, t, delta, layer.U, layer.s, layer.V, BU=layer.BU, BS=layer.BS,
                        BV=layer.BV, **loss_kw, backend=args.backend)
                    for param, g in zip(layer.params(), grads):
                        param.grad = g
            opt.step()
        with torch.no_grad():
            acc = (forward(xte)[2].argmax(1) == yte).float().mean().item()
            ortho = (hidden.U.t() @ hidden.U - torch.eye(hidden.U.shape[1])).norm().item()
        print(f"epoch {epoch + 1:3d}  train loss {total / len(xtr):.4f}  test acc {acc:.4f}  "
              f"|U'U-I| {ortho:.3f}")
    print(f"done in {time.perf_counter() - start:.1f}s: test accuracy {acc:.4f}")


if __name__ == "__main__":
    main()
