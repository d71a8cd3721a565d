"""Does the vLLM server answer as the merged model does? Greedy replies from transformers (the
reference) against the server's, prompt by prompt; exits 1 on a mismatch.

Two steps, because the reference and the server do not fit on one card together:

    python infra/vllm/smoke.py reference --model exports/merged --out smoke_refs.json   # before the server starts
    bash infra/vllm/serve.sh &                                                          # merged, or --lora
    python infra/vllm/smoke.py check --refs smoke_refs.json --url http://localhost:8000

The server gets the reference's exact prompt token ids (`/v1/completions`, temperature 0, stop on
the tokenizer's end-of-turn id), so no server-side chat template stands between the two. bf16
kernels differ between transformers and vLLM, so greedy decoding may part at a near-tie late in a
reply: a reply passes when it is identical or agrees on its first `--min-prefix` tokens. A LoRA the
server dropped (the model answers like its base) differs from the first tokens on.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request

DEFAULT_PROMPTS = [
    "Tom has 3 apples and buys 4 more. How many apples does he have?",
    "Book a table for two at eight tonight. Answer in JSON.",
    "Think step by step: what is 12 times 7?",
    "Write one sentence about the sea.",
]


def reference(args) -> int:
    """Greedy replies of the merged checkpoint through transformers, with their prompt token ids."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    prompts = read_prompts(args.prompts_file) if args.prompts_file else DEFAULT_PROMPTS
    device = "cuda" if torch.cuda.is_available() else "cpu"
    dtype = {"auto": torch.bfloat16 if device == "cuda" else torch.float32, "bf16": torch.bfloat16,
             "fp32": torch.float32}[args.dtype]
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype, use_safetensors=True).to(device).eval()
    eos = tokenizer.eos_token_id
    rows = []
    for prompt in prompts:  # one at a time: no padding to differ from the server's
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True)
        ids = tokenizer(text, add_special_tokens=False)["input_ids"]
        with torch.no_grad():
            out = model.generate(torch.tensor([ids], device=device), max_new_tokens=args.max_tokens, do_sample=False,
                                 eos_token_id=eos, pad_token_id=tokenizer.pad_token_id or eos)
        reply_ids = [t for t in out[0, len(ids):].tolist() if t != eos]
        rows.append({"prompt": prompt, "prompt_ids": ids, "reply": tokenizer.decode(reply_ids, skip_special_tokens=True),
                     "reply_ids": reply_ids})
    refs = {"model": os.path.abspath(args.model), "dtype": str(dtype).removeprefix("torch."), "eos_token_id": eos,
            "max_tokens": args.max_tokens, "rows": rows}
    with open(args.out, "w") as f:
        json.dump(refs, f, indent=2, ensure_ascii=False)
    print(f"smoke: {len(rows)} reference replies from {args.model} ({refs['dtype']}, {device}) -> {args.out}")
    return 0


def check(args) -> int:
    """Ask the server for each reference prompt and compare; 0 when every reply matches."""
    with open(args.refs) as f:
        refs = json.load(f)
    base = args.url.rstrip("/")
    served = [m["id"] for m in request(f"{base}/v1/models", None, args.api_key)["data"]]
    if args.served_name not in served:
        print(f"smoke: the server at {base} serves {served}, not {args.served_name!r} (--served-name)", file=sys.stderr)
        return 2
    tokenizer = None
    failures = 0
    for row in refs["rows"]:
        body = {"model": args.served_name, "prompt": row["prompt_ids"], "max_tokens": refs["max_tokens"],
                "temperature": 0, "stop_token_ids": [refs["eos_token_id"]], "skip_special_tokens": True}
        text = request(f"{base}/v1/completions", body, args.api_key)["choices"][0]["text"]
        if text == row["reply"]:
            print(f"ok       {row['prompt'][:60]!r}")
            continue
        if tokenizer is None:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(refs["model"])
        agree = common_prefix(row["reply_ids"], tokenizer(text, add_special_tokens=False)["input_ids"])
        if agree >= args.min_prefix:
            print(f"ok       {row['prompt'][:60]!r} (first {agree} tokens agree, then a near-tie parts them)")
            continue
        failures += 1
        print(f"MISMATCH {row['prompt'][:60]!r}: {agree} tokens agree\n  reference: {row['reply']!r}\n  server:    {text!r}")
    print(f"smoke: {len(refs['rows']) - failures}/{len(refs['rows'])} replies match {refs['model']}")
    return 1 if failures else 0


def common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def request(url: str, body: dict | None, api_key: str | None) -> dict:
    headers = {"Content-Type": "application/json"}
    if api_key:
        headers["Authorization"] = f"Bearer {api_key}"
    data = None if body is None else json.dumps(body).encode()
    try:
        with urllib.request.urlopen(urllib.request.Request(url, data=data, headers=headers), timeout=300) as response:
            return json.loads(response.read())
    except urllib.error.HTTPError as error:
        raise SystemExit(f"smoke: {url} answered {error.code}: {error.read()[:500]!r}") from None
    except urllib.error.URLError as error:
        raise SystemExit(f"smoke: cannot reach {url} ({error.reason}): is the server up?") from None


def read_prompts(path: str) -> list[str]:
    with open(path) as f:
        return [line.rstrip("\n") for line in f if line.strip()]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="smoke.py", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    ref = sub.add_parser("reference", help="greedy replies of the merged model through transformers")
    ref.add_argument("--model", default="exports/merged", help="the merged checkpoint (default exports/merged)")
    ref.add_argument("--out", default="smoke_refs.json")
    ref.add_argument("--prompts-file", help="one prompt a line (default: four built-in prompts)")
    ref.add_argument("--max-tokens", type=int, default=48)
    ref.add_argument("--dtype", choices=["auto", "bf16", "fp32"], default="auto", help="auto: bf16 on a GPU, fp32 on CPU")
    chk = sub.add_parser("check", help="the server's replies against the reference's")
    chk.add_argument("--refs", default="smoke_refs.json")
    chk.add_argument("--url", default="http://localhost:8000")
    chk.add_argument("--served-name", default="stagewise", help="the model name to ask for (serve.sh's SERVED_NAME)")
    chk.add_argument("--min-prefix", type=int, default=16, help="tokens that must agree when replies differ")
    chk.add_argument("--api-key", default=os.environ.get("VLLM_API_KEY"))
    args = parser.parse_args(argv)
    return reference(args) if args.command == "reference" else check(args)


if __name__ == "__main__":
    sys.exit(main())
