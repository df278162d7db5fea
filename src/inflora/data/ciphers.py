"""Seeded text transforms of a whole text dataset: letter-substitution ciphers, per dataset or one per domain.

A :class:`Cipher` is a seeded permutation of the 26 lowercase ASCII letters with no fixed point (every letter
changes), applied to uppercase letters consistently (``A`` becomes the upper case of what ``a`` becomes); digits,
punctuation, white space and every other character (accented letters included) stay as they are. Written this way
a text keeps its shape but no longer matches the encoder's pre-trained wordpieces, which leaves adaptation headroom.

``data.cipher`` (see :func:`apply_cipher`) chooses the transform of a run:

* a seed, e.g. ``cipher: 7``: every text of every split under that cipher (the dataset's tasks as before);
* a list, e.g. ``cipher: [plain, 1, 2, 3, 4]``: one domain per entry, the whole dataset repeated under each entry's
  cipher (``plain``: the text as it is) with the same classes and labels, for domain-incremental scenarios.

The transformed texts are materialised, so the data fingerprint hashes what the model reads: another cipher is
another dataset, and resuming a run on it is refused.
"""

from __future__ import annotations

import string
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from ..runtime import Purpose, derive_seed
from .base import ContinualDataset, DataError, ListSplit, Split

__all__ = ["PLAIN", "Cipher", "apply_cipher", "cipher_letters", "parse_cipher", "text_domains", "transform_texts"]

PLAIN = "plain"
"""The entry of a cipher list that keeps a domain's text as it is."""

TextTransform = Callable[[str], str]


def cipher_letters(seed: int) -> str:
    """The images of ``a..z`` under cipher ``seed``: a permutation without fixed point, drawn from
    ``numpy.random.RandomState(derive_seed(seed, 0, Purpose.CIPHER))`` (redrawn until no letter maps to itself)."""
    rng = np.random.RandomState(derive_seed(seed, 0, Purpose.CIPHER) % 2**32)
    identity = np.arange(26)
    while True:
        perm = rng.permutation(26)
        if not np.any(perm == identity):
            return "".join(string.ascii_lowercase[i] for i in perm)


@dataclass(frozen=True)
class Cipher:
    """A letter-substitution cipher: ``Cipher(seed)(text)``. Seeds are integers >= 0."""

    seed: int
    table: dict[int, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if isinstance(self.seed, bool) or not isinstance(self.seed, (int, np.integer)) or self.seed < 0:
            raise ValueError(f"a cipher seed must be an integer >= 0, got {self.seed!r}")
        letters = cipher_letters(int(self.seed))
        source = string.ascii_lowercase + string.ascii_uppercase
        object.__setattr__(self, "table", str.maketrans(source, letters + letters.upper()))

    @property
    def name(self) -> str:
        """``cipher-<seed>``: the domain name and dataset suffix of this cipher."""
        return f"cipher-{self.seed}"

    @property
    def letters(self) -> str:
        """The images of ``a..z``."""
        return "".join(chr(self.table[ord(c)]) for c in string.ascii_lowercase)

    def __call__(self, text: str) -> str:
        return text.translate(self.table)


def parse_cipher(spec: Any) -> Cipher | list[Cipher | None] | None:
    """``data.cipher`` checked: ``None`` -> no transform; a seed -> a :class:`Cipher`; a list of seeds and
    ``plain`` -> one cipher (``None`` for plain) per domain. Raises ``ValueError`` naming the bad entry."""
    if spec is None:
        return None
    if isinstance(spec, (list, tuple)):
        if not spec:
            raise ValueError("data.cipher: an empty list has no domain; give one seed or 'plain' per domain")
        out = [_entry(x) for x in spec]
        names = [PLAIN if c is None else c.name for c in out]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"data.cipher: each domain needs its own cipher, but {dup} appear(s) more than once "
                             f"in {list(spec)}")
        return out
    if spec == PLAIN:
        return None
    return _entry(spec)


def _entry(x: Any) -> Cipher | None:
    if x == PLAIN:
        return None
    if isinstance(x, bool) or not isinstance(x, (int, np.integer)) or x < 0:
        raise ValueError(f"data.cipher: {x!r} is neither a cipher seed (an integer >= 0) nor {PLAIN!r}")
    return Cipher(int(x))


def _texts(split: Split, where: str) -> list[str]:
    texts = [split.load(i) for i in range(len(split))]
    bad = next((i for i, t in enumerate(texts) if not isinstance(t, str)), None)
    if bad is not None:
        raise DataError(f"{where}: sample {bad} is a {type(texts[bad]).__name__}, not a text")
    return texts


def _check_text(dataset: ContinualDataset) -> None:
    if dataset.modality != "text":
        raise DataError(f"data.cipher transforms texts, but dataset {dataset.name!r} holds {dataset.modality}s")


def transform_texts(dataset: ContinualDataset, transform: TextTransform, suffix: str) -> ContinualDataset:
    """``dataset`` with every text of every split passed through ``transform`` (labels, domains, class groups
    kept), named ``<name>+<suffix>``."""
    _check_text(dataset)
    splits = {
        name: ListSplit([transform(t) for t in _texts(split, f"{dataset.name} {name}")], split.labels,
                        split.domains)
        for name, split in dataset.splits().items()
    }
    return ContinualDataset(name=f"{dataset.name}+{suffix}", modality="text", class_names=list(dataset.class_names),
                            train=splits["train"], test=splits["test"], val=splits.get("val"),
                            class_groups=dataset.class_groups, domain_names=dataset.domain_names)


def text_domains(dataset: ContinualDataset, transforms: Sequence[tuple[str, TextTransform | None]],
                 suffix: str) -> ContinualDataset:
    """One domain per ``(name, transform)``: every split repeated, copy ``d`` under ``transforms[d]`` (``None``:
    the text as is) with domain id ``d``; the same classes and labels in every domain. Named ``<name>+<suffix>``."""
    _check_text(dataset)
    if dataset.domain_names is not None:
        raise DataError(f"dataset {dataset.name!r} already has domains {dataset.domain_names}; text domains are "
                        "made from a dataset without any")
    names = [n for n, _ in transforms]
    if not names or len(set(names)) != len(names):
        raise ValueError(f"text domains need distinct names, got {names}")
    splits = {}
    for split_name, split in dataset.splits().items():
        texts = _texts(split, f"{dataset.name} {split_name}")
        items: list[str] = []
        for f in (t for _, t in transforms):
            items.extend(texts if f is None else [f(x) for x in texts])
        domains = [d for d in range(len(transforms)) for _ in texts]
        splits[split_name] = ListSplit(items, split.labels * len(transforms), domains)
    return ContinualDataset(name=f"{dataset.name}+{suffix}", modality="text", class_names=list(dataset.class_names),
                            train=splits["train"], test=splits["test"], val=splits.get("val"),
                            class_groups=dataset.class_groups, domain_names=names)


def apply_cipher(dataset: ContinualDataset, spec: Any) -> ContinualDataset:
    """``dataset`` under ``data.cipher``: unchanged for ``None``; one seed: every text ciphered (named
    ``<name>+cipher-<seed>``); a list: one domain per entry, named ``plain`` or ``cipher-<seed>`` (dataset
    ``<name>+ciphers``)."""
    parsed = parse_cipher(spec)
    if parsed is None:
        return dataset
    if isinstance(parsed, Cipher):
        return transform_texts(dataset, parsed, parsed.name)
    return text_domains(dataset, [(PLAIN if c is None else c.name, c) for c in parsed], "ciphers")
