"""Tokenizer.from_pretrained(folder): Hugging Face `tokenizer.json` files read exactly as `tokenizers` reads them.

The project may not depend on `tokenizers`/`transformers`, yet fine-tuning and evaluation must see exactly the ids
the pretrained checkpoints were trained with. This file re-implements the parts of the `tokenizers` pipeline used
by WordPiece (BERT), byte-level BPE (GPT-2, RoBERTa, Llama-3, Qwen2, SmolLM) and SentencePiece-style BPE (Llama-2,
Mistral) with the standard library only, and raises a ValueError naming any component or value it does not know
rather than tokenizing differently."""
import functools
import heapq
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .files import REQUIRED, bad_value, config_value, read_json, shown

# --- Unicode character classes ------------------------------------------------------------------
# Python's `re` has no \p{..}, and its \s/\w differ from Oniguruma's (Python counts U+001C-U+001F as
# space), so every class that tokenizers' regexes use is spelled out from unicodedata.
_WS = "\t\n\x0b\x0c\r \x85\xa0\u1680" + "".join(map(chr, range(0x2000, 0x200B))) + "\u2028\u2029\u202f\u205f\u3000"
_CLASSES = {"d": ("Nd",), "w": ("L", "M", "Nd", "Pc", "Nl"), "punct": ("P",), "Mn": ("Mn",), "Letter": ("L",),
            "Mark": ("M",), "Number": ("N",), "Punctuation": ("P",), "Symbol": ("S",), "Separator": ("Z",)}
# Oniguruma's \w is Alphabetic + marks + decimal digits + connectors + Join_Control, and Alphabetic adds
# circled/squared letters (category So) to the letters; Rust's ASCII punctuation includes symbols like $+<=>.
_WORD_EXTRA = "\u200c\u200d" + "".join(chr(c) for lo, hi in ((0x24B6, 0x24E9), (0x1F130, 0x1F149), (0x1F150, 0x1F169),
                                                            (0x1F170, 0x1F189)) for c in range(lo, hi + 1))
_EXTRA = {"s": _WS, "w": _WORD_EXTRA, "punct": "!\"#$%&'()*+,-./:;<=>?@[\\]^_`{|}~"}


@functools.lru_cache(maxsize=None)
def _category_runs():
    """(first, last, category) runs over all code points: built once, and only if a class is needed."""
    runs, prev, cat = [], None, unicodedata.category
    for cp in range(0x110000):
        if (c := cat(chr(cp))) != prev:
            runs.append([cp, cp, c])
        runs[-1][1], prev = cp, c
    return runs


@functools.lru_cache(maxsize=None)
def _class_body(name: str, negate: bool, bmp: bool) -> str:
    """Character-class body (no brackets) for a general category or an Oniguruma shorthand."""
    cats = _CLASSES.get(name, () if name in _EXTRA else (name,))
    if any(len(c) > 2 or c[:1] not in "LMNPSZC" for c in cats):
        raise ValueError(f"unsupported regex class \\p{{{name}}}")
    ranges = sorted([(ord(c), ord(c)) for c in _EXTRA.get(name, "")] +
                    [(lo, hi) for lo, hi, c in _category_runs() if c in cats or c[0] in cats])
    merged = []
    for lo, hi in ranges:
        if merged and lo <= merged[-1][1] + 1:
            merged[-1][1] = max(merged[-1][1], hi)
        else:
            merged.append([lo, hi])
    if negate:
        edges = [-1] + [x for r in merged for x in r] + [0x110000]
        merged = [(edges[i] + 1, edges[i + 1] - 1) for i in range(0, len(edges), 2) if edges[i] + 1 < edges[i + 1]]
    top = 0xFFFF if bmp else 0x10FFFF
    return "".join(f"\\U{lo:08x}" + (f"-\\U{min(hi, top):08x}" if hi > lo else "") for lo, hi in merged if lo <= top)


_ONIG_TOKEN = re.compile(r"\\([pP])(?:\{(\^?)(\w+)\}|(\w))|\\([sSdDwW])|\\.|\[|\]")


def _translate(pattern: str, bmp: bool) -> str:
    """Oniguruma syntax (as stored in tokenizer.json) -> Python syntax."""
    depth = 0

    def convert(m):
        nonlocal depth
        if m.group(1):
            body = _class_body(m.group(3) or m.group(4), (m.group(1) == "P") != bool(m.group(2)), bmp)
        elif m.group(5):
            body = _class_body(m.group(5).lower(), m.group(5).isupper(), bmp)
        elif m.group() == "[":
            depth += 1
            return "[" if depth == 1 else ""  # Oniguruma nests classes as a union; Python would read '['
        elif m.group() == "]" and depth:
            depth -= 1
            return "" if depth else "]"
        else:
            return m.group()
        return body if depth else f"[{body}]"
    return _ONIG_TOKEN.sub(convert, pattern)


