"""Dynamic batching: sequences from every request share forward passes on one model thread.

Requests arrive on the event loop already tokenized. :meth:`DynamicBatcher.submit` puts each of
their sequences in one bounded queue and awaits a future; a single worker thread takes micro-batches
off the queue and runs the model under ``torch.inference_mode``, so the event loop keeps accepting
connections while the model runs.

How a batch is formed:

* the **oldest** waiting sequence is always in the next batch (no sequence waits forever);
* the worker waits for more sequences only while requests it has been told about (:meth:`announce`)
  are still being rendered and tokenized, at most ``max_wait_ms`` after the oldest sequence arrived,
  and never when the batch is full (``max_batch_items`` sequences or ``max_batch_tokens`` tokens).
  A lone request therefore runs at once, while under load the sequences that arrive during one
  forward pass make up the next batch;
* the other members are the waiting sequences **closest in length** to the batch so far (from a
  window of the oldest waiting ones), added while ``items <= max_batch_items``,
  ``items x longest <= max_batch_tokens`` and padding is at most ``max_padding`` of the padded
  tokens. On a CPU a padded token costs as much as a real one, so a sequence that does not fit
  waits for the next batch of its own length rather than inflating this one.

On CPU the worker gives each forward pass one torch intra-op thread per ``tokens_per_thread`` padded
tokens, up to ``threads``: a single short sequence gains little from more cores and would take the
one the event loop needs, while a large batch runs on all of them.

Each request's outputs are written at the index of its sequence, so results always come back in
input order, whatever batches its sequences went into. A batch whose forward pass fails is re-run
one request at a time, so one bad input fails only its own request.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import math
import threading
import time
from typing import Any, Sequence

import numpy as np
import torch

from rewardforge.data.batching import pad_sequences

log = logging.getLogger("rewardforge.serve")


class QueueFull(Exception):
    """The queue cannot take the request's sequences; retry after ``retry_after`` seconds."""

    def __init__(self, depth: int, limit: int, wanted: int, retry_after: int):
        super().__init__(
            f"the server is at capacity: {depth} sequences are queued and this request adds {wanted} "
            f"(max_queue_items={limit}); retry after {retry_after} s"
        )
        self.retry_after = retry_after


class BatcherClosed(Exception):
    """The server is shutting down and takes no new work."""


class ScoringFailed(Exception):
    """The model raised on a request's sequences (the request alone fails). The message is meant for the
    client and says nothing about the server; the exception itself is in the server log."""


class _Request:
    __slots__ = ("outputs", "remaining", "future", "loop", "dead")

    def __init__(self, n: int, num_outputs: int, future: asyncio.Future, loop: asyncio.AbstractEventLoop):
        self.outputs = np.empty((n, num_outputs), np.float32)
        self.remaining = n
        self.future = future
        self.loop = loop
        self.dead = False  # cancelled by the client or failed: its other sequences are skipped


class Ticket:
    """A request announced to the batcher before its tokens are ready (see :meth:`DynamicBatcher.announce`)."""

    __slots__ = ("open",)

    def __init__(self):
        self.open = True


class _Item:
    __slots__ = ("length", "ids", "req", "index", "t")

    def __init__(self, ids: np.ndarray, req: _Request, index: int, t: float):
        self.length, self.ids, self.req, self.index, self.t = len(ids), ids, req, index, t


def _name_os_thread(name: bytes) -> None:
    """Give the calling thread an OS-level name (first 15 bytes), seen by top -H, py-spy and /proc (Linux only)."""
    try:
        import ctypes

        ctypes.CDLL(None).prctl(15, ctypes.c_char_p(name[:15]), 0, 0, 0)  # PR_SET_NAME
    except (OSError, AttributeError):  # not Linux: cosmetic only
        pass


def _resolve(done: list[_Request]) -> None:
    for r in done:
        if not r.future.done():
            r.future.set_result(r.outputs)


def _fail(reqs: list[_Request], exc: BaseException) -> None:
    for r in reqs:
        if not r.future.done():
            r.future.set_exception(exc)


