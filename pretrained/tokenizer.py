"""Tokenizer.from_pretrained(folder): Hugging Face `tokenizer.json` files read exactly as `tokenizers` reads them.


The project may not depend on ``tokenizers``/``transformers``, yet fine-tuning and evaluation must see
exactly the ids the pretrained checkpoints were trained with. This section re-implements the parts of
the ``tokenizers`` pipeline used by WordPiece (BERT), byte-level BPE (GPT-2, RoBERTa, Llama-3, Qwen2,
SmolLM) and SentencePiece-style BPE (Llama-2, Mistral) with the standard library only, and raises a
ValueError naming any component it does not know rather than tokenizing differently.
"""
import functools
import re
import unicodedata
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch

from .files import read_json

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
        c = cat(chr(cp))
        if c != prev:
            runs.append([cp, cp, c])
            prev = c
        else:
            runs[-1][1] = cp
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


def _pattern(d: dict, group: bool = False) -> _Regex:
    if "String" in d:
        return _Regex(f"({re.escape(d['String'])})" if group else re.escape(d["String"]))
    return _compile(d["Regex"], group)


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
class _Model:
    def __init__(self, d: dict):
        self.vocab, self.unk, self.cache = dict(d.get("vocab") or {}), d.get("unk_token"), {}

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
        self.prefix, self.max_chars = d.get("continuing_subword_prefix", "##"), d.get("max_input_chars_per_word", 100)

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
        if d.get("dropout"):
            raise ValueError("BPE dropout is not supported: it makes encoding random")
        self.prefix, self.suffix = d.get("continuing_subword_prefix") or "", d.get("end_of_word_suffix") or ""
        self.byte_fallback, self.fuse_unk = d.get("byte_fallback", False), d.get("fuse_unk", False)
        self.ignore_merges = d.get("ignore_merges", False)
        self.merges = {}  # (left id, right id) -> (rank, merged id)
        for rank, m in enumerate(d.get("merges") or []):
            a, b = m.split(" ") if isinstance(m, str) else m
            merged = a + b[len(self.prefix):]
            if not {a, b, merged} <= self.vocab.keys():
                raise ValueError(f"BPE merge {a!r} {b!r} uses a token missing from the vocabulary")
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
        todo = sorted(((merges[p][0], i, merges[p][1]) for i, p in enumerate(zip(ids, ids[1:])) if p in merges),
                      reverse=True)  # a queue kept in descending order: pop() gives the next merge
        while todo:
            _, i, new = todo.pop()
            j = nxt[i]
            if not alive[i] or j >= n or merges.get((ids[i], ids[j]), (0, None))[1] != new:
                continue
            ids[i], alive[j], k = new, False, nxt[j]
            nxt[i] = k
            if k < n:
                prv[k] = i
                if m := merges.get((new, ids[k])):
                    _insert_descending(todo, (m[0], i, m[1]))
            if prv[i] >= 0 and (m := merges.get((ids[prv[i]], new))):
                _insert_descending(todo, (m[0], prv[i], m[1]))
        return [t for t, a in zip(ids, alive) if a]


def _insert_descending(queue: list, item):
    lo, hi = 0, len(queue)
    while lo < hi:
        mid = (lo + hi) // 2
        lo, hi = (mid + 1, hi) if queue[mid] > item else (lo, mid)
    queue.insert(lo, item)


# --- pipeline components built from tokenizer.json ----------------------------------------------
def _normalizer(d: dict):
    t = d["type"]
    if t == "BertNormalizer":
        table = _BertCleanup(d.get("clean_text", True), d.get("handle_chinese_chars", True))
        lower = d.get("lowercase", True)
        strip = lower if d.get("strip_accents") is None else d["strip_accents"]
        return lambda s: (_lower if lower else str)(
            _strip_marks(unicodedata.normalize("NFD", s.translate(table))) if strip else s.translate(table))
    if t in ("NFC", "NFD", "NFKC", "NFKD"):
        return lambda s: unicodedata.normalize(t, s)
    if t == "Strip":
        left, right = d.get("strip_left", True), d.get("strip_right", True)
        return lambda s: s.strip(_WS) if left and right else s.lstrip(_WS) if left else s.rstrip(_WS) if right else s
    if t == "Replace":
        rx, content = _pattern(d["pattern"]), d["content"]
        return lambda s: rx(s).sub(lambda m: content, s)
    if t == "Prepend":
        return lambda s: d["prepend"] + s if s else s
    if t == "StripAccents":
        return lambda s: _strip_marks(s, "M")
    return {"Lowercase": _lower, "ByteLevel": _to_byte_chars}.get(t)


def _splitter(rx: _Regex, behavior: str, invert: bool = False):
    """A pre-tokenizer: (pieces, whether pieces[0] starts the input) -> the same, split further."""
    if behavior not in ("Removed", "Isolated", "MergedWithPrevious", "MergedWithNext", "Contiguous"):
        raise ValueError(f"unsupported split behavior {behavior!r}")

    def f(state):
        out, first = [], state[1]
        for i, p in enumerate(state[0]):
            got, at0 = _split(p, rx, behavior, invert)
            first = first and at0 and bool(got) if i == 0 else first
            out += got
        return out, first
    return f


