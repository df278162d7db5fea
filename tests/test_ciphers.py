"""Letter-substitution ciphers of text datasets (``data.cipher``) and the clinc150-cipher / clinc150-ciphers presets:
the cipher itself, the dataset under it, the 5-domain scenario, the data fingerprint, and tiny runs end to end."""

from __future__ import annotations

import string
from pathlib import Path

import pytest

from conftest import tiny_bert
from inflora.config import ConfigError, load_config
from inflora.data import (
    Cipher,
    ContinualDataset,
    DataError,
    ListSplit,
    apply_cipher,
    class_incremental,
    domain_incremental,
    load_dataset,
)
from inflora.data.ciphers import cipher_letters, parse_cipher
from inflora.data.fingerprint import fingerprint_differences, scenario_fingerprint
from inflora.engine import Experiment, build_scenario

LOWER = string.ascii_lowercase
SAMPLE = "What's the APR on my Visa, card #42? Café -- ÆØ naïve\t(ok) 100%!"


def by_hand(letters: str, text: str) -> str:
    """The cipher computed character by character from the images of a..z."""
    out = []
    for ch in text:
        if ch in LOWER:
            out.append(letters[LOWER.index(ch)])
        elif ch in string.ascii_uppercase:
            out.append(letters[LOWER.index(ch.lower())].upper())
        else:
            out.append(ch)
    return "".join(out)


def toy(val: bool = True) -> ContinualDataset:
    texts = ["book a flight to Paris", "what's my balance?", "set an alarm for 7am", "Play some JAZZ", "hi", "bye"]
    labels = [0, 1, 2, 0, 1, 2]
    return ContinualDataset(name="toy", modality="text", class_names=["a", "b", "c"],
                            train=ListSplit(texts, labels), test=ListSplit(texts[::-1], labels[::-1]),
                            val=ListSplit(texts[:3], labels[:3]) if val else None, class_groups={"g": [0, 1, 2]})


# ------------------------------------------------------------------------------------------ the cipher
def test_cipher_is_a_seeded_bijection_that_moves_every_letter() -> None:
    tables = set()
    for seed in range(40):
        letters = Cipher(seed).letters
        assert sorted(letters) == list(LOWER)  # a permutation of a..z
        assert all(letters[i] != LOWER[i] for i in range(26))  # no letter maps to itself
        assert letters == Cipher(seed).letters == cipher_letters(seed)  # deterministic
        tables.add(letters)
    assert len(tables) == 40  # every seed its own cipher
    assert Cipher(3) == Cipher(3) and Cipher(3) != Cipher(4)


def test_cipher_maps_case_consistently_and_leaves_other_characters_alone() -> None:
    cipher = Cipher(11)
    out = cipher(SAMPLE)
    assert out == by_hand(cipher.letters, SAMPLE)
    assert len(out) == len(SAMPLE)
    assert [c for c in out if c not in string.ascii_letters] == [c for c in SAMPLE if c not in string.ascii_letters]
    assert all(a != b for a, b in zip(out, SAMPLE, strict=True) if b in string.ascii_letters)
    inverse = {c: LOWER[i] for i, c in enumerate(cipher.letters)}
    assert by_hand("".join(inverse[c] for c in LOWER), out) == SAMPLE  # a bijection: deciphered exactly
    assert cipher(SAMPLE.lower()) == out.lower() and cipher(SAMPLE.upper()) == out.upper()


def test_cipher_spec_is_checked() -> None:
    assert parse_cipher(None) is None and parse_cipher("plain") is None
    assert parse_cipher(5) == Cipher(5)
    assert parse_cipher(["plain", 2, 9]) == [None, Cipher(2), Cipher(9)]
    for bad, match in (([], "empty list"), ([1, 1], r"cipher-1.*more than once"), (-1, r"-1 is neither"),
                       (["plain", "rot13"], r"'rot13' is neither"), (True, "neither"), (2.5, "neither")):
        with pytest.raises(ValueError, match=match):
            parse_cipher(bad)
    with pytest.raises(ConfigError, match=r"data\.cipher: expected an integer, got 'x'"):
        load_config("clinc150", ["data.cipher=[plain, x]"])
    assert load_config("clinc150", ["data.cipher=plain,3"]).data.cipher == ["plain", 3]


# ------------------------------------------------------------------------------------------ datasets
def test_a_ciphered_dataset_yields_the_ciphered_texts_with_the_same_labels() -> None:
    plain = toy()
    ds = apply_cipher(plain, 4)
    assert ds.name == "toy+cipher-4" and ds.class_names == plain.class_names and ds.class_groups == plain.class_groups
    letters = Cipher(4).letters
    for name, split in plain.splits().items():
        mine = ds.splits()[name]
        assert [mine[i] for i in range(len(mine))] == [(by_hand(letters, x), y) for x, y in split]
    assert apply_cipher(plain, None) is plain


