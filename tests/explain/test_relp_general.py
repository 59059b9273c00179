"""Relevance patching (RelP) on models that are not LRP chains: the hook path equals the chain path
on chains, equals hand-written references of the transformer rules (identity, LN, AH, half), leaves
forward values unchanged, is exact on linear residual networks; errors."""

import logging
import math
from contextlib import ExitStack

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from gradkit.explain import patching
from gradkit.explain._common import HookSet
from gradkit.explain.lrp import Epsilon
from gradkit.explain.patching import activation_patching, attribution_patching, identity_rule, relevance_patching

D = torch.float64


def logit_diff(out):
    return out[:, 0] - out[:, 1]


def randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=D)


def hook_path(model, layer, clean, corrupt, metric, rules=None, batch_size=64):
    """RelP forced through the hook path (the chain path is taken for chains otherwise)."""
    return patching._relp_hooks(model, layer, clean, corrupt, metric, patching._check_rules(rules), batch_size, False)


def secant(z, fz):
    return torch.where(z != 0, fz / torch.where(z != 0, z, torch.ones_like(z)), torch.zeros_like(z))


# ------------------------------------------------------------------------- chains: both paths agree
@pytest.mark.parametrize("act", [nn.GELU, nn.Tanh, nn.SiLU, nn.ELU, nn.LeakyReLU, nn.ReLU])
def test_hook_path_equals_chain_path_on_mlps(act):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(10, 16), act(), nn.Linear(16, 16), act(), nn.Linear(16, 5)).to(D)
    clean, corrupt = randn(7, 10, seed=1), randn(7, 10, seed=2)
    for layer in model:
        chain = relevance_patching(model, layer, clean, corrupt, logit_diff, batch_size=3)
        assert chain.abs().max() > 1e-3
        torch.testing.assert_close(hook_path(model, layer, clean, corrupt, logit_diff, batch_size=4), chain, rtol=0, atol=1e-12)


@pytest.mark.parametrize("act", [nn.Sigmoid, nn.Hardsigmoid, nn.Softplus, nn.Mish, nn.Hardswish, nn.Softsign,
                                 nn.SELU, nn.CELU, nn.Hardtanh])
def test_identity_rule_of_other_activations_equals_the_secant(act):
    """Activations with no chain rule take the identity rule on the hook path: f(z) passed on as
    z * (f(z)/z) with the ratio held constant (0 at z = 0; Sigmoid and Hardsigmoid are not 0 there)."""
    torch.manual_seed(4)
    model = nn.Sequential(nn.Linear(6, 8), act(), nn.Linear(8, 3)).to(D)
    clean, corrupt = randn(5, 6, seed=3), randn(5, 6, seed=4)
    with torch.no_grad():
        clean[0, :] = 0.0  # some pre-activations at exactly 0 (first layer's bias zeroed too)
        model[0].bias[:4] = 0.0

    def reference(model, x, name):
        z = model[0](x)
        if name == "0":
            z = z.detach().requires_grad_(True)
        out = model[2](z * secant(z, model[1](z)).detach())
        return logit_diff(out), z

    got = relevance_patching(model, model[0], clean, corrupt, logit_diff)
    torch.testing.assert_close(got, _relp_reference(reference, model, "0", clean, corrupt), rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("inplace", [False, True])
def test_hook_path_equals_chain_path_on_a_cnn(inplace):
    torch.manual_seed(3)
    model = nn.Sequential(
        nn.Conv2d(2, 4, 3, padding=1), nn.BatchNorm2d(4), nn.ReLU(inplace=inplace), nn.MaxPool2d(2),
        nn.Conv2d(4, 3, 3, padding=1), nn.GELU(), nn.AvgPool2d(1), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.3),
        nn.Linear(12, 6), nn.Tanh(), nn.Linear(6, 4),
    ).to(D).eval()
    bn = model[1]
    with torch.no_grad():
        bn.running_mean.normal_()
        bn.running_var.uniform_(0.5, 2.0)
        bn.weight.normal_()
        bn.bias.normal_()
    clean, corrupt = randn(5, 2, 6, 6, seed=4), randn(5, 2, 6, 6, seed=5)
    for i in (1, 2, 3, 4, 5, 7, 8, 10, 11):
        chain = relevance_patching(model, model[i], clean, corrupt, 1)
        got = hook_path(model, model[i], clean, corrupt, 1, batch_size=2)
        torch.testing.assert_close(got, chain, rtol=0, atol=1e-12)
    # the hook path also patches the convolution folded with its BatchNorm, which the chain cannot
    assert hook_path(model, model[0], clean, corrupt, 1).shape == (5, 4, 6, 6)


