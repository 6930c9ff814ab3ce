"""muon.py against the references: its AdamW groups step as torch.optim.AdamW, its Muon groups as torch.optim.Muon
(which orthogonalizes in bf16, so within bf16's error), its orthogonalization near the SVD's U V^T, and its state
round trip exact."""
import io

import pytest
import torch

from muon import MuonAdamW, is_hidden_matrix, orthogonalize


def params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.nn.Parameter(torch.randn(*s, generator=g)) for s in [(48, 80), (80, 48), (32, 32)]]


def run(opt, ps, steps, seed=1):
    """`steps` steps on fixed random gradients; the parameters after each."""
    g = torch.Generator().manual_seed(seed)
    grads = [[torch.randn(p.shape, generator=g) for p in ps] for _ in range(steps)]
    out = []
    for gs in grads:
        for p, gr in zip(ps, gs):
            p.grad = gr.clone()
        opt.step()
        out.append([p.detach().clone() for p in ps])
    return out


@pytest.mark.parametrize("shape", [(48, 80), (80, 48)])
def test_orthogonalize_is_near_the_svd_polar_factor(shape):
    """Keller Jordan's 5 steps leave the singular values in about 0.7-1.2 (not 1: the quintic trades accuracy for
    speed) and the matrix pointing where U V^T does. (A random square matrix has a singular value near 0, which 5
    steps do not lift: rectangular ones here.)"""
    g = torch.randn(*shape, generator=torch.Generator().manual_seed(0))
    o = orthogonalize(g)
    s = torch.linalg.svdvals(o)
    assert o.shape == g.shape and s.min() > 0.6 and s.max() < 1.25, s
    u, _, vt = torch.linalg.svd(g, full_matrices=False)
    cos = torch.nn.functional.cosine_similarity(o.flatten(), (u @ vt).flatten(), dim=0)
    assert cos > 0.95, cos


def test_adamw_groups_step_as_torch_adamw():
    ours, ref = params(), params()
    kw = dict(lr=1e-2, betas=(0.9, 0.95), weight_decay=0.1)
    a = run(MuonAdamW(ours, **kw), ours, 5)
    b = run(torch.optim.AdamW(ref, **kw), ref, 5)
    for step_a, step_b in zip(a, b):
        for x, y in zip(step_a, step_b):
            torch.testing.assert_close(x, y, rtol=0, atol=1e-6)


@pytest.mark.skipif(not hasattr(torch.optim, "Muon"), reason="torch.optim.Muon arrived in torch 2.9")
def test_muon_groups_step_as_torch_muon():
    """Every step's update against torch.optim.Muon's (Nesterov momentum 0.95, Moonshot's scale, decoupled weight
    decay): the same direction and size to within bf16's rounding; a wrong momentum, scale or decay fails it."""
    ours, ref = params(), params()
    start = [p.detach().clone() for p in ours]
    a = run(MuonAdamW([{"params": ours, "muon": True}], lr=1e-2, weight_decay=0.1), ours, 4)
    b = run(torch.optim.Muon(ref, lr=1e-2, weight_decay=0.1, adjust_lr_fn="match_rms_adamw"), ref, 4)
    for prev_a, prev_b, step_a, step_b in zip([start] + a, [start] + b, a, b):
        for pa, pb, x, y in zip(prev_a, prev_b, step_a, step_b):
            da, db = x - pa, y - pb
            assert torch.nn.functional.cosine_similarity(da.flatten(), db.flatten(), dim=0) > 0.995
            assert da.norm() / db.norm() == pytest.approx(1, abs=0.02)
    for x, y in zip(a[-1], b[-1]):
        torch.testing.assert_close(x, y, rtol=0, atol=2e-3)


def test_a_muon_group_of_vectors_is_refused():
    with pytest.raises(ValueError, match="2-D"):
        MuonAdamW([{"params": [torch.nn.Parameter(torch.zeros(8))], "muon": True}])


