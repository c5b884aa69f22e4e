"""The serving engine: one base model in memory, many LoRA adapters, requests batched together.

Requests for different adapters that arrive together are answered in one ``generate`` call: each
row runs through its own adapter (or the base model for ``__base__``) with the stacked, batched
LoRA products of :mod:`tuneline.serve.multilora`, so eight adapters cost about what one does. One worker thread owns
the model; callers get a :class:`concurrent.futures.Future` (or, streaming, a queue of text
pieces). Model references resolve through the registry on every request (cached for
``resolve_ttl`` seconds), so a promotion or rollback is picked up without a restart, while a
request already admitted keeps the version it resolved.
"""

from __future__ import annotations

import collections
import logging
import queue
import re
import threading
import time
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger(__name__)

BASE = "__base__"


@dataclass
class Job:
    prompt_ids: list[int]
    adapter: str  # a loaded adapter's name, or BASE
    max_new_tokens: int
    temperature: float = 0.0
    stop: list[str] = field(default_factory=list)
    stream: queue.Queue[Any] | None = None  # text pieces, then None
    future: Future[Result] = field(default_factory=Future)
    control: Any = None  # a function to run on the worker thread instead (loading an adapter)


@dataclass
class Result:
    text: str
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str  # stop | length


class Engine:
    def __init__(self, model: Any, tokenizer: Any, *, max_batch: int = 8, window_s: float = 0.005,
                 resolve_ttl: float = 1.0, autocast: Any = None) -> None:
        import torch

        self.base = model.eval()
        _flag_trainable(model)
        self.model: Any = model  # becomes a PeftModel once the first adapter is loaded
        self.tokenizer = tokenizer
        self.max_batch, self.window_s, self.resolve_ttl = max_batch, window_s, resolve_ttl
        self.autocast = autocast
        self.context_length = int(getattr(model.config, "max_position_embeddings", 2048))
        self.adapters: dict[str, str] = {}  # adapter name -> source
        self.retrievers: dict[str, Any] = {}  # adapter name -> its Retriever (hybrid adapters only)
        self._encoders: dict[str, Any] = {}  # sentence encoders by fingerprint, shared by the retrievers
        self.multi: Any = None  # MultiLora once an adapter is loaded
        self.batch_sizes: collections.deque[int] = collections.deque(maxlen=10_000)  # rows per generate call
        self._resolved: dict[str, tuple[float, Any]] = {}
        self._load_lock = threading.Lock()
        self._queue: queue.Queue[Job] = queue.Queue()
        self._stop = threading.Event()
        self._worker = threading.Thread(target=self._run, name="tuneline-engine", daemon=True)
        self._worker.start()
        self._torch = torch
        eos = tokenizer.convert_tokens_to_ids(tokenizer.eos_token) if tokenizer.eos_token else None
        self.end_ids = {t for t in (eos, tokenizer.pad_token_id) if t is not None}

    # --- adapters ---------------------------------------------------------------------------------

    def adapter_for(self, key: str, path: str) -> str:
        """The name of the adapter saved at ``path`` (loaded once; ``key`` like ``name@3``)."""
        name = re.sub(r"[^A-Za-z0-9_]", "_", key)
        if name in self.adapters:
            return name
        with self._load_lock:
            if name not in self.adapters:
                from tuneline.retrieval import adapter_retriever

                # a hybrid adapter ships the index it was trained with: load it before taking requests for it
                retriever = adapter_retriever(path, device=str(self.base.device.type), encoders=self._encoders)
                if retriever is not None:
                    self.retrievers[name] = retriever
                self._submit_control(lambda: self._load(name, path))
        return name

    def _load(self, name: str, path: str) -> None:
        from peft import PeftModel

        if not self.adapters:
            self.model = PeftModel.from_pretrained(self.base, path, adapter_name=name).eval()
        else:
            self.model.load_adapter(path, adapter_name=name)
            self.model.eval()
        self.adapters[name] = path
        from tuneline.serve.multilora import MultiLora

        self.multi = MultiLora(self.model)  # again after each load: a new adapter may add layers
        self.multi.rebuild(list(self.adapters))
        _flag_trainable(self.model)
        log.info("loaded adapter %s from %s", name, path)

    def cached_resolve(self, ref: str, resolve: Any) -> Any:
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
        self._queue.put(job)
        return job.future

    def _submit_control(self, fn: Any) -> None:
        """Run ``fn`` on the worker thread (which owns the model) and wait for it."""
        done: Future[Result] = Future()
        job = Job([], "__control__", 0)
        job.future = done
        job.stop = []
        job.stream = None
        job.control = fn
        self._queue.put(job)
        done.result()

    def close(self) -> None:
        self._stop.set()
        self._queue.put(Job([], "__stop__", 0))
        self._worker.join(timeout=10)

    def _run(self) -> None:
        while not self._stop.is_set():
            job = self._queue.get()
            if job.adapter == "__stop__":
                return
            if job.adapter == "__control__":
                self._settle([job], lambda j=job: [j.control()])
                continue
            batch = [job]
            if job.stream is None:
                deadline = time.monotonic() + self.window_s
                while len(batch) < self.max_batch:
                    try:
                        nxt = self._queue.get(timeout=max(0.0, deadline - time.monotonic()))
                    except queue.Empty:
                        break
                    special = nxt.adapter.startswith("__") and nxt.adapter != BASE
                    if nxt.stream is not None or special or nxt.temperature != job.temperature:
                        self._queue.put(nxt)  # answered in a later round
                        break
                    batch.append(nxt)
            self._settle(batch, lambda b=batch: self._generate(b))

    @staticmethod
    def _settle(batch: list[Job], fn: Any) -> None:
        try:
            results = fn()
        except Exception as exc:  # the callers see it; the worker keeps serving
            log.exception("generation failed")
            for j in batch:
                if not j.future.done():
                    j.future.set_exception(exc)
                if j.stream is not None:
                    j.stream.put(None)
            return
        for j, r in zip(batch, results or [None] * len(batch), strict=True):
            if not j.future.done():
                j.future.set_result(r)

    def _generate(self, batch: list[Job]) -> list[Result]:
        self.batch_sizes.append(len(batch))
        torch = self._torch
        tok = self.tokenizer
        width = max(len(j.prompt_ids) for j in batch)
        pad = tok.pad_token_id if tok.pad_token_id is not None else 0
        ids = torch.full((len(batch), width), pad, dtype=torch.long)
        mask = torch.zeros((len(batch), width), dtype=torch.long)
        for r, j in enumerate(batch):  # left padding: every row continues at the last column
            ids[r, width - len(j.prompt_ids):] = torch.tensor(j.prompt_ids)
            mask[r, width - len(j.prompt_ids):] = 1
        kwargs: dict[str, Any] = {"max_new_tokens": max(j.max_new_tokens for j in batch), "pad_token_id": pad,
                                  "eos_token_id": sorted(self.end_ids) or None}
        if batch[0].temperature >= 1e-3:  # below that, sampling is greedy decoding (and overflows)
            kwargs.update(do_sample=True, temperature=batch[0].temperature, top_k=0)
        else:
            kwargs.update(do_sample=False)
        if self.multi is not None:  # each row through its own adapter (or none), in one batch
            self.multi.index = torch.tensor([self.multi.slot(j.adapter) for j in batch], device=ids.device)
        elif any(j.adapter != BASE for j in batch):
            raise RuntimeError("adapter requested before any adapter was loaded")
        stream = batch[0].stream
        if stream is not None:
            from transformers import TextIteratorStreamer

            streamer = TextIteratorStreamer(tok, skip_prompt=True, skip_special_tokens=True)
            kwargs["streamer"] = streamer
            out_box: list[Any] = []

            def run() -> None:
                try:
                    out_box.append(self._call(ids, mask, kwargs))
                except BaseException as exc:  # noqa: BLE001 - handed to the caller below
                    out_box.append(exc)
                    streamer.end()  # a failed generate must not leave the worker waiting for text

            gen = threading.Thread(target=run, daemon=True)
            gen.start()
            for piece in streamer:
                if piece:
                    stream.put(piece)
            gen.join()
            stream.put(None)
            out = out_box[0]
            if isinstance(out, BaseException):
                raise out
        else:
            out = self._call(ids, mask, kwargs)
        results = []
        for r, j in enumerate(batch):
            new = out[r, width:].tolist()[: j.max_new_tokens]
            end = next((k for k, t in enumerate(new) if t in self.end_ids), None)
            kept = new if end is None else new[:end]
            text = tok.decode(kept, skip_special_tokens=True)
            finish = "stop" if end is not None else "length"
            for s in j.stop:
                if s and s in text:
                    text, finish = text[: text.index(s)], "stop"
            results.append(Result(text, len(j.prompt_ids), len(kept), finish))
        return results

    def _call(self, ids: Any, mask: Any, kwargs: dict[str, Any]) -> Any:
        from contextlib import nullcontext

        try:
            from tuneline.models.loading import inference_attention

            with self._torch.inference_mode(), inference_attention(self.model), self.autocast or nullcontext():
                return self.model.generate(input_ids=ids, attention_mask=mask, **kwargs)
        finally:
            if self.multi is not None:
                self.multi.index = None


def _flag_trainable(model: Any) -> None:
    """Every parameter flagged ``requires_grad`` (nothing is trained: generation runs under
    inference mode). On CPU, generation with frozen parameters measured 3-4x slower (see
    :func:`tuneline.eval.generate._params_flagged_trainable`)."""
    for p in model.parameters():
        p.requires_grad_(True)
