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


def router_parameters(model) -> dict[str, torch.nn.Parameter]:
    """The router rows of every layer: the only weights router tuning changes."""
    return {name: p for name, p in model.named_parameters() if ".mlp.gate." in name}


def router_state(model) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone().contiguous() for name, p in router_parameters(model).items()}


@torch.no_grad()
def set_router_state(model, state: dict[str, torch.Tensor], source: str = "router state") -> None:
    """Put a saved router (a candidate of stage tune_router) into a merged model of the same shape."""
    params = router_parameters(model)
    if set(params) != set(state) or any(params[k].shape != state[k].shape for k in state):
        raise ValueError(f"{source}: its router tensors do not fit this merged model (was it fitted on another "
                         f"merge? run stage tune_router again)")
    for name, tensor in state.items():
        params[name].copy_(tensor)


def packed_rows(docs: list[np.ndarray], seq_len: int) -> torch.Tensor:
    """One domain's documents packed end to end and cut into rows of seq_len + 1 tokens."""
    stream = np.concatenate(docs) if docs else np.zeros(0, dtype=np.int64)
    n = (len(stream) - 1) // seq_len
    return torch.from_numpy(np.stack([stream[i * seq_len:i * seq_len + seq_len + 1] for i in range(n)]
                                     ).astype(np.int64)) if n > 0 else torch.zeros(0, seq_len + 1, dtype=torch.long)


def balanced_rows(tokenizer, texts: dict[str, list[str]], seq_len: int, held_out_fraction: float
                  ) -> tuple[torch.Tensor, torch.Tensor, dict[str, int]]:
    """Training and held-out rows with as many rows from every domain, in the order of `texts`, the
    held-out ones the last of each domain's; and the training rows per domain. The smallest domain
    sets the count (at least two rows: one to learn on, one held out)."""
    eos = tokenizer.eos_token_id
    rows = {}
    for domain, domain_texts in texts.items():
        docs = [np.array([eos, *ids]) for ids in tokenizer(domain_texts, add_special_tokens=False)["input_ids"] if ids]
        rows[domain] = packed_rows(docs, seq_len)
    n = min(len(r) for r in rows.values())
    if n < 2:
        short = min(rows, key=lambda d: len(rows[d]))
        raise ValueError(f"router tuning: {short!r}'s proxy text makes {n} row(s) of {seq_len + 1} tokens; at least "
                         f"two are needed (one to learn on, one held out): lower router_tuning.seq_len or raise "
                         f"synthesis.min_tokens")
    held = max(1, round(held_out_fraction * n))
    train = torch.cat([r[:n - held] for r in rows.values()])
    held_out = torch.cat([r[n - held:n] for r in rows.values()])
    return train, held_out, {d: n - held for d in rows}
