"""Tests of the model (plastic.py): every mechanism against a reference computed independently
(an explicit formula, a loop, or torch.autograd), in float64. Grade one part with e.g. `pytest -m hebbian`."""

import math
from types import SimpleNamespace

import pytest
import torch

import memory
import plastic
from plastic import (RULES, AppendRow, Block, CausalSelfAttention, Config, FactoredRead, InnerGradient, KVCache,
                     PlasticGPT, PlasticLinear, TokenLinears, factored_read, update_norm)

PLASTIC_RULES = RULES[1:]  # the rules with fast weights: one added to plastic.RULES is tested by every test over them


def tiny_model(rule, seed=0, **overrides):
    """A float64 model small enough for the CPU: 2 blocks, d_model 16."""
    torch.manual_seed(seed)
    options = dict(d_in=3, d_out=2, n_layer=2, n_head=2, d_model=16, max_len=128, rule=rule)
    options.update(overrides)
    return PlasticGPT(Config(**options)).double()


def random_tokens(B=3, T=8, d=3, seed=1):
    return torch.randn(B, T, d, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def random_images(B=3, T=8, shape=(1, 16, 16), seed=2):
    return torch.rand(B, T, *shape, dtype=torch.float64, generator=torch.Generator().manual_seed(seed))


def record_calls(module, store):
    """Append (inputs, output) of every call of `module` to `store`; returns the hook handle."""
    return module.register_forward_hook(lambda mod, inputs, output: store.append((inputs, output)))


# ------------------------------------------------------------------------------------------- model


@pytest.mark.model
@pytest.mark.parametrize("rule, eta, rate", [("hebbian", None, 1.0), ("gradient", None, 0.1), ("gradient", 0.5, 0.5)])
def test_base_rate_is_the_rules_own_unless_given(rule, eta, rate):
    """eta None means the rule's own (Hebbian 1, gradient 0.1: README, "What makes the fast weights work");
    with modulation off, eta_t is the base rate itself at every token."""
    model = tiny_model(rule, eta=eta, modulation=False)
    info = model(random_tokens(), fast_norm=False)[1]
    assert torch.allclose(info["eta"], torch.full_like(info["eta"], rate)), \
        f"{rule}, eta={eta}: eta_t should be {rate} at every token without modulation, got {info['eta'].unique().tolist()}"


@pytest.mark.model
def test_a_rule_being_added_is_refused_until_it_has_its_defaults_and_its_update(monkeypatch):
    """A name added to RULES alone must not train as another rule or with eta 0 (switched off): Config names the
    defaults it lacks, and the model the update it lacks (README, "Adding a rule")."""
    monkeypatch.setattr(plastic, "RULES", RULES + ("oja",))
    with pytest.raises(ValueError, match="rule 'oja' needs its base rate in RULE_ETA and its initial sign of A in RULE_COEF_INIT"):
        Config(rule="oja")
    monkeypatch.setitem(plastic.RULE_ETA, "oja", 1.0)
    monkeypatch.setitem(plastic.RULE_COEF_INIT, "oja", "positive")
    assert Config(rule="oja").base_rate() == 1.0, "the base rate is the one RULE_ETA gives the new rule"
    with pytest.raises(NotImplementedError, match="rule 'oja' has no update in PlasticGPT._update_fast_weights"):
        tiny_model("oja")(random_tokens(), fast_norm=False)


@pytest.mark.model
@pytest.mark.parametrize("rule", RULES)
def test_output_shapes(rule):
    model = tiny_model(rule)
    out, info = model(random_tokens(B=3, T=8))
    assert out.shape == (3, 8, 2), f"out should be (B, T, d_out) = (3, 8, 2), got {tuple(out.shape)}"
    for key in ("eta", "step", "update_norm", "fast_norm"):
        assert info[key].shape == (3, 8), f"info[{key!r}] should be (B, T) = (3, 8), got {tuple(info[key].shape)}"
    if rule == "none":
        assert torch.all(info["eta"] == 0), "the static model has no plasticity rate: info['eta'] must be zeros"
    else:
        assert torch.all(info["eta"] > 0), "a plastic model's modulated rate eta_t must be positive"
        assert [tuple(f.shape) for f in info["fast_weights"]] == [(3, 16, 64), (3, 64, 16)] * 2, \
            "one fast weight (B, in, out) per plastic layer: fc (16 -> 64) and proj (64 -> 16) in each block"


@pytest.mark.encoder
@pytest.mark.parametrize("rule", RULES)
def test_image_model_shapes(rule):
    model = tiny_model(rule, d_in=5, d_out=5, image_shape=(1, 16, 16))
    out, info = model(random_tokens(B=2, T=6, d=5), random_images(B=2, T=6))
    assert out.shape == (2, 6, 5), f"image model out should be (B, T, d_out) = (2, 6, 5), got {tuple(out.shape)}"
    assert info["eta"].shape == (2, 6), f"info['eta'] should be (B, T), got {tuple(info['eta'].shape)}"


@pytest.mark.encoder
@pytest.mark.parametrize("image_norm", [True, False])
def test_image_features_are_centred_and_scaled_to_unit_length(image_norm):
    """The token is [image features, x]: with image_norm the features are layer-normalised (no learned
    scale) and divided by sqrt(features), so each token's features have mean 0 and length 1, as the one-hot
    label beside them has; without it they are Conv4's output as it is. x passes unchanged either way."""
    model = tiny_model("hebbian", d_in=5, d_out=5, image_shape=(1, 16, 16), image_norm=image_norm)  # train mode: features of O(1)
    x, images = random_tokens(B=2, T=6, d=5), random_images(B=2, T=6)
    calls = []
    record_calls(model.embed, calls)
    model(x, images)
    token = calls[0][0][0]  # (B, T, features + d_in), the embedding's input
    raw = model.encoder(images.flatten(0, 1)).view(2, 6, -1)  # (B, T, features)
    n = raw.size(-1)
    expected = (raw - raw.mean(-1, keepdim=True)) / raw.std(-1, correction=0, keepdim=True) / n ** 0.5 if image_norm else raw
    assert torch.allclose(token[..., :n], expected, atol=1e-4), f"image_norm={image_norm}: the image part of the token is not what it promises"
    assert torch.equal(token[..., n:], x), "the non-image inputs (labels) must reach the embedding unchanged"
    if image_norm:
        lengths = torch.linalg.vector_norm(token[..., :n], dim=-1)
        assert torch.allclose(lengths, torch.ones_like(lengths), atol=1e-4), f"image features should have length 1, got {lengths.flatten()[:3]}"


@pytest.mark.encoder
def test_conv4_feature_sizes():
    from plastic import Conv4
    for shape, features in (((1, 28, 28), 64), ((3, 32, 32), 256)):
        encoder = Conv4(shape[0])
        got = encoder(torch.rand(4, *shape)).shape
        assert got == (4, features) == (4, Conv4.out_features(shape)), \
            f"Conv4 on {shape} should give (N, {features}) features, got {tuple(got)}"


@pytest.mark.encoder
def test_conv4_block_widths_are_the_given_ones_and_one_width_means_it_in_every_block():
    """encoder_widths sets each block's channels, R2D2-style (the last block's channels x 2 x 2 features
    on 32x32 images); encoder_channels=c builds the encoder of widths (c, c, c, c), parameter for parameter."""
    from plastic import Conv4
    wide = Config(image_shape=(3, 32, 32), encoder_widths=(8, 16, 24, 32))
    encoder = PlasticGPT(wide).encoder
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    assert [(c.in_channels, c.out_channels) for c in convs] == [(3, 8), (8, 16), (16, 24), (24, 32)], \
        f"the blocks should map 3 -> 8 -> 16 -> 24 -> 32 channels, got {[(c.in_channels, c.out_channels) for c in convs]}"
    shape = encoder(torch.rand(2, 3, 32, 32)).shape
    assert shape == (2, 32 * 2 * 2) == (2, Conv4.out_features((3, 32, 32), (8, 16, 24, 32))), \
        f"32 channels on a 2x2 map should give 128 features per image, got {tuple(shape)}"
    same = lambda model: {k: v.shape for k, v in model.state_dict().items()}
    one = PlasticGPT(Config(image_shape=(1, 28, 28), encoder_channels=12))
    four = PlasticGPT(Config(image_shape=(1, 28, 28), encoder_widths=(12, 12, 12, 12)))
    assert same(one) == same(four), "encoder_channels=12 should build the model of encoder_widths 12 12 12 12"


@pytest.mark.encoder
def test_conv4_computes_conv_batchnorm_relu_maxpool_in_each_block():
    """Each Conv4 block is 3x3 convolution (padding 1), batch norm, ReLU, 2x2 max pool, in that order: the encoder's
    output equals those four operations written out with its own parameters, in training mode (batch statistics)
    and in eval mode (running statistics, after one training pass has moved them)."""
    from plastic import Conv4
    torch.manual_seed(0)
    encoder = Conv4(2, (3, 4, 5, 6)).double()
    images = torch.randn(5, 2, 16, 16, dtype=torch.float64, generator=torch.Generator().manual_seed(4)) + 0.3
    convs = [m for m in encoder.modules() if isinstance(m, torch.nn.Conv2d)]
    norms = [m for m in encoder.modules() if isinstance(m, torch.nn.BatchNorm2d)]
    assert len(convs) == len(norms) == 4, f"expected 4 convolutions and 4 batch norms, got {len(convs)} and {len(norms)}"

    def reference(z, training):
        for conv, bn in zip(convs, norms):
            z = torch.nn.functional.conv2d(z, conv.weight, conv.bias, padding=1)
            if training:
                mean, var = z.mean(dim=(0, 2, 3)), z.var(dim=(0, 2, 3), correction=0)
            else:
                mean, var = bn.running_mean, bn.running_var
            z = (z - mean[:, None, None]) / torch.sqrt(var[:, None, None] + bn.eps) * bn.weight[:, None, None] + bn.bias[:, None, None]
            z = torch.nn.functional.max_pool2d(torch.relu(z), 2)
        return z.flatten(1)
    for training in (True, False):
        encoder.train(training)
        with torch.no_grad():
            want = reference(images, training)  # before the call: in training it moves the running statistics
            got = encoder(images)
        err = (got - want).abs().max().item()
        assert err < 1e-10, f"Conv4 (training={training}) differs from conv -> batch norm -> ReLU -> max pool by {err:.2e}"


@pytest.mark.model
@pytest.mark.parametrize("options, words", [
    (dict(rule="hebbain"), "unknown rule"),
    (dict(d_model=30, n_head=4), "divisible"),
    (dict(plastic_blocks=(7,)), "plastic_blocks"),
    (dict(plastic_blocks=()), "plastic_blocks"),
    (dict(n_layer=4, plastic_blocks=(4,)), "plastic_blocks"),  # one past the last block
    (dict(attn_window=0), "attn_window"),
    (dict(n_extra=-1), "n_extra must be 0 or more"),  # the last task unit would also be the modulator
    (dict(decay=0.6), r"decay must lie in \[0, 0.5\]"),  # lambda_t up to 1.2: the fast weights would flip sign
    (dict(decay=1.1, modulation=False), r"decay must lie in \[0, 1.0\]"),
    (dict(coef_init="gaussian"), "coef_init"),
    (dict(image_shape=(3, 32, 32), encoder_widths=(96, 192, 384)), "4 Conv4 blocks"),
    (dict(image_shape=(3, 32, 32), encoder_widths=(96, 192, 384, 0)), "4 Conv4 blocks"),
    (dict(fast_form="sparse"), "fast_form"),
    (dict(init="xavier"), "init must be"),
    (dict(image_shape=(1, 12, 28)), "H, W >= 16"),
    (dict(max_norm=0.0), "max_norm > 0"),
    (dict(n_layer=0), "must be positive"),
    (dict(d_in=0), "must be positive"),
])
def test_invalid_config_is_rejected(options, words):
    with pytest.raises(ValueError, match=words):
        Config(**options)


@pytest.mark.model
@pytest.mark.parametrize("step_by_step", [False, True])
def test_without_positions_queries_do_not_see_the_support_order(step_by_step):
    """positions=False: the outputs of a one-block static model at the last 3 tokens (queries) are the same
    whatever the order of the 5 before them (support), in the parallel pass and the token loop alike, and
    the model has max_len x d_model fewer parameters; with the position embedding they change (it is what
    sees the order). One block: in a second one each support token carries what came before it."""
    x = random_tokens(B=2, T=8)
    shuffled = torch.cat([x[:, [3, 0, 4, 2, 1]], x[:, 5:]], dim=1)
    plain, with_pos = tiny_model("none", positions=False, n_layer=1), tiny_model("none", n_layer=1)
    for model, order_free in ((plain, True), (with_pos, False)):
        model.eval()
        out, _ = model(x, step_by_step=step_by_step)
        out_shuffled, _ = model(shuffled, step_by_step=step_by_step)
        same = torch.allclose(out[:, 5:], out_shuffled[:, 5:], atol=1e-12)
        assert same == order_free, f"positions={model.config.positions}: the queries' outputs should " \
            f"{'not ' if order_free else ''}depend on the support order"
    assert with_pos.num_params() - plain.num_params() == 128 * 16, "the position embedding is max_len x d_model"


@pytest.mark.model
def test_sequence_longer_than_max_len_is_rejected():
    model = tiny_model("hebbian", max_len=4)
    with pytest.raises(ValueError, match="max_len"):
        model(random_tokens(T=5))


@pytest.mark.model
@pytest.mark.parametrize("rule", ["none", "hebbian"])
def test_a_sequence_of_max_len_tokens_and_a_context_of_all_of_them_are_accepted(rule):
    """The bounds are inclusive: T = max_len tokens run, and context = T (every token a context token, no query)
    computes what no context does."""
    model = tiny_model(rule, max_len=6)
    x = random_tokens(T=6)
    plain = model(x)[0]
    err = (model(x, context=6)[0] - plain).abs().max().item()
    assert err < 1e-12, f"{rule}: context = T (no queries) should change nothing, moved the outputs by {err:.2e}"


@pytest.mark.model
def test_config_defaults_are_the_documented_ones():
    """The defaults DESIGN.md and the README state: decay 0.1, max_norm 1, n_extra 4, modulation on, attention over the
    whole sequence, every block plastic, the rule's own eta and A (checked in their own tests)."""
    cfg = Config()
    got = dict(decay=cfg.decay, max_norm=cfg.max_norm, n_extra=cfg.n_extra, modulation=cfg.modulation,
               attn_window=cfg.attn_window, plastic_blocks=cfg.plastic_blocks, eta=cfg.eta, coef_init=cfg.coef_init)
    want = dict(decay=0.1, max_norm=1.0, n_extra=4, modulation=True, attn_window=None, plastic_blocks=None, eta=None, coef_init=None)
    assert got == want, f"Config's defaults changed: {({k: v for k, v in got.items() if want[k] != v})} (documented: {want})"


@pytest.mark.model
@pytest.mark.parametrize("rule, modulation, units", [("none", True, 2), ("hebbian", True, 2 + 1), ("hebbian", False, 2),
                                                      ("gradient", True, 2 + 4 + 1), ("gradient", False, 2 + 4)])
def test_head_has_task_extra_and_modulator_units(rule, modulation, units):
    """The head has d_out task units, n_extra (4) extra units under the gradient rule only (they feed its inner
    loss, nothing else), and one modulator unit m_t, last, when a plastic rule is modulated."""
    model = tiny_model(rule, modulation=modulation)
    assert model.head.out_features == units, f"{rule}, modulation={modulation}: the head should have {units} units, got {model.head.out_features}"


@pytest.mark.model
@pytest.mark.parametrize("rule", PLASTIC_RULES)
@pytest.mark.parametrize("plastic_blocks, plastic", [(None, [True, True, True]), ((1,), [False, True, False]),
                                                      ((2, 0), [True, False, True])])
def test_plastic_blocks_makes_exactly_those_blocks_plastic(rule, plastic_blocks, plastic):
    """plastic_blocks names the blocks whose MLPs have fast weights and a coefficient A, and no others: the plastic
    layers are those blocks' fc and proj, in block order, and one fast weight is returned for each."""
    model = tiny_model(rule, n_layer=3, plastic_blocks=plastic_blocks)
    got = [block.plastic for block in model.blocks]
    assert got == plastic, f"{rule}, plastic_blocks={plastic_blocks}: blocks should be plastic as {plastic}, got {got}"
    for i, block in enumerate(model.blocks):
        has_coef = [layer.coef is not None for layer in (block.mlp.fc, block.mlp.proj)]
        assert has_coef == [plastic[i]] * 2, f"{rule}, plastic_blocks={plastic_blocks}: block {i} should {'' if plastic[i] else 'not '}own A"
    want = [layer for block, p in zip(model.blocks, plastic) if p for layer in (block.mlp.fc, block.mlp.proj)]
    assert model.plastic_layers == want, f"{rule}, plastic_blocks={plastic_blocks}: plastic_layers are not the named blocks' fc and proj"
    info = model(random_tokens(T=5))[1]
    assert len(info["fast_weights"]) == 2 * sum(plastic), f"{rule}: one fast weight per plastic layer, got {len(info['fast_weights'])}"


@pytest.mark.model
@pytest.mark.parametrize("rule, coef_init, low, high", [
    ("hebbian", None, 0.0, 1.0), ("gradient", None, -1.0, 0.0),            # each rule's own default
    ("hebbian", "negative", -1.0, 0.0), ("hebbian", "symmetric", -1.0, 1.0),
    ("gradient", "positive", 0.0, 1.0), ("gradient", "symmetric", -1.0, 1.0),
])
def test_coefficient_init_draws_from_the_promised_interval(rule, coef_init, low, high):
    """A ~ U[low, high]: the rule's own sign by default (Hebbian positive, gradient negative), else as asked.
    Checked by the range and by the mean and standard deviation of a uniform distribution, (low + high) / 2
    and (high - low) / sqrt(12), within 5 standard errors; "symmetric" must then have both signs."""
    model = tiny_model(rule, coef_init=coef_init, d_model=32)
    coef = torch.cat([layer.coef.detach().flatten() for layer in model.plastic_layers])
    name = coef_init or "the default"
    assert low <= coef.min() and coef.max() <= high, f"{rule}, {name}: A must lie in [{low}, {high}], got [{coef.min():.3f}, {coef.max():.3f}]"
    mean, std, n = (low + high) / 2, (high - low) / 12 ** 0.5, coef.numel()
    assert abs(coef.mean() - mean) < 5 * std / n ** 0.5, f"{rule}, {name}: mean of A is {coef.mean():.4f}, not {mean} as U[{low}, {high}] gives"
    assert abs(coef.std() - std) < 0.02 * (high - low), f"{rule}, {name}: std of A is {coef.std():.4f}, not {std:.4f} as U[{low}, {high}] gives"
    if low < 0 < high:
        assert coef.min() < 0 < coef.max(), f"{rule}, {name}: A ~ U[{low}, {high}] must have both signs"


@pytest.mark.model
@pytest.mark.parametrize("rule", RULES)
def test_torch_initialisation_has_pytorch_default_standard_deviations(rule):
    """init="torch": every linear layer as nn.Linear initialises itself, weight and bias U(-1/sqrt(in), 1/sqrt(in))
    (std 1/sqrt(3 in)), the MLP's own (in, out) weights included; the position embedding N(0, 0.02)."""
    model = tiny_model(rule, d_model=64, n_head=4)
    linears = [(name, m.weight, m.bias, m.weight.shape[1]) for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)]
    linears += [(name, m.weight, m.bias, m.in_features) for name, m in model.named_modules() if isinstance(m, PlasticLinear)]
    assert len(linears) == 1 + 2 * 4 + 1, "expected the embedding, per block qkv, attention projection, fc and proj, and the head"
    for name, weight, bias, fan_in in linears:
        for kind, p in (("weight", weight), ("bias", bias)):
            bound = fan_in ** -0.5
            assert p.abs().max() <= bound, f"{name}.{kind}: values beyond 1/sqrt(in) = {bound:.4f}"
            if p.numel() >= 256:  # enough values for the standard deviation to be checked to 10%
                assert abs(p.std().item() * (3 * fan_in) ** 0.5 - 1) < 0.1, \
                    f"{name}.{kind}: std {p.std():.4f}, expected 1/sqrt(3 in) = {(3 * fan_in) ** -0.5:.4f}"
    pos = model.pos.weight
    assert abs(pos.std().item() / 0.02 - 1) < 0.1, f"position embedding std {pos.std():.4f}, expected 0.02"


