"""Peak memory of `ingest` + `prepare` against the size of one raw-text document.

    python bench/prepare_memory.py [--sizes-mb 0.25 1 5 20] [--line]

For each size, a throwaway project whose `embedding` stage reads one file of that size (`--line`:
the whole file is one line with no paragraph breaks, the worst case for a raw-text document; by
default ordinary paragraphs of about 500 characters, as a scraped text file holds) and whose chat
stages are small synthetic sets; the base is a tokenizer only (BPE trained on a sample of the
text, as `base` trains the tiny one), so no model is built. `ingest` and `prepare` run in a child
process; its peak resident memory (`ru_maxrss`) is the figure. Settings are printed with the
figures (JSON), and written to bench/results/prepare_memory.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

PROJECT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(PROJECT))

SENTENCE = "The quick brown fox number {i} jumps over the lazy dog near the river bank. "
CHILD = """
import sys, time, resource
sys.path.insert(0, {project!r})
from tasks.core.config import load_params
from tasks.ingest import ingest_all
from tasks.prepare import prepare_all
params = load_params("params.yaml")
started = time.perf_counter()
ingest_all(params)
prepare_all(params)
print(time.perf_counter() - started)
"""


def write_document(path: Path, size_mb: float, one_line: bool) -> int:
    """A raw-text file of about `size_mb` MB; one line, or paragraphs of about 500 characters."""
    target, parts, n, i = int(size_mb * 1_000_000), [], 0, 0
    while n < target:
        sentence = SENTENCE.format(i=i)
        parts.append(sentence if one_line or (i + 1) % 6 else sentence + "\n\n")
        n, i = n + len(parts[-1]), i + 1
    path.write_text("".join(parts))
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
        before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        started = time.perf_counter()
        done = subprocess.run([sys.executable, "-c", CHILD.format(project=str(PROJECT))], cwd=root,
                              capture_output=True, text=True)
        wall = time.perf_counter() - started
        peak_kib = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
        report = json.loads((root / "metrics" / "data.json").read_text()) if done.returncode == 0 else {}
    if done.returncode != 0:
        return {"input_mb": round(size / 1e6, 2), "failed": done.stderr[-600:]}
    emb = report.get("embedding", {})
    return {"input_mb": round(size / 1e6, 2), "peak_rss_gb": round(peak_kib / 2**20, 3),
            "peak_grew": peak_kib > before, "seconds": round(wall, 1),
            "embedding_rows": emb.get("train_rows", 0) + emb.get("eval_rows", 0), "embedding_tokens": emb.get("train_tokens")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes-mb", type=float, nargs="+", default=[0.25, 1, 5, 20])
    parser.add_argument("--line", action="store_true", help="one line per file, no paragraph breaks")
    args = parser.parse_args()
    # Children's ru_maxrss is the largest child so far: sizes go in increasing order so each is its own.
    results = [measure(size, args.line) for size in sorted(args.sizes_mb)]
    out = {"settings": {"document": "one line" if args.line else "paragraphs of ~500 characters",
                        "tokenizer": "BPE, vocab 2000", "prepare.max_length": 256, "pretrain_overflow": "split",
                        "cpus": os.cpu_count(), "python": platform.python_version()},
           "results": results}
    print(json.dumps(out, indent=2))
    target = PROJECT / "bench" / "results" / f"prepare_memory{'_line' if args.line else ''}.json"
    target.write_text(json.dumps(out, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