# ------------------------------------------------------------------ transformers: hand references
class Tiny(nn.Module):
    """Linear embedding, one nn.TransformerEncoderLayer (functional GELU), a linear head."""

    def __init__(self, norm_first, mask, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(3, 8)
        self.block = nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, activation="gelu", batch_first=True,
                                                norm_first=norm_first)
        self.head = nn.Linear(8, 4)
        self.mask = mask
        with torch.no_grad():  # non-trivial norms and peaked attention
            for norm in (self.block.norm1, self.block.norm2):
                norm.weight.normal_(1.0, 0.5)
                norm.bias.normal_(0.0, 0.5)
            self.block.self_attn.in_proj_weight.mul_(3.0)
        self.to(D).eval()

    def masks(self, x):
        """(attn_mask, key_padding_mask, is_causal); the padding depends on each example's input."""
        if self.mask == "causal":
            return nn.Transformer.generate_square_subsequent_mask(x.shape[1], dtype=x.dtype), None, True
        pad = x[:, :, 0] > 0.8
        pad[:, 0] = False
        return None, pad, False

    def forward(self, x):
        attn_mask, pad, causal = self.masks(x)
        h = self.block(self.embed(x), src_mask=attn_mask, src_key_padding_mask=pad, is_causal=causal)
        return self.head(h[:, -1] if causal else h.mean(1))


def _tap(store, name):
    """Make the activation called ``name`` a leaf whose gradient the reference takes."""

    def tap(key, z):
        if key == name:
            z = z.detach().requires_grad_(True)
            store.append(z)
        return z

    return tap


def _ln(z, m):  # LN-rule: σ constant
    mu = z.mean(-1, keepdim=True)
    sd = torch.sqrt(((z - mu) ** 2).mean(-1, keepdim=True) + m.eps).detach()
    return (z - mu) / sd * m.weight + m.bias


def _tiny_reference(model, x, name):
    """The metric of ``Tiny`` written out with the LN-, AH- and identity rules, and the tapped activation."""
    store = []
    t = _tap(store, name)
    blk, attn = model.block, model.block.self_attn
    attn_mask, pad, causal = model.masks(x)

    def sa(z):
        return t("attn", _attention(z))

    def _attention(z):
        b, n, e = z.shape
        h, d = attn.num_heads, e // attn.num_heads
        qkv = F.linear(z, attn.in_proj_weight, attn.in_proj_bias).split(e, -1)
        q, k, v = (u.reshape(b, n, h, d).transpose(1, 2) for u in qkv)
        s = q @ k.transpose(-1, -2) / math.sqrt(d)
        if attn_mask is not None:
            s = s + attn_mask
        if pad is not None:
            s = s.masked_fill(pad[:, None, None, :], float("-inf"))
        p = torch.softmax(s, -1).detach()  # AH-rule
        return F.linear((p @ v).transpose(1, 2).reshape(b, n, e), attn.out_proj.weight, attn.out_proj.bias)

    def ff(z):
        z = t("linear1", blk.linear1(z))
        return blk.linear2(z * secant(z, F.gelu(z)).detach())  # identity rule

    h = t("embed", model.embed(x))
    if blk.norm_first:
        h = h + sa(t("norm1", _ln(h, blk.norm1)))
        h = h + ff(_ln(h, blk.norm2))
    else:
        h = t("norm1", _ln(h + sa(h), blk.norm1))
        h = _ln(h + ff(h), blk.norm2)
    return logit_diff(model.head(h[:, -1] if causal else h.mean(1))), store[0]