@pytest.mark.model
def test_gpt2_initialisation_has_its_standard_deviations():
    """init="gpt2": N(0, 0.02) for every weight matrix, N(0, 0.02 / sqrt(2 n_layer)) for the residual
    projections (attention and MLP), zero biases."""
    n_layer = 2
    model = tiny_model("hebbian", init="gpt2", n_layer=n_layer, d_model=64, n_head=4)
    for name, p in model.named_parameters():
        if name.startswith("encoder") or name.endswith("coef") or "ln_" in name:  # Conv4, A, LayerNorms: their own
            continue
        if name.endswith("bias"):
            assert torch.all(p == 0), f"{name}: GPT-2 initialises biases to zero"
        elif p.dim() == 2:
            expected = 0.02 / (2 * n_layer) ** 0.5 if name.endswith("proj.weight") else 0.02
            assert abs(p.std().item() / expected - 1) < 0.1, f"{name}: std {p.std():.5f}, expected {expected:.5f}"


@pytest.mark.model
@pytest.mark.parametrize("rule, options", [("none", {}), ("hebbian", {}), ("gradient", {}),
                                           ("hebbian", dict(plastic_blocks=(1,))), ("hebbian", dict(modulation=False)),
                                           ("gradient", dict(n_extra=2, modulation=False))],
                         ids=["none", "hebbian", "gradient", "hebbian-block-1", "hebbian-unmodulated", "gradient-2-extra"])
def test_parameter_count_is_the_gpts_plus_a_coefficient_per_plastic_connection(rule, options):
    """num_params (what --match-params matches) counted layer by layer: the GPT (embedding, positions, blocks of
    two LayerNorms, qkv, proj and a 4C MLP, final LayerNorm, head), a coefficient A per connection of each
    plastic MLP layer (twice the MLP's weights), and head units [d_out | n_extra (gradient) | modulator
    (plastic, modulated)], each weighted in the gradient rule's inner loss."""
    d_in, C, n_layer, max_len, d_out = 3, 8, 2, 16, 1
    model = PlasticGPT(Config(d_in=d_in, d_out=d_out, n_layer=n_layer, n_head=2, d_model=C, max_len=max_len,
                              rule=rule, **options))
    cfg = model.config
    block = 2 * 2 * C + (C * 3 * C + 3 * C) + (C * C + C) + (C * 4 * C + 4 * C) + (4 * C * C + C)
    plastic_blocks = 0 if rule == "none" else len(cfg.plastic_blocks or range(n_layer))
    units = d_out + (cfg.n_extra if rule == "gradient" else 0) + (rule != "none" and cfg.modulation)
    want = ((d_in * C + C) + max_len * C + n_layer * block + 2 * C + (units * C + units)
            + plastic_blocks * 2 * (C * 4 * C) + (units if rule == "gradient" else 0))
    assert model.num_params() == want, f"{rule} {options}: {model.num_params()} parameters, the explicit count gives {want}"


