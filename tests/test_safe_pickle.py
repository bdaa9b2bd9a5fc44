"""Checkpoints load without running pickled code: unknown classes become records, calls are refused."""

import dataclasses
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest
import torch
from helpers.legacy_checkpoints import SIMPLE_LLAMA, fake_module, shared_checkpoint

from hf_sft.errors import UsageError
from hf_sft.safe_pickle import LegacyRecord, load_checkpoint


class Calls:
    """Pickles as a call of `func(*args)`, as a hostile checkpoint would."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def test_plain_checkpoint_loads_as_saved(tmp_path):
    state = {"w": torch.arange(6.0).view(2, 3), "nested": [1, 2.5, "x", (True, None)], "step": 7}
    torch.save(state, tmp_path / "plain.pt")
    loaded = load_checkpoint(tmp_path / "plain.pt")
    torch.testing.assert_close(loaded["w"], state["w"])
    assert loaded["nested"] == state["nested"] and loaded["step"] == 7


def test_shared_simple_llama_config_becomes_a_record(shared_dir):
    obj = load_checkpoint(shared_checkpoint(shared_dir, SIMPLE_LLAMA))
    config = obj["config"]
    assert isinstance(config, LegacyRecord)
    assert type(config).__name__ == "TrainingConfig"
    assert (config.n_embd, config.n_heads, config.n_layers, config.use_mla) == (64, 4, 2, False)
    assert config.to_dict()["multiple_of"] == 32 and vars(config)["theta"] == 10000
    assert "simple_llama" not in sys.modules
    assert obj["model_state_dict"]["embeddings.weight"].shape == (8192, 64)


def test_unknown_class_module_is_never_imported(tmp_path, monkeypatch):
    marker = tmp_path / "IMPORTED"
    (tmp_path / "trainer_cfg_mod.py").write_text(
        textwrap.dedent(f"""
        import dataclasses, pathlib
        pathlib.Path({str(marker)!r}).touch()

        @dataclasses.dataclass
        class Cfg:
            lr: float = 3e-4
            name: str = "run"
        """)
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    import trainer_cfg_mod

    torch.save({"cfg": trainer_cfg_mod.Cfg(lr=0.1), "t": torch.ones(2)}, tmp_path / "ckpt.pt")
    del sys.modules["trainer_cfg_mod"]
    marker.unlink()

    loaded = load_checkpoint(tmp_path / "ckpt.pt")
    assert loaded["cfg"].to_dict() == {"lr": 0.1, "name": "run"}
    assert repr(loaded["cfg"]) == "Cfg(lr=0.1, name='run')"
    assert not marker.exists() and "trainer_cfg_mod" not in sys.modules


def test_records_of_one_class_share_a_type_and_cannot_be_called(tmp_path):
    @dataclasses.dataclass
    class Point:
        x: int = 0

    with fake_module("gone.module", Point=Point):
        torch.save([Point(1), Point(2)], tmp_path / "points.pt")
    first, second = load_checkpoint(tmp_path / "points.pt")
    assert type(first) is type(second) and (first.x, second.x) == (1, 2)
    with pytest.raises(Exception, match="gone.module.Point"):
        type(first)(x=3)


@pytest.mark.parametrize(
    ("make_payload", "named"),
    [
        (lambda marker: Calls(os.system, f"touch {marker}"), f"{os.system.__module__}.system"),
        (lambda marker: Calls(eval, f"open({marker!r}, 'w')"), "builtins.eval"),
        (lambda marker: Calls(exec, f"open({marker!r}, 'w')"), "builtins.exec"),
        (lambda marker: Calls(subprocess.check_call, ["touch", marker]), "subprocess.check_call"),
        (lambda marker: Calls(getattr, marker, "upper"), "builtins.getattr"),
    ],
    ids=["os.system", "eval", "exec", "subprocess", "getattr"],
)
@pytest.mark.parametrize("zip_format", [True, False], ids=["zip", "legacy"])
def test_calls_outside_the_allow_list_are_refused(tmp_path, make_payload, named, zip_format):
    marker = str(tmp_path / "MARKER")
    path = tmp_path / "evil.pt"
    payload = {"model": {"w": torch.zeros(1)}, "payload": make_payload(marker)}
    torch.save(payload, path, _use_new_zipfile_serialization=zip_format)

    with pytest.raises(UsageError) as caught:
        load_checkpoint(path)
    message = str(caught.value)
    assert message == f"refusing to load {path}: it asks to call {named}, which is not allowed in a checkpoint"
    assert "weights_only" not in message
    assert not os.path.exists(marker)


def test_legacy_format_checkpoint_with_a_record_loads(tmp_path):
    @dataclasses.dataclass
    class Cfg:
        lr: float = 0.0

    with fake_module("old.trainer", Cfg=Cfg):
        torch.save({"cfg": Cfg(0.5), "w": torch.ones(2)}, tmp_path / "old.pt", _use_new_zipfile_serialization=False)
    loaded = load_checkpoint(tmp_path / "old.pt")
    assert loaded["cfg"].to_dict() == {"lr": 0.5} and torch.equal(loaded["w"], torch.ones(2))


def test_call_of_an_unknown_module_function_is_refused_without_import(tmp_path):
    def run_me():
        raise AssertionError("must never run")

    with fake_module("attacker.tools", run_me=run_me):
        torch.save({"x": Calls(run_me)}, tmp_path / "evil.pt")
    with pytest.raises(UsageError, match="it asks to call attacker.tools.run_me"):
        load_checkpoint(tmp_path / "evil.pt")
    assert "attacker" not in sys.modules


def test_numpy_values_load(tmp_path):
    torch.save({"best_val_loss": np.float64(1.25), "seen": np.arange(3, dtype=np.int32)}, tmp_path / "np.pt")
    loaded = load_checkpoint(tmp_path / "np.pt")
    assert loaded["best_val_loss"] == 1.25
    np.testing.assert_array_equal(loaded["seen"], np.arange(3, dtype=np.int32))


def test_unreadable_files_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="checkpoint not found"):
        load_checkpoint(tmp_path / "missing.pt")
    (tmp_path / "text.pt").write_text("hello")
    with pytest.raises(UsageError, match="text.pt"):
        load_checkpoint(tmp_path / "text.pt")
