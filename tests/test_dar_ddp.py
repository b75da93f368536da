"""A DAR DiT under DistributedDataParallel (gloo, 2 CPU processes) gets the gradients one process gets on the
global batch, and one optimizer step leaves the ranks' weights identical."""
import os
import tempfile

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.nn.parallel import DistributedDataParallel

from diffkern.dar.blocks import DiT
from diffkern.dar.sit import velocity_loss

WORLD, B = 2, 4


def model():
    torch.manual_seed(0)
    m = DiT(input_size=4, patch_size=2, in_channels=1, hidden_size=16, depth=2, num_heads=2, num_classes=3,
            learn_sigma=False, class_dropout_prob=0.0, chunk_size=2, query="timestep")
    with torch.no_grad():  # leave adaLN-Zero so every weight, the router's included, gets a gradient
        for p in m.parameters():
            p.add_(0.1 * torch.randn(p.shape, generator=torch.Generator().manual_seed(p.numel())))
    return m


def global_batch():
    g = torch.Generator().manual_seed(3)
    return torch.randn(B, 1, 4, 4, generator=g), torch.randint(0, 3, (B,), generator=g)


def loss_on(m, rows):
    """The velocity loss of samples `rows`, each with its own fixed (t, noise) so any split sees the same ones."""
    x, y = global_batch()
    losses = [velocity_loss(m, x[r:r + 1], y[r:r + 1], torch.Generator().manual_seed(100 + r)) for r in rows]
    return torch.stack(losses).mean()


def worker(rank, init_file, out_dir):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        torch.set_num_threads(1)
        ddp = DistributedDataParallel(model())
        loss_on(ddp, range(rank, B, WORLD)).backward()
        grads = {n: p.grad.clone() for n, p in ddp.module.named_parameters() if p.requires_grad}
        torch.optim.SGD(ddp.parameters(), lr=0.1).step()
        torch.save(dict(grads=grads, weights=ddp.module.state_dict()), os.path.join(out_dir, f"{rank}.pt"))
    finally:
        dist.destroy_process_group()


def test_ddp_gradients_match_one_process_on_the_global_batch():
    with tempfile.TemporaryDirectory() as tmp:
        mp.spawn(worker, args=(os.path.join(tmp, "init"), tmp), nprocs=WORLD)
        parts = [torch.load(os.path.join(tmp, f"{r}.pt")) for r in range(WORLD)]
    single = model()
    loss_on(single, range(B)).backward()
    expected = {n: p.grad for n, p in single.named_parameters() if p.requires_grad}
    # (a sublayer routing over one source has a zero query gradient; the router as a whole does not)
    assert sum(g.abs().sum() for n, g in expected.items() if n.startswith("router.")) > 0
    for part in parts:
        assert part["grads"].keys() == expected.keys()
        for name, g in expected.items():
            torch.testing.assert_close(part["grads"][name], g, rtol=1e-4, atol=1e-6, msg=name)
    for name, w in parts[0]["weights"].items():
        assert torch.equal(w, parts[1]["weights"][name]), name
