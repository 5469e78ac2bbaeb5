"""Canaries: random secrets planted in an owner's documents (stage prepare_owner) whose exposure
the audit measures against other secrets of the same shape (stage audit)."""
from __future__ import annotations

import random

from stages import params as P

ALPHABET = "abcdefghijklmnopqrstuvwxyz"


def random_secret(rng: random.Random) -> str:
    """16 random lowercase letters in 4 groups: the shape of every secret, planted or candidate."""
    return " ".join("".join(rng.choice(ALPHABET) for _ in range(4)) for _ in range(4))


def plant_canaries(train: list[dict], val: list[dict], c: P.CanaryParams, name: str) -> list[dict]:
    """Append random secrets to documents: each training secret to `repeats` distinct training
    documents, and `held_out` secrets once each to held-out documents (recorded with repeats 0).

    A secret is 16 random lowercase letters in 4 groups after a fixed phrase, so it appears nowhere
    else and its exposure can be measured against every other secret of the same shape. Held-out
    secrets are never trained on: they are the audit's control, and the boundary test's proof
    that held-out text stays with the owner too.
    """
    rng = random.Random(f"canaries-{c.seed}-{name}")
    prefix = f"The access code of the {name} archive is"
    planted = []
    plan = [(train, r) for r in c.repeats for _ in range(c.per_repeat)] + [(val, 0)] * c.held_out
    for docs, repeats in plan:
        split = "train" if repeats else "val"
        if max(repeats, 1) > len(docs):
            raise ValueError(f"corpus {name}: canaries need {max(repeats, 1)} {split} documents, it has {len(docs)}; "
                             "lower canaries.repeats (or canaries.held_out) or add documents")
        secret = random_secret(rng)
        for doc in rng.sample(docs, max(repeats, 1)):
            doc["text"] = f"{doc['text']}\n\n{prefix} {secret}."
        planted.append({"prefix": prefix, "secret": secret, "repeats": repeats, "split": split})
    return planted
