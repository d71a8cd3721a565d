"""How far back the tiny base can learn to copy: the skill the `thinking` stage needs and the
embedded default's base does not have (`bench/base_skills.py`: copy 0.00).

    python bench/copy_distance.py [--distances 0 20 40 60] [--steps 300] [--set num_attention_heads=8 ...]

For each distance d, a fresh model of params.yaml's `model.tiny` architecture (random init, the
pipeline's config builder) trains `--steps` steps of AdamW (lr 3e-3, gradient clipping 1.0, batch
16) on rows of d random filler tokens, a marker, 5 random tokens, a second marker and the same 5
tokens again; the loss is on the copy alone. It prints the final copy loss and the share of copied
tokens predicted right. A copy is 6 tokens after its source at every distance, so the distance is
how much unrelated context comes before the pattern (a thinking prompt puts 30-60 tokens between
a count in the question and the step that repeats it). Same data, steps and precision (fp32) for
every distance. A distance takes ~15 s on 2 cores.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

COPY_LENGTH = 5
START, AGAIN = 2, 3  # marker token ids; copied tokens are drawn from [10, 200), filler from [300, 400)


def copy_rows(generator, rows: int, distance: int):
    """[rows, distance + 2 * COPY_LENGTH + 2] token ids and labels (-100 but on the copy)."""
    import torch

    seq = torch.randint(10, 200, (rows, COPY_LENGTH), generator=generator)
    filler = torch.randint(300, 400, (rows, distance), generator=generator)
    ids = torch.cat([filler, torch.full((rows, 1), START), seq, torch.full((rows, 1), AGAIN), seq], dim=1)
    labels = ids.clone()
    labels[:, : distance + COPY_LENGTH + 2] = -100
    return ids, labels


def train_at(distance: int, steps: int, overrides: dict[str, int], seed: int = 0) -> dict[str, float]:
    import torch
    from transformers import Qwen3MoeForCausalLM

    from tasks.core.config import load_params
    from tasks.core.modeling import tiny_config

    torch.manual_seed(seed)
    tiny = load_params(PROJECT / "params.yaml").model.tiny.model_copy(update=overrides)
    model = Qwen3MoeForCausalLM(tiny_config(tiny, tiny.vocab_size, 0, 1))
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        ids, labels = copy_rows(generator, 16, distance)
        loss = model(input_ids=ids, labels=labels).loss
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
    ids, labels = copy_rows(generator, 64, distance)
    with torch.no_grad():
        out = model(input_ids=ids, labels=labels)
    predicted = out.logits[:, :-1].argmax(-1)
    target = labels[:, 1:]
    copied = target != -100
    return {"distance": distance, "copy_loss": round(float(out.loss), 3),
            "copy_accuracy": round(float((predicted[copied] == target[copied]).float().mean()), 3)}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--distances", type=int, nargs="+", default=[0, 20, 40, 60])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help="a model.tiny key (an int)")
    args = parser.parse_args(argv)
    overrides = {k: int(v) for k, _, v in (item.partition("=") for item in args.set)}
    import torch

    settings = {"steps": args.steps, "batch": 16, "lr": 3e-3, "precision": "fp32", "copy_length": COPY_LENGTH,
                "tiny_overrides": overrides, "torch_threads": torch.get_num_threads()}
    results = [train_at(d, args.steps, overrides) for d in args.distances]
    print(json.dumps({"settings": settings, "results": results}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
