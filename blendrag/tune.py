"""Training a reuse adapter (``blendrag.adapter``) by self-distillation; ``blendrag tune`` runs it.

The teacher is the frozen model itself: full prefill of a RAG prompt and its greedy answer, with
the next-token distribution at every answer position. The student blends the same prompt as
``blend`` does by default (the preview picks the recomputed tokens, the offset correction moves
the others), over chunk KV computed after the adapter's header, and is teacher-forced through
the same answer. The loss is the mean KL(teacher || student) over the answer positions; its
gradient flows through the blend's layer loop and the chunks' prefill into the header alone.

Prompts need questions but no labels: the answer is the model's own. Short prompts (a few
chunks of ~250 tokens) keep a step to seconds on a CPU.
"""

from __future__ import annotations

import hashlib
import json
import random
import time
from collections.abc import Callable
from dataclasses import dataclass
from itertools import zip_longest
from pathlib import Path

import torch

from .adapter import ReuseAdapter
from .config import BlendConfig
from .engine import BlendEngine, PrefillPlan
from .errors import BlendRAGError
from .forward import append_tokens, run_layers
from .kvbuffer import KVBuffer, LayerListKV
from .prompt import RAGPrompt
from .store.base import ChunkKV, LayeredKV

ADAPTER_FILE = "adapter.safetensors"  # the best adapter so far (lowest validation loss)
STATE_FILE = "state.pt"  # the latest step's adapter, optimizer and history: what --resume reads
TEACHER_DIR = "teachers"


@dataclass(frozen=True)
class Example:
    chunks: list[str]
    question: str

    def key(self) -> str:
        return hashlib.sha256(json.dumps([self.chunks, self.question]).encode()).hexdigest()[:24]


@dataclass
class TuneSettings:
    n_tokens: int | None = None  # header vectors; None: as many as the prompt prefix has
    answer_tokens: int = 16  # of the teacher's greedy answer, the positions distilled
    lr: float = 3e-3
    minutes: float = 30.0  # time budget; training stops at the first step past it
    max_steps: int | None = None
    checkpoint_every: int = 20  # steps between validation + checkpoint
    seed: int = 0


def load_examples(path: Path, n_chunks: int, chunk_chars: int) -> list[Example]:
    """Prompts from a JSON list of ``{question, ctxs: [{title?, text}]}`` objects (the eval data
    sets' format; any ``answers`` are ignored): the first ``n_chunks`` passages of each, each cut
    to ``chunk_chars`` characters."""
    try:
        items = json.loads(Path(path).read_text())
    except (OSError, ValueError) as err:
        raise BlendRAGError(f"{path}: {err}") from None
    if not isinstance(items, list) or not all(
        isinstance(it, dict) and isinstance(it.get("question"), str) and it.get("ctxs") for it in items
    ):
        raise BlendRAGError(f"{path}: expected a JSON list of {{question, ctxs: [{{text}}]}} objects")
    return [
        Example([_passage(ctx)[:chunk_chars] for ctx in it["ctxs"][:n_chunks]], it["question"])
        for it in items
    ]


def in_turn(lists: list[list[Example]]) -> list[Example]:
    """One prompt of each list in turn until all are used: the first prompts, which validate,
    and every stretch of training draw on each list, however different their lengths."""
    return [ex for group in zip_longest(*lists) for ex in group if ex is not None]


def _passage(ctx: dict) -> str:
    title = str(ctx.get("title", "")).strip()
    return f"{title}\n{ctx['text']}" if title else str(ctx["text"])


@dataclass
class Teacher:
    """Full prefill's greedy answer to an example and its log-probabilities: row j predicts
    ``answer[j]`` (row 0 is the prefill's)."""

    answer: list[int]
    log_probs: torch.Tensor  # [len(answer), vocab], fp32


@torch.inference_mode()
def compute_teacher(engine: BlendEngine, example: Example, answer_tokens: int) -> Teacher:
    pre = engine.prefill(example.chunks, example.question, mode="full", max_new_tokens=answer_tokens)
    answer, logits = engine.greedy_answer(pre, answer_tokens)
    return Teacher(answer, logits.log_softmax(-1).cpu())


