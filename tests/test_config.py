"""Typed config: the repo's params.yaml parses, and every kind of mistake names its dotted key."""

from __future__ import annotations

import re

import copy
from pathlib import Path

import pytest
import yaml

from tasks.core.config import ConfigError, LoraConfig, load_params, parse_params

PARAMS_FILE = Path(__file__).resolve().parents[1] / "params.yaml"
RAW = yaml.safe_load(PARAMS_FILE.read_text())


def modified(mutate) -> dict:
    raw = copy.deepcopy(RAW)
    mutate(raw)
    return raw


def rename_stage(raw: dict, old: str, new: str) -> None:
    """Rename a stage keeping plan order."""
    raw["stages"] = {new if k == old else k: v for k, v in raw["stages"].items()}


class TestRepoParams:
    def test_loads_with_curriculum_in_order(self):
        params = load_params(PARAMS_FILE)
        assert params.stage_names == ["embedding", "syntax", "thinking", "instructions"]
        stages = list(params.stages.values())
        assert [s.kind for s in stages] == ["pretrain", "sft", "sft", "sft"]
        assert [s.data.n_records for s in stages] == [2400, 600, 600, 600]
        assert [s.data.replay_share for s in stages] == [0.0, 0.0, 0.3, 0.7]
        assert params.prepare.replay_unit == "tokens"  # README, "What the embedded default teaches"
        assert [s.data.replay_from for s in stages] == [{}, {}, {}, {"syntax": 1.0, "thinking": 1.0}]
        assert all(s.data.sources == [] for s in stages)
        assert [s.checks.think_block for s in stages] == [False, False, True, False]
        assert [s.checks.json_target for s in stages] == [False, True, False, False]
        assert [s.init_from for s in stages] == ["base", "embedding", "syntax", "thinking"]

    def test_aliased_sections_and_values(self):
        params = load_params(PARAMS_FILE)
        assert params.seed == 1234
        assert params.validate_.min_tokens == 4
        assert params.register_.model_name == "stagewise-assistant"
        assert params.stages["syntax"].train.learning_rate == pytest.approx(6.0e-3)
        assert params.model.name_or_path is None
        assert params.model.tiny.pretrain.max_steps == 520
        assert params.model.tiny.pretrain.copy_warmup.steps == 320  # README, "What the embedded default teaches"

    def test_final_stage_is_last(self):
        assert load_params(PARAMS_FILE).final_stage == "instructions"

    def test_lora_for_falls_back_to_shared_block(self):
        params = load_params(PARAMS_FILE)
        shared = params.train.lora
        assert params.lora_for("syntax") is shared
        assert shared.r == 16 and shared.alpha == 32
        assert shared.target_parameters == ["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]

    def test_lora_for_uses_stage_block(self):
        def own_lora(r):
            r["train"]["chain_policy"] = "merge"  # a new adapter per stage: each may have its own LoRA
            r["stages"]["thinking"]["train"]["lora"] = {"r": 4, "alpha": 8}

        raw = modified(own_lora)
        params = parse_params(raw)
        assert params.lora_for("thinking") == LoraConfig(r=4, alpha=8)
        assert params.lora_for("syntax").r == 16
        assert params.train_job("thinking").lora == LoraConfig(r=4, alpha=8)

    def test_every_setting_is_written_out(self):
        """No hidden code defaults: every field of the typed config (but a source entry's, which a
        user writes) has a value in params.yaml, so DVC sees each one a stage reads."""
        from pydantic import BaseModel

        from tasks.core.config import Params, SourceSpec

        def missing(model: type[BaseModel], raw: dict, prefix: str) -> list[str]:
            out = []
            for name, field in model.model_fields.items():
                key = field.alias or name
                if key not in raw:
                    out.append(prefix + key)
                    continue
                sub = getattr(field.annotation, "model_fields", None) and field.annotation
                if sub and isinstance(raw[key], dict) and sub is not SourceSpec:
                    out += missing(sub, raw[key], f"{prefix}{key}.")
            return out

        raw = RAW
        gaps = missing(Params, raw, "")
        stage_model = Params.model_fields["stages"].annotation.__args__[1]
        for name, stage in raw["stages"].items():
            gaps += missing(stage_model, stage, f"stages.{name}.")
        assert gaps == []

    def test_old_layout_names_the_new_keys(self):
        def old(r):
            r["train"]["stages"] = {"embedding": {"init_from": "base", "max_steps": 1, "learning_rate": 1e-3}}

        with pytest.raises(ConfigError, match=r"(?s)uses the old layout \(train.stages\).*stages.<name>.\{init_from, train\}"):
            parse_params(modified(old))


def _unknown_top(r):
    r["sead"] = 1


def _unknown_nested(r):
    r["stages"]["syntax"]["train"]["learnin_rate"] = 1e-3


def _wrong_type(r):
    r["stages"]["syntax"]["train"]["max_steps"] = "many"


def _negative_lr(r):
    r["stages"]["thinking"]["train"]["learning_rate"] = -1e-3


def _init_from_missing(r):
    r["stages"]["syntax"]["init_from"] = "warmup"


def _init_from_later(r):
    r["stages"]["syntax"]["init_from"] = "thinking"


def _stage_named_base(r):
    rename_stage(r, "embedding", "base")


def _dropout_with_parameters(r):
    r["train"]["lora"]["dropout"] = 0.1


def _stage_dropout_with_parameters(r):
    r["stages"]["syntax"]["train"]["lora"] = {"dropout": 0.05, "target_parameters": ["mlp.experts.down_proj"]}


def _min_over_max_tokens(r):
    r["validate"]["min_tokens"] = 300


def _stage_without_data(r):
    del r["stages"]["thinking"]["data"]["n_records"]


def _stage_without_train_block(r):
    del r["stages"]["thinking"]["train"]


def _stages_out_of_order(r):
    stages = r["stages"]
    r["stages"] = {k: stages[k] for k in ("syntax", "embedding", "thinking", "instructions")}


def _checks_on_pretrain(r):
    r["stages"]["embedding"]["checks"]["think_block"] = True


def _unknown_data_kind(r):
    r["stages"]["syntax"]["kind"] = "rlhf"


def _replay_from_a_later_stage(r):
    r["stages"]["syntax"]["data"]["replay_from"] = {"thinking": 1.0}


def _replay_share_one(r):
    r["stages"]["syntax"]["data"]["replay_share"] = 1.0


def _unknown_register_key(r):
    r["register"]["treshold"] = 1


def _own_lora_under_continue(r):
    r["stages"]["thinking"]["train"]["lora"] = {"r": 64, "alpha": 128}  # thinking goes on training syntax's rank 16


def _experts_per_tok_over_experts(r):
    r["model"]["tiny"]["num_experts_per_tok"] = 9


class TestParseParamsErrors:
    @pytest.mark.parametrize(
        "mutate, key, reason",
        [
            (_unknown_top, "sead", "unknown key"),
            (_unknown_nested, "stages.syntax.train.learnin_rate", "unknown key"),
            (_wrong_type, "stages.syntax.train.max_steps", "valid integer"),
            (_negative_lr, "stages.thinking.train.learning_rate", "greater than 0"),
            (_init_from_missing, "(top level)", "stages.syntax.init_from is 'warmup'"),
            (_init_from_later, "(top level)", "stages.syntax.init_from is 'thinking'"),
            (_stage_named_base, "(top level)", "`base` is reserved"),
            (_dropout_with_parameters, "train.lora", "dropout must be 0 when target_parameters is set"),
            (_stage_dropout_with_parameters, "stages.syntax.train.lora", "dropout must be 0"),
            (_min_over_max_tokens, "validate", "min_tokens must not exceed max_tokens"),
            (_stage_without_data, "stages.thinking.data", "set n_records (synthetic data) or sources (your files)"),
            (_stage_without_train_block, "stages.thinking.train", "Field required"),
            (_stages_out_of_order, "(top level)", "stages.syntax.init_from is 'embedding'"),
            (_checks_on_pretrain, "stages.embedding", "sft stages only"),
            (_unknown_data_kind, "stages.syntax.kind", "'pretrain' or 'sft'"),
            (_replay_share_one, "stages.syntax.data.replay_share", "less than 1"),
            (_replay_from_a_later_stage, "(top level)", "stages.syntax.data.replay_from names thinking: it may name the stages listed before it (embedding)"),
            (_unknown_register_key, "register.treshold", "unknown key"),
            (_experts_per_tok_over_experts, "model.tiny", "num_experts_per_tok must not exceed num_experts"),
            (_own_lora_under_continue, "(top level)", "stages.thinking.train.lora is set, but under train.chain_policy "
             "`continue` thinking keeps training the adapter of syntax"),
        ],
    )
    def test_names_dotted_key(self, mutate, key, reason):
        with pytest.raises(ConfigError) as err:
            parse_params(modified(mutate), source="my-params.yaml")
        message = str(err.value)
        assert message.startswith("my-params.yaml is invalid:\n")
        line = next(line for line in message.splitlines()[1:] if line.startswith(f"  {key}: "))
        assert reason in line

    def test_init_from_later_lists_earlier_stages(self):
        with pytest.raises(ConfigError, match=r"stage listed before it \(embedding\)"):
            parse_params(modified(_init_from_later))

    def test_every_bad_key_is_reported(self):
        def two_mistakes(r):
            _wrong_type(r)
            _negative_lr(r)

        with pytest.raises(ConfigError) as err:
            parse_params(modified(two_mistakes))
        keys = [line.split(":")[0].strip() for line in str(err.value).splitlines()[1:]]
        assert keys == ["stages.syntax.train.max_steps", "stages.thinking.train.learning_rate"]

    def test_sources_replace_n_records(self):
        def sourced(r):
            r["stages"]["thinking"]["data"] = {"sources": [
                {"path": "data/sources/gsm8k/*.jsonl", "preset": "gsm8k", "weight": 0.5},
                {"path": "s3://bucket/more.parquet", "fields": {"question": "q"}},
            ]}

        spec = parse_params(modified(sourced)).stages["thinking"].data
        assert (spec.n_records, spec.replay_share) == (None, 0.0)
        first, second = spec.sources
        assert (first.path, first.format, first.preset, first.weight) == ("data/sources/gsm8k/*.jsonl", "auto", "gsm8k", 0.5)
        assert (second.preset, second.fields, second.weight) == (None, {"question": "q"}, 1.0)

    @pytest.mark.parametrize("source, key", [
        ({"path": "a.jsonl", "weight": 0}, "stages.thinking.data.sources.0.weight"),
        ({"path": "a.jsonl", "format": "xml"}, "stages.thinking.data.sources.0.format"),
        ({"file": "a.jsonl"}, "stages.thinking.data.sources.0.path"),
    ])
    def test_bad_source_names_its_key(self, source, key):
        def sourced(r):
            r["stages"]["thinking"]["data"] = {"sources": [source]}

        with pytest.raises(ConfigError, match=re.escape(key)):
            parse_params(modified(sourced))

    def test_stage_needs_sources_or_n_records(self):
        def neither(r):
            r["stages"]["thinking"]["data"] = {}

        with pytest.raises(ConfigError, match=r"stages.thinking.data: set n_records .* or sources"):
            parse_params(modified(neither))

    def test_empty_stage_plan(self):
        def empty(r):
            r["stages"] = {}

        with pytest.raises(ConfigError, match=r"  \(top level\): the curriculum is empty"):
            parse_params(modified(empty))


class TestLoadParamsFiles:
    def test_missing_file(self, tmp_path):
        path = tmp_path / "nope.yaml"
        with pytest.raises(ConfigError, match=rf"^{path} not found"):
            load_params(path)

    def test_invalid_yaml(self, tmp_path):
        path = tmp_path / "broken.yaml"
        path.write_text("train:\n  stages: [unclosed\n")
        with pytest.raises(ConfigError, match=rf"^{path} is not valid YAML"):
            load_params(path)

    def test_not_a_mapping(self, tmp_path):
        path = tmp_path / "list.yaml"
        path.write_text("- 1\n- 2\n")
        with pytest.raises(ConfigError, match=rf"^{path} must hold a mapping"):
            load_params(path)

    def test_invalid_content_names_file(self, tmp_path):
        path = tmp_path / "params.yaml"
        path.write_text(yaml.safe_dump(modified(_unknown_nested)))
        with pytest.raises(ConfigError, match=rf"^{path} is invalid:\n  stages.syntax.train.learnin_rate: unknown key"):
            load_params(path)