def _pre_tokenizer(d: dict):
    t = d["type"]
    if t == "ByteLevel":
        prefix, rx = d.get("add_prefix_space", True), d.get("use_regex", True) and _compile(
            r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+", True)  # GPT-2's

        def byte_level(state):
            out = []
            for s in state[0]:
                s = " " + s if prefix and not s.startswith(" ") else s  # every piece, as tokenizers does
                out += map(_to_byte_chars, _split(s, rx, "Isolated")[0] if rx else [s])
            return out, state[1]
        return byte_level
    if t == "Metaspace":
        rep, split = d.get("replacement", "\u2581"), d.get("split", True)
        scheme = d.get("prepend_scheme") or ("always" if d.get("add_prefix_space", True) else "never")

        def metaspace(state):
            out = []
            for i, s in enumerate(state[0]):
                s = s.replace(" ", rep)
                if (scheme == "always" or scheme == "first" and i == 0 and state[1]) and not s.startswith(rep):
                    s = rep + s
                out += _split(s, _pattern({"String": rep}, True), "MergedWithNext")[0] if split else [s]
            return out, state[1]
        return metaspace
    if t == "BertPreTokenizer":
        ws, punct = _splitter(_compile(r"\s", True), "Removed"), _splitter(_compile(r"\p{punct}", True), "Isolated")
        return lambda state: punct(ws(state))
    args = {"Split": lambda: (_pattern(d["pattern"], True), d["behavior"], d.get("invert", False)),
            "Digits": lambda: (_compile(r"\p{N}", True), "Isolated" if d.get("individual_digits") else "Contiguous"),
            "Whitespace": lambda: (_compile(r"\w+|[^\w\s]+", True), "Removed", True),
            "WhitespaceSplit": lambda: (_compile(r"\s", True), "Removed"),
            "Punctuation": lambda: (_compile(r"\p{punct}", True), d.get("behavior", "Isolated")),
            "CharDelimiterSplit": lambda: (_pattern({"String": d.get("delimiter", "")}, True), "Removed")}.get(t)
    return args and _splitter(*args())


def _post_processor(d: dict):
    """A post-processor: ([(ids, type_ids)] per input, add_special_tokens) -> the same; with .n_added(pair)."""
    t = d["type"]
    if t == "TemplateProcessing":
        specials = {k: v["ids"] for k, v in d.get("special_tokens", {}).items()}

        def template(seqs, add):
            ids, types = [], []
            for piece in d["pair" if len(seqs) == 2 else "single"]:
                (kind, p), = piece.items()
                new = seqs[p["id"] != "A"][0] if kind == "Sequence" else specials[p["id"]] if add else []
                ids += new
                types += [p["type_id"]] * len(new)
            return [(ids, types)]
        template.n_added = lambda pair: sum(len(specials[p["SpecialToken"]["id"]])
                                            for p in d["pair" if pair else "single"] if "SpecialToken" in p)
        return [template]
    if t in ("BertProcessing", "RobertaProcessing"):
        cls, sep, roberta = d["cls"][1], d["sep"][1], t == "RobertaProcessing"

        def bert(seqs, add):
            if not add:  # RoBERTa has a single token type, and says so even without specials
                return [(ids, [0] * len(ids)) for ids, _ in seqs] if roberta else seqs
            out = [([cls] + seqs[0][0] + [sep], [0] * (len(seqs[0][0]) + 2))]
            for b, _ in seqs[1:]:
                b = [sep] * roberta + b + [sep]
                out.append((b, [int(not roberta)] * len(b)))
            return out
        bert.n_added = lambda pair: (3 + roberta) if pair else 2
        return [bert]
    return [] if t == "ByteLevel" else None  # ByteLevel only trims offsets, which we do not report


def _decoder(d: dict):
    """A decoder: list of token strings -> list of strings (joined at the end)."""
    t = d["type"]
    if t == "ByteLevel":
        return lambda tokens: [b"".join(
            bytes(map(_FROM_BYTE_CHARS.__getitem__, tok)) if all(c in _FROM_BYTE_CHARS for c in tok)
            else tok.encode("utf-8") for tok in tokens).decode("utf-8", "replace")]
    if t == "WordPiece":
        prefix, cleanup = d.get("prefix", "##"), d.get("cleanup", True)
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
        rep = d.get("replacement", "\u2581")
        first = (d.get("prepend_scheme") or ("always" if d.get("add_prefix_space", True) else "never")) != "never"
        return lambda tokens: [tok.replace(rep, "" if i == 0 and first else " ") for i, tok in enumerate(tokens)]
    if t == "Replace":
        rx, content = _pattern(d["pattern"]), d["content"]
        return lambda tokens: [rx(tok).sub(lambda m: content, tok) for tok in tokens]
    if t == "ByteFallback":
        return _byte_fallback
    if t == "Fuse":
        return lambda tokens: ["".join(tokens)]
    if t == "Strip":
        c, start, stop = d["content"], d.get("start", 0), d.get("stop", 0)
        return lambda tokens: [_strip(tok, c, start, stop) for tok in tokens]
    if t == "BPEDecoder":
        suffix = d.get("suffix", "</w>")
        return lambda tokens: [tok.replace(suffix, "" if i == len(tokens) - 1 else " ") for i, tok in enumerate(tokens)]
    return None


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
@dataclass
class Encoding:
    ids: list = field(default_factory=list)
    type_ids: list = field(default_factory=list)

    def __len__(self):
        return len(self.ids)


class Tokenizer:
    """Encodes and decodes exactly like `tokenizers.Tokenizer` for the components it supports."""

    def __init__(self, spec: dict):
        m = spec["model"]
        kind = m.get("type") or ("BPE" if "merges" in m else "WordPiece" if "max_input_chars_per_word" in m
                                 else "Unigram" if isinstance(m.get("vocab"), list) else "WordLevel")
        model = {"BPE": _BPE, "WordPiece": _WordPiece, "WordLevel": _WordLevel}.get(kind)
        self._model = model(m) if model else self._unsupported("model", kind)
        self._normalize = self._build(spec.get("normalizer"), "normalizer", _normalizer, "normalizers")
        self._pretok = self._build(spec.get("pre_tokenizer"), "pre-tokenizer", _pre_tokenizer, "pretokenizers")
        self._post = self._build(spec.get("post_processor"), "post-processor", _post_processor, "processors") or []
        self._decode = self._build(spec.get("decoder"), "decoder", _decoder, "decoders")
        self._added, self._special, raw, normalized = {}, set(), {}, {}
        self._id_to_token = {i: t for t, i in self._model.vocab.items()}
        vocab = self._model.vocab
        for t in spec.get("added_tokens") or []:
            content = t["content"]
            # tokenizers ignores the stored id: a known token keeps its id, a new one takes the next free id
            tid = self._added.get(content, vocab.get(content))
            if tid is None:
                top = max(self._added.values(), default=None)
                tid = len(vocab) if top is None or top < len(vocab) and vocab else top + 1
            self._added[content] = tid
            if t.get("special"):
                self._special.add(content)
            info = (tid, t.get("single_word", False), t.get("lstrip", False), t.get("rstrip", False))
            if t.get("normalized", not t.get("special")):  # looked for in normalized text, normalized itself
                content = self._normalize(content) if self._normalize else content
                normalized[content] = info
            else:
                raw[content] = info
            self._id_to_token[tid] = content  # tokenizers decodes a normalized token to its normalized form
        self._raw_added, self._norm_added = self._matcher(raw), self._matcher(normalized)
        self.vocab_size = max(self._id_to_token, default=-1) + 1  # embedding rows needed
        self.special_tokens = {}  # role ("bos", "eos", "pad", "unk", ...) -> token text; see from_pretrained
        self.pad_id = self.token_to_id((spec.get("padding") or {}).get("pad_token"))
        self.bos_id = self.eos_id = None

    @classmethod
    def from_file(cls, path) -> "Tokenizer":
        data = read_json(path, "tokenizer.json")
        try:
            return cls(data)
        except ValueError as e:  # name the file in errors about its contents
            raise ValueError(f"{e} in {path}") from None

    @classmethod
    def from_pretrained(cls, folder) -> "Tokenizer":
        """tokenizer.json, plus the special-token roles from tokenizer_config.json / special_tokens_map.json."""
        folder = Path(folder)
        tok = cls.from_file(folder / "tokenizer.json")
        for name in ("tokenizer_config.json", "special_tokens_map.json"):  # the latter wins, as in transformers
            path = folder / name
            for key, val in (read_json(path, name) if path.is_file() else {}).items():
                if key.endswith("_token") and val and isinstance(val, (str, dict)):
                    tok.special_tokens[key[:-6]] = val["content"] if isinstance(val, dict) else val
        for role in ("pad", "bos", "eos"):
            if role in tok.special_tokens:
                setattr(tok, f"{role}_id", tok.token_to_id(tok.special_tokens[role]))
        return tok

    def token_to_id(self, token: str) -> Optional[int]:
        return self._added.get(token, self._model.vocab.get(token))

    def id_to_token(self, i: int) -> Optional[str]:
        return self._id_to_token.get(i)

    def _unsupported(self, kind, name):
        raise ValueError(f"unsupported {kind} type {name!r}")

    def _build(self, d, kind, make, seq_key):
        if d is None:
            return None
        if d.get("type") == "Sequence":
            parts = [self._build(x, kind, make, seq_key) for x in d[seq_key]]
            if kind == "post-processor":
                return [p for ps in parts for p in ps]
            return lambda x: functools.reduce(lambda acc, f: f(acc), parts, x)
        built = make(d)
        return self._unsupported(kind, d.get("type")) if built is None else built

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
