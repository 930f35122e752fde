"""ktm.py: KTM structure and zero init, the fused forward against the formula, exact equality of a
fresh generalist with its main expert (EVA and MetaNet), gradient isolation of the auxiliary
experts, learning KTMs, and C-D -> C-D-S extension keeping every existing module bit-identical."""
import pytest
import torch
import torch.nn as nn

import eva
import ktm
import metanet


class TinyNet(nn.Module):
    """Stand-in backbone: 4 conv+BN levels at strides 4, 8, 16, 32 with the inject hook.
    `reached` records which levels the last forward computed."""

    def __init__(self, channels=(8, 12, 16, 20)):
        super().__init__()
        self.level_channels, self.level_strides = list(channels), [4, 8, 16, 32]
        self.num_features, self.img_size = channels[-1], 64
        # a 4x4 stride-4 patchify stem, then one 3x3 stride-2 conv per level
        convs = [nn.Conv2d(3, channels[0], 4, 4)] + [nn.Conv2d(ci, co, 3, 2, padding=1)
                                                     for ci, co in zip(channels[:-1], channels[1:])]
        self.stages = nn.ModuleList([nn.Sequential(c, nn.BatchNorm2d(c.out_channels), nn.ReLU()) for c in convs])
        self.reached = []

    def block_list(self):
        return list(self.stages)

    def forward_levels(self, x, inject=None):
        levels, self.reached = [], []
        for k, stage in enumerate(self.stages):
            x = stage(x)
            self.reached.append(k)
            if inject is not None:
                x = inject(k, x)
            levels.append(x)
        return levels, x.mean((2, 3))


def make(arch, seed):
    torch.manual_seed(seed)
    if arch == "tiny":
        return TinyNet()
    if arch == "eva_demo":
        return eva.build("eva_demo")
    return metanet.build(arch)


