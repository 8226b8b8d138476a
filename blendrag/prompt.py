"""The RAG prompt as token segments: prefix, one segment per chunk, suffix.

A chunk's tokens must not depend on its neighbours, or its cached KV could not be reused, so
each segment is tokenized on its own and the prompt is their concatenation. ``full`` prefill uses
the very same token ids, which keeps every mode comparable token for token.

Layout, through the model's chat template::

    prefix  = <template start> system prompt <user turn start> instruction
    chunk_i = chunk text + "\\n\\n"
    suffix  = "Question: ..." <user turn end> <assistant turn start>
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

from transformers import PreTrainedTokenizerBase

DEFAULT_SYSTEM_PROMPT = "You are a helpful assistant that answers questions from the documents you are given."
DEFAULT_INSTRUCTION = (
    "Read the documents below, then answer the question directly from them. "
    "Do not repeat the question. Answer in at most five words.\n\n"
)
QUESTION_TEMPLATE = "Question: {question}\nAnswer:"
CHUNK_SEPARATOR = "\n\n"
_SENTINEL = "\u2063BLENDRAG_DOCUMENTS\u2063"


@dataclass(frozen=True)
class RAGPrompt:
    prefix: list[int]
    chunks: list[list[int]]
    suffix: list[int]

    @property
    def ids(self) -> list[int]:
        return self.prefix + [t for c in self.chunks for t in c] + self.suffix

    def chunk_offsets(self) -> list[int]:
        """Absolute position of each chunk's first token."""
        offsets, pos = [], len(self.prefix)
        for c in self.chunks:
            offsets.append(pos)
            pos += len(c)
        return offsets

    @property
    def suffix_start(self) -> int:
        return len(self.prefix) + sum(len(c) for c in self.chunks)


class PromptFormat:
    """Turns (chunks, question) into a ``RAGPrompt`` for one tokenizer and chat template."""

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        system_prompt: str = DEFAULT_SYSTEM_PROMPT,
        instruction: str = DEFAULT_INSTRUCTION,
    ) -> None:
        self.tokenizer = tokenizer
        self.system_prompt = system_prompt
        self.instruction = instruction

    @cached_property
    def _template_parts(self) -> tuple[str, str]:
        """Rendered chat template split around the documents: (before, after-with-{question})."""
        user = self.instruction + _SENTINEL + QUESTION_TEMPLATE
        if not getattr(self.tokenizer, "chat_template", None):
            text = f"{self.system_prompt}\n\n{user}"
        else:
            text = self._render(user)
        before, after = text.split(_SENTINEL)
        return before, after

    def _render(self, user: str) -> str:
        messages = [{"role": "system", "content": self.system_prompt}, {"role": "user", "content": user}]
        try:
            return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception:  # templates without a system role (e.g. Mistral's) raise on one
            merged = [{"role": "user", "content": f"{self.system_prompt}\n\n{user}"}]
            return self.tokenizer.apply_chat_template(merged, tokenize=False, add_generation_prompt=True)

    def _encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    @cached_property
    def prefix_ids(self) -> list[int]:
        return self._encode(self._template_parts[0])

    def chunk_ids(self, text: str) -> list[int]:
        return self._encode(text.strip() + CHUNK_SEPARATOR)

    def suffix_ids(self, question: str) -> list[int]:
        return self._encode(self._template_parts[1].replace("{question}", question.strip()))

    def build(self, chunks: list[str], question: str) -> RAGPrompt:
        return RAGPrompt(self.prefix_ids, [self.chunk_ids(c) for c in chunks], self.suffix_ids(question))
