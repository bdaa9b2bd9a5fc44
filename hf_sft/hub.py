"""Pushing a model folder to the Hugging Face Hub: what goes up, with which token, and failing fast without network.

What is uploaded is an allow-list, not the whole folder: weights (safetensors), `config.json` (with `auto_map`), the
code files `auto_map` names and those they import, the tokenizer with its chat template, `generation_config.json`,
the model card and the loss plot it shows. Logs, `training_args.bin` and checkpoints stay local.

The token comes from `HF_TOKEN` or the saved login (`hf auth login`), read by `huggingface_hub.get_token`. It is
passed to `huggingface_hub` only; no message of ours contains it, and a folder that contains it is refused.
`endpoint` defaults to `huggingface_hub`'s (`HF_ENDPOINT`, else https://huggingface.co).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

from hf_sft.errors import UsageError, bad_input
from hf_sft.evaluation import REPORT_FILE, RESULTS_FILE
from hf_sft.model_folder import read_model_folder
from hf_sft.tokenizer import TOKENIZER_FILES

logger = logging.getLogger(__name__)

OTHER_FILES = ("config.json", "generation_config.json", "README.md", "loss.png", RESULTS_FILE, REPORT_FILE)
PREFLIGHT_TIMEOUT_S = 10.0


class HubError(RuntimeError):
    """The Hub cannot be reached or refused the upload: the CLI prints the message and exits with status 1."""


@dataclass
class PushResult:
    """What `push_folder` uploaded, and where."""

    repo_id: str
    files: list[str]
    commit_url: str


def files_to_upload(folder: str | Path) -> list[str]:
    """The files of `folder` that make up the model on the Hub, checked for completeness.

    Args:
        folder: a model folder written by `save_pretrained` after `import hf_sft` (training or `hf-sft convert`).

    Returns:
        Relative file names, sorted.

    Raises:
        UsageError: a folder the one reader refuses (`hf_sft.model_folder.read_model_folder`: incomplete, weights
            cut short or not what config.json describes, a tokenizer that does not load or fit), or one that lacks
            what Hub users need (config with `auto_map`, code files, safetensors weights, tokenizer).
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise UsageError(f"{folder} is not a folder")
    read_model_folder(folder)
    if not any(folder.glob("*.safetensors")):
        raise UsageError(f"{folder} has no *.safetensors weights (pickled .bin weights are not pushed)")
    config_path = folder / "config.json"
    with bad_input(f"cannot read {config_path}"):
        auto_map = json.loads(config_path.read_text(encoding="utf-8")).get("auto_map") or {}
    if "AutoModelForCausalLM" not in auto_map:
        raise UsageError(
            f"{config_path} has no auto_map: Hub users could not load it with trust_remote_code. "
            "Save the model after `import hf_sft` (hf-sft train and hf-sft convert do)"
        )
    # auto_map values look like "modeling_hfsft_gpt.HfSftGPTForCausalLM" (or "repo--module.Class" when remote).
    code = sorted({value.split("--")[-1].rsplit(".", 1)[0] + ".py" for value in auto_map.values()})
    missing = [name for name in code if not (folder / name).is_file()]
    if missing:
        raise UsageError(f"{folder} lacks the model code that config.json's auto_map names: {', '.join(missing)}")
    from transformers.dynamic_module_utils import get_relative_import_files

    try:  # and the files these import by single-dot imports, which save_pretrained copied beside them
        code += [Path(f).name for name in code for f in get_relative_import_files(str(folder / name))]
    except FileNotFoundError as err:
        missing = Path(err.filename).name
        raise UsageError(f"{folder} lacks a model code file that the others import: {missing}") from None
    weights = sorted(p.name for p in folder.glob("*.safetensors")) + sorted(
        p.name for p in folder.glob("*.safetensors.index.json")
    )
    tokenizer = [name for name in TOKENIZER_FILES if (folder / name).is_file()]
    if "tokenizer_config.json" not in tokenizer:
        raise UsageError(f"{folder} has no tokenizer (tokenizer_config.json)")
    if not _has_chat_template(folder):
        logger.warning("%s has no chat template: the pushed tokenizer cannot format instructions", folder)
    for name in ("generation_config.json", "README.md"):
        if not (folder / name).is_file():
            logger.warning("%s has no %s", folder, name)
    others = [name for name in OTHER_FILES if (folder / name).is_file()]
    return sorted({*code, *weights, *tokenizer, *others})


def resolve_token() -> str:
    """The token from `HF_TOKEN` or the saved login.

    Raises:
        UsageError: there is none.
    """
    from huggingface_hub import get_token

    token = get_token()
    if not token:
        raise UsageError("no Hugging Face token: set HF_TOKEN or run `hf auth login`")
    return token


