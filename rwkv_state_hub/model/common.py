"""What RWKV v5.2, v6 and v7 share: embedding, layer norms, token shift, the block loop and the head.

The module tree mirrors the official checkpoint keys (`blocks.3.att.key.weight` is
`model.blocks[3].att.key.weight`), so loading is `load_state_dict` and nothing else.
Every weight is frozen. Matrices run in the checkpoint's dtype (fp32/fp16/bf16); everything else,
the residual stream and all the state maths, runs in the compute dtype: fp32 (fp64 for gradient checks).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..checkpoint import ModelSpec
from .quant import QuantizedLinear

GROUP_NORM_EPS = 64e-5  # the per-head norm of ln_x, as the rwkv pip package and RWKV-LM (x / 8, eps 1e-5)


@dataclass
class RecurrentState:
    """The whole recurrent state of a batch: what a forward pass starts from and hands back.

    wkv:   [B, L, H, N, N] fp32, layout [head, value, key]
    att_x: [B, L, C] fp32, the last (normed) input of each time-mix (token shift)
    ffn_x: [B, L, C] fp32, the same for each channel-mix
    A batch size of 1 broadcasts over any batch (autograd sums the gradient back).
    """

    wkv: Tensor
    att_x: Tensor
    ffn_x: Tensor

    @classmethod
    def zeros(
        cls, spec: ModelSpec, batch: int = 1, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> RecurrentState:
        L, C, H, N = spec.n_layer, spec.n_embd, spec.n_head, spec.head_size
        z = dict(dtype=dtype, device=device)
        return cls(torch.zeros(batch, L, H, N, N, **z), torch.zeros(batch, L, C, **z), torch.zeros(batch, L, C, **z))

    @property
    def batch_size(self) -> int:
        return self.wkv.shape[0]

    def expand(self, batch: int) -> RecurrentState:
        if self.batch_size == batch:
            return self
        if self.batch_size != 1:
            raise ValueError(f"a state of batch {self.batch_size} cannot serve a batch of {batch}")
        return RecurrentState(*(t.expand(batch, *t.shape[1:]) for t in (self.wkv, self.att_x, self.ffn_x)))

    def tensors(self) -> tuple[Tensor, Tensor, Tensor]:
        return self.wkv, self.att_x, self.ffn_x

    def detach(self) -> RecurrentState:
        return RecurrentState(self.wkv.detach(), self.att_x.detach(), self.ffn_x.detach())

    def clone(self) -> RecurrentState:
        return RecurrentState(self.wkv.clone(), self.att_x.clone(), self.ffn_x.clone())

    def select(self, index: int) -> RecurrentState:
        """The state of one sequence of the batch, as a batch of one."""
        return RecurrentState(self.wkv[index : index + 1], self.att_x[index : index + 1], self.ffn_x[index : index + 1])


class LearnedState(nn.Module):
    """The only trainable thing: the initial wkv state of every layer [L, H, N, N] fp32 and, for a
    "full state", the two token-shift vectors of every layer [L, 2, C]. Call it to get a RecurrentState
    of batch 1, which the model broadcasts over any batch."""

    def __init__(self, spec: ModelSpec, full_state: bool = False, wkv: Tensor | None = None,
                 shift: Tensor | None = None):
        super().__init__()
        L, C = spec.n_layer, spec.n_embd
        self.wkv = nn.Parameter(torch.zeros(spec.state_shape()) if wkv is None else wkv.detach().float().clone())
        init_shift = torch.zeros(L, 2, C) if shift is None else shift.detach().float().clone()
        if full_state:
            self.shift = nn.Parameter(init_shift)
        else:
            self.register_buffer("shift", init_shift)

    @property
    def full_state(self) -> bool:
        return isinstance(self.shift, nn.Parameter)

    def forward(self) -> RecurrentState:
        return RecurrentState(self.wkv[None], self.shift[None, :, 0], self.shift[None, :, 1])


class EncodedState(nn.Module):
    """A LearnedState reparameterised for training: each layer's wkv state is an MLP of a small learned
    embedding (prefix tuning's trick; RWKV-StateTuning reports it trains better). Only the resulting plain
    state is ever saved, so consumers see no difference. The output layer starts at zero: so does the state."""

    def __init__(self, spec: ModelSpec, full_state: bool = False, embed: int = 32, hidden: int = 64):
        super().__init__()
        L, C, H, N = spec.n_layer, spec.n_embd, spec.n_head, spec.head_size
        self._shape = (L, H, N, N)
        self.embedding = nn.Parameter(torch.randn(L, embed))
        self.w1 = nn.Parameter(torch.randn(L, embed, hidden) / embed**0.5)
        self.b1 = nn.Parameter(torch.zeros(L, hidden))
        self.w2 = nn.Parameter(torch.zeros(L, hidden, H * N * N))
        self.b2 = nn.Parameter(torch.zeros(L, H * N * N))
        if full_state:
            self.shift = nn.Parameter(torch.zeros(L, 2, C))
        else:
            self.register_buffer("shift", torch.zeros(L, 2, C))

    @property
    def full_state(self) -> bool:
        return isinstance(self.shift, nn.Parameter)

    @property
    def wkv(self) -> Tensor:
        h = torch.tanh(torch.einsum("le,leh->lh", self.embedding, self.w1) + self.b1)
        return (torch.einsum("lh,lhs->ls", h, self.w2) + self.b2).view(self._shape)

    def encoder_parameters(self) -> list[nn.Parameter]:
        return [self.embedding, self.w1, self.b1, self.w2, self.b2]

    def forward(self) -> RecurrentState:
        return RecurrentState(self.wkv[None], self.shift[None, :, 0], self.shift[None, :, 1])


def linear(x: Tensor, layer: nn.Linear | QuantizedLinear) -> Tensor:
    """The matmul in the weight's own dtype (bf16 checkpoints stay bf16); the result in x's dtype (fp32).
    A quantized matrix (quant.py) dequantizes a block of its rows at a time into that dtype."""
    if isinstance(layer, QuantizedLinear):
        return layer(x)
    w = layer.weight
    return F.linear(x.to(w.dtype), w).to(x.dtype)


def lora(x: Tensor, a: Tensor, b: Tensor, act=torch.tanh) -> Tensor:
    """The small low-rank maps of v6/v7: act(x @ a) @ b."""
    return act(x @ a) @ b


def token_shift(x: Tensor, prev: Tensor) -> Tensor:
    """x [B, T, C] -> the previous token's x at each position; `prev` [B, C] stands before position 0."""
    return torch.cat((prev[:, None, :], x[:, :-1, :]), dim=1)


def last_valid(x: Tensor, prev: Tensor, mask: Tensor | None) -> Tensor:
    """x at each sequence's last real token (right padding); `prev` for a sequence with no tokens."""
    if mask is None:
        return x[:, -1, :]
    lengths = mask.sum(dim=1)
    idx = (lengths - 1).clamp(min=0)
    picked = x[torch.arange(x.shape[0], device=x.device), idx]
    return torch.where((lengths > 0)[:, None], picked, prev)


def head_norm(y: Tensor, ln_x: nn.GroupNorm) -> Tensor:
    """ln_x: a group norm over each head's channels. y [B, T, H, N] -> [B, T, C]."""
    B, T, H, N = y.shape
    out = F.group_norm(y.reshape(B * T, H * N), H, ln_x.weight, ln_x.bias, GROUP_NORM_EPS)
    return out.view(B, T, H * N)


def neutral_where_padded(mask: Tensor | None, k: Tensor, v: Tensor, log_w: Tensor, *extra: Tensor):
    """At padding positions, make the recurrence an identity: k = v = 0, decay 1 (and v7's a = b = 0)."""
    if mask is None:
        return (k, v, log_w, *extra)
    m = mask[:, :, None, None].to(k.dtype)
    return (k * m, v * m, log_w * m, *(t * m for t in extra))


def backward_from(outputs: list[Tensor], grads: list[Tensor]) -> None:
    """torch.autograd.backward(outputs, grads) through one scalar, the sum of each output's dot product with its
    gradient, whose gradient to each output is exactly that gradient: handed explicit gradients,
    torch.autograd.backward imports torch.fx's symbolic shapes to check their sizes (sympy: 60 MiB of RSS).
    Empties both lists, so that what only they held goes as soon as the backward pass is done with it."""
    with torch.enable_grad():  # also inside a backward pass (_Recomputed's)
        total = sum(torch.dot(o.reshape(-1), g.reshape(-1)) for o, g in zip(outputs, grads, strict=True))
    outputs.clear()
    grads.clear()
    torch.autograd.backward(total)


class _Recomputed(torch.autograd.Function):
    """A block that keeps no activations: it runs without a graph, and again with one in the backward pass
    (activation checkpointing). Not torch.utils.checkpoint: that imports torch._dynamo on first use (70 MiB of
    RSS for the whole run)."""

    @staticmethod
    def forward(ctx, block: nn.Module, mask: Tensor | None, *inputs: Tensor | None):
        ctx.block, ctx.mask = block, mask
        ctx.set_materialize_grads(False)  # an output nothing used: no gradient to run back, not zeros
        ctx.save_for_backward(*inputs)
        with torch.no_grad():
            return block(*inputs, mask)

    @staticmethod
    def backward(ctx, *grads: Tensor | None):
        needs = ctx.needs_input_grad[2:]
        inputs = [t if t is None else t.detach().requires_grad_(need)
                  for t, need in zip(ctx.saved_tensors, needs, strict=True)]
        with torch.enable_grad():
            outputs = ctx.block(*inputs, ctx.mask)
        pairs = [(o, g) for o, g in zip(outputs, grads, strict=True) if g is not None and o.requires_grad]
        if pairs:
            backward_from([o for o, _ in pairs], [g for _, g in pairs])
        return None, None, *(t.grad if need else None for t, need in zip(inputs, needs, strict=True))


class Block(nn.Module):
    def __init__(self, spec: ModelSpec, layer_id: int, att: nn.Module, ffn: nn.Module):
        super().__init__()
        C = spec.n_embd
        self.layer_id = layer_id
        if layer_id == 0:
            self.ln0 = nn.LayerNorm(C)
        self.ln1 = nn.LayerNorm(C)
        self.ln2 = nn.LayerNorm(C)
        self.att = att
        self.ffn = ffn

    def forward(self, x, att_x, wkv, ffn_x, v_first, mask):
        if self.layer_id == 0:
            x = self.ln0(x)
        h = self.ln1(x)
        out, wkv, v_first = self.att(h, token_shift(h, att_x), wkv, v_first, mask)
        att_x = last_valid(h, att_x, mask)
        x = x + out
        h = self.ln2(x)
        x = x + self.ffn(h, token_shift(h, ffn_x))
        ffn_x = last_valid(h, ffn_x, mask)
        return x, att_x, wkv, ffn_x, v_first


class RWKV(nn.Module):
    """A frozen RWKV model. `forward(tokens, state, mask)` -> (logits [B, T, V], final RecurrentState)."""

    def __init__(self, spec: ModelSpec, time_mix: type[nn.Module], channel_mix: type[nn.Module]):
        super().__init__()
        self.spec = spec
        # from_pretrained: no random init. Built on the meta device (model.build_model), nn.Embedding's own normal_
        # would import torch's Python decompositions (sympy, mpmath: 820 modules, 67 MiB of RSS) for nothing
        self.emb = nn.Embedding.from_pretrained(torch.empty(spec.vocab_size, spec.n_embd))
        self.blocks = nn.ModuleList(
            Block(spec, i, time_mix(spec, i), channel_mix(spec, i)) for i in range(spec.n_layer)
        )
        self.ln_out = nn.LayerNorm(spec.n_embd)
        self.head = nn.Linear(spec.n_embd, spec.vocab_size, bias=False)
        self.recompute_layers = 0  # the first n blocks recompute their activations in the backward pass

    @property
    def gradient_checkpointing(self) -> bool:
        """Recompute every block's activations in the backward pass (see `recompute_layers`)."""
        return self.recompute_layers >= len(self.blocks)

    @gradient_checkpointing.setter
    def gradient_checkpointing(self, on: bool) -> None:
        self.recompute_layers = len(self.blocks) if on else 0

    def forward(
        self, tokens: Tensor, state: RecurrentState | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, RecurrentState]:
        """tokens [B, T] (right-padded when `mask` [B, T] marks the real tokens).

        The final state of each sequence is the state after its last real token.
        """
        hidden, final = self.hidden(tokens, state, mask)
        return linear(hidden, self.head), final

    def hidden(
        self, tokens: Tensor, state: RecurrentState | None = None, mask: Tensor | None = None
    ) -> tuple[Tensor, RecurrentState]:
        """Like forward, but stops before the head: the normed output [B, T, C] (for a loss in chunks)."""
        B, T = tokens.shape
        dtype = self.ln_out.weight.dtype  # fp32 (fp64 for gradient checks)
        state = (state or RecurrentState.zeros(self.spec, B, tokens.device, dtype)).expand(B)
        if mask is not None:
            mask = mask.bool()
            if T > 0 and bool(mask.all()):
                mask = None  # no padding (every micro-batch of one sample): nothing to neutralise, no masking work
        x = self.emb(tokens).to(dtype)
        v_first = None
        att_xs, wkvs, ffn_xs = [], [], []
        # one unbind, not a select per layer: the backward of a select builds a zero tensor of the whole state
        # for each layer's gradient, that of an unbind stacks them once
        wkv_in, att_in, ffn_in = (t.unbind(1) for t in state.tensors())
        for i, block in enumerate(self.blocks):
            args = (x, att_in[i], wkv_in[i], ffn_in[i], v_first, mask)
            if i < self.recompute_layers and torch.is_grad_enabled():
                x, att_x, wkv, ffn_x, v_first = _Recomputed.apply(block, mask, *args[:-1])
            else:
                x, att_x, wkv, ffn_x, v_first = block(*args)
            att_xs.append(att_x)
            wkvs.append(wkv)
            ffn_xs.append(ffn_x)
        return self.ln_out(x), RecurrentState(torch.stack(wkvs, 1), torch.stack(att_xs, 1), torch.stack(ffn_xs, 1))

    @torch.no_grad()
    def step(self, token: int | Tensor, state: RecurrentState | None = None) -> tuple[Tensor, RecurrentState]:
        """RNN mode: one token per sequence ([B] or an int), continuing from any state."""
        tokens = torch.as_tensor(token, device=self.emb.weight.device).reshape(-1, 1)
        logits, state = self(tokens, state)
        return logits[:, -1], state

    # ------------------------------------------------------------ the notebook API: load, generate, evaluate

    @classmethod
    def from_pretrained(cls, model: str | os.PathLike, *, dtype: torch.dtype | None = None,
                        device: str | torch.device = "cpu", token: str | None = None, quant: str | None = None) -> RWKV:
        """A frozen model from a BlinkDL `.pth` checkpoint: a local path, or hf://owner/repo/file.pth (downloaded
        through huggingface_hub's cache). Read safely (weights only, memory-mapped); `dtype` for the matrices
        (default: as stored); `quant` "int8" or "nf4" stores them quantized (model/quant.py)."""
        from ..hub import resolve_model
        from . import load_model

        return load_model(resolve_model(model, token=token), dtype=dtype, device=device, quant=quant)

    @property
    def tokenizer(self):
        """The tokenizer that fits this model (World for a 65536 vocabulary, bytes for 256); set it to change."""
        if getattr(self, "_tokenizer", None) is None:
            from ..tokenizer import get_tokenizer

            self._tokenizer = get_tokenizer(None, self.spec)
        return self._tokenizer

    @tokenizer.setter
    def tokenizer(self, value) -> None:
        self._tokenizer = value

    def _recurrent(self, state, force: bool) -> RecurrentState | None:
        """A State (checked against this model: ModelMismatchError unless it fits) or a RecurrentState."""
        from ..state import State

        if isinstance(state, State):
            state.check(self.spec, force=force)
            return state.to_recurrent(device=self.emb.weight.device)
        return state

    def generate(self, prompt: str, *, state=None, max_tokens: int | None = None, force: bool = False,
                 sampling=None, **changes: float) -> str:
        """Continue `prompt` from `state` (a State, a RecurrentState, or None for the zero state) with the one
        sampler of `rwkv-state generate` (same defaults, same seed, same text). Any sampling setting can be
        changed by name: generate(..., temperature=0, seed=1)."""
        from ..generate import DEFAULT_SAMPLING, generate

        if max_tokens is not None:
            changes["max_tokens"] = max_tokens
        return generate(self, self.tokenizer, prompt, self._recurrent(state, force), sampling or DEFAULT_SAMPLING,
                        **changes)

    def evaluate(self, data, *, state=None, ctx_len: int = 512, batch_size: int = 8, force: bool = False):
        """Mean loss (nats per token) and next-token accuracy over the trained tokens of `data` (paths, or a list
        of records as a .jsonl line holds them), starting each sample from `state`; returns an EvalResult."""
        from ..data import load_dataset
        from ..evaluate import evaluate

        samples = load_dataset(data, self.tokenizer, ctx_len, self.spec.vocab_size)
        return evaluate(self, samples, self._recurrent(state, force), batch_size=batch_size,
                        device=self.emb.weight.device)