class TeacherCache:
    """Teachers on disk under ``directory``, computed on first use (a resumed run reuses them)."""

    def __init__(self, engine: BlendEngine, directory: Path, answer_tokens: int) -> None:
        self.engine, self.directory, self.answer_tokens = engine, directory, answer_tokens

    def __call__(self, example: Example) -> Teacher:
        path = self.directory / f"{example.key()}-{self.answer_tokens}.pt"
        if path.exists():
            return Teacher(**torch.load(path))
        teacher = compute_teacher(self.engine, example, self.answer_tokens)
        self.directory.mkdir(parents=True, exist_ok=True)
        _save(path, teacher.__dict__)
        return teacher


def student_log_probs(
    engine: BlendEngine, adapter: ReuseAdapter, example: Example, answer: list[int], config: BlendConfig
) -> torch.Tensor:
    """Log-probabilities ``[len(answer), vocab]`` of blending ``example`` over chunk KV computed
    after ``adapter``'s header, teacher-forced through ``answer``; differentiable in the header.
    The recomputed tokens are planned by ``engine.blend_plan`` on a detached copy of the KV,
    exactly as ``blend`` plans them."""
    prompt = engine.build_prompt(example.chunks, example.question)
    model, device = engine.model, engine.device
    prefix = engine.chunk_kv.segments([], [prompt.prefix])[0][0]
    chunks = [ChunkKV(*adapter.segment_kv(model, engine.rotary, _ids(ids, device))) for ids in prompt.chunks]
    segments = [(0, prefix), *zip(prompt.chunk_offsets(), chunks, strict=True)]
    plan = _plan(engine, prompt, segments, config)
    kv = LayerListKV(model.args, len(prompt.ids) + len(answer), engine.dtype, device)
    kv.length = len(prompt.ids)
    kv.load(segments, engine.rotary)
    ids = _ids(prompt.ids, device)
    out = run_layers(
        model,
        engine.rotary,
        kv,
        ids[plan.positions],
        plan.positions,
        plan.filters,
        last_row_only=True,
        correction=plan.correction,
    )
    first = model.logits(out.hidden[-1:])
    rest = append_tokens(model, engine.rotary, kv, _ids(answer[:-1], device))
    return torch.cat([first, rest]).log_softmax(-1)


def _plan(
    engine: BlendEngine, prompt: RAGPrompt, segments: list[tuple[int, LayeredKV]], config: BlendConfig
) -> PrefillPlan:
    with torch.no_grad():  # the copy into the planning buffer records no graph
        buf = KVBuffer(engine.model.args, len(prompt.ids) + config.preview_draft, engine.dtype, engine.device)
        buf.length = len(prompt.ids)
        buf.load(segments, engine.rotary)
        return engine.blend_plan(config, prompt, buf)


def _ids(ids: list[int], device: torch.device) -> torch.Tensor:
    return torch.tensor(ids, dtype=torch.long, device=device)


def distillation_loss(
    engine: BlendEngine, adapter: ReuseAdapter, example: Example, teacher: Teacher, config: BlendConfig
) -> torch.Tensor:
    """Mean KL(teacher || student) over the answer positions."""
    student = student_log_probs(engine, adapter, example, teacher.answer, config)
    target = teacher.log_probs.to(student.device)
    return (target.exp() * (target - student)).sum(-1).mean()


def validation_loss(
    engine: BlendEngine, adapter: ReuseAdapter, examples: list[Example], teachers: TeacherCache
) -> float:
    with torch.no_grad():
        losses = [
            float(distillation_loss(engine, adapter, ex, teachers(ex), engine.config)) for ex in examples
        ]
    return sum(losses) / len(losses)


@dataclass
class TuneResult:
    steps: int
    best_val_loss: float
    no_adapter_val_loss: float  # the same validation loss with chunks precomputed alone
    history: list[dict]  # one entry per checkpoint: step, seconds, train loss, validation loss