class _Regex:
    """A pattern compiled twice. Python tests the non-BMP ranges of a class one by one, which makes
    big Unicode classes slow; text without such characters (nearly all) uses the copy cut at U+FFFF."""

    def __init__(self, full: str, bmp: Optional[str] = None):
        self.full = re.compile(full)
        self.bmp = re.compile(bmp) if bmp and bmp != full else self.full
        self.groups = self.full.groups

    def __call__(self, s: str) -> "re.Pattern":
        return self.bmp if s.isascii() or max(s) < "\U00010000" else self.full


@functools.lru_cache(maxsize=None)
def _compile(pattern: str, group: bool = False) -> _Regex:
    """group=True wraps the pattern in a capturing group so that re.split also returns the matches."""
    full, bmp = _translate(pattern, False), _translate(pattern, True)
    return _Regex(f"({full})", f"({bmp})") if group else _Regex(full, bmp)


def _literal(text: str, group: bool = False) -> _Regex:
    return _Regex(f"({re.escape(text)})" if group else re.escape(text))


def _pattern(d: dict, where: str, group: bool = False) -> _Regex:
    """d's "pattern": {"String": text} or {"Regex": an Oniguruma pattern}; one that does not compile is named by its
    JSON path. It is compiled unwrapped too: "a)|(b" is no regex, though the grouped "(a)|(b)" is."""
    p = config_value(d, "pattern", "object", where=where)
    where += ".pattern"
    if len(p) != 1 or not p.keys() <= {"String", "Regex"} or not isinstance(next(iter(p.values())), str):
        raise bad_value(where, p, '{"String": text} or {"Regex": pattern}')
    if "String" in p:
        return _literal(p["String"], group)
    try:
        _compile(p["Regex"])
        return _compile(p["Regex"], group)
    except (ValueError, re.error, RecursionError, OverflowError) as e:  # bad syntax, a class we lack, absurd nesting
        raise ValueError(f"{where}.Regex {shown(p['Regex'])} does not compile ({e})") from None


# --- byte-level alphabet and per-character normalization ----------------------------------------
# GPT-2's byte <-> printable-character table: printable Latin-1 bytes stand for themselves, the others
# are shifted to U+0100 and up.
_BYTE_TO_CHAR = {b: chr(b) for b in range(256) if 33 <= b <= 126 or 161 <= b <= 172 or 174 <= b <= 255}
_BYTE_TO_CHAR.update({b: chr(256 + n) for n, b in enumerate(b for b in range(256) if b not in _BYTE_TO_CHAR)})
_TO_BYTE_CHARS = str.maketrans({chr(b): c for b, c in _BYTE_TO_CHAR.items()})
_FROM_BYTE_CHARS = {c: b for b, c in _BYTE_TO_CHAR.items()}


@functools.lru_cache(maxsize=1 << 16)
def _to_byte_chars(s: str) -> str:
    return (s if s.isascii() else s.encode("utf-8").decode("latin-1")).translate(_TO_BYTE_CHARS)


def _lower(s: str) -> str:
    # tokenizers lower-cases char by char: no final-sigma rule, which str.lower applies
    return "".join(map(str.lower, s)) if "\u03a3" in s else s.lower()


def _strip_marks(s: str, marks: str = "Mn") -> str:
    """BertNormalizer drops non-spacing marks; the StripAccents normalizer drops every mark."""
    return s if s.isascii() else _compile(rf"\p{{{marks}}}+")(s).sub("", s)


def _is_chinese(cp: int) -> bool:  # the CJK blocks BERT puts spaces around (0x2B920 is tokenizers' bound)
    return any(lo <= cp <= hi for lo, hi in ((0x4E00, 0x9FFF), (0x3400, 0x4DBF), (0x20000, 0x2A6DF),
                                            (0x2A700, 0x2B73F), (0x2B740, 0x2B81F), (0x2B920, 0x2CEAF),
                                            (0xF900, 0xFAFF), (0x2F800, 0x2FA1F)))


class _BertCleanup(dict):
    """str.translate table for BertNormalizer's per-character steps, filled in lazily."""

    def __init__(self, clean: bool, chinese: bool):
        super().__init__()
        self.clean, self.chinese = clean, chinese

    def __missing__(self, cp: int) -> str:
        c = out = chr(cp)
        if self.clean:  # controls (not unassigned code points) go first: U+0085 is dropped, not a space
            if cp in (0, 0xFFFD) or c not in "\t\n\r" and unicodedata.category(c) in ("Cc", "Cf", "Co"):
                out = ""
            elif c in _WS:
                out = " "
        if self.chinese and _is_chinese(cp):
            out = f" {c} "
        self[cp] = out
        return out


