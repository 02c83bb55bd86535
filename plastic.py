"""
The model: a small decoder-only GPT whose MLP weights change token by token.

    model = PlasticGPT(Config(d_in=3, d_out=1, rule="hebbian"))
    out, info = model(x)                      # x (B, T, d_in) -> out (B, T, d_out)

Every linear layer of the MLPs computes y = x (W + F_t) + b, where W, b are slow weights learned by
backprop across sequences and F_t is a fast weight that starts at zero for every sequence and, after
the output for token t is produced, changes by one of three rules (README, "Reading the code"):

    eta_t    = eta   * 2 sigmoid(m_t)             the neuromodulated plasticity rate
    lambda_t = decay * 2 sigmoid(m_t)             the neuromodulated decay
    eta_t   *= max_norm / ||G_t||  if ||G_t|| > max_norm   (global norm over layers, per sequence)
    F_{t+1}  = (1 - lambda_t) F_t + eta_t A ⊙ G_t

    none      no fast weights: the static baseline
    hebbian   G_t = pre_t ⊗ post_t                       (a layer's input and its output)
    gradient  G_t = dL_t/dF,  L_t = mean((o_t ⊙ w)^2)    (Duan et al. 2023: the model's own target)

m_t is a "modulator" unit of the output head, A a learned per-connection coefficient per layer.
Shapes: B batch, T tokens, C = d_model channels, nh heads, hs = C / nh; fast weights (B, in, out).

    out, info = model(x, context=S)           # tokens S.. are queries: each reads tokens < S and itself

With `context=S` the first S tokens are the context (a few-shot episode's support set) and every later
token a query that attends to them and to itself only and writes no fast weight, so no query sees
another: the queries are answered as if each were alone after the support set (attention_mask). The
token loop then runs the context alone; the queries, which leave the fast weights as they are, follow in
one pass (CausalSelfAttention.read).
"""

import math
from contextlib import nullcontext
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

RULES = ("none", "hebbian", "gradient")
# The coefficient A's initial sign, per rule (README, "What makes the fast weights work"): positive for
# Hebbian, so a stored pre ⊗ post is read back as itself; negative for the gradient rule, so F_t takes
# a descent step on the inner loss (a positive A climbs it, and the outputs run away).
COEF_INITS = {"positive": (0.0, 1.0), "negative": (-1.0, 0.0), "symmetric": (-1.0, 1.0)}  # A ~ U[low, high]
RULE_COEF_INIT = {"hebbian": "positive", "gradient": "negative"}
# The base rate eta per rule (README, "What makes the fast weights work"). The Hebbian update's norm is
# hundreds per token, so the bound always acts and eta is the norm of every step. The gradient rule's
# update is near the bound at first: at eta 1 the noise its steps add to the queries' outputs at
# initialisation made training switch plasticity off (2 of 5 Omniglot seeds stayed at chance); at eta 0.1
# (Duan et al.'s rate) the noise costs less than the association gains, and training raises the rate.
RULE_ETA = {"hebbian": 1.0, "gradient": 0.1}
INITS = ("torch", "gpt2")  # the slow weights' initialisation: PlasticGPT._init_weights
# Config's options that only the fast weights read: the static model (rule "none") runs alike whatever they are
FAST_WEIGHT_OPTIONS = ("eta", "decay", "max_norm", "fast_form", "n_extra", "modulation", "plastic_blocks", "coef_init")


