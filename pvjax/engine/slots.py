"""A step-level generation engine for continuous batching: a fixed running batch of B rows
("slots"), each holding one request with its own intervention, position mode, sampling settings
and PRNG key; requests enter free slots between steps and leave as soon as they finish.

Shape legend: B slots, S cache columns, L = n_layers + 1 hidden-state rows, K probe vectors,
D hidden size.

    engine = SlotEngine(model, max_batch=16, max_prompt=512, max_new=256, probes=u_LKD)
    engine.warm_up()                       # compiles every program; nothing compiles after
    slot = engine.free_slots()[0]
    proj_LK = engine.admit(slot, ids, Row(intervention=iv, positions="response", seed=3))
    out = engine.step()                    # one token for every occupied slot
    engine.release(slot)

The programs are `pvjax.engine.slot_programs`; the host side here keeps each row's counters,
places prompts in the cache and compacts it. `mesh` (a `("data", "model")` mesh,
`pvjax.parallel.sharding.make_mesh`) lays the rows over "data" (`max_batch` rounded up to a
multiple of it) and the weights and kv heads over "model", as `generate`'s mesh does
(`pvjax.engine.mesh`); the numbers equal one device's up to float summation order.

Per-request reproducibility: a row's tokens depend only on its own prompt, intervention,
settings and seed (its key is `fold_in(PRNGKey(seed), 0)`, folded with its token count, as
`generate` draws a lone prompt), so the same request gives the same text whatever else shares
the batch, and greedy rows give `generate`'s tokens.

The cache: every row writes the same column each step (`column`), a newcomer's prompt fills the
columns just before it (the column is moved on when a prompt needs more room), and when the
columns run out, or when the rows that filled the first columns have left, the cache is shifted
left by the first column still in use. A row's span is at most its prompt bucket plus
`max_new`, which is the cache's width: a shift always makes room.
"""

from __future__ import annotations

import collections
import dataclasses
import time

import jax
import jax.numpy as jnp
import numpy as np

from pvjax import inputs
from pvjax.engine import mesh as slot_mesh
from pvjax.engine import slot_programs as programs
from pvjax.engine.decode_loop import decode_weights
from pvjax.engine.prompt_split import prompt_bucket
from pvjax.errors import InputError
from pvjax.interventions import POSITION_MODES, ClosedLoop, Condition, Intervention, Modes, empty
from pvjax.models.layout import Scanned
from pvjax.parallel import sharding

__all__ = ["Row", "SlotEngine", "StepOutput", "bucket_widths", "compile_count"]

compile_count = programs.compile_count


class SlotError(InputError):
    """A request the slot engine cannot take (checked on the host, before anything runs)."""


@dataclasses.dataclass(frozen=True)
class Row:
    """What one request asks of its slot. `intervention`: batch 1 (`interventions.build`), or
    None; steering acts on `positions` (as in `generate`), ablation on every position."""

    intervention: Intervention | None = None
    positions: str = "response"
    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0
    seed: int = 0
    min_new: int = 0  # stop tokens are refused until this many new tokens exist

    @property
    def mode(self) -> str:
        if self.temperature == 0:
            return "greedy"
        return "filter" if self.top_k > 0 or self.top_p < 1 else "sample"


@dataclasses.dataclass
class StepOutput:
    """One step: the token drawn by each slot listed in `slots` (and its log-probability and
    projections `[L, K]` onto the probes, or None)."""

    slots: list[int]
    tokens: list[int]
    logprobs: list[float]
    projections: list[np.ndarray] | None


def bucket_widths(max_prompt: int) -> list[int]:
    """The prompt widths programs are compiled for by default: every bucket of `generate` up to
    `max_prompt` tokens (fewer widths compile faster; a prompt then runs at the next wider)."""
    out, n = [], 1
    while n <= max_prompt:
        b = prompt_bucket(n)
        out.append(b)
        n = b + 1
    return out


