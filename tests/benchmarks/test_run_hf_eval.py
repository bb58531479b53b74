"""benchmarks/run_hf_eval.py on the CPU: NIAH prompt construction with a stand-in tokenizer (exact length,
needle at the requested depth on a sentence boundary, question last), scoring, and a run with a stand-in
engine."""

import json
import os
import re
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))),
                                "benchmarks"))
import run_hf_eval as hf  # noqa: E402


class WordTokenizer:
    """Words, digit runs, punctuation and whitespace runs as tokens; decode joins them back."""

    def __init__(self):
        self.vocab, self.words = {}, []

    def encode(self, text, add_special_tokens=False):
        ids = []
        for piece in re.findall(r"\s+|\w+|[^\w\s]", text):
            if piece not in self.vocab:
                self.vocab[piece] = len(self.words)
                self.words.append(piece)
            ids.append(self.vocab[piece])
        return ids

    def decode(self, ids):
        return "".join(self.words[i] for i in ids)

    def apply_chat_template(self, messages, tokenize=True, add_generation_prompt=True):
        return self.encode(f"<user>{messages[0]['content']}</user><assistant>")


@pytest.mark.parametrize("depth", [0.0, 0.3, 0.5, 1.0])
def test_prompt_has_the_length_and_the_needle_at_its_depth(depth):
    tok = WordTokenizer()
    ids, at = hf.build_prompt(tok, 600, depth, "Osaka", "4812093")
    assert len(ids) == 600
    text = tok.decode(ids)
    assert text.count("4812093") == 1 and text.endswith(hf.question("Osaka"))
    needle = tok.encode(hf.needle_sentence("Osaka", "4812093"))
    assert ids[at:at + len(needle)] == needle
    hay_len = 600 - len(needle) - len(tok.encode(hf.question("Osaka")))
    assert abs(at - depth * hay_len) <= 40  # the nearest sentence boundary (sentences are ~35 tokens)
    assert at in (0, hay_len) or tok.decode([ids[at - 1]]) == "."


def test_chat_template_wraps_the_same_text_within_the_length():
    tok = WordTokenizer()
    ids, _ = hf.build_prompt(tok, 500, 0.5, "Quito", "1234567", chat_template=True)
    text = tok.decode(ids)
    assert text.startswith("<user>") and text.endswith("</user><assistant>") and "1234567" in text
    assert abs(len(ids) - 500) <= 2


def test_too_short_length_and_bad_depth_are_rejected():
    with pytest.raises(ValueError, match="no room"):
        hf.build_prompt(WordTokenizer(), 20, 0.5, "Quito", "1234567")
    with pytest.raises(ValueError, match="depth"):
        hf.build_prompt(WordTokenizer(), 500, 1.5, "Quito", "1234567")


def test_score():
    assert hf.score(" 4812093.", "4812093")
    assert hf.score("The number is 4812093, I think", "4812093")
    assert not hf.score("48120931", "4812093") and not hf.score("481 2093", "4812093") and not hf.score("", "1")


def test_run_with_a_stand_in_engine(tmp_path):
    tok = WordTokenizer()
    calls = []

    def generate(kwargs, prompts, max_new_tokens):  # flashinfer answers, mage answers only the shallow needles
        calls.append(kwargs)
        outs = []
        for p in prompts:
            text = tok.decode(p)
            value = re.search(r"magic number for \w+ is (\d+)\.", text).group(1)
            shallow = text.index(value) < len(text) / 2
            outs.append(tok.encode(f" {value}." if kwargs["attention_backend"] == "flashinfer" or shallow else " 0."))
        return outs

    out = tmp_path / "niah.json"
    res = hf.main(["--model-path", "/m", "--lengths", "300", "--depths", "0", "1", "--samples", "2", "--ks", "64",
                   "--out", str(out)], tokenizer=tok, generate=generate, log=lambda *_: None)
    acc = {(r["backend"], r["depth"]): r["accuracy"] for r in res["rows"]}
    assert acc == {("flashinfer", 0.0): 1.0, ("flashinfer", 1.0): 1.0, ("mage", 0.0): 1.0, ("mage", 1.0): 0.0}
    assert json.loads(out.read_text())["rows"] == res["rows"] and res["prompt_lengths"] == [300]
    assert calls[1]["mage_k"] == 64 and calls[1]["skip_tokenizer_init"] and "mage_k" not in calls[0]