def offline_variable() -> str:
    """The variable that puts `huggingface_hub` offline: `HF_HUB_OFFLINE` when it is set (it wins), else
    `TRANSFORMERS_OFFLINE`, which huggingface_hub also reads."""
    import os

    return (
        "TRANSFORMERS_OFFLINE"
        if not os.environ.get("HF_HUB_OFFLINE") and os.environ.get("TRANSFORMERS_OFFLINE")
        else "HF_HUB_OFFLINE"
    )


def check_hub(endpoint: str | None = None, token: str | None = None, timeout: float = PREFLIGHT_TIMEOUT_S) -> str:
    """Ask the Hub who owns `token` within `timeout` seconds; returns the user name.

    Run before uploading (or before training with `--push_to_hub`) so that a missing network or a bad token is
    reported at once instead of after retries or hours of training.

    Args:
        endpoint: Hub URL; default `huggingface_hub`'s (`HF_ENDPOINT`).
        token: default `resolve_token()`.
        timeout: seconds for connecting and for the answer.

    Raises:
        HubError: offline mode, no network, no answer in time, or a server error.
        UsageError: the Hub rejects the token.
    """
    import urllib.error
    import urllib.request

    from huggingface_hub import constants
    from huggingface_hub.utils import build_hf_headers

    endpoint = (endpoint or constants.ENDPOINT).rstrip("/")
    token = token or resolve_token()
    if constants.HF_HUB_OFFLINE:
        raise HubError(f"{offline_variable()} is set: unset it to push to the Hub")
    # The standard library, not huggingface_hub's session: its HTTP client changed between releases (httpx, httpx2)
    # and this check only needs one GET with a hard timeout.
    request = urllib.request.Request(f"{endpoint}/api/whoami-v2", headers=build_hf_headers(token=token))
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            answer = json.loads(response.read() or b"{}")
    except urllib.error.HTTPError as err:
        if err.code == 401:
            raise UsageError(
                f"{endpoint} rejected the token (HF_TOKEN or the saved login): invalid or expired"
            ) from None
        raise HubError(f"{endpoint} answered HTTP {err.code} to the token check") from None
    except (urllib.error.URLError, OSError) as err:  # TimeoutError is an OSError; URLError wraps the rest
        reason = getattr(err, "reason", err)
        if isinstance(err, TimeoutError) or isinstance(reason, TimeoutError):
            reason = f"no answer within {timeout:g} s"
        raise HubError(f"cannot reach {endpoint} ({reason}): check the network (or HF_ENDPOINT)") from None
    return answer.get("name", "")


def push_folder(
    folder: str | Path,
    repo_id: str,
    *,
    private: bool = False,
    endpoint: str | None = None,
    commit_message: str = "Upload model with hf-sft",
    revision: str | None = None,
) -> PushResult:
    """Create `repo_id` if needed and upload the model files of `folder` in one commit.

    Args:
        folder: model folder (see `files_to_upload`).
        repo_id: `user/name`, or `name` for the token owner's namespace.
        private: create the repository private (an existing repository keeps its visibility).
        endpoint: Hub URL; default `huggingface_hub`'s (`HF_ENDPOINT`).
        commit_message: the commit's title.
        revision: branch to commit to (default main).

    Returns:
        The repository, the uploaded files and the commit URL.

    Raises:
        UsageError: incomplete folder, no or bad token, the token appears in a file.
        HubError: the Hub cannot be reached or refuses the upload.
    """
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError

    folder = Path(folder)
    files = files_to_upload(folder)
    token = resolve_token()
    _refuse_files_containing(folder, files, token)
    user = check_hub(endpoint, token)
    if "/" not in repo_id:
        repo_id = f"{user}/{repo_id}"
    api = HfApi(endpoint=endpoint, token=token)
    try:
        api.create_repo(repo_id, private=private, exist_ok=True)
        if private and not api.repo_info(repo_id).private:
            logger.warning("%s already exists and is public: --private does not change it", repo_id)
        commit = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            allow_patterns=files,
            commit_message=commit_message,
            revision=revision,
        )
    except HfHubHTTPError as err:
        status = err.response.status_code if err.response is not None else "?"
        raise HubError(f"the Hub refused the upload to {repo_id} (HTTP {status}): {_first_line(err)}") from None
    logger.info("pushed %d files to %s/%s", len(files), api.endpoint, repo_id)
    return PushResult(repo_id=repo_id, files=files, commit_url=str(commit.commit_url))


def _has_chat_template(folder: Path) -> bool:
    if (folder / "chat_template.jinja").is_file() or (folder / "chat_template.json").is_file():
        return True
    with bad_input(f"cannot read {folder / 'tokenizer_config.json'}"):
        config = json.loads((folder / "tokenizer_config.json").read_text(encoding="utf-8"))
    return bool(config.get("chat_template"))


def _refuse_files_containing(folder: Path, files: list[str], token: str) -> None:
    """A token that ended up in a file would become public with it."""
    needle = token.encode()
    for name in files:
        if needle in (folder / name).read_bytes():
            raise UsageError(f"{folder / name} contains the Hugging Face token: refusing to upload it")


def _first_line(err: Exception) -> str:
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