class SlotEngine:
    """See the module docstring. Not thread safe: one thread drives it."""

    def __init__(
        self,
        model,
        *,
        max_batch: int = 16,
        max_prompt: int = 512,
        max_new: int = 256,
        probes=None,
        unroll: bool = True,
        pad_id: int = 0,
        stop_ids=(),
        widths=None,
        mesh=None,
        prefix_widths=(),
        prefix_cache: int = 8,
    ):
        for name, v in (("max_batch", max_batch), ("max_prompt", max_prompt), ("max_new", max_new)):
            if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < 1:
                raise SlotError(f"{name} must be a positive integer, got {v!r}")
        cfg = model.config
        self.model, self.cfg = model, cfg
        self.L, self.D = model.n_layers + 1, model.hidden_size
        self.B, self.max_new, self.pad_id = max_batch, max_new, pad_id
        self.stop_ids = np.asarray(sorted(set(int(i) for i in stop_ids)) or [pad_id], np.int32)
        self.widths = bucket_widths(max_prompt) if widths is None else sorted(set(widths))
        if any(isinstance(w, bool) or not isinstance(w, (int, np.integer)) for w in self.widths):
            raise SlotError(f"prompt widths must be integers, got {widths!r}")
        if not self.widths or self.widths[0] < 1 or self.widths[-1] < max_prompt:
            raise SlotError(f"prompt widths {widths!r} must reach max_prompt = {max_prompt}")
        self.max_prompt = max_prompt
        if max_new >= cfg.max_position_embeddings:
            raise SlotError(
                f"max_new {max_new} leaves no room for a prompt in the context of "
                f"{model.model_id} ({cfg.max_position_embeddings})"
            )
        self.S = max(self.widths) + max_new
        self.mesh = mesh
        if mesh is not None:
            # rows over "data" (B rounded up to it), weights and heads over "model"
            sharding.check_mesh(mesh)
            self.B = max_batch = sharding.pad_batch(max_batch, mesh)
            self.params, self.prefill_params = slot_mesh.place_params(model, mesh, unroll)
            self.layout, self.prefill_layout = slot_mesh.layouts(unroll)
            slot_mesh.note_cache_layout(cfg, mesh, model.model_id)
        else:
            self.params, self.layout = decode_weights(model, unroll)
            self.prefill_params, self.prefill_layout = (
                (self.params, self.layout) if self.layout.packed else (model.params, Scanned())
            )
        self._init_prefixes(prefix_widths, prefix_cache)
        self.probes = None
        if probes is not None:
            p = np.asarray(probes, np.float32)
            if p.ndim != 3 or p.shape[0] != self.L or p.shape[2] != self.D:
                raise SlotError(f"probes must be [{self.L}, K, {self.D}], got {p.shape}")
            self.probes = jnp.asarray(p)
        iv = empty(self.L, self.D, self.B).replace(
            closed_loop=ClosedLoop.fixed(self.L, self.B),
            modes=Modes.add(self.L, self.B),
            condition=Condition.none(self.L, self.D, self.B),
        )
        slots = programs.empty_slots(
            cfg, self.layout, iv, self.B, self.S, model.dtype, split=mesh is not None
        )
        self.slots = jax.device_put(
            slots, None if mesh is None else programs.slot_shardings(slots, cfg, mesh)
        )
        self.column = 0
        B = self.B
        self.active = np.zeros(B, bool)
        self.start = np.zeros(B, np.int64)  # first cache column of each row
        self.position = np.zeros(B, np.int32)
        self.count = np.zeros(B, np.int32)
        self.keys = np.zeros((B, 2), np.uint32)
        self.temperature = np.zeros(B, np.float32)
        self.top_p = np.ones(B, np.float32)
        self.top_k = np.zeros(B, np.int32)
        self.min_new = np.zeros(B, np.int32)
        self.steer_dec = np.ones((B, 1), np.float32)
        self.modes = [""] * B
        self.gate = np.ones(B, np.float32)  # 1: the row's condition held (or it has none)
        self.steps = 0
        self.shifts = 0

    # -- what callers ask ------------------------------------------------------------------------

    def free_slots(self) -> list[int]:
        return [int(b) for b in np.flatnonzero(~self.active)]

    def occupied(self) -> list[int]:
        return [int(b) for b in np.flatnonzero(self.active)]

    def check(self, ids, row: Row, max_new: int) -> list[int]:
        """The prompt as a list of ints, or a `SlotError` saying why this request cannot run."""
        ids = inputs.token_lists([ids], self.cfg.vocab_size, "prompt")[0]
        if not ids:
            raise SlotError("the prompt is empty")
        if len(ids) > self.max_prompt:
            raise SlotError(
                f"the prompt has {len(ids)} tokens; this server takes at most {self.max_prompt}"
            )
        if not 1 <= max_new <= self.max_new:
            raise SlotError(f"max new tokens must be in 1..{self.max_new}, got {max_new}")
        if len(ids) + max_new > self.cfg.max_position_embeddings:
            raise SlotError(
                f"{len(ids)} prompt tokens + {max_new} new ones exceed the context window of "
                f"{self.model.model_id} ({self.cfg.max_position_embeddings})"
            )
        if row.positions not in POSITION_MODES:
            raise SlotError(f"positions must be one of {POSITION_MODES}, got {row.positions!r}")
        if not 0 <= row.min_new <= max_new:
            raise SlotError(f"min new tokens must be in 0..{max_new}, got {row.min_new}")
        if not 0 <= row.seed < 2**32:
            raise SlotError(f"seed must be in 0..2**32-1, got {row.seed}")
        iv = row.intervention
        if iv is not None:
            inputs.check_intervention_batch(iv, 1, self.D, self.L, self.model.model_id)
        return ids

    def admit(self, slot: int, ids, row: Row, max_new: int | None = None, *, prefix=None):
        """Put a request in the free `slot`: its prompt runs now; its first token comes with the
        next `step`. Returns its last prompt token's projections `[L, K]` (or None); a row with a
        condition leaves its gate in `gate[slot]` (1: it steers, 0: it does not)."""
        ids = self.check(ids, row, self.max_new if max_new is None else max_new)
        if self.active[slot]:
            raise SlotError(f"slot {slot} is taken")
        C = self.shared_prefix(ids, row) if prefix is None else prefix
        tail = ids[C:]
        P = self.width(len(tail))
        W = C + P  # the columns the prompt takes in the cache
        if self.column >= self.S:
            self._compact(force=True)
        self.column = max(self.column, W)
        tokens = np.full((1, P), self.pad_id, np.int32)
        mask = np.zeros((1, P), np.int32)
        tokens[0, P - len(tail) :], mask[0, P - len(tail) :] = tail, 1
        steer = mask.astype(np.float32)
        if row.positions == "response":
            steer = np.zeros_like(steer)
            steer[:, -1] = 1.0
        iv = row.intervention
        iv = empty(self.L, self.D) if iv is None else iv
        # Every optional field present (fixed, add, ungated where the request has none): one
        # pytree structure, so every request runs the programs warm_up compiled.
        iv = iv.with_closed_loop().with_modes().with_condition()
        new = programs.Newcomer(
            tokens_1P=tokens,
            mask_1P=mask,
            steer_1P=steer,
            ablate_1P=mask.astype(np.float32),
            iv=iv,
            slot=np.int32(slot),
            column=np.int32(self.column),
        )
        kw = dict(cfg=self.cfg, prefill_layout=self.prefill_layout, mesh=self.mesh)
        if C:
            kv = self._prefix_kv(ids[:C])
            self.slots, proj, gate = programs.admit_after(
                self.prefill_params, self.slots, new, kv, self.probes, **kw
            )
        else:
            self.slots, proj, gate = programs.admit(
                self.prefill_params, self.slots, new, self.probes, **kw
            )
        self.active[slot] = True
        self.start[slot] = self.column - W
        self.position[slot] = len(ids)
        self.count[slot] = 0
        self.keys[slot] = np.asarray(jax.random.fold_in(jax.random.PRNGKey(row.seed), 0))
        self.temperature[slot] = row.temperature
        self.top_p[slot] = row.top_p
        self.top_k[slot] = row.top_k
        self.min_new[slot] = row.min_new
        self.steer_dec[slot] = 0.0 if row.positions == "prompt" else 1.0
        self.modes[slot] = row.mode
        conditional = row.intervention is not None and row.intervention.condition is not None
        self.gate[slot] = float(gate) if conditional else 1.0  # read back only when asked
        return None if proj is None else np.asarray(proj)

    def width(self, n: int) -> int:
        """The compiled prompt width a prompt of `n` tokens runs at: `generate`'s bucket when it
        is compiled here (the same numbers as `generate`), else the next wider one."""
        b = prompt_bucket(n)
        return min([w for w in self.widths if w >= b] or [w for w in self.widths if w >= n])

    # -- prompt-prefix sharing ------------------------------------------------------------------

    def _init_prefixes(self, widths, entries) -> None:
        widths = tuple(sorted(set(widths or ())))
        if any(isinstance(w, bool) or not isinstance(w, (int, np.integer)) for w in widths):
            raise SlotError(f"prefix widths must be integers, got {widths!r}")
        if widths and (widths[0] < 1 or widths[-1] >= self.widths[-1]):
            raise SlotError(
                f"prefix widths {list(widths)} must be in 1..{self.widths[-1] - 1} (a prompt "
                f"keeps at least one token of its own within the widest bucket)"
            )
        if isinstance(entries, bool) or not isinstance(entries, (int, np.integer)) or entries < 1:
            raise SlotError(f"the prefix cache must hold >= 1 entries, got {entries!r}")
        if widths and self.mesh is not None:
            raise SlotError("prefix sharing does not run on a mesh yet")
        self.prefix_widths, self.prefix_entries = widths, int(entries)
        self.prefixes: collections.OrderedDict = collections.OrderedDict()  # ids -> (k, v)
        self.prefix_hits = self.prefix_misses = self.prefix_tokens_reused = 0
        self._tails = {C: self.tail_widths(C) for C in widths}

    def tail_widths(self, C: int) -> list[int]:
        """The compiled widths a prompt's tail after a shared prefix of `C` runs at."""
        top = self.widths[-1]
        return sorted({self.width(n) for n in range(1, top - C + 1)} & set(range(1, top - C + 1)))

    def shared_prefix(self, ids, row: Row) -> int:
        """How many of the prompt's first tokens run as a shared prefix (0: none): the widest
        prefix width that leaves the prompt a tail, when the row's intervention cannot tell the
        prefix apart (none at all, or steering on `response` alone without ablation: then
        nothing acts before the last prompt token, where a condition is read too)."""
        if not self.prefix_widths:
            return 0
        iv = row.intervention
        if iv is not None and (
            row.positions != "response" or bool(np.any(np.asarray(iv.ablate_coefs)))
        ):
            return 0
        for C in reversed(self.prefix_widths):
            if C < len(ids) and self.width(len(ids) - C) in self._tails[C]:
                return C
        return 0

    def _prefix_kv(self, prefix_ids):
        """The prefix's keys and values: from the cache (most recently used kept), else run now
        and kept, the least recently used entry leaving when the cache is full."""
        key = tuple(int(i) for i in prefix_ids)
        if key in self.prefixes:
            self.prefixes.move_to_end(key)
            self.prefix_hits += 1
            self.prefix_tokens_reused += len(key)
            return self.prefixes[key]
        kv = programs.prefix(
            self.prefill_params,
            np.asarray([key], np.int32),
            cfg=self.cfg,
            prefill_layout=self.prefill_layout,
        )
        self.prefix_misses += 1
        self.prefixes[key] = kv
        while len(self.prefixes) > self.prefix_entries:
            self.prefixes.popitem(last=False)
        return kv

    def release(self, slot: int) -> None:
        """Free `slot` at once (a finished, cancelled or timed-out request)."""
        self.active[slot] = False
        if not self.active.any():
            self.column = 0  # nothing to keep: the next prompt starts at the front

    def step(self) -> StepOutput:
        """One token for every occupied slot (drawn from its logits, then fed through the model)."""
        rows = self.occupied()
        if np.any(self.count[rows] >= self.max_new):
            raise SlotError("a slot has drawn max_new tokens: release it before the next step")
        if not rows:
            return StepOutput([], [], [], None if self.probes is None else [])
        self._compact(force=self.column >= self.S)
        order = programs.MODES
        mode = max((self.modes[b] for b in rows), key=order.index)
        feed = programs.Feed(
            active_B=self.active.astype(np.int32),
            positions_B=self.position.copy(),
            count_B=self.count.copy(),
            keys_B2=self.keys.copy(),
            temperature_B=self.temperature.copy(),
            top_p_B=self.top_p.copy(),
            top_k_B=self.top_k.copy(),
            min_new_B=self.min_new.copy(),
            steer_B1=self.steer_dec.copy(),
            ablate_B1=np.ones((self.B, 1), np.float32),
            column=np.int32(self.column),
            stop_ids=self.stop_ids,
        )
        self.slots, tok, logp, proj = programs.step(
            self.params,
            self.slots,
            feed,
            self.probes,
            cfg=self.cfg,
            layout=self.layout,
            mode=mode,
            mesh=self.mesh,
        )
        tok, logp = np.asarray(tok), np.asarray(logp)
        proj = None if proj is None else np.asarray(proj)
        self.column += 1
        self.position[rows] += 1
        self.count[rows] += 1
        self.steps += 1
        return StepOutput(
            slots=rows,
            tokens=[int(tok[b]) for b in rows],
            logprobs=[float(logp[b]) for b in rows],
            projections=None if proj is None else [proj[:, b] for b in rows],
        )

    # -- startup ---------------------------------------------------------------------------------

    def warm_up(self, modes=programs.MODES) -> dict[str, float]:
        """Compile every program (each prompt bucket's prefill, each shared prefix width's prefix
        and tails, a step per sampling mode, the shift) by running it once on a throwaway
        request; seconds per program. Leaves every slot free and the prefix cache empty."""
        if self.active.any():
            raise SlotError("warm_up runs before any request is admitted")
        times = {}
        settings = {
            "greedy": Row(),
            "sample": Row(temperature=1.0),
            "filter": Row(temperature=1.0, top_k=5, top_p=0.9),
        }
        for P in self.widths:
            t = time.perf_counter()
            self.admit(0, [self.pad_id] * min(P, self.max_prompt), Row(), prefix=0)
            self.release(0)
            times[f"prefill[{P}]"] = time.perf_counter() - t
        for C in self.prefix_widths:  # the prefix, then a tail at every width that can follow it
            t = time.perf_counter()
            for P in self._tails[C]:
                n = min(n for n in range(1, P + 1) if self.width(n) == P)
                self.admit(0, [self.pad_id] * (C + n), Row(), prefix=C)
                self.release(0)
            times[f"prefix[{C}]"] = time.perf_counter() - t
        self.prefixes.clear()
        self.prefix_hits = self.prefix_misses = self.prefix_tokens_reused = 0
        for mode in modes:
            t = time.perf_counter()
            self.admit(0, [self.pad_id], settings[mode])
            for _ in range(min(2, self.max_new)):
                self.step()
            self.release(0)
            times[f"step[{mode}]"] = time.perf_counter() - t
        t = time.perf_counter()
        self.slots = programs.shift(self.slots, np.int32(0), cfg=self.cfg, mesh=self.mesh)
        jax.block_until_ready(self.slots)
        times["shift"] = time.perf_counter() - t
        self.column = 0
        return times

    # -- the cache -------------------------------------------------------------------------------

    def _compact(self, *, force: bool) -> None:
        """Shift the cache left by the first column any occupied row uses: when the columns ran
        out (`force`), or when that many columns lie unused before the rows (attention reads
        every column up to the current one, so a dead front costs every step)."""
        rows = self.occupied()
        m = int(self.start[rows].min()) if rows else self.column
        if force and m <= 0:
            raise RuntimeError("slot engine: no free cache column (a row outgrew max_new)")
        if m <= 0 or not (force or m >= max(32, self.column - m)):
            return
        self.slots = programs.shift(self.slots, np.int32(m), cfg=self.cfg, mesh=self.mesh)
        self.start[rows] -= m
        self.column -= m
        self.shifts += 1
