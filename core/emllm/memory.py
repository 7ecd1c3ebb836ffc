"""Per-layer key/value memory: init tokens, the local window, and evicted events in the CPU tier.

One LayerMemory per decoder layer. It stores raw (pre-RoPE) keys; the window also keeps a copy rotated
to positions relative to the window start, so a chunk only rotates its own tokens. Events leave the
window whole (the session decides the spans), are offloaded to CPU in `offload_dtype`, and keep one
representative key each; a device LRU cache holds recently retrieved events in compute dtype.
Knows nothing about tokens, text or segmentation.
"""

from __future__ import annotations

import itertools
from collections import OrderedDict
from dataclasses import dataclass, field

import torch

from .attention import attention_path
from .config import EMLLMConfig
from .positions import RotaryTable
from .retrieval import relevance_scores, select_events
from .state import Mark, Piece, State, expect, is_count, materialize, vector
from .tiers import DiskRun, EventList


@dataclass
class ChunkContext:
    """Per-forward state shared by all layers, passed to the attention function as a forward kwarg."""

    layers: list[LayerMemory]
    rotary: RotaryTable
    config: EMLLMConfig
    event_sizes: torch.Tensor  # (E,) long, tokens per event, shared by every layer
    retrieve: bool = True  # select events anew (else reuse each layer's last selection)
    probe: bool = False  # score and attend, but store nothing (used by Session.retrieve)
    probe_scores: dict[int, torch.Tensor] = field(default_factory=dict)
    recall: tuple[int, ...] = ()  # events every layer attends first (Session.stream's `recall`)
    max_local_distance: int = 0


def _nbytes(t: torch.Tensor | None) -> int:
    return 0 if t is None else t.numel() * t.element_size()


