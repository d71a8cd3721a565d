"""infra/vllm on a CPU: serve.sh's commands and refusals (printed, not run), compose.yaml, and
smoke.py end to end — reference replies of a real merged tiny model, checked against a stand-in
OpenAI-compatible server that answers right, almost right, or like a model whose LoRA was dropped.
vLLM itself needs a GPU and is not run here."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
import yaml

from tests.chain_workspace import STAGES, build_chain
from tests.conftest import UNIT_CORPUS
from tests.pipeline_workspace import PROJECT

VLLM = PROJECT / "infra" / "vllm"
ENV = dict(os.environ, PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}")


def serve_sh(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(["bash", str(VLLM / "serve.sh"), *args], capture_output=True, text=True,
                          env=ENV | (env or {}), timeout=60)


def merged_dir(root: Path, passed=True) -> Path:
    d = root / "merged"
    d.mkdir()
    (d / "config.json").write_text("{}")
    (d / "merge.json").write_text(json.dumps({"passed": passed}))
    return d


def adapter_dir(root: Path, r=16, target_parameters=(), merged_chain=(), modules_to_save=None) -> Path:
    d = root / "adapter"
    d.mkdir()
    (d / "adapter_config.json").write_text(json.dumps({"r": r, "target_modules": ["q_proj"], "rank_pattern": {},
                                                      "target_parameters": list(target_parameters),
                                                      "modules_to_save": modules_to_save}))
    (d / "stage.json").write_text(json.dumps({"stage": "instructions", "merged_chain": list(merged_chain)}))
    return d


class TestServeScript:
    def test_parses_and_has_help(self):
        assert subprocess.run(["bash", "-n", str(VLLM / "serve.sh")]).returncode == 0
        done = serve_sh("--help")
        assert done.returncode == 0 and "--lora --base" in done.stdout and "h100-80gb" in done.stdout

    def test_merged_checkpoint_with_the_h100_profile_by_default(self, tmp_path):
        done = serve_sh("--merged", str(merged_dir(tmp_path)), "--print")
        assert done.returncode == 0, done.stderr
        cmd = done.stdout.split()
        assert cmd[:3] == ["vllm", "serve", str(tmp_path / "merged")]
        flags = dict(zip(cmd[3::2], cmd[4::2]))
        assert flags["--served-model-name"] == "stagewise" and flags["--dtype"] == "bfloat16"
        assert flags["--gpu-memory-utilization"] == "0.92" and flags["--max-model-len"] == "32768"
        assert flags["--max-num-seqs"] == "64" and "--enable-lora" not in cmd

    def test_profiles_env_overrides_and_passthrough(self, tmp_path):
        merged = str(merged_dir(tmp_path))
        big = serve_sh("--merged", merged, "--profile", "96gb", "--print").stdout.split()
        assert big[big.index("--max-num-seqs") + 1] == "128"
        env = serve_sh("--merged", merged, "--print", "--", "--kv-cache-dtype", "fp8", env={"MAX_MODEL_LEN": "8192"})
        assert "--max-model-len 8192" in env.stdout and env.stdout.split()[-2:] == ["--kv-cache-dtype", "fp8"]
        assert serve_sh("--merged", merged, "--profile", "a100").returncode == 2

    def test_refuses_a_merged_copy_that_failed_or_skipped_export(self, tmp_path):
        failed = merged_dir(tmp_path, passed=False)
        done = serve_sh("--merged", str(failed), "--print")
        assert done.returncode == 2 and "did not pass the export parity check" in done.stderr
        assert serve_sh("--merged", str(failed), "--print", "--force").returncode == 0
        missing = serve_sh("--merged", str(tmp_path / "nowhere"), "--print")
        assert missing.returncode == 2 and "dvc repro export" in missing.stderr

    def test_lora_mode_for_an_attention_only_adapter(self, tmp_path):
        adapter = adapter_dir(tmp_path, r=4)
        done = serve_sh("--lora", "--base", "Qwen/Qwen3-30B-A3B-Base", "--adapter", str(adapter), "--print")
        assert done.returncode == 0, done.stderr
        cmd = done.stdout.split()
        assert cmd[:3] == ["vllm", "serve", "Qwen/Qwen3-30B-A3B-Base"] and "--enable-lora" in cmd
        assert cmd[cmd.index("--lora-modules") + 1] == f"stagewise={adapter}"
        assert cmd[cmd.index("--max-lora-rank") + 1] == "8"  # rank 4 -> the smallest value vLLM accepts above it

    @pytest.mark.parametrize(("kwargs", "message"), [
        ({"target_parameters": ["mlp.experts.gate_up_proj"]}, "LoRA on the fused MoE experts"),
        ({"merged_chain": ["embedding"]}, "merged in: vLLM would apply it to the plain base"),
        ({"modules_to_save": ["embed_tokens", "lm_head"]}, "modules_to_save"),
    ])
    def test_lora_mode_refuses_what_vllm_would_serve_wrong(self, tmp_path, kwargs, message):
        adapter = adapter_dir(tmp_path, **kwargs)
        done = serve_sh("--lora", "--base", "b/m", "--adapter", str(adapter), "--print")
        assert done.returncode == 2 and message in done.stderr

    def test_expert_lora_only_when_asked_for(self, tmp_path):
        adapter = adapter_dir(tmp_path, r=16, target_parameters=["mlp.experts.down_proj"])
        done = serve_sh("--lora", "--base", "b/m", "--adapter", str(adapter), "--allow-expert-lora", "--print")
        assert done.returncode == 0 and "--max-lora-rank 16" in done.stdout


def test_compose_service_runs_serve_sh_on_one_gpu():
    compose = yaml.safe_load((VLLM / "compose.yaml").read_text())
    service = compose["services"]["vllm"]
    assert "/stagewise/infra/vllm/serve.sh" in " ".join(service["entrypoint"])
    assert "../..:/stagewise:ro" in service["volumes"] and service["ipc"] == "host"
    device = service["deploy"]["resources"]["reservations"]["devices"][0]
    assert device["count"] == 1 and device["capabilities"] == ["gpu"]
    assert "--merged /stagewise/exports/merged" in service["environment"]["VLLM_ARGS"]


# --- smoke.py ---------------------------------------------------------------------------------


def smoke(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(VLLM / "smoke.py"), *args], capture_output=True, text=True, env=ENV,
                          timeout=300)


class StandIn(BaseHTTPRequestHandler):
    """/v1/models and /v1/completions, answering each prompt (by its token ids) from `replies`."""

    replies: dict[tuple, str] = {}

    def do_GET(self):
        self._send({"data": [{"id": "stagewise"}]})

    def do_POST(self):
        body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        assert body["temperature"] == 0 and body["model"] == "stagewise"
        self._send({"choices": [{"text": self.replies[tuple(body["prompt"])]}]})

    def _send(self, payload):
        data = json.dumps(payload).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def references(tmp_path_factory, unit_tokenizer):
    """smoke.py's reference replies from a real merged tiny model (the export stage's output)."""
    from tasks import export as export_step
    from tasks.core.config import ExportConfig
    from tasks.core.modeling import BaseInfo

    root = tmp_path_factory.mktemp("smoke")
    with pytest.MonkeyPatch.context() as mp:
        mp.chdir(root)
        build_chain(root, unit_tokenizer, UNIT_CORPUS[:12])
        export_step.export_model(BaseInfo.load(), "s2", STAGES, ExportConfig(), root / "merged")
    (root / "prompts.txt").write_text("What is 2+2?\nAnswer in JSON.\n")
    done = smoke("reference", "--model", str(root / "merged"), "--out", str(root / "refs.json"),
                 "--prompts-file", str(root / "prompts.txt"), "--max-tokens", "20")
    assert done.returncode == 0, done.stderr
    return root / "refs.json"


@pytest.fixture
def server():
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), StandIn)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}"
    httpd.shutdown()


def answer_with(refs_file: Path, reply) -> None:
    rows = json.loads(refs_file.read_text())["rows"]
    StandIn.replies = {tuple(r["prompt_ids"]): reply(r) for r in rows}


def test_smoke_reference_records_prompt_ids_and_greedy_replies(references):
    refs = json.loads(references.read_text())
    assert [r["prompt"] for r in refs["rows"]] == ["What is 2+2?", "Answer in JSON."]
    assert refs["dtype"] == "float32" and refs["max_tokens"] == 20
    assert all(r["prompt_ids"] and r["reply_ids"] for r in refs["rows"])


def test_smoke_passes_a_server_that_answers_as_the_merged_model(references, server):
    answer_with(references, lambda r: r["reply"])
    done = smoke("check", "--refs", str(references), "--url", server)
    assert done.returncode == 0, done.stdout + done.stderr
    assert "smoke: 2/2 replies match" in done.stdout


def test_smoke_accepts_a_late_near_tie_but_not_an_early_difference(references, server, unit_tokenizer):
    answer_with(references, lambda r: unit_tokenizer.decode(r["reply_ids"][:3]) + " zzz")
    early = smoke("check", "--refs", str(references), "--url", server)
    assert early.returncode == 1 and "MISMATCH" in early.stdout and "smoke: 0/2 replies match" in early.stdout
    late = smoke("check", "--refs", str(references), "--url", server, "--min-prefix", "3")
    assert late.returncode == 0, late.stdout


def test_smoke_fails_a_server_that_answers_like_the_base(references, server):
    answer_with(references, lambda r: "something the base would say")
    done = smoke("check", "--refs", str(references), "--url", server)
    assert done.returncode == 1 and "reference:" in done.stdout and "server:" in done.stdout


def test_smoke_names_a_missing_model_and_an_unreachable_server(references, server):
    wrong = smoke("check", "--refs", str(references), "--url", server, "--served-name", "other")
    assert wrong.returncode == 2 and "serves ['stagewise'], not 'other'" in wrong.stderr
    down = smoke("check", "--refs", str(references), "--url", "http://127.0.0.1:9")
    assert down.returncode == 1 and "is the server up?" in down.stderr


def test_smoke_help():
    done = smoke("--help")
    assert done.returncode == 0 and "reference" in done.stdout and "check" in done.stdout