@dataclass
class Config:
    d_in: int = 1  # size of each input token (for image tasks: the non-image part, e.g. a label one-hot)
    d_out: int = 1  # size of the task output per token
    n_layer: int = 4  # transformer blocks
    n_head: int = 4  # attention heads per block
    d_model: int = 128  # residual stream width C
    max_len: int = 128  # longest sequence (size of the learned position embedding)
    positions: bool = True  # add a learned position embedding to each token; False: none (a few-shot episode's order carries nothing, its label inputs tell queries from support, and with --train-way a test query then sits at no position that training gave only to support)
    dropout: float = 0.0  # dropout on attention weights and residual branches
    rule: str = "hebbian"  # fast-weight rule: "none" | "hebbian" | "gradient"
    eta: float | None = None  # base plasticity rate (before modulation and the norm bound); None: the rule's own (hebbian 1, gradient 0.1)
    decay: float = 0.1  # base decay of the fast weights per token
    max_norm: float = 1.0  # bound on the global norm of the update direction G_t, per sequence
    fast_form: str = "factored"  # F_t as its rank-1 history ("factored": faster, less memory) or a (B, in, out) matrix ("dense")
    n_extra: int = 4  # extra head units that only feed the gradient rule's inner loss
    modulation: bool = True  # scale rate and decay by 2*sigmoid(m_t); False: by 1
    plastic_blocks: tuple[int, ...] | None = None  # indices of blocks with plastic MLPs; None = all
    attn_window: int | None = None  # each token attends to itself and the W-1 before it; None = all
    coef_init: str | None = None  # A ~ U[0, 1] "positive", U[-1, 0] "negative", U[-1, 1] "symmetric" (Duan et al.); None: the rule's own (hebbian positive, gradient negative)
    init: str = "torch"  # weights: "torch" (PyTorch's default, U(-1/sqrt(in), 1/sqrt(in))) or "gpt2" (N(0, 0.02))
    image_norm: bool = True  # image features centred and scaled to unit length, like the one-hot label beside them
    image_shape: tuple[int, int, int] | None = None  # (C, H, W): add the Conv4 image encoder
    encoder_channels: int = 64  # channels of each Conv4 block (64 is the standard few-shot size)
    encoder_widths: tuple[int, ...] | None = None  # the four Conv4 blocks' channels, e.g. 96 192 384 512 (R2D2's wider encoder); None: encoder_channels in each

    def __post_init__(self):
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; choose one of {', '.join(RULES)}.")
        if self.rule != "none" and not (self.rule in RULE_ETA and self.rule in RULE_COEF_INIT):  # a rule being added
            raise ValueError(f"rule {self.rule!r} needs its base rate in RULE_ETA and its initial sign of A in "
                             f"RULE_COEF_INIT (plastic.py; README, \"Adding a rule\").")
        if self.d_model % self.n_head != 0:
            heads = [h for h in range(1, self.d_model + 1) if self.d_model % h == 0]
            raise ValueError(f"d_model ({self.d_model}) must be divisible by n_head ({self.n_head}): choose n_head "
                             f"(--n-head) from {', '.join(map(str, heads))}, or another d_model (--d-model).")
        if self.attn_window is not None and self.attn_window < 1:
            raise ValueError(f"attn_window must be at least 1 (or None for the whole sequence), got {self.attn_window}.")
        if self.plastic_blocks is not None:
            self.plastic_blocks = tuple(sorted(set(self.plastic_blocks)))
            if not self.plastic_blocks:
                raise ValueError("plastic_blocks must name at least one block, or be None for all (no plastic block: rule 'none').")
            if any(not 0 <= i < self.n_layer for i in self.plastic_blocks):
                raise ValueError(f"plastic_blocks {self.plastic_blocks} must index blocks 0..{self.n_layer - 1} of the "
                                 f"n_layer = {self.n_layer} blocks: name blocks below {self.n_layer} (--plastic-blocks), "
                                 f"or more layers (--n-layer).")
        if self.fast_form not in ("dense", "factored"):
            raise ValueError(f"fast_form must be 'dense' or 'factored', got {self.fast_form!r}.")
        if self.coef_init is not None and self.coef_init not in COEF_INITS:
            raise ValueError(f"coef_init must be one of {', '.join(COEF_INITS)} (or None), got {self.coef_init!r}.")
        if self.init not in INITS:
            raise ValueError(f"init must be one of {', '.join(INITS)}, got {self.init!r}.")
        if self.image_shape is not None:
            self.image_shape = tuple(self.image_shape)
            if len(self.image_shape) != 3 or min(self.image_shape[1:]) < 16:
                raise ValueError(f"image_shape must be (C, H, W) with H, W >= 16 for Conv4, got {self.image_shape}.")
        if self.encoder_widths is not None:
            self.encoder_widths = tuple(self.encoder_widths)
            if len(self.encoder_widths) != 4 or min(self.encoder_widths) < 1:
                raise ValueError(f"encoder_widths must give the channels of the 4 Conv4 blocks, each at least 1 "
                                 f"(e.g. 96 192 384 512), got {' '.join(map(str, self.encoder_widths))}.")
        if min(self.d_in, self.d_out, self.n_layer, self.n_head, self.max_len) < 1 or self.max_norm <= 0:
            raise ValueError("d_in, d_out, n_layer, n_head, max_len must be positive and max_norm > 0.")
        if self.n_extra < 0:
            raise ValueError(f"n_extra must be 0 or more, got {self.n_extra}.")
        most = 0.5 if self.modulation else 1.0  # lambda_t = decay * 2 sigmoid(m_t) stays below 2 decay
        if not 0 <= self.decay <= most:
            raise ValueError(f"decay must lie in [0, {most}] so that 1 - lambda_t stays at or above 0 "
                             f"({'with' if self.modulation else 'without'} modulation), got {self.decay}.")

    def conv4_widths(self) -> tuple[int, int, int, int]:
        """The channels of the encoder's four blocks: encoder_widths, or encoder_channels in each."""
        return self.encoder_widths or (self.encoder_channels,) * 4

    def base_rate(self):
        """eta, or the rule's own where it is None (RULE_ETA; 0 for the static model, which has no fast weights)."""
        return self.eta if self.eta is not None else RULE_ETA[self.rule] if self.rule != "none" else 0.0

    def is_plastic(self, block_index):
        if self.rule == "none":
            return False
        return self.plastic_blocks is None or block_index in self.plastic_blocks


# ----------------------------------------------------------------------------------------------
# The plasticity rules: one short function per equation above. Both rules add a rank-1 term
# per layer per token, G_t = pre_t ⊗ post_t, so each rule only says what pre and post are.


def modulated_rates(modulator, eta, decay):
    """eta_t = eta * 2 sigmoid(m_t), lambda_t = decay * 2 sigmoid(m_t). modulator (B,) (the queries': (B, Q))
    or None (off)."""
    gate = 2 * torch.sigmoid(modulator) if modulator is not None else 1.0
    return eta * gate, decay * gate  # each shaped as modulator  (floats when modulation is off)


def hebbian_factors(records):
    """Hebbian: G_t = pre_t ⊗ post_t, the layer's input and its output after the layer's nonlinearity.
    records: per layer (input, linear output, output after the nonlinearity), each (B, features)."""
    return [(pre, activity) for pre, _, activity in records]


def inner_loss(head_output, weight):
    """L_t = mean((o_t ⊙ w)^2) over units, per sequence, summed over the batch (each sequence's
    gradient stays its own and does not shrink with the batch size). head_output (B, U), weight (U,)."""
    return (head_output * weight).pow(2).mean(dim=-1).sum()


class InnerGradient:
    """active while the gradient rule takes dL_t/dy_t (gradient_factors). That derivative reaches the layers
    above only through their inputs at token t (not through their weights, nor through earlier tokens'
    history), so FactoredRead and TokenLinear then compute their input's gradient alone."""
    active = False


@torch.compiler.disable  # runs as written under torch.compile, so that InnerGradient is set while autograd runs
def gradient_factors(records, loss, create_graph):
    """Gradient rule (Duan et al.): G_t = dL_t/dF for this token alone. With y = x (W + F) + b,
    dL_t/dF = pre_t ⊗ dL_t/dy_t: autograd gives dL_t/dy_t, the outer product the rest."""
    InnerGradient.active = True
    try:
        deltas = torch.autograd.grad(loss, [y for _, y, _ in records], create_graph=create_graph)
    finally:
        InnerGradient.active = False
    return [(pre, delta) for (pre, _, _), delta in zip(records, deltas)]


