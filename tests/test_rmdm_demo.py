"""The Sudoku demo's model setup: the digits of the board must survive the first LayerNorm next to the positions."""
import torch
import torch.nn.functional as F

from diffkern.demos.rmdm import sudoku_model, to_tokens
from diffkern.rmdm import sudoku


def test_a_cells_digit_moves_its_normalised_input_as_much_as_its_position_does():
    # Regression: positions at std ~0.87 per element and tokens at 0.02 left a cell's digit ~3% of
    # LN(e + pos); training then sat at loss ln 9 (chance) for hundreds of steps.
    torch.manual_seed(0)
    model = sudoku_model(K=2, L=1, d=64, heads=4)
    puzzles, solutions = sudoku.generate(2, 40, seed=3)
    z = to_tokens(solutions)
    z_other = (z + 1) % 9  # every cell holds another digit
    with torch.no_grad():
        u = F.layer_norm(model.embed(z) + model.pos, (64,))
        u_digit = F.layer_norm(model.embed(z_other) + model.pos, (64,))
        u_cell = F.layer_norm(model.embed(z) + model.pos.roll(1, 0), (64,))  # every cell at another position
    digit_shift = (u - u_digit).norm(dim=-1).mean()
    position_shift = (u - u_cell).norm(dim=-1).mean()
    assert digit_shift > 0.5 * position_shift, (digit_shift.item(), position_shift.item())
    assert position_shift > 0.5 * digit_shift, (digit_shift.item(), position_shift.item())