def _relp_reference(reference, model, name, clean, corrupt):
    value, a = reference(model, corrupt, name)
    (g,) = torch.autograd.grad(value.sum(), a, allow_unused=True)  # unused: only through constants (keys)
    g = torch.zeros_like(a) if g is None else g
    return (reference(model, clean, name)[1] - a).detach() * g


@pytest.mark.parametrize("norm_first", [False, True])
@pytest.mark.parametrize("mask", ["padding", "causal"])
def test_transformer_encoder_layer_equals_hand_written_rules(norm_first, mask):
    model = Tiny(norm_first, mask, seed=int(norm_first) + 2 * (mask == "causal"))
    clean, corrupt = randn(6, 5, 3, seed=10), randn(6, 5, 3, seed=11)
    for name in ("embed", "norm1", "linear1"):
        layer = model.embed if name == "embed" else getattr(model.block, name)
        expected = _relp_reference(_tiny_reference, model, name, clean, corrupt)
        assert expected.abs().max() > 1e-3
        got = relevance_patching(model, layer, clean, corrupt, logit_diff, batch_size=4)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)


@pytest.mark.parametrize("mask", ["padding", "causal"])
def test_patching_the_attention_output(mask):
    """``nn.MultiheadAttention`` returns ``(output, weights)``: the three patching functions patch
    its output.  RelP equals the hand-written rules; activation patching equals the exact effect of
    replacing one element, computed with a hook on the module; attribution patching is the plain
    gradient (first order: close to RelP on this attention-output layer, not equal)."""
    model = Tiny(False, mask, seed=7)
    attn = model.block.self_attn
    clean, corrupt = randn(4, 5, 3, seed=14), randn(4, 5, 3, seed=15)
    expected = _relp_reference(_tiny_reference, model, "attn", clean, corrupt)
    got = relevance_patching(model, attn, clean, corrupt, logit_diff, batch_size=3)
    assert got.shape == (4, 5, 8) and expected.abs().max() > 1e-3
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    exact = activation_patching(model, attn, clean, corrupt, logit_diff, batch_size=64)
    with torch.no_grad():
        a_clean = []
        h = attn.register_forward_hook(lambda m, args, out: a_clean.append(out[0].clone()))
        model(clean)
        h.remove()
        base = logit_diff(model(corrupt))
        for b, t, e in [(0, 0, 0), (1, 4, 7), (3, 2, 5)]:
            def swap(m, args, out, b=b, t=t, e=e):
                first = out[0].clone()
                first[b, t, e] = a_clean[0][b, t, e]
                return (first, out[1])

            h = attn.register_forward_hook(swap)
            effect = logit_diff(model(corrupt))[b] - base[b]
            h.remove()
            torch.testing.assert_close(exact[b, t, e], effect, rtol=1e-12, atol=1e-14)
    atp = attribution_patching(model, attn, clean, corrupt, logit_diff)
    assert atp.shape == (4, 5, 8) and float((atp - got).abs().max()) > 1e-6


def test_patching_a_sequence_first_layer_is_refused():
    """A layer whose output does not hold the examples along its first dimension is refused."""
    model = Block(seed=5)
    with pytest.raises(ValueError, match="first dimension"):
        relevance_patching(model, model.attn, randn(3, 5, 3, seed=1), randn(3, 5, 3, seed=2), logit_diff)


