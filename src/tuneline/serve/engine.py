"""The serving engine: one base model in memory, many LoRA adapters, requests batched together.

Requests for different adapters that arrive together are answered in one ``generate`` call: each
row runs through its own adapter (or the base model for ``__base__``) with the stacked, batched
LoRA products of :mod:`tuneline.serve.multilora`, so eight adapters cost about what one does.
Versions those products cannot compute exactly (DoRA, IA3, prefix and prompt tuning, full
fine-tunes) get a model of their own (:mod:`tuneline.serve.permodel`), and a batch never mixes
models (:meth:`Job.batch_key`). One worker thread owns
the models; callers get a :class:`concurrent.futures.Future` (or, streaming, a queue of text
pieces). Model references resolve through the registry on every request (cached for
``resolve_ttl`` seconds), so a promotion or rollback is picked up without a restart, while a
request already admitted keeps the version it resolved.
"""

from __future__ import annotations

import collections
import functools
import hashlib
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import Future
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, cast

from tuneline.artifacts import verify_tree
from tuneline.eval.generate import (
    Decoding,
    _end_of_turn_id,
    cut_at_stop,
    decoding_kwargs,
    read_decoding,
)
from tuneline.models.loading import inference_attention
from tuneline.registry import VersionInfo
from tuneline.retrieval import Retriever, adapter_retriever
from tuneline.retrieval.encoder import Encoder
from tuneline.serve.classifier import classify_prompts
from tuneline.serve.multilora import MultiLora, computes_exactly
from tuneline.serve.permodel import PerModel, load_per_model, reload_base, served_kind
from tuneline.serve.tasks import AdapterTask, read_task

if TYPE_CHECKING:
    import torch
    from peft import PeftModel
    from transformers import GenerationMixin, PreTrainedModel, PreTrainedTokenizerBase

log = logging.getLogger(__name__)

BASE = "__base__"


class PieceSink(Protocol):
    """Where a streamed job's pieces of text go, besides a plain callable (e.g. a ``queue.Queue``)."""

    def put(self, item: str | None) -> None: ...


BatchKey = tuple[str, float, float, int, float, int, int | None]


@dataclass
class Job:
    prompt_ids: list[int]
    adapter: str  # a loaded adapter's name, or BASE
    max_new_tokens: int
    temperature: float = 0.0
    stop: list[str] = field(default_factory=list)
    # streaming: called (on the worker thread) with each piece of text once it is final (text that
    # could still become a stop string is held back), then with None; a callable or anything with .put
    stream: Callable[[str | None], None] | PieceSink | None = None
    future: Future[Result] = field(default_factory=Future)
    control: Callable[[], object] | None = None  # a function to run on the worker thread instead (loading an adapter)
    deadline: float | None = None  # time.monotonic() past which the job ends with finish_reason "deadline"
    top_p: float = 1.0
    cancelled: threading.Event = field(default_factory=threading.Event)
    first_token_at: float | None = None  # time.perf_counter() when its first token was generated
    # the adapter's decoding settings (decoding.json): beam search when num_beams > 1, and penalties
    num_beams: int = 1
    repetition_penalty: float = 1.0
    no_repeat_ngram_size: int = 0
    # the model that answers it (set by Engine.submit): "" for the shared base with its batched LoRA
    # adapters, else the slot of a version served by a model of its own
    model_slot: str = ""

    def batch_key(self) -> BatchKey:
        """Jobs are generated together only when these are equal: the same model, the same
        sampling and decoding settings (beam jobs: their token limit too, since a beam search cut
        shorter is not the search with the shorter limit)."""
        return (self.model_slot, self.temperature, self.top_p, self.num_beams, self.repetition_penalty,
                self.no_repeat_ngram_size, self.max_new_tokens if self.num_beams > 1 else None)

    def cancel(self) -> None:
        """Stop generating for this job (the client went away): it ends with finish_reason "cancelled"."""
        self.cancelled.set()


@dataclass
class Result:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length | cancelled | deadline


