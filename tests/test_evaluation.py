"""`hf-sft eval` (hf_sft.evaluation): a hand loop's figures, compare, card, report, bad inputs, interruptions."""

import json
import os
import random
import signal
import subprocess
import sys
import time
from html.parser import HTMLParser
from pathlib import Path

import pytest
from helpers.eval_cases import hand_figures, record_groups, tiny_folder, write_records
from helpers.legacy_checkpoints import NANOGPT, shared_checkpoint, shared_tokenizer

from hf_sft.cli import main
from hf_sft.evaluation import CARD_FILE, REPORT_FILE, RESULTS_FILE, evaluate_after_training, write_outputs
from hf_sft.writer import PENDING_RECORD, leftovers

REPO = Path(__file__).resolve().parents[1]
MAX_SEQ_LEN = 96
OUTPUTS = (RESULTS_FILE, REPORT_FILE)


@pytest.fixture(scope="module")
def folders(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("eval_models")
    return {family: tiny_folder(root / family, family) for family in ("nanogpt", "llama")}


def run_eval(capsys, *argv) -> tuple[int, str, str]:
    code = main(["eval", *map(str, argv)])
    out, err = capsys.readouterr()
    return code, out, err


def results_of(folder: Path) -> dict:
    return json.loads((folder / RESULTS_FILE).read_text(encoding="utf-8"))


def assert_figures_equal(got: dict, expected: dict) -> None:
    assert got["tokens"] == expected["tokens"] and got["examples"] == expected["examples"]
    for metric in ("loss", "accuracy"):
        assert got[metric] == pytest.approx(expected[metric], abs=1e-5), metric
    assert got["perplexity"] == pytest.approx(expected["perplexity"], rel=1e-5)


@pytest.mark.parametrize("packing", ["true", "false"])
@pytest.mark.parametrize("family", ["nanogpt", "llama"])
def test_figures_equal_a_hand_loop_overall_and_per_group(folders, tmp_path, capsys, family, packing):
    for seed in (0, 1):
        rng = random.Random(seed)
        data = write_records(tmp_path / f"records{seed}.jsonl", seed=seed, n=rng.randint(24, 40))
        out = tmp_path / f"out{seed}"
        batch = rng.choice([1, 3, 8])
        argv = [folders[family], "--data_path", data, "--max_seq_len", MAX_SEQ_LEN, "--packing", packing]
        code, _, err = run_eval(
            capsys, *argv, "--batch_size", batch, "--num_answers", 0, "--out", out, "--no_model_card"
        )
        assert code == 0, err
        assert not (folders[family] / CARD_FILE).exists() and not (out / CARD_FILE).exists()
        results = results_of(out)
        expected = hand_figures(folders[family], data, MAX_SEQ_LEN)
        assert set(results["groups"]) == set(expected) - {"all"}
        assert_figures_equal(results["overall"]["model"], expected["all"])
        for name, entry in results["groups"].items():
            assert_figures_equal(entry["model"], expected[name])
        assert results["data"]["group_by"] == "category"
        assert results["settings"]["packing"] is (packing == "true")
        assert "(no group)" in results["groups"]  # records without a category form their own group


def test_group_by_names_another_field_and_held_out_part(folders, tmp_path, capsys):
    data = write_records(tmp_path / "records.jsonl", seed=3, n=40, group_field="topic")
    out = tmp_path / "out"
    argv = [folders["llama"], "--data_path", data, "--max_seq_len", MAX_SEQ_LEN, "--num_answers", 0, "--out", out]
    argv.append("--no_model_card")
    code, _, err = run_eval(capsys, *argv, "--group_by", "topic")
    assert code == 0, err
    expected = hand_figures(folders["llama"], data, MAX_SEQ_LEN, group_field="topic")
    assert_figures_equal(results_of(out)["overall"]["model"], expected["all"])
    assert set(results_of(out)["groups"]) == set(expected) - {"all"}
    assert set(expected) - {"all"} <= set(record_groups(data, "topic"))
    # Without --group_by and without a category field: one group, the whole set.
    code, _, err = run_eval(capsys, *argv)
    assert code == 0, err
    assert results_of(out)["groups"] == {} and results_of(out)["data"]["group_by"] is None
    # --val_split evaluates the part training held out under the same seed.
    from hf_sft.data import build_datasets, format_of
    from hf_sft.tokenizer import load_tokenizer

    code, _, err = run_eval(capsys, *argv, "--val_split", "0.25", "--seed", "7")
    assert code == 0, err
    tokenizer = load_tokenizer(folders["llama"])
    held_out = build_datasets(
        data, tokenizer, template=format_of(tokenizer), max_seq_len=MAX_SEQ_LEN, val_split=0.25, seed=7
    ).eval
    assert results_of(out)["overall"]["model"]["examples"] == len(held_out.index)


def test_conversations_are_scored_on_their_assistant_turns(folders, tmp_path, capsys):
    chat = REPO / "hf_sft" / "demo" / "chat_sample.jsonl"
    out = tmp_path / "out"
    code, _, err = run_eval(capsys, folders["nanogpt"], "--data_path", chat, "--out", out, "--no_model_card")
    assert code == 0, err
    results = results_of(out)
    assert results["groups"] == {} and results["answers"] == []  # no group field, no instruction to answer
    assert_figures_equal(results["overall"]["model"], hand_figures(folders["nanogpt"], chat, 128)["all"])
    code, _, err = run_eval(capsys, folders["nanogpt"], "--data_path", chat, "--group_by", "category")
    assert code == 2 and "holds conversations" in err


@pytest.mark.parametrize("family", ["nanogpt", "llama"])
def test_compare_with_itself_gives_zero_differences_and_identical_answers(folders, tmp_path, capsys, family):
    for seed in (4, 5):
        data = write_records(tmp_path / f"records{seed}.jsonl", seed=seed, n=24)
        out = tmp_path / f"out{seed}"
        argv = [folders[family], "--data_path", data, "--max_seq_len", MAX_SEQ_LEN, "--compare", folders[family]]
        code, _, err = run_eval(
            capsys, *argv, "--num_answers", 3, "--max_new_tokens", 8, "--out", out, "--no_model_card"
        )
        assert code == 0, err
        results = results_of(out)
        for entry in [results["overall"], *results["groups"].values()]:
            assert entry["difference"] == {"loss": 0.0, "perplexity": 0.0, "accuracy": 0.0}
            assert entry["model"] == entry["base"]
        assert len(results["answers"]) == 3
        for answer in results["answers"]:
            assert answer["model"] == answer["base"] and answer["model"]
            assert answer["reference"]
        assert results["base"]["path"] == results["model"]["path"]


def test_compare_against_a_legacy_base_evaluates_the_converted_base(shared_dir, tmp_path, capsys):
    checkpoint, tokenizer = shared_checkpoint(shared_dir, NANOGPT), shared_tokenizer(shared_dir, NANOGPT)
    converted = tmp_path / "converted"
    flags = {"--checkpoint": checkpoint, "--tokenizer": tokenizer, "--out": converted}
    assert main(["convert", *(str(word) for pair in flags.items() for word in pair)]) == 0
    lines = (shared_dir / "data" / "dolly" / "dolly_sample.jsonl").read_text(encoding="utf-8").splitlines()
    data = tmp_path / "dolly.jsonl"
    data.write_text("\n".join(lines[:24]) + "\n", encoding="utf-8")
    capsys.readouterr()
    argv = [converted, "--data_path", data, "--max_seq_len", 128, "--num_answers", 1, "--max_new_tokens", 4]
    code, _, err = run_eval(capsys, *argv, "--compare", checkpoint, "--tokenizer_path", tokenizer)
    assert code == 0, err
    results = results_of(converted)
    assert results["base"]["kind"] == "legacy" and results["base"]["path"] == str(checkpoint.resolve())
    for entry in [results["overall"], *results["groups"].values()]:
        assert entry["base"] == pytest.approx(entry["model"], abs=1e-5)
    assert results["answers"][0]["base"] == results["answers"][0]["model"]
    expected = hand_figures(converted, data, 128)
    assert_figures_equal(results["overall"]["base"], expected["all"])


def test_model_card_metadata_round_trips_and_keeps_the_text(folders, tmp_path, capsys):
    import shutil

    from huggingface_hub import ModelCard

    folder = tmp_path / "model"
    shutil.copytree(folders["nanogpt"], folder)
    text = "\n# My model\n\nHand-written words that must survive.\n"
    (folder / CARD_FILE).write_text(f"---\nlicense: mit\ntags:\n- mine\n---\n{text}", encoding="utf-8")
    for seed in (6, 7):  # a second evaluation replaces the first one's results
        data = write_records(tmp_path / "records.jsonl", seed=seed, n=30)
        code, _, err = run_eval(capsys, folder, "--data_path", data, "--max_seq_len", MAX_SEQ_LEN, "--num_answers", 0)
        assert code == 0, err
        results = results_of(folder)
        card = ModelCard.load(folder / CARD_FILE)
        assert card.text == text
        assert card.data.license == "mit" and card.data.tags == ["mine"]
        index = card.data.to_dict()["model-index"]
        found = {}
        for result in index[0]["results"]:
            group = result["dataset"].get("config", "all")
            for metric in result["metrics"]:
                assert (group, metric["type"]) not in found
                found[group, metric["type"]] = metric["value"]
        groups = {"all": results["overall"], **results["groups"]}
        assert set(found) == {(group, m) for group in groups for m in ("loss", "perplexity", "accuracy")}
        for (group, metric), value in found.items():
            assert value == groups[group]["model"][metric]


class _Page(HTMLParser):
    def __init__(self):
        super().__init__()
        self.tags, self.attributes, self.text = [], [], []

    def handle_starttag(self, tag, attrs):
        self.tags.append(tag)
        self.attributes += attrs

    def handle_data(self, data):
        self.text.append(data)


def figures(entry: dict) -> list:
    return [value for role in ("model", "base", "difference") for value in entry.get(role, {}).values()]


def test_html_report_holds_every_figure_and_references_nothing_outside(folders, tmp_path, capsys):
    for seed, family in ((8, "nanogpt"), (9, "llama")):
        data = write_records(tmp_path / f"records{seed}.jsonl", seed=seed, n=30)
        out = tmp_path / f"out{seed}"
        argv = [folders[family], "--data_path", data, "--max_seq_len", MAX_SEQ_LEN, "--compare", folders[family]]
        code, _, err = run_eval(
            capsys, *argv, "--num_answers", 2, "--max_new_tokens", 6, "--out", out, "--no_model_card"
        )
        assert code == 0, err
        results = results_of(out)
        page = _Page()
        page.feed((out / REPORT_FILE).read_text(encoding="utf-8"))
        page.close()
        assert "table" in page.tags and "svg" in page.tags
        assert not {"script", "link", "img", "iframe", "object", "embed"} & set(page.tags)
        assert not [name for name, _ in page.attributes if name in ("src", "href") or name.startswith("on")]
        words = set(" ".join(page.text).split()) | {value for _, value in page.attributes if value}
        words |= {cell.strip() for cell in page.text}
        for entry in [results["overall"], *results["groups"].values()]:
            for value in figures(entry):
                assert (repr(value) if isinstance(value, float) else str(value)) in words, value
        for name in results["groups"]:
            assert name in words
        for answer in results["answers"]:
            assert answer["model"] in page.text and answer["reference"] in page.text
        raw = (out / REPORT_FILE).read_text(encoding="utf-8")
        assert "http" not in raw and "url(" not in raw and "@import" not in raw


def bad_cases(tmp_path: Path, folder: Path) -> dict[str, list]:
    import shutil

    good = write_records(tmp_path / "good.jsonl", seed=10, n=12)
    (tmp_path / "empty.jsonl").write_text("", encoding="utf-8")
    (tmp_path / "bad.jsonl").write_text('{"instruction": "a", "output": "b"}\n{not json\n', encoding="utf-8")
    (tmp_path / "records.txt").write_text("hello\n", encoding="utf-8")
    incomplete = tmp_path / "incomplete"
    shutil.copytree(folder, incomplete)
    (incomplete / PENDING_RECORD).write_text(json.dumps({"note": "rerun the save", "files": []}), encoding="utf-8")
    no_weights = tmp_path / "no_weights"
    shutil.copytree(folder, no_weights)
    (no_weights / "model.safetensors").unlink()
    return {
        "missing file": [folder, "--data_path", tmp_path / "nope.jsonl"],
        "wrong extension": [folder, "--data_path", tmp_path / "records.txt"],
        "empty file": [folder, "--data_path", tmp_path / "empty.jsonl"],
        "bad record": [folder, "--data_path", tmp_path / "bad.jsonl"],
        "empty split": [folder, "--data_path", good, "--max_seq_len", 4],
        "no held-out example": [
            folder,
            "--data_path",
            tmp_path / "bad.jsonl",
            "--skip_bad_records",
            "--val_split",
            1 / 2,
        ],
        "unknown group field": [folder, "--data_path", good, "--group_by", "colour"],
        "incomplete folder": [incomplete, "--data_path", good],
        "missing folder": [tmp_path / "no_model", "--data_path", good],
        "legacy base without tokenizer": [folder, "--data_path", good, "--compare", tmp_path / "base.pt"],
        "missing legacy base": [folder, "--data_path", good, "--compare", tmp_path / "missing.pt"],
        "base not on the Hub": [folder, "--data_path", good, "--compare", "nobody-here/no-such-model"],
        "base without weights": [folder, "--data_path", good, "--compare", no_weights],
        "no data": [folder],
        "bad batch size": [folder, "--data_path", good, "--batch_size", 0],
    }


def test_each_bad_input_exits_2_with_one_line(folders, tmp_path, capsys):
    (tmp_path / "base.pt").write_bytes(b"not really")
    for name, argv in bad_cases(tmp_path, folders["nanogpt"]).items():
        code, out, err = run_eval(capsys, *argv)
        assert code == 2, (name, err)
        lines = [line for line in err.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("error: ")]
        assert len(errors) == 1 and errors == lines[-1:], (name, err)
        assert not (Path(argv[0]) / RESULTS_FILE).exists(), name


def test_an_exception_midway_leaves_every_final_name_as_it_was(folders, tmp_path, capsys, monkeypatch):
    import shutil

    import hf_sft.data

    folder = tmp_path / "model"
    shutil.copytree(folders["llama"], folder)
    card = "---\nlicense: mit\n---\n\n# Kept\n"
    (folder / CARD_FILE).write_text(card, encoding="utf-8")
    data = write_records(tmp_path / "records.jsonl", seed=11, n=20)
    argv = [folder, "--data_path", data, "--max_seq_len", MAX_SEQ_LEN, "--batch_size", 4, "--compare", folder]
    argv += ["--num_answers", 1, "--max_new_tokens", 4]
    real_make_collator, real_write_text = hf_sft.data.make_collator, Path.write_text
    rng = random.Random(12)
    for _ in range(4):
        # 5 batches per model: the failure lands in the model's scoring or in the base's
        monkeypatch.setattr(hf_sft.data, "make_collator", failing_collator(real_make_collator, rng.randint(1, 10)))
        code, _, err = run_eval(capsys, *argv)
        assert code == 1 and "injected failure" in err
        assert (folder / CARD_FILE).read_text(encoding="utf-8") == card
        assert not any((folder / name).exists() for name in OUTPUTS)
    monkeypatch.setattr(hf_sft.data, "make_collator", real_make_collator)
    for fail_at in (1, 2, 3):  # while the outputs are staged
        monkeypatch.setattr(Path, "write_text", failing_staged_write(real_write_text, fail_at))
        code, _, err = run_eval(capsys, *argv)
        monkeypatch.setattr(Path, "write_text", real_write_text)
        assert code == 1 and "injected write failure" in err
        assert (folder / CARD_FILE).read_text(encoding="utf-8") == card
        assert not any((folder / name).exists() for name in OUTPUTS)
        assert not leftovers(folder) and not (folder / PENDING_RECORD).exists()


def failing_collator(make_collator, fail_at: int):
    """`make_collator` whose collators fail on the `fail_at`-th batch, counted over all of them."""
    calls = []

    def make(*args, **kwargs):
        collate = make_collator(*args, **kwargs)

        def collate_or_fail(features):
            calls.append(1)
            if len(calls) == fail_at:
                raise RuntimeError("injected failure")
            return collate(features)

        return collate_or_fail

    return make


def failing_staged_write(write_text, fail_at: int):
    """`Path.write_text` failing on the `fail_at`-th file written under a temporary (staging) name."""
    staged = []

    def write(self, *args, **kwargs):
        if ".hf_sft-tmp-" in str(self):
            staged.append(self)
            if len(staged) == fail_at:
                raise OSError("injected write failure")
        return write_text(self, *args, **kwargs)

    return write


def wait_for(process: subprocess.Popen, marker: bytes, timeout: float = 120) -> bytes:
    """What `process` wrote on stderr until `marker` appeared."""
    seen = b""
    deadline = time.monotonic() + timeout
    while marker not in seen and time.monotonic() < deadline:
        chunk = os.read(process.stderr.fileno(), 4096)
        if not chunk:
            break
        seen += chunk
    return seen


def test_a_signal_midway_leaves_no_partial_output(folders, tmp_path):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(folders["nanogpt"], folder)
    data = write_records(tmp_path / "records.jsonl", seed=13, n=40)
    argv = [sys.executable, "-m", "hf_sft.cli", "eval", str(folder), "--data_path", str(data), "--batch_size", "1"]
    argv += ["--max_seq_len", str(MAX_SEQ_LEN), "--compare", str(folder), "--num_answers", "0"]
    env = {**os.environ, "PYTHONPATH": str(REPO), "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    rng = random.Random(14)
    outcomes = set()

    def started() -> tuple[subprocess.Popen, bytes]:
        for name in (*OUTPUTS, CARD_FILE):
            (folder / name).unlink(missing_ok=True)
        process = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path)
        return process, wait_for(process, b"eval model")  # scoring has begun

    # The signals land at seeded fractions of how long the rest of an uninterrupted evaluation takes on this machine.
    process, _ = started()
    begun = time.monotonic()
    assert process.wait(timeout=120) == 0
    span = time.monotonic() - begun
    # The first signal comes as scoring begins, so that at least one lands before the end whatever the machine's load.
    fractions = [0.0, *(rng.uniform(0.0, 0.8) for _ in range(4))]
    for signum, fraction in zip(
        (signal.SIGTERM, signal.SIGINT, signal.SIGTERM, signal.SIGINT, signal.SIGTERM), fractions, strict=True
    ):
        process, err = started()
        time.sleep(fraction * span)
        process.send_signal(signum)
        err += process.communicate(timeout=120)[1]
        present = [(folder / name).exists() for name in (*OUTPUTS, CARD_FILE)]
        if (folder / PENDING_RECORD).exists():  # cut during the final moves: the next evaluation recovers
            assert main(["eval", str(folder), "--data_path", str(data), "--num_answers", "0"]) == 0
            assert not (folder / PENDING_RECORD).exists() and results_of(folder)["overall"]["model"]["tokens"]
        elif all(present):  # finished before the signal (or the signal came while the process was exiting)
            assert results_of(folder)["overall"]["model"]["tokens"] > 0
            assert (folder / REPORT_FILE).read_text(encoding="utf-8").rstrip().endswith("</html>")
            assert "model-index" in (folder / CARD_FILE).read_text(encoding="utf-8")
        else:
            assert not any(present) and process.returncode != 0, err
        outcomes.add(any(present))
    assert False in outcomes  # at least one signal landed before the end


def test_a_folder_left_incomplete_by_an_evaluation_is_recovered_and_others_are_refused(
    folders, tmp_path, capsys, monkeypatch
):
    import shutil

    folder = tmp_path / "model"
    shutil.copytree(folders["nanogpt"], folder)
    data = write_records(tmp_path / "records.jsonl", seed=17, n=12)
    argv = [folder, "--data_path", data, "--max_seq_len", MAX_SEQ_LEN, "--num_answers", 0]
    assert run_eval(capsys, *argv)[0] == 0
    results = results_of(folder)
    real_replace, moved = os.replace, []

    def replace_twice(source, dest):  # the mark and the first file move in, then the process "dies"
        if len(moved) == 2:
            raise KeyboardInterrupt
        moved.append(Path(dest).name)
        return real_replace(source, dest)

    monkeypatch.setattr(os, "replace", replace_twice)
    with pytest.raises(KeyboardInterrupt):
        write_outputs(results | {"command": "cut"}, folder, card_folder=folder)
    monkeypatch.setattr(os, "replace", real_replace)
    assert moved == [PENDING_RECORD, CARD_FILE] and (folder / PENDING_RECORD).exists()
    code, _, err = run_eval(capsys, *argv)
    assert code == 0, err
    assert "cut short" in err and not (folder / PENDING_RECORD).exists()
    assert results_of(folder)["command"] == results["command"]
    (folder / PENDING_RECORD).write_text(json.dumps({"note": "a training save was cut", "files": []}), "utf-8")
    code, _, err = run_eval(capsys, *argv)
    assert code == 2 and "a training save was cut" in err


def test_evaluate_after_training_writes_the_results_into_the_final_folder(folders, tmp_path):
    import shutil

    from hf_sft.data import build_datasets, format_of
    from hf_sft.tokenizer import load_tokenizer

    folder = tmp_path / "final"
    shutil.copytree(folders["llama"], folder)
    data = write_records(tmp_path / "records.jsonl", seed=15, n=40)
    tokenizer = load_tokenizer(folder)
    split = build_datasets(
        data, tokenizer, template=format_of(tokenizer), max_seq_len=MAX_SEQ_LEN, val_split=0.3, seed=1
    ).eval
    results = evaluate_after_training(
        folder,
        split,
        records_source=str(data),
        base=str(folders["llama"]),
        command="hf-sft train --val_split 0.3",
        batch_size=4,
        packing=True,
        num_answers=1,
        max_new_tokens=4,
        device="cpu",
    )
    assert results_of(folder) == json.loads(json.dumps(results))
    assert results["overall"]["model"]["examples"] == len(split.index)
    assert results["overall"]["difference"]["loss"] == 0.0
    assert results["data"]["source"].endswith("(held out)")
    assert (folder / REPORT_FILE).is_file() and "model-index" in (folder / CARD_FILE).read_text(encoding="utf-8")


def test_compare_against_a_hub_id_evaluates_the_downloaded_base(folders, tmp_path):
    import shutil

    from helpers.hub_server import HubStandIn

    folder = tmp_path / "model"
    shutil.copytree(folders["llama"], folder)
    data = write_records(tmp_path / "records.jsonl", seed=16, n=16)
    token = "hf_eval_test_token"
    with HubStandIn(tmp_path / "hub", token) as hub:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "HF_TOKEN")}
        env |= {"HF_ENDPOINT": hub.endpoint, "HF_HUB_DISABLE_XET": "1", "HF_HOME": str(tmp_path / "home")}
        env |= {"HF_TOKEN": token, "PYTHONPATH": str(REPO)}

        def hf_sft(*argv) -> subprocess.CompletedProcess:
            command = [sys.executable, "-m", "hf_sft.cli", *map(str, argv)]
            return subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)

        pushed = hf_sft("push", folders["llama"], "--repo_id", "tester/base")
        assert pushed.returncode == 0, pushed.stderr[-2000:]
        argv = [folder, "--data_path", data, "--max_seq_len", MAX_SEQ_LEN, "--num_answers", 1, "--max_new_tokens", 4]
        done = hf_sft("eval", *argv, "--compare", "tester/base")
        assert done.returncode == 0, done.stderr[-2000:]
        commit = hub.load_repo("tester/base")["commits"][-1]
    results = results_of(folder)
    assert results["base"]["kind"] == "hub" and results["base"]["path"] == "tester/base"
    assert results["base"]["revision"] == commit["oid"]
    assert results["overall"]["difference"] == {"loss": 0.0, "perplexity": 0.0, "accuracy": 0.0}
    assert results["answers"][0]["base"] == results["answers"][0]["model"]


