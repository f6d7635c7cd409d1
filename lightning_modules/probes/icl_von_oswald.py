"""The von Oswald et al. (2023) synthetic control: linear self-attention vs gradient descent.

Tokens are ``e_i = (x_i, y_i)`` for the N context pairs of a linear regression task ``y = w . x`` and
``e_q = (x_q, 0)`` for the query. One linear self-attention (LSA) layer updates every token as

    e_j <- e_j + (1/N) W_PV  sum_{i in context, visible to j} e_i e_i^T W_KQ e_j

and the prediction is minus the query's last coordinate. With ``W_KQ = [[I, 0], [0, 0]]`` and
``W_PV = [[0, 0], [0, -eta]]`` a layer is exactly one gradient step of size ``eta`` on the squared loss
``1/(2N) sum (w.x_i - y_i)^2`` from ``w = 0`` (K layers = K steps: the context tokens' y slots hold
the residuals). Two things break the equivalence, which is what makes it a control:

- softmax attention (the weights are no longer the inner products ``x_i . x_j``);
- a causal mask with more than one layer (context token j only sees i <= j, so its residual after
  layer 1 comes from a model fitted on a prefix; with one layer the query sees everything anyway).

``run_control`` trains LSA layers on random regression tasks and measures how close the learned
model is to GD: the prediction difference and the cosine between the implied linear models
(``d y_hat / d x_q``), as in von Oswald et al.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F


def sample_tasks(batch: int, n: int, d: int, generator: torch.Generator, dtype=torch.float64):
    """``batch`` regression tasks: context ``x [B, N, d]``, ``y [B, N]``, query ``xq [B, d]``, ``yq [B]``."""
    w = torch.randn(batch, d, generator=generator, dtype=dtype)
    x = torch.rand(batch, n, d, generator=generator, dtype=dtype) * 2 - 1
    xq = torch.rand(batch, d, generator=generator, dtype=dtype) * 2 - 1
    return x, (x @ w[:, :, None])[..., 0], xq, (xq * w).sum(-1)


def tokens(x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
    """``[B, N + 1, d + 1]``: context tokens then the query token with a zero label slot."""
    ctx = torch.cat([x, y[..., None]], -1)
    q = torch.cat([xq, torch.zeros_like(xq[:, :1])], -1)[:, None]
    return torch.cat([ctx, q], 1)


def lsa_layer(e: torch.Tensor, w_kq: torch.Tensor, w_pv: torch.Tensor, causal: bool, softmax: bool):
    """One self-attention layer whose keys/values are the context tokens only (not the query)."""
    n = e.shape[1] - 1
    ctx = e[:, :n]
    scores = e @ w_kq.T @ ctx.transpose(1, 2)  # [B, N+1 (queries), N (keys)]: e_i^T W_KQ e_j
    if causal:
        visible = torch.ones(n + 1, n, dtype=torch.bool, device=e.device).tril()
    else:
        visible = torch.ones(n + 1, n, dtype=torch.bool, device=e.device)
    if softmax:
        weights = scores.masked_fill(~visible, float("-inf")).softmax(-1)
    else:
        weights = scores.masked_fill(~visible, 0.0) / n
    return e + weights @ ctx @ w_pv.T


def gd_construction(d: int, eta: float, dtype=torch.float64) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights (``W_KQ``, ``W_PV``) that make one LSA layer one GD step of size ``eta``."""
    w_kq = torch.zeros(d + 1, d + 1, dtype=dtype)
    w_kq[:d, :d] = torch.eye(d, dtype=dtype)
    w_pv = torch.zeros(d + 1, d + 1, dtype=dtype)
    w_pv[d, d] = -eta
    return w_kq, w_pv


def gd_predict(x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor, eta: float, steps: int = 1):
    """Prediction at ``xq`` after ``steps`` full-batch GD steps of size ``eta`` from ``w = 0``."""
    w = torch.zeros_like(xq)
    for _ in range(steps):
        residual = (x @ w[:, :, None])[..., 0] - y
        w = w - eta * (residual[..., None] * x).mean(1)
    return (w * xq).sum(-1)