class LayerMemory:
    """Keys/values of one layer: init tokens, local window buffer, offloaded events and representatives."""

    def __init__(
        self,
        layer_idx: int,
        num_kv_heads: int,
        head_dim: int,
        config: EMLLMConfig,
        device: torch.device,
        dtype: torch.dtype,
        rotary: RotaryTable,
    ):
        self.layer_idx = layer_idx
        self.rotary = rotary
        self.config = config
        self.device = device
        self.dtype = dtype
        self.offload_dtype = getattr(torch, config.offload_dtype)
        self.cache_size = config.cache_events(torch.device(device).type)
        shape = (1, num_kv_heads, 0, head_dim)
        self.init_k = torch.empty(shape, device=device, dtype=dtype)
        self.init_v = torch.empty(shape, device=device, dtype=dtype)
        capacity = config.n_local + config.chunk_size
        buf = (1, num_kv_heads, capacity, head_dim)
        self.k_raw = torch.empty(buf, device=device, dtype=dtype)
        self.k_rot = torch.empty(buf, device=device, dtype=dtype)
        self.v = torch.empty(buf, device=device, dtype=dtype)
        self.mass = torch.zeros(capacity, device=device, dtype=torch.float32)
        self.length = 0
        self.events_k = EventList()  # CPU and disk tiers, (1,Hkv,len,D) each
        self.events_v = EventList()
        self._reprs = torch.empty(64, num_kv_heads * head_dim, device=device, dtype=torch.float32)
        self._cache: OrderedDict[int, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
        self._selection: tuple[int, ...] | None = None
        self._query_sum: torch.Tensor | None = None  # (1,Hq,D) sum of the queries driving retrieval
        self._query_count = 0
        # sum/count of every stored token's query: the text's mean query, which Session.retrieve removes
        # (a truncation leaves it slightly stale; it is a statistic of the text, not of one span)
        self.corpus_query_sum: torch.Tensor | None = None
        self.corpus_query_count = 0
        self._global: tuple[torch.Tensor, torch.Tensor] | None = None
        self.path = attention_path(config.kernels, device, head_dim)  # chosen once, fails early

    @property
    def reprs(self) -> torch.Tensor:
        """(E, Hkv*D) fp32 representative key of each event (a view of a buffer grown by doubling)."""
        return self._reprs[: len(self.events_k)]

    def load_reprs(self, reprs: torch.Tensor | None) -> None:
        """Representatives of reopened events (E, Hkv*D), in a buffer with room to grow."""
        count = 0 if reprs is None else reprs.shape[0]
        width = self._reprs.shape[1]
        buffer = torch.empty(max(64, 2 * count), width, device=self.device, dtype=torch.float32)
        if count:
            buffer[:count] = reprs.to(self.device, torch.float32)
        self._reprs = buffer

    # -- attention step -------------------------------------------------------------------------
    def attend(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float, ctx: ChunkContext
    ) -> torch.Tensor:
        """q (1,Hq,c,D), k/v (1,Hkv,c,D) raw -> attention output (1,Hq,c,D); stores k/v unless probing.

        A single new token (decoding) joins the window first and attends over it in one call: for one query
        the causal chunk part is just its own key.
        """
        window = self.length
        rotary = ctx.rotary
        q_local = rotary.rotate(q, window)
        k_local = rotary.rotate(k, window)
        single = q.shape[2] == 1 and not ctx.probe
        if single:
            self._append(k, k_local, v)
        self._track_query(q, ctx)
        global_kv = self._global_kv(q, ctx)
        ctx.max_local_distance = max(ctx.max_local_distance, window + q.shape[2] - 1)
        if single:  # the new token already sits at the end of the window
            window = self.length - 1
            keys, values = self.k_rot[:, :, : self.length], self.v[:, :, : self.length]
        else:
            keys = torch.cat((self.k_rot[:, :, :window], k_local), dim=2)
            values = torch.cat((self.v[:, :, :window], v), dim=2)
        if global_kv is None:
            q_mem, global_kv = q_local, (keys[:, :, :0], values[:, :, :0])
        else:
            q_mem = self._memory_queries(q, window, global_kv[0].shape[2], ctx)
        out, lse = self.path.attention(q_mem, q_local, *global_kv, keys, values, scale, window)
        if ctx.probe:
            return out
        mass = self.path.received_mass(q_local, keys, lse, scale, window)[0]
        if single:
            self.mass[: self.length] += mass
        else:
            self._append(k, k_local, v, mass)
        return out

    @property
    def use_kernels(self) -> bool:
        """Whether this layer runs the fused Triton kernels (else the torch path)."""
        return self.path.kernels

    @staticmethod
    def _memory_queries(q: torch.Tensor, window: int, num_global: int, ctx: ChunkContext) -> torch.Tensor:
        """q (1,Hq,c,D) raw, rotated for the global part. 'fixed': every query at memory_distance from the
        init and retrieved keys (all at position 0). 'ordered': the global keys hold positions
        0..num_global-1, so the chunk's queries sit after them and the window, at num_global + window + i."""
        if ctx.config.memory_positions == "ordered":
            return ctx.rotary.rotate(q, num_global + window)
        return ctx.rotary.rotate_at(q, ctx.config.memory_distance)

    def _global_kv(self, q: torch.Tensor, ctx: ChunkContext) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Init + retrieved events (keys placed by memory_positions), re-selected when ctx.retrieve is set."""
        num_events = len(self.events_k)
        if num_events == 0 or (self.config.n_mem == 0 and not ctx.probe):  # a probe still scores events
            return self._positioned(self.init_k, self.init_v, ctx) if self.init_k.shape[2] else None
        if not (ctx.retrieve or ctx.probe) and self._selection is not None:
            if self._global is None:  # a reopened session: its last selection is read back on first use
                self._global = self._gather(self._selection, ctx)
            return self._global
        query = self._retrieval_query(q, ctx).to(q.dtype)  # (1,Hq,D)
        q_mem_mean = ctx.rotary.rotate_at(query, ctx.config.memory_distance)
        if ctx.probe:
            scores = relevance_scores(self.reprs, q_mem_mean, self.init_k.shape[1])
        else:
            scores = self.path.event_scores(self.reprs, q_mem_mean[0], self.init_k.shape[1])  # (E,)
        config, recall = self.config, () if ctx.probe else ctx.recall
        chosen = select_events(scores, ctx.event_sizes, config.n_mem, config.contiguity_ratio, recall)
        if ctx.probe:
            ctx.probe_scores[self.layer_idx] = scores
        selection = tuple(chosen.tolist())
        if selection == self._selection and self._global is not None:
            return self._global
        global_kv = self._gather(selection, ctx)
        if not ctx.probe:
            self._selection, self._global = selection, global_kv
        return global_kv

    def _track_query(self, q: torch.Tensor, ctx: ChunkContext) -> None:
        """Keep the queries that drive retrieval: a multi-token chunk's own; while decoding one token at a
        time, the last multi-token chunk (the prompt's question) plus every token generated since, so that
        one generated token does not swap out the events the question brought back."""
        if ctx.probe:
            return
        chunk_sum = q.float().sum(dim=2)  # (1,Hq,D)
        total = self.corpus_query_sum
        self.corpus_query_sum = chunk_sum.clone() if total is None else total + chunk_sum
        self.corpus_query_count += q.shape[2]
        if q.shape[2] > 1 or self._query_sum is None:
            self._query_sum, self._query_count = chunk_sum, q.shape[2]
        else:
            self._query_sum, self._query_count = self._query_sum + chunk_sum, self._query_count + 1

    def _retrieval_query(self, q: torch.Tensor, ctx: ChunkContext) -> torch.Tensor:
        """(1,Hq,D) fp32. A probe's is its mean query minus the text's mean query: what every query shares
        otherwise ranks the same salient events first whatever is asked (measured on SmolLM2, real text)."""
        if ctx.probe:
            query = q.float().mean(dim=2)
            if self.corpus_query_count:
                query = query - self.corpus_query_sum / self.corpus_query_count
            return query
        if self._query_sum is None:
            return q.float().mean(dim=2)
        return self._query_sum / self._query_count

    def _gather(self, selection: tuple[int, ...], ctx: ChunkContext) -> tuple[torch.Tensor, torch.Tensor]:
        """Init + the selected events (time order) on the device, keys positioned for the global part."""
        blocks = [self._event_on_device(i) for i in selection]
        keys = torch.cat([self.init_k, *(b[0] for b in blocks)], dim=2)
        values = torch.cat([self.init_v, *(b[1] for b in blocks)], dim=2)
        return self._positioned(keys, values, ctx)

    @staticmethod
    def _positioned(
        keys: torch.Tensor, values: torch.Tensor, ctx: ChunkContext
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Raw global keys (1,Hkv,G,D) at position 0 ('fixed') or at positions 0..G-1 ('ordered')."""
        if ctx.config.memory_positions == "ordered":
            keys = ctx.rotary.rotate(keys, 0)
        return keys, values

    def _event_on_device(self, event_id: int) -> tuple[torch.Tensor, torch.Tensor]:
        cached = self._cache.get(event_id)
        if cached is not None:
            self._cache.move_to_end(event_id)
            return cached
        block = (
            self.events_k[event_id].to(self.device, self.dtype, non_blocking=True),
            self.events_v[event_id].to(self.device, self.dtype, non_blocking=True),
        )
        if self.cache_size:
            self._cache[event_id] = block
            while len(self._cache) > self.cache_size:
                self._cache.popitem(last=False)
        return block

    def _append(
        self, k: torch.Tensor, k_rot: torch.Tensor, v: torch.Tensor, mass: torch.Tensor | None = None
    ) -> None:
        window, c = self.length, k.shape[2]
        self._ensure_capacity(window + c)
        self.k_raw[:, :, window : window + c] = k
        self.k_rot[:, :, window : window + c] = k_rot
        self.v[:, :, window : window + c] = v
        if mass is not None:
            self.mass[: window + c] += mass
        self.length = window + c

    def _ensure_capacity(self, needed: int) -> None:
        capacity = self.k_raw.shape[2]
        if needed <= capacity:
            return
        grow = max(needed, 2 * capacity) - capacity
        pad = (*self.k_raw.shape[:2], grow, self.k_raw.shape[3])
        self.k_raw = torch.cat((self.k_raw, self.k_raw.new_empty(pad)), dim=2)
        self.k_rot = torch.cat((self.k_rot, self.k_rot.new_empty(pad)), dim=2)
        self.v = torch.cat((self.v, self.v.new_empty(pad)), dim=2)
        self.mass = torch.cat((self.mass, self.mass.new_zeros(grow)))

    # -- eviction -------------------------------------------------------------------------------
    def window_keys(self, start: int, stop: int) -> torch.Tensor:
        """Raw keys of window offsets [start, stop): (Hkv, n, D)."""
        return self.k_raw[0, :, start:stop]

    def evict(self, init_tokens: int, event_spans: list[tuple[int, int]], rotary: RotaryTable) -> None:
        """Move the first `init_tokens` window tokens to init, then each span (window offsets, contiguous from
        init_tokens) to a new event; shift the window and re-rotate it from position 0."""
        if init_tokens:
            self.init_k = torch.cat((self.init_k, self.k_raw[:, :, :init_tokens]), dim=2)
            self.init_v = torch.cat((self.init_v, self.v[:, :, :init_tokens]), dim=2)
        for start, stop in event_spans:
            self._store_event(start, stop)
        removed = event_spans[-1][1] if event_spans else init_tokens
        self._shift(removed, rotary)

    def _store_event(self, start: int, stop: int) -> None:
        keys = self.k_raw[:, :, start:stop]
        top = torch.topk(self.mass[start:stop], min(self.config.repr_topk, stop - start)).indices
        event = len(self.events_k)
        if event == self._reprs.shape[0]:
            self._reprs = torch.cat((self._reprs, torch.empty_like(self._reprs)))
        self._reprs[event] = keys[0, :, top].float().mean(dim=1).reshape(-1)  # (Hkv*D,)
        self.events_k.append(keys.to("cpu", self.offload_dtype).contiguous())
        self.events_v.append(self.v[:, :, start:stop].to("cpu", self.offload_dtype).contiguous())

    def _shift(self, removed: int, rotary: RotaryTable) -> None:
        if removed == 0:
            return
        remaining = self.length - removed
        for buf in (self.k_raw, self.v):
            buf[:, :, :remaining] = buf[:, :, removed : self.length].clone()
        self.mass[:remaining] = self.mass[removed : self.length].clone()
        self.mass[remaining:] = 0
        self.length = remaining
        self.k_rot[:, :, :remaining] = rotary.rotate(self.k_raw[:, :, :remaining], 0)

    # -- truncation -----------------------------------------------------------------------------
    def truncate_window(self, keep: int) -> None:
        self.length = min(self.length, keep)
        self.mass[self.length :] = 0

    def truncate_events(self, keep_events: int, last_event_len: int | None) -> None:
        """Keep the first keep_events events; optionally cut the last kept one to last_event_len tokens."""
        del self.events_k[keep_events:], self.events_v[keep_events:]
        unchanged = keep_events
        if last_event_len is not None and keep_events:
            i = unchanged = keep_events - 1
            self.events_k[i] = self.events_k[i][:, :, :last_event_len].contiguous()
            self.events_v[i] = self.events_v[i][:, :, :last_event_len].contiguous()
            self.reprs[i] = self.events_k[i][0].float().mean(dim=1).reshape(-1)
        for event in [e for e in self._cache if e >= unchanged]:  # the device copies of the rest stay
            del self._cache[event]
        self._selection, self._global = None, None

    def truncate_init(self, keep: int) -> None:
        self.init_k = self.init_k[:, :, :keep]
        self.init_v = self.init_v[:, :, :keep]
        self._selection, self._global = None, None

    def reopen_window(self, events: int, init_tokens: int, rotary: RotaryTable) -> None:
        """Fill the emptied window with the last `events` events, after the init block when `init_tokens`
        (then all of it) returns too; re-rotated from position 0, their attention mass starting at zero."""
        keep = len(self.events_k) - events
        blocks = [(self.events_k[i], self.events_v[i]) for i in range(keep, len(self.events_k))]
        if init_tokens:
            blocks.insert(0, (self.init_k, self.init_v))
        keys = torch.cat([k.to(self.device, self.dtype) for k, _ in blocks], dim=2)
        values = torch.cat([v.to(self.device, self.dtype) for _, v in blocks], dim=2)
        self.truncate_window(0)
        self._append(keys, rotary.rotate(keys, 0), values)
        self.truncate_events(keep, None)
        if init_tokens:
            self.truncate_init(0)

    # -- state ----------------------------------------------------------------------------------
    def rows(self, start: Mark, stop: Mark) -> State:
        """Events [start, stop): keys and values concatenated along tokens, their lengths, representatives."""
        first, last = start.events, stop.events
        empty = self.init_k.new_empty((1, self.init_k.shape[1], 0, self.init_k.shape[3]), device="cpu")
        keys = [self.events_k[e] for e in range(first, last)]
        values = [self.events_v[e] for e in range(first, last)]
        return {
            "k": torch.cat(keys, 2) if keys else empty.to(self.offload_dtype),
            "v": torch.cat(values, 2) if values else empty.to(self.offload_dtype),
            "lengths": torch.tensor([k.shape[2] for k in keys], dtype=torch.int64),
            "reprs": self.reprs[first:last].float().cpu(),
        }

    def state_dict(self, since: Mark, until: Mark, *, copy: bool = True) -> State:
        """Rows [since, until) and what moves: init block, window (copied with `copy`: it is written in
        place), retrieval state. The rotated window keys are not kept: they are the raw ones rotated."""
        n = self.length
        window = (self.k_raw[:, :, :n], self.v[:, :, :n], self.mass[:n])
        if copy:
            window = tuple(t.clone() for t in window)
        state = {
            **self.rows(since, until),
            "init_k": self.init_k,  # replaced, never written into: shared
            "init_v": self.init_v,
            "window_k": window[0],
            "window_v": window[1],
            "mass": window[2],
            "query_count": self._query_count,
            "corpus_query_count": self.corpus_query_count,
            "selection": list(self._selection) if self._selection is not None else None,
        }
        if self._query_sum is not None:
            state["query_sum"] = self._query_sum
        if self.corpus_query_sum is not None:
            state["corpus_query_sum"] = self.corpus_query_sum
        return state

    def load_rows(self, pieces: list[Piece]) -> None:
        """Serve the events of saved segments (in order) from disk, and read their representatives."""
        self.truncate_events(0, None)
        self.serve_from_disk(pieces)
        reprs = [self._piece_reprs(rows, stop.events - start.events) for rows, start, stop in pieces]
        self.load_reprs(torch.cat(reprs) if reprs else None)

    def serve_from_disk(self, pieces: list[Piece]) -> None:
        """Events of these saved segments (consecutive from event 0) are read from disk from now on; RAM
        copies of them are dropped, later events stay as they are."""
        runs_k, runs_v, first = [], [], 0
        for rows, start, stop in pieces:
            count = stop.events - start.events
            lengths = vector(rows["lengths"], "lengths", dtype=torch.int64)
            expect(lengths.shape[0] >= count and bool((lengths[:count] > 0).all()), "bad event lengths")
            offsets = [0, *itertools.accumulate(lengths[:count].tolist())]
            for name, runs in (("k", runs_k), ("v", runs_v)):
                self._check_shape(rows[name], name, (1, self.init_k.shape[1], None, self.init_k.shape[3]))
                expect(rows[name].shape[2] >= offsets[-1], f"{name} holds fewer tokens than its events")
                runs.append(DiskRun(first, offsets, rows[name]))
            first += count
        self.events_k.set_disk(runs_k)
        self.events_v.set_disk(runs_v)

    def _piece_reprs(self, rows: State, count: int) -> torch.Tensor:
        self._check_shape(rows["reprs"], "reprs", (None, self.init_k.shape[1] * self.init_k.shape[3]))
        reprs = materialize(rows["reprs"])
        expect(reprs.shape[0] >= count, "fewer representatives than events")
        return reprs[:count]

    def load_state_dict(self, state: State, since: Mark) -> None:
        """Back to `state`, keeping the events before `since`; shapes are checked against this layer."""
        self.truncate_events(since.events, None)
        count = vector(state["lengths"], "lengths").shape[0]
        if count:  # events after `since` held in the state itself (not what saves and checkpoints write)
            keys, values = materialize(state["k"]), materialize(state["v"])
            lengths = materialize(state["lengths"]).tolist()
            expect(keys.shape[2] == values.shape[2] == sum(lengths), "event keys and lengths disagree")
            reprs = torch.cat((self.reprs, self._piece_reprs(state, count).to(self.device)))
            for k, v in zip(keys.split(lengths, 2), values.split(lengths, 2), strict=True):
                self.events_k.append(k.to("cpu", self.offload_dtype).contiguous())
                self.events_v.append(v.to("cpu", self.offload_dtype).contiguous())
            self.load_reprs(reprs)
        heads, dim = self.init_k.shape[1], self.init_k.shape[3]
        for name in ("init_k", "init_v", "window_k", "window_v"):
            self._check_shape(state[name], name, (1, heads, None, dim))
        init_k, init_v = materialize(state["init_k"]), materialize(state["init_v"])
        window_k, window_v = materialize(state["window_k"]), materialize(state["window_v"])
        n = window_k.shape[2]
        expect(init_v.shape[2] == init_k.shape[2] and window_v.shape[2] == n, "keys and values disagree")
        mass = vector(state["mass"], "mass", n, dtype=torch.float32)
        self.init_k, self.init_v = init_k.to(self.device, self.dtype), init_v.to(self.device, self.dtype)
        self.truncate_window(0)
        window_k = window_k.to(self.device, self.dtype)
        self._append(window_k, self.rotary.rotate(window_k, 0), window_v.to(self.device, self.dtype))
        self.mass[:n] = mass.to(self.device)
        self._load_retrieval_state(state)

    def _load_retrieval_state(self, state: State) -> None:
        counts = (state.get("query_count"), state.get("corpus_query_count"))
        expect(all(is_count(c) for c in counts), "query counts")
        for name in ("query_sum", "corpus_query_sum"):
            if name in state:
                self._check_shape(state[name], name, (1, None, self.init_k.shape[3]))
        query_sum, corpus_sum = state.get("query_sum"), state.get("corpus_query_sum")
        self._query_sum = materialize(query_sum).to(self.device).float() if query_sum is not None else None
        self.corpus_query_sum = (
            materialize(corpus_sum).to(self.device).float() if corpus_sum is not None else None
        )
        self._query_count, self.corpus_query_count = counts
        selection = state.get("selection")
        if selection is not None:
            events = len(self.events_k)
            expect(
                isinstance(selection, list) and all(is_count(e) and e < events for e in selection),
                "selection",
            )
            selection = tuple(selection)
        self._selection, self._global = selection, None  # read back when first needed

    @staticmethod
    def _check_shape(value, name: str, shape: tuple) -> None:
        """A tensor (or reference) of this shape (None: any size); state from files is untrusted."""
        held = tuple(getattr(value, "shape", ()))
        fits = len(held) == len(shape) and all(w is None or w == g for w, g in zip(shape, held, strict=True))
        expect(fits, f"{name} has shape {list(held)}, this layer needs {list(shape)}")

    # -- accounting -----------------------------------------------------------------------------
    def device_bytes(self) -> int:
        """Working set on the compute device: init, window buffers, representatives, cached events.

        A cached block that is the CPU-tier tensor itself (same device and dtype) is not counted twice.
        """
        stored = {k.data_ptr() for k in self.events_k.ram_tensors()}
        cached = sum(_nbytes(k) + _nbytes(v) for k, v in self._cache.values() if k.data_ptr() not in stored)
        buffers = (self.init_k, self.init_v, self.k_raw, self.k_rot, self.v, self.mass, self.reprs)
        return sum(_nbytes(t) for t in buffers) + cached

    def cpu_bytes(self) -> int:
        """The offloaded events held in RAM (CPU tier)."""
        return self.events_k.ram_bytes() + self.events_v.ram_bytes()

    def disk_bytes(self) -> int:
        """The events served from saved segment files (disk tier)."""
        return self.events_k.disk_bytes() + self.events_v.disk_bytes()


__all__ = ["ChunkContext", "LayerMemory"]