def randomise_ktms(g: ktm.Generalist, seed: int):
    """Give every KTM BN a non-zero affine and running statistics, so the transfer is non-zero."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in g.ktms.modules():
            if isinstance(m, nn.BatchNorm2d):
                m.weight.copy_(torch.randn(m.weight.shape, generator=gen))
                m.bias.copy_(torch.randn(m.bias.shape, generator=gen))
                m.running_mean.copy_(torch.randn(m.running_mean.shape, generator=gen) * 1e-3)
                m.running_var.copy_(torch.rand(m.running_var.shape, generator=gen) * 1e-4 + 1e-5)


def images(seed, n=2):
    return torch.rand(n, 3, 64, 64, generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- structure and init

def test_transfer_structure_and_zero_init():
    chans, strides = [16, 24, 32, 48], [4, 8, 16, 32]
    for k in ktm.KTM_LEVELS:
        m = ktm.KTM(k, chans, strides, chans, strides)
        assert len(m.paths) == k + 1
        for j, path in enumerate(m.paths):
            convs = [l for l in path if isinstance(l, nn.Conv2d)]
            bns = [l for l in path if isinstance(l, nn.BatchNorm2d)]
            relus = [l for l in path if isinstance(l, nn.ReLU)]
            n = k - j                                   # one stride-2 conv per octave
            if n == 0:
                assert [c.kernel_size for c in convs] == [(1, 1)] and convs[0].stride == (1, 1)
            else:
                assert all(c.kernel_size == (3, 3) and c.stride == (2, 2) for c in convs) and len(convs) == n
                assert [c.out_channels for c in convs] == [chans[j]] * (n - 1) + [chans[k]]
            assert len(bns) == len(convs) and len(relus) == max(n - 1, 0)
            assert isinstance(path[-1], nn.BatchNorm2d)       # no ReLU at the end
            assert all(c.bias is None for c in convs)
            for bn in bns:
                assert bn.weight.eq(0).all() and bn.bias.eq(0).all()
        w = torch.cat([c.weight.flatten() for c in m.modules() if isinstance(c, nn.Conv2d)])
        assert 0.7e-3 < w.std().item() < 1.3e-3 and abs(w.mean().item()) < 3e-4
        feats = [torch.randn(2, c, 64 // s, 64 // s) for c, s in zip(chans, strides)]
        out = m(feats)
        assert out.shape == (2, chans[k], 64 // strides[k], 64 // strides[k]) and out.eq(0).all()
    # zero_init="last": only the last BN of a path is zero -- still an exact zero output
    m = ktm.KTM(2, chans, strides, chans, strides, zero_init="last")
    bns = [l for l in m.paths[0] if isinstance(l, nn.BatchNorm2d)]
    assert bns[0].weight.eq(1).all() and bns[-1].weight.eq(0).all()
    assert m([torch.randn(2, c, 64 // s, 64 // s) for c, s in zip(chans, strides)]).eq(0).all()
    with pytest.raises(ValueError, match="zero_init"):
        ktm.KTM(0, chans, strides, chans, strides, zero_init="none")
    # equal strides (ViT): every path is a single Conv1x1 + BN
    m = ktm.KTM(2, [32] * 4, [8] * 4, [32] * 4, [8] * 4)
    assert all(len(p) == 2 and p[0].kernel_size == (1, 1) for p in m.paths)
    with pytest.raises(ValueError, match="power of 2"):
        ktm.transfer(8, 8, 8, 4)                  # would need up-sampling
    with pytest.raises(ValueError, match="power of 2"):
        ktm.transfer(8, 8, 4, 12)


# ----------------------------------------------------------------------------- forward semantics

@pytest.mark.parametrize("arch", ["eva_demo", "metanet_demo"])
def test_fresh_generalist_equals_main_exactly(arch):
    main, aux_d, aux_s = make(arch, 0), make(arch, 1), make(arch, 2)
    main.eval()
    x = images(0)
    with torch.no_grad():
        ref_levels, ref_pooled = main.forward_levels(x)
        g = ktm.Generalist(main, {"det": aux_d, "seg": aux_s}, main_name="cls").eval()
        levels, pooled = g.forward_levels(x)
        # sanity: the auxiliary streams differ from the main one, so the equality is not trivial
        assert not torch.equal(aux_d.forward_levels(x)[1], ref_pooled)
    assert all(torch.equal(a, b) for a, b in zip(levels, ref_levels))
    assert torch.equal(pooled, ref_pooled) and torch.equal(g(x), ref_pooled)
    assert g.level_channels == main.level_channels and g.level_strides == main.level_strides
    assert g.num_features == main.num_features and g.img_size == main.img_size
    assert g.block_list() == main.block_list()


@pytest.mark.parametrize("arch", ["tiny", "metanet_demo", "eva_demo"])
def test_fused_levels_follow_the_formula(arch):
    # G_k <- G_k + sum_aux sum_{j<=k} T_{j->k}(E_j) for k = 0, 1, 2, recomputed by hand from
    # full forwards of the auxiliary experts
    main, aux = make(arch, 0).eval(), {"det": make(arch, 1).eval(), "seg": make(arch, 2).eval()}
    x = images(1)
    with torch.no_grad():
        feats = {n: a.forward_levels(x)[0] for n, a in aux.items()}
        plain = main.forward_levels(x)[0]
        g = ktm.Generalist(main, aux).eval()
        randomise_ktms(g, 3)

        def by_hand(k, fmap):
            if k == 3:
                return fmap
            for n in ("det", "seg"):
                for j in range(k + 1):
                    fmap = fmap + g.ktms[n][k].paths[j](feats[n][j])
            return fmap

        want_levels, want_pooled = main.forward_levels(x, inject=by_hand)
        levels, pooled = g.forward_levels(x)
    for k in range(4):
        assert torch.allclose(levels[k], want_levels[k], rtol=1e-5, atol=1e-5)
        assert not torch.allclose(levels[k], plain[k], atol=1e-3)   # the transfer is really there
    assert torch.allclose(pooled, want_pooled, rtol=1e-5, atol=1e-5)


def test_aux_streams_stop_after_the_last_ktm_level():
    main, aux = make("tiny", 0), make("tiny", 1)
    g = ktm.Generalist(main, {"det": aux}).eval()
    g(images(2))
    assert aux.reached == [0, 1, 2] and main.reached == [0, 1, 2, 3]


def test_caller_inject_runs_after_the_transfer():
    main, aux = make("tiny", 0), make("tiny", 1)
    g = ktm.Generalist(main, {"det": aux}).eval()
    randomise_ktms(g, 4)
    x = images(3)
    seen = {}

    def double(k, fmap):
        seen[k] = fmap.clone()
        return 2 * fmap

    with torch.no_grad():
        fused = g.forward_levels(x)[0]
        levels = g.forward_levels(x, inject=double)[0]
    assert torch.allclose(seen[0], fused[0], rtol=1e-5, atol=1e-5)        # sees the fused level
    assert torch.allclose(levels[0], 2 * fused[0], rtol=1e-5, atol=1e-5)  # its result replaces it


# ----------------------------------------------------------------------------- training behaviour

@pytest.mark.parametrize("arch,zero_init", [("tiny", "all"), ("metanet_demo", "all"), ("tiny", "last")])
def test_no_gradient_to_aux_and_ktms_learn(arch, zero_init):
    main, aux = make(arch, 0), make(arch, 1)
    g = ktm.Generalist(main, {"det": aux}, zero_init=zero_init).train()
    assert g.ktms.training and not aux.training and not main.training
    trainable = [p for p in g.parameters() if p.requires_grad]
    assert {id(p) for p in trainable} == {id(p) for p in g.ktms.parameters()}
    aux.requires_grad_(True)       # even if someone re-enables them, nothing may reach them
    x = images(4)
    main_before = {k: v.clone() for k, v in main.state_dict().items()}
    aux_before = {k: v.clone() for k, v in aux.state_dict().items()}
    with torch.no_grad():
        g.eval()
        out_before = g(x)
        g.train()
    levels, pooled = g.forward_levels(x)
    # random weights: a loss whose gradient is constant per channel would give BN (in train mode,
    # zero-mean outputs) an exactly zero gamma gradient
    gen = torch.Generator().manual_seed(9)
    loss = (pooled * torch.randn(pooled.shape, generator=gen)).sum()
    loss = loss + sum((l * torch.randn(l.shape, generator=gen)).mean() for l in levels)
    loss.backward()
    assert all(p.grad is None for p in aux.parameters())
    assert all(p.grad is None for p in main.parameters())          # frozen main stream
    for k_mod in g.ktms["det"]:
        for j, path in enumerate(k_mod.paths):
            last = path[-1]
            assert last.bias.grad.abs().sum() > 0
            if zero_init == "all" and k_mod.k - j >= 2:
                # the released init's dead path: its first hop is ReLU(0) = 0 with no gradient,
                # so the last BN normalises zeros and only its bias can learn
                assert last.weight.grad.eq(0).all() and path[0].weight.grad.eq(0).all()
            else:
                assert last.weight.grad.abs().sum() > 0
    opt = torch.optim.SGD(trainable, lr=0.1)
    opt.step()
    g.eval()
    with torch.no_grad():
        out_after = g(x)
    assert not torch.allclose(out_after, out_before)
    for k, v in main.state_dict().items():
        assert torch.equal(v, main_before[k]), k                   # incl. BN running statistics
    for k, v in aux.state_dict().items():
        assert torch.equal(v, aux_before[k]), k


def test_train_main_unfreezes_the_main_stream():
    main, aux = make("tiny", 0), make("tiny", 1)
    g = ktm.Generalist(main, {"det": aux}, train_main=True).train()
    assert main.training and not aux.training
    g(images(5)).sum().backward()
    assert all(p.grad is not None for p in main.parameters())
    assert all(p.grad is None for p in aux.parameters())
    assert g.config() == {"main": "main", "aux": ["det"], "train_main": True, "zero_init": "all",
                          "ktm_levels": [0, 1, 2]}


@pytest.mark.parametrize("arch", ["tiny", "metanet_demo"])
def test_add_expert_keeps_existing_modules(arch):
    # C-D -> C-D-S: train the C-D KTMs a little first so "untouched" is not "still zero"
    g = ktm.Generalist(make(arch, 0), {"det": make(arch, 1)}, main_name="cls")
    g.train()
    torch.optim.SGD(g.ktms.parameters(), lr=0.1).zero_grad()
    g(images(6)).pow(2).sum().backward()
    torch.optim.SGD(g.ktms.parameters(), lr=0.1).step()
    g.eval()
    x = images(7)
    with torch.no_grad():
        out_cd = g(x)
    before = {k: v.clone() for k, v in g.state_dict().items()}
    g.add_expert("seg", make(arch, 2))
    after = g.state_dict()
    for k, v in before.items():
        assert torch.equal(after[k], v), k
    new = set(after) - set(before)
    assert new and all(k.startswith(("aux.seg.", "ktms.seg.")) for k in new)
    assert any(k.startswith("ktms.seg.") for k in new)
    assert list(g.ktms) == ["det", "seg"] and len(g.ktms["seg"]) == len(ktm.KTM_LEVELS)
    assert not g.aux["seg"].training and all(not p.requires_grad for p in g.aux["seg"].parameters())
    with torch.no_grad():
        assert torch.equal(g(x), out_cd)              # the new KTM set starts at exactly zero
    with pytest.raises(ValueError, match="must be new"):
        g.add_expert("det", make(arch, 3))
    assert g.config()["aux"] == ["det", "seg"]


def test_config_rebuilds_from_a_checkpoint():
    g = ktm.Generalist(make("tiny", 0), {"det": make("tiny", 1), "seg": make("tiny", 2)}, main_name="cls")
    randomise_ktms(g, 5)
    g.eval()
    state, cfg = g.state_dict(), g.config()
    rebuilt = ktm.Generalist(make("tiny", 10), {n: make("tiny", 11 + i) for i, n in enumerate(cfg["aux"])},
                             train_main=cfg["train_main"], main_name=cfg["main"])
    rebuilt.load_state_dict(state, strict=True)
    rebuilt.eval()
    x = images(8)
    with torch.no_grad():
        assert torch.equal(rebuilt(x), g(x))
