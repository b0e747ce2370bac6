"""One streaming pass over codes, keeping per component what a dashboard shows, in memory bounded by K x N.

Rows come in batches of whole *contexts* (the rows of one harvest window, or one image per row). For each of
the K components the pass keeps:

- the **top N contexts** by the component's largest value in them: a per-batch maximum per context merged
  into a running N x K buffer with one ``topk`` over (buffer + batch contexts);
- a **uniform sample** of R active rows (|value| > threshold), by random priority: every (row, component)
  gets a uniform key (plus 1 where active, so active rows come first) and the R largest keys of active rows
  are kept, again one ``topk`` merge; sorted by value at the end
  and cut into Q groups, it is a sample from each activation quantile;
- an **activation histogram** of the active values with B linear bins over [0, 2^e], e growing as larger
  values come (the counts of neighbouring bins are merged each time the range doubles: no second pass);
- the **density** (fraction of rows active), the sum of values and the number of rows.

Each kept context or sample holds a snippet: at most C consecutive values of its context around the row
that chose it (3/4 of C before it), the first global row of the snippet and the snippet's length, so
tokens or images can be looked up afterwards. Memory: (N + R) x K x C float16 values plus small integer
buffers, independent of the number of rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import Tensor

from implicit_em.eval.sae_metrics import ACTIVE_THRESHOLD


@dataclass(frozen=True)
class StreamConfig:
    """What the pass keeps per component."""

    top: int = 20  # N: top-activating contexts
    samples: int = 25  # R: uniform sample of active rows, cut into ``quantiles`` groups
    quantiles: int = 5  # Q
    bins: int = 32  # B: histogram bins (a power of two)
    context: int = 48  # C: values kept per context (around the row that chose it)
    threshold: float = ACTIVE_THRESHOLD  # a component is active on a row when |value| > threshold
    skip_first: int = 0  # the first rows of each context: shown in snippets, never chosen or counted

    def __post_init__(self):
        if self.bins < 2 or self.bins & (self.bins - 1):
            raise ValueError(f"bins must be a power of two >= 2 (got {self.bins})")
        for name in ("top", "samples", "quantiles", "context"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be >= 1 (got {getattr(self, name)})")
        if self.skip_first < 0:
            raise ValueError(f"skip-first must be >= 0 (got {self.skip_first})")


class _Slots:
    """A K-column buffer of kept items (N per component): score, first row of the snippet, its length, the
    chosen row's position in it, and the snippet's values."""

    def __init__(self, n: int, k: int, c: int):
        self.score = torch.full((n, k), -math.inf)
        self.value = torch.zeros(n, k)
        self.start = torch.full((n, k), -1, dtype=torch.int64)
        self.length = torch.zeros(n, k, dtype=torch.int32)
        self.pos = torch.zeros(n, k, dtype=torch.int32)
        self.snip = torch.zeros(n, k, c, dtype=torch.float16)

    def merge(self, score: Tensor, fill, valid: Tensor | None = None) -> None:
        """Keep the N best of the buffer and the candidates ``score`` (M x K); ``fill(cand, comp)`` returns
        (value, start, length, pos, snippet) of the chosen candidates (rows of ``score``) for components;
        ``valid`` (M x K, bool; default: finite scores) says which candidates are real.

        The slots are unordered: a candidate that makes the top N takes the slot of an item it pushes out, in
        place. A batch costs one ``topk`` over its M x K scores; the rest works on N x K and the items that
        change."""
        n = self.score.shape[0]
        k = score.shape[1]
        batch_best, batch_idx = score.topk(min(n, len(score)), dim=0)
        _, idx = torch.cat([self.score, batch_best]).topk(n, dim=0)
        comp_in, rank = (idx >= n).T.nonzero(as_tuple=True)  # sorted by component
        if not len(comp_in):
            return
        cand = batch_idx[idx[rank, comp_in] - n, comp_in]
        real = valid[cand, comp_in] if valid is not None else torch.isfinite(score[cand, comp_in])
        comp_in, cand = comp_in[real], cand[real]
        if not len(comp_in):
            return
        kept = torch.zeros(n + 1, k, dtype=torch.bool).scatter_(0, idx.clamp(max=n), True)[:n]
        comp_out, slot = (~kept).T.nonzero(as_tuple=True)  # the items pushed out, sorted by component
        counts_in = torch.bincount(comp_in, minlength=k)
        counts_out = torch.bincount(comp_out, minlength=k)
        # the first counts_in[c] pushed-out slots of component c take its candidates (an empty slot, -inf, is
        # pushed out before any real item; the slots left over are empty ones)
        rank_out = torch.arange(len(comp_out)) - (torch.cumsum(counts_out, 0) - counts_out)[comp_out]
        take = rank_out < counts_in[comp_out]
        slot, comp_out = slot[take], comp_out[take]
        value, start, length, pos, values = fill(cand, comp_in)
        self.score[slot, comp_out] = score[cand, comp_in]
        for t, v in ((self.value, value), (self.start, start), (self.length, length), (self.pos, pos)):
            t[slot, comp_out] = v.to(t.dtype)
        self.snip[slot, comp_out] = values.to(self.snip.dtype)

    def arrays(self) -> dict[str, np.ndarray]:
        """The buffers as numpy arrays (for :func:`_items`)."""
        names = ("score", "value", "start", "length", "pos", "snip")
        return {name: getattr(self, name).numpy() for name in names}


def _items(a: dict[str, np.ndarray], j: int) -> list[dict]:
    """Component j's kept items (finite score), best first, from :meth:`_Slots.arrays`."""
    out = []
    keep = np.flatnonzero(np.isfinite(a["score"][:, j]))
    for i in keep[np.argsort(-a["score"][keep, j], kind="stable")]:
        n = int(a["length"][i, j])
        out.append({
            "value": float(a["value"][i, j]), "start": int(a["start"][i, j]), "length": n,
            "pos": int(a["pos"][i, j]), "values": a["snip"][i, j, :n].astype(np.float32),
        })  # fmt: skip
    return out