def update_norm(factors):
    """||G_t||: one norm over all plastic layers, per sequence, with ||pre ⊗ post|| = ||pre|| ||post||.
    Each vector's norm is taken once (under the Hebbian rule a block's hidden activity is the first
    layer's post and the second layer's pre), and vectors of one width together, as one stacked norm."""
    vectors = list({id(v): v for factor in factors for v in factor}.values())  # each once, (B, width)
    norms = {}  # id of a vector -> its norm (B,)
    for width in sorted({v.size(-1) for v in vectors}):
        same = [v for v in vectors if v.size(-1) == width]
        norms |= zip(map(id, same), torch.linalg.vector_norm(torch.stack(same), dim=-1).unbind())  # (k, B)
    per_layer = torch.stack([norms[id(pre)] * norms[id(post)] for pre, post in factors], dim=-1)  # (B, layers)
    return torch.linalg.vector_norm(per_layer, dim=-1)  # (B,)


def bounded_rate(rate, norm, max_norm):
    """eta_t *= max_norm / ||G_t|| where ||G_t|| > max_norm, so that the step's ||step G_t|| <= eta_t max_norm."""
    return rate * max_norm / norm.clamp_min(max_norm)  # (B,)


def fast_weight_update(fast, pre, post, coef, step, decay):
    """F_{t+1} = (1 - lambda_t) F_t + eta_t A ⊙ (pre_t ⊗ post_t). fast (B, in, out); pre (B, in);
    post (B, out); coef A (in, out); step eta_t (B,); decay lambda_t (B,) or a float."""
    if torch.is_tensor(decay):
        decay = decay[:, None, None]
    return (1 - decay) * fast + coef * (step[:, None, None] * pre.unsqueeze(2) * post.unsqueeze(1))


def decayed_scale(scale, step, decay):
    """The coefficients of F_{t+1}'s rank-1 terms (FactoredFastWeight): c_{s,t+1} = (1 - lambda_t) c_{s,t}
    for the earlier terms, c_{t,t+1} = eta_t for the new one. eta_t and lambda_t are per sequence, so every
    layer has the same coefficients: they are computed once per token. scale (B, S); step eta_t (B,);
    decay lambda_t (B,) or a float -> (B, S+1)."""
    decay = decay.unsqueeze(1) if torch.is_tensor(decay) else decay
    return torch.cat([(1 - decay) * scale, step.unsqueeze(1)], dim=1)


def factored_read(x, pre, post, scale, coef):
    """x F_t = sum_s c_s post_s ⊙ ((x ⊙ pre_s) A), the plain form. x (B, in), or (B, Q, in) for Q tokens that
    read the same F_t; pre (B, S, in); post (B, S, out); scale c (B, S); coef A (in, out) -> (B, out) or
    (B, Q, out). Under autograd it keeps (B, Q, S, in) and (B, Q, S, out) tensors for the backward pass: in the
    token loop, at every token, memory that grows as T^2 (FactoredRead keeps none); the queries read once."""
    if x.dim() == 3:
        pre, post, scale = pre.unsqueeze(1), post.unsqueeze(1), scale.unsqueeze(1)  # (B, 1, S, ...): one F_t for all Q
    return ((x.unsqueeze(-2) * pre) @ coef * post * scale.unsqueeze(-1)).sum(dim=-2)


class FactoredRead(torch.autograd.Function):
    """factored_read(x, pre[:, :S], post[:, :S], scale, coef) with S = scale.size(1), where pre (B, T, in) and
    post (B, T, out) are history buffers (AppendRow): it keeps only its inputs, views of the buffers, and
    its backward pass recomputes the rest, so a sequence's memory grows as T, not T^2. With
    v_s = (g ⊙ post_s) A^T and u_s = x ⊙ pre_s, the derivatives of out = factored_read(...) for an upstream
    gradient g (B, out):
        dx = sum_s c_s pre_s ⊙ v_s        (the same read, pre and post swapped, A transposed)
        dpre_s = c_s x ⊙ v_s,  dpost_s = c_s g ⊙ (u_s A),  dc_s = <g ⊙ post_s, u_s A> = <u_s, v_s>,
        dA = sum_{b,s} c_s u_s^T (g ⊙ post_s)
    Under create_graph (the gradient rule differentiates its own update) dx is computed by this Function
    too, so the second-order pass stays as lean; the other derivatives are then plain autograd operations.
    While InnerGradient.active the backward pass computes dx alone."""

    @staticmethod
    def forward(ctx, x, pre, post, scale, coef):
        ctx.save_for_backward(x, pre, post, scale, coef)
        S = scale.size(1)
        read = (x.unsqueeze(1) * pre[:, :S]) @ coef  # (B, S, out)  (x ⊙ pre_s) A
        return torch.bmm(scale.unsqueeze(1), read * post[:, :S]).squeeze(1)  # factored_read's sum, as one product

    @staticmethod
    def backward(ctx, grad):  # grad (B, out)
        x, pre, post, scale, coef = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph: dx differentiable, with this Function's memory
            dx = FactoredRead.apply(grad, post, pre, scale, coef.t())
            if InnerGradient.active:
                return dx, None, None, None, None
        S, T = scale.size(1), pre.size(1)
        pre_read, post_read, c = pre[:, :S], post[:, :S], scale.unsqueeze(-1)  # (B, S, in), (B, S, out), (B, S, 1)
        gq = grad.unsqueeze(1) * post_read  # (B, S, out)  g ⊙ post_s
        v = gq @ coef.t()  # (B, S, in)
        w = v * pre_read  # (B, S, in)  pre_s ⊙ v_s
        if not torch.is_grad_enabled():
            dx = torch.bmm(scale.unsqueeze(1), w).squeeze(1)  # (B, in)
            if InnerGradient.active:
                return dx, None, None, None, None
        dscale = torch.bmm(w, x.unsqueeze(-1)).squeeze(-1)  # (B, S): <u_s A, g ⊙ post_s> = <x ⊙ pre_s, v_s>
        cu = c * (x.unsqueeze(1) * pre_read)  # (B, S, in)  c_s u_s
        dcoef = cu.flatten(0, 1).t() @ gq.flatten(0, 1)  # (in, out)
        dpre = F.pad(c * v * x.unsqueeze(1), (0, 0, 0, T - S))  # (B, T, in): rows >= S were not read
        dpost = F.pad(grad.unsqueeze(1) * (cu @ coef), (0, 0, 0, T - S))  # (B, T, out)
        return dx, dpre, dpost, dscale, dcoef


