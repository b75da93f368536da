"""R-MDM on Sudoku at small scale: a (K x L) recursive model against its (K*L x 1) counterpart at equal FLOPs.

    python -m diffkern.demos.rmdm --out DIR [--minutes 3 | --steps N] [--d 64] [--clues 45] [--backend cpu|reference]

Both models train for the same wall-clock budget (or the same number of steps: the same FLOPs, as the
two do equal work per step) on freshly generated unique-solution puzzles (CPU, the shared-block
recursion op), then solve held-out puzzles with confidence-ordered top-k unmasking
for T in STEPS and, for the recursive model, L_s in ITERS (L_s != L_t: recursion depth chosen at
inference). Prints the VPR table (the paper's trade-off table, tiny scale) and writes DIR/rmdm_vpr.png
and DIR/rmdm_vpr.json. Numbers are whatever this run measures.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch

import diffkern
from diffkern import _optional
from diffkern.rmdm import RecursiveMDM, sample, sudoku

STEPS = (1, 5, 20)
ITERS = (1, 2, 4, 8)


def to_tokens(boards: torch.Tensor) -> torch.Tensor:
    """Digits 1..9 -> tokens 0..8 (blanks become 0; they are masked through the prompt mask anyway)."""
    return (boards - 1).clamp(min=0)


def sudoku_positions(d: int, std: float = 0.5) -> torch.Tensor:
    """[81, d] initial positional embeddings row[r] + col[c] + box[b]: cells of one unit share a direction,
    which gives attention the Sudoku constraint structure to start from (the embeddings stay trainable)."""
    g = torch.Generator().manual_seed(0)
    row, col, box = (torch.randn(9, d, generator=g) * std for _ in range(3))
    cells = torch.arange(81)
    r, c = cells // 9, cells % 9
    return row[r] + col[c] + box[r // 3 * 3 + c // 3]


def sudoku_model(K: int, L: int, d: int, heads: int) -> RecursiveMDM:
    """A (K x L) RecursiveMDM for 81-cell boards with Sudoku positions and token embeddings at the same scale.

    The digits and the positions must both survive the first LayerNorm: with the positions at std ~0.87
    per element and the tokens at the model's default 0.02, the digit of a cell was ~2% of the normalised
    input and training sat at chance (loss ln 9) for hundreds of steps. Both now get the same per-element std.
    """
    model = RecursiveMDM(9, d, heads, K, L, seq_len=81)
    with torch.no_grad():
        model.pos.copy_(sudoku_positions(d))
        model.embed.weight.normal_(std=model.pos.std().item())
    return model


def train(model: RecursiveMDM, puzzles, solutions, minutes: float, steps: int, batch: int, lr: float, t_min: float,
          log) -> dict:
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(0)
    x, prompt = to_tokens(solutions), puzzles > 0
    start, step, losses = time.time(), 0, []
    while (step < steps) if steps else (time.time() - start < minutes * 60):
        idx = torch.randint(0, x.shape[0], (batch,), generator=gen)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / 100)
        loss = model.loss(x[idx], prompt[idx], generator=gen, t_min=t_min)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        step += 1
        if step % 50 == 0:
            log(f"  step {step:5d}  loss {sum(losses[-50:]) / 50:.4f}  ({time.time() - start:.0f} s)")
    return {"steps": step, "seconds": time.time() - start, "final_loss": sum(losses[-50:]) / max(1, len(losses[-50:]))}


def evaluate(model, puzzles, solutions, steps: int, n_iter: int, method: str = "topk") -> dict:
    out = sample(model, to_tokens(puzzles), puzzles > 0, steps, n_iter=n_iter, method=method,
                 generator=torch.Generator().manual_seed(1))
    boards = out + 1
    blanks = puzzles == 0
    cell_acc = ((boards == solutions) & blanks).sum().item() / max(1, blanks.sum().item())
    return {"vpr": sudoku.vpr(boards, puzzles), "board_acc": sudoku.board_accuracy(boards, solutions),
            "cell_acc": cell_acc}


def plot(results: dict, path: str) -> None:
    matplotlib = _optional.require("matplotlib", "demos")
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 4))
    for T in STEPS:
        ys = [results["recursive"][f"T={T},L_s={L}"]["vpr"] for L in ITERS]
        line = ax.plot(ITERS, ys, marker="o", label=f"recursive, T={T}")[0]
        ax.axhline(results["flat"][f"T={T},L_s=1"]["vpr"], ls="--", color=line.get_color(),
                   label=f"flat (K*L x 1), T={T}")
    ax.set_xlabel("inference iterations L_s")
    ax.set_ylabel("valid-puzzle rate")
    ax.set_xscale("log", base=2)
    ax.legend(fontsize=7)
    ax.set_title(results["title"], fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", required=True)
    ap.add_argument("--minutes", type=float, default=3.0, help="training budget per model")
    ap.add_argument("--steps", type=int, default=0,
                    help="train each model for exactly this many steps instead of --minutes (equal compute on a "
                         "machine whose load varies)")
    ap.add_argument("--d", type=int, default=64)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--K", type=int, default=2)
    ap.add_argument("--L", type=int, default=4)
    ap.add_argument("--clues", type=int, default=45)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--t-min", type=float, default=0.1,
                    help="floor of t ~ U(t_min, 1) in training: bounds the 1/t weight (1e-3 made the gradient noisy)")
    ap.add_argument("--n-test", type=int, default=200)
    ap.add_argument("--backend", default="cpu", choices=("cpu", "reference"),
                    help="diffkern backend of the recursion op (cpu: the C++ kernels)")
    ap.add_argument("--threads", type=int, default=1,
                    help="intra-op threads (1 by default: on a shared machine more threads mostly wait on each other)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    with diffkern.backend(args.backend):
        run(args)


def run(args) -> None:
    os.makedirs(args.out, exist_ok=True)
    log = lambda msg: print(msg, flush=True)  # noqa: E731
    torch.manual_seed(0)
    t0 = time.time()
    train_p, train_s = sudoku.generate(100_000, args.clues, seed=0)
    test_p, test_s = sudoku.generate(args.n_test, args.clues, seed=12345)
    log(f"generated 100,000 + {args.n_test} puzzles with {args.clues} clues in {time.time() - t0:.1f} s")
    configs = {"recursive": (args.K, args.L), "flat": (args.K * args.L, 1)}
    budget = f"{args.steps} steps" if args.steps else f"{args.minutes:g} min CPU training"
    results = {"title": f"Sudoku, {args.clues} clues, d={args.d}, {budget} each"}
    for name, (K, L) in configs.items():
        model = sudoku_model(K, L, args.d, args.heads)
        n_params = sum(p.numel() for p in model.parameters())
        log(f"training {name} ({K} x {L}), {n_params / 1e6:.2f}M parameters")
        results[f"{name}_train"] = {"K": K, "L": L, "params": n_params,
                                    **train(model, train_p, train_s, args.minutes, args.steps, args.batch, args.lr,
                                            args.t_min, log)}
        model.eval()
        iters = ITERS if L > 1 else (1,)
        results[name] = {}
        for T in STEPS:
            for n_iter in iters:
                results[name][f"T={T},L_s={n_iter}"] = evaluate(model, test_p, test_s, T, n_iter)
        results[name]["ancestral,T=20"] = evaluate(model, test_p, test_s, 20, L, method="ancestral")
    log("\nVPR (board accuracy) [accuracy on blank cells] on held-out puzzles, top-k unmasking; block "
        "evaluations per step = K * L_s")
    log(f"{'model':>22} " + " ".join(f"{'T=' + str(T):>21}" for T in STEPS))
    for name, (K, L) in configs.items():
        for n_iter in (ITERS if L > 1 else (1,)):
            cells = [results[name][f"T={T},L_s={n_iter}"] for T in STEPS]
            row = " ".join(f"{c['vpr']:.3f} ({c['board_acc']:.3f}) [{c['cell_acc']:.3f}]" for c in cells)
            log(f"{f'({K}x{L}) L_s={n_iter}':>22} {row}")
        a = results[name]["ancestral,T=20"]
        log(f"{f'({K}x{L}) ancestral T=20':>22} {a['vpr']:.3f} ({a['board_acc']:.3f}) [{a['cell_acc']:.3f}]")
    with open(os.path.join(args.out, "rmdm_vpr.json"), "w") as f:
        json.dump(results, f, indent=1)
    plot(results, os.path.join(args.out, "rmdm_vpr.png"))
    log(f"wrote {args.out}/rmdm_vpr.json and rmdm_vpr.png")


if __name__ == "__main__":
    main()
