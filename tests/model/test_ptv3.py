"""Behaviour of the PTv3 model on small CPU clouds (ptv3_tiny, patch size 64)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from scalept.model import build_model, norm_statistics, stochastic_inference


def test_full_model_has_46_2m_parameters(compose_model):
    """The SemanticKITTI configuration matches the published PTv3 size (19-class head)."""
    model = build_model(compose_model("ptv3"), 19)
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - 46.2e6) / 46.2e6 < 0.01, count


def test_logits_follow_the_points_not_their_input_order(make_model, cloud, batch_of):
    """Serialization makes the output a function of the point set: permuting the input permutes the logits."""
    model = make_model().eval()
    a, b = cloud(1500, 1), cloud(700, 2)
    feat, grid, offsets = batch_of(a, b)
    perm = torch.cat([torch.randperm(1500), 1500 + torch.randperm(700)])
    with torch.no_grad():
        ref = model(feat, grid, offsets)
        out = model(feat[perm], grid[perm], offsets)
    assert ref.shape == (2200, 5)
    torch.testing.assert_close(out, ref[perm], atol=1e-5, rtol=1e-5)


def test_sample_output_does_not_depend_on_batch_mates(make_model, cloud, batch_of):
    """No patch, pooled cell or convolution crosses samples, whatever their position in the batch."""
    model = make_model().eval()
    a, b, c = cloud(1200, 3), cloud(2000, 4), cloud(90, 5)
    with torch.no_grad():
        alone = model(*batch_of(a))
        second = model(*batch_of(b, a))[2000:]
        middle = model(*batch_of(c, a, b))[90:1290]
    torch.testing.assert_close(second, alone, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(middle, alone, atol=1e-5, rtol=1e-5)


def test_samples_smaller_than_one_patch(make_model, cloud, batch_of):
    """A sample below the patch size is one shorter sequence, alone or beside larger samples."""
    model = make_model().eval()
    small, big = cloud(40, 6), cloud(1000, 7)
    with torch.no_grad():
        alone = model(*batch_of(small))
        mixed = model(*batch_of(big, small, cloud(3, 8)))
        single = model(*batch_of(cloud(1, 9)))
    assert torch.isfinite(mixed).all() and torch.isfinite(single).all()
    torch.testing.assert_close(mixed[1000:1040], alone, atol=1e-5, rtol=1e-5)


def test_gradients_reach_every_parameter(make_model, cloud, batch_of):
    model = make_model().train()
    feat, grid, offsets = batch_of(cloud(1500, 10), cloud(300, 11))
    labels = torch.randint(0, 5, (len(feat),))
    F.cross_entropy(model(feat, grid, offsets), labels).backward()
    missing = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not missing


def test_checkpointed_blocks_give_the_same_gradients(make_model, cloud, batch_of):
    """Activation checkpointing recomputes blocks (drop-path masks included) without changing the result."""
    feat, grid, offsets = batch_of(cloud(900, 12), cloud(400, 13))
    labels = torch.randint(0, 5, (len(feat),))
    grads = []
    for levels in (0, 2, 5):  # none, the two finest levels, every level
        model = make_model(checkpoint_levels=levels, shuffle_orders=False).train()
        torch.manual_seed(1)
        F.cross_entropy(model(feat, grid, offsets), labels).backward()
        grads.append([p.grad for p in model.parameters()])
    for checkpointed in grads[1:]:
        for g0, g1 in zip(grads[0], checkpointed):
            torch.testing.assert_close(g1, g0, atol=1e-5, rtol=1e-4)


def test_training_shuffles_the_order_set(make_model, cloud, batch_of):
    """In training each pass draws a new assignment of orders to blocks; fixed when shuffling is off."""
    feat, grid, offsets = batch_of(cloud(1500, 14))

    def two_passes(shuffle):
        model = make_model(drop_path=0.0, shuffle_orders=shuffle).train()
        with torch.no_grad():
            return model(feat, grid, offsets), model(feat, grid, offsets)

    torch.manual_seed(0)
    first, second = two_passes(True)
    assert not torch.allclose(first, second)
    first, second = two_passes(False)
    torch.testing.assert_close(first, second)


def test_mc_switch(make_model, cloud, batch_of):
    """Default inference is deterministic; the MC switch keeps drop-path on so passes differ."""
    model = make_model().eval()
    batch = batch_of(cloud(1000, 15))
    with torch.no_grad():
        ref = model(*batch)
        torch.testing.assert_close(model(*batch), ref, atol=0, rtol=0)
        with stochastic_inference(model):
            assert not model.training
            first, second = model(*batch), model(*batch)
        assert not torch.allclose(first, second)
        torch.testing.assert_close(model(*batch), ref, atol=0, rtol=0)


def test_mc_passes_use_the_stochastic_norm_statistics_and_restore_the_others(make_model, cloud, batch_of):
    """stochastic_inference swaps in ``stochastic_norm_stats`` (statistics of drop-path on) for its
    passes only; deterministic passes keep the model's own."""
    model = make_model().eval()
    batch = batch_of(cloud(1000, 15))
    own = norm_statistics(model)
    model.stochastic_norm_stats = {name: (mean + 1.0, var * 4.0) for name, (mean, var) in own.items()}
    with torch.no_grad():
        ref = model(*batch)
        with stochastic_inference(model):
            inside = norm_statistics(model)
        for name, (mean, var) in model.stochastic_norm_stats.items():
            torch.testing.assert_close(inside[name][0], mean)
            torch.testing.assert_close(inside[name][1], var)
        for name, (mean, var) in norm_statistics(model).items():
            assert torch.equal(mean, own[name][0]) and torch.equal(var, own[name][1])
        torch.testing.assert_close(model(*batch), ref, atol=0, rtol=0)


