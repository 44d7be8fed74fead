"""Leak detection as a careful reviewer would do it: is a text one of the references (a probe or
eval prompt), does it hold one, or is it part of one, after normalisation and allowing typos?

Texts are compared on :func:`leak_key`: Unicode NFKC; words split at spaces and punctuation
(each symbol a word of its own, invisible format characters dropped); each word case-folded and
each non-ASCII letter or number mapped to its skeleton in the spirit of Unicode TR39: its
confusable prototype (a Cyrillic "а", a Greek "ο" read as "a", "o"), diacritics of the Latin,
Greek and Cyrillic kind dropped ("São" is "sao"), repeated until nothing changes. ASCII is only
case-folded (TR39 would turn "m" into "rn" and "I" into "l", which breaks case-insensitivity);
in a word with ASCII letters a non-ASCII capital counts as the Latin capital it imitates (the
Cyrillic "М" in "Мozambique"; its small "м" imitates no Latin letter). The confusables are
Unicode's ``confusables.txt`` as the ``confusable-homoglyphs`` package ships it (a JSON of every
pair, both ways: each group is a star around its prototype).

:meth:`LeakIndex.find` reports the strongest of four kinds of leak of a text against a
reference (in this order, then by score):

- ``same``: equal keys, spaces aside (as the exact rule this module replaced compared:
  "WHAT is the capital of Ghana ?" and "what is the capitalof ghana" are the same);
- ``contains``: the reference's words stand, in order, inside the text: a prefix, a suffix, an
  instruction or an answer was added, or the prompt was pasted into a completion;
- ``contained``: the text's words stand inside the reference (a truncated eval prompt);
- ``near-duplicate``: as ``contains`` or ``contained``, word for word, but with a few words
  misspelt (one edit in a word of 2 to 7 letters, two in a longer one: a substitution,
  insertion, deletion or swap of neighbours; none in a word with a digit: "order 4821" is not
  "order 4822").

Rules and thresholds, and the reason for each value:

- ``threshold = 0.9``: a near-duplicate keeps at least 90% of the contained side's words exactly,
  each word weighted by ``1 / df`` (df: how many references hold it, 1 if none does), and has at
  most ``1 - threshold`` of its words misspelt (at least one). Weighting by rarity is what tells
  a typo from other content in templated prompts: against "On which continent is Iran?", "... is
  Iraq?" keeps 5% of the weight among the demo probes (the template words are in hundreds of
  them, the country is the item), "On which contnent is Iran?" keeps 98%, and a typo in a
  300-character eval prompt ~100%. With equal weights (a small index) 0.9 allows one misspelt
  word in ten, so a one-reference index does not take "Iraq" for "Iran" (0.8). Measured by
  ``benchmarks/leak_detection.py`` on the demo, the benchmarks' and the tests' data: no false
  positive from 0.7 up, two at 0.5 ("... city of Santo Domingo Este?" against "... Oeste?");
  one-letter typos in prompts of 40+ characters found: 72% at 0.9 (119 of 120 eval prompts,
  69% of probes), 80% at 0.5; the typos missed change the very word that makes the item
  ("Telalngana"), which no rule can tell from another name.
- ``min_chars = 20`` and ``MIN_WORDS = 3``: the contained side (the reference for ``contains``,
  the text for ``contained`` and near-duplicates) needs a key of 20 characters and 3 words, so
  that a label or short answer found inside a prompt ("Arts", "Physical sciences") is no leak,
  while the shortest demo probes ("On which continent is Chad?", 26 characters, 5 words) count.
- The contained side must end where the container has a break (its end, a new line, or
  punctuation other than what joins the parts of a word or name: hyphens, apostrophes,
  slashes, "&", "_" and the like), and a text contained in a reference must also begin after
  one, unless it has ``OPEN_END_WORDS = 20`` words or more. Words added after a short item's
  last word make another item ("What is the capital of Guinea" inside "... of
  Guinea-Bissau?"); words added before the item do not ("Tell me what is ..."), but a text that
  is the end of a clause of a reference is only a phrase of it ("Capital of Kazakhstan", an
  article description, in "What is the capital of Kazakhstan?"); and a long passage is the item
  wherever it stands (the longest demo probe has 12 words, the shortest eval prompt 28; some
  eval prompts end mid-sentence).
- ``TEMPLATE_REFERENCES = 2``: a reference that two or more other references contain is text they
  share (a label of a choice list, an instruction), and so is a text that two or more references
  contain: it matches only as ``same``. In the demo, the label "Society and social sciences" is
  a completion and part of every prompt of its release.

Known limits: a word added to or dropped from the middle of an item, or words run together or
split ("the capitalof"), is not a near-duplicate (only ``same`` ignores spaces); an eval item's
passage under another instruction (the same article with another label list) is not found, as
only whole items are; words added before an item are allowed, so "South Sudan borders which
country?" contains "Sudan borders which country?"; a word written wholly in look-alikes of
another script is matched only as far as TR39 maps its small letters.

Cost: each reference is indexed under its rarest words, as few as a near-duplicate must keep
one of; a query looks up its words and checks the few references found. On 2 cores, the demo's
leak checks of a validation take 0.17 s (the confusables loaded; 0.12 s after), and 10,000
references index in 0.5 s and answer 3,000 texts of 600 characters on average in 0.7 s.
"""

