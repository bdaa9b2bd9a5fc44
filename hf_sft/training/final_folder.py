"""What a run leaves behind: the final folder with its model card and loss plot, and its upload to the Hub."""

from __future__ import annotations

import logging
from pathlib import Path

from transformers import Trainer

from hf_sft.data import get_format
from hf_sft.training.arguments import DataArguments
from hf_sft.training.checkpoints import consolidated_model
from hf_sft.training.model_card import LOSS_PLOT, model_card, plot_losses
from hf_sft.training.run_folder import final_files
from hf_sft.writer import replace_files

logger = logging.getLogger("hf_sft.train")

_CARD_ARGS = (
    "learning_rate",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "world_size",
    "max_steps",
    "num_train_epochs",
    "weight_decay",
    "adam_beta1",
    "adam_beta2",
    "max_grad_norm",
    "warmup_steps",
    "lr_scheduler_type",
    "seed",
    "bf16",
    "fp16",
)


def save_final(
    trainer: Trainer, data_args: DataArguments, output_dir: Path, base: str, samples: list[dict]
) -> str | None:
    """Model (LoRA merged unless `--lora_save adapter`), tokenizer, loss plot, model card.

    Returns:
        The Hub repository the run pushes the folder to (`push_final`, once the run has added its evaluation), or
        None: no push, or not the main process.

    The files are staged and swapped into `output_dir` as one change (`hf_sft.writer.replace_files`): a save cut
    short leaves the folder marked incomplete, and `--resume_from_ckpt_path latest` writes it again.
    """
    model, args = trainer.model, trainer.args
    if args.use_lora and args.lora_save == "merged":
        model = model.merge_and_unload()
    model = consolidated_model(trainer, model)  # a collective under FSDP/ZeRO: every rank takes part
    if not trainer.is_world_process_zero():
        return None
    model.config.use_cache = True  # the folder is for inference, whatever the training run set
    repo_id = trainer.hub_model_id if trainer.args.push_to_hub else None
    with replace_files(output_dir, replaces=final_files(output_dir), note=repair_note(output_dir)) as staging:
        model.save_pretrained(staging)
        trainer.processing_class.save_pretrained(staging)
        history = trainer.state.log_history
        plot_losses(history, staging / LOSS_PLOT)
        hyper = {k: getattr(trainer.args, k) for k in _CARD_ARGS}
        hyper.update({"max_seq_len": data_args.max_seq_len, "packing": args.packing, "use_lora": args.use_lora})
        hyper["template"] = data_args.template
        card = model_card(
            base_model=base,
            data=" + ".join(data_args.data_paths()),
            hyperparameters=hyper,
            log_history=history,
            samples=samples,
            repo_id=repo_id,
            prompt_format=get_format(data_args.template).name,
            license=args.license,
        )
        card.save(staging / "README.md")
    logger.info("final model written to %s", output_dir)
    return repo_id


def repair_note(output_dir: Path) -> str:
    """What an unfinished final save tells the commands that read the folder."""
    return (
        "its final save was interrupted; complete it with "
        f"`hf-sft train --resume_from_ckpt_path latest --out_dir {output_dir}`"
    )


def push_final(trainer: Trainer, output_dir: Path, repo_id: str) -> None:
    """Upload the final folder with `hf_sft.hub`, not `Trainer.push_to_hub`, which would replace our model card."""
    from hf_sft.hub import HubError, push_folder

    pending = getattr(trainer, "push_in_progress", None)  # Trainer's own checkpoint uploads (--hub_strategy)
    if pending is not None:
        pending.wait_until_done()
    try:
        result = push_folder(
            output_dir,
            repo_id,
            private=bool(trainer.args.hub_private_repo),
            commit_message="End of training",
            revision=trainer.args.hub_revision,
        )
    except HubError as err:
        retry = f"hf-sft push {output_dir} --repo_id {repo_id}"
        raise HubError(f"{err}. The model is saved: retry with `{retry}`") from None
    logger.info("pushed %d files to %s: %s", len(result.files), result.repo_id, result.commit_url)