class Block(nn.Module):
    """A hand-assembled pre-norm block: RMSNorm, cross-stream MultiheadAttention (sequence first, no
    bias, bias_kv, zero attention, kdim/vdim, boolean causal mask), a GLU-SiLU MLP, residuals."""

    def __init__(self, seed=0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Linear(3, 8)
        self.norm = nn.RMSNorm(8, eps=1e-5)
        self.kv, self.vv = nn.Linear(8, 5), nn.Linear(8, 6)
        self.attn = nn.MultiheadAttention(8, 2, bias=False, add_bias_kv=True, add_zero_attn=True, kdim=5, vdim=6)
        self.up, self.glu, self.act, self.down = nn.Linear(8, 12), nn.GLU(), nn.SiLU(), nn.Linear(6, 8)
        self.head = nn.Linear(8, 4)
        with torch.no_grad():
            self.norm.weight.normal_(1.0, 0.5)
            self.attn.q_proj_weight.mul_(3.0)
        self.to(D).eval()

    def forward(self, x):
        h = self.embed(x)
        z = self.norm(h)
        mask = torch.ones(z.shape[1], z.shape[1], dtype=torch.bool).triu(1)
        a, _ = self.attn(*(u.transpose(0, 1) for u in (z, self.kv(z), self.vv(z))), attn_mask=mask)  # (T, B, E)
        h = h + a.transpose(0, 1)
        h = h + self.down(self.act(self.glu(self.up(h))))
        return self.head(h[:, -1])


def _block_reference(model, x, name):
    store = []
    t = _tap(store, name)
    m = model.attn
    h = t("embed", model.embed(x))
    z = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + model.norm.eps).detach() * model.norm.weight  # LN-rule
    b, n, e = z.shape
    heads, d = m.num_heads, e // m.num_heads
    q = F.linear(z, m.q_proj_weight).transpose(0, 1)
    k = torch.cat([F.linear(t("kv", model.kv(z)), m.k_proj_weight).transpose(0, 1), m.bias_k.expand(1, b, e)])
    v = torch.cat([F.linear(t("vv", model.vv(z)), m.v_proj_weight).transpose(0, 1), m.bias_v.expand(1, b, e)])
    q, k, v = (u.reshape(u.shape[0], b, heads, d).permute(1, 2, 0, 3) for u in (q, k, v))
    k, v = (torch.cat([u, u.new_zeros(b, heads, 1, d)], 2) for u in (k, v))  # add_zero_attn
    mask = F.pad(torch.ones(n, n, dtype=torch.bool).triu(1), (0, 2))
    p = torch.softmax((q @ k.transpose(-1, -2) / math.sqrt(d)).masked_fill(mask, float("-inf")), -1).detach()  # AH-rule
    a = F.linear((p @ v).permute(2, 0, 1, 3).reshape(n, b, e), m.out_proj.weight)
    h = h + a.transpose(0, 1)
    u = t("up", model.up(h))
    ua, ub = u.chunk(2, -1)
    y = ua * torch.sigmoid(ub)
    g = ua * (torch.sigmoid(ub) / 2).detach() + ub * secant(ub, y / 2).detach()  # half-rule
    g = t("glu", g)
    s = g * secant(g, F.silu(g)).detach()  # identity rule
    h = h + model.down(s)
    return logit_diff(model.head(h[:, -1])), store[0]


def test_hand_assembled_block_equals_hand_written_rules():
    model = Block(seed=5)
    clean, corrupt = randn(6, 5, 3, seed=12), randn(6, 5, 3, seed=13)
    layers = {"embed": model.embed, "kv": model.kv, "vv": model.vv, "up": model.up, "glu": model.glu}
    for name, layer in layers.items():
        expected = _relp_reference(_block_reference, model, name, clean, corrupt)
        got = relevance_patching(model, layer, clean, corrupt, logit_diff, batch_size=4)
        torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
        if name == "kv":  # AH-rule: nothing flows through the keys
            assert torch.equal(got, torch.zeros_like(got))
            assert attribution_patching(model, layer, clean, corrupt, logit_diff).abs().max() > 1e-3
        else:
            assert expected.abs().max() > 1e-3