class _PerComponent:
    """A read-only sequence over components whose entries are computed when read."""

    def __init__(self, k: int, fn):
        self.k, self.fn = k, fn

    def __len__(self) -> int:
        return self.k

    def __getitem__(self, j: int):
        if not -self.k <= j < self.k:
            raise IndexError(j)
        return self.fn(j % self.k)


@dataclass
class ComponentStats:
    """What the pass found, per component (numpy arrays over K, lists of items per component)."""

    rows: int
    active: np.ndarray  # K, rows with |value| > threshold
    total: np.ndarray  # K, sum of values (float64)
    maximum: np.ndarray  # K, the largest value seen (-inf when none)
    hist_counts: np.ndarray  # K x B, active positive values in bins [i, i+1) * hist_top / B
    hist_top: np.ndarray  # K, the histogram's upper edge (0 when no positive active value)
    top_arrays: dict = field(default_factory=dict)  # the top-context slots (numpy, N x K ...)
    sample_arrays: dict = field(default_factory=dict)  # the sample slots (numpy, R x K ...)
    n_quantiles: int = 5

    @property
    def top(self) -> _PerComponent:
        """``top[j]``: component j's top contexts, best first (items made on demand: memory stays K x N)."""
        return _PerComponent(self.k, lambda j: _items(self.top_arrays, j))

    @property
    def quantiles(self) -> _PerComponent:
        """``quantiles[j]``: component j's sample sorted by value and cut into groups ``{lo, hi, items}``,
        highest first, items highest first."""
        return _PerComponent(self.k, self._groups)

    def _groups(self, j: int) -> list[dict]:
        samples = sorted(_items(self.sample_arrays, j), key=lambda it: it["value"])
        groups = []
        if samples:
            for part in np.array_split(np.arange(len(samples)), min(self.n_quantiles, len(samples))):
                items = [samples[i] for i in part]
                groups.append({"lo": items[0]["value"], "hi": items[-1]["value"], "items": items[::-1]})
        return groups[::-1]

    @property
    def density(self) -> np.ndarray:
        return self.active / max(self.rows, 1)

    @property
    def mean(self) -> np.ndarray:
        """Mean value over all rows."""
        return self.total / max(self.rows, 1)

    @property
    def k(self) -> int:
        return len(self.active)