def test_text_files_take_a_cipher_too(tmp_path: Path) -> None:
    (tmp_path / "train.csv").write_text("text,label\nhello there,greet\nsee you,bye\n")
    (tmp_path / "test.csv").write_text("text,label\nHi!,greet\nciao,bye\n")
    ds = apply_cipher(load_dataset("text-files", tmp_path, train="train.csv", test="test.csv"), 8)
    assert ds.test[0] == (Cipher(8)("Hi!"), ds.class_names.index("greet"))
    domains = apply_cipher(load_dataset("text-files", tmp_path, train="train.csv", test="test.csv"), [8, "plain"])
    assert domains.domain_names == ["cipher-8", "plain"] and domains.test.domains == [0, 0, 1, 1]
    assert [domains.test.load(i) for i in range(4)] == [Cipher(8)("Hi!"), Cipher(8)("ciao"), "Hi!", "ciao"]


def test_images_cannot_be_ciphered() -> None:
    import numpy as np

    images = ContinualDataset("img", "image", ["a"], ListSplit(np.zeros((1, 4, 4, 3), np.uint8), [0]),
                              ListSplit(np.zeros((1, 4, 4, 3), np.uint8), [0]))
    with pytest.raises(DataError, match=r"transforms texts.*'img' holds images"):
        apply_cipher(images, 1)


def test_cipher_domains_make_a_domain_incremental_scenario() -> None:
    plain = toy()
    ds = apply_cipher(plain, ["plain", 1, 2, 3, 4])
    assert ds.domain_names == ["plain", "cipher-1", "cipher-2", "cipher-3", "cipher-4"] and ds.name == "toy+ciphers"
    sc = domain_incremental(ds)
    assert sc.kind == "domain" and sc.num_tasks == 5 and sc.class_order == [0, 1, 2]
    ciphers = [None, Cipher(1), Cipher(2), Cipher(3), Cipher(4)]
    for t, task in enumerate(sc.tasks):
        assert task.domain == t and task.classes == [0, 1, 2]  # one shared label space
        for split in ("train", "val", "test"):
            indices = getattr(task, f"{split}_indices")
            source = getattr(plain, split)
            expected = [(x if ciphers[t] is None else by_hand(ciphers[t].letters, x), y) for x, y in source]
            assert [getattr(ds, split)[i] for i in indices] == expected
    with pytest.raises(DataError, match="already has domains"):
        apply_cipher(ds, [5, 6])
    with pytest.raises(ValueError, match="has no domains"):
        domain_incremental(apply_cipher(plain, 1))


def test_the_fingerprint_follows_the_cipher() -> None:
    plain = toy()

    def fingerprint(spec):
        ds = apply_cipher(plain, spec)
        return scenario_fingerprint(ds, class_incremental(ds, 3))

    assert fingerprint(2) == fingerprint(2)
    differ = fingerprint_differences(fingerprint(2), fingerprint(3))
    assert differ[0] == "dataset: checkpoint 'toy+cipher-2', now 'toy+cipher-3'"
    assert any("contents of the test, train, val samples differ" in d for d in differ)
    assert fingerprint_differences(fingerprint(None), fingerprint(2))
    domains = [apply_cipher(plain, spec) for spec in (["plain", 1], ["plain", 2])]
    fps = [scenario_fingerprint(d, domain_incremental(d)) for d in domains]
    assert "task 2 classes: checkpoint 'cipher-1', now 'cipher-2'" in fingerprint_differences(*fps)


# ------------------------------------------------------------------------------------------ real CLINC150
def test_clinc150_ciphers_preset_builds_five_ciphered_domains(data_dir: Path) -> None:
    config = load_config("clinc150-ciphers", [f"data.data_dir={data_dir}"])
    raw = load_dataset("clinc150", data_dir)
    ds = apply_cipher(raw, config.data.cipher)
    sc = build_scenario(config, ds)
    assert sc.kind == "domain" and sc.num_tasks == 5 and sc.num_classes == 150
    n = len(raw.test)
    for t, task in enumerate(sc.tasks):
        assert task.classes == list(range(150)) and len(task.train_indices) == 15000 and len(task.val_indices) == 3000
        assert task.test_indices == list(range(t * n, (t + 1) * n))
        i = task.test_indices[17]
        expected = raw.test.load(17) if t == 0 else Cipher(t)(raw.test.load(17))
        assert ds.test[i] == (expected, raw.test.labels[17])
    assert ds.test.load(sc.tasks[0].test_indices[0]) == raw.test.load(0)  # domain 0 is the plain text


# ------------------------------------------------------------------------------------------ tiny runs
@pytest.fixture(scope="module")
def char_bert(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """conftest's tiny BERT with a character-level WordPiece vocabulary (any ciphered word has tokens), saved."""
    from transformers import BertTokenizerFast

    folder = tmp_path_factory.mktemp("char_bert")
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *LOWER, *(f"##{c}" for c in LOWER), "?", "'", ","]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    model = tiny_bert()
    assert model.config.vocab_size == len(vocab)
    model.save_pretrained(str(folder))
    BertTokenizerFast(vocab_file=str(folder / "vocab.txt")).save_pretrained(str(folder))
    return folder


