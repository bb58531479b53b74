"""Write the config of a tiny SDAR model (dummy weights; SGLang's dLLM architecture SDARForCausalLM) to a folder."""

import json
import os
import sys

TINY_SDAR = {
    "architectures": ["SDARForCausalLM"],
    "model_type": "qwen3",  # SDAR is Qwen3-shaped; transformers knows this config class
    "vocab_size": 151936,  # SDAR's [MASK] id 151669 must be inside the vocabulary
    "hidden_size": 512,
    "intermediate_size": 1024,
    "num_hidden_layers": 3,
    "num_attention_heads": 8,
    "num_key_value_heads": 4,
    "head_dim": 128,
    "max_position_embeddings": 16384,
    "rms_norm_eps": 1e-6,
    "rope_theta": 1000000.0,
    "tie_word_embeddings": False,
    "torch_dtype": "bfloat16",
    "bos_token_id": 151643,
    "eos_token_id": 151643,
}


def write(path: str, tokenizer: bool = False) -> str:
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as f:
        json.dump(TINY_SDAR, f, indent=1)
    if tokenizer:
        write_tokenizer(path)
    return path


def prompt_token_range(model_path: str | None) -> tuple[int, int]:
    """Token ids that random prompts may use: the dummy model's default range, or, for a checkpoint,
    its own vocabulary above the special ids (the shipped tiny model has 1024 tokens, ids < 16 special)."""
    if model_path is None:
        return (100, 150000)
    with open(os.path.join(model_path, "config.json")) as f:
        vocab = json.load(f)["vocab_size"]
    return (16, vocab) if vocab <= 4096 else (100, vocab - 1000)


def write_tokenizer(path: str) -> None:
    """A word-level tokenizer over the whole vocabulary (token i is spelled `<t{i}>`), so that text
    clients (the frontend language, the OpenAI API) can talk to a dummy-weight model: any id decodes,
    and a prompt's words that are not `<t{i}>` map to <unk>. Only plumbing can be checked with it."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = {0: "<unk>", TINY_SDAR["eos_token_id"]: "<|endoftext|>", 151669: "<|MASK|>"}
    vocab = {specials.get(i, f"<t{i}>"): i for i in range(TINY_SDAR["vocab_size"])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="<|endoftext|>",
                                   pad_token="<|endoftext|>")
    fast.save_pretrained(path)


if __name__ == "__main__":
    print(write(sys.argv[1], tokenizer="--tokenizer" in sys.argv[2:]))