@pytest.mark.model
@pytest.mark.parametrize("rule", PLASTIC_RULES)
def test_plasticity_coefficient_is_a_learned_parameter(rule):
    """A is learned by backprop like W: an nn.Parameter of the model that the optimizer sees, not a fixed buffer."""
    model = tiny_model(rule)
    parameters = list(model.parameters())
    for i, layer in enumerate(model.plastic_layers):
        assert isinstance(layer.coef, torch.nn.Parameter) and layer.coef.requires_grad, f"{rule}: A of plastic layer {i} is not a trainable nn.Parameter"
        assert any(p is layer.coef for p in parameters), f"{rule}: A of plastic layer {i} is missing from model.parameters(), so no optimizer updates it"


@pytest.mark.model
@pytest.mark.parametrize("rule", RULES)
def test_batch_elements_are_independent(rule):
    model = tiny_model(rule).eval()
    x = random_tokens(B=4)
    changed = x.clone()
    changed[0] = torch.randn_like(changed[0])
    with torch.no_grad():
        before, _ = model(x)
        after, _ = model(changed)
    assert torch.allclose(before[1:], after[1:], atol=1e-12), \
        f"changing sequence 0 changed the outputs of other sequences ({rule}): batch elements must not interact"


@pytest.mark.model
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("image", [False, True], ids=["vectors", "images"])
def test_gradients_reach_every_parameter(rule, image):
    """Backprop through 100 tokens (10 for images) reaches every trainable parameter, with no NaN."""
    if image:
        model = tiny_model(rule, d_in=5, d_out=5, image_shape=(1, 16, 16))
        out, info = model(random_tokens(B=2, T=10, d=5), random_images(B=2, T=10))
    else:
        model = tiny_model(rule)
        out, info = model(random_tokens(B=2, T=100))
    out.pow(2).mean().backward()
    assert torch.isfinite(out).all() and torch.isfinite(info["fast_norm"]).all(), f"{rule}: NaN or inf in the forward pass"
    for name, p in model.named_parameters():
        assert p.grad is not None and torch.isfinite(p.grad).all(), f"{rule}: gradient of {name} is missing or not finite"
        assert p.grad.abs().sum() > 0, f"{rule}: no gradient reaches {name}"


@pytest.mark.model
@pytest.mark.parametrize("rule, step_by_step", [("none", False), ("none", True), *((r, True) for r in PLASTIC_RULES)],
                         ids=["none-parallel", "none-token-loop", *PLASTIC_RULES])  # plastic rules: the loop only
def test_bfloat16_autocast_keeps_the_token_loop_in_float32(rule, step_by_step):
    """--amp: under bfloat16 autocast the encoder computes in bfloat16 and the token loop in float32 (its
    autograd Functions' backward passes once met bfloat16 gradients and float32 weights and stopped); the
    loss and the gradients stay within bfloat16's precision of float32's. CPU autocast stands in for CUDA's."""
    model = tiny_model(rule, d_in=5, d_out=5, image_shape=(1, 16, 16)).float()
    x, images = random_tokens(B=2, T=10, d=5).float(), random_images(B=2, T=10).float()
    losses, grads, features = [], [], []
    hook = record_calls(model.encoder, features)
    for amp in (False, True):
        model.zero_grad()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=amp):
            out, _ = model(x, images, step_by_step=step_by_step)
        loss = out.float().pow(2).mean()
        loss.backward()
        losses.append(loss.item())
        grads.append(torch.cat([p.grad.flatten() for p in model.parameters()]))
        assert all(p.grad.dtype == torch.float32 and torch.isfinite(p.grad).all() for p in model.parameters()), \
            f"{rule}, amp={amp}: every gradient should be finite float32"
    hook.remove()
    assert features[1][1].dtype == torch.bfloat16, "under autocast the encoder should compute in bfloat16"
    if step_by_step:
        assert out.dtype == torch.float32, f"{rule}: the token loop should compute in float32 under autocast, gave {out.dtype}"
    assert abs(losses[1] - losses[0]) < 0.02 * losses[0], f"{rule}: loss {losses[1]:.5f} under autocast, {losses[0]:.5f} without"
    similarity = torch.nn.functional.cosine_similarity(grads[0], grads[1], dim=0)
    assert similarity > 0.98, f"{rule}: gradients under autocast point elsewhere (cosine {similarity:.4f})"


# --------------------------------------------------------------------------------------- attention


@pytest.mark.attention
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("image", [False, True], ids=["vectors", "images"])
def test_causality(rule, image):
    """Changing the inputs at t >= k leaves every output before k unchanged (image models in eval mode)."""
    k = 4
    if image:
        model = tiny_model(rule, d_in=5, d_out=5, image_shape=(1, 16, 16)).eval()
        x, images = random_tokens(T=8, d=5), random_images(T=8)
    else:
        model, x, images = tiny_model(rule), random_tokens(T=8), None
    x2 = x.clone()
    x2[:, k:] = torch.randn_like(x2[:, k:])
    images2 = None
    if image:
        images2 = images.clone()
        images2[:, k:] = torch.rand_like(images2[:, k:])
    with torch.no_grad():
        before = model(x, images)[0]
        after = model(x2, images2)[0]
    assert torch.allclose(before[:, :k], after[:, :k], atol=1e-12), f"{rule}: an output before t={k} depends on a later input"
    assert not torch.allclose(before[:, k:], after[:, k:]), "the changed inputs should change the later outputs"


@pytest.mark.attention
def test_static_step_by_step_runs_the_blocks_above_the_first_through_the_kv_cache(monkeypatch):
    """forward(step_by_step=True) of the static model takes the token loop: the first block's attention once
    for all tokens (its input has no fast weight, so the plastic rules run it so too), then
    CausalSelfAttention.step once per higher block and token (else the test below would compare the
    parallel pass with itself)."""
    calls = []
    step, parallel = CausalSelfAttention.step, CausalSelfAttention.forward

    def counted_step(self, x, cache, linears):
        calls.append("step")
        return step(self, x, cache, linears)

    def counted_parallel(self, x, context=None):
        calls.append("parallel")
        return parallel(self, x, context)

    monkeypatch.setattr(CausalSelfAttention, "step", counted_step)
    monkeypatch.setattr(CausalSelfAttention, "forward", counted_parallel)
    model = tiny_model("none", n_layer=3)
    model(random_tokens(T=5), step_by_step=True)
    assert calls.count("step") == 2 * 5, f"expected step() for 2 blocks x 5 tokens, got {calls.count('step')} calls"
    assert calls.count("parallel") == 1, f"expected the first block's attention once, in parallel; got {calls.count('parallel')}"


@pytest.mark.attention
@pytest.mark.hebbian
def test_blocks_below_the_first_plastic_block_run_in_parallel(monkeypatch):
    """Only the first plastic block and those above it take the token loop: with plastic_blocks=(2,) of three,
    the static blocks 0 and 1 run once each for all tokens (Block.forward), block 2 attends once for all
    tokens and steps its MLP once per token (Block.step), and no attention runs token by token."""
    model = tiny_model("hebbian", n_layer=3, plastic_blocks=(2,))
    calls = []
    forward, step, attention_step = Block.forward, Block.step, CausalSelfAttention.step

    def index(block):
        return next(i for i, b in enumerate(model.blocks) if b is block)

    def counted_forward(self, h, context=None):
        calls.append(("forward", index(self)))
        return forward(self, h, context)

    def counted_step(self, h, cache, linears, fast=(None, None)):
        calls.append(("step", index(self)))
        return step(self, h, cache, linears, fast)

    def counted_attention_step(self, x, cache, linears):
        calls.append(("attention step", None))
        return attention_step(self, x, cache, linears)

    monkeypatch.setattr(Block, "forward", counted_forward)
    monkeypatch.setattr(Block, "step", counted_step)
    monkeypatch.setattr(CausalSelfAttention, "step", counted_attention_step)
    model(random_tokens(T=5))
    want = [("forward", 0), ("forward", 1)] + [("step", 2)] * 5
    assert calls == want, f"blocks 0 and 1 should run in parallel and only block 2 step, per token; got {calls}"


@pytest.mark.attention
def test_queries_after_a_context_run_at_once(monkeypatch):
    """With a context S only the context goes through the token loop (CausalSelfAttention.step once per
    higher block and context token); the queries, which write nothing, take one CausalSelfAttention.read
    per higher block, all of them at once."""
    calls = []
    step, read = CausalSelfAttention.step, CausalSelfAttention.read

    def counted_step(self, x, cache, linears):
        calls.append("step")
        return step(self, x, cache, linears)

    def counted_read(self, x, cache, context):
        calls.append(("read", x.size(1)))
        return read(self, x, cache, context)

    monkeypatch.setattr(CausalSelfAttention, "step", counted_step)
    monkeypatch.setattr(CausalSelfAttention, "read", counted_read)
    for rule in RULES:
        calls.clear()
        model = tiny_model(rule, n_layer=3)
        model(random_tokens(T=5), step_by_step=True, context=3)
        assert calls.count("step") == 2 * 3, f"{rule}: expected step() for 2 blocks x 3 context tokens, got {calls.count('step')}"
        assert calls.count(("read", 2)) == 2, f"{rule}: expected one read() of the 2 queries per higher block, got {calls}"


@pytest.mark.attention
@pytest.mark.parametrize("context", [None, 4])
def test_step_by_step_equals_parallel(context):
    """For rule 'none', the token loop with a KV cache computes exactly what the parallel pass does, and so do
    the gradients (in the loop, the slow weights' come from TokenLinear's tapes, all tokens at once); with a
    context the cache masks the other queries' keys as the parallel pass's mask does."""
    for window in (None, 1, 2, 3):
        model = tiny_model("none", attn_window=window)
        x = random_tokens(T=12)
        parallel, _ = model(x, context=context)
        looped, _ = model(x, step_by_step=True, context=context)
        err = (parallel - looped).abs().max().item()
        assert err < 1e-12, f"step-by-step differs from parallel by {err:.2e} (attn_window={window}, context={context})"
        grads = [torch.autograd.grad(out.pow(2).sum(), list(model.parameters())) for out in (parallel, looped)]
        for (name, _), a, b in zip(model.named_parameters(), *grads):
            assert torch.allclose(a, b, atol=1e-12), \
                f"gradient of {name}: step-by-step differs from parallel (attn_window={window}, context={context})"


@pytest.mark.attention
@pytest.mark.parametrize("window", [1, 2, 3])
def test_windowed_static_model_is_causal(window):
    """With an attention window too, changing the inputs at t >= k leaves every output before k unchanged, for every k."""
    T = 8
    model = tiny_model("none", attn_window=window)
    x = random_tokens(T=T)
    with torch.no_grad():
        before = model(x)[0]
        for k in range(1, T):
            changed = x.clone()
            changed[:, k:] += 1.0
            moved = (model(changed)[0][:, :k] - before[:, :k]).abs().max().item()
            assert moved < 1e-12, f"window {window}: an output before t={k} moved by {moved:.1e} when later inputs changed"


