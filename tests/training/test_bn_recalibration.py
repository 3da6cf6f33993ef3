"""BatchNorm statistics re-estimated with the final weights, drop-path off (scalept/training/bn_recalibration.py)."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from gloo_ranks import run_ranks

from scalept.model import build_model
from scalept.training.bn_recalibration import batch_norms, recalibrate_batch_norms


def _batches(count: int, seed: int = 0, points: int = 3000) -> list[dict]:
    """Random clouds of distinct 0.2 m cells (one sample each), as the training loader yields them."""
    g = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(count):
        grid = torch.unique(torch.randint(0, 60, (2 * points, 3), generator=g), dim=0)[:points]
        grid = grid[torch.randperm(len(grid), generator=g)]
        feat = torch.cat([grid * 0.2, torch.rand(len(grid), 1, generator=g)], 1).float()
        out.append({"feat": feat, "grid": grid.int(), "offsets": torch.tensor([len(grid)])})
    return out


@pytest.fixture
def model(compose_cfg):
    torch.manual_seed(0)
    return build_model(compose_cfg("model=ptv3_tiny", "model.drop_path=0.5").model, 5)


def _stats(model) -> list[torch.Tensor]:
    return [t.clone() for m in batch_norms(model) for t in (m.running_mean, m.running_var)]


def test_the_statistics_become_the_average_of_the_batches_seen_in_eval_mode(model):
    """The stem's running mean is the plain mean of what reached it in each batch, drop-path off:
    two recalibrations on the same batches give the same statistics (a drop-path draw would not)."""
    batches = _batches(3)
    stem = model.stem_norm[0]
    seen = []
    hook = stem.register_forward_hook(lambda m, args, out: seen.append(args[0].float().mean(0)))
    model.train()
    used = recalibrate_batch_norms(model, batches, torch.device("cpu"), max_batches=8)
    hook.remove()
    assert used == 3 and len(seen) == 3
    torch.testing.assert_close(stem.running_mean, torch.stack(seen).mean(0))
    first = _stats(model)
    recalibrate_batch_norms(model, batches, torch.device("cpu"), max_batches=8)
    for a, b in zip(first, _stats(model)):
        torch.testing.assert_close(a, b)
    assert model.training  # the mode it had, and the momentum it had
    assert all(m.momentum == pytest.approx(0.01) for m in batch_norms(model))


def test_weights_stay_and_only_max_batches_are_used(model):
    weights = {k: v.clone() for k, v in model.named_parameters()}
    before = _stats(model)
    assert recalibrate_batch_norms(model, _batches(4), torch.device("cpu"), max_batches=2) == 2
    assert all(torch.equal(weights[k], v) for k, v in model.named_parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, _stats(model)))


def test_zero_batches_keep_the_training_statistics(model):
    for m in batch_norms(model):
        m.running_mean.fill_(0.3)
    before = _stats(model)
    assert recalibrate_batch_norms(model, _batches(2), torch.device("cpu"), max_batches=0) == 0
    assert recalibrate_batch_norms(model, [], torch.device("cpu"), max_batches=4) == 0
    for a, b in zip(before, _stats(model)):
        assert torch.equal(a, b)


def test_stochastic_statistics_average_passes_with_drop_path_on(model):
    """With ``stochastic`` every forward draws drop-path (0.5 here), so the statistics after the
    first pooling depend on the draw, unlike drop-path-off ones; mode and switch are restored."""
    batches = _batches(2)
    pool_norm = [m for m in batch_norms(model) if m is not model.stem_norm[0]]
    recalibrate_batch_norms(model, batches, torch.device("cpu"), max_batches=2)
    deterministic = _stats(model)
    draws = []
    for seed in (1, 2):
        torch.manual_seed(seed)
        recalibrate_batch_norms(model, batches, torch.device("cpu"), max_batches=2, stochastic=True)
        draws.append([t.clone() for m in pool_norm for t in (m.running_mean, m.running_var)])
    assert any(not torch.allclose(a, b) for a, b in zip(*draws))
    assert any(not torch.allclose(a, b) for a, b in zip(deterministic, _stats(model)))
    assert model.training and not model.stochastic


RANKS_SCRIPT = """
import json, sys
sys.path[:0] = [{here!r}, {tests!r}]
import torch
torch.set_num_threads(1)
from scalept import distributed
from scalept.model import build_model
from scalept.training.bn_recalibration import recalibrate_batch_norms
from test_bn_recalibration import _batches
from conftest import compose_config
with distributed.session("gloo") as env:
    torch.manual_seed(0)
    model = build_model(compose_config("model=ptv3_tiny").model, 5)
    batches = _batches(2, seed=env.rank) if env.rank == 0 else []  # rank 1 has no batch
    used = recalibrate_batch_norms(model, batches, torch.device("cpu"), max_batches=4)
    print("RESULT " + json.dumps({{"rank": env.rank, "used": used,
                                   "mean": model.stem_norm[0].running_mean.tolist()}}), flush=True)
"""


@pytest.mark.slow
def test_ranks_end_with_the_same_statistics_averaged_over_the_ranks_that_had_batches(compose_cfg):
    """Rank 1 saw no batch: both ranks end with rank 0's statistics, not half of them."""
    results = run_ranks(RANKS_SCRIPT.format(here=str(Path(__file__).parent), tests=str(Path(__file__).parents[1])), timeout=120)
    results.sort(key=lambda r: r["rank"])
    assert [r["used"] for r in results] == [2, 0]
    torch.manual_seed(0)
    alone = build_model(compose_cfg("model=ptv3_tiny").model, 5)
    recalibrate_batch_norms(alone, _batches(2, seed=0), torch.device("cpu"), max_batches=4)
    for r in results:
        torch.testing.assert_close(torch.tensor(r["mean"]), alone.stem_norm[0].running_mean)
