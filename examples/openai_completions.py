"""OpenAI-compatible completions against a server running mage (`openai` client).

    bash examples/serve_tiny.sh --text --keep &
    python examples/openai_completions.py --url http://127.0.0.1:30000/v1
"""

import argparse


def main(argv=None) -> str:
    from openai import OpenAI

    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:30000/v1")
    ap.add_argument("--model", default="default")
    args = ap.parse_args(argv)
    client = OpenAI(base_url=args.url, api_key="EMPTY")
    prompt = " ".join(f"<t{2000 + i}>" for i in range(1500))
    out = client.completions.create(model=args.model, prompt=prompt, max_tokens=16, temperature=0)
    text = out.choices[0].text
    print(f"completion ({out.usage.completion_tokens} tokens): {text!r}")
    return text


if __name__ == "__main__":
    main()