def test_hidden_matrices_are_the_layers_and_filters_not_embeddings_or_head():
    assert is_hidden_matrix("visual.blocks.0.attn.qkv.weight", torch.zeros(3, 2))
    assert is_hidden_matrix("language_model.model.layers.1.mlp.down_proj.weight", torch.zeros(3, 2))
    assert is_hidden_matrix("visual.patch_embed.proj.weight", torch.zeros(2, 3, 2, 4, 4))
    for name, shape in [("language_model.model.embed_tokens.weight", (5, 2)), ("language_model.lm_head.weight", (5, 2)),
                        ("visual.pos_embed.weight", (4, 2)), ("visual.blocks.0.norm1.weight", (2,))]:
        assert not is_hidden_matrix(name, torch.zeros(shape)), name


@pytest.mark.parametrize("out", [8, 128])  # fewer rows than columns, and more (orthogonalized transposed)
def test_filters_step_as_their_matrix(out):
    """A convolution's (out, in, t, h, w) filters take the step of the (out, in*t*h*w) matrix they are."""
    conv = [torch.nn.Parameter(torch.randn(out, 3, 2, 4, 4, generator=torch.Generator().manual_seed(0)))]
    start = conv[0].detach().flatten(1).clone()
    flat = [torch.nn.Parameter(start.clone())]
    a = run(MuonAdamW([{"params": conv, "muon": True}], lr=1e-2, weight_decay=0.1), conv, 3)
    b = run(MuonAdamW([{"params": flat, "muon": True}], lr=1e-2, weight_decay=0.1), flat, 3)
    assert (a[0][0].flatten(1) - start).abs().max() > 1e-3  # it stepped
    for x, y in zip(a, b):
        torch.testing.assert_close(x[0].flatten(1), y[0], rtol=0, atol=0)


def test_matrices_of_one_shape_step_as_each_alone():
    """A group's matrices of one shape are orthogonalized as a stack: each takes the step it takes in a group of its
    own (the stack's norms and products per matrix, not across them)."""
    shapes = [(48, 80), (48, 80), (80, 48), (80, 48), (32, 32)]
    g = torch.Generator().manual_seed(0)
    start = [torch.randn(*s, generator=g) * (i + 1) for i, s in enumerate(shapes)]  # norms apart: each its own
    together = [torch.nn.Parameter(x.clone()) for x in start]
    alone = [torch.nn.Parameter(x.clone()) for x in start]
    a = run(MuonAdamW([{"params": together, "muon": True}], lr=1e-2, weight_decay=0.1), together, 3)
    b = run(MuonAdamW([{"params": [p], "muon": True} for p in alone], lr=1e-2, weight_decay=0.1), alone, 3)
    for step_a, step_b in zip(a, b):
        for x, y in zip(step_a, step_b):
            torch.testing.assert_close(x, y)


def test_state_round_trip_is_exact():
    """What train.py's checkpoint carries, optimizer.state_dict() through torch.save, continues the run exactly."""
    ps = params()
    groups = lambda ps: [{"params": ps[:2], "muon": True}, {"params": ps[2:]}]  # noqa: E731
    opt = MuonAdamW(groups(ps), lr=1e-2, weight_decay=0.1)
    run(opt, ps, 3)
    f = io.BytesIO()
    torch.save({"optimizer": opt.state_dict(), "weights": [p.detach().clone() for p in ps]}, f)
    want = run(opt, ps, 3, seed=2)
    f.seek(0)
    state = torch.load(f, weights_only=False)
    again = [torch.nn.Parameter(w) for w in state["weights"]]
    opt2 = MuonAdamW(groups(again), lr=1e-2, weight_decay=0.1)
    opt2.load_state_dict(state["optimizer"])
    for x, y in zip(want[-1], run(opt2, again, 3, seed=2)[-1]):
        assert torch.equal(x, y)
