"""Answer prompts with a registered version through transformers: the CPU smoke path that shows
what the registry holds is servable as it is (base from the version's `base/` artifact, adapter
chain from its runs; see tasks/core/bundle.py). Greedy, with the model's chat template, stopping at
its end of turn (`<|im_end|>`) as well as at eos.

    python -m tasks.serve --prompt "What is 2+2?"                  # models:/stagewise-assistant@champion
    python -m tasks.serve --model models:/stagewise-assistant@challenger --prompt "Hi" --prompt "2+2?"
    python -m tasks.serve --no-enable-thinking --prompt "Book a table for two."  # Qwen3: answer without thinking
    printf 'What is 2+2?\\nName a colour.\\n' | python -m tasks.serve --json   # prompts from stdin, one a line
    python -m tasks.serve --download /srv/stagewise                # only the files (for infra/vllm/serve.sh --lora)

The tracking server is `MLFLOW_TRACKING_URI`, else `sqlite:///mlflow.db` in the current folder.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import tempfile
from pathlib import Path

DEFAULT_MODEL = "models:/stagewise-assistant@champion"


def chat_prompts(tokenizer, prompts: list[str], enable_thinking: bool | None = None) -> list[str]:
    """Each prompt as one user turn, rendered with the model's chat template up to the reply
    (`enable_thinking` None: the template's own default; Qwen3's thinks)."""
    from tasks.evaluation.scoring import reply_prompts

    return reply_prompts(tokenizer, [[{"role": "user", "content": p}] for p in prompts], enable_thinking)


def answer(model, tokenizer, prompts: list[str], max_new_tokens: int, batch_size: int = 8,
           enable_thinking: bool | None = None) -> list[str]:
    """Greedy replies, generated as `evaluate` generates them: stopping at the template's end of turn."""
    from tasks.core.config import EvaluateConfig
    from tasks.evaluation.scoring import generate_replies

    cfg = EvaluateConfig(batch_size=batch_size, max_new_tokens=max_new_tokens)
    return generate_replies(model, tokenizer, chat_prompts(tokenizer, prompts, enable_thinking), cfg)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tasks.serve", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=DEFAULT_MODEL, help=f"models:/<name>@<alias> or models:/<name>/<version> (default {DEFAULT_MODEL})")
    parser.add_argument("--prompt", action="append", default=[], help="a user message; repeat for several (default: stdin, one a line)")
    parser.add_argument("--max-new-tokens", type=int, default=128)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--enable-thinking", action=argparse.BooleanOptionalAction, default=None,
                        help="the chat template's thinking switch (Qwen3's enable_thinking); default: the template's own")
    parser.add_argument("--json", action="store_true", help="one JSON object a line: {prompt, reply}")
    parser.add_argument("--download", metavar="DIR", help="download the version's files to DIR, print where they are, and stop")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s", force=True)
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")  # stderr is for what went wrong
    os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

    from mlflow import MlflowClient
    from transformers.utils import logging as transformers_logging

    from tasks.core.bundle import BundleError, download_version, load_version, resolve_version
    from tasks.core.tracking import configure_mlflow

    configure_mlflow()
    transformers_logging.disable_progress_bar()
    client = MlflowClient()
    try:
        version = resolve_version(client, args.model)
        if args.download:
            files = download_version(client, version, Path(args.download))
            print(json.dumps({"model": args.model, "version": files.version, "base": files.base.name_or_path,
                              "merged_chain": [str(p) for _, p in files.merged_chain], "adapter": str(files.adapter)}, indent=2))
            return 0
        prompts = args.prompt or [line.rstrip("\n") for line in sys.stdin if line.strip()]
        if not prompts:
            parser.error("no prompts: pass --prompt or write them to stdin, one a line")
        with tempfile.TemporaryDirectory() as tmp:
            files = download_version(client, version, Path(tmp))
            model, tokenizer = load_version(files)
        print(f"serve: {args.model} = v{files.version} ({files.describe()})", file=sys.stderr)
        replies = answer(model, tokenizer, prompts, args.max_new_tokens, args.batch_size, args.enable_thinking)
    except BundleError as error:
        print(f"serve: {error}", file=sys.stderr)
        return 2
    for prompt, reply in zip(prompts, replies):
        print(json.dumps({"prompt": prompt, "reply": reply}, ensure_ascii=False) if args.json else reply)
    return 0


if __name__ == "__main__":
    sys.exit(main())
