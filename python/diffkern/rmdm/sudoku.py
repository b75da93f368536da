"""Sudoku for R-MDM (specs/rmdm.md "Data and metrics"): a seeded generator and the two metrics.

Boards are int64 [n, 81] in row-major order, digits 1..9, 0 for a blank. The generator (C++,
csrc/cpu/rmdm_sudoku.cpp) draws a random complete grid per puzzle and removes cells in a random
order while the puzzle keeps exactly one solution; puzzle i depends only on (seed, i).
"""
from __future__ import annotations

import torch

from .. import _checks, _ops

CELLS = 81


def generate(n: int, clues: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n unique-solution puzzles with exactly `clues` clues, and their solutions (int64 [n, 81] each).

    Every grid is valid, every puzzle agrees with its solution on its clues and has no other solution.
    `clues` must lie in [17, 81]; greedy removal stalls often below ~24 clues (an error says so).
    Runs in parallel over puzzles (ATen's intra-op threads); the result does not depend on their number.
    """
    return _ops.ops.rmdm_sudoku(*(_checks.integer("sudoku.generate", name, value)
                                            for name, value in (("n", n), ("clues", clues), ("seed", seed))))


def count_solutions(puzzles: torch.Tensor, limit: int = 2) -> torch.Tensor:
    """int64 [n]: how many solutions each puzzle has, counting no further than `limit` (0 if contradictory)."""
    op = "sudoku.count_solutions"
    return _ops.ops.rmdm_sudoku_count(_boards(op, "puzzles", puzzles).contiguous(),
                                                _checks.integer(op, "limit", limit))


def _units() -> torch.Tensor:
    """[27, 9] cell indices of the 9 rows, 9 columns and 9 boxes."""
    r = torch.arange(CELLS).view(9, 9)
    boxes = r.view(3, 3, 3, 3).permute(0, 2, 1, 3).reshape(9, 9)
    return torch.cat([r, r.t(), boxes])


UNITS = _units()


def _boards(op: str, name: str, t, n: int | None = None) -> torch.Tensor:
    """t as a CPU int64 [n, 81] tensor; a non-tensor, a float or complex dtype or another shape is an error
    naming the argument (digits are compared exactly, never truncated)."""
    if _checks.tensor(op, name, t).is_floating_point() or t.is_complex():
        raise ValueError(f"{op}: {name} must be an integer tensor (0 = blank, 1..9), got {t.dtype}")
    if t.dim() != 2 or t.shape[1] != CELLS or (n is not None and t.shape[0] != n):
        rows = "n" if n is None else str(n)
        raise ValueError(f"{op}: {name} must be [{rows}, {CELLS}], got shape {list(t.shape)}")
    return t.cpu().long()


def is_valid(boards: torch.Tensor, puzzles: torch.Tensor) -> torch.Tensor:
    """bool [n]: every row, column and box holds 1..9 once, and every clue of the puzzle is kept."""
    boards = _boards("sudoku.is_valid", "boards", boards)
    puzzles = _boards("sudoku.is_valid", "puzzles", puzzles, boards.shape[0])
    digits = boards[:, UNITS]  # [n, 27, 9]
    in_range = ((boards >= 1) & (boards <= 9)).all(1)
    seen = torch.zeros(boards.shape[0], 27, 10, dtype=torch.long).scatter_add_(2, digits.clamp(0, 9),
                                                                               torch.ones_like(digits))
    units_ok = (seen[:, :, 1:] == 1).all(2).all(1)
    clues_kept = ((puzzles == 0) | (boards == puzzles)).all(1)
    return in_range & units_ok & clues_kept


def vpr(boards: torch.Tensor, puzzles: torch.Tensor) -> float:
    """Valid-puzzle rate: the fraction of boards that satisfy every constraint and keep every clue."""
    return is_valid(boards, puzzles).double().mean().item()


def board_accuracy(boards: torch.Tensor, solutions: torch.Tensor) -> float:
    """Fraction of boards equal to the reference solution (the same as VPR for unique-solution puzzles)."""
    boards = _boards("sudoku.board_accuracy", "boards", boards)
    return (boards == _boards("sudoku.board_accuracy", "solutions", solutions, boards.shape[0])).all(1).double(
    ).mean().item()