def slot_name(key: str, path: str) -> str:
    """The adapter slot for ``key`` (``name@version``) loaded from ``path``: one slot per distinct
    (key, path), never shared. Every character other than ``[A-Za-z0-9]`` is escaped as ``_`` and
    six hex digits (injective: ``acme-support`` and ``acme_support`` differ), and the path's hash
    is appended, so the same key from another folder is another slot."""
    escaped = "".join(c if c.isascii() and c.isalnum() else f"_{ord(c):06x}" for c in key)
    return f"{escaped}_p{hashlib.sha256(str(path).encode('utf-8', 'surrogatepass')).hexdigest()[:12]}"


class Engine:
    """Serves ``model`` and the adapters loaded onto it (:meth:`adapter_for`). ``load_base``: a
    fresh copy of the base for each version served by a model of its own (DoRA, IA3, prefix and
    prompt tuning); default: loaded again from the folder ``model`` came from."""

    def __init__(self, model: PreTrainedModel, tokenizer: PreTrainedTokenizerBase, *, max_batch: int = 8,
                 window_s: float = 0.005, resolve_ttl: float = 1.0,
                 autocast: AbstractContextManager[object] | None = None,
                 load_base: Callable[[], PreTrainedModel] | None = None) -> None:
        import torch

        self.base = model.eval()
        _flag_trainable(model)
        # the model that generates: `model`, then a PeftModel wrapping it once the first adapter is loaded
        self.model: PreTrainedModel | PeftModel = model
        self.tokenizer = tokenizer
        self.max_batch, self.window_s, self.resolve_ttl = max_batch, window_s, resolve_ttl
        self.autocast = autocast
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048))
        self.adapters: dict[str, str] = {}  # adapter slot -> source folder (every path)
        self.per_model: dict[str, PerModel] = {}  # adapter slot -> its own model (versions off the batched path)
        self.load_base = load_base or reload_base(model)
        self.retrievers: dict[str, Retriever] = {}  # adapter slot -> its Retriever (hybrid adapters only)
        self.decodings: dict[str, Decoding] = {}  # adapter slot -> the Decoding it was evaluated with (decoding.json)
        self.tasks: dict[str, AdapterTask] = {}  # adapter slot -> its spec's task (tuneline.yaml), where it has one
        self._encoders: dict[str, Encoder] = {}  # sentence encoders by fingerprint, shared by the retrievers
        self.multi: MultiLora | None = None  # once an adapter is loaded
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=10_000)  # rows per generate call
        self.on_batch: list[Callable[[int], None]] = []  # called with each generate call's rows (metrics)
        self.generating = 0  # rows in the generate call running now
        self._resolved: dict[str, tuple[float, VersionInfo]] = {}
        self._load_lock = threading.Lock()
        self._queue: queue.Queue[Job] = queue.Queue()
        self._held: collections.deque[Job] = collections.deque()  # taken from the queue, answered next round
        self._stop = threading.Event()
        self._torch = torch
        eos = cast("int | None", tokenizer.convert_tokens_to_ids(tokenizer.eos_token) if tokenizer.eos_token else None)
        # the end of an assistant turn (e.g. <|im_end|>) ends an answer, as in evaluation, even where
        # the tokenizer's eos token is another one (<|endoftext|>)
        self.end_ids = {t for t in (eos, _end_of_turn_id(tokenizer), tokenizer.pad_token_id) if t is not None}
        self._worker = threading.Thread(target=self._run, name="tuneline-engine", daemon=True)
        self._worker.start()

    # --- adapters ---------------------------------------------------------------------------------

    def adapter_for(self, key: str, path: str, sha256: str | None = None) -> str:
        """The slot of the adapter saved at ``path`` (``key`` like ``name@3``), loaded once. With
        ``sha256`` (recorded at registration) the folder is verified before it is loaded:
        :class:`tuneline.artifacts.ArtifactError` when its content is not the recorded one."""
        name = slot_name(key, path)
        if name in self.adapters:
            return name
        with self._load_lock:
            if name not in self.adapters:
                verify_tree(path, sha256, what=f"adapter of {key}")
                decoding = read_decoding(path)  # absent (adapters from before decoding.json): request settings only
                task = read_task(path)  # absent (an adapter saved outside the pipeline): no predicted labels
                # a hybrid adapter ships the index it was trained with: load it before taking requests for it
                retriever = adapter_retriever(path, device=str(self.base.device.type), encoders=self._encoders)
                self._submit_control(lambda: self._load(name, path))
                if retriever is not None:
                    self.retrievers[name] = retriever
                if decoding is not None:
                    self.decodings[name] = decoding
                if task is not None:
                    self.tasks[name] = task
        return name

    def predicted_label(self, adapter: str, answer: str | None) -> str | None:
        """The label ``answer`` predicts when the adapter slot ``adapter`` is a classification
        adapter (see :meth:`AdapterTask.predicted_label`), else None."""
        task = self.tasks.get(adapter)
        return task.predicted_label(answer) if task is not None else None

    def loaded(self, key: str, path: str) -> bool:
        return slot_name(key, path) in self.adapters

    def _load(self, name: str, path: str) -> None:
        kind = served_kind(path)
        if kind == "lora" and self._load_shared(name, path):
            log.info("loaded adapter %s from %s (batched)", name, path)
            return
        own = load_per_model("merged" if kind == "lora" else kind, path, self.load_base, self.base)
        _flag_trainable(own.model)
        self.per_model[name] = own
        self.adapters[name] = path
        log.info("loaded %s from %s (%s, a model of its own)", name, path, own.kind)

    def _load_shared(self, name: str, path: str) -> bool:
        """Load a LoRA adapter onto the shared base for the batched path; False (and nothing
        loaded) when it has layers MultiLora does not compute."""
        from peft import PeftModel

        if self.multi is None:
            model = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
        else:
            model = cast("PeftModel", self.model)  # since the first adapter
            model.load_adapter(path, adapter_name=name)
            model.eval()
        if not computes_exactly(model, name):
            if self.multi is None:  # the first one: the shared model stays the plain base
                model.unload()
            else:
                model.delete_adapter(name)
            return False
        self.model = model
        self.adapters[name] = path
        self.multi = MultiLora(model)  # again after each load: a new adapter may add layers
        self.multi.rebuild([n for n in self.adapters if n not in self.per_model])
        _flag_trainable(self.model)
        return True

    def cached_resolve(self, ref: str, resolve: Callable[[str], VersionInfo]) -> VersionInfo:
        """``resolve(ref)``, cached for ``resolve_ttl`` seconds."""
        now = time.monotonic()
        hit = self._resolved.get(ref)
        if hit and now - hit[0] < self.resolve_ttl:
            return hit[1]
        value = resolve(ref)
        self._resolved[ref] = (now, value)
        return value

    # --- requests -----------------------------------------------------------------------------------

    def submit(self, job: Job) -> Future[Result]:
        if self._stop.is_set():
            raise RuntimeError("the engine is closed")
        job.model_slot = job.adapter if job.adapter in self.per_model else ""
        self._queue.put(job)
        return job.future

    def waiting(self) -> int:
        """Jobs waiting for the worker (not yet in a generate call)."""
        return self._queue.qsize() + len(self._held)

    def _submit_control(self, fn: Callable[[], object]) -> None:
        """Run ``fn`` on the worker thread (which owns the model) and wait for it."""
        done: Future[Result] = Future()
        job = Job([], "__control__", 0)
        job.future = done
        job.control = fn
        self._queue.put(job)
        done.result()

    def close(self) -> None:
        self._stop.set()
        self._queue.put(Job([], "__stop__", 0))
        self._worker.join(timeout=10)
        # whatever was still waiting gets an answer, so no caller waits forever
        pending = list(self._held)
        while True:
            try:
                pending.append(self._queue.get_nowait())
            except queue.Empty:
                break
        for job in pending:
            if not job.future.done():
                job.future.set_exception(RuntimeError("the server is shutting down"))
            _emit(job, None)

    def _next(self, timeout: float | None = None) -> Job:
        if self._held:
            return self._held.popleft()
        return self._queue.get(timeout=timeout) if timeout is not None else self._queue.get()

    def _ended_early(self, job: Job) -> bool:
        """A job cancelled or past its deadline before it started: answered without generating."""
        reason = ("cancelled" if job.cancelled.is_set() else
                  "deadline" if job.deadline is not None and time.monotonic() > job.deadline else None)
        if reason is None:
            return False
        if not job.future.done():
            job.future.set_result(Result("", len(job.prompt_ids), 0, reason))
        _emit(job, None)
        return True

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self._next()
            if job.adapter == "__stop__":
                return
            if job.adapter == "__control__":
                self._settle([job], self._control_of(job))
                continue
            if self._ended_early(job):
                continue
            batch = [job]
            held: list[Job] = []
            deadline = time.monotonic() + self.window_s
            while len(batch) < self.max_batch:
                try:
                    nxt = self._next(timeout=max(0.0, deadline - time.monotonic()))
                except queue.Empty:
                    break
                if nxt.adapter.startswith("__") and nxt.adapter != BASE:
                    held.append(nxt)  # a control or stop job: right after this batch
                    break
                if nxt.batch_key() != job.batch_key():
                    held.append(nxt)  # other sampling or decoding settings: a later round
                    continue
                if not self._ended_early(nxt):
                    batch.append(nxt)
            self._held.extendleft(reversed(held))
            self._settle(batch, functools.partial(self._generate, batch))

    @staticmethod
    def _control_of(job: Job) -> Callable[[], list[object]]:
        control = job.control
        assert control is not None

        def run() -> list[object]:
            return [control()]

        return run

    @staticmethod
    def _settle(batch: list[Job], fn: Callable[[], Sequence[object] | None]) -> None:
        """Each job's future gets its result from ``fn()`` (a control job: what its function
        returned), or the exception ``fn`` raised."""
        try:
            results = fn()
        except Exception as exc:  # the callers see it; the worker keeps serving
            log.exception("generation failed")
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(exc)
                _emit(j, None)
            return
        for j, r in zip(batch, results or [None] * len(batch), strict=True):
            if not j.future.done():
                j.future.set_result(cast(Result, r))
            _emit(j, None)

    def _classify(self, own: PerModel, batch: list[Job]) -> list[Result]:
        """A classifier-head version: each job's answer is its label, the batch in one forward pass;
        nothing is generated (no completion tokens, ``finish_reason: stop``)."""
        labels = classify_prompts(own.model, self.tokenizer, [j.prompt_ids for j in batch], autocast=self.autocast)
        for job, label in zip(batch, labels, strict=True):
            _emit(job, label)
        return [Result(label, len(j.prompt_ids), 0, "stop") for j, label in zip(batch, labels, strict=True)]

    def _generate(self, batch: list[Job]) -> list[Result]:
        self.batch_sizes.append(len(batch))
        for observe in self.on_batch:
            observe(len(batch))
        tok = self.tokenizer
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        first = batch[0]
        beams = first.num_beams
        own = self.per_model.get(first.model_slot)  # None: the shared base and its batched adapters
        if own is not None and own.kind == "classifier":
            return self._classify(own, batch)
        ids, mask = self._left_padded(batch, pad)
        seen = mask  # the tokens the repetition penalties look at: not the virtual tokens' placeholders
        extra: dict[str, object] = {}
        if own is not None:  # virtual tokens: placeholder columns before every row, as in evaluation
            ids, mask, extra = own.inputs(ids, mask, pad, beams)
            seen = self._torch.cat([self._torch.zeros_like(mask[:, : mask.shape[1] - seen.shape[1]]), seen], 1)
        width = ids.shape[1]
        rows = [_Row(j, tok, self.end_ids) for j in batch]
        # a beam search is not followed token by token: stop strings are cut after it, the answer sent whole
        done: _JobsEnded | _RowsDone = _JobsEnded(batch) if beams > 1 else _RowsDone(rows)
        kwargs = self._generate_kwargs(first, seen, pad, done, max(j.max_new_tokens for j in batch))
        kwargs.update(extra)
        if own is None:
            self._route(batch, beams)
        self.generating = len(batch)
        try:
            out = self._call(own.model if own is not None else self.model, ids, mask, kwargs)
        finally:
            self.generating = 0
        if beams > 1:
            return [self._beam_result(j, out[r, width:].tolist()) for r, j in enumerate(batch)]
        return [row.result() for row in rows]

    def _left_padded(self, batch: list[Job], pad: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The batch's prompts left-padded to one width (every row continues at the last column),
        and their attention mask, on the model's device."""
        torch = self._torch
        width = max(len(j.prompt_ids) for j in batch)
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, j in enumerate(batch):
            ids[r, width - len(j.prompt_ids):] = torch.tensor(j.prompt_ids)
            mask[r, width - len(j.prompt_ids):] = 1
        device = self.base.device
        return ids.to(device), mask.to(device)

    def _generate_kwargs(self, first: Job, mask: torch.Tensor, pad: int, done: _JobsEnded | _RowsDone,
                         max_new_tokens: int) -> dict[str, object]:
        """``generate``'s arguments for a batch whose jobs share ``first``'s
        sampling and decoding settings."""
        from transformers import StoppingCriteriaList

        kwargs: dict[str, object] = {"max_new_tokens": max_new_tokens, "pad_token_id": pad,
                                  "eos_token_id": sorted(self.end_ids) or None,
                                  "stopping_criteria": StoppingCriteriaList([done])}
        kwargs.update(decoding_kwargs(Decoding(num_beams=first.num_beams, repetition_penalty=first.repetition_penalty,
                                               no_repeat_ngram_size=first.no_repeat_ngram_size), mask))
        if first.temperature >= 1e-3:  # below that, sampling is greedy decoding (and overflows)
            kwargs.update(do_sample=True, temperature=first.temperature, top_k=0)
            if first.top_p < 1.0:
                kwargs["top_p"] = first.top_p
        else:
            kwargs.update(do_sample=False)
        return kwargs

    def _route(self, batch: list[Job], beams: int) -> None:
        """Each row of a batch on the shared model through its own adapter (or none)."""
        if self.multi is not None:
            index = self._torch.tensor([self.multi.slot(j.adapter) for j in batch], device=self.base.device)
            # generate expands each row into its beams (repeat_interleave): so does the adapter index
            self.multi.index = index.repeat_interleave(beams) if beams > 1 else index
        elif any(j.adapter != BASE for j in batch):
            raise RuntimeError("adapter requested before any adapter was loaded")

    def _beam_result(self, job: Job, tokens: list[int]) -> Result:
        """A beam job's answer: up to its end token or limit, cut before the first stop string."""
        end = next((k for k, t in enumerate(tokens) if t in self.end_ids), None)
        tokens = tokens[:end] if end is not None else tokens[:job.max_new_tokens]
        finish = "stop" if end is not None else "length"
        cut = cut_at_stop(self.tokenizer, tokens, job.stop)
        if cut is not None:
            tokens, text, finish = tokens[:cut[0]], cut[1], "stop"
        else:
            text = _decode(self.tokenizer, tokens)
        if job.cancelled.is_set():
            finish = "cancelled"
        elif job.deadline is not None and time.monotonic() > job.deadline:
            finish = "deadline"
        elif text:
            _emit(job, text)  # streamed whole, once the search has chosen
        return Result(text, len(job.prompt_ids), len(tokens), finish)

    def _call(self, model: torch.nn.Module, ids: torch.Tensor, mask: torch.Tensor,
              kwargs: dict[str, object]) -> torch.Tensor:
        """``model.generate`` with ``kwargs`` (its arguments), under inference mode:
        the prompt and answer tokens [rows, width + new tokens]."""
        try:
            with self._torch.inference_mode(), inference_attention(model), self.autocast or nullcontext():
                # a PeftModel's generate is its base model's (mypy sees only nn.Module's __getattr__)
                out = cast("GenerationMixin", model).generate(input_ids=ids, attention_mask=mask, **kwargs)
                return cast("torch.Tensor", out)  # not return_dict_in_generate: a tensor
        finally:
            if self.multi is not None:
                self.multi.index = None


def _decode(tokenizer: PreTrainedTokenizerBase, tokens: list[int]) -> str:
    return cast(str, tokenizer.decode(tokens, skip_special_tokens=True))  # one sequence: one string


def _emit(job: Job, piece: str | None) -> None:
    if job.stream is None:
        return
    try:
        if hasattr(job.stream, "put"):
            cast(PieceSink, job.stream).put(piece)
        else:
            cast(Callable[[str | None], None], job.stream)(piece)
    except Exception:  # a reader that went away (its event loop closed) must not stop the batch
        log.debug("dropped a streamed piece", exc_info=True)


class _Row:
    """One job's answer as it is generated: its tokens, the text so far, what was streamed, and
    why it ended (end of turn, a stop string, its own token limit, cancelled, past its deadline)."""

    def __init__(self, job: Job, tokenizer: PreTrainedTokenizerBase, end_ids: set[int]) -> None:
        self.job, self.tok, self.end_ids = job, tokenizer, end_ids
        self.stops = [s for s in job.stop if s]
        self.tokens: list[int] = []
        self.text: str | None = None  # decoded text, kept current only when it is needed while generating
        self.sent = 0  # characters of text streamed
        self.finish: str | None = None

    @property
    def done(self) -> bool:
        return self.finish is not None

    def step(self, token: int) -> None:
        job = self.job
        if job.first_token_at is None:
            job.first_token_at = time.perf_counter()
        if token in self.end_ids:
            self._end("stop")
            return
        self.tokens.append(token)
        if self.stops or job.stream is not None:
            text = _decode(self.tok, self.tokens)
            cut = min((text.index(s) for s in self.stops if s in text), default=None)
            if cut is not None:
                self.text = text[:cut]
                self._end("stop")
                return
            self.text = text
            if job.stream is not None:
                safe = len(text) - self._held_back(text)
                while safe > self.sent and text[safe - 1] == "\ufffd":  # an incomplete UTF-8 character
                    safe -= 1
                if safe > self.sent:
                    _emit(job, text[self.sent:safe])
                    self.sent = safe
        if len(self.tokens) >= job.max_new_tokens:
            self._end("length")
        elif job.cancelled.is_set():
            self._end("cancelled")
        elif job.deadline is not None and time.monotonic() > job.deadline:
            self._end("deadline")

    def _held_back(self, text: str) -> int:
        """Characters at the end of ``text`` that could be the start of a stop string."""
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(text)), hold, -1):
                if text.endswith(s[:k]):
                    hold = k
                    break
        return hold

    def _end(self, reason: str) -> None:
        self.finish = reason
        if self.text is None:
            self.text = _decode(self.tok, self.tokens)
        if reason in ("stop", "length") and self.job.stream is not None and len(self.text) > self.sent:
            _emit(self.job, self.text[self.sent:])
            self.sent = len(self.text)

    def result(self) -> Result:
        if not self.done:  # generate ended first (it should not: every row has its own limit)
            self._end("length")
        assert self.text is not None and self.finish is not None
        return Result(self.text, len(self.job.prompt_ids), len(self.tokens), self.finish)


