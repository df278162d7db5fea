"""Token-level seam into a frozen backbone, for prompt-based continual learning (L2P, DualPrompt, CODA-Prompt).

A :class:`TokenSeam` runs a backbone step by step, reusing its own modules (no backbone code is copied):
``embed`` -> ``prepend`` (prompt tokens) -> ``run_blocks`` (optional prefix keys/values per block) -> ``pool``.
:func:`token_seam` builds one from an inflora ``TimmBackbone``/``HFTextBackbone``, a timm ``VisionTransformer`` or a
BERT-family encoder (``BertModel``, ``RobertaModel``, ...)::

    seam = token_seam(backbone)
    feats = seam.features(inputs, prompts=prompt, prefixes={0: (pk, pv), 1: (pk, pv)})
    seam.remove()  # original attention modules back

Attention wrappers: each block's attention (timm ``blocks[i].attn``, BERT ``layer[i].attention.self``) is replaced
on its parent by a :class:`PrefixAttention`. Without a prefix it calls the original module (bit-identical output);
with one it computes attention from the original's submodules (``qkv``/``q_norm``/``k_norm``/``proj``..., or
``query``/``key``/``value``), always calling them so LoRA-wrapped projections keep working, and appends the prefix
keys/values (split into heads; ``k_norm`` is not applied to them) to the sequence's for
:func:`torch.nn.functional.scaled_dot_product_attention`. The wrapper shares the original's child/parameter/buffer
dicts: module names and ``state_dict`` keys are unchanged (``blocks.0.attn.qkv`` stays valid for adapter presets
and checkpoints), and submodules replaced while wrapped stay in place after :meth:`TokenSeam.remove`.

Prefixes: ``{block: (pk, pv)}`` or ``{block: (pk, pv, keep)}``; ``pk``/``pv`` ``(P, D)`` or ``(B, P, D)`` in the
attention width ``D`` (before the head split); ``keep`` an optional ``(P,)``/``(B, P)`` bool mask (False = not
attendable). Prefix positions are otherwise always attendable; padding of real text tokens stays masked. Blocks
outside ``[start, stop)`` of a ``run_blocks`` call are ignored. A prefix of ZERO keys/values is NOT a no-op:
``exp(q·0) = 1`` takes softmax weight from the real tokens; use ``P = 0`` or ``keep=False`` for "no prefix".

Pooling (``pool(tokens, skip=P)``, ``P`` = prompt tokens inserted by ``prepend``):

* ViT: the ``P`` prompt tokens after the CLS/register tokens are dropped, then the model's own final ``norm`` and
  ``forward_head(x, pre_logits=True)`` run, so every timm pooling (``token``, ``avg``, ``max``, ``map``, ...) acts
  as on the plain model and averages never include prompts. Image token masks are ignored by pooling.
* Text: as ``HFTextBackbone``: ``"mean"`` (mean of real tokens by mask, prompts excluded) or ``"cls"`` (first
  token), then optional L2 normalisation. Prompts are inserted after ``[CLS]``.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["BertSeam", "PrefixAttention", "Prefixes", "TimmViTSeam", "TokenSeam", "Tokens", "token_seam"]

Prefixes = Mapping[int, tuple[Tensor, ...]]
TEXT_KEYS = ("input_ids", "attention_mask", "token_type_ids", "position_ids")


@dataclass(frozen=True)
class Tokens:
    """A token sequence: ``x`` ``(B, N, D)`` and ``mask`` ``(B, N)`` bool (True = real token) or ``None``."""

    x: Tensor
    mask: Tensor | None = None


def _extend_mask(mask: Tensor | None, keep: Tensor | None, batch: int, n: int, p: int, like: Tensor) -> Tensor | None:
    """Append ``p`` prefix key positions to an attention mask (bool: True = attend; float: additive)."""
    if mask is None and keep is None:
        return None
    if mask is None:
        mask = torch.ones(batch, 1, 1, n, dtype=torch.bool, device=like.device)
    keep = torch.ones(batch, p, dtype=torch.bool, device=like.device) if keep is None else keep.to(like.device)
    if mask.dim() != 4:
        raise ValueError(f"prefix attention needs a 4-d attention mask (B, 1|H, 1|N, N), got {tuple(mask.shape)}")
    keep = keep.expand(batch, p).view(batch, 1, 1, p)
    if mask.dtype != torch.bool:
        keep = torch.where(keep, 0.0, torch.finfo(mask.dtype).min).to(mask.dtype)
    lead = torch.broadcast_shapes(mask.shape[:-1], (batch, 1, 1))
    return torch.cat([mask.expand(*lead, n), keep.expand(*lead, p)], dim=-1)


class PrefixAttention(nn.Module):
    """Wraps an attention module; see the module docstring. ``prefix`` = ``(pk, pv, keep)`` or ``None``.

    ``inner`` (the original module) is held unregistered; its child, parameter and buffer dicts are shared.
    """

    prefix: tuple[Tensor, Tensor, Tensor | None] | None

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.__dict__["inner"] = inner
        for attr in ("_modules", "_parameters", "_buffers", "_non_persistent_buffers_set"):
            self.__dict__[attr] = inner.__dict__[attr]
        self.training = inner.training
        self.prefix = None

    def __getattr__(self, name: str) -> Any:
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("inner")
            if inner is None:
                raise
            return getattr(inner, name)

    def train(self, mode: bool = True) -> PrefixAttention:
        super().train(mode)
        self.inner.training = mode
        return self

    def _heads(self, t: Tensor, heads: int) -> Tensor:
        return t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2)

    def _attend(self, q: Tensor, k: Tensor, v: Tensor, mask: Tensor | None, scale: float, p: float) -> Tensor:
        """``q, k, v`` ``(B, H, N, d)`` + prefix -> attention output ``(B, N, H * d)``."""
        assert self.prefix is not None
        pk, pv, keep = self.prefix
        batch, heads, n = q.shape[:3]
        k = torch.cat([k, self._heads(pk.to(k.dtype), heads)], dim=2)
        v = torch.cat([v, self._heads(pv.to(v.dtype), heads)], dim=2)
        mask = _extend_mask(mask, keep, batch, n, pk.shape[1], q)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, dropout_p=p if self.training else 0.0,
                                             scale=scale)
        return out.transpose(1, 2).reshape(batch, n, -1)


class TimmPrefixAttention(PrefixAttention):
    """Wraps a timm ``Attention`` (``qkv``, ``q_norm``, ``k_norm``, ``attn_drop``, ``norm``, ``proj``, ...)."""

    def forward(self, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        inner = self.inner
        inner.training = self.training
        if self.prefix is None:
            return inner(x, *args, **kwargs)
        attn_mask = kwargs.get("attn_mask", args[0] if args else None)
        if kwargs.get("is_causal", args[1] if len(args) > 1 else False):
            raise ValueError("prefix attention does not support is_causal")
        batch, n, _ = x.shape
        heads = inner.num_heads
        g = inner.gate(x).sigmoid() if getattr(inner, "gate", None) is not None else None
        q, k, v = inner.qkv(x).reshape(batch, n, 3, heads, -1).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = inner.q_norm(q), inner.k_norm(k)
        out = self._attend(q, k, v, attn_mask, inner.scale, inner.attn_drop.p)
        out = getattr(inner, "norm", nn.Identity())(out)
        if g is not None:
            out = out * g
        return inner.proj_drop(inner.proj(out))


class BertPrefixAttention(PrefixAttention):
    """Wraps a BERT-family self-attention (``query``, ``key``, ``value``, ``dropout``, ``num_attention_heads``)."""

    def forward(self, hidden_states: Tensor, attention_mask: Tensor | None = None, *args: Any, **kwargs: Any) -> Any:
        inner = self.inner
        inner.training = self.training
        if self.prefix is None:
            return inner(hidden_states, attention_mask, *args, **kwargs)
        if kwargs.get("encoder_hidden_states") is not None:
            raise ValueError("prefix attention does not support cross-attention")
        heads = inner.num_attention_heads
        q, k, v = (self._heads(m(hidden_states), heads) for m in (inner.query, inner.key, inner.value))
        scale = getattr(inner, "scaling", None) or inner.attention_head_size**-0.5
        return self._attend(q, k, v, attention_mask, scale, inner.dropout.p), None


def _batched(t: Tensor, batch: int, what: str, width: int) -> Tensor:
    if t.dim() == 2:
        t = t.unsqueeze(0).expand(batch, -1, -1)
    if t.dim() != 3 or t.shape[-1] != width:
        raise ValueError(f"{what} must be (P, {width}) or (B, P, {width}), got {tuple(t.shape)}")
    if t.shape[0] != batch:
        raise ValueError(f"{what} has batch size {t.shape[0]}, the tokens have {batch}")
    return t


class TokenSeam:
    """Token-level access to a backbone: embed -> prepend -> run_blocks -> pool. See the module docstring.

    Attributes: ``model``; ``dim`` (token width D); ``num_blocks``; ``modality`` (``"image"``/``"text"``);
    ``num_prefix_tokens`` (tokens before the inserted prompts: ViT CLS + registers, text 1 for ``[CLS]``).
    """

    model: nn.Module
    dim: int
    num_blocks: int
    modality: Literal["image", "text"]
    num_prefix_tokens: int

    def __init__(self, model: nn.Module, sites: list[tuple[nn.Module, str]], wrapper: type[PrefixAttention]) -> None:
        self.model = model
        self.num_blocks = len(sites)
        if any(isinstance(getattr(parent, name), PrefixAttention) for parent, name in sites):
            raise ValueError(f"{type(model).__name__} already has a token seam installed: remove() it first")
        self._installed: list[tuple[nn.Module, str, nn.Module]] = [(p, n, getattr(p, n)) for p, n in sites]
        self._wrappers: list[PrefixAttention] = [wrapper(original) for _, _, original in self._installed]
        for (parent, name, _), wrapped in zip(self._installed, self._wrappers, strict=True):
            setattr(parent, name, wrapped)

    def embed(self, inputs: Any) -> Tokens:
        """Backbone inputs -> token embeddings (positions included)."""
        raise NotImplementedError

    def _block(self, index: int, tokens: Tokens) -> Tokens:
        raise NotImplementedError

    def pool(self, tokens: Tokens, *, skip: int = 0) -> Tensor:
        """Final tokens -> the backbone's pooled ``(B, D)`` feature, ignoring ``skip`` prepended prompt tokens."""
        raise NotImplementedError

    @property
    def attention_width(self) -> int:
        """Width of prefix keys/values (= ``dim`` for standard models)."""
        return self.dim

    def prepend(self, tokens: Tokens, prompts: Tensor) -> Tokens:
        """Insert ``prompts`` ``(P, D)``/``(B, P, D)`` after the first ``num_prefix_tokens`` tokens."""
        x, mask = tokens.x, tokens.mask
        prompts = _batched(prompts, x.shape[0], "prompts", self.dim).to(x.dtype)
        at = self.num_prefix_tokens
        x = torch.cat([x[:, :at], prompts, x[:, at:]], dim=1)
        if mask is not None:
            mask = torch.cat([mask[:, :at], mask.new_ones(mask.shape[0], prompts.shape[1]), mask[:, at:]], dim=1)
        return Tokens(x, mask)

    def _drop_prompts(self, tokens: Tokens, skip: int) -> Tokens:
        """``tokens`` without the ``skip`` prompt tokens after the first ``num_prefix_tokens``."""
        x, mask, at = tokens.x, tokens.mask, self.num_prefix_tokens
        if not 0 <= skip <= x.shape[1] - at:
            raise ValueError(f"skip={skip} out of range for {x.shape[1]} tokens")
        if skip:
            x = torch.cat([x[:, :at], x[:, at + skip:]], dim=1)
            mask = None if mask is None else torch.cat([mask[:, :at], mask[:, at + skip:]], dim=1)
        return Tokens(x, mask)

    def run_blocks(self, tokens: Tokens, *, prefixes: Prefixes | None = None, start: int = 0,
                   stop: int | None = None) -> Tokens:
        """Run blocks ``start..stop-1`` (default all), with optional prefix keys/values per block."""
        stop = self.num_blocks if stop is None else stop
        if not 0 <= start <= stop <= self.num_blocks:
            raise ValueError(f"need 0 <= start <= stop <= {self.num_blocks}, got start={start}, stop={stop}")
        batch = tokens.x.shape[0]
        ready: dict[int, tuple[Tensor, Tensor, Tensor | None]] = {}
        for index, prefix in (prefixes or {}).items():
            if not 0 <= index < self.num_blocks:
                raise IndexError(f"prefix block index {index} out of range for {self.num_blocks} blocks")
            if len(prefix) not in (2, 3):
                raise ValueError(f"prefix of block {index} must be (pk, pv) or (pk, pv, keep)")
            pk = _batched(prefix[0], batch, f"prefix keys of block {index}", self.attention_width)
            pv = _batched(prefix[1], batch, f"prefix values of block {index}", self.attention_width)
            if pk.shape != pv.shape:
                raise ValueError(f"prefix keys {tuple(pk.shape)} and values {tuple(pv.shape)} of block {index} differ")
            keep = prefix[2] if len(prefix) == 3 else None
            if keep is not None and (keep.dtype != torch.bool or keep.shape[-1] != pk.shape[1] or keep.dim() > 2):
                raise ValueError(f"prefix keep mask of block {index} must be bool (P,) or (B, P)")
            if pk.shape[1] > 0:
                ready[index] = (pk, pv, keep)
        if ready and not self._wrappers:
            raise RuntimeError("this token seam was removed: prefixes need its attention wrappers")
        for index in range(start, stop):
            wrapper = self._wrappers[index] if index in ready else None
            if wrapper is not None:
                wrapper.prefix = ready[index]
            try:
                tokens = self._block(index, tokens)
            finally:
                if wrapper is not None:
                    wrapper.prefix = None
        return tokens

    def features(self, inputs: Any, *, prompts: Tensor | None = None, prefixes: Prefixes | None = None) -> Tensor:
        """embed -> prepend -> run_blocks -> pool; the plain backbone feature when prompts/prefixes are None."""
        tokens = self.embed(inputs)
        skip = 0
        if prompts is not None:
            tokens = self.prepend(tokens, prompts)
            skip = prompts.shape[-2]
        return self.pool(self.run_blocks(tokens, prefixes=prefixes), skip=skip)

    def remove(self) -> None:
        """Put the original attention modules back (idempotent). Prefixes are unusable afterwards."""
        for parent, name, original in self._installed:
            original.train(getattr(parent, name).training)
            setattr(parent, name, original)
        self._installed, self._wrappers = [], []