class DynamicBatcher:
    """Gathers sequences from concurrent requests into micro-batches for one model.

    Args:
        model: callable ``(input_ids [B, L] int64, attention_mask [B, L]) -> [B, N]`` (a RewardModel).
        pad_id: token id used for right padding (masked out).
        num_outputs: N, the model's outputs per sequence.
        device: where the model lives.
        metrics: optional :class:`rewardforge.serve.metrics.ServeMetrics`.
    """

    def __init__(
        self,
        model: Any,
        pad_id: int,
        num_outputs: int,
        *,
        device: str | torch.device = "cpu",
        max_batch_items: int = 64,
        max_batch_tokens: int = 16384,
        max_wait_ms: float = 5.0,
        max_queue_items: int = 4096,
        max_padding: float = 0.15,
        threads: int | None = None,
        tokens_per_thread: int = 0,
        metrics: Any = None,
    ):
        self.model, self.pad_id, self.num_outputs = model, int(pad_id), int(num_outputs)
        self.device = torch.device(device)
        self.max_batch_items, self.max_batch_tokens = max_batch_items, max_batch_tokens
        self.max_wait = max_wait_ms / 1000.0
        self.max_queue_items = max_queue_items
        self.max_padding = max_padding
        self.threads = threads
        self.tokens_per_thread = tokens_per_thread
        self._threads_now: int | None = None  # the worker thread's current torch intra-op thread count
        self.metrics = metrics
        self.window = max(4 * max_batch_items, 256)
        self._cond = threading.Condition()
        self._pending: collections.deque[_Item] = collections.deque()
        self._pending_tokens = 0
        self._inflight = 0
        self._expected = 0  # announced requests not submitted yet
        self._closing = False
        self._thread: threading.Thread | None = None
        self._rate = 0.0  # sequences per second, smoothed; for Retry-After

    # ------------------------------------------------------------ state

    @property
    def queue_depth(self) -> int:
        return len(self._pending)

    @property
    def inflight(self) -> int:
        return self._inflight

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive() and not self._closing

    def retry_after(self) -> int:
        """Seconds until the queue has likely drained (at least 1)."""
        rate = self._rate
        if rate <= 0:
            return 1
        return max(1, math.ceil(len(self._pending) / rate))

    # ------------------------------------------------------------ lifecycle

    def start(self, warmup: bool = True) -> "DynamicBatcher":
        if self._thread is not None:
            return self
        if warmup:  # first forward pass allocates; do it before the first request
            self._forward([np.asarray([self.pad_id], np.int32)])
        self._thread = threading.Thread(target=self._worker, name="rewardforge-batcher", daemon=True)
        self._thread.start()
        return self

    def stop(self, timeout: float | None = None) -> None:
        """Stop taking work, finish every queued sequence, then end the worker thread."""
        with self._cond:
            self._closing = True
            self._cond.notify_all()
        if self._thread is not None:
            self._thread.join(timeout)

    # ------------------------------------------------------------ event-loop side

    def announce(self) -> Ticket:
        """Say that a request is on its way (being parsed and tokenized), so a forming batch waits for it
        (up to ``max_wait_ms``). Pass the ticket to :meth:`submit`, or to :meth:`withdraw` if it fails."""
        with self._cond:
            self._expected += 1
        return Ticket()

    def _settle(self, ticket: Ticket | None) -> None:  # with the lock held
        if ticket is not None and ticket.open:
            ticket.open = False
            self._expected -= 1

    def withdraw(self, ticket: Ticket) -> None:
        """The announced request will not be submitted (it was rejected); idempotent."""
        if ticket.open:
            with self._cond:
                self._settle(ticket)
                self._cond.notify()

    async def submit(self, seqs: Sequence[np.ndarray], ticket: Ticket | None = None) -> np.ndarray:
        """Score token sequences; returns the model outputs ``[n, N]`` in the order given.

        Raises:
            QueueFull: the bounded queue cannot take ``len(seqs)`` more sequences.
            BatcherClosed: the server is shutting down.
        """
        n = len(seqs)
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        req = _Request(n, self.num_outputs, fut, loop)
        if n == 0:
            if ticket is not None:
                self.withdraw(ticket)
            return req.outputs
        now = time.monotonic()
        with self._cond:
            self._settle(ticket)
            if self._closing or self._thread is None:
                raise BatcherClosed("the server is shutting down")
            depth = len(self._pending)
            if depth + n > self.max_queue_items:
                raise QueueFull(depth, self.max_queue_items, n, self.retry_after())
            self._pending.extend(_Item(s, req, i, now) for i, s in enumerate(seqs))
            self._pending_tokens += sum(len(s) for s in seqs)
            self._inflight += 1
            self._cond.notify()
        try:
            return await fut
        except asyncio.CancelledError:
            req.dead = True  # the client went away: skip what is still queued
            raise
        finally:
            with self._cond:
                self._inflight -= 1

    # ------------------------------------------------------------ worker side

    def _full(self) -> bool:
        return len(self._pending) >= self.max_batch_items or self._pending_tokens >= self.max_batch_tokens

    def _worker(self) -> None:
        _name_os_thread(b"rewardforge-batcher")
        while True:
            with self._cond:
                while not self._pending:
                    if self._closing:
                        return
                    self._cond.wait()
                while not self._closing and self._expected > 0 and not self._full():
                    wait = self._pending[0].t + self.max_wait - time.monotonic()
                    if wait <= 0:
                        break
                    self._cond.wait(wait)
                batch = self._take()
            if not batch:
                continue
            try:
                self._run(batch)
            except Exception:  # noqa: BLE001 - never let the worker die with requests waiting on it
                log.exception("the batcher failed on a batch")
                reqs = list({id(it.req): it.req for it in batch}.values())
                for r in reqs:
                    r.dead = True
                    self._call(r.loop, _fail, [r], ScoringFailed("internal error while scoring; the details are in the server log"))

    def _take(self) -> list[_Item]:
        """Remove and return the next batch (called with the lock held)."""
        pending = self._pending
        if self.max_batch_items == 1:  # one at a time: the oldest live sequence
            while pending:
                it = pending.popleft()
                self._pending_tokens -= it.length
                if not it.req.dead:
                    return [it]
            return []
        window: list[_Item] = []
        while pending and len(window) < self.window:
            it = pending.popleft()
            if it.req.dead:
                self._pending_tokens -= it.length
                continue
            window.append(it)
        if not window:
            return []
        order = sorted(range(len(window)), key=lambda i: window[i].length)
        pos = order.index(0)  # the oldest
        lo = hi = pos
        longest = real = window[0].length
        count = 1

        def fits(n: int, longest_: int, real_: int) -> bool:
            padded = n * longest_
            return padded <= self.max_batch_tokens and padded - real_ <= self.max_padding * padded

        while count < self.max_batch_items:
            left = window[order[lo - 1]] if lo > 0 else None
            right = window[order[hi + 1]] if hi + 1 < len(order) else None
            # padding added by each candidate: a shorter one pads itself, a longer one pads the rest
            waste_l = longest - left.length if left is not None and fits(count + 1, longest, real + left.length) else None
            waste_r = None
            if right is not None:
                new_longest = max(longest, right.length)
                if fits(count + 1, new_longest, real + right.length):
                    waste_r = (new_longest - longest) * count + (new_longest - right.length)
            if waste_l is None and waste_r is None:
                break
            if waste_r is None or (waste_l is not None and waste_l <= waste_r):
                lo -= 1
                real += left.length
            else:
                hi += 1
                longest = max(longest, right.length)
                real += right.length
            count += 1
        chosen = set(order[lo : hi + 1])
        batch = [window[i] for i in sorted(chosen)]
        for i in range(len(window) - 1, -1, -1):  # put the rest back in arrival order
            if i not in chosen:
                pending.appendleft(window[i])
        self._pending_tokens -= sum(it.length for it in batch)
        return batch

    @torch.inference_mode()
    def _forward(self, seqs: list[np.ndarray]) -> np.ndarray:
        input_ids, mask = pad_sequences(seqs, self.pad_id)
        out = self.model(input_ids.to(self.device), mask.to(self.device))
        return out.float().cpu().numpy()

    def _set_threads(self, batch: list[_Item]) -> None:
        """On the worker thread: one intra-op thread per ``tokens_per_thread`` padded tokens, at most ``threads``.

        Splitting a single short sequence's matrix products across cores gains less than it costs the
        event loop (HTTP, tokenization), which then has no core of its own; a large batch gains."""
        if not self.threads:
            return
        n = self.threads
        if self.tokens_per_thread > 0:
            padded = len(batch) * max(it.length for it in batch)
            n = max(1, min(n, padded // self.tokens_per_thread))
        if n != self._threads_now:
            torch.set_num_threads(n)  # per OS thread (OpenMP): the worker's setting, not the event loop's
            self._threads_now = n

    def _run(self, batch: list[_Item]) -> None:
        self._set_threads(batch)
        t0 = time.monotonic()
        try:
            out = self._forward([it.ids for it in batch])
        except Exception as e:  # noqa: BLE001 - isolate the failure to the request that caused it
            by_req: dict[int, list[_Item]] = {}
            for it in batch:
                by_req.setdefault(id(it.req), []).append(it)
            if len(by_req) > 1:
                log.warning("a batch of %d requests failed (%s); re-running them one request at a time", len(by_req), e)
                for items in by_req.values():
                    self._run(items)
                return
            req = batch[0].req
            req.dead = True
            log.exception("scoring failed on a request of %d sequences", len(batch))
            self._call(req.loop, _fail, [req], ScoringFailed("the model failed on this request; the details are in the server log"))
            return
        dt = time.monotonic() - t0
        done: list[_Request] = []
        for j, it in enumerate(batch):
            r = it.req
            r.outputs[it.index] = out[j]
            r.remaining -= 1
            if r.remaining == 0:
                done.append(r)
        by_loop: dict[int, list[_Request]] = {}
        for r in done:
            by_loop.setdefault(id(r.loop), []).append(r)
        for reqs in by_loop.values():
            self._call(reqs[0].loop, _resolve, reqs)
        if dt > 0:
            rate = len(batch) / dt
            self._rate = rate if self._rate == 0 else 0.8 * self._rate + 0.2 * rate
        m = self.metrics
        if m is not None:
            m.batches.inc()
            m.items.inc(len(batch))
            m.batch_size.observe(len(batch))
            m.batch_tokens.observe(len(batch) * max(it.length for it in batch))
            m.batch_latency.observe(dt)
            for it in batch:
                m.queue_wait.observe(t0 - it.t)

    @staticmethod
    def _call(loop: asyncio.AbstractEventLoop, fn, *args) -> None:
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop has closed: nobody is waiting any more
            pass