@pytest.mark.parametrize("affine", [False, True])
def test_norm_rules_with_and_without_affine_parameters(affine):
    """LN-rule of ``nn.LayerNorm`` and ``nn.RMSNorm`` with and without ``elementwise_affine``
    (``RMSNorm`` with ``eps=None``: torch's ``finfo(dtype).eps``), against the written-out rules."""
    torch.manual_seed(8)
    ln, rms = nn.LayerNorm(6, elementwise_affine=affine), nn.RMSNorm(6, eps=None, elementwise_affine=affine)
    model = nn.Sequential(nn.Linear(4, 6), ln, nn.Linear(6, 6), rms, nn.Linear(6, 2)).to(D)
    if affine:  # not the initial ones and zeros
        with torch.no_grad():
            for p in (ln.weight, ln.bias, rms.weight):
                p.copy_(torch.randn_like(p))
    clean, corrupt = randn(5, 4, seed=16), randn(5, 4, seed=17)

    def reference(model, x, name):
        a = model[0](x).detach().requires_grad_(True)
        mu = a.mean(-1, keepdim=True)
        h = (a - mu) / torch.sqrt(((a - mu) ** 2).mean(-1, keepdim=True) + ln.eps).detach()
        h = h * ln.weight + ln.bias if affine else h
        h = model[2](h)
        h = h / torch.sqrt(h.pow(2).mean(-1, keepdim=True) + torch.finfo(D).eps).detach()
        h = h * rms.weight if affine else h
        return logit_diff(model[4](h)), a

    expected = _relp_reference(reference, model, "0", clean, corrupt)
    assert expected.abs().max() > 1e-3
    got = relevance_patching(model, model[0], clean, corrupt, logit_diff, batch_size=2)
    torch.testing.assert_close(got, expected, rtol=1e-9, atol=1e-12)
    # the rules differ from the plain gradient (σ and rms are held constant)
    assert float((attribution_patching(model, model[0], clean, corrupt, logit_diff) - got).abs().max()) > 1e-4


def test_glu_half_rule_splits_relevance_equally():
    """With clean inputs 0 and no biases the patching effect at a layer is −R = −a ⊙ c: the GLU's
    relevance R_y goes half to the value half a, half to the gate half b, element by element."""
    torch.manual_seed(6)
    model = nn.Sequential(nn.Linear(4, 6, bias=False), nn.GLU(), nn.Identity(), nn.Tanh(), nn.Linear(3, 2, bias=False)).to(D)
    corrupt = randn(5, 4, seed=14)
    clean = torch.zeros_like(corrupt)
    r_in = -relevance_patching(model, model[0], clean, corrupt, logit_diff)
    r_out = -relevance_patching(model, model[2], clean, corrupt, logit_diff)
    assert r_out.abs().min() > 1e-6
    torch.testing.assert_close(r_in[:, :3], r_out / 2, rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(r_in[:, 3:], r_out / 2, rtol=1e-10, atol=1e-14)


# ------------------------------------------------------------------------- hooks and forward values
def test_forward_values_unchanged_and_hooks_removed(caplog):
    for model in (Tiny(True, "padding"), Tiny(False, "causal"), Block()):
        x = randn(4, 5, 3, seed=15)
        expected = model(x)
        with HookSet() as hooks, ExitStack() as restore:
            patching._install_rules(model, hooks, restore, {})
            assert len(hooks) > 0
            got = model(x.clone().requires_grad_(True))  # grad enabled: the linearisations are built
        assert torch.equal(got, expected)
        assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.modules())
    assert Tiny(True, "padding").block.activation is F.gelu

    class Boom(Tiny):
        def forward(self, x):
            super().forward(x)
            raise RuntimeError("boom")

    boom = Boom(True, "padding")
    with pytest.raises(RuntimeError, match="boom"):
        relevance_patching(boom, boom.embed, randn(2, 5, 3, seed=1), randn(2, 5, 3, seed=2), logit_diff)
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in boom.modules())
    assert boom.block.activation is F.gelu
    assert all(p.grad is None for p in boom.parameters())

    # the rules are logged; an unknown leaf module is warned about
    model = nn.Sequential(Tiny(False, "padding"), nn.Softmax(-1))
    with caplog.at_level(logging.INFO, logger="gradkit"):
        relevance_patching(model, model[0].embed, randn(2, 5, 3, seed=1), randn(2, 5, 3, seed=2), logit_diff)
    text = caplog.text
    for line in ("0.block.self_attn (MultiheadAttention): AH-rule", "0.block.norm2 (LayerNorm): LN-rule",
                 "0.block.activation (gelu): identity rule", "no LRP rule for 1 (Softmax)"):
        assert line in text