class TimmViTSeam(TokenSeam):
    """Seam into a timm ``VisionTransformer`` (inputs: ``(B, C, H, W)`` images)."""

    modality = "image"

    def __init__(self, model: nn.Module) -> None:
        if not all(hasattr(getattr(b, "attn", None), a) for b in model.blocks for a in ("qkv", "num_heads", "proj")):
            raise TypeError(f"the blocks of {type(model).__name__} lack a timm Attention with a fused qkv")
        super().__init__(model, [(block, "attn") for block in model.blocks], TimmPrefixAttention)
        self.dim = int(model.embed_dim)
        self.num_prefix_tokens = int(model.num_prefix_tokens)

    @property
    def attention_width(self) -> int:
        attn = self.model.blocks[0].attn
        return int(getattr(attn, "attn_dim", None) or attn.num_heads * attn.head_dim)

    def embed(self, inputs: Any) -> Tokens:
        if not isinstance(inputs, Tensor):
            raise TypeError(f"image inputs must be a (B, C, H, W) Tensor, got {type(inputs).__name__}")
        m = self.model
        return Tokens(m.norm_pre(m.patch_drop(m._pos_embed(m.patch_embed(inputs)))))

    def _block(self, index: int, tokens: Tokens) -> Tokens:
        block = self.model.blocks[index]
        if tokens.mask is None:
            return Tokens(block(tokens.x))
        return Tokens(block(tokens.x, attn_mask=tokens.mask[:, None, None, :]), tokens.mask)

    def pool(self, tokens: Tokens, *, skip: int = 0) -> Tensor:
        x = self._drop_prompts(tokens, skip).x
        return self.model.forward_head(self.model.norm(x), pre_logits=True)


