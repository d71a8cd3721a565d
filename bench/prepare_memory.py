"""Peak memory of `ingest` + `prepare` against the size of one raw-text document.

    python bench/prepare_memory.py [--sizes-mb 0.25 1 5 20] [--line]

For each size, a throwaway project whose `embedding` stage reads one file of that size (`--line`:
the whole file is one line with no paragraph breaks, the worst case for a raw-text document; by
default ordinary paragraphs of about 500 characters, as a scraped text file holds) and whose chat
stages are small synthetic sets; the base is a tokenizer only (BPE trained on a sample of the
text, as `base` trains the tiny one), so no model is built. `ingest` and `prepare` run in a child
process each, as DVC runs them; each one's peak resident memory (its own `ru_maxrss`) is a figure.
A one-line document over `prepare.max_record_chars` (10M characters) is a `too_large` reject, not
rows. Settings are printed with the figures (JSON), and written to bench/results/prepare_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

# Words of a made-up language (2 or 3 syllables): sentences drawn from them at random share no
# 13-word run, so decontamination drops nothing and every document is tokenized (a repeated
# English sentence made every document "contaminated" by the eval split's copy of it).
SYLLABLES = ["ka", "lo", "mi", "ne", "ru", "ta", "vo", "pe", "si", "du", "ba", "go"]
WORDS = [a + b for a in SYLLABLES for b in SYLLABLES] + [a + b + c for a in SYLLABLES for b in SYLLABLES for c in SYLLABLES]
# One pipeline step in a fresh process, as DVC runs it; it prints its own peak RSS (KiB) and seconds.
CHILD = """
import json, sys, time, resource
sys.path.insert(0, {project!r})
from tasks.core.config import load_params
from tasks.{step} import {step}_all
params = load_params("params.yaml")
started = time.perf_counter()
{step}_all(params)
print(json.dumps({{"seconds": time.perf_counter() - started,
                  "peak_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss}}))
"""


def write_document(path: Path, size_mb: float, one_line: bool) -> int:
    """A raw-text file of about `size_mb` MB of random 12-word sentences (seeded); one line, or
    paragraphs of 6 sentences (about 500 characters)."""
    rng = random.Random(0)
    target, n = int(size_mb * 1_000_000), 0
    with path.open("w") as out:
        while n < target:
            words = rng.choices(WORDS, k=6 * 12)
            sentences = [" ".join(words[i : i + 12]).capitalize() + "." for i in range(0, len(words), 12)]
            block = " ".join(sentences) + (" " if one_line else "\n\n")
            out.write(block)
            n += len(block)
    return path.stat().st_size


def make_project(root: Path, doc: Path) -> None:
    import yaml

    from tasks.core import paths
    from tasks.core.modeling import BaseInfo, train_tokenizer

    raw = yaml.safe_load((PROJECT / "params.yaml").read_text())
    for name, stage in raw["stages"].items():
        stage["data"]["n_records"] = 50
    raw["stages"]["embedding"]["data"]["sources"] = [{"path": str(doc), "format": "text"}]
    (root / "params.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    sample = doc.read_text()[:200_000]
    os.chdir(root)
    train_tokenizer([sample], vocab_size=2000).save_pretrained(root / "tok")
    BaseInfo(kind="tiny", name_or_path=str(root / "tok")).save(paths.BASE_DIR)


def measure(size_mb: float, one_line: bool) -> dict:
    with tempfile.TemporaryDirectory(prefix="prepare-memory-") as tmp:
        root = Path(tmp)
        doc = root / "document.txt"
        size = write_document(doc, size_mb, one_line)
        make_project(root, doc)
        steps = {}
        for step in ("ingest", "prepare"):
            done = subprocess.run([sys.executable, "-c", CHILD.format(project=str(PROJECT), step=step)], cwd=root,
                                  capture_output=True, text=True)
            if done.returncode != 0:
                return {"input_mb": round(size / 1e6, 2), "failed": f"{step}: {done.stderr[-600:]}"}
            steps[step] = json.loads(done.stdout.strip().splitlines()[-1])
        report = json.loads((root / "metrics" / "data.json").read_text())
        rejects = (root / "data" / "prepared" / "embedding" / "rejects.jsonl").read_text().splitlines()
        too_large = sum(json.loads(line)["reason"] == "too_large" for line in rejects if line.strip())
    emb = report.get("embedding", {})
    return {"input_mb": round(size / 1e6, 2),
            **{f"{step}_peak_rss_gb": round(r["peak_kib"] / 2**20, 3) for step, r in steps.items()},
            **{f"{step}_seconds": round(r["seconds"], 1) for step, r in steps.items()},
            "embedding_rows": emb.get("train_rows", 0) + emb.get("eval_rows", 0), "embedding_tokens": emb.get("train_tokens"),
            "too_large_rejects": too_large}


def main() -> int:
    from tasks.core.config import load_params

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[0.25, 1, 5, 20])
    parser.add_argument("--line", action="store_true", help="one line per file, no paragraph breaks")
    args = parser.parse_args()
    results = [measure(size, args.line) for size in sorted(args.sizes_mb)]
    out = {"settings": {"document": "one line" if args.line else "paragraphs of ~500 characters",
                        "tokenizer": "BPE, vocab 2000", "prepare.max_length": 256, "prepare.max_record_chars": load_params(PROJECT / "params.yaml").prepare.max_record_chars, "pretrain_overflow": "split",
                        "cpus": os.cpu_count(), "python": platform.python_version()},
           "results": results}
    print(json.dumps(out, indent=2))
    target = PROJECT / "bench" / "results" / f"prepare_memory{'_line' if args.line else ''}.json"
    target.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
