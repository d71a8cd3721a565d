"""Evaluation and serving speak Qwen3: prompts carry the template's own generation prompt with its
thinking switch, generation stops at the template's end of turn (`<|im_end|>`) as well as at the
Base model's eos (`<|endoftext|>`), the exported generation_config names both, and a registered
version on the Qwen3-shaped stand-in is served that way. The tiny base keeps its prompts and stops.

The stand-in (tasks/tools/standin.py: Qwen3's tokenizer and template, random weights) is written
once for the module. Where a test needs a reply to end, a logits processor scripts the tokens, so
what is tested is where generation stops, not what a random model says.

    pytest tests/test_qwen3_generation.py
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from tasks.core.config import EvaluateConfig, load_params
from tasks.evaluation import scoring

PROJECT = Path(__file__).resolve().parents[1]
END_OF_TEXT, IM_END = 151643, 151645  # Qwen3's ids
EMPTY_THINK = "<think>\n\n</think>\n\n"
USER = {"role": "user", "content": "Book a table for two in Oslo."}


@pytest.fixture(scope="module")
def qwen3(standin_folder):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(standin_folder)


@pytest.fixture(scope="module")
def standin_model(standin_folder):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(standin_folder, dtype=torch.float32)


class Scripted:
    """A logits processor that makes greedy generation emit `script`, then `filler` for ever."""

    def __init__(self, script: list[int], filler: int) -> None:
        self.script, self.filler, self.start = script, filler, None

    def __call__(self, input_ids, scores):
        self.start = input_ids.shape[1] if self.start is None else self.start
        step = input_ids.shape[1] - self.start
        forced = torch.full_like(scores, float("-inf"))
        forced[:, self.script[step] if step < len(self.script) else self.filler] = 0.0
        return forced


def spy_on_generate(model, tokenizer, calls: list[dict], monkeypatch) -> None:
    """Record what `model.generate` is called with, and script its tokens: "Hello", <|im_end|>,
    then " again" until something stops it."""
    from transformers import LogitsProcessorList

    hello, again = tokenizer.encode("Hello"), tokenizer.encode(" again")
    assert len(hello) == len(again) == 1
    generate = model.generate

    def spy(**kwargs):
        calls.append(kwargs)
        return generate(**kwargs, logits_processor=LogitsProcessorList([Scripted([hello[0], IM_END], again[0])]))

    monkeypatch.setattr(model, "generate", spy)


class TestStopTokens:
    def test_qwen3_stops_at_end_of_turn_and_at_end_of_text(self, qwen3, standin_model):
        assert standin_model.generation_config.eos_token_id == END_OF_TEXT  # a Base model names only this
        assert scoring.end_of_turn_token(qwen3) == "<|im_end|>"
        assert scoring.stop_token_ids(qwen3, standin_model) == [END_OF_TEXT, IM_END]
        assert scoring.stop_token_ids(qwen3) == [END_OF_TEXT, IM_END]

    def test_tiny_base_keeps_its_single_stop(self, unit_tokenizer):
        assert unit_tokenizer.eos_token == "<|im_end|>"
        assert scoring.stop_token_ids(unit_tokenizer) == [unit_tokenizer.eos_token_id]

    def test_end_of_turn_comes_from_the_template(self, unit_tokenizer):
        import copy

        tok = copy.deepcopy(unit_tokenizer)
        tok.add_tokens(["<|eot_id|>"], special_tokens=True)
        tok.chat_template = ("{% for m in messages %}<|start|>{{ m['role'] }}\n{{ m['content'] }}<|eot_id|>{% endfor %}"
                             "{% if add_generation_prompt %}<|start|>assistant\n{% endif %}")
        assert scoring.end_of_turn_token(tok) == "<|eot_id|>"
        assert scoring.stop_token_ids(tok) == [tok.eos_token_id, tok.convert_tokens_to_ids("<|eot_id|>")]

    def test_generate_is_given_both_and_stops_at_end_of_turn(self, qwen3, standin_model, monkeypatch):
        calls: list[dict] = []
        spy_on_generate(standin_model, qwen3, calls, monkeypatch)
        prompts = scoring.reply_prompts(qwen3, [[USER], [USER, {"role": "assistant", "content": "Where?"}, USER]])
        replies = scoring.generate_replies(standin_model, qwen3, prompts, EvaluateConfig(max_new_tokens=6, batch_size=2))
        assert [c["eos_token_id"] for c in calls] == [[END_OF_TEXT, IM_END]]
        assert calls[0]["pad_token_id"] == END_OF_TEXT and calls[0]["do_sample"] is False
        assert replies == ["Hello", "Hello"]  # not "Hello again again ..." to max_new_tokens

    def test_the_base_eos_alone_runs_to_max_new_tokens(self, qwen3, standin_model):
        """Why both: with the generation_config's eos only, <|im_end|> does not stop the reply."""
        from transformers import LogitsProcessorList

        hello, again = qwen3.encode("Hello")[0], qwen3.encode(" again")[0]
        batch = qwen3(scoring.reply_prompts(qwen3, [[USER]]), return_tensors="pt", add_special_tokens=False)
        out = standin_model.generate(**batch, max_new_tokens=5, do_sample=False, pad_token_id=END_OF_TEXT,
                                     logits_processor=LogitsProcessorList([Scripted([hello, IM_END], again)]))
        new = out[0, batch["input_ids"].shape[1]:].tolist()
        assert new == [hello, IM_END, again, again, again]
        assert qwen3.decode(new, skip_special_tokens=True) == "Hello again again again"