class AppendRow(torch.autograd.Function):
    """rows.select(dim, t) = row, in place, returned as a new tensor on the same memory: a history buffer
    that grows token by token without a copy per token. Rows before t are never written again, so what an
    earlier token's operation kept for its backward pass (a view of rows before its own t) still holds
    what it read. The returned tensor has a version counter of its own (it is `rows.data`), so autograd
    does not take the later writes for changes to what was kept. Backward: the buffer's gradient passes
    through, and its row t is the row's (a view, so the two share memory; autograd sums into a gradient
    in place only where nothing else refers to its memory).
    torch.compile would trace this Function, FactoredRead and TokenLinear into graphs that lose what
    they rely on (the shared memory, the tape), and so compute wrong gradients: the methods that call
    them are marked torch.compiler.disable, so that they run as written between compiled parts."""

    @staticmethod
    def forward(ctx, rows, row, dim, t):
        ctx.dim, ctx.t = dim, t
        out = rows.data  # the same memory, a version counter of its own
        out.select(dim, t).copy_(row)
        return out

    @staticmethod
    def backward(ctx, grad):
        return grad, grad.select(ctx.dim, ctx.t), None, None  # a view: autograd then never adds into grad in place


class TokenLinear(torch.autograd.Function):
    """y = x W + b for one token of the loop; W (in, out), b (out,) the slow weights, used at every token.
    Autograd would compute dW = x^T g and db = sum g at every token and add them up (a product, a sum and
    two additions per layer per token). Here the backward pass keeps (x, g) on the layer's tape instead,
    and WeightTape, whose output every token used, runs after all of them and takes dW = X^T G over all
    tokens at once. Under create_graph all three gradients come as autograd's, differentiable; while
    InnerGradient.active only dx."""

    @staticmethod
    def forward(ctx, x, weight, bias, tape):
        ctx.save_for_backward(x, weight)
        ctx.tape = tape
        return torch.addmm(bias, x, weight)  # (B, out)

    @staticmethod
    def backward(ctx, grad):  # grad (B, out)
        x, weight = ctx.saved_tensors
        dx = grad @ weight.t()  # (B, in)
        if InnerGradient.active:
            return dx, None, None, None
        if torch.is_grad_enabled():
            return dx, x.t() @ grad, grad.sum(0), None
        ctx.tape.append((x, grad))
        return dx, None, None, None


class WeightTape(torch.autograd.Function):
    """(W, b) -> the same (W, b), for TokenLinear at every token, with the tape those tokens keep (x, g) on.
    Every token takes its output, so its backward pass runs after theirs: dW = X^T G and db = sum G over
    the tape, added to the gradients it receives (from create_graph's second-order terms; zeros otherwise)."""

    @staticmethod
    def forward(ctx, weight, bias, tape):
        ctx.tape = tape
        return weight.view_as(weight), bias.view_as(bias)

    @staticmethod
    def backward(ctx, dweight, dbias):
        if ctx.tape:
            x, g = (torch.cat(z) for z in zip(*ctx.tape))  # (tokens B, in), (tokens B, out)
            dweight, dbias = torch.addmm(dweight, x.t(), g), dbias + g.sum(0)
            ctx.tape.clear()
        return dweight, dbias, None


class TokenLinears:
    """The slow linear layers that the token loop applies at every token, each behind a WeightTape:
    linears(layer, x) is layer(x) for one token x (B, in), by TokenLinear. For nn.Linear (weight (out, in))
    and PlasticLinear (weight (in, out)) alike."""

    @torch.compiler.disable  # see AppendRow
    def __init__(self, layers):
        self.taped = {}
        for layer in layers:
            weight = layer.weight.t() if isinstance(layer, nn.Linear) else layer.weight  # (in, out)
            tape = []
            self.taped[layer] = (*WeightTape.apply(weight, layer.bias, tape), tape)

    @torch.compiler.disable  # see AppendRow
    def __call__(self, layer, x):
        weight, bias, tape = self.taped[layer]
        return TokenLinear.apply(x, weight, bias, tape)


class FactoredFastWeight:
    """The same F_t kept as its history of rank-1 terms instead of a (B, in, out) matrix:
    F_t = sum_{s<t} c_{s,t} A ⊙ (pre_s ⊗ post_s), c_{s,t} = eta_s prod_{s<r<t} (1 - lambda_r).
    pre_s and post_s are rows of (B, T, in) and (B, T, out) buffers written once each (AppendRow); the
    coefficients scale (B, S) of the S terms so far. Memory grows with T * (in + out) instead of in * out;
    reading it costs a matrix product (FactoredRead). It holds any rule whose update is one outer product per
    layer, scaled by A, with one rate and one decay per sequence shared by every layer (both rules here); a rule
    with a decay per unit (Oja's) or an update of higher rank needs the dense form (--fast-form dense)."""

    def __init__(self, pre, post, scale):
        self.pre, self.post, self.scale = pre, post, scale  # (B, T, in), (B, T, out), (B, S)

    @staticmethod
    def empty(B, T, d_in, d_out, like):
        return FactoredFastWeight(like.new_zeros(B, T, d_in), like.new_zeros(B, T, d_out), like.new_zeros(B, 0))

    @torch.compiler.disable  # see AppendRow
    def matmul(self, x, coef):
        """x F_t = sum_s c_s post_s ⊙ ((x ⊙ pre_s) A): x (B, in) -> (B, out), or for the queries, which read
        F_t at once, x (B, Q, in) -> (B, Q, out) (the plain form: kept once, not per token)."""
        if x.dim() == 3:
            S = self.scale.size(1)
            return factored_read(x, self.pre[:, :S], self.post[:, :S], self.scale, coef)
        return FactoredRead.apply(x, self.pre, self.post, self.scale, coef)

    @torch.compiler.disable  # see AppendRow
    def update(self, pre, post, scale):
        """F_{t+1} = (1 - lambda_t) F_t + eta_t A ⊙ (pre_t ⊗ post_t): the new term written as row t, every term
        with its coefficient in scale = decayed_scale(self.scale, eta_t, lambda_t) (B, S+1)."""
        t = self.scale.size(1)
        return FactoredFastWeight(AppendRow.apply(self.pre, pre, 1, t), AppendRow.apply(self.post, post, 1, t), scale)

    def detach(self):
        return FactoredFastWeight(self.pre.detach(), self.post.detach(), self.scale.detach())

    def dense(self, coef):
        """The (B, in, out) matrix, for analysis and tests."""
        S = self.scale.size(1)
        return coef * torch.einsum("bs,bsi,bsj->bij", self.scale, self.pre[:, :S], self.post[:, :S])


