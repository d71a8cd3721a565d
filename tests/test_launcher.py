"""`train.launcher`: a stage re-runs itself under `accelerate launch`, the configs in infra/accelerate
load with accelerate's own loader and reach its plugins, and two CPU processes train a QLoRA stage
of the tiny MoE for real (DDP over gloo), writing the stage's outputs once."""

from __future__ import annotations

import os
import re
import socket
import subprocess
import sys

import pytest
import yaml

from tasks.core import launcher, paths
from tasks.core.config import ConfigError, LauncherConfig
from tests.pipeline_workspace import PROJECT, build_prepared_project
from tests.test_train import tiny_params

CONFIGS = PROJECT / "infra" / "accelerate"
# Everything a launcher sets in a worker: cleared so the tests start as a plain `python -m` would.
WORKER_ENV = (launcher.LAUNCHED_ENV, "LOCAL_RANK", "RANK", "WORLD_SIZE", "ACCELERATE_MIXED_PRECISION", "PMI_RANK",
              "PMI_SIZE", "OMPI_COMM_WORLD_RANK", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_RANK", "MV2_COMM_WORLD_SIZE")


@pytest.fixture
def plain_env(monkeypatch):
    for name in (*WORKER_ENV, "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    return monkeypatch


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class TestLaunchCommand:
    def test_runs_this_interpreter_through_accelerate_then_the_same_stage_command(self):
        cfg = LauncherConfig(kind="accelerate", config_file=str(CONFIGS / "multi_cpu.yaml"), num_processes=2)
        assert launcher.launch_command("syntax", "p.yaml", cfg, main_process_port=29611) == [
            sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(CONFIGS / "multi_cpu.yaml"),
            "--num_processes", "2", "--main_process_port", "29611", "-m", "tasks.train", "syntax", "--params", "p.yaml",
        ]

    def test_without_num_processes_or_port_the_config_file_decides(self, monkeypatch):
        monkeypatch.chdir(PROJECT)
        cfg = LauncherConfig(kind="accelerate", config_file="infra/accelerate/fsdp2_qlora.yaml")
        cmd = launcher.launch_command("embedding", "params.yaml", cfg)
        assert "--num_processes" not in cmd and "--main_process_port" not in cmd
        assert cmd[3:5] == ["--config_file", "infra/accelerate/fsdp2_qlora.yaml"]

    def test_a_missing_config_file_names_the_key_and_the_path(self, tmp_path, monkeypatch):
        monkeypatch.chdir(tmp_path)
        cfg = LauncherConfig(kind="accelerate", config_file="infra/accelerate/nope.yaml")
        with pytest.raises(ConfigError, match=r"train\.launcher\.config_file: infra/accelerate/nope\.yaml not found"):
            launcher.launch_command("embedding", "params.yaml", cfg)

    def test_accelerate_without_a_config_file_is_refused_by_the_config(self):
        with pytest.raises(ValueError, match="kind accelerate needs config_file"):
            LauncherConfig(kind="accelerate")


class TestRelaunch:
    def test_the_child_is_marked_as_launched_and_its_exit_code_comes_back(self, plain_env):
        child = "import os, sys; sys.exit(7 if os.environ.get('STAGEWISE_LAUNCHED') == '1' else 1)"
        plain_env.setattr(launcher, "launch_command", lambda *args, **kwargs: [sys.executable, "-c", child])
        assert launcher.relaunch("embedding", "params.yaml", LauncherConfig()) == 7

    def test_master_port_from_the_environment_becomes_the_rendezvous_port(self, plain_env):
        seen = {}
        plain_env.setenv("MASTER_PORT", "29777")
        plain_env.setattr(launcher, "launch_command", lambda *args, **kwargs: seen.update(kwargs) or [sys.executable, "-c", ""])
        assert launcher.relaunch("embedding", "params.yaml", LauncherConfig()) == 0
        assert seen == {"main_process_port": 29777}


class TestWorkerEnvironment:
    @pytest.mark.parametrize(
        "env, worker, rank, size",
        [
            ({}, False, 0, 1),
            ({"STAGEWISE_LAUNCHED": "1"}, True, 0, 1),  # accelerate's one-process launcher sets no rank
            ({"LOCAL_RANK": "0", "RANK": "0", "WORLD_SIZE": "2"}, True, 0, 2),  # torchrun
            ({"LOCAL_RANK": "1", "RANK": "3", "WORLD_SIZE": "4"}, True, 3, 4),
            ({"OMPI_COMM_WORLD_RANK": "1", "OMPI_COMM_WORLD_SIZE": "2"}, True, 1, 2),  # mpirun
        ],
    )
    def test_rank_and_size_come_from_the_launchers_environment(self, plain_env, env, worker, rank, size):
        for name, value in env.items():
            plain_env.setenv(name, value)
        assert launcher.in_distributed_worker() is worker
        assert (launcher.process_rank(), launcher.world_size()) == (rank, size)
        assert launcher.is_main_process() is (rank == 0)


class TestMain:
    def write_params(self, root, launcher_block) -> None:
        raw = tiny_params().model_dump(by_alias=True)
        raw["train"]["launcher"] = launcher_block
        (root / "p.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))

    def test_accelerate_kind_relaunches_and_returns_the_launchers_exit_code(self, tmp_path, plain_env, capsys):
        from tasks import train

        plain_env.chdir(tmp_path)
        self.write_params(tmp_path, {"kind": "accelerate", "config_file": "infra/accelerate/multi_cpu.yaml"})
        calls = []
        plain_env.setattr(train, "relaunch", lambda *args: calls.append(args) or 3)
        plain_env.setattr(train, "train_stage", lambda *args: pytest.fail("the launching process must not train"))
        assert train.main(["embedding", "--params", "p.yaml"]) == 3
        assert calls[0][:2] == ("embedding", "p.yaml") and calls[0][2].num_processes is None
        assert "accelerate launch exited 3" in capsys.readouterr().err

    def test_a_missing_config_file_fails_before_anything_starts(self, tmp_path, plain_env, capsys):
        from tasks import train

        plain_env.chdir(tmp_path)
        self.write_params(tmp_path, {"kind": "accelerate", "config_file": "missing.yaml"})
        assert train.main(["embedding", "--params", "p.yaml"]) == 2
        assert "train.launcher.config_file: missing.yaml not found" in capsys.readouterr().err


def test_only_the_main_process_writes_a_stages_outputs(tmp_path, plain_env):
    from tasks import train
    from tasks.core.trainer import TrainingSummary

    plain_env.chdir(tmp_path)
    saved: list[str] = []

    class Adapter:
        def named_parameters(self):
            return iter(())

        def save_pretrained(self, out, **kwargs):
            saved.append(out)

    summary = TrainingSummary(resumed_from_step=0, steps=6, train_loss=1.0, first_loss=1.2, last_loss=0.9,
                              tokens_seen=100, seconds=1.0, tokens_per_second=100.0, history=[{"step": 1, "loss": 1.2}])
    result = train.StageResult("embedding", "base", 10, 1.1, summary, [])
    plain_env.setenv("WORLD_SIZE", "2")
    plain_env.setenv("RANK", "1")
    train.save_stage(Adapter(), result, tiny_params().train_job("embedding"))
    assert saved == [] and list(tmp_path.iterdir()) == []
    plain_env.setenv("RANK", "0")
    train.save_stage(Adapter(), result, tiny_params().train_job("embedding"))
    assert saved == [str(paths.adapter_dir("embedding"))]
    assert yaml.safe_load((paths.adapter_dir("embedding") / "stage.json").read_text())["processes"] == 2
    assert yaml.safe_load(paths.train_metrics("embedding").read_text())["processes"] == 2


def test_sharded_adapter_weights_are_gathered_whole_for_saving(plain_env):
    """Under FSDP2 each process holds shards (DTensors) that `save_pretrained` cannot write; the
    trainable ones are gathered first (here a one-process group on CPU, so it runs anywhere)."""
    import torch
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(4, 6), torch.nn.Linear(6, 2))
    model[0].requires_grad_(False)  # the frozen base
    whole = {name: p.detach().clone() for name, p in model.named_parameters() if p.requires_grad}
    assert launcher.gathered_adapter_state(model) is None  # whole already: nothing to gather
    plain_env.setenv("MASTER_ADDR", "127.0.0.1")
    plain_env.setenv("MASTER_PORT", str(free_port()))
    dist.init_process_group("gloo", rank=0, world_size=1)
    try:
        fully_shard(model)
        assert all(type(p).__name__ == "DTensor" for p in model.parameters())
        gathered = launcher.gathered_adapter_state(model)
    finally:
        dist.destroy_process_group()
    assert sorted(gathered) == sorted(whole) == ["1.bias", "1.weight"]
    assert all(type(t) is torch.Tensor and torch.equal(t, whole[name]) for name, t in gathered.items())


class TestAccelerateConfigs:
    """Every file in infra/accelerate parses with accelerate's own loader, uses only options
    `accelerate launch` knows (it ignores unknown ones silently) and reaches the plugin it configures."""

    EXPECTED = {"multi_cpu.yaml": "MULTI_GPU", "ddp_qlora.yaml": "MULTI_GPU", "fsdp2_qlora.yaml": "FSDP",
                "deepspeed_zero3.yaml": "DEEPSPEED"}

    def test_the_folder_holds_exactly_the_documented_configs(self):
        assert sorted(p.name for p in CONFIGS.glob("*.yaml")) == sorted(self.EXPECTED)

    @pytest.mark.parametrize("name", sorted(EXPECTED))
    def test_loads_with_accelerates_loader_with_the_expected_type(self, name):
        from accelerate.commands.config.config_args import ClusterConfig, load_config_from_file

        config = load_config_from_file(str(CONFIGS / name))
        assert isinstance(config, ClusterConfig)
        assert config.distributed_type.value == self.EXPECTED[name]
        assert config.num_machines == 1 and config.num_processes == (2 if name == "multi_cpu.yaml" else 8)

    @pytest.mark.parametrize("name", sorted(EXPECTED))
    def test_every_nested_option_is_an_accelerate_launch_option(self, name):
        from accelerate.commands.launch import launch_command_parser

        known = {action.dest for action in launch_command_parser()._actions}
        raw = yaml.safe_load((CONFIGS / name).read_text())
        nested = [*raw.get("fsdp_config", {}), *raw.get("deepspeed_config", {})]
        assert [key for key in nested if key not in known] == []

    def launched_env(self, name: str) -> tuple[object, dict[str, str]]:
        """What `accelerate launch --config_file <name>` would put in each worker's environment."""
        from accelerate.commands.launch import _validate_launch_command, launch_command_parser
        from accelerate.utils.launch import prepare_deepspeed_cmd_env, prepare_multi_gpu_env

        args = launch_command_parser().parse_args(["--config_file", str(CONFIGS / name), "-m", "tasks.train", "embedding"])
        args, defaults, _ = _validate_launch_command(args)
        if args.use_deepspeed:
            args.deepspeed_fields_from_accelerate_config = ",".join(defaults.deepspeed_config)
            return args, prepare_deepspeed_cmd_env(args)[1]
        return args, prepare_multi_gpu_env(args)

    def test_multi_cpu_starts_two_processes_itself_with_a_free_port(self):
        args, env = self.launched_env("multi_cpu.yaml")
        assert args.multi_gpu and args.use_cpu and args.nproc_per_node == "2"
        assert args.main_process_port > 0  # 0 in the file: a free port chosen at launch
        assert env["ACCELERATE_MIXED_PRECISION"] == "no"

    def test_ddp_config_starts_one_process_per_gpu_in_bf16(self):
        args, env = self.launched_env("ddp_qlora.yaml")
        assert args.multi_gpu and not getattr(args, "use_cpu", False) and args.nproc_per_node == "8"
        assert env["ACCELERATE_MIXED_PRECISION"] == "bf16" and "ACCELERATE_USE_FSDP" not in env

    def test_fsdp2_config_reaches_the_fsdp_plugin(self, monkeypatch):
        from accelerate.utils import FullyShardedDataParallelPlugin

        args, env = self.launched_env("fsdp2_qlora.yaml")
        assert args.nproc_per_node == "8" and env["ACCELERATE_USE_FSDP"] == "true"
        for name, value in env.items():
            if name.startswith(("FSDP_", "ACCELERATE_")):
                monkeypatch.setenv(name, value)
        plugin = FullyShardedDataParallelPlugin()
        assert plugin.fsdp_version == 2
        assert plugin.transformer_cls_names_to_wrap == ["Qwen3MoeDecoderLayer"]
        assert plugin.state_dict_type.name == "SHARDED_STATE_DICT"
        assert plugin.cpu_ram_efficient_loading is True and plugin.reshard_after_forward is True
        assert plugin.activation_checkpointing is False  # train.gradient_checkpointing does it
        assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"

    def test_zero3_config_reaches_the_deepspeed_plugin(self, monkeypatch):
        from accelerate.utils import DeepSpeedPlugin

        _, env = self.launched_env("deepspeed_zero3.yaml")
        for name, value in env.items():
            if name.startswith("ACCELERATE_"):
                monkeypatch.setenv(name, value)
        plugin = DeepSpeedPlugin()
        zero = plugin.deepspeed_config["zero_optimization"]
        assert plugin.zero_stage == 3 and plugin.zero3_init_flag is True
        assert zero["stage3_gather_16bit_weights_on_model_save"] is True
        assert zero["offload_param"]["device"] == "none" and zero["offload_optimizer"]["device"] == "none"
        assert plugin.deepspeed_config["gradient_accumulation_steps"] == "auto"  # filled in by the Trainer
        assert env["ACCELERATE_MIXED_PRECISION"] == "bf16"


@pytest.mark.slow
def test_two_cpu_processes_train_a_qlora_stage_and_write_its_outputs_once(tmp_path, plain_env):
    """`python -m tasks.train embedding`, as DVC runs it, with `train.launcher` set to two CPU
    processes: NF4 base, LoRA on attention and on the fused experts, DDP over gloo."""
    import torch
    from peft import get_peft_model_state_dict
    from safetensors.torch import load_file
    from transformers import set_seed

    from tasks.core.chain import base_with_chain
    from tasks.core.modeling import BaseInfo
    from tasks.core.adapters import attach_adapter
    from tasks.data.rows import read_rows

    plain_env.chdir(tmp_path)
    params = tiny_params("nf4")
    build_prepared_project(tmp_path, params)
    raw = params.model_dump(by_alias=True)
    raw["train"]["launcher"] = {"kind": "accelerate", "config_file": str(CONFIGS / "multi_cpu.yaml"), "num_processes": 2}
    raw["train"]["checkpoint_every"] = 3  # the Trainer checkpoints while it trains; the main process removes them
    (tmp_path / "p.yaml").write_text(yaml.safe_dump(raw, sort_keys=False))
    env = {k: v for k, v in os.environ.items() if k not in WORKER_ENV} | {
        "PYTHONPATH": str(PROJECT), "TQDM_DISABLE": "1", "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1",
        "MASTER_PORT": str(free_port()), "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}",
    }

    done = subprocess.run([sys.executable, "-m", "tasks.train", "embedding", "--params", "p.yaml"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-5000:]
    assert f"accelerate.commands.launch --config_file {CONFIGS / 'multi_cpu.yaml'} --num_processes 2" in out
    assert sorted(re.findall(r"train@embedding: process (\d) of 2\n", out)) == ["0", "1"]
    finished = dict(re.findall(r"train@embedding: process (\d) of 2 done, eval loss ([\d.]+)", out))
    assert sorted(finished) == ["0", "1"]
    assert out.count("train@embedding: loss ") == 1 and "2 processes" in out  # the summary, from the main process

    metrics = yaml.safe_load(paths.train_metrics("embedding").read_text())
    info = yaml.safe_load((paths.adapter_dir("embedding") / "stage.json").read_text())
    assert metrics["processes"] == 2 and info["processes"] == 2 and info["quantization"] == "nf4"
    assert metrics["steps"] == 6
    # Data parallel for real: the processes saw different rows (more tokens than one process's 24
    # rows can hold) and, with gradients averaged, ended with the same weights (same eval loss).
    longest = sorted((len(r["input_ids"]) for r in read_rows("embedding", "train")), reverse=True)
    assert metrics["tokens_seen"] > sum(longest[: 6 * 4])
    assert finished["0"] == finished["1"]

    adapters = sorted(p.relative_to(tmp_path) for p in tmp_path.rglob("adapter_model.safetensors"))
    assert adapters == [paths.adapter_dir("embedding") / "adapter_model.safetensors"]  # written once
    assert (paths.adapter_dir("embedding") / "preflight.json").is_file()
    assert not (paths.CHECKPOINTS_DIR / "embedding").exists()
    trained = load_file(paths.adapter_dir("embedding") / "adapter_model.safetensors")
    assert any("self_attn.q_proj.lora_A" in k for k in trained)
    assert any("mlp.experts.base_layer.lora_A" in k for k in trained)  # gate_up_proj (outer) ...
    assert any("mlp.experts.lora_A" in k for k in trained)  # ... and down_proj (inner) expert adapters

    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=env["MLFLOW_TRACKING_URI"])
    runs = client.search_runs([client.get_experiment_by_name(params.register_.experiment).experiment_id])
    assert [(r.info.run_name, r.info.status) for r in runs] == [("train@embedding", "FINISHED")]  # the main process's

    set_seed(params.seed)  # the adapter as train_stage creates it, before any step
    initial = get_peft_model_state_dict(attach_adapter(base_with_chain(BaseInfo.load(), [], "nf4"), params.train_job("embedding")))
    assert sorted(initial) == sorted(trained)
    unchanged = [k for k in trained if torch.equal(initial[k].to(trained[k].dtype), trained[k])]
    assert unchanged == [], "every LoRA factor, experts included, must have trained under DDP"