TINY = ["train.progress=false", "train.epochs=1", "train.batch_size=16", "train.eval_batch_size=64",
        "model.max_length=48", "scenario.eval_split=val"]
ALIGNED = ["aligned.samples_per_class=8", "aligned.epochs=1"]  # for runs with the aligned head
RANK = {"inflora": ["inflora.rank=2", "inflora.stats_samples=16"], "seqlora": ["seqlora.rank=2"],
        "joint": ["joint.rank=2"], "frozen": []}


def tiny_run(preset: str, data_dir: Path, bert: Path, method: str, *extra: str) -> tuple[Experiment, dict]:
    aligned = preset == "clinc150-cipher" or "classifier=aligned" in extra
    config = load_config(preset, [*TINY, *(ALIGNED if aligned else []), f"data.data_dir={data_dir}",
                                  f"model.backbone={bert}", f"method={method}", *RANK[method], *extra])
    experiment = Experiment(config)
    return experiment, experiment.run()


@pytest.mark.parametrize("method", ["inflora", "seqlora", "joint", "frozen"])
def test_clinc150_cipher_runs_end_to_end(data_dir: Path, char_bert: Path, method: str) -> None:
    experiment, results = tiny_run("clinc150-cipher", data_dir, char_bert, method, "scenario.num_tasks=2",
                                   "scenario.classes_per_task=3", "scenario.max_train_per_class=6")
    assert results["benchmark"] == "clinc150-cipher" and results["classes_per_task"] == [3, 3]
    assert len(results["accuracy_matrix"]) == 2 and results["eval_split"] == "val"
    assert results["data_fingerprint"]["dataset"] == "clinc150+cipher-1"
    raw = load_dataset("clinc150", data_dir)
    task = experiment.scenario.tasks[1]
    i = task.val_indices[0]
    assert experiment.dataset.val[i] == (Cipher(1)(raw.val.load(i)), raw.val.labels[i])  # what the model read


@pytest.mark.parametrize("method", ["inflora", "seqlora", "joint", "frozen"])
def test_clinc150_ciphers_runs_end_to_end(data_dir: Path, char_bert: Path, method: str) -> None:
    experiment, results = tiny_run("clinc150-ciphers", data_dir, char_bert, method,
                                   "scenario.domains=[plain, cipher-3]", "scenario.max_train_per_class=1",
                                   "scenario.max_test_per_class=1")
    assert results["num_tasks"] == 2 and results["classes_per_task"] == [150, 150]
    assert results["test_counts"] == [150, 150] and results["eval_split"] == "val"
    assert [t["domain"] for t in results["data_fingerprint"]["tasks"]] == ["plain", "cipher-3"]
    assert results["task_il_matrix"] == results["accuracy_matrix"]  # one shared label space
    assert results["classifier"] == "ridge"  # the preset's head, chosen on the validation split
    assert experiment.learner.classifier.weight.shape[1] == 150  # one solved head over the 150 shared intents
    assert experiment.learner.classifier.chosen.numel() == 2  # a lambda per domain, the sums accumulated


def test_clinc150_ciphers_with_the_aligned_head_shares_one_head(data_dir: Path, char_bert: Path) -> None:
    experiment, results = tiny_run("clinc150-ciphers", data_dir, char_bert, "inflora", "classifier=aligned",
                                   "scenario.domains=[plain, cipher-3]", "scenario.max_train_per_class=1",
                                   "scenario.max_test_per_class=1")
    assert results["classifier"] == "aligned" and results["task_il_matrix"] == results["accuracy_matrix"]
    assert len(experiment.learner.classifier.heads) == 1


def test_a_run_is_not_resumed_under_another_cipher(data_dir: Path, char_bert: Path, tmp_path: Path) -> None:
    from inflora.checkpoint import load_latest, save_checkpoint

    reduced = ["scenario.num_tasks=2", "scenario.classes_per_task=3", "scenario.max_train_per_class=4"]
    config = load_config("clinc150-cipher", [*TINY, *ALIGNED, f"data.data_dir={data_dir}",
                                             f"model.backbone={char_bert}", *RANK["inflora"], *reduced])
    first = Experiment(config)
    first.run_task(0)
    save_checkpoint(tmp_path, first.state, first.learner.state_dict(), config, first.num_tasks, data=first.fingerprint)
    checkpoint = load_latest(tmp_path)
    assert checkpoint is not None
    Experiment(config).check_data(checkpoint)  # the same cipher: the same data
    config.data.cipher = 2
    other = Experiment(config)
    with pytest.raises(ConfigError, match=r"different data \(dataset: checkpoint 'clinc150\+cipher-1', now "
                                          r"'clinc150\+cipher-2'.*contents"):
        other.check_data(checkpoint)
    with pytest.raises(ConfigError, match=r"data\.cipher"):
        other.restore(checkpoint)  # the configuration check comes first
