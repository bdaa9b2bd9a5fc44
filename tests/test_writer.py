"""hf_sft.writer: checked destinations, and a folder or file that is always its whole old or whole new state."""

import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from hf_sft import __version__
from hf_sft.errors import UsageError, WriteFailed
from hf_sft.writer import (
    OUTPUT_RECORD,
    PENDING_RECORD,
    check_complete,
    check_destination,
    incomplete,
    leftovers,
    new_file,
    new_folder,
    remove,
    replace_files,
    write_text,
    written_by,
)

HELPERS = Path(__file__).parent / "helpers"


def snapshot(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_new_folder_appears_whole_with_its_record(tmp_path):
    dest = tmp_path / "out"
    with new_folder(dest, command="export --to llama") as tmp:
        assert not dest.exists() and tmp.parent == tmp_path
        (tmp / "a.txt").write_text("a")
    assert snapshot(dest).keys() == {"a.txt", OUTPUT_RECORD}
    assert written_by(dest) == "export --to llama"
    assert leftovers(tmp_path) == []


def test_a_failed_block_leaves_the_old_folder_untouched(tmp_path):
    dest = tmp_path / "out"
    with new_folder(dest, command="convert") as tmp:
        (tmp / "old.txt").write_text("old")
    before = snapshot(dest)
    with pytest.raises(RuntimeError, match="boom"), new_folder(dest, command="convert") as tmp:
        (tmp / "new.txt").write_text("new")
        raise RuntimeError("boom")
    assert snapshot(dest) == before
    assert leftovers(tmp_path) == []


def test_replacing_a_folder_leaves_no_old_file(tmp_path):
    dest = tmp_path / "out"
    with new_folder(dest) as tmp:
        (tmp / "model-card.md").write_text("old model")
        (tmp / "weights").write_text("old")
    with new_folder(dest) as tmp:
        (tmp / "weights").write_text("new")
    assert snapshot(dest) == {"weights": b"new"}
    assert leftovers(tmp_path) == []


def test_new_file_replaces_whole_and_cleans_up_on_failure(tmp_path):
    dest = tmp_path / "model.pt"
    write_text(dest, "old")
    with pytest.raises(KeyError), new_file(dest) as tmp:
        tmp.write_text("half")
        raise KeyError("x")
    assert dest.read_text() == "old" and leftovers(tmp_path) == []
    write_text(dest, "new")
    assert dest.read_text() == "new" and leftovers(tmp_path) == []


def run_folder(tmp_path: Path) -> Path:
    """A folder with things of its own beside a set of files `replace_files` swaps."""
    folder = tmp_path / "run"
    (folder / "checkpoint-2").mkdir(parents=True)
    (folder / "checkpoint-2" / "optimizer.pt").write_bytes(b"state")
    (folder / "train.log").write_text("log")
    with replace_files(folder, replaces=[], note="run it again") as tmp:
        (tmp / "model.safetensors").write_text("old weights")
        (tmp / "adapter_config.json").write_text("old adapter")
    return folder


def test_replace_files_swaps_a_set_and_leaves_the_rest(tmp_path):
    folder = run_folder(tmp_path)
    names = ["model.safetensors", "adapter_config.json", "README.md"]
    with replace_files(folder, replaces=names, note="run it again") as tmp:
        assert tmp.parent == folder and not (folder / "README.md").exists()
        (tmp / "model.safetensors").write_text("new weights")
        (tmp / "README.md").write_text("new card")
    assert snapshot(folder) == {
        "checkpoint-2/optimizer.pt": b"state",
        "train.log": b"log",
        "model.safetensors": b"new weights",
        "README.md": b"new card",
    }  # the old set's adapter file went with it
    assert incomplete(folder) is None and leftovers(folder) == []
    check_complete(folder)


def test_a_failed_replace_files_block_changes_nothing(tmp_path):
    folder = run_folder(tmp_path)
    before = snapshot(folder)
    with (
        pytest.raises(RuntimeError, match="boom"),
        replace_files(folder, replaces=["model.safetensors"], note="x") as tmp,
    ):
        (tmp / "model.safetensors").write_text("half")
        raise RuntimeError("boom")
    assert snapshot(folder) == before and leftovers(folder) == []


def test_sigkill_during_replace_files_leaves_the_old_set_or_a_folder_marked_incomplete(tmp_path):
    """Seeded: the swap killed at 30 of its renames; without the record the folder is always the old or new set."""
    rng = random.Random(31)
    names = [f"part-{i:02d}.bin" for i in range(20)]
    outcomes = set()
    for attempt in range(30):
        folder = tmp_path / f"run{attempt}"
        with replace_files(folder, replaces=[], note="x") as tmp:
            for name in names:
                (tmp / name).write_text("old")
        kill_at = rng.randint(1, len(names) + 2)  # the record's rename, the files', and past the end
        pid = os.fork()
        if pid == 0:
            _swap_killed_at(folder, names[:-3], names, kill_at)  # three old files must go with the old set
        os.waitpid(pid, 0)
        files = {name: data for name, data in snapshot(folder).items() if not name.startswith(".hf_sft-tmp-")}
        old = {name: b"old" for name in names}
        new = {name: b"new" for name in names[:-3]}
        if incomplete(folder) is None:
            assert files in (old, new), f"kill at rename {kill_at}: a mix without the incomplete record"
            outcomes.add("old" if files == old else "new")
        else:
            with pytest.raises(UsageError) as err:
                check_complete(folder)
            assert str(err.value) == f"{folder} is incomplete: write it again"
            assert PENDING_RECORD in files
            outcomes.add("incomplete")
    assert outcomes == {"old", "new", "incomplete"}


def _swap_killed_at(folder: Path, new: list[str], old: list[str], kill_at: int) -> None:
    """In a forked child: swap `new` files in for `old` ones, SIGKILLed at the `kill_at`-th rename."""
    calls, real = [0], os.replace

    def dying_replace(src, dst):
        calls[0] += 1
        if calls[0] == kill_at:
            os.kill(os.getpid(), signal.SIGKILL)
        real(src, dst)

    os.replace = dying_replace
    with replace_files(folder, replaces=old, note="write it again") as tmp:
        for name in new:
            (tmp / name).write_text("new")
    os._exit(0)


def test_remove_takes_a_folder_away_whole(tmp_path):
    dest = tmp_path / "checkpoint-4"
    (dest / "sub").mkdir(parents=True)
    (dest / "sub" / "f").write_text("x")
    remove(dest)
    remove(dest)  # already gone: nothing to do
    assert not dest.exists() and leftovers(tmp_path) == []


@pytest.mark.parametrize(
    ("dest", "message"),
    [
        ("model", "--out {d}/model is the input {d}/model"),
        ("model/model.safetensors", "--out {d}/model/model.safetensors is inside the input {d}/model"),
        (".", "--out {d} holds the input {d}/model: choose another destination"),
    ],
)
def test_destination_may_not_overlap_a_source(tmp_path, dest, message):
    (tmp_path / "model").mkdir()
    (tmp_path / "model" / "model.safetensors").write_text("weights")
    path = tmp_path / dest if dest != "." else tmp_path
    with pytest.raises(UsageError) as err:
        check_destination(path, kind="file", command="export --to legacy-pt", sources=[tmp_path / "model"])
    assert str(err.value) == message.format(d=tmp_path)


def test_an_existing_file_needs_overwrite(tmp_path):
    dest = tmp_path / "optimizer.pt"
    dest.write_text("state")
    with pytest.raises(UsageError, match=r"already exists: choose another path, or pass --overwrite to replace it"):
        check_destination(dest, kind="file", command="export --to legacy-pt")
    assert check_destination(dest, kind="file", command="export --to legacy-pt", overwrite=True) == dest
    assert dest.read_text() == "state"  # checking writes nothing


def test_a_folder_is_reused_only_by_the_command_that_wrote_it(tmp_path):
    dest = tmp_path / "out"
    with new_folder(dest, command="convert") as tmp:
        (tmp / "config.json").write_text("{}")
    check_destination(dest, kind="folder", command="convert")
    with pytest.raises(UsageError, match=r"it holds the output of `hf-sft convert`"):
        check_destination(dest, kind="folder", command="export --to llama")
    run = tmp_path / "run"
    run.mkdir()
    (run / "train.log").write_text("log")
    with pytest.raises(UsageError, match=r"it holds files this command did not write"):
        check_destination(run, kind="folder", command="convert")
    check_destination(run, kind="folder", command="convert", overwrite=True)
    (tmp_path / "empty").mkdir()
    check_destination(tmp_path / "empty", kind="folder", command="convert")
    with pytest.raises(UsageError, match="is a folder; this command writes a file"):
        check_destination(tmp_path / "empty", kind="file", command="export --to gguf")


def test_permission_errors_become_one_line(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(os, "replace", refuse)
    with pytest.raises(WriteFailed) as err, new_file(tmp_path / "f.bin") as tmp:
        tmp.write_bytes(b"x")
    assert str(err.value) == f"cannot write {tmp_path / 'f.bin'}: permission denied"
    assert leftovers(tmp_path) == []


def test_a_full_disk_is_one_line_and_the_old_file_survives(small_disk):
    dest = small_disk / "weights.bin"
    write_text(dest, "old weights")
    with pytest.raises(WriteFailed) as err, new_file(dest) as tmp:
        tmp.write_bytes(os.urandom(2 << 20))
    assert str(err.value) == f"cannot write {dest}: no space left on device"
    assert dest.read_text() == "old weights"
    assert leftovers(small_disk) == []


def test_torch_reports_a_full_disk_in_its_own_words_and_it_is_still_named(small_disk):
    torch = pytest.importorskip("torch")
    dest = small_disk / "state"
    with pytest.raises(WriteFailed) as err, new_folder(dest) as tmp:
        torch.save({"w": torch.zeros(1 << 19)}, tmp / "optimizer.pt")  # 2 MiB: RuntimeError "unexpected pos"
    assert str(err.value) == f"cannot write {dest}: no space left on device"
    assert not dest.exists() and leftovers(small_disk) == []


def test_injected_enospc_is_named_where_mounting_is_impossible(tmp_path, monkeypatch):
    real_fsync = os.fsync

    def full(fd):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", full)
    with pytest.raises(WriteFailed, match=r"no space left on device"), new_folder(tmp_path / "out") as tmp:
        (tmp / "f").write_text("x")
    monkeypatch.setattr(os, "fsync", real_fsync)
    assert not (tmp_path / "out").exists() and leftovers(tmp_path) == []


def written(version: str, n_files: int = 40) -> dict[str, bytes]:
    """What `helpers/writer_child.py` leaves in its folder once it has committed `version`."""
    files = {f"part-{i:03d}.txt": f"{version} {i}\n".encode() * 2000 for i in range(n_files)}
    return {**files, OUTPUT_RECORD: b'{\n  "command": "test",\n  "hf_sft_version": "%s"\n}\n' % __version__.encode()}


@pytest.mark.slow
def test_sigkill_at_random_moments_never_leaves_a_mixed_folder(tmp_path):
    """Seeded: 12 kills while a 40-file folder replaces another; each time it is the whole old or the whole new."""
    rng = random.Random(1729)
    dest = tmp_path / "out"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HELPERS.parents[1]), os.environ.get("PYTHONPATH", "")])}
    subprocess.run([sys.executable, HELPERS / "writer_child.py", dest, "v0", "40"], env=env, check=True)
    current, outcomes = "v0", set()
    for attempt in range(1, 13):
        new = f"v{attempt}"
        child = subprocess.Popen(
            [sys.executable, HELPERS / "writer_child.py", dest, new, "40"], env=env, stdout=subprocess.PIPE
        )
        assert child.stdout.readline() == b"ready\n"
        time.sleep(rng.uniform(0.0, 0.3))
        child.send_signal(signal.SIGKILL)
        child.wait()
        state = snapshot(dest)
        assert state in (written(current), written(new)), f"kill {attempt}: {dest} is a mix of {current} and {new}"
        current = new if state == written(new) else current
        outcomes.add(current == new)
        for stale in leftovers(tmp_path):  # a killed writer's temporary sibling: never under the folder's name
            remove(stale)
    assert outcomes == {True, False}, "the kill points should fall both before and after the commit"