@pytest.mark.attention
@pytest.mark.model
@pytest.mark.parametrize("path", ["parallel", "step", "read"])
def test_attention_dropout_acts_in_training_only(path):
    """dropout > 0 drops attention weights in training (two draws differ) and in no path in eval (the same
    output as dropout 0): the whole sequence, token by token, and isolated queries read after a context of
    4 tokens. Checked on the attention module alone, so the residual dropout cannot stand in for it."""
    torch.manual_seed(0)
    attn = CausalSelfAttention(Config(d_model=16, n_head=2, dropout=0.5)).double()
    x = random_tokens(B=2, T=6, d=16)

    def run(seed):
        torch.manual_seed(seed)
        if path == "parallel":
            return attn(x)
        cache, linears = KVCache(6, detach=True), TokenLinears([attn.qkv, attn.proj])
        if path == "read":  # the context token by token without dropout, then the queries at once
            training, attn.training = attn.training, False
            for t in range(4):
                attn.step(x[:, t], cache, linears)
            attn.training = training
            return attn.read(x[:, 4:], cache, 4)
        return torch.stack([attn.step(x[:, t], cache, linears) for t in range(6)], 1)
    with torch.no_grad():
        attn.eval()
        plain = run(0)
        attn.dropout = 0.0
        assert torch.allclose(run(1), plain, atol=1e-12), f"{path}: in eval mode dropout must change nothing"
        attn.dropout = 0.5
        attn.train()
        first, second = run(1), run(2)
    assert not torch.allclose(first, second), f"{path}: with dropout 0.5 in training two draws should differ: attention dropout does nothing"


@pytest.mark.attention
def test_window_bounds_what_a_static_model_sees():
    """With window W and L layers the static output at t depends on no input before t - L (W - 1)."""
    W, L, T = 3, 2, 12
    model = tiny_model("none", n_layer=L, attn_window=W)
    x = random_tokens(T=T)
    t = T - 1
    first_seen = t - L * (W - 1)
    for changed_at, should_change in ((first_seen - 1, False), (first_seen, True)):
        x2 = x.clone()
        x2[:, changed_at] += 1.0
        moved = (model(x2)[0][:, t] - model(x)[0][:, t]).abs().max().item()
        if should_change:
            assert moved > 1e-6, f"the input at {changed_at} is inside the receptive field of t={t} but had no effect"
        else:
            assert moved < 1e-12, f"the input at {changed_at} is outside the window's reach of t={t} but moved it by {moved:.1e}"


@pytest.mark.attention
@pytest.mark.parametrize("rule, step_by_step", [("none", False), ("none", True), *((r, False) for r in PLASTIC_RULES)])
def test_isolated_queries_are_answered_as_if_each_were_alone_after_the_context(rule, step_by_step):
    """context=S: every query's output, and every parameter's gradient through the queries' outputs, are
    those of separate sequences of the S context tokens and that one query (plain causal passes, the
    reference); the context tokens' outputs are those of the context alone. Without position
    embeddings, since a query stands at another position in the reference."""
    S, T = 4, 7
    model = tiny_model(rule, positions=False)
    x = random_tokens(B=3, T=T)
    out = model(x, step_by_step=step_by_step, context=S)[0]
    alone = torch.stack([model(x[:, list(range(S)) + [q]], step_by_step=step_by_step)[0][:, -1] for q in range(S, T)], 1)
    context_alone = model(x[:, :S], step_by_step=step_by_step)[0]
    err = (out[:, S:] - alone).abs().max().item()
    assert err < 1e-12, f"{rule}: the queries' outputs differ from each query alone after the context by {err:.2e}"
    err = (out[:, :S] - context_alone).abs().max().item()
    assert err < 1e-12, f"{rule}: the context's outputs differ from the context alone by {err:.2e}"
    weights = torch.randn(alone.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    params = list(model.parameters())
    got = torch.autograd.grad((out[:, S:] * weights).sum(), params, allow_unused=True)
    want = torch.autograd.grad((alone * weights).sum(), params, allow_unused=True)
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        a, b = (torch.zeros(()) if g is None else g for g in (a, b))
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-8), f"{rule}: the gradient of {name} differs from the reference's"


@pytest.mark.attention
@pytest.mark.parametrize("rule", RULES)
@pytest.mark.parametrize("window", [None, 2])
def test_an_isolated_query_sees_no_other_query(rule, window):
    """With position embeddings and an attention window too: replacing every other query leaves a query's
    output as it was; without a context the same change moves the last query (the test can fail)."""
    S, T = 4, 7
    model = tiny_model(rule, attn_window=window)
    x = random_tokens(B=3, T=T)
    with torch.no_grad():
        out = model(x, context=S)[0]
        for q in range(S, T):
            others = [t for t in range(S, T) if t != q]
            changed = x.clone()
            changed[:, others] = random_tokens(B=3, T=len(others), seed=7)
            moved = (model(changed, context=S)[0][:, q] - out[:, q]).abs().max().item()
            assert moved < 1e-12, f"{rule}, window {window}: query {q} moved by {moved:.1e} when the other queries changed"
        changed = x.clone()
        changed[:, T - 2] += 1.0
        moved = (model(changed)[0][:, T - 1] - model(x)[0][:, T - 1]).abs().max().item()
        assert moved > 1e-6, f"setup: without a context the last query should see the one before it ({rule}, window {window})"


@pytest.mark.attention
@pytest.mark.parametrize("rule", PLASTIC_RULES)
def test_isolated_queries_write_no_fast_weight(rule):
    """The fast weights after an episode with a context are those the context alone leaves; a query's
    trace shows its rate eta_t, no step and no update, and the fast weights' norm of the context's end."""
    S, T = 4, 7
    model = tiny_model(rule)
    x = random_tokens(B=3, T=T)
    info = model(x, context=S)[1]
    context_info = model(x[:, :S])[1]
    for i, (got, want) in enumerate(zip(info["fast_weights"], context_info["fast_weights"])):
        err = (got - want).abs().max().item()
        assert err < 1e-12, f"{rule}: fast weight {i} differs from the context's own by {err:.2e}: a query wrote into it"
    assert (info["step"][:, S:] == 0).all() and (info["update_norm"][:, S:] == 0).all(), f"{rule}: a query took a step"
    assert (info["eta"][:, S:] > 0).all(), f"{rule}: a query's trace should show the rate it produces"
    assert torch.equal(info["fast_norm"][:, S:], info["fast_norm"][:, S - 1:S].expand(-1, T - S)), \
        f"{rule}: the fast weights' norm should stay at the context's end through the queries"


@pytest.mark.model
@pytest.mark.parametrize("context", [-1, 0, 9])
def test_a_context_outside_the_sequence_is_rejected(context):
    with pytest.raises(ValueError, match="context"):
        tiny_model("none")(random_tokens(T=8), context=context)


@pytest.mark.attention
@pytest.mark.parametrize("rule", PLASTIC_RULES)
def test_fast_weights_carry_information_beyond_the_window(rule):
    """The same change, beyond the attention's reach, does reach a plastic model through its fast weights."""
    model = tiny_model(rule, attn_window=2, eta=1.0, decay=0.1, max_norm=10.0)
    x = random_tokens(T=12)
    x2 = x.clone()
    x2[:, 0] += 1.0
    with torch.no_grad():
        out, changed, knocked_out = model(x)[0][:, -1], model(x2)[0][:, -1], model(x, eta=0.0)[0][:, -1]
        blocked = (model(x2, eta=0.0)[0][:, -1] - knocked_out).abs().max().item()
    assert blocked < 1e-12, f"setup: without plasticity token 0 should be beyond the attention's reach of t=11, moved it by {blocked:.1e}"
    moved = (changed - out).abs().max().item()
    fast_part = (out - knocked_out).abs().max().item()  # what the fast weights add to the output at t=11
    assert moved > 0.05 * fast_part, \
        f"{rule}: token 0 should reach t=11 through the fast weights, but moves it by {moved:.1e}, against {fast_part:.1e} that they add"


# --------------------------------------------------------------------------------- the rules


@pytest.mark.hebbian
@pytest.mark.gradient
@pytest.mark.parametrize("rule", PLASTIC_RULES)
@pytest.mark.parametrize("plastic_blocks", [None, (1,)], ids=["all-plastic", "top-plastic"])
@pytest.mark.parametrize("window", [None, 1, 2, 3])
def test_zero_rate_equals_static_model(rule, plastic_blocks, window):
    """With eta = 0 a plastic model computes exactly what a static model with the same slow weights does, also
    with an attention window: the KV cache of the token loop keeps what the parallel pass's mask lets through."""
    plastic = tiny_model(rule, eta=0.0, plastic_blocks=plastic_blocks, attn_window=window)
    static = tiny_model("none", attn_window=window)
    slow = {k: v for k, v in plastic.state_dict().items() if k in static.state_dict()}
    slow["head.weight"], slow["head.bias"] = slow["head.weight"][:2], slow["head.bias"][:2]  # the task units
    static.load_state_dict(slow)
    x = random_tokens(T=10)
    err = (plastic(x)[0] - static(x)[0]).abs().max().item()
    assert err < 1e-12, f"{rule} with eta=0 differs from the static model by {err:.2e} (attn_window={window})"


UPDATE_OF = dict(dense="fast_weight_update", factored="decayed_scale and FactoredFastWeight.update")  # F_t+1's code


@pytest.mark.hebbian
@pytest.mark.parametrize("max_norm", [1e-3, 1e3], ids=["bound-active", "bound-inactive"])
@pytest.mark.parametrize("modulation", [True, False], ids=["modulated", "unmodulated"])
@pytest.mark.parametrize("fast_form", ["dense", "factored"])
def test_hebbian_update_matches_outer_product_formula(max_norm, modulation, fast_form):
    """F_{t+1} = (1 - lambda_t) F_t + eta_t A ⊙ (pre_t ⊗ post_t), with eta_t, lambda_t = (eta, decay) * 2 sigmoid(m_t)
    and eta_t shrunk by max_norm / ||G_t|| over both layers; recomputed here one sequence and token at a time."""
    eta, decay, T, B = 0.5, 0.3, 3, 2
    model = tiny_model("hebbian", n_layer=1, eta=eta, decay=decay, max_norm=max_norm, modulation=modulation, fast_form=fast_form)
    mlp = model.blocks[0].mlp
    fc_calls, gelu_calls, proj_calls, ln_f_calls = [], [], [], []  # ln_f: the head's input
    for module, store in ((mlp.fc, fc_calls), (mlp.gelu, gelu_calls), (mlp.proj, proj_calls), (model.ln_f, ln_f_calls)):
        record_calls(module, store)
    out, info = model(random_tokens(B=B, T=T))
    A1, A2 = mlp.fc.coef.detach(), mlp.proj.coef.detach()
    for b in range(B):
        F1, F2 = torch.zeros_like(A1), torch.zeros_like(A2)
        for t in range(T):
            pre1, post1 = fc_calls[t][0][0][b].detach(), gelu_calls[t][1][b].detach()
            pre2, post2 = post1, proj_calls[t][1][b].detach()
            G1, G2 = torch.outer(pre1, post1), torch.outer(pre2, post2)
            gate = 2 * torch.sigmoid(model.head(ln_f_calls[t][1][b])[-1].detach()) if modulation else 1.0
            rate, lam = eta * gate, decay * gate
            norm = torch.sqrt((G1 ** 2).sum() + (G2 ** 2).sum())
            step = rate * min(1.0, max_norm / norm.item())
            F1 = (1 - lam) * F1 + step * A1 * G1
            F2 = (1 - lam) * F2 + step * A2 * G2
            got = info["eta"][b, t].item()
            assert math.isclose(got, rate, rel_tol=1e-9), \
                f"eta_t at b={b} t={t} is {got:.6g}, want {'eta * 2 sigmoid(m_t)' if modulation else 'eta'} = {rate:.6g}"
            got = info["step"][b, t].item()
            assert math.isclose(got, step, rel_tol=1e-9), (f"bounded step at b={b} t={t} is {got:.6g}, want eta_t * "
                                                           f"min(1, max_norm / ||G_t||) = {step:.6g}, ||G_t|| = {norm:.6g} over both layers")
            fast_norm = torch.sqrt((F1 ** 2).sum() + (F2 ** 2).sum()).item()  # ||F_{t+1}|| over both layers
            got = info["fast_norm"][b, t].item()
            assert math.isclose(got, fast_norm, rel_tol=1e-9, abs_tol=1e-12), (
                f"||F_t+1|| over both layers at b={b} t={t} is {got:.6g}, but (1 - lambda_t) F_t + step A ⊙ (pre ⊗ post) "
                f"gives {fast_norm:.6g}: check the decay and the update ({UPDATE_OF[fast_form]}), then the trace")
        for name, got, want in (("fc", info["fast_weights"][0][b], F1), ("proj", info["fast_weights"][1][b], F2)):
            err = (got - want).abs().max().item()
            assert err < 1e-12, f"Hebbian fast weight of {name} differs from the formula by {err:.2e} (sequence {b})"


