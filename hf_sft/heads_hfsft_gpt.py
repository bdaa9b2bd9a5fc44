"""What the heads compute on the backbone's hidden states: the LM head's loss, and the task heads for after SFT.

`lm_logits_and_loss` is the causal LM's one loss call, on every position or on the supervised ones alone. Each task
head is a mixin listed before a base model class that builds the backbone as `self.model` (the name an
SFT folder's weights carry), as `GenericForSequenceClassification` and its siblings in transformers'
`modeling_layers.py` are for stock Llama: `class XForSequenceClassification(SequenceClassificationHead, XTaskModel)`.
Cache and output flags reach the backbone through `**kwargs`. This file imports only torch and transformers: Hub
users execute it beside `modeling_hfsft_gpt.py`.
"""

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint
from transformers.modeling_outputs import (
    ModelOutput,
    QuestionAnsweringModelOutput,
    SequenceClassifierOutputWithPast,
    TokenClassifierOutput,
)

# Supervised-only loss: above this many logits (64 MiB in float32) the LM head and loss run in chunks.
LOSS_CHUNK_ELEMENTS = 2**24


def next_token_labels(labels: torch.Tensor) -> torch.Tensor:
    """(B, T) the token each position predicts: `labels` shifted left by one, -100 at the last position."""
    return F.pad(labels, (0, 1), value=-100)[:, 1:]


def supervised_positions(shift_labels: torch.Tensor) -> torch.Tensor:
    """(N,) indices into the flattened (B * T) positions whose next token is supervised: what the LM head scores in
    the supervised-only mode.

    Where the batch is built (on the host, for free) and passed to the forward as `supervised_positions`, it spares
    the forward a data-dependent shape: selecting by a boolean mask on the device (`nonzero`) waits for the device
    and breaks a `torch.compile` graph.

    >>> supervised_positions(next_token_labels(torch.tensor([[-100, -100, 8, 2], [-100, 9, 2, -100]])))
    tensor([1, 2, 4, 5])
    """
    return (shift_labels != -100).flatten().nonzero().flatten()