from __future__ import annotations

import json
import unicodedata
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache, lru_cache
from importlib import resources

DEFAULT_THRESHOLD = 0.9
DEFAULT_MIN_CHARS = 20
MIN_WORDS = 3
TEMPLATE_REFERENCES = 2
OPEN_END_WORDS = 20

KINDS = ("same", "contains", "contained", "near-duplicate")

# Punctuation that joins parts of a word or name and does not end a clause: hyphens, apostrophes,
# connectors, slashes and the like. All other punctuation (and a new line) is a break.
_SOFT_PUNCTUATION = set("-\u2010\u2011'\u2018\u2019/\\&*#@%\u00b7\u2027_`\u00b4")
_HARD_CONTROLS = set("\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029")
# Diacritics drawn over any letter (combining blocks of Latin, Greek, Cyrillic use); the marks of
# other scripts (Devanagari vowel signs, Arabic and Hebrew points) are kept.
_DIACRITICS = ((0x0300, 0x036F), (0x1AB0, 0x1AFF), (0x1DC0, 0x1DFF), (0x20D0, 0x20FF))
_DIACRITICS += ((0xFE20, 0xFE2F),)


@cache
def _prototypes() -> dict[str, str]:
    """Unicode's confusables as ``source character -> prototype``. The package lists each pair
    both ways; each group is a star around its prototype, which is the character with several
    partners, or the sequence (``m -> rn``), or, for a pair of single characters, the lower code
    point (either serves: both then share one skeleton)."""
    data = json.loads(
        resources.files("confusable_homoglyphs").joinpath("confusables.json").read_text("utf-8")
    )
    partners: dict[str, set[str]] = {}
    for key, entries in data.items():
        key = key.replace("\u200e", "")  # the package keeps the left-to-right marks around RTL
        partners.setdefault(key, set()).update(e["c"].replace("\u200e", "") for e in entries)
    protos = {}
    for char, near in partners.items():
        if len(char) != 1 or len(near) != 1:
            continue
        (other,) = near
        if len(partners.get(other, ())) > 1 or len(other) > 1 or ord(other) < ord(char):
            protos[char] = other
    return protos


def _no_diacritics(text: str) -> str:
    return "".join(
        ch
        for ch in unicodedata.normalize("NFD", text)
        if not any(lo <= ord(ch) <= hi for lo, hi in _DIACRITICS)
    )


def _confusables(text: str) -> str:
    """Each non-ASCII character to its prototype (ASCII stays: "m", "l" and "0" are not "rn",
    "I" and "O" in a comparison that ignores case)."""
    protos = _prototypes()
    return "".join(
        c if c.isascii() else protos.get(c, c) for c in unicodedata.normalize("NFD", text)
    )


def _fold(text: str) -> str:
    return unicodedata.normalize("NFKC", _no_diacritics(text.casefold()))


def _settle(text: str) -> str:
    for _ in range(8):
        mapped = _fold(_confusables(text))
        if mapped == text:
            break
        text = mapped
    return text


@cache
def _plain(char: str) -> str:
    """A letter or number as compared: case-folded, mapped to its confusable prototype,
    diacritics dropped, NFKC, until nothing changes (ASCII is only case-folded)."""
    return char.casefold() if char.isascii() else _settle(_fold(char))


@cache
def _capital(char: str) -> str | None:
    """What a capital imitates in a Latin word, when that is ASCII: Cyrillic "М" imitates "M"
    (its small "м" imitates no Latin letter, so case-folding first would lose it), and a capital
    whose prototype is "l" imitates "I"."""
    if unicodedata.category(char) not in ("Lu", "Lt") or char.isascii():
        return None
    capital = _confusables(char)
    text = _settle("i" if capital == "l" else _fold(capital))
    return text if text.isascii() and text.isalnum() else None


