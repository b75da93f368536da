"""RecursiveMDM and its samplers: the MDLM loss (1/t, SUBS, deep supervision), L_s != L_t, unmasking rules."""
import pytest
import torch
import torch.nn.functional as F

from diffkern.rmdm import RecursiveMDM, countdown, sample, sudoku
from diffkern.rmdm import sampling as sampling_module


def tiny(K=2, L=3, time_cond=False, supervision="uniform"):
    torch.manual_seed(0)
    return RecursiveMDM(9, 8, 2, K, L, seq_len=81, mlp=12, time_cond=time_cond, supervision=supervision)


def boards(n=4, clues=40):
    p, s = sudoku.generate(n, clues, seed=2)
    return s - 1, p > 0


@pytest.mark.parametrize("supervision", ("uniform", "linear"))
def test_loss_is_the_1_over_t_weighted_masked_nll_summed_over_iterations(supervision):
    model = tiny(supervision=supervision)
    x, prompt = boards()
    loss = model.loss(x, prompt, generator=torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same draws, by hand
    t = torch.rand(x.shape[0], generator=g) * (1 - 1e-3) + 1e-3
    masked = (torch.rand(x.shape, generator=g) < t[:, None]) & ~prompt
    logits = model(torch.where(masked, 9, x), t, return_all=True)
    w = torch.full((3,), 1 / 3) if supervision == "uniform" else torch.tensor([1.0, 2.0, 3.0]) / 6
    expected = 0.0
    for k in range(3):
        nll = F.cross_entropy(logits[k].transpose(1, 2), x, reduction="none")
        expected = expected + w[k] * ((nll * masked).sum(1) / t / (~prompt).sum(1)).mean()
    torch.testing.assert_close(loss, expected)


def test_prompt_tokens_are_never_masked_and_carry_no_loss():
    model = tiny()
    x, prompt = boards()
    seen = []
    forward = model.forward
    model.forward = lambda z, *a, **k: seen.append(z) or forward(z, *a, **k)
    model.loss(x, prompt)
    assert torch.equal(seen[0][prompt], x[prompt])
    assert model.loss(x, torch.ones_like(prompt)).item() == 0.0


def test_inference_iterations_are_independent_of_training_iterations():
    model = tiny(L=3, time_cond=True)
    x, _ = boards(2)
    t = torch.full((2,), 0.5)
    assert model(x, t).shape == (2, 81, 9)
    assert model(x, t, n_iter=7, return_all=True).shape == (7, 2, 81, 9)
    torch.testing.assert_close(model(x, t, n_iter=5), model(x, t, n_iter=5, return_all=True)[-1])


@pytest.mark.parametrize("method", ("topk", "ancestral"))
def test_samplers_keep_prompt_and_revealed_tokens_and_finish_unmasked(method):
    model = tiny()
    x, prompt = boards(3)
    history = []
    forward = model.forward

    def spy(z, *a, **k):
        history.append(z.clone())
        return forward(z, *a, **k)

    model.forward = spy
    out = sample(model, x, prompt, steps=4, method=method, generator=torch.Generator().manual_seed(0))
    history.append(out)
    assert len(history) == 5 and (out != model.mask_id).all() and torch.equal(out[prompt], x[prompt])
    for before, after in zip(history, history[1:]):
        revealed = before != model.mask_id
        assert torch.equal(after[revealed], before[revealed])
    if method == "topk":  # linear schedule: round(s * n_answer) stay masked after each step
        n_answer = (~prompt).sum(1).double()
        for i, z in enumerate(history[1:]):
            s = 1 - (i + 1) / 4
            assert torch.equal((z == model.mask_id).sum(1), torch.round(s * n_answer).long())


def test_sampler_arguments_are_checked():
    model = tiny()
    x, prompt = boards(1)
    with pytest.raises(ValueError, match="method"):
        sample(model, x, prompt, 2, method="greedy")
    with pytest.raises(ValueError, match="steps"):
        sample(model, x, prompt, 0)
    assert sampling_module.sample is sample


def test_countdown_sequences_train_and_sample_with_the_prompt_kept():
    torch.manual_seed(0)
    model = RecursiveMDM(countdown.VOCAB, 8, 2, 1, 2, seq_len=countdown.SEQ_LEN, mlp=12, time_cond=True)
    x = countdown.generate(3, seed=1)
    prompt = countdown.prompt_mask(3)
    loss = model.loss(x, prompt)
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in model.parameters())
    out = sample(model, x, prompt, steps=3, n_iter=4)
    assert torch.equal(out[:, :countdown.PROMPT_LEN], x[:, :countdown.PROMPT_LEN])
    assert 0.0 <= countdown.right_token_rate(out, x) <= 1.0
    assert countdown.equation_validity(out) in (0.0, 1 / 3, 2 / 3, 1.0)
