"""Exact per-entry update counts of a tensor, kept per *cell* instead of per entry.

Masked AdamW needs each entry's own step count ``t`` (its bias correction ``1 - beta**t``), and the masked
EMA each entry's own warm-up count. With first-k slicing every box a tensor is ever updated on is built from
a few cut points per dimension (the sampled widths, and for a decoder input ``[h | skip]`` the segment
offsets). The cut points seen so far split the tensor into a grid of cells; every box seen so far is a union
of whole cells, so all entries of one cell have always been updated together and share one count. One
integer per cell is therefore exact. A new box with a new cut point refines the grid first: the cell it cuts
is split in two and both halves inherit its count.

The grid lives on the host (a small int64 numpy array, a few dozen cells per tensor in practice), so the
step's bias corrections are Python floats: no per-entry state, no per-step host sync.
"""

from __future__ import annotations

import bisect
import itertools
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor

Box = tuple[slice, ...]  # one block of a tensor: a slice(start, stop) per dimension
Block = tuple[Box, int]  # a box whose entries all share one count, and that count


class CellCounts:
    """Update counts of a tensor of ``shape``, one per cell of a grid refined on demand (see the module).

    ``cuts[d]`` are the sorted cut points of dimension ``d`` (``0`` and ``shape[d]`` included); ``counts``
    has one entry per cell, shape ``(len(cuts[0]) - 1, ...)``.
    """

    def __init__(self, shape: Sequence[int]) -> None:
        self.shape = tuple(int(n) for n in shape)
        self.cuts: list[list[int]] = [[0, n] if n else [0] for n in self.shape]
        self.counts = np.zeros([len(c) - 1 for c in self.cuts], dtype=np.int64)

    def copy(self) -> CellCounts:
        other = CellCounts.__new__(CellCounts)
        other.shape, other.cuts, other.counts = self.shape, [list(c) for c in self.cuts], self.counts.copy()
        return other

    def nbytes(self) -> int:
        """Host bytes held (counts and cut points, 8 bytes each)."""
        return self.counts.nbytes + 8 * sum(len(c) for c in self.cuts)

    def _cut(self, dim: int, point: int) -> int:
        """Index of cut ``point`` in ``cuts[dim]``, inserting it (splitting a cell) if new."""
        cuts = self.cuts[dim]
        i = bisect.bisect_left(cuts, point)
        if i < len(cuts) and cuts[i] == point:
            return i
        cuts.insert(i, point)  # cell i - 1 becomes cells i - 1 and i, both with its count
        self.counts = np.insert(self.counts, i, np.take(self.counts, i - 1, axis=dim), axis=dim)
        return i

    def update(self, boxes: Sequence[Box]) -> list[Block]:
        """Count one update of the entries in ``boxes`` (disjoint) and return them as blocks of entries
        sharing one count (the new count, after the increment); adjacent cells of equal count are merged
        into one block, so a box updated uniformly so far is a single block."""
        live = [box for box in boxes if all(s.start < s.stop for s in box)]  # empty boxes update nothing
        for box in live:  # refine first: a later box's cut can split an earlier box's cells
            for d, s in enumerate(box):
                self._cut(d, s.start)
                self._cut(d, s.stop)
        seen = np.zeros(self.counts.shape, dtype=bool)
        blocks: list[Block] = []
        spans = [[(self._cut(d, s.start), self._cut(d, s.stop)) for d, s in enumerate(box)] for box in live]
        for span in spans:  # checked before any count moves
            cells = tuple(slice(a, b) for a, b in span)
            if seen[cells].any():
                raise ValueError(f"boxes overlap: {boxes}")
            seen[cells] = True
        for span in spans:
            cells = tuple(slice(a, b) for a, b in span)
            self.counts[cells] += 1
            cuts = [self.cuts[d][a : b + 1] for d, (a, b) in enumerate(span)]
            blocks.extend(_merge(self.counts[cells], cuts))
        return blocks

    def per_entry(self, device: torch.device | str | None = None) -> Tensor:
        """The counts expanded to one int32 per entry (the old state format)."""
        out = torch.zeros(self.shape, dtype=torch.int32, device=device)
        for index in np.ndindex(*self.counts.shape):
            box = tuple(slice(self.cuts[d][i], self.cuts[d][i + 1]) for d, i in enumerate(index))
            out[box] = int(self.counts[index])
        return out

    @classmethod
    def from_per_entry(cls, counts: Tensor) -> CellCounts | None:
        """The grid of a per-entry count tensor: cut points wherever the counts change along a dimension
        (each cell is then constant). ``None`` when that grid has more than ``max(64, numel / 2)`` cells
        (counts from masks rather than boxes): the per-entry int32 tensor is then the smaller form."""
        grid = cls(counts.shape)
        values = counts.detach().cpu().to(torch.int64)
        if values.dim() == 0:
            grid.counts[()] = int(values)
            return grid
        for d in range(values.dim()):
            moved = values.movedim(d, 0)
            change = (moved[1:] != moved[:-1]).reshape(moved.shape[0] - 1, -1).any(dim=1)
            for point in (change.nonzero().flatten() + 1).tolist():
                grid._cut(d, point)
        if grid.counts.size > max(64, values.numel() // 2):
            return None
        for index in np.ndindex(*grid.counts.shape):  # constant on each cell: read its first entry
            grid.counts[index] = int(values[tuple(grid.cuts[d][i] for d, i in enumerate(index))])
        return grid

    def to_tensors(self) -> tuple[Tensor, Tensor]:
        """``(cuts, counts)``: the cut points of all dimensions concatenated (int64; ``counts``' shape tells
        how to split them) and the int32 counts of shape ``(cells_0, cells_1, ...)``."""
        flat = [c for cuts in self.cuts for c in cuts]
        return torch.tensor(flat, dtype=torch.int64), torch.from_numpy(self.counts.astype(np.int32))

    @classmethod
    def from_tensors(cls, shape: Sequence[int], cuts: Tensor, counts: Tensor) -> CellCounts:
        """Inverse of ``to_tensors``; raises ``ValueError`` if they do not describe a grid of ``shape``."""
        grid = cls(shape)
        flat, sizes = cuts.tolist(), [n + 1 for n in counts.shape]
        if counts.dim() != len(grid.shape) or len(flat) != sum(sizes):
            raise ValueError(f"cell counts {tuple(counts.shape)} / cuts {len(flat)} do not fit {grid.shape}")
        offsets = np.cumsum([0, *sizes])
        grid.cuts = [flat[a:b] for a, b in itertools.pairwise(offsets)]
        for c, n in zip(grid.cuts, grid.shape):
            if c[0] != 0 or c[-1] != n or c != sorted(set(c)):
                raise ValueError(f"bad cut points {c} for a dimension of size {n}")
        grid.counts = counts.to(torch.int64).numpy().copy()
        return grid


def _merge(counts: np.ndarray, cuts: list[list[int]]) -> list[Block]:
    """Blocks covering the cells of ``counts`` (cut points ``cuts`` per dimension): runs of equal slabs
    along dimension 0 merged, each slab split recursively along the next dimension."""
    if counts.ndim == 0:
        return [((), int(counts))]
    first = counts.flat[0]
    if (counts == first).all():
        return [(tuple(slice(c[0], c[-1]) for c in cuts), int(first))]
    blocks: list[Block] = []
    i, n = 0, counts.shape[0]
    while i < n:
        j = i + 1
        while j < n and np.array_equal(counts[j], counts[i]):
            j += 1
        for rest, count in _merge(counts[i], cuts[1:]):
            blocks.append(((slice(cuts[0][i], cuts[0][j]), *rest), count))
        i = j
    return blocks
