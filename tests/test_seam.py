"""Token seam: tiny timm ViT and tiny BERT on CPU, eval mode."""

from __future__ import annotations

import math
from typing import Any

import pytest
import torch
from torch import nn

from conftest import tiny_bert, tiny_vit
from inflora import attach
from inflora.backbones import HFTextBackbone, TimmBackbone
from inflora.seam import PrefixAttention, Tokens, TokenSeam, token_seam

ATOL = 1e-6


def _images(seed: int = 1, batch: int = 3) -> torch.Tensor:
    return torch.randn(batch, 3, 32, 32, generator=torch.Generator().manual_seed(seed))


def _text(seed: int = 1, lengths: tuple[int, ...] = (7, 4, 9), extra_pad: int = 0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    width = max(lengths) + extra_pad
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    mask = torch.zeros(len(lengths), width, dtype=torch.long)
    for i, n in enumerate(lengths):
        ids[i, :n] = torch.randint(5, 60, (n,), generator=g)
        ids[i, 0] = 2  # [CLS]
        mask[i, :n] = 1
    return {"input_ids": ids, "attention_mask": mask}


def _vit(**kwargs: Any) -> nn.Module:
    if not kwargs:
        return tiny_vit(depth=2).eval()
    import timm

    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, num_classes=0,
                             depth=2, embed_dim=48, num_heads=3, **kwargs).eval()


def _case(kind: str) -> tuple[nn.Module, TokenSeam, Any]:
    """(plain backbone callable, seam, inputs)."""
    if kind == "vit":
        model = _vit()
        return model, token_seam(model), _images()
    if kind == "vit-avg-reg":
        model = _vit(global_pool="avg", reg_tokens=2)
        return model, token_seam(model), _images()
    if kind == "timm-backbone":
        bb = TimmBackbone("vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, depth=2,
                          embed_dim=48, num_heads=3).eval()
        return bb, token_seam(bb), _images()
    pooling, normalize = {"bert-mean": ("mean", False), "bert-cls": ("cls", False), "bert-norm": ("mean", True)}[kind]
    bb = HFTextBackbone.from_model(tiny_bert(), None, pooling=pooling, normalize=normalize).eval()
    return bb, token_seam(bb), _text()


def _plain(backbone: nn.Module, inputs: Any) -> torch.Tensor:
    return backbone(**inputs) if isinstance(inputs, dict) else backbone(inputs)


def _prefixes(seam: TokenSeam, p: int = 3, seed: int = 2, scale: float = 1.0) -> dict[int, tuple[torch.Tensor, ...]]:
    g = torch.Generator().manual_seed(seed)
    return {i: (scale * torch.randn(p, seam.dim, generator=g), scale * torch.randn(p, seam.dim, generator=g))
            for i in range(seam.num_blocks)}


KINDS = ["vit", "vit-avg-reg", "timm-backbone", "bert-mean", "bert-cls", "bert-norm"]


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_plain_features_and_remove(kind: str) -> None:
    backbone, seam, inputs = _case(kind)
    model = seam.model
    seam.remove()
    keys = list(model.state_dict())
    originals = list(model.modules())
    expected = _plain(backbone, inputs)
    seam = token_seam(backbone)
    assert sum(isinstance(m, PrefixAttention) for m in model.modules()) == seam.num_blocks
    assert list(model.state_dict()) == keys  # module names unchanged while wrapped
    assert torch.allclose(seam.features(inputs), expected, atol=ATOL)
    assert torch.equal(_plain(backbone, inputs), expected)  # wrappers without prefix: bit-identical
    # running the blocks in pieces is the same as in one go
    tokens = seam.run_blocks(seam.embed(inputs), stop=1)
    assert torch.allclose(seam.pool(seam.run_blocks(tokens, start=1)), expected, atol=ATOL)
    seam.remove()
    seam.remove()
    assert list(model.modules()) == originals
    assert torch.equal(_plain(backbone, inputs), expected)


@pytest.mark.parametrize("kind", KINDS)
@torch.no_grad()
def test_noop_and_effective_prompts_and_prefixes(kind: str) -> None:
    backbone, seam, inputs = _case(kind)
    base = _plain(backbone, inputs)
    empty = torch.zeros(0, seam.dim)
    assert torch.allclose(seam.features(inputs, prompts=empty), base, atol=ATOL)
    assert torch.allclose(seam.features(inputs, prefixes={0: (empty, empty)}), base, atol=ATOL)
    # a prefix whose positions are masked out runs the wrapper's own attention and gives the plain feature
    masked = {i: (pk, pv, torch.zeros(3, dtype=torch.bool)) for i, (pk, pv) in _prefixes(seam).items()}
    assert torch.allclose(seam.features(inputs, prefixes=masked), base, atol=ATOL)
    # a random prefix, a random prompt and a ZERO prefix all change the feature
    prompt = torch.randn(4, seam.dim, generator=torch.Generator().manual_seed(3))
    zero = {0: (torch.zeros(3, seam.dim), torch.zeros(3, seam.dim))}
    for kw in ({"prefixes": _prefixes(seam)}, {"prompts": prompt}, {"prefixes": zero}):
        assert not torch.allclose(seam.features(inputs, **kw), base, atol=1e-4), kw
    seam.remove()