@lru_cache(maxsize=1 << 16)
def _word(raw: str) -> str:
    """A word as compared (possibly split in two, or empty). In a word with ASCII letters, each
    other capital counts as the Latin letter it imitates; a word without them (Greek, Cyrillic)
    is case-folded first, so that its capitals and small letters compare equal."""
    if raw.isascii():
        return raw.casefold()
    if unicodedata.category(raw[0])[0] == "S":
        return raw  # a symbol is a word of its own
    latin = any("a" <= c <= "z" or "A" <= c <= "Z" for c in raw)
    mapped = "".join((latin and _capital(c)) or _plain(c) for c in raw)
    # a prototype may hold punctuation ("ǃ" -> "!"): it only separates words
    return "".join(c if unicodedata.category(c)[0] in "LMN" else " " for c in mapped)


class _Separators(dict):
    """``str.translate`` table computed per character on first sight: soft punctuation and
    spaces to a space, other punctuation and new lines to a line break, format and control
    characters to nothing, symbols to words of their own; letters, marks and numbers stay."""

    def __missing__(self, code: int) -> str:
        char = chr(code)
        category = unicodedata.category(char)
        if char in _HARD_CONTROLS:
            out = "\n"
        elif category[0] == "Z" or char == "\t" or char in _SOFT_PUNCTUATION:
            out = " "
        elif category in ("Cc", "Cf", "Cs"):
            out = ""
        elif category[0] == "P":
            out = "\n"
        elif category[0] == "S":
            out = f" {char} "
        else:
            out = char
        self[code] = out
        return out


_SEPARATORS = _Separators()


class _Text:
    """A text as compared: its words, the key, and which words a break follows."""

    __slots__ = ("key", "compact", "tokens", "tokset", "ends", "_positions")

    def __init__(self, text: str):
        tokens: list[str] = []
        ends: set[int] = set()
        for segment in unicodedata.normalize("NFKC", text).translate(_SEPARATORS).split("\n"):
            for raw in segment.split():
                word = _word(raw)
                if " " in word or not word:
                    tokens += word.split()
                else:
                    tokens.append(word)
            if tokens:
                ends.add(len(tokens) - 1)
        self.tokens = tuple(tokens)
        self.tokset = frozenset(tokens)
        self.ends = frozenset(ends)
        self.key = " ".join(tokens)
        self.compact = "".join(tokens)
        self._positions: dict[str, list[int]] | None = None

    @property
    def positions(self) -> dict[str, list[int]]:
        if self._positions is None:
            self._positions = {}
            for i, token in enumerate(self.tokens):
                self._positions.setdefault(token, []).append(i)
        return self._positions


def leak_key(text: str) -> str:
    """Normalised form compared for leaks: NFKC, casefold, confusables to their skeleton, words of
    letters/numbers joined by single spaces (accents over Latin-script letters dropped, each
    symbol a word of its own; punctuation, spacing and invisible characters only separate)."""
    return _Text(text).key


@dataclass(frozen=True)
class Leak:
    """The strongest leak of a text against one reference of a :class:`LeakIndex`."""

    reference: int  # index into the references the index was built from
    kind: str  # "same" | "contains" | "contained" | "near-duplicate"
    score: float  # the rarity-weighted share of words kept (1.0 unless near-duplicate)

    def describe(self) -> str:
        """A short phrase for a report, e.g. "contains it after normalisation"."""
        if self.kind == "same":
            return "the same text after normalisation"
        if self.kind == "contains":
            return "contains it after normalisation"
        if self.kind == "contained":
            return "is part of it after normalisation"
        return f"near-duplicate ({self.score:.2f} of its words, weighted by rarity, the same)"


def _edit_budget(word: str, other: str) -> int:
    """Edits a misspelt word may have: none in a word of one character or with a digit (a
    number is not misspelt, it is another number), one in a word of 2-7, two in a longer one."""
    if any(c.isdigit() for c in word + other):
        return 0
    n = min(len(word), len(other))
    return 0 if n < 2 else 1 if n < 8 else 2