def test_stochastic_norm_statistics_move_and_cast_with_the_model(make_model):
    """``.to()`` and casts reach ``stochastic_norm_stats`` as they reach the BatchNorm buffers, so a
    model loaded on the CPU and moved to a GPU swaps statistics on its own device."""
    model = make_model()
    model.stochastic_norm_stats = norm_statistics(model)
    model.double()
    for name, (mean, var) in model.stochastic_norm_stats.items():
        assert mean.dtype == var.dtype == dict(model.named_modules())[name].running_mean.dtype == torch.float64


def test_cloud_too_large_for_the_code_names_the_limit(make_model, cloud, batch_of):
    feat, grid, offsets = batch_of(cloud(200, 16))
    grid[0, 0] = 1 << 16
    with pytest.raises(ValueError, match="2\\^16"):
        make_model().eval()(feat, grid, offsets)


def test_bad_offsets_are_rejected(make_model, cloud):
    feat, grid = cloud(100, 17)
    with pytest.raises(ValueError, match="offsets"):
        make_model()(feat, grid, torch.tensor([60, 50]))


@pytest.mark.parametrize(
    "device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu,
                                                  pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")])]
)
def test_bf16_autocast(make_model, cloud, batch_of, device):
    """Training step and inference under bf16 autocast (sparse convs kept in fp16/fp32 at inference)."""
    model = make_model().to(device)
    feat, grid, offsets = (t.to(device) for t in batch_of(cloud(1500, 18), cloud(200, 19)))
    labels = torch.randint(0, 5, (len(feat),), device=device)
    with torch.no_grad():
        ref = model.eval()(feat, grid, offsets)
    with torch.autocast(device, dtype=torch.bfloat16):
        out = model.eval()(feat, grid, offsets)
        loss = F.cross_entropy(model.train()(feat, grid, offsets).float(), labels)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None for p in model.parameters())
    assert (out.float() - ref).abs().mean() < 0.02 * ref.abs().mean()


def test_inference_path_gives_the_forward_values(make_model, cloud, batch_of, monkeypatch):
    """Without autograd, blocks update the residual stream in place and run the MLP in slices of points
    and the attention in groups of patches: the logits of the graph-building forward (so no skip was
    overwritten), for one sample and for a batch with samples smaller than a patch."""
    from scalept.model import blocks

    model = make_model().eval()
    for batch in (batch_of(cloud(1200, 20), cloud(300, 21)), batch_of(cloud(900, 24), cloud(60, 25), cloud(40, 26))):
        with torch.enable_grad():
            ref = model(*batch).detach()
        monkeypatch.setattr(blocks, "INFERENCE_ROWS", 97)  # groups, and a last short one, at every level
        with torch.no_grad():
            torch.testing.assert_close(model(*batch), ref, atol=1e-5, rtol=1e-5)
        monkeypatch.undo()


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no GPU")
def test_weights_cast_for_inference_give_the_same_logits(make_model, cloud, batch_of):
    """Linear weights held in bf16 and sparse-conv weights in fp16 compute what autocast computed from fp32."""
    from scalept.model import cast_for_inference, inference_autocast

    model = make_model().cuda().eval()
    batch = [t.cuda() for t in batch_of(cloud(1500, 22), cloud(400, 23))]
    with torch.no_grad(), inference_autocast("cuda"):
        ref = model(*batch).float()
        fp32_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
        cast_for_inference(model, "cuda", amp=True)
        out = model(*batch).float()
    assert sum(p.numel() * p.element_size() for p in model.parameters()) < 0.6 * fp32_bytes
    torch.testing.assert_close(out, ref, atol=0, rtol=0)