def test_attention_hook_fires_inside_transformer_encoder_layer_in_eval_mode():
    """The fused fast path of nn.TransformerEncoderLayer would skip self_attn; with the hooks (and
    grad) it is not taken: a user rule wrapping the built-in AH-rule is called, with grad enabled."""
    model = Tiny(True, "padding")
    clean, corrupt = randn(3, 5, 3, seed=16), randn(3, 5, 3, seed=17)
    calls = []

    def spy(module, args, kwargs, output):
        calls.append(torch.is_grad_enabled())
        return patching._attention_rule(module, args, kwargs, output)

    got = relevance_patching(model, model.embed, clean, corrupt, logit_diff, rules={nn.MultiheadAttention: spy}, batch_size=2)
    assert calls == [True, True]
    torch.testing.assert_close(got, relevance_patching(model, model.embed, clean, corrupt, logit_diff), rtol=0, atol=0)
    # a user rule for an element-wise module type replaces the built-in identity rule: one that
    # keeps the output (the plain gradient) turns RelP into attribution patching
    mlp = nn.Sequential(nn.Linear(10, 6), nn.Softplus(), nn.Linear(6, 3)).to(D)
    c, k = randn(4, 10, seed=1), randn(4, 10, seed=2)
    kept = []

    def plain(module, args, kwargs, output):
        kept.append(module)
        return output

    got = relevance_patching(mlp, mlp[0], c, k, 0, rules={nn.Softplus: plain})
    assert kept and all(m is mlp[1] for m in kept)
    torch.testing.assert_close(got, attribution_patching(mlp, mlp[0], c, k, 0), rtol=1e-12, atol=1e-14)
    assert not torch.allclose(got, relevance_patching(mlp, mlp[0], c, k, 0), rtol=1e-3, atol=0)


# --------------------------------------------------------------------------- defining properties
class LinearResidual(nn.Module):
    def __init__(self):
        super().__init__()
        torch.manual_seed(7)
        self.inp, self.a, self.b, self.out = nn.Linear(6, 5), nn.Linear(5, 5), nn.Linear(5, 5), nn.Linear(5, 3)
        self.to(D)

    def forward(self, x):
        h = self.inp(x)
        h = h + self.a(h)
        h = h + 0.5 * self.b(h) - h.mean(-1, keepdim=True)
        return self.out(h)


def test_linear_residual_network_relp_equals_attribution_equals_activation_patching():
    model = LinearResidual()
    clean, corrupt = randn(4, 6, seed=18), randn(4, 6, seed=19)
    metric = lambda out: out[:, 0] - 2 * out[:, 2]
    for layer in (model.inp, model.a, model.b):
        exact = activation_patching(model, layer, clean, corrupt, metric, batch_size=7)
        assert exact.abs().max() > 1e-2
        torch.testing.assert_close(attribution_patching(model, layer, clean, corrupt, metric), exact, rtol=1e-10, atol=1e-13)
        torch.testing.assert_close(relevance_patching(model, layer, clean, corrupt, metric), exact, rtol=1e-10, atol=1e-13)


def _pearson(a, b):
    a, b = a.flatten() - a.mean(), b.flatten() - b.mean()
    return float(a @ b / (a.norm() * b.norm()))


