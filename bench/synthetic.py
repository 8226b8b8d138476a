"""A ``BlendEngine`` over random weights and a synthetic tokenizer, built in memory on any device,
for checks and timings that need a model's shapes but not its knowledge: no file is read or
written and nothing is downloaded.

The tokenizer is byte-level with no merges: one token per UTF-8 byte, plus ChatML's two special
tokens and its chat template. Random weights ignore what tokens mean, so any ids serve, and with
one token per byte a text of n ASCII characters is exactly n tokens.
"""

from __future__ import annotations

import random
import string
from functools import cache
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import AutoConfig, PretrainedConfig, PreTrainedTokenizerBase, PreTrainedTokenizerFast

from blendrag.engine import BlendEngine
from blendrag.loading import LoadedModel
from blendrag.model import ModelArgs, Transformer
from blendrag.prompt import CHUNK_SEPARATOR, PromptFormat
from blendrag.store import KVStore
from blendrag.store.formats import raw_format_for

# initializer_range is the std of the random weights: about 1.3 / sqrt(hidden_size) in both,
# so projections come out O(1) and attention is neither uniform nor one-hot.
SHAPES: dict[str, dict] = {
    "tiny": dict(
        model_type="llama",
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=4096,
        initializer_range=0.2,
    ),
    # Llama-3-8B; max_position_embeddings is Llama-3.1's, so that a 12K-token prompt is allowed.
    "llama3-8b": dict(
        model_type="llama",
        vocab_size=128256,
        hidden_size=4096,
        intermediate_size=14336,
        num_hidden_layers=32,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=128,
        rope_parameters={"rope_type": "default", "rope_theta": 500000.0},
        max_position_embeddings=131072,
        initializer_range=0.02,
    ),
}
# The tiny shape in each architecture the model supports: rope scaling, q/k/v bias, q/k norm.
TINY_VARIANTS: dict[str, dict] = {
    "llama": {},
    "llama3-rope": dict(
        rope_parameters={
            "rope_type": "llama3",
            "rope_theta": 500000.0,
            "factor": 8.0,
            "low_freq_factor": 1.0,
            "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64,
        }
    ),
    "qwen2": dict(model_type="qwen2"),
    "qwen3": dict(model_type="qwen3"),
}
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
# Short, so that the prompt is the chunks and the question, not template text.
SYSTEM_PROMPT = "Answer from the documents."
INSTRUCTION = "Documents:\n\n"


@cache
def byte_tokenizer() -> PreTrainedTokenizerBase:
    """One token per byte (ids 0-255), then <|im_end|> (the EOS, 256) and <|im_start|> (257)."""
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    backend = Tokenizer(models.BPE(vocab={c: i for i, c in enumerate(alphabet)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<|im_end|>", "<|im_start|>"])
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="<|im_end|>")
    tokenizer.chat_template = CHATML
    return tokenizer


def model_config(shape: str, variant: str = "llama") -> PretrainedConfig:
    spec = {**SHAPES[shape], **TINY_VARIANTS[variant]}
    model_type = spec.pop("model_type")
    return AutoConfig.for_model(model_type, eos_token_id=byte_tokenizer().eos_token_id, **spec)


def random_model(
    config: PretrainedConfig, device: torch.device | str, dtype: torch.dtype, seed: int = 0
) -> Transformer:
    """Weights drawn on ``device`` in ``dtype`` directly (no fp32 or host copy of an 8B model):
    N(0, initializer_range) for every matrix and bias, ones for the RMSNorm weights."""
    with torch.device("meta"):
        model = Transformer(ModelArgs.from_hf(config))
    model = model.to(dtype).to_empty(device=device)
    generator = torch.Generator(device).manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                param.normal_(0.0, config.initializer_range, generator=generator)
    return model.eval().requires_grad_(False)


def engine(
    model: Transformer,
    config: PretrainedConfig,
    store: KVStore,
    name: str,
    chunk_context: str = "none",
    prefetch: bool = True,
) -> BlendEngine:
    """An engine on ``model``'s device and dtype. ``name`` goes into the fingerprint (with the
    dtype): engines of one name and dtype share store keys, so they must share weights."""
    tokenizer = byte_tokenizer()
    dtype = next(model.parameters()).dtype
    loaded = LoadedModel(model, tokenizer, config, f"random:{name}:{dtype}", Path(f"random-{name}"))
    prompt_format = PromptFormat(tokenizer, SYSTEM_PROMPT, INSTRUCTION)
    # KV stored as computed (lossless): the checks compare reused KV with fresh KV exactly.
    kv_format = raw_format_for(dtype)
    return BlendEngine(
        loaded,
        store,
        prompt_format=prompt_format,
        chunk_context=chunk_context,
        prefetch=prefetch,
        kv_format=kv_format,
    )


def random_text(n_tokens: int, rng: random.Random) -> str:
    """``n_tokens`` ASCII characters (so that many tokens): lowercase words, no edge whitespace."""
    chars = [rng.choice(string.ascii_lowercase + " ") for _ in range(n_tokens)]
    chars[0], chars[-1] = rng.choice(string.ascii_lowercase), rng.choice(string.ascii_lowercase)
    return "".join(chars)


def chunk_texts(n: int, n_tokens: int, seed: int = 0) -> list[str]:
    """``n`` distinct chunk texts of ``n_tokens`` tokens each in the prompt (separator included)."""
    rng = random.Random(seed)
    return [random_text(n_tokens - len(CHUNK_SEPARATOR.encode()), rng) for _ in range(n)]
