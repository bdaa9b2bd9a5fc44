"""Training arguments: the seed's flags and defaults, YAML under command line, every config in configs/ parses."""

from pathlib import Path

import pytest
from accelerate.commands.config.config_args import load_config_from_file

from hf_sft.data import LENGTH_POLICIES
from hf_sft.errors import UsageError
from hf_sft.training.arguments import parse_args

CONFIGS = Path(__file__).resolve().parents[1] / "configs"


def test_seed_flags_and_defaults():
    model_args, data_args, args = parse_args(["--data_path", "d.jsonl"])
    assert args.output_dir == "out/finetune"
    assert (args.per_device_train_batch_size, args.learning_rate, args.num_train_epochs) == (2, 3e-5, 1)
    assert (args.max_steps, args.gradient_accumulation_steps) == (-1, 8)
    assert (args.logging_steps, args.save_steps) == (10, 100)
    assert model_args.device == "cuda" and model_args.dtype is None and not args.demo
    assert data_args.data_path == "d.jsonl" and args.packing and args.seed == 1337


def test_seed_flag_names_map_onto_training_arguments():
    flags = ["--out_dir", "o", "--batch_size", "5", "--num_epochs", "3", "--max_iters", "7", "--log_interval", "2"]
    flags += ["--save_interval", "4", "--resume_from_ckpt_path", "latest", "--device", "cpu", "--dtype", "bfloat16"]
    model_args, _, args = parse_args(["--data_path", "d.jsonl", *flags])
    assert (args.output_dir, args.per_device_train_batch_size, args.num_train_epochs) == ("o", 5, 3)
    assert (args.max_steps, args.logging_steps, args.save_steps) == (7, 2, 4)
    assert args.resume_from_checkpoint == "latest"
    assert (model_args.device, model_args.dtype) == ("cpu", "bfloat16")


def test_command_line_overrides_yaml(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("data_path: a.jsonl\nbatch_size: 3\nlearning_rate: 1.0e-4\nout_dir: from_yaml\n")
    _, data_args, args = parse_args(["--config", str(config), "--batch_size", "9"])
    assert data_args.data_path == "a.jsonl" and args.output_dir == "from_yaml"
    assert (args.per_device_train_batch_size, args.learning_rate) == (9, 1e-4)


@pytest.mark.parametrize(
    "content, message",
    [("bogus_key: 1\n", "unknown keys bogus_key"), ("- a\n- b\n", "mapping"), ("a: [\n", "not valid YAML")],
)
def test_bad_yaml_is_a_usage_error(tmp_path, content, message):
    config = tmp_path / "c.yaml"
    config.write_text(content)
    with pytest.raises(UsageError, match=message):
        parse_args(["--config", str(config)])


def test_unknown_flag_is_a_usage_error():
    with pytest.raises(UsageError, match="--no_such_flag"):
        parse_args(["--data_path", "d", "--no_such_flag", "1"])


def test_no_arguments_is_the_demo_and_equals_demo_yaml():
    model_args, data_args, args = parse_args([])
    model_yaml, data_yaml, args_yaml = parse_args(["--config", str(CONFIGS / "demo.yaml")])
    assert args.demo and args.output_dir == "out/demo" and model_args.device == "cpu"
    assert (model_args, data_args) == (model_yaml, data_yaml)
    assert {k: v for k, v in args.to_dict().items() if k != "config"} == {
        k: v for k, v in args_yaml.to_dict().items() if k != "config"
    }


@pytest.mark.parametrize("config", sorted(CONFIGS.glob("*.yaml")), ids=lambda p: p.name)
def test_every_training_yaml_parses_and_opens_with_its_command(config):
    _, _, args = parse_args(["--config", str(config)])
    assert args.output_dir.startswith("out/")
    header = config.read_text().split("\n\n")[0]
    assert header.startswith("#") and "scripts/train.py" in header


@pytest.mark.parametrize("config", sorted((CONFIGS / "accelerate").glob("*.yaml")), ids=lambda p: p.name)
def test_every_accelerate_config_loads(config):
    loaded = load_config_from_file(str(config))
    assert loaded.num_processes >= 1
    assert config.read_text().startswith("#") and "accelerate launch" in config.read_text().split("\n\n")[0]


def test_bare_hub_private_repo_flag_means_true():
    assert parse_args(["--data_path", "d", "--hub_private_repo"])[2].hub_private_repo is True
    assert parse_args(["--data_path", "d", "--hub_private_repo", "false"])[2].hub_private_repo is False
    assert parse_args(["--data_path", "d"])[2].hub_private_repo is None


@pytest.mark.parametrize("policy", LENGTH_POLICIES)
def test_training_takes_every_length_policy_of_the_data_pipeline(policy):
    assert parse_args(["--data_path", "d", "--length_policy", policy])[1].length_policy == policy


@pytest.mark.parametrize(
    "line, message",
    [
        ("batch_size: 2.5", "batch_size: expected an integer, got 2.5"),
        ("max_iters: [1, 2]", "max_iters: expected an integer, got [1, 2]"),
        ("output_dir: 5", "output_dir: expected a string, got 5"),
        ("out_dir: 5", "out_dir: expected a string, got 5"),  # the key as the YAML spells it
        ("learning_rate: fast", 'learning_rate: expected a number, got "fast"'),
        ("packing: maybe", 'packing: expected true or false, got "maybe"'),
        ("lr_scheduler_type: steep", "lr_scheduler_type: expected one of linear, cosine"),
        ("data_path: [a.jsonl, 3]", 'data_path: expected a list, each a string, got ["a.jsonl", 3]'),
        ("save_interval: true", "save_interval: expected a number, got true"),
    ],
)
def test_a_yaml_value_of_the_wrong_type_is_refused_by_key_before_any_work(tmp_path, capsys, line, message):
    from hf_sft.cli import main

    config = tmp_path / "c.yaml"
    config.write_text(f"device: cpu\n{line}\n")
    out = tmp_path / "out"
    assert main(["train", "--config", str(config), "--out_dir", str(out), "--demo"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith(f"error: {config}: {message}"), err
    assert not out.exists()


def test_yaml_values_of_the_right_type_still_parse(tmp_path):
    config = tmp_path / "c.yaml"
    config.write_text("batch_size: '3'\nwarmup_steps: 0.03\nlr_scheduler_kwargs: {min_lr: 1.0e-5}\nmax_seq_len: ~\n")
    _, data_args, args = parse_args(["--config", str(config)])
    assert args.per_device_train_batch_size == 3 and args.lr_scheduler_kwargs == {"min_lr": 1.0e-5}
