"""Sudoku for R-MDM (specs/rmdm.md "Data and metrics"): a seeded generator and the two metrics.

Boards are int64 [n, 81] in row-major order, digits 1..9, 0 for a blank. The generator (C++,
csrc/cpu/rmdm_sudoku.cpp) draws a random complete grid per puzzle and removes cells in a random
order while the puzzle keeps exactly one solution; puzzle i depends only on (seed, i).
"""
from __future__ import annotations

import torch

from .. import _ops

CELLS = 81


def generate(n: int, clues: int, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """n unique-solution puzzles with exactly `clues` clues, and their solutions (int64 [n, 81] each).

    Every grid is valid, every puzzle agrees with its solution on its clues and has no other solution.
    `clues` must lie in [17, 81]; greedy removal stalls often below ~24 clues (an error says so).
    Runs in parallel over puzzles (ATen's intra-op threads); the result does not depend on their number.
    """
    return _ops.ops.rmdm_sudoku(int(n), int(clues), int(seed))


def count_solutions(puzzles: torch.Tensor, limit: int = 2) -> torch.Tensor:
    """int64 [n]: how many solutions each puzzle has, counting no further than `limit` (0 if contradictory)."""
    return _ops.ops.rmdm_sudoku_count(puzzles.to(torch.int64).cpu().contiguous(), int(limit))


def _units() -> torch.Tensor:
    """[27, 9] cell indices of the 9 rows, 9 columns and 9 boxes."""
    r = torch.arange(CELLS).view(9, 9)
    boxes = r.view(3, 3, 3, 3).permute(0, 2, 1, 3).reshape(9, 9)
    return torch.cat([r, r.t(), boxes])


UNITS = _units()


def is_valid(boards: torch.Tensor, puzzles: torch.Tensor) -> torch.Tensor:
    """bool [n]: every row, column and box holds 1..9 once, and every clue of the puzzle is kept."""
    boards, puzzles = boards.cpu().long(), puzzles.cpu().long()
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
    return (boards.cpu().long() == solutions.cpu().long()).all(1).double().mean().item()