def _split(s: str, rx: _Regex, behavior: str, invert: bool = False):
    """Non-empty pieces of s around the matches of rx (grouped), as tokenizers' SplitDelimiterBehavior
    does, and whether the first piece starts at the beginning of s."""
    parts = rx(s).split(s)  # gap, match, gap, ..., gap
    if rx.groups > 1:
        parts = [p for i, p in enumerate(parts) if i % (rx.groups + 1) < 2]
    if behavior == "Isolated":
        return [p for p in parts if p], True
    if behavior == "Removed":
        first = next((i for i, p in enumerate(parts) if p), 0) % 2 == invert
        return [p for p in parts[1 if invert else 0::2] if p], first
    seq = [(p, (i % 2 == 1) != invert) for i, p in enumerate(parts) if p or i % 2]  # empty matches count
    backward = behavior == "MergedWithNext"
    out, prev = [], False
    for p, is_match in reversed(seq) if backward else seq:
        if out and is_match and (prev if behavior == "Contiguous" else not prev):
            out[-1] = p + out[-1] if backward else out[-1] + p
        else:
            out.append(p)
        prev = is_match
    return [p for p in (reversed(out) if backward else out) if p], True


# --- models --------------------------------------------------------------------------------------
def _flag(d: dict, where: str, key: str, default: bool) -> bool:
    return config_value(d, key, "flag", default, where=where)


def _vocab(d: dict) -> dict:
    """model.vocab: token -> id, every id an integer >= 0."""
    vocab = config_value(d, "vocab", "object", where="model")
    for token, i in vocab.items():
        if type(i) is not int or i < 0:
            raise bad_value(f"model.vocab[{shown(token)}]", i, "an integer >= 0", "number")
    return vocab


class _Model:
    def __init__(self, d: dict):
        self.vocab, self.cache = _vocab(d), {}
        self.unk = config_value(d, "unk_token", "name", None, where="model")
        if self.unk is not None and self.unk not in self.vocab:
            raise ValueError(f"model.unk_token is {shown(self.unk)}, which is not in model.vocab")

    def __call__(self, word: str) -> tuple:
        ids = self.cache.get(word)
        if ids is None:
            if len(self.cache) > 200_000:
                self.cache.clear()
            ids = self.cache[word] = tuple(self.tokenize(word))
        return ids

    def unk_id(self) -> int:
        if self.unk not in self.vocab:
            raise ValueError(f"unknown piece, and unk token {self.unk!r} is not in the vocabulary")
        return self.vocab[self.unk]


class _WordLevel(_Model):
    def tokenize(self, word):
        return [self.vocab[word] if word in self.vocab else self.unk_id()]


class _WordPiece(_Model):
    def __init__(self, d):
        super().__init__(d)
        self.prefix = config_value(d, "continuing_subword_prefix", "name", "##", where="model")
        self.max_chars = config_value(d, "max_input_chars_per_word", "size", 100, where="model")

    def tokenize(self, word):
        if len(word) > self.max_chars:
            return [self.unk_id()]
        ids, start = [], 0
        while start < len(word):
            for end in range(len(word), start, -1):  # greedy: longest known piece first
                piece = word[start:end] if start == 0 else self.prefix + word[start:end]
                if piece in self.vocab:
                    ids.append(self.vocab[piece])
                    break
            else:
                return [self.unk_id()]
            start = end
        return ids


class _BPE(_Model):
    def __init__(self, d):
        super().__init__(d)
        if config_value(d, "dropout", "probability", None, where="model"):
            raise ValueError("model.dropout: BPE dropout is not supported: it makes encoding random")
        self.prefix = config_value(d, "continuing_subword_prefix", "name", "", where="model")
        self.suffix = config_value(d, "end_of_word_suffix", "name", "", where="model")
        self.byte_fallback, self.fuse_unk, self.ignore_merges = (
            _flag(d, "model", key, False) for key in ("byte_fallback", "fuse_unk", "ignore_merges"))
        self.merges = {}  # (left id, right id) -> (rank, merged id)
        for rank, m in enumerate(config_value(d, "merges", "list", [], where="model")):
            pair = m.split(" ") if isinstance(m, str) else m
            if not (isinstance(pair, list) and len(pair) == 2 and all(isinstance(x, str) for x in pair)):
                raise bad_value(f"model.merges[{rank}]", m, 'a "left right" string or a ["left", "right"] pair')
            a, b = pair
            merged = a + b[len(self.prefix):]
            if not {a, b, merged} <= self.vocab.keys():
                raise ValueError(f"model.merges[{rank}] ({shown(a)} {shown(b)}) uses a token missing from model.vocab")
            self.merges.setdefault((self.vocab[a], self.vocab[b]), (rank, self.vocab[merged]))

    def tokenize(self, word):
        if self.ignore_merges and word in self.vocab:
            return [self.vocab[word]]
        ids, unk = [], None  # unk: a pending unknown run, emitted before the next known character
        for i, ch in enumerate(word):
            s = (self.prefix if i else "") + ch + (self.suffix if i == len(word) - 1 else "")
            if s in self.vocab:
                ids += ([unk] if unk is not None else []) + [self.vocab[s]]
                unk = None
                continue
            fallback = [self.vocab.get(f"<0x{b:02X}>") for b in s.encode("utf-8")] if self.byte_fallback else [None]
            if None not in fallback:
                ids += fallback  # tokenizers does not flush a pending unk here either
            elif self.unk is not None:
                if unk is not None and not self.fuse_unk:
                    ids.append(unk)
                unk = self.unk_id()
        return self._merge(ids + ([unk] if unk is not None else []))

    def _merge(self, ids):
        # Lowest rank first, leftmost on ties, skipping stale entries: the order tokenizers uses.
        n, merges = len(ids), self.merges
        nxt, prv, alive = list(range(1, n + 1)), list(range(-1, n - 1)), [True] * n
        todo = [(merges[p][0], i, merges[p][1]) for i, p in enumerate(zip(ids, ids[1:])) if p in merges]
        heapq.heapify(todo)  # a heap: heappop() gives the next merge
        while todo:
            _, i, new = heapq.heappop(todo)
            j = nxt[i]
            if not alive[i] or j >= n or merges.get((ids[i], ids[j]), (0, None))[1] != new:
                continue
            ids[i], alive[j], k = new, False, nxt[j]
            nxt[i] = k
            if k < n:
                prv[k] = i
                if m := merges.get((new, ids[k])):
                    heapq.heappush(todo, (m[0], i, m[1]))
            if prv[i] >= 0 and (m := merges.get((ids[prv[i]], new))):
                heapq.heappush(todo, (m[0], prv[i], m[1]))
        return [t for t, a in zip(ids, alive) if a]


