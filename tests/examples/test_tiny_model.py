"""examples/tiny_model.py: the dummy model's config and its word-level tokenizer, which text clients need."""

import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))), "examples"))
from tiny_model import TINY_SDAR, write  # noqa: E402


def test_config_only_by_default(tmp_path):
    path = write(str(tmp_path / "m"))
    assert os.listdir(path) == ["config.json"]
    assert json.load(open(os.path.join(path, "config.json")))["architectures"] == ["SDARForCausalLM"]


def test_tokenizer_round_trips_every_id_and_maps_other_words_to_unk(tmp_path):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(write(str(tmp_path / "m"), tokenizer=True))
    assert len(tok) == TINY_SDAR["vocab_size"] and tok.eos_token_id == TINY_SDAR["eos_token_id"]
    ids = [5, 151669, TINY_SDAR["vocab_size"] - 1]
    assert tok.encode(tok.decode(ids), add_special_tokens=False) == ids
    assert tok.encode("<t7> hello", add_special_tokens=False) == [7, tok.unk_token_id]