def test_relp_differs_from_attribution_patching_and_tracks_activation_patching():
    """On the small transformer RelP is not attribution patching: the rules act.  The paper's claim,
    RelP closer to activation patching than attribution patching, was measured here (Pearson
    correlation over all elements, 10 seeds, 8 pairs each, both norm placements, padding masks):

    * patching the MLP pre-activation ``linear1`` (GELU and LayerNorm downstream): RelP 0.873 vs
      0.859 on average, RelP at least as good in 9/10 seeds (causal masks: 8/10);
    * patching the embedding, upstream of the (peaked) attention: RelP 0.689 vs 0.790, better in
      only 2/10 seeds (causal 3/10; with 3× smaller query/key weights 6/10, 0.894 vs 0.900).  The
      AH-rule drops the query/key path, which matters when patching moves the attention pattern.

    So the claim holds here for the MLP activation and not upstream of attention; this test asserts
    the former (measured first, not tuned) and that both estimates correlate with the truth."""
    wins, r_relp, r_atp = 0, [], []
    for seed in range(10):
        model = Tiny(seed % 2 == 0, "padding", seed=seed)
        clean, corrupt = randn(8, 5, 3, seed=100 + seed), randn(8, 5, 3, seed=200 + seed)
        for layer in (model.embed, model.block.linear1):
            exact = activation_patching(model, layer, clean, corrupt, logit_diff, batch_size=512)
            atp = attribution_patching(model, layer, clean, corrupt, logit_diff)
            relp = relevance_patching(model, layer, clean, corrupt, logit_diff)
            assert (relp - atp).abs().max() > 1e-2 * atp.abs().max()
            if layer is model.block.linear1:
                r_relp.append(_pearson(relp, exact))
                r_atp.append(_pearson(atp, exact))
                wins += r_relp[-1] >= r_atp[-1]
            else:
                assert min(_pearson(relp, exact), _pearson(atp, exact)) > 0.2
    assert wins >= 8
    assert sum(r_relp) >= sum(r_atp)
    assert min(r_relp) > 0.6


# ------------------------------------------------------------------------------------------ errors
def test_errors():
    model = Tiny(True, "padding")
    clean, corrupt = randn(2, 5, 3, seed=1), randn(2, 5, 3, seed=2)
    for rule in ("epsilon", Epsilon(0.1), "composite", {nn.Linear: "zero"}):
        with pytest.raises(ValueError, match="LRP-0 on linear layers only"):
            relevance_patching(model, model.embed, clean, corrupt, logit_diff, rule)
    chain = nn.Sequential(nn.Linear(10, 4), nn.GELU(), nn.Linear(4, 2)).to(D)
    c, k = randn(2, 10, seed=1), randn(2, 10, seed=2)
    assert relevance_patching(chain, chain[0], c, k, logit_diff, "epsilon").shape == (2, 4)  # chains take any rule
    with pytest.raises(ValueError, match="rules is given"):
        relevance_patching(chain, chain[0], c, k, logit_diff, "epsilon", rules={nn.GELU: identity_rule})
    with pytest.raises(TypeError, match="rules keys must be nn.Module subclasses"):
        relevance_patching(chain, chain[0], c, k, logit_diff, rules={chain[1]: identity_rule})
    with pytest.raises(TypeError, match="rules keys"):
        relevance_patching(chain, chain[0], c, k, logit_diff, rules={"GELU": identity_rule})
    with pytest.raises(TypeError, match=r"rules\[GELU\] must be callable"):
        relevance_patching(chain, chain[0], c, k, logit_diff, rules={nn.GELU: "identity"})
    with pytest.raises(TypeError, match="rules must be a dict"):
        relevance_patching(chain, chain[0], c, k, logit_diff, rules=[identity_rule])
    with pytest.raises(ValueError, match="not a submodule"):
        relevance_patching(model, nn.Linear(3, 8), clean, corrupt, logit_diff)
    # a user rule must return the module's value (a rule for the wrong function is caught)
    with pytest.raises(ValueError, match="differ from the module's output"):
        relevance_patching(chain, chain[0], c, k, logit_diff, rules={nn.GELU: lambda m, a, kw, out: a[0]})
    with pytest.raises(ValueError, match="shaped like the module's output"):
        relevance_patching(chain, chain[0], c, k, logit_diff, rules={nn.GELU: lambda m, a, kw, out: out[:1]})
    inplace = nn.Sequential(nn.Linear(10, 4), nn.ELU(inplace=True), nn.Linear(4, 2), nn.Softmax(-1)).to(D)
    with pytest.raises(ValueError, match="in place"):
        relevance_patching(inplace, inplace[0], c, k, 0)
    assert not any(m._forward_hooks for m in inplace.modules())
    with pytest.raises(TypeError, match="needs an nn.Module model"):
        relevance_patching(lambda x: chain(x), chain[0], c, k, logit_diff)