# --- pipeline components built from tokenizer.json ----------------------------------------------
# Each builder takes its object and the object's JSON path (for errors); Tokenizer._build has checked its type.
NORMALIZERS = ("BertNormalizer", "NFC", "NFD", "NFKC", "NFKD", "Strip", "Replace", "Prepend", "StripAccents",
               "Lowercase", "ByteLevel")
PRE_TOKENIZERS = ("ByteLevel", "Metaspace", "BertPreTokenizer", "Split", "Digits", "Whitespace", "WhitespaceSplit",
                  "Punctuation", "CharDelimiterSplit")
POST_PROCESSORS = ("TemplateProcessing", "BertProcessing", "RobertaProcessing", "ByteLevel")
DECODERS = ("ByteLevel", "WordPiece", "Metaspace", "Replace", "ByteFallback", "Fuse", "Strip", "BPEDecoder")
BEHAVIORS = ("Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous")  # of a split


def _normalizer(d: dict, where: str):
    t = d["type"]
    if t == "BertNormalizer":
        table = _BertCleanup(_flag(d, where, "clean_text", True), _flag(d, where, "handle_chinese_chars", True))
        lower = _flag(d, where, "lowercase", True)
        strip = _flag(d, where, "strip_accents", lower)  # null: as lowercase
        return lambda s: (_lower if lower else str)(
            _strip_marks(unicodedata.normalize("NFD", s.translate(table))) if strip else s.translate(table))
    if t in ("NFC", "NFD", "NFKC", "NFKD"):
        return lambda s: unicodedata.normalize(t, s)
    if t == "Strip":
        left, right = _flag(d, where, "strip_left", True), _flag(d, where, "strip_right", True)
        return lambda s: s.strip(_WS) if left and right else s.lstrip(_WS) if left else s.rstrip(_WS) if right else s
    if t == "Replace":
        rx, content = _pattern(d, where), config_value(d, "content", "name", where=where)
        return lambda s: rx(s).sub(lambda m: content, s)
    if t == "Prepend":
        prepend = config_value(d, "prepend", "name", where=where)
        return lambda s: prepend + s if s else s
    if t == "StripAccents":
        return lambda s: _strip_marks(s, "M")
    return {"Lowercase": _lower, "ByteLevel": _to_byte_chars}[t]


def _splitter(rx: _Regex, behavior: str, invert: bool = False):
    """A pre-tokenizer: (pieces, whether pieces[0] starts the input) -> the same, split further."""
    def f(state):
        out, first = [], state[1]
        for i, p in enumerate(state[0]):
            got, at0 = _split(p, rx, behavior, invert)
            first = first and at0 and bool(got) if i == 0 else first
            out += got
        return out, first
    return f


def _prepend_scheme(d: dict, where: str) -> str:
    """Metaspace's prepend_scheme; older files say add_prefix_space instead."""
    legacy = "always" if _flag(d, where, "add_prefix_space", True) else "never"
    return config_value(d, "prepend_scheme", "name", legacy, where=where, choices=("always", "first", "never"))


