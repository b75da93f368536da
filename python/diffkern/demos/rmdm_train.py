"""One run of the R-MDM demo: build a (K x L) model for a task, train it, score it over T and L_s.

The tasks (specs/rmdm.md "Data and metrics"): Sudoku (81 cells, digits as tokens 0..8, clues are the
prompt) scored by valid-puzzle rate (VPR) and accuracy on the blank cells; Countdown-4 (prompt
"a,b,c,d>target", answer three equations) scored by right-token rate on the answer and equation validity.
Sampling is confidence-ordered top-k unmasking (`diffkern.rmdm.sample`), deterministic given the model.
"""
from __future__ import annotations

import time
from dataclasses import dataclass

import torch

import diffkern
from ..rmdm import RecursiveMDM, countdown, sample, sudoku

WARMUP = 100  # linear learning-rate warm-up steps


@dataclass
class TaskData:
    """A task's token sequences: train x [N, S] / prompt bool [N, S]; test likewise plus what its metrics read."""
    name: str
    vocab: int
    seq_len: int
    x: torch.Tensor
    prompt: torch.Tensor
    test_x: torch.Tensor
    test_prompt: torch.Tensor
    test_extra: tuple


def to_tokens(boards: torch.Tensor) -> torch.Tensor:
    """Digits 1..9 -> tokens 0..8 (blanks become 0; they are masked through the prompt mask anyway)."""
    return (boards - 1).clamp(min=0)


def sudoku_data(n_train: int, n_test: int, clues: int) -> TaskData:
    """Unique-solution Sudoku puzzles with exactly `clues` clues (train seed 0, test seed 12345: disjoint draws)."""
    train_p, train_s = sudoku.generate(n_train, clues, seed=0)
    test_p, test_s = sudoku.generate(n_test, clues, seed=12345)
    return TaskData("sudoku", 9, sudoku.CELLS, to_tokens(train_s), train_p > 0, to_tokens(test_p), test_p > 0,
                    (test_p, test_s))


def countdown_data(n_train: int, n_test: int) -> TaskData:
    """Countdown-4 problems with one reference solution each (train seed 0, test seed 12345)."""
    train, test = countdown.generate(n_train, seed=0), countdown.generate(n_test, seed=12345)
    return TaskData("countdown", countdown.VOCAB, countdown.SEQ_LEN, train, countdown.prompt_mask(n_train), test,
                    countdown.prompt_mask(n_test), (test,))


def metrics(task: TaskData, tokens: torch.Tensor) -> dict:
    """Sudoku: vpr, cell_acc (blank cells right); Countdown: right_token (answer positions), validity."""
    if task.name == "sudoku":
        puzzles, solutions = task.test_extra
        boards, blanks = tokens + 1, puzzles == 0
        return {"vpr": sudoku.vpr(boards, puzzles),
                "cell_acc": ((boards == solutions) & blanks).sum().item() / max(1, blanks.sum().item())}
    return {"right_token": countdown.right_token_rate(tokens, task.test_extra[0]),
            "validity": countdown.equation_validity(tokens)}


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


def build(task: TaskData, K: int, L: int, d: int, heads: int, seed: int) -> RecursiveMDM:
    """The task's (K x L) model, its initial weights drawn from torch.manual_seed(seed)."""
    torch.manual_seed(seed)
    if task.name == "sudoku":
        return sudoku_model(K, L, d, heads)
    return RecursiveMDM(task.vocab, d, heads, K, L, seq_len=task.seq_len)


def train(model: RecursiveMDM, task: TaskData, steps: int, batch: int, lr: float, t_min: float, seed: int,
          log) -> dict:
    """`steps` AdamW steps of the MDLM loss (deep supervision) on batches drawn with Generator(seed)."""
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    gen = torch.Generator().manual_seed(seed)
    start, cpu, losses = time.time(), time.process_time(), []
    for step in range(steps):
        idx = torch.randint(0, task.x.shape[0], (batch,), generator=gen)
        for g in opt.param_groups:
            g["lr"] = lr * min(1.0, (step + 1) / WARMUP)
        loss = model.loss(task.x[idx], task.prompt[idx], generator=gen, t_min=t_min)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        losses.append(loss.item())
        if (step + 1) % 200 == 0:
            log(f"step {step + 1:5d}  loss {sum(losses[-50:]) / len(losses[-50:]):.4f}  ({time.time() - start:.0f} s)")
    tail = losses[-50:]
    return {"steps": steps, "wall_s": time.time() - start, "cpu_s": time.process_time() - cpu,
            "final_loss": sum(tail) / max(1, len(tail))}


def evaluate(model: RecursiveMDM, task: TaskData, t_grid, ls_grid, t_fixed: int, sweep_ls: bool) -> dict:
    """Metrics on the test set for every T in t_grid at L_s = L_t, and (sweep_ls) every L_s in ls_grid at T = t_fixed.

    Keys "T=<T>,L_s=<L_s>"; each point is computed once.
    """
    model.eval()
    points = [(T, model.L) for T in t_grid] + ([(t_fixed, n) for n in ls_grid] if sweep_ls else [])
    out = {}
    for T, n_iter in points:
        key = f"T={T},L_s={n_iter}"
        if key not in out:
            out[key] = metrics(task, sample(model, task.test_x, task.test_prompt, T, n_iter=n_iter))
    return out


def run_job(task: TaskData, model_name: str, K: int, L: int, seed: int, cfg, backend: str) -> dict:
    """Train and score one (task, model, seed); returns its config, parameter count, training log and metrics."""
    torch.set_num_threads(1)
    tag = f"[{task.name} {model_name} ({K}x{L}) seed {seed}]"
    log = lambda msg: print(f"{tag} {msg}", flush=True)  # noqa: E731
    with diffkern.backend(backend):
        model = build(task, K, L, cfg.d, cfg.heads, seed)
        log(f"training, {sum(p.numel() for p in model.parameters()) / 1e6:.3f}M parameters")
        fit = train(model, task, cfg.steps[task.name], cfg.batch, cfg.lr, cfg.t_min, seed, log)
        start, cpu = time.time(), time.process_time()
        scores = evaluate(model, task, cfg.t_grid, cfg.ls_grid, cfg.t_fixed, sweep_ls=(K == cfg.K))
    fit.update(eval_wall_s=time.time() - start, eval_cpu_s=time.process_time() - cpu)
    log(f"done: loss {fit['final_loss']:.4f}, train {fit['wall_s']:.0f} s wall / {fit['cpu_s']:.0f} s CPU, "
        f"eval {fit['eval_wall_s']:.0f} s wall")
    return {"task": task.name, "model": model_name, "K": K, "L": L, "seed": seed,
            "params": sum(p.numel() for p in model.parameters()), "train": fit, "scores": scores}
