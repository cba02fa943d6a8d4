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
from collections import Counter

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
    if not text.isascii():  # NFKC leaves ASCII as it is: most text skips it
        text = unicodedata.normalize("NFKC", text)
    return " ".join(_WORD.findall(text.lower()))


# ---------------------------------------------------------------- PII
#
# Patterns with a validity check each (Presidio's pattern recognisers work the same way), and
# phone numbers by libphonenumber (`phonenumbers`, what Presidio's phone recogniser uses): a
# number counts when it is a valid number of its country, written internationally (+44 20 7946
# 0958, +1-202-555-0143) or nationally for PHONE_REGIONS (2025550143, 020 7946 0958). The
# demo's digit lists ("3 1 4 1 5") are valid numbers nowhere. Presidio itself is not used: its
# package installs spaCy (thinc, blis, ...) even when no language model is loaded.

PHONE_REGIONS = ("US", "GB")  # national spellings understood besides the international one
_FEW_DIGITS = 7  # fewer digits than any valid phone number has: the text is not searched
_IPV6 = re.compile(r"(?<![\w:.])(?:[0-9A-Fa-f]{0,4}:){2,7}(?:[0-9A-Fa-f]{0,4}|\d{1,3}(?:\.\d{1,3}){3})(?![\w:])")

PII_PATTERNS = {
    "email": re.compile(r"\b[A-Za-z0-9._%+-]+@[A-Za-z0-9.-]+\.[A-Za-z]{2,}\b"),
    "api_key": re.compile(r"\b(?:sk-[A-Za-z0-9_-]{16,}|AKIA[0-9A-Z]{16}|gh[pousr]_[A-Za-z0-9]{30,}|xox[abpors]-[A-Za-z0-9-]{10,}|AIza[0-9A-Za-z_-]{35})\b"),
    "ipv6": _IPV6,
    "ip": re.compile(r"\b(?:(?:25[0-5]|2[0-4]\d|1?\d?\d)\.){3}(?:25[0-5]|2[0-4]\d|1?\d?\d)\b"),
    "card": re.compile(r"\b(?:\d[ -]?){13,19}\b"),
    # US social security number: area 001-899 but 666, group 01-99, serial 0001-9999
    "ssn": re.compile(r"(?<![\d-])(?!000|666|9\d\d)\d{3}([- ])(?!00)\d{2}\1(?!0000)\d{4}(?![\d-])"),
    # UK National Insurance number: two prefix letters (not D F I Q U V; O not second; not the
    # administrative BG GB KN NK NT TN ZZ), six digits (often in pairs), a suffix A-D
    "nino": re.compile(r"\b(?!BG|GB|KN|NK|NT|TN|ZZ)[A-CEGHJ-PR-TW-Z][A-CEGHJ-NPR-TW-Z] ?\d{2} ?\d{2} ?\d{2} ?[A-D]\b"),
}


def luhn(digits: str) -> bool:
    """The card-number checksum: keeps 16 random digits from counting as a card."""
    total, double = 0, False
    for ch in reversed(digits):
        d = int(ch) * (2 if double else 1)
        total += d - 9 if d > 9 else d
        double = not double
    return total % 10 == 0


def _ipv6(value: str) -> bool:
    """A real IPv6 address with at least three groups (not `a::b`-like code or a clock time)."""
    import ipaddress

    try:
        ipaddress.IPv6Address(value)
    except ValueError:
        return False
    return sum(1 for g in value.split(":") if g) >= 3


def _phones(text: str) -> list[tuple[int, int, str]]:
    import phonenumbers

    found = {}
    for region in PHONE_REGIONS:
        for m in phonenumbers.PhoneNumberMatcher(text, region, leniency=phonenumbers.Leniency.VALID):
            found[(m.start, m.end)] = m.raw_string
    return [(start, end, raw) for (start, end), raw in sorted(found.items())]


_NO_DIGITS = str.maketrans("", "", "0123456789")
# What a text must hold for a kind to be possible: most texts are skipped without a regex run.
_POSSIBLE = {
    "email": lambda text, digits: "@" in text,
    "api_key": lambda text, digits: True,
    "ipv6": lambda text, digits: text.count(":") >= 2,
    "ip": lambda text, digits: digits >= 4,
    "card": lambda text, digits: digits >= 13,
    "ssn": lambda text, digits: digits >= 9,
    "nino": lambda text, digits: digits >= 6,
}


def find_pii(text: str) -> list[tuple[str, str]]:
    """(kind, match) for every piece of personal data or secret found; a span claimed by an
    earlier kind (a card) is not counted again by a later one (a phone number)."""
    found, taken = [], []

    def claim(kind: str, start: int, end: int, value: str) -> None:
        if not any(start < e and s < end for s, e in taken):
            found.append((kind, value))
            taken.append((start, end))

    digits = len(text) - len(text.translate(_NO_DIGITS))
    for kind, pattern in PII_PATTERNS.items():
        if not _POSSIBLE[kind](text, digits):
            continue
        for m in pattern.finditer(text):
            value = m.group(0)
            if kind == "card" and not (13 <= len(number := re.sub(r"\D", "", value)) <= 19 and luhn(number)):
                continue
            if kind == "ipv6" and not _ipv6(value):
                continue
            claim(kind, m.start(), m.end(), value)
    if digits >= _FEW_DIGITS:
        for start, end, value in _phones(text):
            claim("phone", start, end, value)
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


