import json

from transformers import AutoTokenizer

from stages import params as P
from stages.train_tokenizer import EOS, train_tokenizer

SAMPLES = [
    "def area(r):\n    return 3.14159 * r ** 2  # circle\n",
    "Ünïcödé, emoji 🚀 and tabs\tsurvive the round trip.",
    "  leading spaces and trailing  ",
]


def test_tokenizer_round_trip_through_auto_tokenizer(tmp_path):
    corpus = tmp_path / "train.jsonl"
    corpus.write_text("".join(json.dumps({"id": str(i), "text": f"The quick brown fox {i} jumps over the lazy dog."}) + "\n"
                              for i in range(200)))
    train_tokenizer(corpus, P.TokenizerParams(vocab_size=300, max_chars=10**6), tmp_path / "tok")
    tok = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert len(tok) == 300
    assert tok.eos_token == EOS and tok.pad_token_id != tok.eos_token_id
    for text in SAMPLES:  # byte-level: text never seen in training still round-trips exactly
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.decode(ids) == text
    # BPE learned merges from the corpus: a frequent word costs fewer tokens than its bytes
    assert len(tok("The quick brown fox", add_special_tokens=False)["input_ids"]) < len("The quick brown fox") / 2