class BertSeam(TokenSeam):
    """Seam into a BERT-family encoder (inputs: a Mapping with ``input_ids`` and optional ``attention_mask``,
    ``token_type_ids``, ``position_ids``; or an ``input_ids`` Tensor). ``pooling`` ``"mean"``/``"cls"``."""

    modality = "text"
    num_prefix_tokens = 1

    def __init__(self, model: nn.Module, *, pooling: str = "mean", normalize: bool = False) -> None:
        if pooling not in ("mean", "cls"):
            raise ValueError(f"pooling must be 'mean' or 'cls', got {pooling!r}")
        if getattr(model.config, "is_decoder", False):
            raise TypeError(f"{type(model).__name__} is a decoder: the token seam supports encoders only")
        super().__init__(model, [(layer.attention, "self") for layer in model.encoder.layer], BertPrefixAttention)
        self.dim = int(model.config.hidden_size)
        self.pooling = pooling
        self.normalize = bool(normalize)

    def embed(self, inputs: Any) -> Tokens:
        if isinstance(inputs, Tensor):
            inputs = {"input_ids": inputs}
        if not isinstance(inputs, Mapping) or "input_ids" not in inputs:
            raise TypeError("text inputs must be an input_ids Tensor or a Mapping with 'input_ids'")
        unknown = sorted(set(inputs) - set(TEXT_KEYS))
        if unknown:
            raise TypeError(f"unsupported text input keys {unknown}; known: {', '.join(TEXT_KEYS)}")
        ids, mask = inputs["input_ids"], inputs.get("attention_mask")
        mask = torch.ones_like(ids, dtype=torch.bool) if mask is None else mask.bool()
        x = self.model.embeddings(input_ids=ids, token_type_ids=inputs.get("token_type_ids"),
                                  position_ids=inputs.get("position_ids"))
        project = getattr(self.model, "embeddings_project", None)  # ELECTRA: embedding -> hidden width
        return Tokens(x if project is None else project(x), mask)

    def _block(self, index: int, tokens: Tokens) -> Tokens:
        x, mask = tokens.x, tokens.mask
        additive = None if mask is None else torch.zeros(mask.shape, dtype=x.dtype, device=x.device).masked_fill(
            ~mask, torch.finfo(x.dtype).min)[:, None, None, :]  # additive mask: eager and sdpa attention accept it
        out = self.model.encoder.layer[index](x, additive)
        return Tokens(out[0] if isinstance(out, tuple) else out, mask)

    def pool(self, tokens: Tokens, *, skip: int = 0) -> Tensor:
        tokens = self._drop_prompts(tokens, skip)
        x, mask = tokens.x, tokens.mask
        if self.pooling == "cls":
            feats = x[:, 0]
        else:
            weights = torch.ones_like(x[..., :1]) if mask is None else mask.unsqueeze(-1).to(x.dtype)
            feats = (x * weights).sum(dim=1) / weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(feats, dim=-1) if self.normalize else feats