class LSA(nn.Module):
    """A stack of (linear or softmax) self-attention layers predicting the query's label."""

    def __init__(self, d: int, layers: int = 1, causal: bool = False, softmax: bool = False, init_std=0.02):
        super().__init__()
        self.causal, self.softmax = causal, softmax
        self.w_kq = nn.ParameterList(
            [nn.Parameter(torch.randn(d + 1, d + 1, dtype=torch.float64) * init_std) for _ in range(layers)]
        )
        self.w_pv = nn.ParameterList(
            [nn.Parameter(torch.randn(d + 1, d + 1, dtype=torch.float64) * init_std) for _ in range(layers)]
        )

    def forward(self, x: torch.Tensor, y: torch.Tensor, xq: torch.Tensor) -> torch.Tensor:
        e = tokens(x, y, xq)
        for w_kq, w_pv in zip(self.w_kq, self.w_pv, strict=True):
            e = lsa_layer(e, w_kq, w_pv, self.causal, self.softmax)
        return -e[:, -1, -1]


def best_eta(x, y, xq, yq, steps: int = 1) -> float:
    """The GD step size minimising the query loss on the given tasks (closed form for one step)."""
    if steps == 1:
        a = gd_predict(x, y, xq, 1.0)
        return float((a * yq).sum() / (a * a).sum())
    grid = torch.linspace(0.05, 3.0, 60, dtype=torch.float64)
    losses = torch.stack([((gd_predict(x, y, xq, float(e), steps) - yq) ** 2).mean() for e in grid])
    return float(grid[losses.argmin()])


def implied_weights(fn, x, y, xq) -> torch.Tensor:
    """``d y_hat / d x_q`` per task: the linear model a predictor applies to the query."""
    xq = xq.clone().requires_grad_(True)
    (grad,) = torch.autograd.grad(fn(x, y, xq).sum(), xq)
    return grad


def run_control(
    d: int = 4,
    n: int = 16,
    variants: tuple[str, ...] = ("linear", "softmax", "linear_causal_2layer", "linear_2layer"),
    train_steps: int = 600,
    batch: int = 256,
    lr: float = 2e-2,
    eval_tasks: int = 2048,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Train each LSA variant on regression tasks and compare it with GD at its best step size.

    Returns, per variant: query loss of the trained model and of GD (``steps`` = layers), the mean
    squared prediction difference, and the mean cosine between implied linear models.
    """
    # Callers may sit in a Lightning test loop (inference mode); this control trains, so lift it.
    with torch.inference_mode(False), torch.enable_grad():
        return _run_control(d, n, variants, train_steps, batch, lr, eval_tasks, seed)


def _run_control(d, n, variants, train_steps, batch, lr, eval_tasks, seed) -> dict[str, dict[str, float]]:
    g = torch.Generator().manual_seed(seed)
    xe, ye, xqe, yqe = sample_tasks(eval_tasks, n, d, g)
    results: dict[str, dict[str, float]] = {}
    for variant in variants:
        layers = 2 if "2layer" in variant else 1
        torch.manual_seed(seed)
        model = LSA(d, layers, causal="causal" in variant, softmax=variant.startswith("softmax"))
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        for _ in range(train_steps):
            x, y, xq, yq = sample_tasks(batch, n, d, g)
            loss = F.mse_loss(model(x, y, xq), yq)
            opt.zero_grad()
            loss.backward()
            opt.step()
        eta = best_eta(xe, ye, xqe, yqe, layers)

        def gd(x, y, xq, eta=eta, layers=layers):
            return gd_predict(x, y, xq, eta, layers)

        with torch.no_grad():
            pred_lsa, pred_gd = model(xe, ye, xqe), gd(xe, ye, xqe)
        w_lsa = implied_weights(model, xe, ye, xqe)
        w_gd = implied_weights(gd, xe, ye, xqe)
        results[variant] = {
            "gd_steps": layers,
            "gd_eta": eta,
            "loss_lsa": float(((pred_lsa - yqe) ** 2).mean()),
            "loss_gd": float(((pred_gd - yqe) ** 2).mean()),
            "prediction_diff": float(((pred_lsa - pred_gd) ** 2).mean()),
            "model_cosine": float(F.cosine_similarity(w_lsa, w_gd, dim=-1).mean()),
        }
    return results