@torch.no_grad()
def test_vit_prompts_inserted_after_prefix_tokens_and_excluded_from_avg() -> None:
    model = _vit(global_pool="avg", reg_tokens=2)
    seam = token_seam(model)
    assert seam.num_prefix_tokens == 3
    x = _images()
    prompt = torch.randn(3, 4, seam.dim)
    tokens = seam.prepend(seam.embed(x), prompt)
    assert torch.equal(tokens.x[:, 3:7], prompt)
    out = model.norm(seam.run_blocks(tokens).x)
    expected = model.fc_norm(out[:, 7:].mean(dim=1))
    assert torch.allclose(seam.features(x, prompts=prompt), expected, atol=ATOL)
    seam.remove()


@pytest.mark.parametrize("kind", ["bert-mean", "bert-cls"])
@torch.no_grad()
def test_text_padding_never_attended_nor_pooled(kind: str) -> None:
    _, seam, inputs = _case(kind)
    padded = _text(extra_pad=5)
    assert padded["input_ids"].shape[1] == inputs["input_ids"].shape[1] + 5
    prompt = torch.randn(3, seam.dim, generator=torch.Generator().manual_seed(4))
    tokens = seam.prepend(seam.embed(inputs), prompt)
    assert tokens.mask is not None and tokens.mask[:, 1:4].all()
    kw = {"prompts": prompt, "prefixes": _prefixes(seam)}
    assert torch.allclose(seam.features(padded, **kw), seam.features(inputs, **kw), atol=1e-5)
    seam.remove()


@pytest.mark.parametrize("kind", ["vit", "bert-mean"])
def test_gradients_reach_prompts_and_prefixes_only(kind: str) -> None:
    backbone, seam, inputs = _case(kind)
    for p in backbone.parameters():
        p.requires_grad_(False)
    before = {k: v.clone() for k, v in backbone.state_dict().items()}
    prompt = torch.randn(2, seam.dim, requires_grad=True)
    pk = torch.randn(3, 2, seam.dim, requires_grad=True)  # per-sample prefix
    pv = torch.randn(3, 2, seam.dim, requires_grad=True)
    opt = torch.optim.SGD([prompt, pk, pv], lr=0.1)
    seam.features(inputs, prompts=prompt, prefixes={1: (pk, pv)}).pow(2).sum().backward()
    for t in (prompt, pk, pv):
        assert t.grad is not None and t.grad.abs().sum() > 0
    opt.step()
    assert all(not p.requires_grad and p.grad is None for p in backbone.parameters())
    assert all(torch.equal(v, before[k]) for k, v in backbone.state_dict().items())
    seam.remove()