def _is_bert_like(model: nn.Module) -> bool:
    layers = getattr(getattr(model, "encoder", None), "layer", None)
    return hasattr(model, "embeddings") and hasattr(model, "config") and isinstance(layers, nn.ModuleList) and all(
        hasattr(getattr(getattr(layer, "attention", None), "self", None), a)
        for layer in layers for a in ("query", "key", "value")) and len(layers) > 0


def token_seam(backbone_or_model: nn.Module, *, pooling: str | None = None,
               normalize: bool | None = None) -> TokenSeam:
    """A :class:`TokenSeam` for an inflora ``TimmBackbone``/``HFTextBackbone`` or a raw timm ``VisionTransformer``
    / BERT-family encoder. ``pooling``/``normalize`` override the text pooling (default: the backbone's, else
    ``"mean"``, no normalisation); they are rejected for images. Installs the attention wrappers."""
    from .backbones import HFTextBackbone, TimmBackbone

    obj = backbone_or_model
    if isinstance(obj, HFTextBackbone):
        pooling = pooling or obj.pooling
        normalize = obj.normalize if normalize is None else normalize
        obj = obj.model
    elif isinstance(obj, TimmBackbone):
        obj = obj.model
    from timm.models.vision_transformer import VisionTransformer

    if isinstance(obj, VisionTransformer):
        if pooling is not None or normalize is not None:
            raise ValueError("pooling/normalize apply to text backbones; a ViT pools with its own forward_head")
        return TimmViTSeam(obj)
    if isinstance(obj, nn.Module) and _is_bert_like(obj):
        return BertSeam(obj, pooling=pooling or "mean", normalize=bool(normalize))
    hint = " (pass its encoder, e.g. model.base_model)" if hasattr(obj, "base_model") else ""
    raise TypeError(
        f"token_seam supports timm VisionTransformer and BERT-family encoders (embeddings + encoder.layer[i]."
        f"attention.self.query/key/value), or inflora TimmBackbone/HFTextBackbone; got {type(obj).__name__}{hint}"
    )