def test_the_next_write_removes_what_a_killed_writer_left_and_only_that(tmp_path):
    dest = tmp_path / "out"
    dead = tmp_path / ".hf_sft-tmp-out-4194999-0123abcd"  # no process has this pid (above the kernel's pid_max)
    live = tmp_path / f".hf_sft-tmp-out-{os.getppid()}-0123abcd"  # a live writer's staging
    trash = tmp_path / ".hf_sft-old-out-4194999-89abcdef"
    other = tmp_path / ".hf_sft-tmp-outer-4194999-0123abcd"  # another destination's
    for path in (dead, live, trash):
        path.mkdir()
        (path / "part").write_text("half")
    other.write_text("half")
    with new_folder(dest, command="convert") as tmp:
        (tmp / "a").write_text("a")
    assert sorted(p.name for p in leftovers(tmp_path)) == sorted([live.name, other.name])
    write_text(tmp_path / "outer", "x")
    assert leftovers(tmp_path) == [live]


def test_a_folder_marked_under_the_records_earlier_name_is_still_recognised(tmp_path):
    dest = tmp_path / "out"
    dest.mkdir()
    (dest / ".hf_sft_output.json").write_text('{"command": "convert"}')  # as versions before the rename wrote it
    (dest / "config.json").write_text("{}")
    assert written_by(dest) == "convert"
    assert check_destination(dest, kind="folder", command="convert") == dest