def _misspelt(a: str, b: str) -> bool:
    """Whether ``b`` is ``a`` misspelt: within the edit budget (optimal string alignment:
    substitution, insertion, deletion, transposition of neighbours)."""
    budget = _edit_budget(a, b)
    if budget == 0 or abs(len(a) - len(b)) > budget:
        return False
    previous2: list[int] = []
    previous = list(range(len(b) + 1))
    for i in range(1, len(a) + 1):
        current = [i] + [0] * len(b)
        for j in range(1, len(b) + 1):
            cost = a[i - 1] != b[j - 1]
            current[j] = min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + cost)
            if i > 1 and j > 1 and a[i - 1] == b[j - 2] and a[i - 2] == b[j - 1]:
                current[j] = min(current[j], previous2[j - 2] + 1)
        if min(current) > budget:
            return False
        previous2, previous = previous, current
    return previous[-1] <= budget


def _aligned(small: _Text, big: _Text, start: int, whole: bool) -> bool:
    """Whether ``small`` at word ``start`` of ``big`` ends where ``big`` has a break and, when
    ``whole``, also begins after one (always, for ``OPEN_END_WORDS`` words or more)."""
    n = len(small.tokens)
    if n >= OPEN_END_WORDS:
        return True
    return start + n - 1 in big.ends and (not whole or start == 0 or start - 1 in big.ends)


def _inside(small: _Text, big: _Text, whole: bool) -> bool:
    """``small``'s words in order inside ``big``'s, aligned as :func:`_aligned` says."""
    hay, needle = f" {big.key} ", f" {small.key} "
    pos = hay.find(needle)
    while pos >= 0:
        if _aligned(small, big, hay.count(" ", 0, pos + 1) - 1, whole):
            return True
        pos = hay.find(needle, pos + 1)
    return False