class _RowsDone:
    """A stopping criterion over the batch: feeds each row its new token and says which rows are done."""

    def __init__(self, rows: list[_Row]) -> None:
        self.rows = rows

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        import torch

        last = input_ids[:, -1].tolist()
        for row, token in zip(self.rows, last, strict=True):
            if not row.done:
                row.step(int(token))
        return torch.tensor([row.done for row in self.rows], dtype=torch.bool, device=input_ids.device)


class _JobsEnded:
    """A beam search's stopping criterion: marks the first token's time, and stops the whole search
    once every job of the batch is cancelled or past its deadline."""

    def __init__(self, jobs: list[Job]) -> None:
        self.jobs = jobs

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor, **kwargs: object) -> torch.Tensor:
        import torch

        now = time.perf_counter()
        for j in self.jobs:
            if j.first_token_at is None:
                j.first_token_at = now
        ended = all(j.cancelled.is_set() or (j.deadline is not None and time.monotonic() > j.deadline)
                    for j in self.jobs)
        return torch.full((input_ids.shape[0],), ended, dtype=torch.bool, device=input_ids.device)


def _flag_trainable(model: torch.nn.Module) -> None:
    """Every parameter flagged ``requires_grad`` (nothing is trained: generation runs under
    inference mode). On CPU, generation with frozen parameters measured 3-4x slower (see
    :func:`tuneline.eval.generate._params_flagged_trainable`)."""
    for p in model.parameters():
        p.requires_grad_(True)