def lm_logits_and_loss(
    model: nn.Module,
    hidden_states: torch.Tensor,
    shift_labels: torch.Tensor,
    num_items_in_batch=None,
    positions: torch.Tensor | None = None,
    **kwargs,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """The causal LM's logits and `model.loss_function` on the positions kept: all of them, or the supervised ones.

    Args:
        model: the causal LM (its `lm_head`, `loss_function`, `config.vocab_size`, `supervised_logits_only`).
        hidden_states: (B, T, D) final hidden states.
        shift_labels: (B, T) the token each position predicts, -100 where none.
        num_items_in_batch: the supervised tokens of the whole optimizer step, when Trainer passes them.
        positions: `supervised_positions(shift_labels)` computed by the caller, or None: computed here (a
            data-dependent shape). Read only in the supervised-only mode.

    Returns:
        (B, T, V) logits and the loss; with `model.supervised_logits_only`, the (N, V) logits of the N supervised
        positions alone, or None past `LOSS_CHUNK_ELEMENTS` logits, where head and loss run in checkpointed chunks
        whose losses (each its sum over `num_items_in_batch`, default N) add up to the loss.
    """
    if model.supervised_logits_only:
        if positions is None:
            positions = supervised_positions(shift_labels)
        hidden_states = hidden_states.flatten(0, 1).index_select(0, positions)  # (N, D)
        shift_labels = shift_labels.flatten().index_select(0, positions)  # (N,)
        rows = max(1, LOSS_CHUNK_ELEMENTS // model.config.vocab_size)
        if hidden_states.shape[0] > rows:
            denominator = shift_labels.shape[0] if num_items_in_batch is None else num_items_in_batch
            losses = [
                checkpoint(_chunk_loss, model, hidden, target, denominator, use_reentrant=False, **kwargs)
                for hidden, target in zip(hidden_states.split(rows), shift_labels.split(rows), strict=True)
            ]
            return None, torch.stack(losses).sum()
    logits = model.lm_head(hidden_states)  # (B, T, V), or (N, V)
    return logits, _loss(model, logits, shift_labels, num_items_in_batch, **kwargs)


def _loss(model: nn.Module, logits: torch.Tensor, shift_labels: torch.Tensor, num_items_in_batch, **kwargs):
    return model.loss_function(
        logits=logits,
        labels=None,
        shift_labels=shift_labels,
        vocab_size=model.config.vocab_size,
        num_items_in_batch=num_items_in_batch,
        **kwargs,
    )


def _chunk_loss(model: nn.Module, hidden_states: torch.Tensor, shift_labels: torch.Tensor, denominator, **kwargs):
    return _loss(model, model.lm_head(hidden_states), shift_labels, denominator, **kwargs)


def head_output(model: nn.Module, output_class: type[ModelOutput], outputs: ModelOutput, return_dict, **fields):
    """`output_class` with `fields` and the backbone outputs it also carries (hidden states, attentions, cache)."""
    fields.update({name: value for name, value in outputs.items() if name in output_class.__dataclass_fields__})
    output = output_class(**fields)
    return output if (model.config.return_dict if return_dict is None else return_dict) else output.to_tuple()


class SequenceClassificationHead:
    """One score vector per sequence, read at its last non-pad token as in stock Llama (reward models, classifiers)."""

    def __init__(self, config):
        super().__init__(config)
        self.score = nn.Linear(config.hidden_size, config.num_labels, bias=False)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> SequenceClassifierOutputWithPast | tuple:
        outputs = self.model(
            input_ids, attention_mask, position_ids, inputs_embeds=inputs_embeds, return_dict=True, **kwargs
        )
        logits = self.score(outputs.last_hidden_state)  # (B, T, num_labels)
        batch, pad = logits.shape[0], self.config.pad_token_id
        if pad is None and batch != 1:
            raise ValueError("Cannot handle batch sizes > 1 if no padding token is defined.")
        last = torch.full((batch,), -1, device=logits.device)  # no ids to look at: the last position
        if pad is not None and input_ids is not None:
            # The rightmost token that is not padding, whichever side the padding is on.
            real = (input_ids != pad).to(logits.device, torch.int32)
            last = (torch.arange(input_ids.shape[-1], device=logits.device, dtype=torch.int32) * real).argmax(-1)
        pooled = logits[torch.arange(batch, device=logits.device), last]  # (B, num_labels)
        loss = None
        if labels is not None:
            loss = self.loss_function(logits=logits, labels=labels, pooled_logits=pooled, config=self.config)
        return head_output(self, SequenceClassifierOutputWithPast, outputs, return_dict, loss=loss, logits=pooled)


class TokenClassificationHead:
    """One score vector per token (tagging)."""

    def __init__(self, config):
        super().__init__(config)
        dropout = getattr(config, "classifier_dropout", None)
        self.dropout = nn.Dropout(config.hidden_dropout if dropout is None else dropout)
        self.score = nn.Linear(config.hidden_size, config.num_labels)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        labels: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> TokenClassifierOutput | tuple:
        kwargs["use_cache"] = False  # every position is read once: a cache would only hold memory
        outputs = self.model(
            input_ids, attention_mask, position_ids, inputs_embeds=inputs_embeds, return_dict=True, **kwargs
        )
        logits = self.score(self.dropout(outputs.last_hidden_state))  # (B, T, num_labels)
        loss = None if labels is None else self.loss_function(logits, labels, self.config)
        return head_output(self, TokenClassifierOutput, outputs, return_dict, loss=loss, logits=logits)


class QuestionAnsweringHead:
    """Extractive QA: start and end logits per token."""

    def __init__(self, config):
        super().__init__(config)
        self.qa_outputs = nn.Linear(config.hidden_size, 2)
        self.post_init()

    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        inputs_embeds: torch.Tensor | None = None,
        start_positions: torch.LongTensor | None = None,
        end_positions: torch.LongTensor | None = None,
        return_dict: bool | None = None,
        **kwargs,
    ) -> QuestionAnsweringModelOutput | tuple:
        kwargs["use_cache"] = False
        outputs = self.model(
            input_ids, attention_mask, position_ids, inputs_embeds=inputs_embeds, return_dict=True, **kwargs
        )
        start_logits, end_logits = self.qa_outputs(outputs.last_hidden_state).unbind(-1)  # (B, T) each
        loss = None
        if start_positions is not None and end_positions is not None:
            loss = self.loss_function(start_logits, end_logits, start_positions, end_positions)
        logits = {"start_logits": start_logits, "end_logits": end_logits}
        return head_output(self, QuestionAnsweringModelOutput, outputs, return_dict, loss=loss, **logits)
