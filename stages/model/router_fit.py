"""A closed-form router (DUME's recipe): ridge regression of domain targets on what the routers read.

Each owner's router row only ever learned "my text vs public text" in its own training; the
merged router has never seen one owner's text beside another's. Given proxy documents labelled
with their domain (the owners' synthetic sets, public text), a ridge regression per layer maps the
FFN input x to a multi-hot target: the public expert and the domain's own expert are 1, the
others 0 (public text: the public expert alone). Its prediction y(x) is a linear domain
classifier, and the router becomes W0 x + scale * y(x): the owners' trained rows still set the
balance between the public expert and the owner's, and the fit pushes the other owners' experts
down by about `scale` nats where it recognises the domain. Still one linear map per layer, so
the model stays the stock MoE class.
"""
from __future__ import annotations

import numpy as np
import torch


def ridge(x: torch.Tensor, y: torch.Tensor, lam: float) -> torch.Tensor:
    """argmin_W |x W - y|^2 + lam * s |W|^2 in closed form: (hidden, targets), in float64.

    s is the mean diagonal of x^T x, so `lam` means the same for a residual stream of norm 1 or 50.
    """
    x, y = x.double(), y.double()
    gram = x.T @ x
    gram += lam * gram.diagonal().mean() * torch.eye(x.shape[1], dtype=torch.float64)
    return torch.linalg.solve(gram, x.T @ y)


def domain_targets(labels: torch.Tensor, num_experts: int) -> torch.Tensor:
    """(tokens, experts): 1 on the public expert (index 0) and on the token's domain's expert."""
    y = torch.zeros(len(labels), num_experts, dtype=torch.float64)
    y[:, 0] = 1.0
    y[torch.arange(len(labels)), labels] = 1.0
    return y


@torch.no_grad()
def fit_routers(model, docs: list[np.ndarray], labels: list[int], lam: float, scale: float) -> None:
    """Fit the router weights of every layer of a merged model, in place, on labelled documents.

    `labels[i]` is the expert index of `docs[i]`'s domain (0: public text). Layers are fitted in
    order in one forward pass: each layer's fit sees the hidden states its input really has once
    the layers below route the new way.
    """
    if not docs:
        raise ValueError("no proxy documents to fit the router on")
    width = max(len(d) for d in docs)
    ids = torch.zeros(len(docs), width, dtype=torch.long)
    mask = torch.zeros(len(docs), width, dtype=torch.bool)
    for i, d in enumerate(docs):
        ids[i, :len(d)] = torch.from_numpy(d)
        mask[i, :len(d)] = True
    token_labels = torch.tensor(labels).view(-1, 1).expand(-1, width)[mask]
    targets = domain_targets(token_labels, model.config.num_experts)

    def refit(gate):
        def hook(_module, args):
            x = args[0][mask].double()  # padding (right, causal: it changes no real token) is left out
            w = gate.weight.double() + scale * ridge(x, targets, lam).T
            gate.weight.copy_(w.to(gate.weight.dtype))
        return hook

    hooks = [layer.mlp.register_forward_pre_hook(refit(layer.mlp.gate)) for layer in model.model.layers]
    try:
        model.eval()
        model.model(input_ids=ids, attention_mask=mask.long())
    finally:
        for h in hooks:
            h.remove()