class LeakIndex:
    """References (probe and eval prompts) indexed once, then :meth:`find` for each text."""

    def __init__(
        self,
        references: Sequence[str],
        threshold: float = DEFAULT_THRESHOLD,
        min_chars: int = DEFAULT_MIN_CHARS,
    ):
        """``threshold``: the rarity-weighted share of a reference's words a near-duplicate keeps;
        ``min_chars``: the shortest key (in characters) that can be contained in another text."""
        if not 0 < threshold <= 1:
            raise ValueError(f"threshold must be in (0, 1], got {threshold}")
        if min_chars < 1:
            raise ValueError(f"min_chars must be at least 1, got {min_chars}")
        self.threshold, self.min_chars = threshold, min_chars
        self._refs: list[_Text] = []
        self._first: list[int] = []  # the reference index of each distinct key
        seen: dict[str, int] = {}
        for i, text in enumerate(references):
            parsed = _Text(text)
            if parsed.tokens and parsed.key not in seen:
                seen[parsed.key] = len(self._refs)
                self._refs.append(parsed)
                self._first.append(i)
        self._same: dict[str, int] = {}
        self._df: Counter[str] = Counter()
        self._postings: dict[str, list[int]] = {}
        for u, ref in enumerate(self._refs):
            self._same.setdefault(ref.compact, u)
            self._df.update(ref.tokset)
            for token in ref.tokset:
                self._postings.setdefault(token, []).append(u)
        self._weights = [self._weights_of(ref) for ref in self._refs]
        self._anchors = [
            self._rarest(ref, w) for ref, w in zip(self._refs, self._weights, strict=True)
        ]
        self._sig: dict[str, list[int]] = {}  # rare word -> references that can be contained
        for u, ref in enumerate(self._refs):
            if self._containable(ref) and self._inside_count(ref, skip=u) < TEMPLATE_REFERENCES:
                for token in self._anchors[u]:
                    self._sig.setdefault(token, []).append(u)

    def __len__(self) -> int:
        """The number of distinct references (by key)."""
        return len(self._refs)

    # the rules -------------------------------------------------------------------------------
    def _containable(self, text: _Text) -> bool:
        """Long enough to be the contained side: ``min_chars`` characters, ``MIN_WORDS`` words."""
        return len(text.key) >= self.min_chars and len(text.tokens) >= MIN_WORDS

    def _max_typos(self, text: _Text) -> int:
        """Misspelt words a near-duplicate of ``text`` may have: ``1 - threshold`` of its words,
        at least one."""
        return max(1, int(len(text.tokens) * (1 - self.threshold) + 1e-9))

    def _weights_of(self, text: _Text) -> list[float]:
        """Each word's weight: 1 / the number of references that hold it (1 if none does)."""
        return [1 / max(self._df.get(t, 0), 1) for t in text.tokens]

    def _rarest(self, text: _Text, weights: list[float]) -> list[str]:
        """Its rarest distinct words, as few as a near-duplicate (or a containment) must keep at
        least one of: one more than it may have misspelt, or, if fewer, enough to carry more than
        ``1 - threshold`` of its weight (a near-duplicate keeps ``threshold`` of it)."""
        weight: dict[str, float] = {}
        for token, w in zip(text.tokens, weights, strict=True):
            weight[token] = weight.get(token, 0.0) + w
        ranked = sorted(weight, key=lambda t: (self._df.get(t, 0), t))
        enough = (1 - self.threshold) * sum(weights) * (1 + 1e-9)
        chosen, carried = [], 0.0
        for token in ranked[: self._max_typos(text) + 1]:
            chosen.append(token)
            carried += weight[token]
            if carried > enough:
                break
        return chosen

    def _near(
        self, small: _Text, weights: list[float], anchors: list[str], big: _Text, whole: bool
    ) -> float:
        """The best rarity-weighted share of ``small``'s words kept, word for word, in a span of
        ``big`` aligned as :func:`_aligned` says, the others misspelt; 0.0 when there is none."""
        n, budget, total = len(small.tokens), self._max_typos(small), sum(weights)
        offsets = {
            q - p
            for token in anchors
            for p in small.positions.get(token, ())
            for q in big.positions.get(token, ())
        }
        best = 0.0
        for start in offsets:
            if start < 0 or start + n > len(big.tokens) or not _aligned(small, big, start, whole):
                continue
            kept, typos = 0.0, 0
            for weight, a, b in zip(
                weights, small.tokens, big.tokens[start : start + n], strict=True
            ):
                if a == b:
                    kept += weight
                elif (typos := typos + 1) > budget or not _misspelt(a, b):
                    break
            else:
                if typos and kept / total >= self.threshold:
                    best = max(best, kept / total)
        return best

    def _inside_count(self, text: _Text, skip: int = -1) -> int:
        """How many references hold ``text`` (``_inside``), counted up to the template bound."""
        rarest = min(text.tokset, key=lambda t: (self._df.get(t, 0), t))
        count = 0
        for u in self._postings.get(rarest, ()):
            ref = self._refs[u]
            if u != skip and text.tokset <= ref.tokset and _inside(text, ref, whole=False):
                count += 1
                if count >= TEMPLATE_REFERENCES:
                    break
        return count

    # the query -------------------------------------------------------------------------------
    def find(self, text: str) -> Leak | None:
        """The strongest leak of ``text`` against any reference, or None: ``same`` first, then
        ``contains``, ``contained``, then the near-duplicate with the highest score (ties: the
        first reference)."""
        parsed = _Text(text)
        if not parsed.tokens:
            return None
        if (u := self._same.get(parsed.compact)) is not None:
            return Leak(self._first[u], "same", 1.0)
        found: list[tuple[int, float, int]] = []  # (kind rank, -score, reference)
        candidates = {u for t in parsed.tokset for u in self._sig.get(t, ())}
        for u in candidates:
            ref = self._refs[u]
            missing = len(ref.tokset - parsed.tokset)
            if missing > self._max_typos(ref):
                continue
            if missing == 0 and _inside(ref, parsed, whole=False):
                found.append((1, -1.0, self._first[u]))
            elif score := self._near(ref, self._weights[u], self._anchors[u], parsed, False):
                found.append((3, -score, self._first[u]))
        if self._containable(parsed):
            found += self._contained(parsed)
        if not found:
            return None
        rank, score, reference = min(found)
        return Leak(reference, KINDS[rank], -score)

    def _contained(self, text: _Text) -> list[tuple[int, float, int]]:
        """The references that hold ``text`` (exactly or nearly); none when two or more hold it
        exactly (template text)."""
        weights = self._weights_of(text)
        anchors = self._rarest(text, weights)
        budget = self._max_typos(text)
        candidates = {u for t in anchors for u in self._postings.get(t, ())}
        exact, near = [], []
        for u in candidates:
            ref = self._refs[u]
            missing = len(text.tokset - ref.tokset)
            if missing > budget:
                continue
            if missing == 0 and _inside(text, ref, whole=True):
                exact.append((2, -1.0, self._first[u]))
            elif score := self._near(text, weights, anchors, ref, True):
                near.append((3, -score, self._first[u]))
        return [] if len(exact) >= TEMPLATE_REFERENCES else exact + near
