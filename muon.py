"""Muon for the hidden layers' matrices (and filters) and AdamW for everything else, in one torch optimizer (train.py's
optimizer='muon'), after Keller Jordan's Muon and nanochat's optimizer that steps both.

Muon steps a weight matrix along its Nesterov momentum made orthogonal by a few Newton-Schulz iterations: every
direction of the update moves at about the same rate, where AdamW's follow the gradient's few largest ones. The
update is scaled to AdamW's size (0.2 sqrt(max(rows, cols)), Moonshot's rule, torch.optim.Muon's
adjust_lr_fn='match_rms_adamw'), so each part's AdamW learning rate carries over. The vision tower's patch embedding
(a convolution) steps as the matrix it is, (out channels, in channels x kernel), as Keller Jordan's CIFAR-10 runs step
their convolutions. Embedding tables, the output head, norms and biases stay on AdamW (a group without `muon`), as in
both references.

torch.optim.Muon takes the same step, but orthogonalizes in bf16, which a CPU runs several times slower than fp32:
the drawings demo's step took 1.3x as long with it as with this one. A group's matrices of one shape are orthogonalized
as one stack, in batched matmuls: the demo's 31 matrices in 10 stacks, 14 ms a step where one at a time took 20;
the iteration's scalings done inside the matmuls (baddbmm) take 20% off that (17 to 13.5 ms on another machine).
"""
import torch

NS_COEFFICIENTS = (3.4445, -4.7750, 2.0315)  # Keller Jordan's quintic: singular values to about 0.7-1.2 in 5 steps


def orthogonalize(g, steps=5):
    """The nearest semi-orthogonal matrix to g, roughly: U V^T of its SVD, by Newton-Schulz iteration; g (rows, cols)
    or a stack of them (k, rows, cols), each orthogonalized on its own."""
    a, b, c = NS_COEFFICIENTS
    tall = g.shape[-2] > g.shape[-1]
    x = g.mT if tall else g  # the Gram matrix of the short side is the cheap one
    x = x / (torch.linalg.vector_norm(x, dim=(-2, -1), keepdim=True) + 1e-7)  # singular values at most 1: converges
    x = x if x.dim() == 3 else x[None]  # baddbmm takes stacks only
    for _ in range(steps):
        A = x @ x.mT  # (k, short, short)
        # x <- a x + (b A + c A^2) x, the scalings in the matmuls' own epilogue rather than as four more passes
        B = torch.baddbmm(A, A, A, beta=b, alpha=c)
        x = torch.baddbmm(x, B, x, beta=a)
    x = x if g.dim() == 3 else x[0]
    return x.mT if tall else x


def is_hidden_matrix(name, p):
    """Whether train.py steps parameter `name` by Muon: a hidden layer's matrix or any parameter above 2-D (a
    convolution's filters: here the patch embedding's only), not an embedding table or the output head (tied or not)."""
    return p.dim() > 2 or (p.dim() == 2 and "embed" not in name and "lm_head" not in name)


class MuonAdamW(torch.optim.Optimizer):
    """A group with `muon=True` steps by Muon (its params matrices, or filters stepped as matrices: (out, the rest)),
    any other by AdamW, both with decoupled weight decay. The AdamW step is torch.optim.AdamW's (tests/test_muon.py
    compares them)."""

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0, momentum=0.95, ns_steps=5):
        super().__init__(params, dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, momentum=momentum,
                                      ns_steps=ns_steps, muon=False))
        for g in self.param_groups:
            if g["muon"] and any(p.dim() < 2 for p in g["params"]):
                raise ValueError("a muon group holds only parameters of 2-D or more (matrices, filters)")

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for g in self.param_groups:
            lr, wd = g["lr"], g["weight_decay"]
            stacks = {}  # Muon's matrices by shape: each stack orthogonalized at once, not one small matmul at a time
            for p in g["params"]:
                if p.grad is None:
                    continue
                grad, state = p.grad, self.state[p]
                if wd:
                    p.mul_(1 - lr * wd)
                if g["muon"]:
                    if not state:
                        state["momentum_buffer"] = torch.zeros_like(p)
                    buf = state["momentum_buffer"].mul_(g["momentum"]).add_(grad)
                    m = grad.add(buf, alpha=g["momentum"]).flatten(1)  # Nesterov; (out, in x kernel)
                    stacks.setdefault(m.shape, []).append((p, m))
                    continue
                if not state:
                    state.update(step=torch.zeros(()), exp_avg=torch.zeros_like(p), exp_avg_sq=torch.zeros_like(p))
                beta1, beta2 = g["betas"]
                state["step"] += 1
                t = int(state["step"])
                state["exp_avg"].lerp_(grad, 1 - beta1)
                state["exp_avg_sq"].mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
                denom = (state["exp_avg_sq"].sqrt() / (1 - beta2 ** t) ** 0.5).add_(g["eps"])
                p.addcdiv_(state["exp_avg"], denom, value=-lr / (1 - beta1 ** t))
            for shape, pm in stacks.items():
                u = orthogonalize(torch.stack([m for _, m in pm]), g["ns_steps"])  # (k, out, in x kernel)
                for (p, _), d in zip(pm, u):
                    p.add_(d.view_as(p), alpha=-lr * 0.2 * max(shape) ** 0.5)
        return loss
