"""A tiny text benchmark for end-to-end runs on CPU: a 2-layer BERT with a 14-word vocabulary saved as a local Hugging
Face model, and four intents whose utterances use their own words (two tasks of two intents)."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "the", "a", "cat", "dog", "sat", "on", "mat", "ran", "far"]
INTENTS = {"pets": ["cat", "dog"], "rest": ["sat", "on", "mat"], "move": ["ran", "far"], "words": ["the", "a"]}


def tiny_text_benchmark(root: Path, train: int = 8, test: int = 4, seed: int = 0) -> Path:
    """Write the model (``root/model``) and ``train.csv``/``test.csv`` (``root``); returns ``root``."""
    from transformers import BertConfig, BertModel, BertTokenizerFast

    model_dir = root / "model"
    model_dir.mkdir(parents=True, exist_ok=True)
    (model_dir / "vocab.txt").write_text("\n".join(VOCAB) + "\n")
    tokenizer = BertTokenizerFast.from_pretrained(str(model_dir), local_files_only=True)
    torch.manual_seed(seed)
    config = BertConfig(vocab_size=len(VOCAB), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(str(model_dir))
    tokenizer.save_pretrained(str(model_dir))
    gen = torch.Generator().manual_seed(seed)
    for split, n in (("train", train), ("test", test)):
        lines = ["text,label"]
        for label, words in INTENTS.items():
            for _ in range(n):
                picks = torch.randint(len(words), (int(torch.randint(2, 6, (1,), generator=gen)),), generator=gen)
                lines.append(f"{' '.join(words[i] for i in picks.tolist())},{label}")
        (root / f"{split}.csv").write_text("\n".join(lines) + "\n")
    return root


def tiny_text_overrides(root: Path) -> list[str]:
    """Config overrides running the tiny text benchmark in ``root`` (two tasks, natural class order)."""
    return [f"model.backbone={root / 'model'}", "model.max_length=8", "data.name=text-files",
            f"data.data_dir={root}", "data.options={train: train.csv, test: test.csv}", "scenario.num_tasks=2",
            "scenario.order=natural", "train.progress=false", "train.batch_size=8", "train.eval_batch_size=16",
            "train.lr=0.01", "classifier=linear"]