# ----------------------------------------------------------------------------------------------
# Layers


class PlasticLinear(nn.Module):
    """y = x (W + F) + b with W (in, out) as in the equations; F (B, in, out) is passed in per call.
    A plastic layer also owns the learned plasticity coefficient A (in, out)."""

    def __init__(self, d_in, d_out, plastic, coef_init="positive"):
        super().__init__()
        self.in_features, self.out_features = d_in, d_out
        self.weight = nn.Parameter(torch.empty(d_in, d_out))  # W, initialised by PlasticGPT._init_weights
        self.bias = nn.Parameter(torch.zeros(d_out))  # b: slow only
        self.coef = None  # A
        if plastic:
            low, high = COEF_INITS[coef_init]
            self.coef = nn.Parameter(torch.empty(d_in, d_out).uniform_(low, high))

    def forward(self, x, fast=None, linears=None):  # linears: TokenLinears, in the token loop
        y = x @ self.weight + self.bias if linears is None else linears(self, x)  # (..., out)
        if isinstance(fast, FactoredFastWeight):
            y = y + fast.matmul(x, self.coef)
        elif fast is not None:  # x (B, in) for one token or (B, Q, in) for the queries, fast (B, in, out)
            y = y + (x.reshape(x.size(0), -1, x.size(-1)) @ fast).view_as(y)
        return y


class MLP(nn.Module):
    """Two (plastic) linear layers with a GELU between. Records, per layer, what the rules need:
    (input, linear output y, output after the nonlinearity), each (B, features)."""

    def __init__(self, config, plastic):
        super().__init__()
        C = config.d_model
        coef_init = config.coef_init or RULE_COEF_INIT.get(config.rule)
        self.fc = PlasticLinear(C, 4 * C, plastic, coef_init)
        self.gelu = nn.GELU()
        self.proj = PlasticLinear(4 * C, C, plastic, coef_init)

    def forward(self, x, fast=(None, None), linears=None):
        pre_activation = self.fc(x, fast[0], linears)  # (..., 4C)
        hidden = self.gelu(pre_activation)
        out = self.proj(hidden, fast[1], linears)  # (..., C); the second layer has no nonlinearity of its own
        return out, [(x, pre_activation, hidden), (hidden, out, out)]


def attention_mask(T, window, context, device):
    """(T, T) bool, query x key: what each token may attend to; None for plain causal attention.
    Causal, within the last `window` tokens (None: all), and with a context S: token t >= S (a query)
    attends to tokens < S and to itself only, never to another query."""
    if window is None and context is None:
        return None
    t = torch.arange(T, device=device)
    allowed = t[None, :] <= t[:, None]
    if window is not None:
        allowed &= t[None, :] > t[:, None] - window
    if context is not None:
        allowed &= (t[None, :] < context) | (t[None, :] == t[:, None])
    return allowed