class TestThinkingSwitch:
    def test_qwen3_prompts(self, qwen3):
        from tasks.core.chat import generation_prompt

        plain = generation_prompt(qwen3, [USER, {"role": "assistant", "content": "ok"}])
        assert scoring.reply_prompts(qwen3, [[USER]]) == [plain]  # None: the template's own default
        assert scoring.reply_prompts(qwen3, [[USER]], True) == [plain] and plain.endswith("<|im_start|>assistant\n")
        assert scoring.reply_prompts(qwen3, [[USER]], False) == [plain + EMPTY_THINK]

    @pytest.mark.parametrize("enable_thinking", [None, True, False])
    def test_tiny_base_keeps_its_prompt(self, unit_tokenizer, enable_thinking):
        """Its template renders replies without an empty think block, so the non-thinking prompt
        (which has one) is not what any of its replies were trained behind: the plain prompt stays."""
        from tasks.core.chat import generation_prompt

        plain = generation_prompt(unit_tokenizer, [USER, {"role": "assistant", "content": "ok"}])
        assert scoring.reply_prompts(unit_tokenizer, [[USER]], enable_thinking) == [plain]

    def test_config_values(self):
        assert EvaluateConfig().enable_thinking == "auto"
        assert EvaluateConfig(enable_thinking=False).enable_thinking is False
        with pytest.raises(ValueError, match="enable_thinking"):
            EvaluateConfig(enable_thinking="sometimes")
        params = load_params(PROJECT / "params.yaml")
        assert params.evaluate.enable_thinking == "auto"
        auto = {name: scoring.stage_thinking(spec, params.evaluate) for name, spec in params.stages.items()}
        assert auto == {name: spec.checks.think_block for name, spec in params.stages.items()} and auto["thinking"]
        assert not auto["syntax"] and not auto["instructions"]
        forced = EvaluateConfig(enable_thinking=True)
        assert all(scoring.stage_thinking(spec, forced) for spec in params.stages.values())


SNIPS_TARGET = '{"intent": "BookRestaurant", "slots": {"party_size_number": "two", "city": "Oslo"}}'
CONVERSATIONS = {
    "syntax": [USER, {"role": "assistant", "content": SNIPS_TARGET}],
    "thinking": [{"role": "user", "content": "Tom has 3 apples and buys 4. How many?"},
                 {"role": "assistant", "content": "<think>\n3 + 4 = 7\n</think>\n\nThe answer is 7."}],
    "instructions": [{"role": "user", "content": "Name the capital of France."},
                     {"role": "assistant", "content": "Paris is the capital of France."}],
}
# What a Qwen3 model trained by these stages says: an empty think block where it does not think.
REPLIES = {"syntax": EMPTY_THINK + SNIPS_TARGET, "thinking": "<think>\n3 + 4 = 7\n</think>\n\nThe answer is 7.",
           "instructions": EMPTY_THINK + "Paris is the capital of France."}


@pytest.fixture
def fake_generation(monkeypatch):
    """generation_metrics on hand-made eval records, recording the prompts each stage's replies are asked with."""
    prompts: dict[str, list[str]] = {}
    current: list[str] = []

    def eval_records(stage, limit):
        current[:] = [stage]
        return [CONVERSATIONS[stage]] if stage in CONVERSATIONS else []

    def generate_replies(model, tokenizer, batch, cfg):
        prompts[current[0]] = list(batch)
        return [REPLIES[current[0]]] * len(batch)

    monkeypatch.setattr(scoring, "eval_records", eval_records)
    monkeypatch.setattr(scoring, "generate_replies", generate_replies)
    return prompts


