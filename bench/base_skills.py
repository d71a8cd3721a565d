"""What the tiny base learnt in pretraining, without running the pipeline: the skills the SFT stages
of the embedded default build on.

    python bench/base_skills.py [--set max_steps=600 --set copy_warmup.steps=0 ...] [--n-records 2400]

Builds the `embedding` stage's synthetic corpus from params.yaml (or `--n-records`), pretrains a
tiny base with `tasks.base.build_tiny_base` (`model.tiny` from params.yaml; `--set` overrides keys
of `model.tiny` or `model.tiny.pretrain`), then greedy-decodes held-out prompts, each after one
true world sentence so a prompt never starts a document:
  copy   a drilled sequence said again (`reads out: owl 7 Tom. She says it again:`)
  facts  a one-digit sum or difference (`7 + 5 =`)
  count  counts read off a story and one fact applied (`Tom has 4 eggs. He buys 3 more. Now Tom
         has` -> `7`): what the thinking stage builds on
  name   the story's name copied (`Tom has 4 eggs. He buys 3 more. Now` -> `Tom`); chance is 1 in 12
  retell one of two counts said again (`Tom has 4 eggs. Ada has 7 pens. So Ada has` -> `7 pens`):
         copying by the name before it, which is what a thinking step does with the question
  slots  a slot value read off a request, in the corpus's own form (`Tom asks: Play jazz in the
         kitchen. As JSON: {"intent": "play_music", "slots": {"genre": "` -> `jazz`): what the
         syntax stage builds on; chance is about 1 in 8
Settings and scores are printed as JSON (last line: the scores alone) and written to
bench/results/base_skills.json. A base takes ~2 minutes at the default settings on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

PROMPTS_PER_SKILL = 40


def tiny_config(overrides: list[str]):
    """`model.tiny` from params.yaml with `key=value` overrides (a `pretrain` key or a model key)."""
    from tasks.core.config import TinyModelConfig, load_params

    tiny = load_params(PROJECT / "params.yaml").model.tiny.model_dump()
    for item in overrides:
        key, _, value = item.partition("=")
        *path, leaf = key.split(".")
        section = tiny["pretrain"] if (path or [leaf])[0] in tiny["pretrain"] else tiny
        for part in path:
            child = section.get(part)
            section = child if isinstance(child, dict) else {}
        if leaf not in section or isinstance(section[leaf], dict):
            raise SystemExit(f"--set {item}: no such key in model.tiny or model.tiny.pretrain")
        section[leaf] = type(section[leaf])(value)
    return TinyModelConfig(**tiny)


def skill_prompts(rng: random.Random) -> dict[str, list[tuple[str, str]]]:
    """(prompt, expected start of the continuation) per skill."""
    from tasks.data.synthetic import MAX_OPERAND, NAMES, PEOPLE, WORLD, arithmetic_facts, copy_drill, syntax_example

    def context(name: str) -> str:
        return f"{name} lives in {WORLD[name]['town']}. "

    prompts: dict[str, list[tuple[str, str]]] = {"copy": [], "facts": [], "count": [], "name": [], "retell": [], "slots": []}
    for _ in range(PROMPTS_PER_SKILL):
        name = rng.choice(NAMES)
        head, _, tail = copy_drill(rng, name).partition(" says it again:")
        prompts["copy"].append((context(name) + head + " says it again:", tail.removesuffix(".")))
        a, op, b, c = rng.choice(arithmetic_facts())
        prompts["facts"].append((context(name) + f"{a} {op} {b} =", f" {c}."))
        have, more = rng.randint(1, MAX_OPERAND), rng.randint(1, MAX_OPERAND)
        story = context(name) + f"{name} has {have} eggs. {PEOPLE[name].capitalize()} buys {more} more. Now"
        prompts["count"].append((f"{story} {name} has", f" {have + more} eggs"))
        prompts["name"].append((story, f" {name}"))
    for _ in range(PROMPTS_PER_SKILL):  # drawn after the others, which stay the prompts they were
        name = rng.choice(NAMES)
        other = rng.choice([n for n in NAMES if n != name])
        counts = {name: (rng.randint(1, MAX_OPERAND), "eggs"), other: (rng.randint(1, MAX_OPERAND), "pens")}
        asked = rng.choice([name, other])
        told = " ".join(f"{who} has {n} {things}." for who, (n, things) in counts.items())
        prompts["retell"].append((context(name) + f"{told} So {asked} has", " {} {}".format(*counts[asked])))
    for _ in range(PROMPTS_PER_SKILL):
        name = rng.choice(NAMES)
        request, answer = syntax_example(rng)  # every request template carries a slot
        prompts["slots"].append(_slot_prompt(rng, context(name) + f"{name} asks: {request} As JSON: ", answer))
    return prompts


def _slot_prompt(rng: random.Random, prompt: str, answer: str) -> tuple[str, str]:
    """The answer cut just before one of its slot values: (prompt + that cut, the value)."""
    slot, value = rng.choice(list(json.loads(answer)["slots"].items()))
    cut = answer.index(f'"{slot}": ') + len(f'"{slot}": ') + isinstance(value, str)
    return prompt + answer[:cut], str(value)


def greedy_scores(base_dir: Path, prompts: dict[str, list[tuple[str, str]]]) -> dict[str, float]:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(base_dir)
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()

    def continues_with(prompt: str, expected: str) -> bool:
        ids = tokenizer(prompt, return_tensors="pt").input_ids
        with torch.no_grad():
            out = model.generate(ids, max_new_tokens=len(tokenizer(expected).input_ids) + 2, do_sample=False)
        return tokenizer.decode(out[0, ids.shape[1]:]).startswith(expected)

    return {skill: sum(continues_with(p, e) for p, e in pairs) / len(pairs) for skill, pairs in prompts.items()}


def summary(scores: dict[str, float]) -> str:
    return "  ".join(f"{skill} {score:.2f}" for skill, score in scores.items())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a model.tiny or model.tiny.pretrain key")
    parser.add_argument("--n-records", type=int, default=None, help="embedding corpus size (default: params.yaml's)")
    parser.add_argument("--seed", type=int, default=None, help="default: params.yaml's")
    parser.add_argument("--keep", type=Path, default=None, metavar="DIR", help="save the base here (default: thrown away)")
    parser.add_argument("--score", type=Path, default=None, metavar="DIR", help="score this saved base; no pretraining")
    args = parser.parse_args()

    from tasks.base import build_tiny_base
    from tasks.core.config import load_params
    from tasks.data.synthetic import generate_stage_records

    params = load_params(PROJECT / "params.yaml")
    seed = params.seed if args.seed is None else args.seed
    prompts = skill_prompts(random.Random(f"{seed}:base-skills"))
    if args.score:
        print("base skills:", summary(greedy_scores(args.score, prompts)), f"  ({args.score})")
        return
    n_records = args.n_records or params.stages["embedding"].data.n_records
    tiny = tiny_config(args.set)
    corpus = [r["text"] for r in generate_stage_records("embedding", "pretrain", n_records, seed)]
    with tempfile.TemporaryDirectory() as work:
        base_dir = args.keep or Path(work)
        start = time.perf_counter()
        build_tiny_base(tiny, corpus, seed, base_dir)
        seconds = time.perf_counter() - start
        scores = greedy_scores(base_dir, prompts)
    result = {"settings": {"seed": seed, "embedding_records": n_records, "tiny": tiny.model_dump(),
                           "prompts_per_skill": PROMPTS_PER_SKILL, "decoding": "greedy"},
              "pretrain_seconds": round(seconds, 1), "scores": scores}
    print(json.dumps(result, indent=2))
    print("base skills:", summary(scores), f"  (pretraining {seconds:.0f} s)")
    out = PROJECT / "bench" / "results" / "base_skills.json"
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
