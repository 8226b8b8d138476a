"""Next-token choice (``SamplingParams``, which the request holds) and incremental detokenization
with stop strings."""

from __future__ import annotations

import torch
from transformers import PreTrainedTokenizerBase

from .request import SamplingParams


class Sampler:
    def __init__(self, params: SamplingParams) -> None:
        self.params = params
        self.generator = torch.Generator()
        if params.seed is not None:
            self.generator.manual_seed(params.seed)
        else:
            self.generator.seed()

    def __call__(self, logits: torch.Tensor) -> int:
        p = self.params
        if p.temperature == 0:
            return int(logits.argmax())
        # In float64 (a temperature like 1e-300 is 0 in float32) and shifted so the top logit is 0:
        # a tiny temperature then sends the others to -inf, never to inf or nan.
        logits = logits.double().cpu()  # the generator is a CPU one, whatever the device
        probs = torch.softmax((logits - logits.max()) / p.temperature, dim=-1)
        if p.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # Keep the smallest prefix whose mass reaches top_p (the top token always stays).
            drop = sorted_probs.cumsum(-1) - sorted_probs >= p.top_p
            probs = probs.scatter(0, order[drop], 0.0)
        return int(torch.multinomial(probs, 1, generator=self.generator))


class Detokenizer:
    """Turns generated ids into text pieces, holding back what may still change: an incomplete
    UTF-8 sequence, or a tail that could be the start of a stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: tuple[str, ...]) -> None:
        self.tokenizer = tokenizer
        self.stop = tuple(s for s in stop if s)
        self.holdback = max((len(s) for s in self.stop), default=1) - 1
        self.ids: list[int] = []
        self.emitted = 0
        self.text = ""
        self.stopped = False

    def add(self, token_id: int) -> str:
        """Append a token; return the newly final text (may be empty). Sets ``stopped`` when a
        stop string appears; the text is then cut before it."""
        self.ids.append(token_id)
        self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        for s in self.stop:
            cut = self.text.find(s)
            if cut != -1:
                self.text, self.stopped = self.text[:cut], True
        if self.stopped:
            return self.flush()
        safe = len(self.text) - self.holdback
        if self.text.endswith("\ufffd"):
            safe = min(safe, len(self.text) - 1)
        return self._emit_to(safe)

    def flush(self) -> str:
        return self._emit_to(len(self.text))

    def _emit_to(self, end: int) -> str:
        if end <= self.emitted:
            return ""
        piece, self.emitted = self.text[self.emitted : end], end
        return piece