class ComponentStream:
    """The running state of the pass; feed :meth:`update` batches of codes, then call :meth:`finish`."""

    def __init__(self, k: int, config: StreamConfig = StreamConfig(), seed: int = 0):
        self.k, self.cfg = k, config
        self.generator = torch.Generator().manual_seed(seed)
        self.rows = 0
        self.active = torch.zeros(k, dtype=torch.int64)
        self.total = torch.zeros(k, dtype=torch.float64)
        self.maximum = torch.full((k,), -math.inf)
        self.hist = torch.zeros(k, config.bins, dtype=torch.int64)
        self.hist_exp = torch.full((k,), -(1 << 30), dtype=torch.int64)  # upper edge 2^exp; none yet
        self.top = _Slots(config.top, k, config.context)
        self.sample = _Slots(config.samples, k, config.context)

    # -- the pass ----------------------------------------------------------------------------------------
    @torch.no_grad()
    def update(self, codes: Tensor, rows: Tensor, new_context: Tensor) -> None:
        """One batch: ``codes`` (M x K) of rows with global indices ``rows`` (M, int64); ``new_context`` (M,
        bool) marks the first row of each context (the first row of the batch always starts one). A context
        must not continue into the next batch. The first ``skip_first`` rows of each context count nowhere
        (rows, density, histogram, maximum) and are never chosen; snippets still show their values."""
        codes = codes.detach().float().cpu()
        m = codes.shape[0]
        if m == 0:
            return
        rows = rows.to(torch.int64).cpu()
        new_context = new_context.to(torch.bool).cpu().clone()
        new_context[0] = True
        thr, skip = self.cfg.threshold, self.cfg.skip_first
        seg = new_context.cumsum(0) - 1  # context of each row, 0..n_ctx-1
        starts = new_context.nonzero().flatten()
        lengths = torch.diff(torch.cat([starts, torch.tensor([m])]))
        n_ctx = len(starts)
        chosen = codes  # the values rows are chosen and counted by
        if skip:
            left_out = (torch.arange(m) - starts[seg]) < skip
            chosen = codes.masked_fill(left_out.unsqueeze(1), -math.inf)
        active = chosen.abs() > thr
        if skip:
            active &= ~left_out.unsqueeze(1)
        self.rows += m - (int(left_out.sum()) if skip else 0)
        self.active += active.float().sum(0).to(torch.int64)  # exact: a batch has < 2^24 rows
        self.total += (codes.masked_fill(left_out.unsqueeze(1), 0.0) if skip else codes).sum(0).double()
        batch_max = chosen.amax(0)
        self.maximum = torch.maximum(self.maximum, batch_max)
        self._histogram(codes, active, batch_max)

        ctx_max = torch.full((n_ctx, self.k), -math.inf).scatter_reduce_(
            0, seg.unsqueeze(1).expand(m, self.k), chosen, "amax"
        )
        ctx_max[ctx_max <= thr] = -math.inf  # a context that never fires is never "top"
        c = self.cfg.context
        before = (3 * c) // 4
        by_comp = codes.T.contiguous().view(-1)  # component-major: a snippet is one contiguous read

        def at_rows(local: Tensor, comp: Tensor) -> Tensor:
            """codes[local, comp] (``comp`` broadcast against ``local``), from the component-major copy."""
            return by_comp[comp * m + local.clamp(max=m - 1)]

        def snippet(local_row: Tensor, comp: Tensor) -> tuple:
            """The snippet around batch rows ``local_row`` for components ``comp``."""
            ctx = seg[local_row]
            s0, ln = starts[ctx], lengths[ctx]
            at = local_row - s0  # position of the chosen row in its context
            first = torch.minimum((at - before).clamp(min=0), (ln - c).clamp(min=0))
            length = torch.minimum(ln - first, torch.tensor(c))
            offs = torch.arange(c)
            local = (s0 + first).unsqueeze(1) + offs
            valid = offs < length.unsqueeze(1)
            values = at_rows(local, comp.unsqueeze(1)) * valid
            return at_rows(local_row, comp), rows[s0 + first], length, at - first, values

        def fill_top(ctx: Tensor, comp: Tensor) -> tuple:
            # the first row of the context where the component takes its maximum
            out_rows = torch.empty_like(ctx)
            for lo in range(0, len(ctx), 1 << 16):  # bounded: chunk x longest context
                cx, cp = ctx[lo : lo + (1 << 16)], comp[lo : lo + (1 << 16)]
                lmax = int(lengths[cx].max())
                offs = torch.arange(lmax)
                local = starts[cx].unsqueeze(1) + offs
                vals = at_rows(local, cp.unsqueeze(1))
                vals[offs >= lengths[cx].unsqueeze(1)] = -math.inf
                vals[:, :skip] = -math.inf  # rows left out are never the chosen one
                out_rows[lo : lo + len(cx)] = starts[cx] + vals.argmax(1)
            return snippet(out_rows, comp)

        self.top.merge(ctx_max, fill_top)
        keys = torch.rand(m, self.k, generator=self.generator).add_(active)  # active rows' keys in [1, 2)
        self.sample.merge(keys, snippet, valid=active)

    def _histogram(self, codes: Tensor, active: Tensor, batch_max: Tensor) -> None:
        bins, none = self.cfg.bins, -(1 << 30)
        has = batch_max > self.cfg.threshold  # some positive active value
        if not bool(has.any()):
            return
        need = torch.full_like(self.hist_exp, none)
        need[has] = torch.ceil(torch.log2(batch_max[has].double())).to(torch.int64)
        fresh = has & (self.hist_exp == none)
        self.hist_exp[fresh] = need[fresh]
        grow = has & (need > self.hist_exp)
        if bool(grow.any()):
            shift = need - self.hist_exp
            for s in shift[grow].unique().tolist():
                comps = (grow & (shift == s)).nonzero().flatten()
                merged = torch.zeros(len(comps), bins, dtype=torch.int64)
                if s >= math.log2(bins):
                    merged[:, 0] = self.hist[comps].sum(1)
                else:
                    f = 1 << s
                    merged[:, : bins // f] = self.hist[comps].view(len(comps), bins // f, f).sum(-1)
                self.hist[comps] = merged
            self.hist_exp[grow] = need[grow]
        scale = (bins / torch.pow(2.0, self.hist_exp.clamp(min=-1000).double())).float()  # bins per unit value
        b = (codes * scale).to(torch.int32).clamp_(0, bins - 1)  # truncation is the floor for positive values
        b += (torch.arange(self.k, dtype=torch.int32) * bins).unsqueeze(0)
        b.masked_fill_(~(active & (codes > 0)), self.k * bins)  # a dump bin
        self.hist += torch.bincount(b.flatten(), minlength=self.k * bins + 1)[:-1].view(self.k, bins)

    # -- the result --------------------------------------------------------------------------------------
    def finish(self) -> ComponentStats:
        has = self.hist_exp > -(1 << 30)
        top_edge = torch.where(
            has, torch.pow(2.0, self.hist_exp.clamp(min=-1000).double()), torch.zeros((), dtype=torch.float64)
        )
        stats = ComponentStats(
            rows=self.rows,
            active=self.active.numpy(),
            total=self.total.numpy(),
            maximum=self.maximum.numpy(),
            hist_counts=self.hist.numpy(),
            hist_top=top_edge.numpy(),
            top_arrays=self.top.arrays(),
            sample_arrays=self.sample.arrays(),
            n_quantiles=self.cfg.quantiles,
        )
        return stats