@pytest.mark.gradient
@pytest.mark.parametrize("fast_form", ["dense", "factored"])
def test_gradient_rule_trains_through_its_own_update(fast_form):
    """In training the gradient rule differentiates its update (create_graph): the inner loss's weight w
    reaches the task loss only through the fast weights, so it must receive a gradient. In evaluation
    (no_grad, where autograd.grad keeps no graph) the outputs are the same."""
    model, x = tiny_model("gradient", fast_form=fast_form), random_tokens(T=6)
    try:
        out, _ = model(x)
        out.pow(2).sum().backward()
    except RuntimeError as err:
        raise AssertionError(f"the gradient rule's update must keep its graph in training (autograd.grad with "
                             f"create_graph=True while grad is enabled); backward failed: {err}") from err
    w = model.inner_loss_weight.grad
    assert w is not None and w.abs().sum() > 0, \
        "w got no gradient: the task loss reaches w only through G_t = dL_t/dF of the inner loss mean((o_t ⊙ w)^2), differentiated with create_graph=True"
    with torch.no_grad():
        again, _ = model(x)
    assert torch.allclose(again, out.detach(), atol=1e-12), "the outputs under no_grad differ from training's"


@pytest.mark.gradient
@pytest.mark.parametrize("max_norm", [1e-3, 1e3], ids=["bound-active", "bound-inactive"])
@pytest.mark.parametrize("fast_form", ["dense", "factored"])
def test_gradient_update_matches_autograd(max_norm, fast_form):
    """Three tokens of the gradient rule, recomputed one sequence at a time with torch.autograd: F_t is a leaf,
    o_t the head output (task, extra and modulator units) with weights W + F_t, G_t = dL_t/dF_t for
    L_t = mean((o_t ⊙ w)^2), and F_{t+1} = (1 - lambda_t) F_t + eta_t A ⊙ G_t with the modulated rate and decay
    and the norm bound. With one block the keys and values of earlier tokens do not depend on F, so o_t is the
    output at t of the tokens up to t with slow weights W + F_t and plasticity off (eta = 0)."""
    eta, decay, B, T = 0.5, 0.3, 2, 3
    model = tiny_model("gradient", n_layer=1, eta=eta, decay=decay, max_norm=max_norm, modulation=True, fast_form=fast_form)
    with torch.no_grad():
        model.inner_loss_weight.uniform_(0.5, 1.5)  # a w other than ones
    x = random_tokens(B=B, T=T)
    out, info = model(x)
    name_of = {id(p): name for name, p in model.named_parameters()}
    layers = model.plastic_layers
    for b in range(B):
        fast = [torch.zeros_like(layer.weight) for layer in layers]
        for t in range(T):
            fast = [f.detach().requires_grad_() for f in fast]  # F_t, a leaf
            ln_f_calls = []  # the head's input
            hook = record_calls(model.ln_f, ln_f_calls)
            weights = {name_of[id(layer.weight)]: layer.weight + f for layer, f in zip(layers, fast)}
            torch.func.functional_call(model, weights, (x[b:b + 1, :t + 1],), dict(eta=0.0))
            hook.remove()
            o = model.head(ln_f_calls[-1][1][0])  # (units,) token t's full head output
            err = (out[b, t] - o[:out.size(-1)]).abs().max().item()
            assert err < 1e-12, f"the output at t={t} differs by {err:.2e} from the one computed with F_t (sequence {b})"
            G = torch.autograd.grad(((o * model.inner_loss_weight) ** 2).mean(), fast)
            gate = 2 * torch.sigmoid(o[-1].detach())  # 2 sigmoid(m_t)
            norm = torch.sqrt(sum((g ** 2).sum() for g in G))
            step = eta * gate * min(1.0, max_norm / norm.item())
            fast = [(1 - decay * gate) * f.detach() + step * layer.coef.detach() * g for f, g, layer in zip(fast, G, layers)]
        for i, want in enumerate(fast):
            err = (info["fast_weights"][i][b] - want).abs().max().item()
            assert err < 1e-12, f"gradient-rule fast weight {i} after {T} tokens differs from autograd's by {err:.2e} (sequence {b})"