def test_a_training_run_with_an_eval_split_ends_with_its_evaluation_in_the_final_folder(folders, tmp_path, capsys):
    """The run's own final evaluation equals `hf-sft eval` of the final folder on the held-out part, against the base
    the run started from; the card carries the model-index."""
    from huggingface_hub import ModelCard

    base = folders["nanogpt"]
    data = write_records(tmp_path / "records.jsonl", seed=22, n=40)
    out = tmp_path / "run"
    held_out = ["--val_split", "0.25", "--seed", "3", "--max_seq_len", str(MAX_SEQ_LEN)]
    argv = ["train", "--pretrained_ckpt_path", str(base), "--data_path", str(data), *held_out, "--device", "cpu"]
    argv += ["--max_iters", "3", "--batch_size", "2", "--learning_rate", "1e-3", "--out_dir", str(out)]
    assert main(argv) == 0, capsys.readouterr().err[-2000:]
    capsys.readouterr()
    during = results_of(out)
    assert {RESULTS_FILE, REPORT_FILE} <= {p.name for p in out.iterdir()}
    assert during["base"]["path"] == str(base)

    cli = tmp_path / "cli"
    code, _, err = run_eval(capsys, out, "--data_path", data, *held_out, "--compare", base, "--out", cli)
    assert code == 0, err
    after = results_of(cli)
    assert during["overall"]["model"]["examples"] == after["overall"]["model"]["examples"] > 0
    for kind in ("model", "base", "difference"):
        for metric in ("loss", "accuracy"):
            assert during["overall"][kind][metric] == pytest.approx(after["overall"][kind][metric], abs=1e-5)
    assert set(during["groups"]) == set(after["groups"])
    for name, entry in during["groups"].items():
        assert_figures_equal(entry["model"], after["groups"][name]["model"])
    index = ModelCard.load(out / CARD_FILE).data.to_dict()["model-index"]
    assert index and index[0]["results"]