class LowRank(nn.Module):
    """A LoRA-like wrapper: base Linear plus a low-rank delta."""

    def __init__(self, base: nn.Linear, rank: int = 2, scale: float = 0.5) -> None:
        super().__init__()
        self.base = base
        self.down = nn.Parameter(torch.randn(rank, base.in_features) * scale)
        self.up = nn.Parameter(torch.randn(base.out_features, rank) * scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.base(x) + x @ self.down.T @ self.up.T


def _wrap_kv(model: nn.Module) -> None:
    """Replace the k/v projections by LowRank wrappers (timm: the fused qkv)."""
    if hasattr(model, "blocks"):
        for block in model.blocks:
            block.attn.qkv = LowRank(block.attn.qkv)
    else:
        for layer in model.encoder.layer:
            layer.attention.self.key = LowRank(layer.attention.self.key)
            layer.attention.self.value = LowRank(layer.attention.self.value)


@pytest.mark.parametrize("kind", ["vit", "bert-mean"])
@pytest.mark.parametrize("wrap_first", [True, False])
@torch.no_grad()
def test_lora_wrapped_projections(kind: str, wrap_first: bool) -> None:
    backbone, seam, inputs = _case(kind)
    model = seam.model
    plain_prefixed = seam.features(inputs, prefixes=_prefixes(seam))
    if wrap_first:
        seam.remove()
        torch.manual_seed(5)
        _wrap_kv(model)
        seam = token_seam(backbone)
    else:  # wrapped while the seam is installed: the attention wrappers see the new projections
        torch.manual_seed(5)
        _wrap_kv(model)
    assert sum(isinstance(m, LowRank) for m in model.modules()) > 0
    base = _plain(backbone, inputs)
    masked = {i: (pk, pv, torch.zeros(3, dtype=torch.bool)) for i, (pk, pv) in _prefixes(seam).items()}
    assert torch.allclose(seam.features(inputs), base, atol=ATOL)
    assert torch.allclose(seam.features(inputs, prefixes=masked), base, atol=ATOL)
    assert not torch.allclose(seam.features(inputs, prefixes=_prefixes(seam)), plain_prefixed, atol=1e-4)
    seam.remove()
    assert sum(isinstance(m, LowRank) for m in model.modules()) > 0  # replacements survive remove()
    assert torch.equal(_plain(backbone, inputs), base)


def _reference_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, heads: int) -> torch.Tensor:
    """Eager multi-head attention over (B, N, D) projections."""
    b, n, d = q.shape
    q, k, v = (t.view(b, -1, heads, d // heads).transpose(1, 2) for t in (q, k, v))
    w = (q @ k.transpose(-1, -2) / math.sqrt(d // heads)).softmax(-1)
    return (w @ v).transpose(1, 2).reshape(b, n, d)


@torch.no_grad()
def test_prefix_attention_matches_eager_reference() -> None:
    g = torch.Generator().manual_seed(6)
    vit_seam = token_seam(_vit())
    bert_seam = token_seam(tiny_bert())
    for seam, attn in ((vit_seam, vit_seam.model.blocks[0].attn),
                       (bert_seam, bert_seam.model.encoder.layer[0].attention.self)):
        d = seam.dim
        x, pk, pv = (torch.randn(2, n, d, generator=g) for n in (5, 3, 3))
        assert isinstance(attn, PrefixAttention)
        attn.prefix = (pk, pv, None)
        if seam.modality == "image":
            got = attn(x)
            q, k, v = attn.qkv(x).chunk(3, dim=-1)
            expected = attn.proj(_reference_attention(q, torch.cat([k, pk], 1), torch.cat([v, pv], 1), attn.num_heads))
        else:
            got = attn(x)[0]
            k, v = torch.cat([attn.key(x), pk], 1), torch.cat([attn.value(x), pv], 1)
            expected = _reference_attention(attn.query(x), k, v, attn.num_attention_heads)
        attn.prefix = None
        assert torch.allclose(got, expected, atol=1e-5)
        seam.remove()


@torch.no_grad()
def test_inflora_attach_sees_same_sites() -> None:
    model = _vit()
    seam = token_seam(model)
    adapter = attach(model, "timm-vit-kv", rank=2)
    assert len(adapter.sites) == seam.num_blocks
    x = _images()
    assert torch.allclose(seam.features(x, prefixes=_prefixes(seam, p=0)), model(x), atol=ATOL)
    adapter.detach()
    seam.remove()
    assert isinstance(model.blocks[0].attn.qkv, nn.Linear)


def test_errors() -> None:
    _, seam, x = _case("vit")
    tokens = seam.embed(x)
    assert isinstance(tokens, Tokens) and tokens.mask is None
    with pytest.raises(ValueError, match="prompts"):
        seam.prepend(tokens, torch.zeros(2, seam.dim + 1))
    with pytest.raises(ValueError, match="batch size"):
        seam.prepend(tokens, torch.zeros(5, 2, seam.dim))
    pk = torch.zeros(2, seam.dim)
    with pytest.raises(IndexError, match="out of range"):
        seam.run_blocks(tokens, prefixes={seam.num_blocks: (pk, pk)})
    with pytest.raises(IndexError, match="out of range"):
        seam.run_blocks(tokens, prefixes={-1: (pk, pk)})
    with pytest.raises(ValueError, match="differ"):
        seam.run_blocks(tokens, prefixes={0: (pk, torch.zeros(3, seam.dim))})
    with pytest.raises(ValueError, match="prefix keys"):
        seam.run_blocks(tokens, prefixes={0: (torch.zeros(2, 7), pk)})
    with pytest.raises(ValueError, match="start"):
        seam.run_blocks(tokens, start=1, stop=seam.num_blocks + 1)
    with pytest.raises(ValueError, match="skip"):
        seam.pool(tokens, skip=10_000)
    with pytest.raises(ValueError, match="already has a token seam"):
        token_seam(seam.model)
    with pytest.raises(ValueError, match="pooling"):
        token_seam(_vit(), pooling="cls")
    with pytest.raises(TypeError, match="Tensor"):
        seam.embed({"input_ids": torch.zeros(1, 3, dtype=torch.long)})
    seam.remove()
    with pytest.raises(RuntimeError, match="removed"):
        seam.run_blocks(tokens, prefixes={0: (pk, pk)})
    with pytest.raises(TypeError, match="VisionTransformer"):
        token_seam(nn.Linear(3, 3))
    bert = token_seam(tiny_bert())
    with pytest.raises(TypeError, match="keys"):
        bert.embed({**_text(), "labels": torch.zeros(3)})
    bert.remove()