def explicit_gradient_rule(model, tokens, eta):
    """The gradient rule's fast weights after one sequence (T, d_in), written out token by token and block by
    block: attention over the keys and values of tokens 0..t, each MLP layer y = u (W + F_t) + b, and
    G_t = dL_t/dF_t by autograd with F_t a leaf and earlier tokens' keys and values held fixed (dL_t/dy_t
    reaches a block above only through token t's own query, key and value)."""
    cfg, heads = model.config, model.config.n_head
    fast = [torch.zeros_like(layer.weight) for layer in model.plastic_layers]
    history = [[] for _ in model.blocks]  # per block: earlier tokens' (key, value), detached
    for t in range(tokens.size(0)):
        fast = [f.detach().requires_grad_() for f in fast]  # F_t, a leaf
        h, layers = model.embed(tokens[t]) + model.pos.weight[t], iter(fast)
        for block, earlier in zip(model.blocks, history):
            q, k, v = block.attn.qkv(block.ln_1(h)).split(cfg.d_model)
            first = 0 if cfg.attn_window is None else max(0, len(earlier) + 1 - cfg.attn_window)
            keys = torch.stack([key for key, _ in earlier] + [k])[first:].view(-1, heads, cfg.d_model // heads)
            values = torch.stack([value for _, value in earlier] + [v])[first:].view(-1, heads, cfg.d_model // heads)
            earlier.append((k.detach(), v.detach()))
            q = q.view(heads, -1)
            weights = (torch.einsum("hd,lhd->hl", q, keys) / q.size(-1) ** 0.5).softmax(-1)
            h = h + block.attn.proj(torch.einsum("hl,lhd->hd", weights, values).reshape(-1))
            u = block.ln_2(h)
            hidden = torch.nn.functional.gelu(u @ (block.mlp.fc.weight + next(layers)) + block.mlp.fc.bias)
            h = h + hidden @ (block.mlp.proj.weight + next(layers)) + block.mlp.proj.bias
        o = model.head(model.ln_f(h))  # (units,)
        G = torch.autograd.grad(((o * model.inner_loss_weight) ** 2).mean(), fast)
        gate = 2 * torch.sigmoid(o[-1].detach())
        norm = torch.sqrt(sum((g ** 2).sum() for g in G))
        step = eta * gate * min(1.0, cfg.max_norm / norm.item())
        fast = [(1 - cfg.decay * gate) * f.detach() + step * layer.coef.detach() * g
                for f, g, layer in zip(fast, G, model.plastic_layers)]
    return fast


@pytest.mark.gradient
@pytest.mark.parametrize("window", [None, 2])
@pytest.mark.parametrize("fast_form", ["dense", "factored"])
def test_gradient_rule_through_three_blocks_matches_an_explicit_loop(fast_form, window):
    """With three plastic blocks dL_t/dy_t of a lower block passes through the attention of the blocks above
    (their KV caches): the fast weights after five tokens equal those of an explicit per-token loop."""
    eta = 0.5
    model = tiny_model("gradient", n_layer=3, d_model=8, eta=eta, decay=0.3, max_norm=1e3, fast_form=fast_form, attn_window=window)
    with torch.no_grad():
        model.inner_loss_weight.uniform_(0.5, 1.5)  # a w other than ones
    x = random_tokens(B=2, T=5)
    _, info = model(x)
    for b in range(x.size(0)):
        for i, want in enumerate(explicit_gradient_rule(model, x[b], eta)):
            err = (info["fast_weights"][i][b] - want).abs().max().item()
            assert err < 1e-12, f"fast weight {i} differs from the explicit loop's by {err:.2e} (sequence {b}, window {window})"


@pytest.mark.gradient
@pytest.mark.parametrize("fast_form", ["dense", "factored"])
def test_gradient_rule_evaluates_without_a_graph(fast_form):
    """Inside torch.no_grad() the gradient rule still updates its fast weights, exactly as with a graph."""
    model = tiny_model("gradient", fast_form=fast_form)
    x = random_tokens(T=8)
    with_graph, info = model(x)
    with torch.no_grad():
        without_graph, info_no_graph = model(x)
    assert not without_graph.requires_grad, "evaluation under no_grad should return outputs without a graph"
    assert torch.all(info_no_graph["fast_norm"] > 0), "the gradient rule must still update its fast weights under no_grad"
    err = (with_graph - without_graph).abs().max().item()
    assert err < 1e-12, f"the gradient rule computes something else under no_grad (difference {err:.2e})"


@pytest.mark.gradient
def test_gradient_rule_evaluation_keeps_no_graph_from_token_to_token(monkeypatch):
    """Under torch.no_grad() the gradient rule takes dL_t/dy_t without a graph of it (create_graph False), the
    KV cache keeps only the current token's graph (each AppendRow on a detached buffer), and the inner
    gradient leaves nothing on the slow weights' tapes (InnerGradient): evaluation's memory does not grow
    with the tokens. With a graph (training) the same probes see create_graph and the cache's chain."""
    seen = dict(create_graph=[], chain=[], tapes=[])
    factors, append, linears_init = plastic.gradient_factors, KVCache.append, TokenLinears.__init__

    def recorded_factors(records, loss, create_graph):
        seen["create_graph"].append(create_graph)
        return factors(records, loss, create_graph)

    def recorded_append(self, k, v):
        append(self, k, v)
        node, length = self.key_rows.grad_fn, 0  # AppendRow nodes chained through the buffer (its first input)
        while node is not None and type(node).__name__ == "AppendRowBackward":
            node, length = node.next_functions[0][0], length + 1
        seen["chain"].append(length)

    def recorded_init(self, layers):
        linears_init(self, layers)
        seen["tapes"] += [tape for _, _, tape in self.taped.values()]

    monkeypatch.setattr(plastic, "gradient_factors", recorded_factors)
    monkeypatch.setattr(KVCache, "append", recorded_append)
    monkeypatch.setattr(TokenLinears, "__init__", recorded_init)
    model, x = tiny_model("gradient"), random_tokens(T=6)  # two blocks: the second attends through a KV cache
    with torch.no_grad():
        model(x)
    assert seen["create_graph"] == [False] * 6, f"evaluation should take dL_t/dy_t without a graph: {seen['create_graph']}"
    assert seen["chain"] == [1] * 6, f"evaluation's KV cache should keep only the current token's graph: {seen['chain']}"
    assert all(not tape for tape in seen["tapes"]), "the inner gradient should leave nothing on the weights' tapes"
    seen.update(create_graph=[], chain=[])
    model(x)
    assert seen["create_graph"] == [True] * 6 and seen["chain"] == list(range(1, 7)), \
        f"with a graph the probes should see it: create_graph {seen['create_graph']}, chain {seen['chain']}"


@pytest.mark.gradient
@pytest.mark.parametrize("fast_form", ["dense", "factored"])
def test_gradient_rule_runs_with_frozen_slow_weights(fast_form):
    """A frozen model (evaluated under no_grad) and a linear probe (only the head trained) keep the gradient
    rule's inner gradient dL_t/dy_t, though no slow weight below the head asks autograd for a path to y: each
    gives the trainable model's outputs, and the probe the head's gradient that the whole model gives it."""
    model = tiny_model("gradient", fast_form=fast_form)
    x = random_tokens(T=8)
    out, _ = model(x)
    out.square().sum().backward()
    head_grad = model.head.weight.grad.clone()
    model.zero_grad()
    model.requires_grad_(False)
    with torch.no_grad():
        frozen, info = model(x)
    assert torch.all(info["fast_norm"] > 0), "a frozen gradient-rule model must still update its fast weights"
    err = (frozen - out).abs().max().item()
    assert err < 1e-12, f"the frozen model computes something else (difference {err:.2e})"
    model.head.requires_grad_(True)
    probe, _ = model(x)
    probe.square().sum().backward()
    err = (probe - out).abs().max().item()
    assert err < 1e-12, f"the linear probe computes something else (difference {err:.2e})"
    err = (model.head.weight.grad - head_grad).abs().max().item()
    assert err < 1e-12, f"the probe's head gradient differs from the whole model's by {err:.2e}"


@pytest.mark.gradient
def test_inner_loss_weight_is_a_learned_vector_of_ones_over_every_head_unit():
    """w of L_t = mean((o_t ⊙ w)^2) starts at ones (Duan et al.), one entry per head unit (task, extra, modulator),
    and is trained."""
    model = tiny_model("gradient")
    w = model.inner_loss_weight
    assert isinstance(w, torch.nn.Parameter) and w.requires_grad, "w should be a trainable nn.Parameter"
    assert w.shape == (model.head.out_features,), f"w should have one entry per head unit ({model.head.out_features}), got {tuple(w.shape)}"
    assert torch.equal(w.detach(), torch.ones_like(w)), f"w should start at ones, got {w.detach().tolist()}"


def explicit_plastic_forward(model, x):
    """The plastic model written out as one differentiable loop over tokens and blocks, in plain tensor operations:
    attention over the keys and values of tokens <= t (within the window), each MLP layer y = u (W + F_t) + b with a
    dense F_t (B, in, out), the head output o_t, and F_{t+1} = (1 - lambda_t) F_t + eta_t A ⊙ G_t with
    eta_t, lambda_t = (eta, decay) 2 sigmoid(m_t) and the global norm bound. Hebbian G_t = pre ⊗ post; gradient
    G_t = dL_t/dF_t by torch.autograd.grad with create_graph=True, so that every parameter's gradient, through
    every write, is autograd's. Returns the outputs (B, T, d_out) and the final fast weights."""
    cfg = model.config
    B, T, _ = x.shape
    C, heads = cfg.d_model, cfg.n_head
    hs = C // heads
    eta = cfg.base_rate()
    fast = [x.new_zeros(B, layer.in_features, layer.out_features, requires_grad=True) for layer in model.plastic_layers]
    history = [([], []) for _ in model.blocks]  # per block: keys and values of tokens so far, (B, C) each, with their graph
    outputs = []
    for t in range(T):
        h = model.embed(x[:, t]) + model.pos.weight[t]  # (B, C)
        layers, records = iter(fast), []
        for block, (keys, values) in zip(model.blocks, history):
            q, k, v = block.attn.qkv(block.ln_1(h)).split(C, dim=-1)
            keys.append(k)
            values.append(v)
            first = 0 if cfg.attn_window is None else max(0, len(keys) - cfg.attn_window)
            K = torch.stack(keys[first:], 1).view(B, -1, heads, hs)  # (B, L, nh, hs)
            V = torch.stack(values[first:], 1).view(B, -1, heads, hs)
            weights = (torch.einsum("bhd,blhd->bhl", q.view(B, heads, hs), K) / hs ** 0.5).softmax(-1)
            h = h + block.attn.proj(torch.einsum("bhl,blhd->bhd", weights, V).reshape(B, C))
            u = block.ln_2(h)
            fc, proj = block.mlp.fc, block.mlp.proj
            F1, F2 = (next(layers), next(layers)) if block.plastic else (None, None)
            y1 = u @ fc.weight + fc.bias + (torch.bmm(u[:, None], F1)[:, 0] if F1 is not None else 0)
            a1 = torch.nn.functional.gelu(y1)
            y2 = a1 @ proj.weight + proj.bias + (torch.bmm(a1[:, None], F2)[:, 0] if F2 is not None else 0)
            h = h + y2
            if block.plastic:
                records += [(u, y1, a1), (a1, y2, y2)]  # (pre, linear output, post)
        o = model.head(model.ln_f(h))  # (B, units)
        outputs.append(o[:, :cfg.d_out])
        gate = 2 * torch.sigmoid(o[:, -1])  # 2 sigmoid(m_t), (B,)
        if cfg.rule == "hebbian":
            G = [pre[:, :, None] * post[:, None, :] for pre, _, post in records]
        else:
            G = torch.autograd.grad(((o * model.inner_loss_weight) ** 2).mean(-1).sum(), fast, create_graph=True)
        norm = torch.sqrt(sum((g ** 2).sum(dim=(1, 2)) for g in G))  # (B,)
        step = eta * gate * torch.clamp(cfg.max_norm / norm, max=1.0)
        fast = [(1 - cfg.decay * gate)[:, None, None] * f + step[:, None, None] * layer.coef * g
                for f, g, layer in zip(fast, G, model.plastic_layers)]
    return torch.stack(outputs, 1), fast


@pytest.mark.hebbian
@pytest.mark.gradient
@pytest.mark.parametrize("rule", PLASTIC_RULES)
@pytest.mark.parametrize("fast_form", ["dense", "factored"])
@pytest.mark.parametrize("plastic_blocks", [None, (0,)], ids=["all-plastic", "bottom-plastic"])
def test_plastic_models_outputs_and_gradients_match_an_explicit_differentiable_loop(rule, fast_form, plastic_blocks):
    """Two blocks (both plastic, or only the lower one, whose dL_t/dy_t then passes a static block), an attention
    window, modulation and the norm bound (active at some tokens only): the outputs, the final fast weights and every
    parameter's gradient (through every token's write: pre, post, eta_t, lambda_t, ||G_t||, and for the gradient
    rule dL_t/dF_t's own dependence on the slow weights, second order) are those of an explicit differentiable loop.
    Catches an update that is right in value but cut off from backprop (a detached factor, rate, modulator or fast
    weight), which the tests of values alone cannot see."""
    max_norm = {"hebbian": 12.0, "gradient": 0.7}[rule]  # ||G_t|| is ~7-22 (Hebbian), ~0.5-1.1 (gradient) here
    model = tiny_model(rule, d_model=8, fast_form=fast_form, attn_window=3, eta=0.5, decay=0.2, max_norm=max_norm,
                       plastic_blocks=plastic_blocks)
    if rule == "gradient":
        with torch.no_grad():
            model.inner_loss_weight.uniform_(0.5, 1.5)  # a w other than ones
    x = random_tokens(B=2, T=6)
    out, info = model(x)
    want_out, want_fast = explicit_plastic_forward(model, x)
    err = (out - want_out).abs().max().item()
    assert err < 1e-12, f"{rule}, {fast_form}: outputs differ from the explicit loop's by {err:.2e}"
    for i, (got, want) in enumerate(zip(info["fast_weights"], want_fast)):
        err = (got - want).abs().max().item()
        assert err < 1e-12, f"{rule}, {fast_form}: final fast weight {i} differs from the explicit loop's by {err:.2e}"
    bounded = info["update_norm"] > model.config.max_norm
    assert bounded.any() and not bounded.all(), f"setup: the norm bound should act at some tokens only, got {bounded.tolist()}"
    weights = torch.randn(out.shape, dtype=torch.float64, generator=torch.Generator().manual_seed(11))
    params = list(model.parameters())
    got = torch.autograd.grad((out * weights).sum(), params)
    want = torch.autograd.grad((want_out * weights).sum(), params)
    for (name, _), a, b in zip(model.named_parameters(), got, want):
        err = (a - b).abs().max().item()
        assert torch.allclose(a, b, atol=1e-10, rtol=1e-8), \
            f"{rule}, {fast_form}: the gradient of {name} differs from the explicit loop's by {err:.2e} (is a write cut off from backprop?)"


@pytest.mark.hebbian
@pytest.mark.gradient
def test_update_norm_is_the_norm_of_every_outer_product_together():
    """||G_t|| over layers of two widths, one vector shared by two layers (as a Hebbian block's hidden
    activity is) and a repeated pair, against the norm of the explicit outer products, per sequence."""
    g = torch.Generator().manual_seed(0)
    x, hidden, out, delta = (torch.randn(3, n, dtype=torch.float64, generator=g) for n in (4, 16, 4, 16))
    factors = [(x, hidden), (hidden, out), (out, delta), (x, hidden)]
    expected = sum(torch.einsum("bi,bj->bij", pre, post).pow(2).sum(dim=(1, 2)) for pre, post in factors).sqrt()
    got = update_norm(factors)
    assert got.shape == (3,), f"one norm per sequence, got shape {tuple(got.shape)}"
    assert torch.allclose(got, expected, rtol=1e-12), f"update_norm {got.tolist()} != explicit {expected.tolist()}"


@pytest.mark.hebbian
@pytest.mark.gradient
@pytest.mark.parametrize("rule", PLASTIC_RULES)
def test_norm_bound_holds(rule):
    """The step taken is eta_t * min(1, max_norm / ||G_t||): never more than eta_t * max_norm in norm."""
    max_norm = 0.05
    model = tiny_model(rule, eta=1.0, max_norm=max_norm)
    _, info = model(random_tokens(T=20))
    taken = info["step"] * info["update_norm"]
    assert torch.all(taken <= info["eta"] * max_norm * (1 + 1e-9)), f"{rule}: an update is larger than eta_t * max_norm"
    bounded = info["update_norm"] > max_norm
    assert bounded.any(), "test setup: the bound should be active somewhere"
    assert torch.allclose(taken[bounded], info["eta"][bounded] * max_norm), f"{rule}: a bounded update should have norm eta_t * max_norm"
    assert torch.allclose(info["step"][~bounded], info["eta"][~bounded]), f"{rule}: an update within the bound must not shrink"


@pytest.mark.hebbian
@pytest.mark.gradient
@pytest.mark.parametrize("rule", PLASTIC_RULES)
def test_very_negative_modulator_stops_plasticity(rule):
    """2 sigmoid(m_t) -> 0 as m_t -> -inf: no update, no decay, the static computation."""
    model = tiny_model(rule, eta=1.0)
    with torch.no_grad():
        model.head.bias[-1] = -1e4  # the modulator unit
    x = random_tokens(T=10)
    out, info = model(x)
    assert torch.all(info["eta"] < 1e-12), f"{rule}: a very negative modulator should give eta_t ~ 0"
    assert torch.all(info["fast_norm"] < 1e-12), f"{rule}: the fast weights should stay at zero"
    assert torch.allclose(out, model(x, eta=0.0)[0], atol=1e-12), f"{rule}: outputs should equal the knock-out (eta=0)"


@pytest.mark.hebbian
def test_fast_weights_start_at_zero_for_every_sequence():
    """No state leaks between calls: the same sequence gives the same output whatever ran before it."""
    model = tiny_model("hebbian", eta=1.0)
    x = random_tokens(T=6)
    first, _ = model(x)
    model(random_tokens(T=6, seed=9))
    again, _ = model(x)
    assert torch.equal(first, again), "a forward pass depends on an earlier one: fast weights must start at zero"


@pytest.mark.model
def test_knock_out_override_leaves_config_unchanged():
    model = tiny_model("hebbian", eta=0.7)
    x = random_tokens(T=6)
    model(x, eta=0.0)
    assert model.config.eta == 0.7, "forward(eta=...) must not change the model's configured rate"
    assert not torch.allclose(model(x)[0], model(x, eta=0.0)[0]), "the knock-out (eta=0) should change the outputs"


def read_inputs(B=3, S=4, T=7, d_in=5, d_out=6, seed=3):
    """Float64 inputs of a factored read: x, history buffers of T rows of which the first S are read, the
    S coefficients and A. Rows >= S hold other values, as later tokens' rows would."""
    g = torch.Generator().manual_seed(seed)
    shapes = [(B, d_in), (B, T, d_in), (B, T, d_out), (B, S), (d_in, d_out)]
    return [torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True) for shape in shapes]


@pytest.mark.hebbian
@pytest.mark.gradient
def test_factored_read_equals_the_plain_form_to_the_second_derivative():
    """FactoredRead keeps only its inputs and derives its backward pass by hand: its output, its gradients in
    every input and the gradients of its input gradient (the gradient rule's second order) are autograd's
    through the plain factored_read, in float64. Rows >= S of the buffers get no gradient."""
    x, pre, post, scale, coef = inputs = read_inputs()
    S = scale.size(1)
    lean = FactoredRead.apply(*inputs)
    plain = factored_read(x, pre[:, :S], post[:, :S], scale, coef)
    assert torch.allclose(lean, plain, atol=1e-12), "the read differs from the plain form"
    upstream = torch.randn_like(lean)
    first = {name: torch.autograd.grad(out, inputs, upstream, create_graph=True)
             for name, out in (("FactoredRead", lean), ("plain", plain))}
    names = ("x", "pre", "post", "scale", "coef")
    for name, a, b in zip(names, *first.values()):
        assert torch.allclose(a, b, atol=1e-12), f"d/d{name} differs from autograd through the plain form"
    assert first["FactoredRead"][1][:, S:].abs().max() == 0, "rows that were not read got a gradient"
    probe = torch.randn_like(x)
    second = {}  # dx is linear in x, so its gradient in x is zero (None from autograd)
    for key, grads in first.items():
        found = torch.autograd.grad((grads[0] * probe).sum(), inputs, allow_unused=True)
        second[key] = [torch.zeros_like(t) if g is None else g for g, t in zip(found, inputs)]
    for name, a, b in zip(names, *second.values()):
        assert torch.allclose(a, b, atol=1e-12), f"d/d{name} of dx differs from autograd through the plain form"


@pytest.mark.hebbian
def test_factored_read_of_several_tokens_is_each_token_read_alone():
    """The queries read one F_t at once: factored_read of x (B, Q, in) is, per token, the read of that
    token alone, and x F_t with the dense F_t (explicit sum over the S terms), in float64."""
    _, pre, post, scale, coef = read_inputs()
    S = scale.size(1)
    x = torch.randn(3, 4, pre.size(-1), dtype=torch.float64, generator=torch.Generator().manual_seed(9))  # (B, Q, in)
    together = factored_read(x, pre[:, :S], post[:, :S], scale, coef)  # (B, Q, out)
    alone = torch.stack([factored_read(x[:, q], pre[:, :S], post[:, :S], scale, coef) for q in range(x.size(1))], 1)
    assert torch.allclose(together, alone, atol=1e-12), "reading several tokens at once differs from reading each alone"
    dense = sum(scale[:, s, None, None] * coef * pre[:, s, :, None] * post[:, s, None, :] for s in range(S))  # (B, in, out)
    assert torch.allclose(together, x @ dense, atol=1e-12), "the read of several tokens differs from x F_t"


@pytest.mark.gradient
def test_inner_gradient_gives_the_inputs_gradient_alone_and_the_same():
    """While the gradient rule takes dL_t/dy_t (InnerGradient.active), FactoredRead and TokenLinear compute their
    input's gradient alone: the same dx as without it, with and without create_graph, no gradient for the
    other inputs, and nothing kept on a weight's tape."""
    linear = torch.nn.Linear(6, 4).double()  # on the read's output (B, 6)
    for create_graph in (False, True):
        linears = TokenLinears([linear])
        inputs = read_inputs()

        def dx(active):
            InnerGradient.active = active
            try:
                out = linears(linear, FactoredRead.apply(*inputs)).sum()
                return torch.autograd.grad(out, inputs, create_graph=create_graph, allow_unused=True)
            finally:
                InnerGradient.active = False
        tape = linears.taped[linear][2]
        alone = dx(True)
        assert not tape, f"TokenLinear kept {len(tape)} entries on the tape for an inner gradient"
        full = dx(False)
        assert torch.allclose(full[0], alone[0], atol=1e-12), f"InnerGradient changed dx (create_graph={create_graph})"
        assert all(g is None for g in alone[1:]), "InnerGradient should leave the history, scale and A without gradient"


@pytest.mark.model
def test_token_linears_give_autograds_gradients_to_the_second_derivative():
    """A three-token recurrence through an nn.Linear and a PlasticLinear applied by TokenLinears (dW taped and
    taken once, after the last token) gives the gradients of the same recurrence through the layers
    themselves; and under create_graph, the gradients of the input's gradient too."""
    torch.manual_seed(0)
    linear, plastic = torch.nn.Linear(4, 3).double(), PlasticLinear(3, 4, plastic=False).double()
    torch.nn.init.normal_(plastic.weight)
    x0 = torch.randn(2, 4, dtype=torch.float64, requires_grad=True)
    params = [linear.weight, linear.bias, plastic.weight, plastic.bias]

    def run(apply):
        h = x0
        for _ in range(3):
            h = torch.tanh(plastic(torch.tanh(apply(linear, h)), linears=apply if apply is not plain else None))
        return h.pow(2).sum()

    def plain(layer, x):
        return layer(x)
    for create_graph in (False, True):
        got, want = (torch.autograd.grad(run(apply), [x0] + params, create_graph=create_graph)
                     for apply in (TokenLinears([linear, plastic]), plain))
        for name, a, b in zip(("x", "W", "b", "W'", "b'"), got, want):
            assert torch.allclose(a, b, atol=1e-12), f"d/d{name} differs from autograd's (create_graph={create_graph})"
        if create_graph:
            second = [torch.autograd.grad(grads[0].pow(2).sum(), params) for grads in (got, want)]
            for name, a, b in zip(("W", "b", "W'", "b'"), *second):
                assert torch.allclose(a, b, atol=1e-12), f"d/d{name} of dx differs from autograd's"


@pytest.mark.model
@pytest.mark.parametrize("rule", PLASTIC_RULES)
def test_torch_compile_computes_the_eager_models_outputs_and_gradients(rule):
    """--compile: under torch.compile (its graph capture, with the eager backend, which is fast) the token loop
    and the queries after a context compute the same outputs and gradients. AppendRow, FactoredRead and
    TokenLinear rely on shared memory, a tape and InnerGradient, which a traced graph loses; their callers
    run outside the graph."""
    model = tiny_model(rule)  # two blocks: the second attends through the KV cache
    x = random_tokens(T=4)
    torch._dynamo.reset()
    results = [run(x, fast_norm=False, context=3)[0] for run in (model, torch.compile(model, backend="eager"))]
    grads = [torch.autograd.grad(out.pow(2).sum(), list(model.parameters())) for out in results]
    assert torch.equal(*results), f"{rule}: compiled outputs differ from eager ones"
    for (name, _), a, b in zip(model.named_parameters(), *grads):
        assert torch.allclose(a, b, atol=1e-12), f"{rule}: the compiled model's gradient of {name} differs from eager"


@pytest.mark.attention
@pytest.mark.hebbian
@pytest.mark.gradient
def test_append_row_writes_in_place_and_routes_each_rows_gradient_to_its_row():
    """A buffer grown row by row with AppendRow, each step reading (and autograd keeping) a view of the rows so
    far, gives autograd's gradients of the same computation on stacked rows; every step shares one memory."""
    rows = [torch.randn(2, 3, dtype=torch.float64, generator=torch.Generator().manual_seed(t), requires_grad=True)
            for t in range(4)]
    buffer, loss, storages = torch.zeros(2, 4, 3, dtype=torch.float64), 0, set()
    for t, row in enumerate(rows):
        buffer = AppendRow.apply(buffer, row, 1, t)
        storages.add(buffer.untyped_storage().data_ptr())
        loss = loss + (buffer[:, :t + 1].pow(3) * (t + 1)).sum()  # pow keeps the view for its backward
    got = torch.autograd.grad(loss, rows)
    want = torch.autograd.grad(sum((torch.stack(rows[:t + 1], 1).pow(3) * (t + 1)).sum() for t in range(4)), rows)
    assert len(storages) == 1, "AppendRow should write into the one buffer, not copy it"
    for t, (a, b) in enumerate(zip(got, want)):
        assert torch.allclose(a, b, atol=1e-12), f"row {t}'s gradient differs from the stacked computation's"


@pytest.mark.hebbian
@pytest.mark.gradient
@pytest.mark.parametrize("rule", PLASTIC_RULES)
def test_memory_kept_for_backward_grows_linearly_with_the_sequence(rule):
    """What autograd keeps of a forward pass (memory.saved_bytes) grows by the same amount from 16 to 32 tokens
    as from 32 to 48, within 5%: no per-token copy of the history or the KV cache (that grew as T^2)."""
    model = tiny_model(rule, d_model=32, max_len=48)
    kept = [memory.saved_bytes(model, SimpleNamespace(x=random_tokens(B=2, T=T), images=None, context=None)) for T in (16, 32, 48)]
    first, second = kept[1] - kept[0], kept[2] - kept[1]
    assert abs(second - first) <= 0.05 * first, f"bytes kept at 16, 32, 48 tokens: {kept}; the steps should be equal"


class TwoLayers(torch.nn.Module):
    """Float64 layers fc1 (3 -> 4) and fc2 (4 -> 2) whose forward pass is body(self, x, fast_norm), called as
    memory.saved_bytes calls a PlasticGPT: the models whose kept bytes the tests below count by hand."""
    def __init__(self, body):
        super().__init__()
        self.fc1 = torch.nn.Linear(3, 4, dtype=torch.float64)
        self.fc2 = torch.nn.Linear(4, 2, dtype=torch.float64)
        self.body = body

    def forward(self, x, images=None, fast_norm=True, context=None):  # PlasticGPT's signature
        return self.body(self, x, fast_norm)


def saved_bytes_of(body) -> int:
    """What memory.saved_bytes counts for TwoLayers(body) on x of shape (2, 5, 3)."""
    return memory.saved_bytes(TwoLayers(body), SimpleNamespace(x=random_tokens(B=2, T=5), images=None, context=None))


@pytest.mark.model
def test_memory_counts_each_tensor_autograd_keeps_once_and_no_parameter():
    """A linear layer then GELU, counted by hand: the layer keeps its input x (its weight is a parameter, left
    out) and GELU its input, the layer's output: (2, 5, 3) + (2, 5, 4) float64 values, 560 bytes."""
    kept = saved_bytes_of(lambda m, x, fast_norm: torch.nn.functional.gelu(m.fc1(x)))
    assert kept == (2 * 5 * 3 + 2 * 5 * 4) * 8, f"expected 560 bytes kept for the backward pass, counted {kept}"


@pytest.mark.model
def test_memory_leaves_out_what_an_inner_backward_pass_saved_and_dropped():
    """As the gradient rule does, the forward pass runs a backward pass of its own (tanh keeps its (2, 5, 3) output
    for it) and drops that graph: only the 560 bytes of the linear layer and GELU are still kept."""
    def inner_then_linear_gelu(m, x, fast_norm):
        t = x.detach().clone().requires_grad_()
        torch.autograd.grad(torch.tanh(t).sum(), t)  # its graph, and what tanh saved, are dropped
        return torch.nn.functional.gelu(m.fc1(x))
    kept = saved_bytes_of(inner_then_linear_gelu)
    assert kept == 560, f"expected 560 bytes still kept (what the inner backward pass saved is freed), counted {kept}"


@pytest.mark.model
def test_memory_leaves_out_a_parameter_autograd_keeps():
    """Linear, GELU, linear: the second layer's input needs a gradient, so autograd keeps its weight (a parameter,
    left out) beside x (2, 5, 3), GELU's input (2, 5, 4) and the second layer's input (2, 5, 4): 880 bytes."""
    kept = saved_bytes_of(lambda m, x, fast_norm: m.fc2(torch.nn.functional.gelu(m.fc1(x))))
    assert kept == (2 * 5 * 3 + 2 * 5 * 4 + 2 * 5 * 4) * 8, f"expected 880 bytes (fc2's weight is a parameter, not counted), counted {kept}"


@pytest.mark.model
def test_memory_counts_the_whole_storage_behind_a_kept_view():
    """pow keeps its input, here a (2, 1, 4) slice of the layer's (2, 5, 4) output: the slice keeps all 40 values
    alive, so 30 (x) + 40 float64 values, 560 bytes, not 30 + 8."""
    kept = saved_bytes_of(lambda m, x, fast_norm: m.fc1(x)[:, :1].pow(3))
    assert kept == (2 * 5 * 3 + 2 * 5 * 4) * 8, f"expected 560 bytes (the slice's whole storage), counted {kept}"


@pytest.mark.model
def test_memory_runs_the_forward_pass_as_training_does_whatever_the_callers_grad_mode():
    """saved_bytes runs the forward pass with gradients on, even when called under torch.no_grad() (where autograd
    would keep nothing and any batch would seem to fit), and without the fast-weight norm (fast_norm=False, where
    the model's own default is True), as a training step does: a linear layer then GELU keeps its 560 bytes."""
    calls = []

    def linear_gelu(m, x, fast_norm):
        calls.append(dict(grad=torch.is_grad_enabled(), fast_norm=fast_norm))
        return torch.nn.functional.gelu(m.fc1(x))
    with torch.no_grad():
        kept = saved_bytes_of(linear_gelu)
    assert calls == [dict(grad=True, fast_norm=False)], f"the forward pass should run as in training, ran {calls}"
    assert kept == 560, f"under torch.no_grad() the 560 bytes a training step keeps should still count, counted {kept}"


@pytest.mark.model
def test_a_step_is_estimated_at_twice_the_batch_of_one_sequence_plus_four_copies_of_the_parameters():
    """step_bytes = 2 (BACKWARD, as measured on an H100) x batch x one sequence's saved bytes + parameters,
    gradients and AdamW's two moments (4 x 4 bytes per float32 parameter)."""
    task = SimpleNamespace(sample=lambda n, split, device, generator: SimpleNamespace(
        x=torch.randn(n, 6, 3, generator=generator), images=None, context=None))
    cfg = Config(d_in=3, d_out=3, max_len=6, rule="none", n_layer=1, n_head=2, d_model=16)
    model = PlasticGPT(cfg)
    one = memory.saved_bytes(model, task.sample(1, "train", "cpu", torch.Generator().manual_seed(0)))
    n = sum(p.numel() for p in model.parameters())
    for batch_size in (1, 8):
        got = memory.step_bytes(cfg, task, batch_size, torch.device("cpu"))
        assert got == 2 * batch_size * one + 16 * n, \
            f"batch {batch_size}: expected 2 x {batch_size} x {one} + 16 x {n} parameters = {2 * batch_size * one + 16 * n}, got {got}"


@pytest.mark.model
def test_free_memory_on_linux_is_memavailable_in_bytes(monkeypatch):
    """/proc/meminfo gives kB (of 1,024 bytes); what a process can still take is MemAvailable, not MemFree."""
    import io
    meminfo = "MemTotal:       16000 kB\nMemFree:          1000 kB\nMemAvailable:     3000 kB\nBuffers:  10 kB\n"
    monkeypatch.setattr(memory.os.path, "exists", lambda path: path == "/proc/meminfo")  # Linux, wherever the test runs
    monkeypatch.setattr(memory, "open", lambda path: io.StringIO(meminfo), raising=False)
    assert memory.free_bytes(torch.device("cpu")) == 3000 * 1024, "MemAvailable's 3000 kB should read 3,072,000 bytes"


@pytest.mark.model
def test_free_memory_is_unknown_without_proc_meminfo(monkeypatch):
    """On a CPU without /proc/meminfo (macOS, Windows) the free memory is unknown, None, so that no run is refused,
    rather than 0, which would refuse every run."""
    monkeypatch.setattr(memory.os.path, "exists", lambda path: False)
    got = memory.free_bytes(torch.device("cpu"))
    assert got is None, f"free memory without /proc/meminfo should be None (unknown), got {got}"


@pytest.mark.model
def test_free_memory_on_a_gpu_is_its_free_memory_not_its_total(monkeypatch):
    """torch.cuda.mem_get_info gives (free, total) bytes; what a run can still take is the free part."""
    monkeypatch.setattr(memory.torch.cuda, "mem_get_info", lambda device: (3 * 2**30, 141 * 2**30))
    got = memory.free_bytes(torch.device("cuda", 0))
    assert got == 3 * 2**30, f"3 GiB of 141 GiB free should read {3 * 2**30} bytes, got {got}"


@pytest.mark.model
def test_out_of_memory_errors_are_told_from_other_errors():
    assert memory.is_out_of_memory(MemoryError()), "Python's MemoryError is running out of memory"
    assert memory.is_out_of_memory(torch.cuda.OutOfMemoryError("CUDA out of memory."))
    assert memory.is_out_of_memory(RuntimeError("DefaultCPUAllocator: can't allocate memory: you tried to allocate 8 bytes."))
    assert not memory.is_out_of_memory(RuntimeError("mat1 and mat2 shapes cannot be multiplied")), "a bug is not memory"
    assert not memory.is_out_of_memory(RuntimeError("CUDA error: an illegal memory access was encountered")), \
        "an illegal memory access is a bug, not memory running out"


@pytest.mark.hebbian
@pytest.mark.gradient
@pytest.mark.parametrize("rule", PLASTIC_RULES)
@pytest.mark.parametrize("context", [None, 8])
def test_factored_form_equals_dense_form(rule, context):
    """F_t kept as its rank-1 history computes exactly what the (B, in, out) matrix does, and so do the
    gradients; also for queries after a context, which read it all at once."""
    x = random_tokens(T=12)
    results = {}
    for form in ("dense", "factored"):
        model = tiny_model(rule, fast_form=form, eta=1.0, max_norm=0.5)
        out, info = model(x, context=context)
        out.pow(2).sum().backward()
        results[form] = out, info, {n: p.grad for n, p in model.named_parameters()}
    (out_d, info_d, grad_d), (out_f, info_f, grad_f) = results["dense"], results["factored"]
    assert torch.allclose(out_d, out_f, atol=1e-12), f"{rule}: factored outputs differ from dense"
    for key in ("eta", "step", "update_norm", "fast_norm"):
        assert torch.allclose(info_d[key], info_f[key], atol=1e-12), f"{rule}: info[{key!r}] differs between forms"
    for dense, factored in zip(info_d["fast_weights"], info_f["fast_weights"]):
        assert torch.allclose(dense, factored, atol=1e-12), f"{rule}: the factored F_T differs from the dense F_T"
    for name in grad_d:
        for form, grad in (("dense", grad_d[name]), ("factored", grad_f[name])):
            assert grad is not None, f"{rule}: {name} received no gradient in the {form} form: the loss does not reach it"
        err = (grad_d[name] - grad_f[name]).abs().max().item()
        assert torch.allclose(grad_d[name], grad_f[name], atol=1e-10), f"{rule}: the gradient of {name} differs between forms by {err:.2e}"


# ------------------------------------------------------------------ fast weights that do work


def association_episodes(B, way, dim, generator):
    """way-way 1-shot episodes on random vectors: `way` support tokens [key + noise, one-hot label] in
    random order, then the same keys (fresh noise, another order) with no label. Keys are new in every
    episode, so nothing about them can be learned into the slow weights. Returns x (B, 2 way, dim + way)
    and the labels (B, 2 way)."""
    keys = torch.randn(B, way, dim, generator=generator)
    labels = torch.rand(B, 2, way, generator=generator).argsort(-1).flatten(1)  # (B, 2 way): supports, then queries
    shown = keys.gather(1, labels[..., None].expand(-1, -1, dim)) + 0.1 * torch.randn(B, 2 * way, dim, generator=generator)
    x = torch.cat([shown, torch.nn.functional.one_hot(labels, way).float()], dim=-1)
    x[:, way:, dim:] = 0  # the queries' labels are hidden
    return x, labels


def train_on_associations(rule, way=3, dim=8, steps=150, seed=0):
    """Train a tiny model with attention window 1 (each token sees only itself, so only the fast weights
    can carry a support item to its query) and return its query accuracy and its knock-out's (eta = 0)
    over 500 fresh episodes."""
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    model = PlasticGPT(Config(d_in=dim + way, d_out=way, n_layer=1, n_head=2, d_model=16, max_len=2 * way,
                              rule=rule, attn_window=1))
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(steps):
        x, labels = association_episodes(32, way, dim, generator)
        logits = model(x, fast_norm=False)[0][:, way:]  # (B, way, way): the queries
        loss = torch.nn.functional.cross_entropy(logits.flatten(0, 1), labels[:, way:].flatten())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    x, labels = association_episodes(500, way, dim, torch.Generator().manual_seed(seed + 1))
    with torch.no_grad():
        accuracy, knocked_out = ((model(x, eta=eta)[0][:, way:].argmax(-1) == labels[:, way:]).float().mean().item()
                                 for eta in (None, 0.0))
    return accuracy, knocked_out


@pytest.mark.hebbian
@pytest.mark.gradient
@pytest.mark.parametrize("rule", RULES)
def test_only_fast_weights_learn_an_association_beyond_attention(rule):
    """3-way 1-shot on random vectors with attn_window=1, 150 steps (1-2 s): a plastic model learns it
    (> 80%, chance 1/3; measured over seeds 0-2: Hebbian 95-97%, gradient 92-94%), its knock-out and the static
    model stay at chance (< 45%: ten standard errors above 1/3 over 1,500 queries)."""
    accuracy, knocked_out = train_on_associations(rule)
    if rule == "none":
        assert accuracy < 0.45, f"the static model with window 1 cannot see the support set, yet scored {accuracy:.3f}"
        return
    assert accuracy > 0.8, f"{rule}: with window 1 the fast weights should learn the association, got {accuracy:.3f} (chance 0.333)"
    assert knocked_out < 0.45, f"{rule}: knocked out (eta=0) the model should be at chance, got {knocked_out:.3f}"
