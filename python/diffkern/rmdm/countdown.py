"""Countdown-4 for R-MDM (specs/rmdm.md): reach a target from 4 numbers with + - * /, as token sequences.

A sequence is PROMPT_LEN prompt tokens "a,b,c,d>target" then ANSWER_LEN answer tokens holding three
equations "x op y=z" joined by ',', each right-padded with PAD. Every equation combines two numbers
still available (the inputs, or results of earlier equations) into a positive integer <= MAX_VALUE
(division only when exact); the target is the last result. The prompt is never masked and carries no
loss; the answer's PAD positions are part of the answer (the model predicts where it ends).
"""
from __future__ import annotations

import re

import numpy as np
import torch

CHARS = "0123456789+-*/=,>"
PAD = len(CHARS)
VOCAB = len(CHARS) + 1
MAX_INPUT, MAX_VALUE = 50, 999
PROMPT_LEN, ANSWER_LEN = 15, 35
SEQ_LEN = PROMPT_LEN + ANSWER_LEN
_OPS = "+-*/"
_EQUATION = re.compile(r"^(\d+)([-+*/])(\d+)=(\d+)$")


def _apply(x: int, op: str, y: int) -> int | None:
    """x op y when it is a positive integer <= MAX_VALUE, else None."""
    if op == "+":
        z = x + y
    elif op == "-":
        z = x - y
    elif op == "*":
        z = x * y
    else:
        z = x // y if y and x % y == 0 else 0
    return z if 0 < z <= MAX_VALUE else None


def _encode(text: str, length: int) -> list[int]:
    assert len(text) <= length, text
    return [CHARS.index(ch) for ch in text] + [PAD] * (length - len(text))


def decode(tokens) -> str:
    """The text of a token sequence, PAD dropped."""
    return "".join(CHARS[int(t)] for t in tokens if int(t) != PAD)


def _problem(rng: np.random.Generator) -> tuple[list[int], int, list[str]]:
    while True:
        numbers = [int(v) for v in rng.integers(1, MAX_INPUT + 1, size=4)]
        pool, equations = list(numbers), []
        while len(pool) > 1:
            i, j = rng.choice(len(pool), size=2, replace=False)
            op = _OPS[rng.integers(4)]
            z = _apply(pool[i], op, pool[j])
            if z is None:
                break
            equations.append(f"{pool[i]}{op}{pool[j]}={z}")
            pool = [v for k, v in enumerate(pool) if k not in (i, j)] + [z]
        if len(pool) == 1:
            return numbers, pool[0], equations


def generate(n: int, seed: int = 0) -> torch.Tensor:
    """int64 [n, SEQ_LEN] token sequences of n solvable Countdown-4 problems with one reference solution each."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(n):
        numbers, target, equations = _problem(rng)
        prompt = ",".join(map(str, numbers)) + f">{target}"
        rows.append(_encode(prompt, PROMPT_LEN) + _encode(",".join(equations), ANSWER_LEN))
    return torch.tensor(rows, dtype=torch.int64).view(n, SEQ_LEN)


def prompt_mask(n: int) -> torch.Tensor:
    """bool [n, SEQ_LEN]: True on the prompt positions (never masked, no loss)."""
    mask = torch.zeros(n, SEQ_LEN, dtype=torch.bool)
    mask[:, :PROMPT_LEN] = True
    return mask


def right_token_rate(predicted: torch.Tensor, reference: torch.Tensor) -> float:
    """Fraction of answer positions whose token equals the reference solution's."""
    return (predicted[:, PROMPT_LEN:] == reference[:, PROMPT_LEN:]).double().mean().item()


def solves(sequence) -> bool:
    """Whether the answer is three correct equations that use each input number once and end at the target."""
    prompt, answer = decode(sequence[:PROMPT_LEN]), decode(sequence[PROMPT_LEN:])
    numbers_text, _, target_text = prompt.partition(">")
    pool = [int(v) for v in numbers_text.split(",")]
    equations = answer.split(",")
    if len(equations) != 3:
        return False
    for eq in equations:
        m = _EQUATION.match(eq)
        if m is None:
            return False
        x, op, y, z = int(m[1]), m[2], int(m[3]), int(m[4])
        if _apply(x, op, y) != z or x not in pool:
            return False
        pool.remove(x)
        if y not in pool:
            return False
        pool.remove(y)
        pool.append(z)
    return pool == [int(target_text)]


def equation_validity(predicted: torch.Tensor) -> float:
    """Fraction of sequences whose answer solves its prompt (any correct solution counts)."""
    return float(np.mean([solves(row.tolist()) for row in predicted])) if len(predicted) else 0.0
