"""An SGLang frontend-language program (`sgl.function` + `gen`) against a server running mage.

    bash examples/serve_tiny.sh --text --keep &      # or any launch_server ... --attention-backend mage
    python examples/frontend_program.py --url http://127.0.0.1:30000

The program is ordinary SGLang: nothing in it names MAGE. With the dummy-weight tiny model the answer is
noise (`<t123> <t456> ...`); it shows that prompts, generation and streaming go through the mage backend.
"""

import argparse

import sglang as sgl


@sgl.function
def answer_about(s, document: str, question: str):
    s += "Document: " + document + "\n"
    s += "Question: " + question + "\n"
    s += "Answer:" + sgl.gen("answer", max_tokens=16, temperature=0)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser()
    ap.add_argument("--url", default="http://127.0.0.1:30000")
    args = ap.parse_args(argv)
    sgl.set_default_backend(sgl.RuntimeEndpoint(args.url))
    doc = " ".join(f"<t{1000 + i}>" for i in range(2000))  # a 2K-word document
    states = answer_about.run_batch(
        [{"document": doc, "question": "<t7> <t8> <t9>"}, {"document": doc[:3000], "question": "<t10>"}]
    )
    answers = {i: st["answer"] for i, st in enumerate(states)}
    for i, a in answers.items():
        print(f"answer {i}: {a!r}")
    return answers


if __name__ == "__main__":
    main()