class CausalSelfAttention(nn.Module):
    """Multi-head causal self-attention, optionally limited to a window of the last W tokens, and with a
    context S to queries that see the context and themselves alone (attention_mask).
    forward(): the whole sequence at once (fused kernel); step(): one token against a KV cache, with
    explicit softmax attention, which (unlike the fused kernels) has a second derivative."""

    def __init__(self, config):
        super().__init__()
        self.n_head, self.window, self.dropout = config.n_head, config.attn_window, config.dropout
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.proj = nn.Linear(config.d_model, config.d_model)

    def heads(self, x):  # x (B, T, C) -> q, k, v, (B, nh, T, hs) each
        B, T, C = x.shape
        return (z.view(B, T, self.n_head, C // self.n_head).transpose(1, 2) for z in self.qkv(x).split(C, dim=2))

    def forward(self, x, context=None):
        B, T, C = x.shape
        q, k, v = self.heads(x)  # (B, nh, T, hs)
        dropout = self.dropout if self.training else 0.0
        allowed = attention_mask(T, self.window, context, x.device)  # (T, T) query x key, or None
        if allowed is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed, dropout_p=dropout)
        y = y.transpose(1, 2).reshape(B, T, C)  # (B, T, C)
        return self.proj(y)

    def step(self, x, cache, linears):
        """x (B, C) is token t; cache holds the keys and values of tokens < t and receives token t's.
        linears: TokenLinears, which applies qkv and proj to one token."""
        B, C = x.shape
        q, k, v = linears(self.qkv, x).view(B, 3, self.n_head, C // self.n_head).unbind(1)  # (B, nh, hs) each
        cache.append(k, v)
        keys, values = cache.keys, cache.values  # (B, nh, L, hs), L = tokens attended to
        scores = (keys @ q.unsqueeze(-1)).squeeze(-1) / math.sqrt(q.size(-1))  # (B, nh, L)
        weights = F.dropout(scores.softmax(dim=-1), self.dropout, self.training)
        y = (weights.unsqueeze(-2) @ values).squeeze(-2)  # (B, nh, hs)
        return linears(self.proj, y.reshape(B, C))

    def read(self, x, cache, context):
        """x (B, Q, C) are the queries t = S.. after a context of S tokens, all at once: each attends to the
        context's keys in the cache (tokens < S, the last L of them) and to its own, never to another query's,
        within its window: attention_mask's rows S.. Explicit softmax attention, as step()."""
        B, Q, C = x.shape
        q, k, v = self.heads(x)  # (B, nh, Q, hs)
        keys, values = cache.keys, cache.values  # (B, nh, L, hs)
        L = keys.size(2)
        allowed = attention_mask(context + Q, self.window, context, x.device)[context:, context - L:context]  # (Q, L)
        scores = torch.cat([q @ keys.transpose(-2, -1), (q * k).sum(-1, keepdim=True)], dim=-1)  # (B, nh, Q, L + 1)
        allowed = torch.cat([allowed, allowed.new_ones(Q, 1)], dim=1)  # (Q, L + 1): its own key, always
        scores = scores.masked_fill(~allowed, float("-inf"))
        scores = scores / math.sqrt(q.size(-1))
        weights = F.dropout(scores.softmax(dim=-1), self.dropout, self.training)
        y = weights[..., :L] @ values + weights[..., L:] * v  # (B, nh, Q, hs)
        return self.proj(y.transpose(1, 2).reshape(B, Q, C))


class KVCache:
    """Keys and values of the tokens attended to so far, (B, nh, L, hs) each: all tokens, or the last W with
    a window. They are views of two (B, nh, T, hs) buffers that each token writes its own row into
    (AppendRow), so what autograd keeps for the backward pass is the buffers, once, not a copy of the
    cache per token: memory linear in T, and a constant number of operations per token.
    detach=True (evaluation) cuts earlier tokens' graphs, but keeps the current token's: under the
    gradient rule dL_t/dF_t flows through token t's own key and value in the blocks above."""

    def __init__(self, length, detach, window=None):
        self.length, self.detach, self.window = length, detach, window  # length T: the buffers' rows
        self.t, self.key_rows, self.value_rows = 0, None, None  # tokens written; buffers (B, nh, T, hs)
        self.keys = self.values = None  # (B, nh, L, hs): what token t attends to

    @torch.compiler.disable  # see AppendRow
    def append(self, k, v):  # k, v (B, nh, hs): the current token's
        if self.key_rows is None:
            self.key_rows, self.value_rows = (z.new_zeros(*z.shape[:2], self.length, z.size(-1)) for z in (k, v))
        rows = (self.key_rows, self.value_rows)
        if self.detach:
            rows = (z.detach() for z in rows)
        self.key_rows, self.value_rows = (AppendRow.apply(z, new, 2, self.t) for z, new in zip(rows, (k, v)))
        self.t += 1
        first = 0 if self.window is None else max(0, self.t - self.window)
        self.keys, self.values = self.key_rows[:, :, first:self.t], self.value_rows[:, :, first:self.t]


class Block(nn.Module):
    """Pre-LayerNorm transformer block: h = h + attn(ln(h)); h = h + mlp(ln(h))."""

    def __init__(self, config, plastic):
        super().__init__()
        self.plastic = plastic
        self.ln_1 = nn.LayerNorm(config.d_model)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.d_model)
        self.mlp = MLP(config, plastic)
        self.drop = nn.Dropout(config.dropout)

    def forward(self, h, context=None):  # (B, T, C), static weights
        h = self.attend(h, context)
        return h + self.drop(self.mlp(self.ln_2(h))[0])

    def attend(self, h, context=None):  # (B, T, C): the attention half, every token at once
        return h + self.drop(self.attn(self.ln_1(h), context))

    def step(self, h, cache, linears, fast=(None, None)):  # h (B, C): one token; cache None: h has attended already
        if cache is not None:
            h = h + self.drop(self.attn.step(self.ln_1(h), cache, linears))
        out, records = self.mlp(self.ln_2(h), fast, linears)
        return h + self.drop(out), records

    def read(self, h, cache, context, fast=(None, None)):  # h (B, Q, C): the queries after a context; cache as step's
        if cache is not None:
            h = h + self.drop(self.attn.read(self.ln_1(h), cache, context))
        return h + self.drop(self.mlp(self.ln_2(h), fast)[0])


class Conv4(nn.Module):
    """The standard few-shot image encoder: 4 x (3x3 conv, batch norm, ReLU, 2x2 max pool), 64 channels
    in each block; R2D2's wider one (Bertinetto et al. 2019) has 96, 192, 384 and 512."""

    def __init__(self, in_channels, widths=(64, 64, 64, 64)):
        super().__init__()
        layers = []
        for c_in, c_out in zip((in_channels, *widths[:-1]), widths):
            layers += [nn.Conv2d(c_in, c_out, 3, padding=1), nn.BatchNorm2d(c_out), nn.ReLU(), nn.MaxPool2d(2)]
        self.net = nn.Sequential(*layers)

    @staticmethod
    def out_features(image_shape, widths=(64, 64, 64, 64)):
        _, H, W = image_shape
        for _ in widths:
            H, W = H // 2, W // 2
        return widths[-1] * H * W  # 64 for 28x28 Omniglot, 256 for 32x32 CIFAR (at 64 channels)

    def forward(self, images):  # (N, C, H, W) -> (N, features)
        return self.net(images).flatten(1)


# ----------------------------------------------------------------------------------------------
# The model


class PlasticGPT(nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        C = config.d_model
        self.encoder = None
        d_token = config.d_in
        if config.image_shape is not None:
            self.encoder = Conv4(config.image_shape[0], config.conv4_widths())
            d_token += Conv4.out_features(config.image_shape, config.conv4_widths())
        self.embed = nn.Linear(d_token, C)
        self.pos = nn.Embedding(config.max_len, C) if config.positions else None
        self.blocks = nn.ModuleList(Block(config, config.is_plastic(i)) for i in range(config.n_layer))
        self.ln_f = nn.LayerNorm(C)
        # head units: [task outputs | extra units (gradient rule only) | modulator m_t (plastic, modulated)]
        self.n_extra = config.n_extra if config.rule == "gradient" else 0
        self.has_modulator = config.rule != "none" and config.modulation
        self.head = nn.Linear(C, config.d_out + self.n_extra + int(self.has_modulator))
        self.inner_loss_weight = None  # w of the gradient rule's inner loss, initialised to ones
        if config.rule == "gradient":
            self.inner_loss_weight = nn.Parameter(torch.ones(self.head.out_features))
        self.plastic_layers = [layer for b in self.blocks if b.plastic for layer in (b.mlp.fc, b.mlp.proj)]
        # the token loop starts at the first plastic block; the static model's (step_by_step) at block 0
        self.first_looped = next((i for i, b in enumerate(self.blocks) if b.plastic), 0)
        self._init_weights()

    def _init_weights(self):
        """"torch": every layer keeps PyTorch's default (linear layers U(-1/sqrt(in), 1/sqrt(in)), weights and
        biases), and the position embedding is N(0, 0.02) rather than nn.Embedding's N(0, 1). "gpt2": N(0, 0.02),
        residual projections N(0, 0.02 / sqrt(2 n_layer)), zero biases; with it no model left chance at
        attention window 1 (README, "What makes the fast weights work")."""
        if self.config.init == "torch":
            for layer in (layer for block in self.blocks for layer in (block.mlp.fc, block.mlp.proj)):
                bound = 1 / math.sqrt(layer.in_features)  # as nn.Linear initialises itself; W is (in, out) here
                nn.init.uniform_(layer.weight, -bound, bound)
                nn.init.uniform_(layer.bias, -bound, bound)
            if self.pos is not None:
                nn.init.normal_(self.pos.weight, std=0.02)
            return
        for name, p in self.named_parameters():
            if name.endswith("proj.weight"):
                nn.init.normal_(p, std=0.02 / math.sqrt(2 * self.config.n_layer))
            elif name.startswith(("embed", "pos", "blocks", "head")) and name.endswith("weight") and p.dim() == 2:
                nn.init.normal_(p, std=0.02)
            elif name.endswith("bias") and not name.startswith("encoder"):
                nn.init.zeros_(p)

    def num_params(self):
        return sum(p.numel() for p in self.parameters() if p.requires_grad)

    def forward(self, x, images=None, eta=None, step_by_step=False, fast_norm=True, context=None):
        """x (B, T, d_in), images (B, T, C, H, W) or None. eta overrides the config's (0.0: knock-out).
        context: None, or S: tokens S.. are queries that read tokens < S and themselves only and write no
        fast weight (their trace shows the rate eta_t they produce, a step and an update of 0).
        Returns out (B, T, d_out) and info: "eta" (B, T) the modulated rate eta_t before the bound,
        "step" (B, T) the rate after it, "update_norm" (B, T) ||G_t||, "fast_norm" (B, T) ||F_{t+1}||
        over all layers, and "fast_weights" the final F_T of every plastic layer (empty for "none").
        fast_norm=False leaves out "fast_norm" and "fast_weights" (plastic rules): they cost a pass over
        every fast weight per token (a matrix product per layer in the factored form), which training
        does not need. step_by_step=True runs the static model ("none") token by token with the KV
        cache too, as the plastic rules always run: the same result, a check of the cache."""
        B, T, _ = x.shape
        if T > self.config.max_len:
            raise ValueError(f"sequence of {T} tokens is longer than max_len={self.config.max_len}; raise max_len.")
        if context is not None and not 1 <= context <= T:
            raise ValueError(f"context = {context} must be between 1 and the sequence's {T} tokens (queries read a context).")
        if (images is None) != (self.encoder is None):
            raise ValueError("pass images exactly when the model has an image encoder (config.image_shape).")
        if images is not None:
            features = self.encoder(images.flatten(0, 1)).view(B, T, -1)  # (B, T, features)
            if self.config.image_norm:  # unnormalised they are ~10x (Omniglot) to ~20x (CIFAR) the label's length
                features = F.layer_norm(features, features.shape[-1:]) / math.sqrt(features.size(-1))  # (B, T, features)
            x = torch.cat([features, x], dim=-1)
        h = self.embed(x)  # (B, T, C)
        if self.pos is not None:
            h = h + self.pos(torch.arange(T, device=x.device))
        if self.config.rule == "none" and not step_by_step:
            out = self.head(self.ln_f(self._run_blocks(h, 0, len(self.blocks), context)))
            return out, self._static_info(out)
        # Under autocast (--amp) the token loop still computes in the weights' dtype: its fast weights add up over
        # the episode, its own autograd Functions compute their backward passes in one dtype, and a loop bound by
        # kernel launches gains nothing from bfloat16; the encoder and the static model's parallel blocks take it.
        with torch.autocast(h.device.type, enabled=False):
            h = h.to(self.embed.weight.dtype)  # (B, T, C): from autocast's bfloat16, if it was on
            return self._forward_token_by_token(h, self.config.base_rate() if eta is None else eta, fast_norm, context)

    @staticmethod
    def _static_info(out):
        """The static model's info: no plasticity, so zero traces (B, T) and no fast weights."""
        zeros = out.new_zeros(out.shape[:2])
        return dict(eta=zeros, step=zeros, update_norm=zeros, fast_norm=zeros, fast_weights=[])

    def _run_blocks(self, h, start, stop, context=None):
        for block in self.blocks[start:stop]:
            h = block(h, context)
        return h

    def _forward_token_by_token(self, h, eta, with_fast_norm, context=None):
        """The fast weights make the network recurrent: blocks below the first plastic block run in
        parallel, and so does that block's attention, whose input no fast weight has touched yet; the
        rest (for the static model: every block but the first's attention) one token at a time with a
        KV cache. With a context S only the context runs token by token: the queries write nothing, so
        they read the fast weights the context left, all at once (_answer_queries)."""
        cfg, rule = self.config, self.config.rule
        B, T, _ = h.shape
        h = self._run_blocks(h, 0, self.first_looped, context)
        looped = self.blocks[self.first_looped:]
        h = looped[0].attend(h, context)  # (B, T, C)
        writes = T if context is None else context  # tokens that update the fast weights, one at a time
        keep_graph = torch.is_grad_enabled()  # False in evaluation under torch.no_grad()
        caches = [None] + [KVCache(writes, detach=not keep_graph, window=cfg.attn_window) for _ in looped[1:]]
        per_token = [(b.attn.qkv, b.attn.proj, b.mlp.fc, b.mlp.proj) if cache is not None else (b.mlp.fc, b.mlp.proj)
                     for b, cache in zip(looped, caches)]  # the first looped block has attended already
        linears = TokenLinears([self.head] + [layer for layers in per_token for layer in layers])
        if cfg.fast_form == "dense":
            fast = [h.new_zeros(B, layer.in_features, layer.out_features) for layer in self.plastic_layers]
        else:
            fast = [FactoredFastWeight.empty(B, writes, layer.in_features, layer.out_features, h) for layer in self.plastic_layers]
        outputs, trace = [], []
        for t in range(writes):
            # the gradient rule needs autograd for its own update, also when evaluating without a graph
            with torch.enable_grad() if rule == "gradient" else nullcontext():
                x_t, records, layer = h[:, t], [], iter(fast)
                if rule == "gradient" and not x_t.requires_grad:  # frozen slow weights: dL_t/dy_t still needs a path
                    x_t = x_t.detach().requires_grad_()
                for block, cache in zip(looped, caches):
                    x_t, block_records = block.step(x_t, cache, linears, (next(layer), next(layer)) if block.plastic else (None, None))
                    records += block_records if block.plastic else []
                head_output = linears(self.head, self.ln_f(x_t))  # (B, units)
                if rule != "none":
                    fast, stats = self._update_fast_weights(fast, records, head_output, eta, keep_graph, with_fast_norm)
                    trace.append(stats)
            outputs.append(head_output[:, :cfg.d_out] if keep_graph else head_output[:, :cfg.d_out].detach())
        out = torch.stack(outputs, dim=1)  # (B, writes, d_out)
        info = {key: torch.stack([s[key] for s in trace], dim=1) for key in trace[0]} if trace else {}  # (B, writes) each
        if writes < T:
            answers = self._answer_queries(h[:, writes:], looped, caches, fast, context)  # (B, Q, units)
            out = torch.cat([out, answers[..., :cfg.d_out]], dim=1)  # (B, T, d_out)
            if rule != "none":
                reading = self._reading_stats(answers, eta, info, with_fast_norm)  # (B, Q) each
                info = {key: torch.cat([info[key], reading[key]], dim=1) for key in info}
        if rule == "none":
            return out, self._static_info(out)
        if with_fast_norm:
            with torch.no_grad():
                info["fast_weights"] = [self._dense(f, layer) for f, layer in zip(fast, self.plastic_layers)]
        return out, info

    def _answer_queries(self, h, looped, caches, fast, context):
        """The queries t >= S, at once: h (B, Q, C) after the first looped block's attention -> head outputs
        (B, Q, units). Each reads the fast weights the context left and attends to the context's keys in the
        caches and to its own (CausalSelfAttention.read): what it would compute alone after the context."""
        layer = iter(fast)
        for block, cache in zip(looped, caches):
            h = block.read(h, cache, context, (next(layer), next(layer)) if block.plastic else (None, None))
        return self.head(self.ln_f(h))

    def _rates(self, head_output, eta):
        """eta_t (B,) and lambda_t from the modulator unit m_t of token t's head output (B, units); (B, Q)
        from the queries' (B, Q, units)."""
        modulator = head_output[..., -1] if self.has_modulator else None  # m_t (B,) or (B, Q)
        rate, decay = modulated_rates(modulator, eta, self.config.decay)
        return (rate if torch.is_tensor(rate) else head_output.new_full(head_output.shape[:-1], rate)), decay

    def _reading_stats(self, answers, eta, written, with_fast_norm):
        """The trace of the queries, which write nothing, from their head outputs (B, Q, units): the rate each
        produces, no step, no update, and the fast weights' norm where the context's tokens (written) left it."""
        rate = self._rates(answers, eta)[0].detach()  # (B, Q)
        stats = dict(eta=rate, step=torch.zeros_like(rate), update_norm=torch.zeros_like(rate))
        if with_fast_norm:
            stats["fast_norm"] = written["fast_norm"][:, -1:].expand_as(rate)
        return stats

    def _update_fast_weights(self, fast, records, head_output, eta, keep_graph, with_fast_norm):
        """After token t's output: F_{t+1} = (1 - lambda_t) F_t + eta_t A ⊙ (pre_t ⊗ post_t), every plastic layer."""
        cfg = self.config
        rate, decay = self._rates(head_output, eta)
        if cfg.rule == "hebbian":
            factors = hebbian_factors(records)
        elif cfg.rule == "gradient":
            factors = gradient_factors(records, inner_loss(head_output, self.inner_loss_weight), keep_graph)
        else:  # a rule added to RULES says here what its pre and post are (README, "Adding a rule")
            raise NotImplementedError(f"rule {cfg.rule!r} has no update in PlasticGPT._update_fast_weights.")
        norm = update_norm(factors)  # (B,)
        step = bounded_rate(rate, norm, cfg.max_norm)
        if cfg.fast_form == "dense":
            fast = [fast_weight_update(f, pre, post, layer.coef, step, decay)
                    for f, (pre, post), layer in zip(fast, factors, self.plastic_layers)]
        else:
            scale = decayed_scale(fast[0].scale, step, decay)  # (B, S+1), every layer's
            fast = [f.update(pre, post, scale) for f, (pre, post) in zip(fast, factors)]
        if not keep_graph:  # evaluation: no graph may chain from token to token
            fast = [f.detach() for f in fast]
        stats = dict(eta=rate.detach(), step=step.detach(), update_norm=norm.detach())
        if with_fast_norm:
            with torch.no_grad():
                per_layer = [torch.linalg.vector_norm(self._dense(f, layer), dim=(1, 2)) for f, layer in zip(fast, self.plastic_layers)]
                stats["fast_norm"] = torch.linalg.vector_norm(torch.stack(per_layer, dim=-1), dim=-1)  # (B,)
        return fast, stats

    @staticmethod
    def _dense(fast, layer):
        return fast.dense(layer.coef) if isinstance(fast, FactoredFastWeight) else fast