def tune(
    engine: BlendEngine,
    train: list[Example],
    val: list[Example],
    out_dir: Path,
    settings: TuneSettings,
    resume: bool = False,
    progress: Callable[[dict], None] | None = None,
) -> TuneResult:
    """Train a header on ``train``, validated on ``val``, into ``out_dir``: ``adapter.safetensors``
    is the adapter with the lowest validation loss so far, ``state.pt`` the latest checkpoint
    (``resume`` continues from it). Stops after ``settings.minutes`` or ``settings.max_steps``,
    with a checkpoint."""
    if engine.adapter is not None:
        raise BlendRAGError("tune trains an adapter for the bare model: load the engine without one")
    if not train or not val:
        raise BlendRAGError("tune needs training prompts and at least one validation prompt")
    # A fresh header is made (and its settings checked) before anything is written.
    adapter = None if resume else _initial_header(engine, settings.n_tokens)
    began = time.perf_counter()  # the budget counts the first validation too
    out_dir.mkdir(parents=True, exist_ok=True)
    teachers = TeacherCache(engine, out_dir / TEACHER_DIR, settings.answer_tokens)
    state_path = out_dir / STATE_FILE
    if resume:
        if not state_path.exists():
            raise BlendRAGError(f"{state_path}: nothing to resume")
        state = torch.load(state_path)
        adapter = ReuseAdapter(state["header"]).to(engine.device)
    else:
        bare = ReuseAdapter(engine.model.embed_tokens.weight.new_zeros(0, engine.model.args.dim))
        state = {
            "step": 0,
            "seconds": 0.0,
            "history": [],
            "no_adapter": validation_loss(engine, bare, val, teachers),
        }
    optimizer = torch.optim.Adam(adapter.parameters(), lr=settings.lr)
    if "optimizer" in state:
        optimizer.load_state_dict(state["optimizer"])
    start, losses = began - state["seconds"], []

    def checkpoint() -> None:
        entry = {
            "step": state["step"],
            "seconds": round(time.perf_counter() - start, 1),
            "train_loss": sum(losses) / len(losses) if losses else None,
            "val_loss": validation_loss(engine, adapter, val, teachers),
        }
        losses.clear()
        if all(entry["val_loss"] < h["val_loss"] for h in state["history"]):
            adapter.save(out_dir / ADAPTER_FILE, engine.model_fingerprint)
        state.update(
            seconds=entry["seconds"], history=[*state["history"], entry], optimizer=optimizer.state_dict()
        )
        _save(state_path, state | {"header": adapter.header.detach().cpu()})
        if progress:
            progress(entry)

    if not state["history"]:
        checkpoint()  # step 0: the initial header
    while not _over(settings, state["step"], time.perf_counter() - start):
        example = _example(train, state["step"], settings.seed)
        loss = distillation_loss(engine, adapter, example, teachers(example), engine.config)
        optimizer.zero_grad()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(adapter.parameters(), 1.0)
        optimizer.step()
        state["step"] += 1
        losses.append(float(loss.detach()))
        if progress:
            progress({"step": state["step"], "loss": losses[-1]})
        if state["step"] % settings.checkpoint_every == 0:
            checkpoint()
    if losses:
        checkpoint()
    best = min(h["val_loss"] for h in state["history"])
    return TuneResult(state["step"], best, state["no_adapter"], state["history"])


def _initial_header(engine: BlendEngine, n_tokens: int | None) -> ReuseAdapter:
    """The header training starts from: the embeddings of the prompt prefix's first ``n_tokens``
    tokens (all of them when None). The whole prefix is exactly ``chunk_context="prefix"``, one
    attention sink as in a full prefill, so training starts where that stands and moves on."""
    prefix = engine.prompt_format.prefix_ids
    if n_tokens is not None and n_tokens > len(prefix):
        raise BlendRAGError(
            f"a header of {n_tokens} vectors: it starts as the prompt prefix's tokens, and the "
            f"prefix has {len(prefix)}"
        )
    ids = prefix if n_tokens is None else prefix[:n_tokens]
    return ReuseAdapter.from_token_embeddings(engine.model, ids).to(engine.device)


def _over(settings: TuneSettings, step: int, seconds: float) -> bool:
    return (settings.max_steps is not None and step >= settings.max_steps) or seconds > settings.minutes * 60


def _example(train: list[Example], step: int, seed: int) -> Example:
    """The step's prompt: each epoch visits every prompt once, in an order fixed by the seed and
    the epoch (a resumed run continues the same order)."""
    epoch, i = divmod(step, len(train))
    order = list(range(len(train)))
    random.Random(seed * 1_000_003 + epoch).shuffle(order)
    return train[order[i]]


def _save(path: Path, obj: dict) -> None:
    """``torch.save``, atomically: a killed run leaves the previous file or none."""
    tmp = path.with_suffix(".tmp")
    torch.save(obj, tmp)
    tmp.replace(path)
