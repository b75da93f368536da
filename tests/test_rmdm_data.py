"""R-MDM data: the Sudoku generator (valid, unique, seeded, exact clue counts), the metrics, Countdown-4."""
import pytest
import torch

from diffkern.rmdm import countdown, sudoku


def count_by_python(puzzle: list[int], limit: int = 2) -> int:
    """An independent plain-Python solution counter (first empty cell, every digit), for the generator's check."""
    try:
        c = puzzle.index(0)
    except ValueError:
        return 1
    r, k = divmod(c, 9)
    used = {puzzle[r * 9 + j] for j in range(9)} | {puzzle[i * 9 + k] for i in range(9)}
    br, bk = r // 3 * 3, k // 3 * 3
    used |= {puzzle[(br + i) * 9 + bk + j] for i in range(3) for j in range(3)}
    n = 0
    for d in range(1, 10):
        if d not in used and n < limit:
            puzzle[c] = d
            n += count_by_python(puzzle, limit - n)
            puzzle[c] = 0
    return n


@pytest.mark.parametrize("clues", (24, 30, 45, 81))
def test_puzzles_have_the_asked_clues_and_agree_with_a_valid_solution(clues):
    p, s = sudoku.generate(300, clues, seed=3)
    assert p.shape == s.shape == (300, 81) and p.dtype == torch.int64
    assert ((p > 0).sum(1) == clues).all()
    assert sudoku.is_valid(s, p).all()


def test_puzzles_have_exactly_one_solution_by_an_independent_solver():
    p, s = sudoku.generate(6, 30, seed=11)
    for row in p.tolist():
        assert count_by_python(row) == 1
    assert (sudoku.count_solutions(p, limit=5) == 1).all()


def test_count_solutions_sees_several_and_none():
    p, s = sudoku.generate(1, 30, seed=0)
    assert sudoku.count_solutions(torch.zeros(1, 81, dtype=torch.long), limit=3).item() == 3
    bad = s.clone()
    bad[0, 1] = bad[0, 0]  # two equal digits in row 0
    assert sudoku.count_solutions(bad).item() == 0


def test_generator_is_seeded_and_prefix_stable():
    a = sudoku.generate(40, 28, seed=5)
    b = sudoku.generate(10, 28, seed=5)
    c = sudoku.generate(10, 28, seed=6)
    assert torch.equal(a[0][:10], b[0]) and torch.equal(a[1][:10], b[1])
    assert not torch.equal(b[1], c[1])
    assert len({tuple(r) for r in a[1].tolist()}) == 40, "solutions repeat"


def test_generator_rejects_impossible_clue_counts():
    with pytest.raises(ValueError, match="clues must be in"):
        sudoku.generate(1, 16)
    with pytest.raises(ValueError, match="n must be >= 0"):
        sudoku.generate(-1, 30)


def test_vpr_counts_broken_constraints_and_changed_clues():
    p, s = sudoku.generate(4, 30, seed=1)
    boards = s.clone()
    row_swap = s[1].view(9, 9).clone()
    row_swap[0, [0, 1]] = row_swap[0, [1, 0]]  # rows still fine, columns broken
    boards[1] = row_swap.flatten()
    other = sudoku.generate(1, 30, seed=99)[1][0]
    boards[2] = other  # a valid grid that ignores the clues
    boards[3, 5] = 0  # a blank left
    assert sudoku.is_valid(boards, p).tolist() == [True, False, False, False]
    assert sudoku.vpr(boards, p) == 0.25
    assert sudoku.board_accuracy(boards, s) == 0.25


def test_countdown_references_solve_their_prompts():
    seqs = countdown.generate(500, seed=0)
    assert seqs.shape == (500, countdown.SEQ_LEN)
    assert countdown.equation_validity(seqs) == 1.0
    assert countdown.right_token_rate(seqs, seqs) == 1.0
    assert torch.equal(seqs, countdown.generate(500, seed=0))


def test_countdown_validity_rejects_wrong_arithmetic_reuse_and_wrong_target():
    seq = countdown.generate(1, seed=4)[0]
    text = countdown.decode(seq[countdown.PROMPT_LEN:])
    numbers = countdown.decode(seq[:countdown.PROMPT_LEN]).partition(">")[0].split(",")

    def with_answer(answer):
        tokens = [countdown.CHARS.index(ch) for ch in answer]
        return seq[:countdown.PROMPT_LEN].tolist() + tokens + [countdown.PAD] * (countdown.ANSWER_LEN - len(tokens))

    assert countdown.solves(with_answer(text))
    first, rest = text.split(",", 1)
    lhs, z = first.split("=")
    assert not countdown.solves(with_answer(f"{lhs}={int(z) + 1},{rest}"))  # wrong arithmetic
    assert not countdown.solves(with_answer(f"{numbers[0]}+{numbers[0]}={2 * int(numbers[0])},{rest}"))
    assert not countdown.solves(with_answer(first))  # stops early
    perturbed = countdown.generate(20, seed=4)
    perturbed[:, countdown.PROMPT_LEN] = (perturbed[:, countdown.PROMPT_LEN] + 1) % 10
    assert countdown.right_token_rate(perturbed, countdown.generate(20, seed=4)) < 1.0


def test_sudoku_ops_pass_opcheck():
    torch.library.opcheck(torch.ops.diffkern.rmdm_sudoku, (3, 40, 7), test_utils=("test_schema", "test_faketensor"))
    puzzles, _ = sudoku.generate(3, clues=40, seed=7)
    torch.library.opcheck(torch.ops.diffkern.rmdm_sudoku_count, (puzzles, 2))
