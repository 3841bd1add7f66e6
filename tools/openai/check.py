"""Checks the HTTP API of a running `kosmos serve` (demo model) with the official OpenAI Python SDK.

Each check prints one line; any failure exits 1. The gRPC answers to compare with come from `kosmos ask`, which calls
the gRPC API (GenerateStream) with the same prompt and parameters.
"""

import argparse
import base64
import subprocess
import sys
import time
import urllib.request

import openai


def wait_ready(base_url: str, timeout: float) -> None:
    ready = base_url.removesuffix("/v1") + "/ready"
    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(ready, timeout=2) as answer:
                if answer.status == 200:
                    return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise SystemExit(f"{ready} did not answer 200 within {timeout:.0f} s")
        time.sleep(0.5)


def grpc_answer(args, prompt: str, max_tokens: int, image: bool) -> str:
    command = [args.kosmos, "ask", "--addr", args.grpc, "--max-new-tokens", str(max_tokens)]
    if image:
        command += ["--image", args.image]
    done = subprocess.run(command + [prompt], check=True, capture_output=True, text=True)
    return done.stdout.removesuffix("\n")


def check(name: str, condition: bool, detail: object) -> None:
    if not condition:
        raise SystemExit(f"FAILED {name}: {detail}")
    print(f"ok   {name}")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--grpc", required=True)
    parser.add_argument("--kosmos", required=True)
    parser.add_argument("--image", required=True)
    args = parser.parse_args()
    wait_ready(args.base_url, 180)

    client = openai.OpenAI(base_url=args.base_url, api_key="unused", max_retries=0)
    model = client.models.list().data[0].id
    with open(args.image, "rb") as file:
        png = file.read()
    image_url = "data:image/png;base64," + base64.b64encode(png).decode()
    question = "Question: what color is the circle? Answer:"

    def messages(text: str, url: str = image_url) -> list:
        return [{"role": "user", "content": [
            {"type": "image_url", "image_url": {"url": url}},
            {"type": "text", "text": text},
        ]}]

    chat = client.chat.completions.create(model=model, messages=messages(question), max_tokens=16, temperature=0)
    content = chat.choices[0].message.content
    expected = grpc_answer(args, question, 16, image=True)
    check("chat completion with a data: image equals the gRPC answer", content == expected, (content, expected))

    stream = client.chat.completions.create(
        model=model, messages=messages(question), max_tokens=16, temperature=0, stream=True,
        stream_options={"include_usage": True},
    )
    pieces, usage = [], None
    for chunk in stream:
        if chunk.choices:
            pieces.append(chunk.choices[0].delta.content or "")
        if chunk.usage is not None:
            usage = chunk.usage
    joined = "".join(pieces)
    check("streaming joins to the same text", joined == content, (joined, content))
    check("streaming ends with a usage chunk",
          usage is not None and usage.completion_tokens == chat.usage.completion_tokens, usage)

    with_logprobs = client.chat.completions.create(
        model=model, messages=messages(question), max_tokens=4, temperature=0, logprobs=True, top_logprobs=3,
    )
    entries = with_logprobs.choices[0].logprobs.content
    check("logprobs: one entry per token, three alternatives each",
          entries and all(e.logprob <= 0 and len(e.top_logprobs) == 3 for e in entries), entries)

    completion = client.completions.create(model=model, prompt="An image of", max_tokens=8, temperature=0)
    text = completion.choices[0].text
    expected = grpc_answer(args, "An image of", 8, image=False)
    check("a text-only completion equals the gRPC answer", text == expected, (text, expected))

    grounded = client.chat.completions.create(
        model=model, messages=messages("An image of"), max_tokens=64, temperature=0,
        extra_body={"grounding": True},
    )
    entities = (grounded.choices[0].message.model_extra or {}).get("entities") or []
    boxes_ok = all(
        0 <= b["x1"] <= b["x2"] <= 1 and 0 <= b["y1"] <= b["y2"] <= 1 for e in entities for b in e["boxes"]
    ) and all(len(e["boxes_px"]) == len(e["boxes"]) for e in entities)
    check("grounding: entities with boxes and pixel boxes", entities and boxes_ok, grounded.choices[0].message)

    try:
        client.chat.completions.create(
            model=model, messages=messages("x", "data:image/png;base64,bm90IGFuIGltYWdl"), max_tokens=4,
        )
    except openai.BadRequestError as err:
        check("a broken image is a BadRequestError naming the field", "image_url" in str(err), err)
    else:
        check("a broken image is a BadRequestError", False, "the request succeeded")


if __name__ == "__main__":
    sys.exit(main())