def shingles(text: str | list[str], n: int = 3) -> set[bytes]:
    words = normal_form(text).split() if isinstance(text, str) else text
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

        words = normal_form(text).split()
        if len(words) < self.min_words:
            return False
        if self._permutations is None:
            first = MinHash(num_perm=self.num_perm, hashfunc=_crc32, seed=1)
            self._permutations, self._scheme = first.permutations, first.scheme
        m = MinHash(num_perm=self.num_perm, hashfunc=_crc32, seed=1, permutations=self._permutations, scheme=self._scheme)
        m.update_batch(list(shingles(words)))
        if any(m.jaccard(self.kept[key]) >= self.threshold for key in self.lsh.query(m)):
            return True
        key = str(len(self.kept))
        self.lsh.insert(key, m)
        self.kept[key] = m
        return False


# ---------------------------------------------------------------- decontamination


def _windows(words: list[str], k: int) -> list[tuple[int, int]]:
    """Spans of k words; a text shorter than k is one span (the whole text)."""
    if len(words) < k:
        return [(0, len(words))] if words else []
    return [(i, i + k) for i in range(len(words) - k + 1)]


class Contamination:
    """Evaluation items indexed for overlap checks. A training row is contaminated when its
    prompt (or one of its user turns) is an evaluation prompt, case, punctuation and spacing
    aside, or when it shares an n-gram of `n` words with an evaluation item that is made of
    that item's own words.

    Boilerplate proves nothing: a phrase found in more than `common` training rows (a sign-off
    like "you're welcome! if you have any other questions, feel free to ask") or in more than
    `common` evaluation items (the set's template) is not an item's own. Phrases are judged as
    shorter grams (n/2 words), so an n-gram that straddles a sign-off and a few words of its
    own is not evidence either: at least half of a shared n-gram's words must be the item's
    own. Call `count` on every training row first, then `hit`."""

    def __init__(self, n: int, common: int = 5):
        self.n, self.m, self.common = n, max(3, n // 2), common
        self.items: list[tuple[str, list[str]]] = []  # (where, normal-form words)
        self.prompts: dict[str, str] = {}  # normal form -> the first evaluation item asking it
        self.prompt_items: Counter = Counter()
        self.phrase_items: Counter = Counter()  # m-gram -> evaluation items holding it
        self.train_rows: Counter = Counter()  # m-gram or prompt -> training rows holding it
        self._grams: dict[str, str] | None = None  # evidence n-gram -> its item, once counted

    def spans(self, words: list[str], k: int) -> set[str]:
        return {" ".join(words[a:b]) for a, b in _windows(words, k)}

    def grams_of(self, text: str) -> set[str]:
        return self.spans(normal_form(text).split(), self.n)

    def add(self, prompt: str, answer: str, where: str = "an evaluation item") -> None:
        self.add_prompt(prompt, where)
        words = normal_form(f"{prompt} {answer}").split()
        self.items.append((where, words))
        self.phrase_items.update(self.spans(words, self.m))
        self._grams = None

    def add_prompt(self, prompt: str, where: str) -> None:
        """A text the evaluation asks on its own: a training prompt equal to it is a leak."""
        key = normal_form(prompt)
        if key:
            self.prompts.setdefault(key, where)
            self.prompt_items[key] += 1

    def keys(self, prompt: str, turns: list[str], text: str) -> tuple[str, list[str], list[str]]:
        """A training row folded once: its prompt's and user turns' normal forms, its words."""
        key = normal_form(prompt)
        return key, [key if t == prompt else normal_form(t) for t in turns], normal_form(text).split()

    def count(self, prompt: str, turns: list[str], text: str, keys: tuple | None = None) -> None:
        """One training row (its prompt, user turns and whole text), counted where it meets
        the index: how common each evaluation phrase and prompt is in the training data."""
        key, turn_keys, words = keys or self.keys(prompt, turns, text)
        found = self.spans(words, self.m) | {key, *turn_keys}
        self.train_rows.update(k for k in found if k in self.phrase_items or k in self.prompts)
        self._grams = None

    def _common(self, key: str, items: Counter) -> bool:
        return items[key] > self.common or self.train_rows[key] > self.common

    def grams(self) -> dict[str, str]:
        """The evidence n-grams: at least half of their words are their item's own."""
        if self._grams is None:
            self._grams = {}
            for where, words in self.items:
                boiler = [False] * len(words)
                for a, b in _windows(words, self.m):
                    if self._common(" ".join(words[a:b]), self.phrase_items):
                        boiler[a:b] = [True] * (b - a)
                for a, b in _windows(words, self.n):
                    if 2 * boiler[a:b].count(False) >= b - a:
                        self._grams.setdefault(" ".join(words[a:b]), where)
        return self._grams

    def hit_turns(self, turns: list[str], turn_keys: list[str] | None = None) -> str | None:
        """A multi-turn training conversation with an evaluation prompt as one of its turns
        (too short for the n-gram check to see)."""
        for key in turn_keys if turn_keys is not None else map(normal_form, turns):
            if key in self.prompts and not self._common(key, self.prompt_items):
                return f"one of its turns is the prompt of {self.prompts[key]} (case, punctuation and spacing aside)"
        return None

    def hit(self, prompt: str, answer: str, grams: set[str] | None = None, key: str | None = None) -> str | None:
        """Why this training text overlaps an evaluation item, or None."""
        key = normal_form(prompt) if key is None else key
        if key in self.prompts and not self._common(key, self.prompt_items):
            return f"its prompt is the prompt of {self.prompts[key]} (case, punctuation and spacing aside)"
        evidence = self.grams()
        for g in sorted(grams if grams is not None else self.grams_of(f"{prompt} {answer}")):
            if g in evidence:
                return f"shares the {self.n}-gram '{g}' with {evidence[g]}"
        return None
