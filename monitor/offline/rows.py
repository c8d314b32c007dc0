"""Residual rows of whole conversations: the interface both row sources implement.

The tap in vLLM exports `hidden + residual` after decoder block L, which is Hugging Face's
`hidden_states[L + 1]`. Offline work needs those numbers for thousands of conversations; a
`RowSource` gives them, from transformers (`rows_transformers`) or from vLLM offline, the tap
itself (`rows_vllm`). `monitor.offline.extract.row_source` picks one.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Protocol

import torch

Messages = list[dict[str, str]]


@dataclass(frozen=True)
class ConversationRows:
    token_ids: list[int]
    n_prompt: int  # tokens up to and including the assistant header; the rest are the response
    rows: dict[int, torch.Tensor]  # layer -> [n_tokens, d_model] float32


class RowSource(Protocol):
    def many(self, conversations: Iterable[Messages], progress: str | None = None) -> list[ConversationRows]:
        """Rows of every conversation at the source's layers; `progress` names the task in progress logs."""
        ...


def chat_token_ids(tokenizer, messages: Messages, add_generation_prompt: bool) -> list[int]:
    """The chat template's token ids (vLLM's server applies the same template to chat requests)."""
    ids = tokenizer.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, tokenize=True)
    if isinstance(ids, dict) or hasattr(ids, "keys"):  # newer transformers return a BatchEncoding
        ids = ids["input_ids"]
    return list(ids)


def tokenize_conversation(tokenizer, messages: Messages, add_generation_prompt: bool | None = None,
                          max_tokens: int = 1024) -> tuple[list[int], int]:
    """Token ids of a chat, and how many belong to the prompt (through the last assistant header):
    a conversation ending in an assistant turn is a prompt plus that response.

    `add_generation_prompt` None (the default): as a chat server sees the request, so with the assistant
    header when the conversation ends in a user turn. The sidecar's prompt scope holds those header tokens,
    and the last of them is where the model decides how to answer (a `last` detector reads it there)."""
    if add_generation_prompt is None:
        add_generation_prompt = bool(messages) and messages[-1]["role"] != "assistant"
    ids = chat_token_ids(tokenizer, messages, add_generation_prompt)[:max_tokens]
    if messages and messages[-1]["role"] == "assistant" and not add_generation_prompt:
        n_prompt = min(len(chat_token_ids(tokenizer, messages[:-1], True)), len(ids))
    else:
        n_prompt = len(ids)
    return ids, n_prompt
