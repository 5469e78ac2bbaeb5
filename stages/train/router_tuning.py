"""Router tuning by the LM loss: the router rows of a merged model learn (or a closed-form fit is
scaled) against held-out rows, the rest of the model frozen (stages/model/router_fit.py holds the
router's tensors and the closed-form fit)."""
from __future__ import annotations

import torch

from stages.device import autocast
from stages.model.router_fit import fit_routers, router_parameters, router_state, set_router_state


def lm_loss(model, rows: torch.Tensor, precision: str) -> torch.Tensor:
    """Mean next-token cross-entropy over rows of seq_len + 1 tokens."""
    with autocast(precision):
        logits = model(input_ids=rows[:, :-1]).logits
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), rows[:, 1:].flatten())


@torch.no_grad()
def mean_lm_loss(model, rows: torch.Tensor, batch_size: int, precision: str) -> float:
    model.eval()
    return float(sum(lm_loss(model, rows[i:i + batch_size], precision) * len(rows[i:i + batch_size])
                     for i in range(0, len(rows), batch_size)) / len(rows))


def fit_ridge_scale(model, train_rows: torch.Tensor, labels: list[int], held_out_rows: torch.Tensor, lam: float,
                    scales: list[float], batch_size: int, precision: str) -> dict:
    """The closed-form router at each scale, fitted on the training rows; the one with the lowest held-out
    LM loss is kept (in place)."""
    merged = router_state(model)
    docs = [r.numpy() for r in train_rows]
    losses, states = {}, {}
    for scale in scales:
        set_router_state(model, merged)
        fit_routers(model, docs, labels, lam, scale)
        losses[scale], states[scale] = mean_lm_loss(model, held_out_rows, batch_size, precision), router_state(model)
    best = min(losses, key=losses.get)
    set_router_state(model, states[best])
    return {"scale": best, "held_out_loss_by_scale": {str(k): v for k, v in losses.items()}}


def tune_routers_lm(model, train_rows: torch.Tensor, held_out_rows: torch.Tensor, lr: float, max_epochs: int,
                    patience: int, batch_size: int, seed: int, precision: str = "fp32") -> dict:
    """The LM loss on proxy rows with only the router rows learning; the router of the epoch with the
    lowest held-out loss is kept (epoch 0: the router as merged), and training stops once `patience`
    epochs in a row did not beat it."""
    params = router_parameters(model)
    for name, p in model.named_parameters():
        p.requires_grad_(name in params)
    optimizer = torch.optim.AdamW(params.values(), lr=lr, weight_decay=0.0)
    gen = torch.Generator().manual_seed(seed)
    best, best_state, best_epoch = mean_lm_loss(model, held_out_rows, batch_size, precision), router_state(model), 0
    log = [{"epoch": 0, "held_out_loss": best}]
    for epoch in range(1, max_epochs + 1):
        model.train()
        order, total = torch.randperm(len(train_rows), generator=gen), 0.0
        for i in range(0, len(order), batch_size):
            loss = lm_loss(model, train_rows[order[i:i + batch_size]], precision)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            total += loss.item() * len(order[i:i + batch_size])
        current = mean_lm_loss(model, held_out_rows, batch_size, precision)
        log.append({"epoch": epoch, "train_loss": total / len(order), "held_out_loss": current})
        if current < best:
            best, best_state, best_epoch = current, router_state(model), epoch
        elif epoch - best_epoch >= patience:
            break
    set_router_state(model, best_state)
    for p in model.parameters():
        p.requires_grad_(False)
    model.eval()
    return {"best_epoch": best_epoch, "held_out_loss": best, "log": log}
