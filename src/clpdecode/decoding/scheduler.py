"""Continuous batching: many requests, one backbone forward a step, drafts budgeted by CLP.

Each request is a Decoder (loop.py: the one loop's body), so a request decodes exactly as
generate() would decode it alone. The scheduler is its driver for many at once:

1. admit: waiting requests take free cache slots, first come first served;
2. rows: every running request's next tokens ([t+1, drafts...], or a chunk of its prompt,
   under a per-step row cap so that a long prompt does not stall the others; while no
   request decodes, nobody waits for a token and a burst's prompts run together under a
   larger cap);
3. forward: ONE forward over all rows (Backbone.forward_rows: each row in its own slot, its
   result bit-identical to a one-stream step, so a request's text never depends on what
   shares its step); the LM head over every row that needs logits, also in one product;
4. advance: each request verifies, emits and keeps its accepted positions in its slot;
5. budget and propose: every request picks its next token; greedy verified requests offer
   their draft rows with CLP's estimate of each row's worth (Decoder.offer), and the
   scheduler grants rows, most valuable first, while a row adds more tokens per millisecond
   than the step already makes (the step's cost per row is measured as it runs: CostModel);
6. retire: finished, cancelled and failed requests leave and free their slots.

Backbones without the whole-step kernels (fp32/fp16 numerics, transformers' engine) run each
request's forward on its own cache, in turn: the same requests and results, without the
shared step's speed.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import torch

from ..backbone import threads
from ..errors import ClpError
from .loop import Decoder, GenerationConfig, GenerationResult, decode_forward
from .policies import Policy

BUDGETS = ("auto", "off")
DEFAULT_SLOTS = 8  # requests decoded together (`clp serve --parallel`)
# Rows in one step at most while some request decodes: prompts are fed in chunks within it,
# which bounds how long a prompt stalls the others' next tokens (~0.15 s at 256 prompt rows
# on a 2-core Xeon with AMX-BF16 prompt rows).
DEFAULT_MAX_ROWS = 256
# ... and while none decodes: a burst's prompts in one step. A big step's rows are cheaper
# (weights read once; AMX tiles fill), so every first token of a burst of 8 came sooner than
# the last one with 64-row chunks (scripts/scheduler_probe.py --max-rows: 0.15 s against
# 0.36-0.48 s for 8 MT-Bench prompts, 523 tokens).
DEFAULT_MAX_PREFILL_ROWS = 2048
PROBE_EVERY = 64  # steps without a granted draft before one is granted to re-measure a row's cost
ASK_EVERY = 8  # while asking for offers costs more than the grants it buys, ask once in this many steps


@dataclass
class Request:
    """One generation submitted to a Scheduler. `on_tokens(ids, from_heads)` streams its tokens
    (from the scheduler's thread); `on_done(result, error)` is called once when it ends:
    (result, None), or (None, error) when it failed or (None, None) when it was cancelled."""

    prompt_ids: list[int]
    policy: Policy
    cfg: GenerationConfig = field(default_factory=GenerationConfig)
    on_tokens: Callable[[list[int], bool], None] | None = None
    on_done: Callable[[GenerationResult | None, BaseException | None], None] | None = None
    cancelled: threading.Event = field(default_factory=threading.Event)
    # the scheduler's
    decoder: Decoder | None = None
    slot: int = -1
    cache: object = None  # its own cache where the backbone does not batch rows
    offered: list | None = None  # this step's offer values (the budget asked), until it drafts
    expected: float = 0.0  # the drafts it fed this step: how many CLP expected kept
    submitted: float = field(default_factory=time.perf_counter)

    def cancel(self) -> None:
        self.cancelled.set()


class CostModel:
    """A step's milliseconds against its rows: a table at 1, 2, 3, 4, 6, 8, ... rows, each entry
    a running average of the steps measured near it (seeded by a calibration, else a prior
    line), read by linear interpolation between measured entries (past them, the slope of the
    last two); the drafter's milliseconds per drafted token; what asking a request for its
    offer costs (offer_ms) and what a step's grants were expected to save (gain_ms); and how
    drafts have been kept against CLP's expectation (keep_scale).

    A table, not a line: the cost of a row is not constant (on this CPU the second row of a
    step costs less than the ninth: weights read once serve every row, and attention grows
    with each row's context), and the budget's question is the marginal row at this size.
    """

    SIZES = (1, 2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128)

    def __init__(self, a: float = 8.0, b: float = 2.0, draft_ms: float = 0.5, weight: float = 0.8):
        self.prior = (a, b)
        self.ms: list[float | None] = [None] * len(self.SIZES)  # running averages, None: not measured
        self.weight = weight  # how much of an entry a new step leaves
        self.draft_ms = draft_ms
        self.offer_ms = 0.0  # asking a request for its offer (CLP's estimate, the lookup), running average
        # Drafts kept against CLP's expectation of them, decayed sums: CLP is trained on other
        # answers than a server's, and on MT-Bench's first prompts the budget's drafts were kept
        # 43% of the time where CLP had granted them at 46% or more (scheduler_probe.py, 2 requests).
        self._expected = self._kept = 0.0
        self.gain_ms: float | None = None  # what a step's grants were expected to save, running average

    def observe_offers(self, requests: int, ms: float) -> None:
        if requests > 0:
            self.offer_ms = ms / requests if self.offer_ms == 0.0 else 0.9 * self.offer_ms + 0.1 * ms / requests

    def observe_keep(self, expected: float, kept: int) -> None:
        """A request's verified step: `kept` of the drafts CLP expected to keep `expected` of."""
        self._expected = 0.98 * self._expected + expected
        self._kept = 0.98 * self._kept + kept

    @property
    def keep_scale(self) -> float:
        """How far CLP's expected kept drafts are from those kept lately (kept / expected):
        1 until a few drafts' worth of evidence, within [0.1, 2]."""
        if self._expected < 4.0:
            return 1.0
        return min(2.0, max(0.1, self._kept / self._expected))

    def observe_gain(self, ms: float) -> None:
        self.gain_ms = ms if self.gain_ms is None else 0.7 * self.gain_ms + 0.3 * ms

    def observe(self, rows: int, ms: float) -> None:
        """A measured step: moves the nearest entry toward it."""
        j = min(range(len(self.SIZES)), key=lambda i: abs(self.SIZES[i] - rows))
        old = self.ms[j]
        self.ms[j] = ms if old is None else self.weight * old + (1 - self.weight) * ms

    def observe_draft(self, tokens: int, ms: float) -> None:
        if tokens > 0:
            self.draft_ms = 0.9 * self.draft_ms + 0.1 * ms / tokens

    def step_ms(self, rows: float) -> float:
        pts = [(n, v) for n, v in zip(self.SIZES, self.ms) if v is not None]
        if len(pts) < 2:
            a, b = self.prior
            return (pts[0][1] if pts else a + b) + b * (rows - (pts[0][0] if pts else 1))
        for (n0, v0), (n1, v1) in zip(pts, pts[1:]):
            if rows <= n1 or (n1, v1) == pts[-1]:
                slope = max((v1 - v0) / (n1 - n0), 0.0)  # more rows never cost less
                return max(v0 + slope * (rows - n0), 0.0)
        return pts[-1][1]

    def row_ms(self, rows: int) -> float:
        """The marginal cost of one more row in a step of `rows` (never quite free)."""
        return max(self.step_ms(rows + 1) - self.step_ms(rows), 1e-3)

    @property
    def fit(self) -> tuple[float, float]:
        """(base, per row) of the line through the costs at 1 and 8 rows (for reports)."""
        per_row = (self.step_ms(8) - self.step_ms(1)) / 7
        return self.step_ms(1) - per_row, per_row


class Grant(dict):
    """key -> rows granted, and `gain_ms`: what the granted rows are expected to save, in ms
    (each one's kept tokens at the step's milliseconds per token, less the row's cost)."""

    gain_ms: float = 0.0


def allocate(offers: dict, rows: int, tokens: float, cost: CostModel, lookup: dict | None = None,
             decode_rows: int | None = None) -> Grant:
    """Grant draft rows: every offered row, most valuable first, while its expected kept
    tokens (CLP's, times cost.keep_scale) per marginal millisecond beat the tokens per
    millisecond of a step of the decode rows alone (what the time would make otherwise; a
    step's prompt rows make no tokens yet, and counting them would make any draft look
    cheap beside a prefill).

    Args:
        offers: key -> the worth of its draft rows 1..m (non-increasing: draft j is kept only
            if 1..j-1 are).
        rows, tokens: the step's rows and expected tokens before any draft.
        cost: the step's cost per row, and the drafter's per drafted token.
        lookup: key -> True where the drafts come from n-gram lookup (no drafter cost).
        decode_rows: the step's rows that decode (default: all of `rows`).
    Returns:
        key -> rows granted (0 .. len(offer)), with the grants' expected saving (Grant.gain_ms).
    """
    lookup = lookup or {}
    decode_rows = rows if decode_rows is None else max(1, decode_rows)
    scale = cost.keep_scale  # CLP's worth, as this server's drafts have been kept lately
    cands = sorted(((v * scale, j, key) for key, vals in offers.items() for j, v in enumerate(vals)),
                   key=lambda c: (-c[0], c[1]))
    grant = Grant({key: 0 for key in offers})
    for v, j, key in cands:
        if grant[key] != j:  # an earlier draft of this request was not granted
            continue
        marginal = cost.row_ms(rows) + (0.0 if lookup.get(key) else cost.draft_ms)
        step = cost.step_ms(decode_rows)
        if v * step <= tokens * marginal:
            continue
        grant.gain_ms += v * step / tokens - marginal
        grant[key] += 1
        rows += 1
        decode_rows += 1
        tokens += v
    return grant


class Scheduler:
    """Many requests through the one loop, one forward a step (see the module docstring).

    Args:
        backbone: the Backbone.
        slots: requests decoded together; more wait in line.
        capacity: positions per slot (prompt + max_new_tokens must fit); default: the
            model's window, at most 4,096.
        max_rows: rows per step at most while a request decodes (decode rows first, then
            prompt chunks).
        max_prefill_rows: rows per step at most while no request decodes (prompt chunks
            alone; never below max_rows).
        budget: "auto" (drafts granted by CLP's worth against the measured cost of a row)
            or "off" (every request drafts what its policy drafts alone).
        calibrate: time a few steps first to seed the cost model (auto budget only).
    """

    def __init__(self, backbone, slots: int = DEFAULT_SLOTS, capacity: int | None = None,
                 max_rows: int = DEFAULT_MAX_ROWS, max_prefill_rows: int = DEFAULT_MAX_PREFILL_ROWS,
                 budget: str = "auto", calibrate: bool = True):
        if budget not in BUDGETS:
            raise ClpError(f"spec_budget must be one of {', '.join(BUDGETS)}, got {budget!r}", param="spec_budget")
        if isinstance(slots, bool) or not isinstance(slots, int) or slots < 1:
            raise ClpError(f"parallel must be a whole number >= 1, got {slots!r}", param="parallel")
        for name, v in (("max_rows", max_rows), ("max_prefill_rows", max_prefill_rows)):
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ClpError(f"{name} must be a whole number >= 1, got {v!r}", param=name)
        window = getattr(backbone, "max_positions", None) or 4096
        self.capacity = min(window, 4096) if capacity is None else min(capacity, window)
        self.backbone, self.slots, self.max_rows, self.budget = backbone, slots, max_rows, budget
        self.max_prefill_rows = max(max_prefill_rows, max_rows)
        self.batched = backbone.batches_rows
        self.cache = backbone.new_slot_cache(slots, self.capacity) if self.batched else None
        self.free = list(range(slots))
        self.running: list[Request] = []
        self._waiting: deque[Request] = deque()
        self._lock = threading.Lock()
        self._wake = threading.Condition(self._lock)
        self.cost = CostModel()
        self._unprobed = 0  # budgeted steps in a row that granted no draft
        self._asked_ago = 0  # budgeted steps since the requests were last asked for offers
        # steps and rows run; drafted and kept draft tokens (verified); tokens and forwards of
        # the requests completed; requests completed, cancelled and failed
        self.stats = {"steps": 0, "rows": 0, "drafted": 0, "kept": 0, "tokens": 0, "forwards": 0,
                      "completed": 0, "cancelled": 0, "failed": 0}
        if calibrate and budget == "auto" and self.batched:
            self._calibrate()

    # ---- requests in and out ------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request (any thread); it starts at a step boundary when a slot is free."""
        with self._wake:
            self._waiting.append(request)
            self._wake.notify()

    @property
    def waiting(self) -> int:
        return len(self._waiting)

    def wait_for_work(self, timeout: float | None = None) -> bool:
        """Block until a request runs or waits (or `timeout`); whether there is work."""
        with self._wake:
            if not self.running and not self._waiting:
                self._wake.wait(timeout)
            return bool(self.running or self._waiting)

    def wake(self) -> None:
        with self._wake:
            self._wake.notify_all()

    def _admit(self) -> None:
        while self.free:
            with self._lock:
                if not self._waiting:
                    return
                req = self._waiting.popleft()
            if req.cancelled.is_set():
                self._end(req, None, None)
                continue
            try:
                if any(r.policy is req.policy for r in self.running):  # its draft state would be shared
                    raise ClpError("this request's policy object is already decoding another request; a "
                                   "policy holds one request's state: make one per request (make_policy)")
                if len(req.prompt_ids) + req.cfg.max_new_tokens > self.capacity:
                    raise ClpError(f"the prompt is {len(req.prompt_ids)} tokens and max_new_tokens "
                                   f"{req.cfg.max_new_tokens}: more than a slot's {self.capacity} positions",
                                   param="max_new_tokens")
                req.decoder = Decoder(self.backbone, req.prompt_ids, req.policy, req.cfg, req.on_tokens)
            except Exception as e:  # noqa: BLE001 - this request's error, not the batch's
                self._end(req, None, e)
                continue
            req.slot = self.free.pop(0)
            if self.batched:
                self.cache.reset(req.slot)
            else:
                req.cache = self.backbone.new_cache()
            self.running.append(req)

    def fail(self, req: Request, error: BaseException) -> None:
        """End a running request with `error` (the scheduler's thread)."""
        self._end(req, None, error)

    def drain(self) -> list[Request]:
        """Take every waiting request out of the line (shutdown): they never start."""
        with self._lock:
            out = list(self._waiting)
            self._waiting.clear()
        for req in out:
            self._end(req, None, None)
        return out

    def _end(self, req: Request, result, error) -> None:
        key = "completed" if result is not None else "failed" if error is not None else "cancelled"
        self.stats[key] += 1
        if result is not None:
            self.stats["tokens"] += result.new_tokens
            self.stats["forwards"] += result.forward_passes
        if req in self.running:
            self.running.remove(req)
        if req.slot >= 0:
            self.free.append(req.slot)
            self.free.sort()
            req.slot, req.cache = -1, None
        if req.on_done is not None:
            try:
                req.on_done(result, error)
            except Exception:  # noqa: BLE001 - a caller's callback must not stop the others
                pass
        # A caller's callbacks usually hold the request (the server's job does): dropping them
        # and the decoder (its last logits, its drafter state) frees a finished request at once,
        # not at the garbage collector's next full pass (the server's memory grew by ~1 GB over
        # 800 requests before this).
        req.decoder = req.on_tokens = req.on_done = None

    def _guard(self, req: Request, fn, *args) -> bool:
        """Run one request's part of the step; a failure ends that request only."""
        try:
            fn(*args)
            return True
        except Exception as e:  # noqa: BLE001
            self._end(req, None, e)
            return False

    # ---- one step -----------------------------------------------------------------------------
    def step(self) -> int:
        """Run one step for every running request (admitting waiting ones first); returns the
        rows it ran (0: nothing to do)."""
        threads.tick()
        for req in list(self.running):
            if req.cancelled.is_set():
                self._end(req, None, None)
        self._admit()
        self._propose()
        plan = self._rows()
        if not plan:
            return 0
        # _rows puts the decode rows first and the prompt chunks after them: plan[prompts_from:]
        # are prompt chunks.
        prompts_from = sum(1 for r, _, _ in plan if not r.decoder.prefilling)
        t0 = time.perf_counter()
        outputs = self._forward(plan, prompts_from)
        rows = sum(len(tokens) for _, tokens, _ in plan)
        self._advance(plan, outputs)
        # The cost table prices decode and draft rows (the forward, the LM head and verification;
        # the drafter apart), so it learns from steps of those alone: a prompt row costs less (no
        # LM head; on AMX-BF16 its own kernel at ~half a q4 row's cost), and steps carrying
        # prompt chunks made drafts look cheap at 8-16 clients (bench-out/serve-r13: the budget
        # 16-19% behind batched AR there).
        if self.batched and prompts_from == len(plan):
            self.cost.observe(rows, (time.perf_counter() - t0) * 1e3)
        self.stats["steps"] += 1
        self.stats["rows"] += rows
        return rows

    def run(self) -> None:
        """Step until no request runs or waits (a caller that owns the scheduler's thread)."""
        while self.running or self._waiting:
            self.step()

    def _propose(self) -> None:
        """Every request that has taken in a forward picks its next token and drafts, the
        greedy verified ones within the rows the budget grants them."""
        ready = [r for r in self.running if r.decoder.proposing]
        limits = self._budget(ready) if self.budget == "auto" and self.batched else {}
        for r in ready:
            if r.slot < 0:  # failed while offering
                continue
            t0 = time.perf_counter()
            if not self._guard(r, r.decoder.propose, limits.get(id(r))):
                continue
            drafted = len(r.decoder.fed) - 1 if r.policy.verifies else 0
            self.stats["drafted"] += drafted
            if r.offered is not None and r.decoder.tree is not None and r.decoder.tree.is_chain:
                r.expected = sum(r.offered[:drafted])  # values[j - 1]: drafts 1..j all kept
            r.offered = None
            # The drafter's cost per drafted token, catching up included: after a pause the chain
            # first runs over the tokens it skipped, and that is a cost of drafting again. (Timed
            # on steady drafting alone, ~1 ms a token against ~7, the budget drafted more at 4-16
            # clients and lost more to batched AR: docs/design.md, "Drafts budgeted by CLP".)
            if drafted and not r.decoder.from_lookup:
                self.cost.observe_draft(drafted, (time.perf_counter() - t0) * 1e3)
            if r.decoder.done:
                self._end(r, r.decoder.result(), None)

    def _budget(self, ready: list[Request]) -> dict:
        """id(request) -> the drafts it may feed this step (absent: no cap)."""
        decoding = sum(not r.decoder.prefilling for r in self.running)
        prompt_rows = sum(len(r.prompt_ids) - r.decoder.prefilled for r in self.running if r.decoder.prefilling)
        if decoding <= 1 and not prompt_rows and not self._waiting:
            # One request alone: no other request's rows to weigh drafts against, so it drafts
            # as `verified` does alone (CLP's span). The budget's own estimate drafted less and
            # ran 7% slower than unbudgeted verified at 1 client (bench-out/serve-r11).
            return {}
        rows = decoding + min(prompt_rows, max(0, self.max_rows - decoding))
        budgeted = [r for r in ready if r.decoder.budgeted]
        # Where not even a free draft sure to be kept would add tokens faster than the step
        # makes them (a full step of other requests' rows), there are no offers to weigh:
        # asking every request for its CLP estimates would only cost time (~7% of a step at 8
        # requests). The usual path still runs before each probe, so the table stays fresh.
        if (self._unprobed < PROBE_EVERY - 1
                and self.cost.step_ms(max(1, decoding)) <= max(1.0, float(decoding)) * self.cost.row_ms(max(1, rows))):
            self._unprobed += 1
            return {id(r): 0 for r in budgeted}
        # Asking is not free either: CLP's estimate and the lookup cost ~0.2 ms a request
        # (cProfile, 4 requests in-process), ~6% of a step at 4 requests, and at 4-16 requests
        # on the 2-core Xeon few drafts pass and each barely pays. Where the grants' expected
        # saving has been below what asking costs, ask once in ASK_EVERY steps (to notice when
        # drafting pays again) and grant nothing in between.
        gain = self.cost.gain_ms
        if (self._asked_ago < ASK_EVERY - 1 and self._unprobed < PROBE_EVERY - 1 and gain is not None
                and gain < self.cost.offer_ms * len(budgeted)):
            self._asked_ago += 1
            self._unprobed += 1
            return {id(r): 0 for r in budgeted}
        self._asked_ago = 0
        offers, lookup = {}, {}
        t0 = time.perf_counter()
        for r in ready:
            got = []
            if self._guard(r, lambda r=r: got.append(r.decoder.offer())) and got[0] is not None:
                offers[id(r)], lookup[id(r)] = got[0].values, got[0].lookup
                r.offered = got[0].values
        self.cost.observe_offers(len(offers), (time.perf_counter() - t0) * 1e3)
        grant = allocate(offers, max(1, rows), max(1.0, float(decoding)), self.cost, lookup, decoding)
        self.cost.observe_gain(grant.gain_ms)
        # A probe now and then: with no draft granted, the cost of one more row is never measured
        # again, and a stale entry (a step slowed by another process) could keep drafting off.
        if offers and not any(grant.values()):
            self._unprobed += 1
            if self._unprobed >= PROBE_EVERY:
                best = max((k for k in offers if offers[k]), key=lambda k: offers[k][0], default=None)
                if best is not None:
                    grant[best], self._unprobed = 1, 0
        else:
            self._unprobed = 0
        room = self.max_rows - rows  # drafts never push a step past the row cap
        for key in sorted(grant, key=lambda k: -grant[k]):
            grant[key] = min(grant[key], max(0, room))
            room -= grant[key]
        return grant

    def _rows(self) -> list[tuple[Request, list[int], object]]:
        """(request, tokens, tree) of every running request this step: decode rows first, then
        prompt chunks in arrival order within the row cap (each prompt gets at least a row)."""
        decoding = [r for r in self.running if not r.decoder.prefilling]
        prefilling = [r for r in self.running if r.decoder.prefilling]
        plan, room = [], self.max_rows if decoding else self.max_prefill_rows
        for r in decoding:
            tokens, tree = r.decoder.next_tokens()
            plan.append((r, tokens, tree))
            room -= len(tokens)
        for r in prefilling:
            tokens, tree = r.decoder.next_tokens(max(1, room))
            plan.append((r, tokens, tree))
            room -= len(tokens)
        return plan

    def _aux_layers(self, plan) -> tuple[int, ...]:
        layers = {r.decoder.aux_layers for r, _, _ in plan if r.decoder.aux_layers}
        if len(layers) > 1:
            raise ClpError("requests with different drafter feature layers cannot share a step")
        return layers.pop() if layers else ()

    def _forward(self, plan, prompts_from: int) -> list:
        """Each planned request's (states, feats), from one forward over all rows."""
        aux = self._aux_layers(plan)
        if not self.batched:
            return [decode_forward(self.backbone, tokens, r.cache, tree, r.decoder.aux_layers, r.decoder.prefilling)
                    for r, tokens, tree in plan]
        steps = [(r.slot, tokens, tree.mask(0) if tree is not None and not tree.is_chain else None,
                  tree.positions(0) if tree is not None and not tree.is_chain else None) for r, tokens, tree in plan]
        outs = self.backbone.forward_rows(self.cache, steps, aux, prompts_from)
        return [(o[0], o[1] if r.decoder.aux_layers else o[0]) if aux else (o, o) for (r, _, _), o in zip(plan, outs)]

    def _advance(self, plan, outputs) -> None:
        need = [r.decoder.logit_rows(len(tokens)) for r, tokens, _ in plan]
        if self.batched:  # the LM head over every row that needs logits, in one product (rows are independent)
            picked = [states[rows] for (states, _), rows in zip(outputs, need) if rows]
            logits = iter(torch.split(self.backbone.logits(torch.cat(picked)), [len(n) for n in need if n])
                          if picked else [])
        for (r, tokens, tree), (states, feats), rows in zip(plan, outputs, need):
            lg = (next(logits) if self.batched else self.backbone.logits(states[rows])) if rows else None
            if r.slot < 0:  # ended during this step
                continue
            before = len(r.decoder.accepted)
            ok = self._guard(r, r.decoder.advance, states, feats, lg, self._keeper(r))
            if ok and r.policy.verifies and len(r.decoder.accepted) > before:
                self.stats["kept"] += r.decoder.accepted[-1]
                if r.expected > 0:
                    self.cost.observe_keep(r.expected, r.decoder.accepted[-1])
                    r.expected = 0.0
            if ok and r.decoder.done:
                self._end(r, r.decoder.result(), None)

    def _keeper(self, req: Request):
        if self.batched:
            return lambda fed, offsets: self.cache.keep(req.slot, fed, offsets)
        return lambda fed, offsets: self.backbone.keep(req.cache, fed, offsets)

    # ---- calibration --------------------------------------------------------------------------
    def _calibrate(self, repeats: int = 3) -> None:
        """Seed the cost model: steps of 1..16 rows on a scratch slot (the forward and the LM head,
        as step() times them; a second or two), after one untimed step (first calls pay for
        allocations)."""
        slot = self.free[0]
        vocab = self.backbone.info.vocab_size

        def step(rows: int) -> float:
            self.cache.reset(slot)
            ids = [int(t) for t in torch.randint(0, vocab, (min(rows, self.capacity),))]
            t0 = time.perf_counter()
            states = self.backbone.forward_rows(self.cache, [(slot, ids, None, None)])[0]
            self.backbone.logits(states)  # as in a step whose rows all need logits (decode, drafts)
            return (time.perf_counter() - t0) * 1e3

        with torch.inference_mode():
            step(16)
            times: dict[int, list[float]] = {}
            for rows in (1, 2, 4, 8, 16) * repeats:
                times.setdefault(rows, []).append(step(rows))
        # The fastest of the repeats: another process (a second server loading, say) only ever
        # adds time, and an entry inflated now would skew the budget until steps of that size
        # are measured again, which at 1 client may be seldom (a bench that started its
        # servers together got a budget that never drafted at 1 client).
        for rows, ms in times.items():
            self.cost.observe(rows, min(ms))
        self.cache.reset(slot)

    def health(self) -> dict:
        steps = max(1, self.stats["steps"])
        a, b = self.cost.fit
        return {"running": len(self.running), "waiting": self.waiting, "slots": self.slots,
                "rows_per_step": round(self.stats["rows"] / steps, 3),
                "drafted": self.stats["drafted"], "kept": self.stats["kept"],
                "tokens_per_forward": round(self.stats["tokens"] / max(1, self.stats["forwards"]), 4),
                "step_ms": {"base": round(a, 3), "per_row": round(b, 3)}, "spec_budget": self.budget,
                **{k: self.stats[k] for k in ("steps", "completed", "cancelled", "failed")}}
