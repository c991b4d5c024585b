"""Timestep samplers: uniform and loss-aware importance sampling (Nichol & Dhariwal eq. 17)."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from difflab.losses import LossAwareTimestepSampler, UniformTimestepSampler


def filled(T=8, history=10, seed=0):
    sampler = LossAwareTimestepSampler(T, history=history, uniform_prob=0.0)
    gen = torch.Generator().manual_seed(seed)
    scale = torch.arange(1, T + 1, dtype=torch.float64)
    for _ in range(history):
        t = torch.arange(T)
        sampler.update(t, scale * (1 + 0.1 * torch.rand(T, generator=gen, dtype=torch.float64)))
    return sampler, scale


def test_uniform_until_every_t_has_its_history():
    sampler = LossAwareTimestepSampler(4, history=2)
    sampler.update(torch.tensor([0, 1, 2, 3, 0, 1, 2]), torch.ones(7))
    torch.testing.assert_close(sampler.probabilities(), torch.full((4,), 0.25))
    sampler.update(torch.tensor([3]), torch.ones(1) * 5)
    assert not torch.allclose(sampler.probabilities(), torch.full((4,), 0.25))


def test_probabilities_follow_root_mean_square_loss():
    sampler, _ = filled()
    p = sampler.probabilities().double()
    assert p.sum().item() == pytest.approx(1.0, abs=1e-6)
    rms = sampler.loss_history.pow(2).mean(1).sqrt()
    torch.testing.assert_close(p, rms / rms.sum(), rtol=1e-5, atol=1e-7)


def test_importance_weights_make_the_estimator_unbiased():
    """E_{t~p}[w_t L_t] = (1/T) Σ_t L_t with the sampler's own weights w_t = 1/(T p_t), whatever p is."""
    sampler, scale = filled()
    losses = scale**2  # a synthetic loss table L_t
    p = sampler.probabilities().double()
    torch.manual_seed(0)
    t, w = sampler.sample(400_000, "cpu")
    weight_of_t = torch.zeros(len(p), dtype=torch.float64).index_put_((t,), w.double())  # the weight drawn with t
    torch.testing.assert_close(weight_of_t, 1.0 / (len(p) * p), rtol=1e-5, atol=0)
    assert (p * weight_of_t * losses).sum().item() == pytest.approx(losses.mean().item(), rel=1e-6)
    # the Monte Carlo estimate, which would miss by > 10 % with unit weights (p is far from uniform)
    assert (p * losses).sum().item() > 1.1 * losses.mean().item()
    assert (w.double() * losses[t]).mean().item() == pytest.approx(losses.mean().item(), rel=1e-2)


def test_ring_buffer_keeps_the_last_losses_with_duplicates_in_a_batch():
    sampler = LossAwareTimestepSampler(3, history=2)
    sampler.update(torch.tensor([1, 1, 1]), torch.tensor([1.0, 2.0, 3.0]))
    kept = set(sampler.loss_history[1].tolist())
    assert 2.0 in kept and kept <= {1.0, 2.0, 3.0}  # the slot written twice in one batch keeps one of its losses
    assert sampler.loss_counts.tolist() == [0, 3, 0]


def test_state_round_trip_and_shape_check():
    sampler, _ = filled()
    other = LossAwareTimestepSampler(8, history=10, uniform_prob=0.0)
    other.load_state_dict(sampler.state_dict())
    torch.testing.assert_close(other.probabilities(), sampler.probabilities())
    with pytest.raises(ValueError, match="another T"):
        LossAwareTimestepSampler(9).load_state_dict(sampler.state_dict())


def test_uniform_sampler_weights_are_one():
    t, w = UniformTimestepSampler(10).sample(64, "cpu")
    assert t.min() >= 0 and t.max() < 10 and torch.all(w == 1)


def _ddp_worker(rank, world, init_file, out_file):
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    sampler = LossAwareTimestepSampler(4, history=2)
    for step in range(3):
        t = torch.tensor([rank, 2 + rank, (step + rank) % 4])
        sampler.update(t, torch.tensor([1.0 + rank, 2.0 + step, 3.0 * (rank + 1)]))
    torch.save(sampler.state_dict(), f"{out_file}.{rank}")
    dist.destroy_process_group()


def test_ranks_share_one_history_under_ddp(tmp_path):
    init, out = tmp_path / "init", tmp_path / "state"
    os.environ.setdefault("GLOO_SOCKET_IFNAME", "lo")
    mp.spawn(_ddp_worker, args=(2, str(init), str(out)), nprocs=2, join=True)
    a, b = (torch.load(f"{out}.{r}") for r in (0, 1))
    torch.testing.assert_close(a["loss_history"], b["loss_history"])
    assert torch.equal(a["loss_counts"], b["loss_counts"]) and a["loss_counts"].sum() == 18
