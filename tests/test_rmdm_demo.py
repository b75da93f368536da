"""The R-MDM demo: the Sudoku model setup, the three compared models, and the smoke-size run's outputs."""
import json
import math

import pytest
import torch
import torch.nn.functional as F

from diffkern.demos import rmdm
from diffkern.demos.rmdm_report import LABELS, METRICS, comparisons
from diffkern.demos.rmdm_train import build, countdown_data, sudoku_data, sudoku_model, to_tokens
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


@pytest.mark.parametrize("task", ["sudoku", "countdown"])
def test_the_baselines_match_the_recursive_model_in_flops_or_in_parameters(task):
    data = sudoku_data(4, 4, 25) if task == "sudoku" else countdown_data(4, 4)
    cfg = rmdm.FULL
    models = {name: build(data, K, L, cfg.d, cfg.heads, seed=0) for name, (K, L) in cfg.models().items()}
    n_params = {name: sum(p.numel() for p in m.parameters()) for name, m in models.items()}
    block = [sum(p.numel() for p in blk) for blk in models["recursive"].block_params()][0]
    assert n_params["iso-param"] == n_params["recursive"]
    assert n_params["iso-FLOP"] == n_params["recursive"] + (cfg.K * cfg.L - cfg.K) * block
    evals = {name: m.K * m.L for name, m in models.items()}  # block evaluations per denoiser call
    assert evals["iso-FLOP"] == evals["recursive"] == cfg.L * evals["iso-param"]


def test_the_full_configuration_asks_for_hard_sudoku_and_three_seeds():
    # the bar: <= 25 clues and >= 3 seeds; L_s beyond L_t and T beyond t_fixed are on the grids
    assert rmdm.FULL.clues <= 25 and len(rmdm.FULL.seeds) >= 3
    assert max(rmdm.FULL.ls_grid) > rmdm.FULL.L and rmdm.FULL.L in rmdm.FULL.ls_grid
    assert max(rmdm.FULL.t_grid) > rmdm.FULL.t_fixed


def test_the_smoke_run_writes_every_table_point_and_interval(tmp_path):
    result = rmdm.main(["--out", str(tmp_path), "--smoke", "--workers", "1"])
    cfg = rmdm.SMOKE
    on_disk = json.loads((tmp_path / "rmdm.json").read_text())
    assert on_disk["summary"] == json.loads(json.dumps(result["summary"]))
    assert (tmp_path / "rmdm.png").stat().st_size > 10_000
    md = (tmp_path / "rmdm.md").read_text()
    n_models, n_seeds = len(cfg.models()), len(cfg.seeds)
    assert len(on_disk["runs"]) == len(METRICS) * n_models * n_seeds
    for task, metric_names in METRICS.items():
        for name, (K, L) in cfg.models().items():
            runs = [r for r in on_disk["runs"] if r["task"] == task and r["model"] == name]
            assert sorted(r["seed"] for r in runs) == list(cfg.seeds)
            assert all(r["train"]["steps"] == cfg.steps[task] and math.isfinite(r["train"]["final_loss"])
                       for r in runs)
            points = on_disk["summary"][task][name]["points"]
            expected = {f"T={T},L_s={L}" for T in cfg.t_grid}
            if K == cfg.K:
                expected |= {f"T={cfg.t_fixed},L_s={n}" for n in cfg.ls_grid}
            assert set(points) == expected
            for point in points.values():
                for m in metric_names:
                    iv = point[m]
                    assert len(iv["values"]) == n_seeds and all(0 <= v <= 1 for v in iv["values"])
                    assert iv["lo"] <= iv["mean"] <= iv["hi"]
        assert all(f"{LABELS[task]}: {LABELS[m]} vs T" in md for m in metric_names)
    assert len(on_disk["summary"]["paired"]) == sum(len(ms) for ms in METRICS.values()) * len(comparisons(cfg))
    assert md.count("\n### ") == sum(2 * len(ms) for ms in METRICS.values()) + 1
    assert on_disk["timing"]["wall_s"] > 0 and on_disk["timing"]["cpu_s"] > 0