def _pre_tokenizer(d: dict, where: str):
    t = d["type"]
    if t == "ByteLevel":
        prefix, rx = _flag(d, where, "add_prefix_space", True), _flag(d, where, "use_regex", True) and _compile(
            r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+", True)  # GPT-2's

        def byte_level(state):
            out = []
            for s in state[0]:
                s = " " + s if prefix and not s.startswith(" ") else s  # every piece, as tokenizers does
                out += map(_to_byte_chars, _split(s, rx, "Isolated")[0] if rx else [s])
            return out, state[1]
        return byte_level
    if t == "Metaspace":
        rep, split = config_value(d, "replacement", "char", "\u2581", where=where), _flag(d, where, "split", True)
        scheme, rx = _prepend_scheme(d, where), _literal(rep, True)

        def metaspace(state):
            out = []
            for i, s in enumerate(state[0]):
                s = s.replace(" ", rep)
                if (scheme == "always" or scheme == "first" and i == 0 and state[1]) and not s.startswith(rep):
                    s = rep + s
                out += _split(s, rx, "MergedWithNext")[0] if split else [s]
            return out, state[1]
        return metaspace
    if t == "BertPreTokenizer":
        ws, punct = _splitter(_compile(r"\s", True), "Removed"), _splitter(_compile(r"\p{punct}", True), "Isolated")
        return lambda state: punct(ws(state))

    def behavior(default=REQUIRED):
        return config_value(d, "behavior", "name", default, where=where, choices=BEHAVIORS)
    args = {"Split": lambda: (_pattern(d, where, True), behavior(), _flag(d, where, "invert", False)),
            "Digits": lambda: (_compile(r"\p{N}", True),
                               "Isolated" if _flag(d, where, "individual_digits", False) else "Contiguous"),
            "Whitespace": lambda: (_compile(r"\w+|[^\w\s]+", True), "Removed", True),
            "WhitespaceSplit": lambda: (_compile(r"\s", True), "Removed"),
            "Punctuation": lambda: (_compile(r"\p{punct}", True), behavior("Isolated")),
            "CharDelimiterSplit": lambda: (_literal(config_value(d, "delimiter", "char", where=where), True),
                                           "Removed")}[t]
    return _splitter(*args())


def _post_processor(d: dict, where: str):
    """A post-processor: ([(ids, type_ids)] per input, add_special_tokens) -> the same; with .n_added(pair), and
    .ids, the (JSON path, token id) pairs it adds, which Tokenizer checks against its vocabulary."""
    t = d["type"]
    if t == "TemplateProcessing":
        return [_template(d, where)]
    if t in ("BertProcessing", "RobertaProcessing"):
        cls, sep, roberta = _token_and_id(d, "cls", where), _token_and_id(d, "sep", where), t == "RobertaProcessing"

        def bert(seqs, add):
            if not add:  # RoBERTa has a single token type, and says so even without specials
                return [(ids, [0] * len(ids)) for ids, _ in seqs] if roberta else seqs
            out = [([cls] + seqs[0][0] + [sep], [0] * (len(seqs[0][0]) + 2))]
            for b, _ in seqs[1:]:
                b = [sep] * roberta + b + [sep]
                out.append((b, [int(not roberta)] * len(b)))
            return out
        bert.n_added = lambda pair: (3 + roberta) if pair else 2
        bert.ids = [(f"{where}.cls[1]", cls), (f"{where}.sep[1]", sep)]
        return [bert]
    return []  # ByteLevel only trims offsets, which we do not report


def _token_and_id(d: dict, key: str, where: str) -> int:
    """BertProcessing's cls or sep: a [token, id] pair; its id."""
    pair = config_value(d, key, "list", where=where)
    if len(pair) != 2 or not isinstance(pair[0], str) or type(pair[1]) is not int:
        raise bad_value(f"{where}.{key}", pair, 'a ["token", id] pair')
    return pair[1]


def _template(d: dict, where: str):
    specials, checks = {}, []  # special token name -> its ids; (JSON path, id) of each, for Tokenizer to check
    for name, v in config_value(d, "special_tokens", "object", {}, where=where).items():
        at = f"{where}.special_tokens[{shown(name)}]"
        if not isinstance(v, dict):
            raise bad_value(at, v, 'an object with "ids"', "object")
        specials[name] = config_value(v, "ids", "list", where=at)
        checks += [(f"{at}.ids[{i}]", tid) for i, tid in enumerate(specials[name])]
    templates = {key: _template_pieces(d, key, where, specials) for key in ("single", "pair")}

    def template(seqs, add):
        ids, types = [], []
        for kind, name, type_id in templates["pair" if len(seqs) == 2 else "single"]:
            new = seqs[name != "A"][0] if kind == "Sequence" else specials[name] if add else []
            ids += new
            types += [type_id] * len(new)
        return [(ids, types)]
    template.n_added = lambda pair: sum(len(specials[name]) for kind, name, _ in templates["pair" if pair else "single"]
                                        if kind == "SpecialToken")
    template.ids = checks
    return template


def _template_pieces(d: dict, key: str, where: str, specials: dict) -> list:
    """Template `key` ("single" or "pair") as [(kind, id, type_id)]: each piece a {"Sequence": ...} naming A (or B,
    in a pair) or a {"SpecialToken": ...} naming one of the template's special_tokens."""
    out = []
    for i, piece in enumerate(_objects(d, key, where)):
        at = f"{where}.{key}[{i}]"
        kind, p = next(iter(piece.items())) if len(piece) == 1 else (None, None)
        if kind not in ("Sequence", "SpecialToken") or not isinstance(p, dict):
            raise bad_value(at, piece, 'an object {"Sequence": {...}} or {"SpecialToken": {...}}')
        name = config_value(p, "id", "name", where=f"{at}.{kind}")
        type_id = config_value(p, "type_id", "count", where=f"{at}.{kind}")
        if kind == "Sequence" and name not in ("A", "B")[:1 + (key == "pair")]:
            raise bad_value(f"{at}.Sequence.id", name, "A" if key == "single" else "A or B")
        if kind == "SpecialToken" and name not in specials:
            raise ValueError(f"{at} names the special token {shown(name)}, which {where}.special_tokens does not "
                             "define")
        out.append((kind, name, type_id))
    return out


def _objects(d: dict, key: str, where: str, default=REQUIRED) -> list:
    """d[key]: a list of objects (a Sequence's members, a template, added_tokens), each one checked."""
    items = config_value(d, key, "list", default, where=where)
    for i, item in enumerate(items):
        if not isinstance(item, dict):
            raise bad_value(f"{where}.{key}[{i}]" if where else f"{key}[{i}]", item, "an object", "object")
    return items


def _decoder(d: dict, where: str):
    """A decoder: list of token strings -> list of strings (joined at the end)."""
    t = d["type"]
    if t == "ByteLevel":
        return lambda tokens: [b"".join(
            bytes(map(_FROM_BYTE_CHARS.__getitem__, tok)) if all(c in _FROM_BYTE_CHARS for c in tok)
            else tok.encode("utf-8") for tok in tokens).decode("utf-8", "replace")]
    if t == "WordPiece":
        prefix, cleanup = config_value(d, "prefix", "name", "##", where=where), _flag(d, where, "cleanup", True)
        fixes = [(" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"), (" 'm", "'m"),
                 (" do not", " don't"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")] if cleanup else []

        def wordpiece(tokens):
            out = []
            for i, tok in enumerate(tokens):
                tok = (tok[len(prefix):] if tok.startswith(prefix) else " " + tok) if i else tok
                for a, b in fixes:  # per token, as tokenizers does
                    tok = tok.replace(a, b)
                out.append(tok)
            return out
        return wordpiece
    if t == "Metaspace":
        rep = config_value(d, "replacement", "char", "\u2581", where=where)
        first = _prepend_scheme(d, where) != "never"
        return lambda tokens: [tok.replace(rep, "" if i == 0 and first else " ") for i, tok in enumerate(tokens)]
    if t == "Replace":
        rx, content = _pattern(d, where), config_value(d, "content", "name", where=where)
        return lambda tokens: [rx(tok).sub(lambda m: content, tok) for tok in tokens]
    if t == "ByteFallback":
        return _byte_fallback
    if t == "Fuse":
        return lambda tokens: ["".join(tokens)]
    if t == "Strip":
        c = config_value(d, "content", "char", where=where)
        start, stop = (config_value(d, key, "count", 0, where=where) for key in ("start", "stop"))
        return lambda tokens: [_strip(tok, c, start, stop) for tok in tokens]
    suffix = config_value(d, "suffix", "name", "</w>", where=where)  # BPEDecoder
    return lambda tokens: [tok.replace(suffix, "" if i == len(tokens) - 1 else " ") for i, tok in enumerate(tokens)]


# tokenizer.json key -> (its builder, the key of a Sequence's members, the types the builder knows)
_COMPONENTS = {"normalizer": (_normalizer, "normalizers", NORMALIZERS),
               "pre_tokenizer": (_pre_tokenizer, "pretokenizers", PRE_TOKENIZERS),
               "post_processor": (_post_processor, "processors", POST_PROCESSORS),
               "decoder": (_decoder, "decoders", DECODERS)}
MAX_SEQUENCE_DEPTH = 8  # real files nest one Sequence at most; a deep chain would exhaust the stack when applied


def _byte_fallback(tokens):
    out, pending = [], []
    for tok in tokens + [None]:
        if tok is not None and len(tok) == 6 and tok.startswith("<0x") and tok.endswith(">"):
            try:
                pending.append(int(tok[3:5], 16))
                continue
            except ValueError:
                pass
        if pending:
            try:
                out.append(bytes(pending).decode("utf-8"))
            except UnicodeDecodeError:  # tokenizers gives one U+FFFD per byte here
                out += ["\ufffd"] * len(pending)
            pending = []
        out += [] if tok is None else [tok]
    return out


def _strip(tok: str, c: str, start: int, stop: int) -> str:
    a, z = 0, len(tok)
    while a < min(start, z) and tok[a] == c:
        a += 1
    while len(tok) - z < stop and z > a and tok[z - 1] == c:
        z -= 1
    return tok[a:z]


def _truncate_longest_first(a: list, b: Optional[list], limit: int):
    """tokenizers' LongestFirst: the shorter input keeps what fits; if both are long they share `limit`."""
    if b is None or len(a) + len(b) <= limit:
        return a[:limit], b
    short = min(len(a), len(b))
    long_ = short if short > limit else max(short, limit - short)
    if short + long_ > limit:
        short, long_ = limit // 2, limit // 2 + limit % 2
    return (a[:long_], b[:short]) if len(a) > len(b) else (a[:short], b[:long_])


# --- the tokenizer -------------------------------------------------------------------------------
MODELS = {"BPE": _BPE, "WordPiece": _WordPiece, "WordLevel": _WordLevel}


def _model(m: dict):
    """The model of a tokenizer.json; one without a type is told apart by its fields, as tokenizers does."""
    kind = config_value(m, "type", "name", None, where="model", choices=tuple(MODELS))
    if kind is None:
        kind = ("BPE" if "merges" in m else "WordPiece" if "max_input_chars_per_word" in m
                else "Unigram" if isinstance(m.get("vocab"), list) else "WordLevel")
        if kind not in MODELS:
            raise ValueError(f"model has no type and looks like {kind}; only {', '.join(MODELS)} are supported")
    return MODELS[kind](m)


def _special_token_roles(data: dict) -> dict:
    """role -> token text, from tokenizer_config.json or special_tokens_map.json: each "<role>_token" is a string or
    an object with a "content" string. null names no token; true/false are flags (add_bos_token), not roles."""
    roles = {}
    for key, val in data.items():
        if not key.endswith("_token") or val is None or isinstance(val, bool):
            continue
        if not isinstance(val, (str, dict)):
            raise bad_value(key, val, 'a token: a string, or an object with a "content" string')
        roles[key[:-6]] = val if isinstance(val, str) else config_value(val, "content", "name", where=key)
    return roles


@dataclass
class Encoding:
    ids: list = field(default_factory=list)
    type_ids: list = field(default_factory=list)

    def __len__(self):
        return len(self.ids)


class Tokenizer:
    """Encodes and decodes exactly like `tokenizers.Tokenizer` for the components it supports."""

    def __init__(self, spec: dict):
        """spec: the object of a tokenizer.json; every part of it is checked (ValueError naming its JSON path)."""
        self._model = _model(config_value(spec, "model", "object"))
        self._normalize, self._pretok, self._post, self._decode = (  # _COMPONENTS lists them in this order
            self._build(config_value(spec, key, "object", None), key, key) for key in _COMPONENTS)
        self._post = self._post or []
        self._id_to_token = {i: t for t, i in self._model.vocab.items()}
        self._add_tokens(_objects(spec, "added_tokens", "", []))
        for where, tid in (check for proc in self._post for check in proc.ids):
            if type(tid) is not int or tid not in self._id_to_token:
                raise bad_value(where, tid, "the id of a token in model.vocab or added_tokens")
        self.vocab_size = max(self._id_to_token, default=-1) + 1  # embedding rows needed
        self.special_tokens = {}  # role ("bos", "eos", "pad", "unk", ...) -> token text; see from_pretrained
        pad = config_value(config_value(spec, "padding", "object", {}), "pad_token", "name", None, where="padding")
        self.pad_id = None if pad is None else self.token_to_id(pad)
        if pad is not None and self.pad_id is None:
            raise ValueError(f"padding.pad_token is {shown(pad)}, which is in neither model.vocab nor added_tokens")
        self.bos_id = self.eos_id = None

    def _add_tokens(self, entries: list):
        self._added, self._special, raw, normalized = {}, set(), {}, {}
        vocab = self._model.vocab
        for i, t in enumerate(entries):
            where = f"added_tokens[{i}]"
            config_value(t, "id", "count", where=where)  # checked, though tokenizers ignores it (below)
            content = config_value(t, "content", "name", where=where)
            # tokenizers ignores the stored id: a known token keeps its id, a new one takes the next free id
            tid = self._added.get(content, vocab.get(content))
            if tid is None:
                top = max(self._added.values(), default=None)
                tid = len(vocab) if top is None or top < len(vocab) and vocab else top + 1
            self._added[content] = tid
            special = _flag(t, where, "special", False)
            if special:
                self._special.add(content)
            info = (tid, *(_flag(t, where, key, False) for key in ("single_word", "lstrip", "rstrip")))
            if _flag(t, where, "normalized", not special):  # looked for in normalized text, normalized itself
                content = self._normalize(content) if self._normalize else content
                normalized[content] = info
            else:
                raw[content] = info
            self._id_to_token[tid] = content  # tokenizers decodes a normalized token to its normalized form
        self._raw_added, self._norm_added = self._matcher(raw), self._matcher(normalized)

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        data = read_json(path, "tokenizer.json")
        try:
            return cls(data)
        except ValueError as e:  # name the file in errors about its contents, as the config loaders do
            raise ValueError(f"{path}: {e}") from None

    @classmethod
    def from_pretrained(cls, folder) -> "Tokenizer":
        """tokenizer.json, plus the special-token roles from tokenizer_config.json / special_tokens_map.json."""
        folder = Path(folder)
        tok, named_in = cls.from_file(folder / "tokenizer.json"), {}
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the latter wins, as in transformers
            path = folder / name
            data = read_json(path, name) if path.is_file() else {}
            try:
                roles = _special_token_roles(data)
            except ValueError as e:
                raise ValueError(f"{path}: {e}") from None
            tok.special_tokens.update(roles)
            named_in.update(dict.fromkeys(roles, path))
        for role in ("pad", "bos", "eos"):
            if role in tok.special_tokens:
                token = tok.special_tokens[role]
                if tok.token_to_id(token) is None:
                    raise ValueError(f"{named_in[role]}: {role}_token is {shown(token)}, which is not a token of "
                                     f"{folder / 'tokenizer.json'}")
                setattr(tok, f"{role}_id", tok.token_to_id(token))
        return tok

    def token_to_id(self, token: str) -> Optional[int]:
        return self._added.get(token, self._model.vocab.get(token))

    def id_to_token(self, i: int) -> Optional[str]:
        return self._id_to_token.get(i)

    def _build(self, d, where, component, depth=0):
        """The pipeline component (see _COMPONENTS) whose object d sits at `where`; None if d is None. A Sequence
        applies its members in order."""
        if d is None:
            return None
        make, seq_key, types = _COMPONENTS[component]
        if config_value(d, "type", "name", where=where, choices=(*types, "Sequence")) != "Sequence":
            return make(d, where)
        if depth == MAX_SEQUENCE_DEPTH:
            raise ValueError(f"{where}: Sequences nested more than {MAX_SEQUENCE_DEPTH} deep")
        parts = [self._build(x, f"{where}.{seq_key}[{i}]", component, depth + 1)
                 for i, x in enumerate(_objects(d, seq_key, where))]
        if component == "post_processor":
            return [p for ps in parts for p in ps]
        return lambda x: functools.reduce(lambda acc, f: f(acc), parts, x)

    @staticmethod
    def _matcher(tokens: dict):
        tokens = {k: v for k, v in tokens.items() if k}
        if not tokens:
            return None
        alternatives = sorted(tokens, key=len, reverse=True)  # leftmost-longest, like tokenizers' Aho-Corasick
        return re.compile("|".join(map(re.escape, alternatives))), tokens

    @staticmethod
    def _split_added(s: str, matcher):
        """[(text or None, added-token id or None, offset)]: s cut around the added tokens in it."""
        if matcher is None or not s:
            return [(s, None, 0)]
        rx, tokens = matcher
        out, pos, word = [], 0, _compile(r"\w")
        for m in rx.finditer(s):
            a, b = m.span()
            tid, single_word, lstrip, rstrip = tokens[m.group()]
            if single_word and (a and word(s).match(s, a - 1) or b < len(s) and word(s).match(s, b)):
                continue
            a = max(len(s[:a].rstrip(_WS)), pos) if lstrip else a
            b = len(s) - len(s[b:].lstrip(_WS)) if rstrip else b
            out += ([(s[pos:a], None, pos)] if a > pos else []) + [(None, tid, a)]
            pos = b
        return out + ([(s[pos:], None, pos)] if pos < len(s) else [])

    def _encode_sequence(self, text: str) -> list:
        ids, model = [], self._model
        for seg, tid, start in self._split_added(text, self._raw_added):
            if tid is not None:
                ids.append(tid)
                continue
            seg = self._normalize(seg) if self._normalize else seg
            for seg2, tid2, start2 in self._split_added(seg, self._norm_added):
                if tid2 is not None:
                    ids.append(tid2)
                elif seg2:
                    # Metaspace's prepend_scheme "first" needs to know whether a piece starts the input
                    pieces = self._pretok(([seg2], start == start2 == 0))[0] if self._pretok else [seg2]
                    for piece in pieces:
                        ids += model.cache.get(piece) or model(piece)
        return ids

    def encode(self, text: str, pair: Optional[str] = None, *, add_special_tokens: bool = True,
               max_length: Optional[int] = None) -> Encoding:
        """Token ids and type ids; max_length truncates longest-first, leaving room for the specials."""
        a = self._encode_sequence(text)
        b = None if pair is None else self._encode_sequence(pair)
        if max_length is not None:
            n_added = sum(p.n_added(b is not None) for p in self._post) if add_special_tokens else 0
            a, b = _truncate_longest_first(a, b, max(0, max_length - n_added))
        seqs = [(a, [0] * len(a))] + ([] if b is None else [(b, [1] * len(b))])
        for proc in self._post:
            seqs = proc(seqs, add_special_tokens)
        return Encoding([i for s in seqs for i in s[0]], [t for s in seqs for t in s[1]])

    def decode(self, ids, skip_special_tokens: bool = True) -> str:
        tokens = [t for t in map(self._id_to_token.get, ids)
                  if t is not None and not (skip_special_tokens and t in self._special)]
        return "".join(self._decode(tokens)) if self._decode else " ".join(tokens)


def pad(rows, value, left=False) -> torch.Tensor:
    """Token lists (ids, type ids, labels, or ones for a mask) -> one (B, longest) tensor filled with `value`.
    left=True pads in front, for generation: every row's new tokens then follow its prompt directly."""
    width = max(len(r) for r in rows)
    out = torch.full((len(rows), width), value, dtype=torch.long)
    for i, r in enumerate(rows):
        start = width - len(r) if left else 0
        out[i, start:start + len(r)] = torch.tensor(r, dtype=torch.long)
    return out