class TestEvaluatePrompts:
    def metrics(self, tokenizer, **evaluate):
        params = load_params(PROJECT / "params.yaml")
        cfg = params.evaluate.model_copy(update=evaluate)
        samples: list[dict] = []
        return scoring.generation_metrics(None, tokenizer, params.stages, cfg, samples=samples), samples

    def test_auto_thinks_on_think_block_stages_only(self, qwen3, fake_generation):
        metrics, samples = self.metrics(qwen3)
        assert fake_generation["thinking"][0].endswith("<|im_start|>assistant\n")
        assert fake_generation["syntax"][0].endswith("<|im_start|>assistant\n" + EMPTY_THINK)
        assert fake_generation["instructions"][0].endswith("<|im_start|>assistant\n" + EMPTY_THINK)
        # replies after a think block, empty or not, are read as their answers
        assert metrics["syntax_json_valid"] == 1.0 and metrics["syntax_intent_accuracy"] == 1.0
        assert metrics["thinking_exact_match"] == 1.0 and metrics["thinking_think_well_formed"] == 1.0
        assert metrics["instructions_rouge_l"] == 1.0
        assert {s["eval_set"] for s in samples} == set(CONVERSATIONS)

    @pytest.mark.parametrize("enable_thinking", [True, False])
    def test_one_switch_for_every_stage(self, qwen3, fake_generation, enable_thinking):
        self.metrics(qwen3, enable_thinking=enable_thinking)
        for stage, prompts in fake_generation.items():
            assert prompts[0].endswith(EMPTY_THINK) is (not enable_thinking), stage

    def test_tiny_base_prompts_are_unchanged(self, unit_tokenizer, fake_generation):
        from tasks.core.chat import generation_prompt

        self.metrics(unit_tokenizer)
        assert fake_generation == {stage: [generation_prompt(unit_tokenizer, m)] for stage, m in CONVERSATIONS.items()}


class TestExport:
    def test_generation_config_names_both_stops(self, standin_folder, qwen3, tmp_path):
        from transformers import AutoModelForCausalLM, GenerationConfig

        from tasks.export import save_merged

        model = AutoModelForCausalLM.from_pretrained(standin_folder, dtype=torch.float32)
        save_merged(model, qwen3, tmp_path / "merged", "bf16")
        saved = json.loads((tmp_path / "merged" / "generation_config.json").read_text())
        assert saved["eos_token_id"] == [END_OF_TEXT, IM_END]
        assert saved["pad_token_id"] == END_OF_TEXT and saved["bos_token_id"] == END_OF_TEXT  # the rest is the base's
        assert GenerationConfig.from_pretrained(tmp_path / "merged").eos_token_id == [END_OF_TEXT, IM_END]


NAME = "stagewise-assistant"


@pytest.fixture(scope="module")
def standin_registry(tmp_path_factory, standin_folder):
    """A version registered the way `register` does it, on the stand-in: one stage's LoRA adapter
    (zero-initialised: the base's outputs) in its run, the serving bundle naming the stand-in folder."""
    from mlflow import MlflowClient
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    from tasks.core.bundle import log_serving_bundle
    from tasks.core.modeling import BaseInfo

    root = tmp_path_factory.mktemp("registry")
    adapter = root / "models" / "adapters" / "syntax"
    base = AutoModelForCausalLM.from_pretrained(standin_folder, dtype=torch.float32)
    get_peft_model(base, LoraConfig(r=2, target_modules=["q_proj"])).save_pretrained(adapter)
    (adapter / "stage.json").write_text(json.dumps({"stage": "syntax", "merged_chain": [], "policy": "continue"}))
    BaseInfo(kind="external", name_or_path=str(standin_folder)).save(root / "base")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        client = MlflowClient(tracking_uri=uri)
        experiment = client.create_experiment("stagewise", artifact_location=(root / "mlruns").as_uri())
        run = client.create_run(experiment, run_name="train@syntax").info.run_id
        client.log_artifacts(run, str(adapter), "adapter")
        client.create_registered_model(NAME)
        version = client.create_model_version(NAME, source=f"runs:/{run}/adapter", run_id=run,
                                              tags={"adapter_run.syntax": run})
        log_serving_bundle(client, run, root / "base")
        client.set_registered_model_alias(NAME, "champion", version.version)
    return root, uri


class TestServe:
    @pytest.mark.parametrize("flag, think", [([], ""), (["--no-enable-thinking"], EMPTY_THINK)])
    def test_registered_standin_answers_and_stops_at_end_of_turn(self, standin_registry, qwen3, monkeypatch, capsys,
                                                                   flag, think):
        from tasks import serve
        from tasks.core import bundle

        root, uri = standin_registry
        monkeypatch.chdir(root)
        monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
        monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
        calls: list[dict] = []
        load_version = bundle.load_version

        def loaded_and_spied(files):
            model, tokenizer = load_version(files)
            spy_on_generate(model, tokenizer, calls, monkeypatch)
            return model, tokenizer

        monkeypatch.setattr(bundle, "load_version", loaded_and_spied)
        code = serve.main(["--model", f"models:/{NAME}@champion", "--json", "--max-new-tokens", "8", *flag,
                           "--prompt", USER["content"]])
        captured = capsys.readouterr()
        assert code == 0, captured.err
        assert f"models:/{NAME}@champion = v1 (base + syntax)" in captured.err
        assert [json.loads(line) for line in captured.out.splitlines()] == [{"prompt": USER["content"], "reply": "Hello"}]
        assert [c["eos_token_id"] for c in calls] == [[END_OF_TEXT, IM_END]]
        assert qwen3.decode(calls[0]["input_ids"][0]).endswith("<|im_start|>assistant\n" + think)
