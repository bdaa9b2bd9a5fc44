"""The model card: huggingface_hub metadata (base model, datasets, library, tags, license), results and usage."""

from huggingface_hub import ModelCard

from hf_sft.training.model_card import model_card

HISTORY = [{"step": 5, "loss": 2.5}, {"step": 10, "loss": 1.25}, {"step": 10, "eval_loss": 1.5}]


def test_card_metadata_and_body(tmp_path):
    card = model_card(
        base_model="someone/base-gpt",
        data="databricks/databricks-dolly-15k",
        hyperparameters={"learning_rate": 3e-5},
        log_history=HISTORY,
        samples=[{"step": 10, "answers": {"Name a fish.": "Tope."}}],
        repo_id="someone/sft",
        prompt_format="alpaca",
        license="apache-2.0",
    )
    card.save(tmp_path / "README.md")
    loaded = ModelCard.load(tmp_path / "README.md")
    assert loaded.data.to_dict() == {
        "base_model": "someone/base-gpt",
        "datasets": ["databricks/databricks-dolly-15k"],
        "library_name": "transformers",
        "license": "apache-2.0",
        "pipeline_tag": "text-generation",
        "tags": ["hf_sft", "instruction-tuning", "prompt-format-alpaca"],
    }
    assert (
        "| final train loss | 1.2500 (step 10) |" in loaded.text
        and "| final eval loss | 1.5000 (step 10) |" in loaded.text
    )
    assert "- **Name a fish.** → Tope." in loaded.text and 'from_pretrained("someone/sft"' in loaded.text
    assert "`alpaca` format" in loaded.text and "| `learning_rate` | `3e-05` |" in loaded.text


def test_local_sources_are_not_claimed_as_hub_ids(tmp_path):
    data = tmp_path / "data.jsonl"
    data.write_text("{}\n")
    card = model_card(base_model=str(tmp_path), data=str(data), hyperparameters={}, log_history=[])
    assert card.data.to_dict() == {
        "library_name": "transformers",
        "pipeline_tag": "text-generation",
        "tags": ["hf_sft", "instruction-tuning", "prompt-format-seed"],
    }
    assert "final train loss | n/a" in card.text and "Sample answers" not in card.text
