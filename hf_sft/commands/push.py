"""Upload a model folder to the Hugging Face Hub, ready for `from_pretrained(REPO, trust_remote_code=True)`.

Uploaded: the safetensors weights, config.json (with auto_map), the four model code files, the tokenizer with its chat
template, generation_config.json, the model card (README.md) and the loss plot it shows. Logs, training_args.bin
and checkpoint-*/ stay local. The repository is created if needed (--private: created private).

The token comes from HF_TOKEN or the saved login (`hf auth login`); it is never printed nor written anywhere.
HF_ENDPOINT selects another Hub. Without network the command stops within seconds (exit status 1).

example:
  HF_TOKEN=hf_... hf-sft push out/finetune --repo_id me/my-sft-gpt --private
  hf-sft push out/finetune me/my-sft-gpt
"""

from __future__ import annotations

import argparse
import sys

from hf_sft.errors import UsageError

HELP = "upload a model folder (weights, code, tokenizer, model card) to the Hugging Face Hub"


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("model_dir", help="model folder written by hf-sft train or hf-sft convert")
    parser.add_argument("repo", nargs="?", default=None, help="repository id, user/name (or use --repo_id)")
    parser.add_argument("--repo_id", default=None, help="repository id, user/name (a bare name: the token's owner)")
    parser.add_argument("--private", action="store_true", help="create the repository private")
    parser.add_argument("--commit_message", default="Upload model with hf-sft", help="commit title")


def run(args: argparse.Namespace) -> int:
    """Check the folder, the token and the network, then upload; prints the files and the commit URL."""
    from huggingface_hub.utils import validate_repo_id

    from hf_sft.errors import bad_input
    from hf_sft.hub import HubError, push_folder

    if args.repo and args.repo_id and args.repo != args.repo_id:
        raise UsageError(f"two repository ids given: {args.repo} and --repo_id {args.repo_id}")
    repo_id = args.repo_id or args.repo
    if not repo_id:
        raise UsageError("the repository id is required: hf-sft push MODEL_DIR --repo_id user/name")
    with bad_input(f"--repo_id {repo_id} is not a repository id"):
        validate_repo_id(repo_id)
    try:
        result = push_folder(args.model_dir, repo_id, private=args.private, commit_message=args.commit_message)
    except HubError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return 1
    print(f"pushed {len(result.files)} files to {result.repo_id}: {', '.join(result.files)}")
    print(f"commit: {result.commit_url}")
    return 0
