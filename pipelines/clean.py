"""Cleaning, as pure functions over text: Unicode and control characters, PII, repetition,
keys for exact deduplication, near-duplicate detection (MinHash LSH, datasketch) and
decontamination of training text against evaluation text by n-gram overlap.

Everything here is deterministic (no salted hashes), so a rerun on the same bytes keeps and
drops exactly the same rows.
"""

from __future__ import annotations

import re
import unicodedata
import zlib
from collections.abc import Iterable

# Control characters except tab and newline (and the surrogates that stand for undecodable bytes).
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_SPACES = re.compile(r"[ \t]+")
_WORD = re.compile(r"\w+")
_SURROGATE = re.compile(r"[\ud800-\udfff]")


def has_undecodable(text: str) -> bool:
    """True for a string decoded with errors='surrogateescape' that held invalid UTF-8."""
    return bool(_SURROGATE.search(text))


def clean_text(text: str) -> str:
    """NFC, no control characters, runs of spaces folded, lines trimmed, blank lines dropped."""
    text = _CONTROL.sub("", unicodedata.normalize("NFC", text))
    lines = (_SPACES.sub(" ", line).strip() for line in text.strip().splitlines())
    return "\n".join(line for line in lines if line)


def normal_form(text: str) -> str:
    """Case, punctuation and whitespace folded: the key of exact dedup and of decontamination,
    so 'Reverse THE list: 1, 2' and 'reverse the list 1 2' are the same text."""
    return " ".join(_WORD.findall(unicodedata.normalize("NFKC", text).lower()))


# ---------------------------------------------------------------- PII

PII_PATTERNS = {
    "email": re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b"),
    "api_key": re.compile(r"\b(?:sk-[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}|xox[abpors]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35})\b"),
    "ip": re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b"),
    "card": re.compile(r"\b(?:\d[ -]?){13,19}\b"),
    # not a run of digit groups that goes on (a card number failing Luhn is not a phone)
    "phone": re.compile(r"(?<![\w.])(?<!\d[ -])(?:\+\d{1,3}[ .-]?)?(?:\(\d{2,4}\)[ .-]?)?\d{3,4}[ .-]\d{3,4}(?:[ .-]\d{2,4})?(?![\w.])(?![ -]\d)"),
}


def luhn(digits: str) -> bool:
    """The card-number checksum: keeps 16 random digits from counting as a card."""
    total, double = 0, False
    for ch in reversed(digits):
        d = int(ch) * (2 if double else 1)
        total += d - 9 if d > 9 else d
        double = not double
    return total % 10 == 0


def find_pii(text: str) -> list[tuple[str, str]]:
    """(kind, match) for every piece of personal data or secret found; a span claimed by an
    earlier kind (a card) is not counted again by a looser one (a phone number)."""
    found, taken = [], []
    for kind, pattern in PII_PATTERNS.items():
        for m in pattern.finditer(text):
            value = m.group(0)
            if any(m.start() < end and start < m.end() for start, end in taken):
                continue
            if kind == "card":
                digits = re.sub(r"\D", "", value)
                if not (13 <= len(digits) <= 19 and luhn(digits)):
                    continue
            if kind == "phone" and sum(c.isdigit() for c in value) < 9:
                continue
            found.append((kind, value))
            taken.append((m.start(), m.end()))
    return found


def redact(text: str) -> str:
    """Every PII match replaced by a placeholder naming its kind, e.g. <EMAIL>."""
    for kind, value in sorted(find_pii(text), key=lambda kv: -len(kv[1])):
        text = text.replace(value, f"<{kind.upper()}>")
    return text


# ---------------------------------------------------------------- repetition


def repetition_ratio(text: str, n: int = 3) -> float:
    """Share of word n-grams that repeat an earlier one (degenerate, looping text scores high).
    Texts under 20 n-grams are not judged: a short answer like '1 1 1 1' is not a loop."""
    words = normal_form(text).split()
    grams = [tuple(words[i : i + n]) for i in range(len(words) - n + 1)]
    return 1 - len(set(grams)) / len(grams) if len(grams) >= 20 else 0.0


# ---------------------------------------------------------------- near duplicates


def shingles(text: str, n: int = 3) -> set[bytes]:
    words = normal_form(text).split()
    return {" ".join(words[i : i + n]).encode() for i in range(max(len(words) - n + 1, 1))}


def _crc32(b: bytes) -> int:
    return zlib.crc32(b)


class NearDuplicates:
    """MinHash LSH over word 3-gram shingles: `seen(key, text)` is True when an earlier text is
    at least `threshold` Jaccard-similar. Texts shorter than `min_words` are left to exact
    dedup: a handful of shingles gives no reliable estimate, and short templated prompts (the
    demo's digit lists) would be flagged as near-duplicates of each other."""

    def __init__(self, threshold: float, min_words: int, num_perm: int = 128):
        from datasketch import MinHashLSH

        self.threshold, self.min_words, self.num_perm = threshold, min_words, num_perm
        # LSH's banding misses pairs just above its threshold: ask it for candidates at a lower
        # one, then keep those whose estimated Jaccard similarity really reaches `threshold`.
        self.lsh = MinHashLSH(threshold=max(threshold - 0.15, 0.2), num_perm=num_perm)
        self.kept: dict[str, object] = {}
        self._permutations = None  # drawn once: datasketch would redraw them for every row

    def seen(self, text: str) -> bool:
        from datasketch import MinHash

        if len(normal_form(text).split()) < self.min_words:
            return False
        if self._permutations is None:
            first = MinHash(num_perm=self.num_perm, hashfunc=_crc32, seed=1)
            self._permutations, self._scheme = first.permutations, first.scheme
        m = MinHash(num_perm=self.num_perm, hashfunc=_crc32, seed=1, permutations=self._permutations, scheme=self._scheme)
        m.update_batch(list(shingles(text)))
        if any(m.jaccard(self.kept[key]) >= self.threshold for key in self.lsh.query(m)):
            return True
        key = str(len(self.kept))
        self.lsh.insert(key, m)
        self.kept[key] = m
        return False


# ---------------------------------------------------------------- decontamination


class Contamination:
    """Evaluation text indexed for overlap checks: a training text is contaminated when its
    normal form equals an evaluation prompt's, or when it shares an n-gram of `n` words with an
    evaluation text (prompt and answer together): case, punctuation and spacing changes do not
    hide a test item."""

    def __init__(self, n: int):
        self.n = n
        self.prompts: set[str] = set()
        self.grams: set[str] = set()

    def _grams(self, text: str) -> Iterable[str]:
        words = normal_form(text).split()
        if len(words) < self.n:
            return [" ".join(words)] if words else []
        return (" ".join(words[i : i + self.n]) for i in range(len(words) - self.n + 1))

    def add(self, prompt: str, answer: str) -> None:
        self.prompts.add(normal_form(prompt))
        self.grams.update(self._grams(f"{prompt} {answer}"))

    def hit_turns(self, turns: list[str]) -> str | None:
        """A multi-turn training conversation with an evaluation prompt as one of its turns
        (too short for the n-gram check to see)."""
        for turn in turns:
            if normal_form(turn) in self.prompts:
                return "one of its turns is an evaluation prompt (case, punctuation and spacing aside)"
        return None

    def hit(self, prompt: str, answer: str) -> str | None:
        """Why this training text overlaps the evaluation sets, or None."""
        if normal_form(prompt) in self.prompts:
            return "its prompt is an evaluation prompt (case, punctuation and spacing aside)"
        for g in self._grams(f"{prompt} {answer}"):
            if g in self.grams:
                return f"shares the {self.n}-gram '{g}' with an evaluation item"
        return None
