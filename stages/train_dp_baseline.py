"""Stage (owner side): the price of differential privacy, measured by the owner who pays it.

For an owner with `owners.<name>.dp` set, trains the same expert with the same params but without
DP into the owner's private folder, so its evaluation can put the DP expert's domain loss and
step time next to the non-private twin's (the report's DP table). It is never published and
never merged. For an owner without DP the stage writes only a stub.
"""
from __future__ import annotations

from pathlib import Path

from stages import params as P
from stages.artifacts import BASELINE_INFO
from stages.io import atomic_dir, parse_expert_cli, write_json
from stages.runtime import start_stage

# torch and the training code are imported only for a DP owner: every other owner's stage just
# writes its stub and should not spend seconds importing them.



def train_dp_baseline(owner: str, corpus_train: Path, public_train: Path, anchor_dir: Path, public_embedding: Path,
                      params: P.Params, out_dir: Path, log_path: Path, checkpoint: Path, signing_key: Path) -> dict:
    if params.owners[owner].dp is None:
        with atomic_dir(out_dir) as tmp:
            write_json(tmp / BASELINE_INFO, {"enabled": False})
        log_path.parent.mkdir(parents=True, exist_ok=True)
        log_path.write_text("")  # a declared output, like the trained run's log
        return {"enabled": False}
    from stages.train_expert import train_expert

    # A DP expert trains in one stage (stages/train/dp.py), so its twin does too: the gap is DP's alone.
    one_stage = params.expert.model_copy(update={"curriculum": P.CurriculumParams()})
    summary = train_expert(owner, corpus_train, public_train, anchor_dir, public_embedding, one_stage,
                           params.expert_train(owner), out_dir, log_path, checkpoint, signing_key, dp=None)
    return {"enabled": True, **summary}


def main(argv: list[str] | None = None) -> None:
    start_stage()
    args, params = parse_expert_cli(__doc__, argv)
    summary = train_dp_baseline(args.owner, args.corpus, args.public_corpus, args.anchor, args.public_embedding, params,
                                args.out, args.train_log, args.checkpoint, args.signing_key)
    write_json(args.metrics, summary)
    if summary["enabled"]:
        print(f"non-DP baseline of {args.owner}: loss {summary['final_loss']:.3f}, {summary['tokens_per_s']:,.0f} tokens/s")
    else:
        print(f"non-DP baseline of {args.owner}: not needed (owners.{args.owner}.dp is not set)")


if __name__ == "__main__":
    main()
