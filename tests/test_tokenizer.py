"""Tests for the pure-Python tokenizer.json reader.

Each test writes a tiny hand-made tokenizer.json and checks ids worked out by hand, so the expected values
do not come from the code under test. (Equality with the `tokenizers` library on real checkpoints is checked
outside the project; see the comparison script in the notes.)
"""
import json
import random

import pytest

from pretrained.tokenizer import Encoding, Tokenizer, pad
from references import bert_template


def spec_of(model, **parts):
    spec = {"version": "1.0", "added_tokens": parts.pop("added_tokens", []), "model": model}
    spec.update({k: parts.get(k) for k in ("normalizer", "pre_tokenizer", "post_processor", "decoder")})
    return spec


def make(tmp_path, model, name="tokenizer.json", **parts):
    path = tmp_path / name
    path.write_text(json.dumps(spec_of(model, **parts)), encoding="utf-8")
    return Tokenizer.from_file(path)


def added(content, i, special=True, **flags):
    return {"id": i, "content": content, "special": special, "single_word": False, "lstrip": False,
            "rstrip": False, "normalized": not special, **flags}


# --- WordPiece / BERT ------------------------------------------------------------------------------
BERT_VOCAB = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "hello", "world", "!", "un", "##aff", "##able",
              "cafe", "中", "文", ",", "café", "'", "s"]
BERT_TEMPLATE = bert_template(cls_id=2, sep_id=3)


def bert_parts(lowercase=True, post=BERT_TEMPLATE, extra_added=()):
    return dict(model={"type": "WordPiece", "unk_token": "[UNK]", "continuing_subword_prefix": "##",
                       "max_input_chars_per_word": 100, "vocab": {t: i for i, t in enumerate(BERT_VOCAB)}},
                normalizer={"type": "BertNormalizer", "clean_text": True, "handle_chinese_chars": True,
                            "strip_accents": None, "lowercase": lowercase},
                pre_tokenizer={"type": "BertPreTokenizer"}, post_processor=post,
                decoder={"type": "WordPiece", "prefix": "##", "cleanup": True},
                added_tokens=[added(t, i) for i, t in enumerate(BERT_VOCAB[:5])] + list(extra_added))


def bert(tmp_path, **kw):
    return make(tmp_path, **bert_parts(**kw))


def test_wordpiece_single(tmp_path):
    tok = bert(tmp_path)
    assert tok.encode("Hello, World!") == Encoding([2, 5, 14, 6, 7, 3], [0] * 6)
    assert tok.encode("unaffable").ids == [2, 8, 9, 10, 3]
    assert tok.encode("CAFÉ").ids == [2, 11, 3]  # lower-cased, accent stripped
    assert tok.encode("中文").ids == [2, 12, 13, 3]  # CJK split off even without spaces
    assert tok.encode("hello\tworld\x00\u200b!").ids == [2, 5, 6, 7, 3]  # tab is a space, controls go
    assert tok.encode("unaffablex hello").ids == [2, 1, 5, 3]  # an unknown piece makes the word [UNK]
    assert tok.encode("").ids == [2, 3]
    assert tok.encode("hello", add_special_tokens=False).ids == [5]


def test_bert_cased_keeps_accents(tmp_path):
    tok = bert(tmp_path, lowercase=False)  # strip_accents None follows lowercase
    assert tok.encode("café").ids == [2, 15, 3]
    assert tok.encode("Hello").ids == [2, 1, 3]


def test_wordpiece_pair_and_truncation(tmp_path):
    tok = bert(tmp_path)
    assert tok.encode("hello", "world") == Encoding([2, 5, 3, 6, 3], [0, 0, 0, 1, 1])
    assert tok.encode("hello", "world", add_special_tokens=False) == Encoding([5, 6], [0, 1])
    a, b = "hello world hello world", "! , ! ,"  # 4 tokens each
    # room for 3 inputs after [CLS] [SEP] [SEP]; the short input keeps its 1 token
    assert tok.encode(a, "!", max_length=6) == Encoding([2, 5, 6, 3, 7, 3], [0, 0, 0, 0, 1, 1])
    # both long: 5 places shared 2 + 3, the odd one to the second input when lengths tie
    assert tok.encode(a, b, max_length=8).ids == [2, 5, 6, 3, 7, 14, 7, 3]
    assert tok.encode(a + " hello", b, max_length=8).ids == [2, 5, 6, 5, 3, 7, 14, 3]  # longer input gets 3
    assert tok.encode(a, max_length=3).ids == [2, 5, 3]
    assert tok.encode(a, max_length=3, add_special_tokens=False).ids == [5, 6, 5]


def test_bert_processing_and_special_tokens(tmp_path):
    tok = bert(tmp_path, post={"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]", 2]})
    assert tok.encode("hello", "world") == Encoding([2, 5, 3, 6, 3], [0, 0, 0, 1, 1])
    enc = tok.encode("hello [MASK]world")  # special tokens are matched in the raw text
    assert enc.ids == [2, 5, 4, 6, 3]
    assert tok.decode(enc.ids) == "hello world"
    assert tok.decode(enc.ids, skip_special_tokens=False) == "[CLS] hello [MASK] world [SEP]"
    # "##" pieces join; cleanup runs per token, so " ," and " !" close up but " '" stays
    assert tok.decode([8, 9, 10, 14, 5, 7, 16, 17]) == "unaffable, hello! ' s"
    assert tok.token_to_id("##aff") == 9 and tok.id_to_token(12) == "中" and tok.token_to_id("nope") is None
    assert tok.vocab_size == len(BERT_VOCAB)


def test_normalized_added_token(tmp_path):
    # a non-special added token is normalized itself and looked for in the normalized text
    tok = bert(tmp_path, extra_added=[added("Hello World", 18, special=False)])
    assert tok.encode("HELLO world!").ids == [2, 18, 7, 3]
    assert tok.encode("HELLO  world").ids == [2, 5, 6, 3]  # normalizing keeps both spaces: no match
    assert tok.encode("hello worlds").ids == [2, 18, 17, 3]  # no single_word flag: matches inside words too
    assert tok.vocab_size == 19 and tok.token_to_id("Hello World") == 18
    assert tok.decode([18, 7]) == "hello world!"  # tokenizers shows such a token in its normalized form


# --- byte-level BPE (GPT-2 / RoBERTa) --------------------------------------------------------------
# bytes: ' ' -> 'Ġ' (U+0120), '\n' -> 'Ċ' (U+010A), 'é' = C3 A9 -> 'Ã' '©'
BL_VOCAB = ["<s>", "<pad>", "</s>", "<unk>", "h", "e", "l", "o", "Ġ", "w", "r", "d", "he", "ll", "hell", "hello",
            "Ġw", "or", "Ġwor", "ld", "Ġworld", "Ã", "©", "Ã©", "Ċ", "x", "y", "a", "<mask>", "'", "T", "N", "D", "O"]
BL_MERGES = ["h e", "l l", "he ll", "hell o", "Ġ w", "o r", "Ġw or", "l d", "Ġwor ld", "Ã ©"]
ROBERTA_POST = {"type": "RobertaProcessing", "sep": ["</s>", 2], "cls": ["<s>", 0], "trim_offsets": True,
                "add_prefix_space": False}


def byte_level_parts(pre=None, post=ROBERTA_POST, merges_as_pairs=False, **extra):
    merges = [m.split(" ") for m in BL_MERGES] if merges_as_pairs else BL_MERGES
    return dict(model={"type": "BPE", "dropout": None, "unk_token": None, "fuse_unk": False, "byte_fallback": False,
                       "vocab": {t: i for i, t in enumerate(BL_VOCAB)}, "merges": merges, **extra},
                pre_tokenizer=pre or {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                                      "use_regex": True},
                post_processor=post, decoder={"type": "ByteLevel"},
                added_tokens=[added(t, i) for i, t in enumerate(BL_VOCAB[:4])] + [
                    added("<mask>", 28, lstrip=True),
                    added("xy", 34, special=False, single_word=True, normalized=False)])


def byte_level(tmp_path, **kw):
    return make(tmp_path, **byte_level_parts(**kw))


@pytest.mark.parametrize("pairs", [False, True])
def test_byte_level_bpe_merges(tmp_path, pairs):
    tok = byte_level(tmp_path, merges_as_pairs=pairs)
    # "hello" merges fully; "Ġworld" goes Ġw, or, Ġwor, ld, Ġworld by rank
    assert tok.encode("hello world") == Encoding([0, 15, 20, 2], [0, 0, 0, 0])
    assert tok.encode("é\n", add_special_tokens=False).ids == [23, 24]
    assert tok.encode("hello", "world") == Encoding([0, 15, 2, 2, 9, 17, 19, 2], [0] * 8)  # w or ld
    assert tok.encode("hello", "world", add_special_tokens=False).type_ids == [0] * 4  # RoBERTa: one type
    assert tok.decode(tok.encode("hello world é\n").ids) == "hello world é\n"
    assert tok.decode([0, 15, 2], skip_special_tokens=False) == "<s>hello</s>"


def test_added_token_flags(tmp_path):
    tok = byte_level(tmp_path, post=None)
    assert tok.encode("hello <mask>").ids == [15, 28]  # lstrip swallows the space before <mask>
    assert tok.encode("xy hello").ids == [34, 8, 15]
    assert tok.encode("axy").ids == [27, 25, 26]  # not a single word here, so plain BPE
    assert tok.encode("hello", "hello").type_ids == [0, 1]  # no post-processor: type ids 0 then 1
    assert tok.decode([34, 28, 15]) == "xyhello"  # non-special added tokens are kept, specials skipped


def test_added_token_ids_follow_tokenizers(tmp_path):
    # tokenizers ignores the id stored in the file: known tokens keep the vocabulary id, new ones count on
    tok = make(tmp_path, {"type": "WordLevel", "vocab": {"a": 0, "b": 1, "c": 2}, "unk_token": "a"},
               added_tokens=[added("b", 7), added("<x>", 9), added("<y>", 3)])
    assert [tok.token_to_id(t) for t in ("b", "<x>", "<y>")] == [1, 3, 4]
    assert tok.encode("<y>b<x>").ids == [4, 1, 3] and tok.vocab_size == 5


def test_byte_level_prefix_space_and_gpt2_regex(tmp_path):
    tok = byte_level(tmp_path, post=None, pre={"type": "ByteLevel", "add_prefix_space": True, "use_regex": True})
    assert tok.encode("world").ids == [20]
    # GPT-2's contractions are case-sensitive: "'T" is not one piece, so ' and T stay apart
    assert tok.encode("DON'T", add_special_tokens=False).ids == [8, 32, 33, 31, 29, 30]


def test_byte_level_ignore_merges(tmp_path):
    tok = byte_level(tmp_path, post=None, ignore_merges=True, merges_as_pairs=True)
    assert tok.encode("hello").ids == [15]
    tok2 = make(tmp_path, {"type": "BPE", "vocab": {"a": 0, "b": 1, "ab": 2, "abab": 3}, "merges": ["a b"],
                           "ignore_merges": True}, name="t2.json")
    assert tok2.encode("abab").ids == [3]  # a whole word found in the vocabulary skips the merges
    assert tok2.encode("ababa").ids == [2, 2, 0]


# --- Split regex pre-tokenizers (Llama-3 / Qwen2 style), checked with a WordLevel model -----------
LLAMA3 = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
          r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# byte-level forms: U+0663 U+0664 = D9 A3 D9 A4 -> "Ù£Ù¤"
PIECES = ["[UNK]", "abc", "Ġ", "123", "45", "DON", "'T", "Ġhello", "ĠĠ", "ĠÃ©t", "!Ċ", "\u00d9\u00a3\u00d9\u00a4",
          "a", "1", "2"]


def word_level(tmp_path, pre, name="wl.json", **parts):
    return make(tmp_path, {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(PIECES)}, "unk_token": "[UNK]"},
                name=name, pre_tokenizer=pre, **parts)


def test_llama3_split_regex(tmp_path):
    pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"Regex": LLAMA3}, "behavior": "Isolated", "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]}
    tok = word_level(tmp_path, pre)
    assert tok.encode("abc 12345").ids == [1, 2, 3, 4]  # digits in groups of at most three
    assert tok.encode("DON'T").ids == [5, 6]  # contractions are case-insensitive here
    assert tok.encode("   hello").ids == [8, 7]  # the last space joins the word
    assert tok.encode(" \u00e9t").ids == [9]  # é is a letter
    assert tok.encode("!\n").ids == [10]  # punctuation takes the newlines after it
    assert tok.encode("\u0663\u0664").ids == [11]  # Arabic-Indic digits are \p{N}


def test_digits_and_whitespace_classes(tmp_path):
    pre = {"type": "Sequence", "pretokenizers": [{"type": "Digits", "individual_digits": True},
                                                 {"type": "WhitespaceSplit"}]}
    tok = word_level(tmp_path, pre)
    assert tok.encode("a12").ids == [12, 13, 14]
    assert tok.encode("a\u3000a\x1ca").ids == [12, 0]  # U+3000 is a space for Rust, U+001C is not


@pytest.mark.parametrize("behavior,expected", [  # "a   a": three separate matches of " "
    ("Removed", ["a", "a"]), ("Isolated", ["a", "Ġ", "Ġ", "Ġ", "a"]),
    ("MergedWithPrevious", ["aĠ", "Ġ", "Ġ", "a"]),  # only a match right after a non-match merges
    ("MergedWithNext", ["a", "Ġ", "Ġ", "Ġa"]), ("Contiguous", ["a", "ĠĠĠ", "a"])])
def test_split_behaviors(tmp_path, behavior, expected):
    pieces = ["[UNK]", "a", "Ġ", "ĠĠĠ", "aĠ", "Ġa"]
    pre = {"type": "Sequence", "pretokenizers": [
        {"type": "Split", "pattern": {"String": " "}, "behavior": behavior, "invert": False},
        {"type": "ByteLevel", "add_prefix_space": False, "use_regex": False}]}
    tok = make(tmp_path, {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(pieces)}, "unk_token": "[UNK]"},
               pre_tokenizer=pre)
    assert tok.encode("a   a").ids == [pieces.index(p) for p in expected]


def test_split_invert(tmp_path):
    pieces = ["[UNK]", "ab", "12", ",", " "]
    pre = {"type": "Split", "pattern": {"Regex": "\\p{L}+|\\p{N}+"}, "behavior": "Removed", "invert": True}
    tok = make(tmp_path, {"type": "WordLevel", "vocab": {t: i for i, t in enumerate(pieces)}, "unk_token": "[UNK]"},
               pre_tokenizer=pre)
    assert tok.encode("ab, 12").ids == [1, 2]  # invert: keep the matches, drop the rest


# --- SentencePiece-style BPE (Llama-2 / Mistral) ---------------------------------------------------
SP_VOCAB = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)] + ["▁", "h", "i", "▁h", "▁hi"]
SP_DECODER = {"type": "Sequence", "decoders": [
    {"type": "Replace", "pattern": {"String": "▁"}, "content": " "}, {"type": "ByteFallback"}, {"type": "Fuse"},
    {"type": "Strip", "content": " ", "start": 1, "stop": 0}]}
LLAMA_POST = {"type": "TemplateProcessing",
              "single": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}}],
              "pair": [{"SpecialToken": {"id": "<s>", "type_id": 0}}, {"Sequence": {"id": "A", "type_id": 0}},
                       {"SpecialToken": {"id": "<s>", "type_id": 1}}, {"Sequence": {"id": "B", "type_id": 1}}],
              "special_tokens": {"<s>": {"id": "<s>", "ids": [1], "tokens": ["<s>"]}}}


def sentencepiece(tmp_path, legacy=True, byte_fallback=True, vocab=SP_VOCAB, name="sp.json"):
    norm = {"type": "Sequence", "normalizers": [{"type": "Prepend", "prepend": "▁"},
                                                {"type": "Replace", "pattern": {"String": " "}, "content": "▁"}]}
    meta = {"type": "Metaspace", "replacement": "▁", "prepend_scheme": "first", "split": False}
    return make(tmp_path, {"type": "BPE", "unk_token": "<unk>", "fuse_unk": True, "byte_fallback": byte_fallback,
                           "vocab": {t: i for i, t in enumerate(vocab)}, "merges": ["▁ h", "▁h i"]}, name=name,
                normalizer=norm if legacy else None, pre_tokenizer=None if legacy else meta,
                post_processor=LLAMA_POST, decoder=SP_DECODER,
                added_tokens=[added(t, i) for i, t in enumerate(vocab[:3])])


@pytest.mark.parametrize("legacy", [True, False])
def test_sentencepiece_bpe(tmp_path, legacy):
    tok = sentencepiece(tmp_path, legacy)
    hi, spc, h, i = (SP_VOCAB.index(t) for t in ("▁hi", "▁", "h", "i"))
    assert tok.encode("hi hi").ids == [1, hi, hi]
    assert tok.encode("é").ids == [1, spc, 3 + 0xC3, 3 + 0xA9]  # byte fallback for an unknown character
    assert tok.encode("hi", "hi") == Encoding([1, hi, 1, hi], [0, 0, 1, 1])
    assert tok.decode(tok.encode("hi é hi").ids) == "hi é hi"
    # a byte run that is not valid UTF-8 as a whole becomes one U+FFFD per byte
    assert tok.decode([3 + 0xC3, 3 + 0xA9, 3 + 0xC3, hi]) == "\ufffd\ufffd\ufffd hi"
    if not legacy:  # prepend_scheme "first": no ▁ after a special token that starts the text
        assert tok.encode("<s>hi", add_special_tokens=False).ids == [1, h, i]


def test_sentencepiece_unknown_fused(tmp_path):
    vocab = ["<unk>", "<s>", "</s>", "▁", "h", "i", "▁h", "▁hi"]
    tok = sentencepiece(tmp_path, byte_fallback=False, vocab=vocab, name="sp2.json")
    assert tok.encode("hiéé", add_special_tokens=False).ids == [7, 0]  # one <unk> for the run


def test_metaspace_split_and_decoder(tmp_path):
    vocab = {"<unk>": 0, "▁a": 1, "▁": 2, "b": 3, "▁b": 4, "a": 5}
    tok = make(tmp_path, {"type": "BPE", "unk_token": "<unk>", "vocab": vocab, "merges": ["▁ b", "▁ a"]},
               pre_tokenizer={"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True},
               decoder={"type": "Metaspace", "replacement": "▁", "prepend_scheme": "always", "split": True})
    # "a  b" -> "▁a▁▁b" -> pieces "▁a", "▁", "▁b"
    assert tok.encode("a  b").ids == [1, 2, 4]
    assert tok.decode([1, 2, 4]) == "a  b"


# --- loading ---------------------------------------------------------------------------------------
def test_from_pretrained_special_ids(tmp_path):
    tok = bert(tmp_path)
    assert tok.pad_id is None and tok.bos_id is None and tok.eos_id is None
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(
        {"bos_token": {"content": "[CLS]", "lstrip": False}, "eos_token": "[SEP]", "pad_token": "[MASK]"}))
    (tmp_path / "special_tokens_map.json").write_text(json.dumps({"pad_token": "[PAD]"}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (2, 3, 0)


@pytest.mark.parametrize("part,spec", [
    ("model", {"type": "Unigram", "vocab": [["a", 0.0]], "unk_id": 0}),
    ("normalizer", {"type": "Precompiled", "precompiled_charsmap": ""}),
    ("pre_tokenizer", {"type": "UnicodeScripts"}),
    ("post_processor", {"type": "Mystery"}),
    ("decoder", {"type": "CTC"})])
def test_unsupported_component_is_named(tmp_path, part, spec):
    parts = {"model": {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}}
    parts[part] = spec
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({"added_tokens": [], **parts}))
    with pytest.raises(ValueError, match=spec["type"]) as err:
        Tokenizer.from_file(path)
    assert "bad.json" in str(err.value)


def test_bad_split_behavior_and_regex_class_are_named(tmp_path):
    model = {"type": "WordLevel", "vocab": {"a": 0}, "unk_token": "a"}
    with pytest.raises(ValueError) as err:
        make(tmp_path, model, name="pre.json",
             pre_tokenizer={"type": "Split", "pattern": {"String": " "}, "behavior": "Sideways", "invert": False})
    assert str(err.value) == (f'{tmp_path / "pre.json"}: pre_tokenizer.behavior is "Sideways"; expected one of '
                              "Removed, Isolated, MergedWithPrevious, MergedWithNext, Contiguous")
    with pytest.raises(ValueError) as err:
        make(tmp_path, model, pre_tokenizer={"type": "Split", "pattern": {"Regex": r"\p{Han}+"},
                                             "behavior": "Isolated", "invert": False})
    assert str(err.value) == (f'{tmp_path / "tokenizer.json"}: pre_tokenizer.pattern.Regex "\\\\p{{Han}}+" does not '
                              "compile (unsupported regex class \\p{Han})")


def test_pad_right_and_left():
    rows = [[5, 6, 7], [8], []]
    assert pad(rows, 0).tolist() == [[5, 6, 7], [8, 0, 0], [0, 0, 0]]
    assert pad(rows, -100, left=True).tolist() == [[5, 6, 7], [-100, -100, 8], [-100, -100, -100]]


# --- malformed tokenizer.json: one line naming the file, the JSON path and what was expected -----------------------
DROP = object()  # in a case's changes: remove the key
BASES = {"bert": bert_parts, "bpe": byte_level_parts}
SPLIT = {"type": "Split", "behavior": "Isolated", "invert": False}
BAD_TOKENIZERS = [  # (base, {dotted JSON path: new value}, the message after "<path>: ")
    ("bert", {"model": []}, "model is [] (a list); expected an object"),
    ("bert", {"model": DROP}, "model is missing; expected an object"),
    ("bert", {"model.type": "Unigram"}, 'model.type is "Unigram"; expected one of BPE, WordPiece, WordLevel'),
    ("bert", {"model.vocab": ["a"]}, 'model.vocab is ["a"] (a list); expected an object'),
    ("bert", {"model.vocab.hello": "5"}, 'model.vocab["hello"] is "5" (a string); expected an integer >= 0'),
    ("bert", {"model.vocab.hello": -1}, 'model.vocab["hello"] is -1; expected an integer >= 0'),
    ("bert", {"model.unk_token": "<unk>"}, 'model.unk_token is "<unk>", which is not in model.vocab'),
    ("bert", {"model.unk_token": 1}, "model.unk_token is 1; expected a string"),
    ("bert", {"model.max_input_chars_per_word": "100"},
     'model.max_input_chars_per_word is "100" (a string); expected a positive integer'),
    ("bpe", {"model.merges": "h e"}, 'model.merges is "h e" (a string); expected a list'),
    ("bpe", {"model.merges.0": "h e x"}, 'model.merges[0] is "h e x"; expected a "left right" string or a '
                                         '["left", "right"] pair'),
    ("bpe", {"model.merges.0": ["h"]}, 'model.merges[0] is ["h"]; expected a "left right" string or a '
                                       '["left", "right"] pair'),
    ("bpe", {"model.merges.0": "x y"}, 'model.merges[0] ("x" "y") uses a token missing from model.vocab'),
    ("bpe", {"model.dropout": "0.1"}, 'model.dropout is "0.1" (a string); expected a number from 0 to 1'),
    ("bpe", {"model.dropout": 0.1}, "model.dropout: BPE dropout is not supported: it makes encoding random"),
    ("bpe", {"model.byte_fallback": "yes"}, 'model.byte_fallback is "yes" (a string); expected true or false'),
    ("bpe", {"model.continuing_subword_prefix": 0}, "model.continuing_subword_prefix is 0; expected a string"),
    ("bert", {"normalizer": []}, "normalizer is [] (a list); expected an object"),
    ("bert", {"normalizer.type": DROP}, "normalizer.type is missing; expected one of BertNormalizer, NFC, NFD, NFKC, "
                                        "NFKD, Strip, Replace, Prepend, StripAccents, Lowercase, ByteLevel, Sequence"),
    ("bert", {"normalizer.lowercase": "yes"}, 'normalizer.lowercase is "yes" (a string); expected true or false'),
    ("bert", {"normalizer": {"type": "Sequence", "normalizers": "NFC"}},
     'normalizer.normalizers is "NFC" (a string); expected a list'),
    ("bert", {"normalizer": {"type": "Sequence", "normalizers": [{"type": "NFC"}, 5]}},
     "normalizer.normalizers[1] is 5; expected an object"),
    ("bert", {"normalizer": {"type": "Sequence", "normalizers": [
        {"type": "Replace", "pattern": {"Regex": "("}, "content": " "}]}},
     'normalizer.normalizers[0].pattern.Regex "(" does not compile (missing ), unterminated subpattern at position 0)'),
    ("bert", {"normalizer": {"type": "Replace", "pattern": {"Glob": "*"}, "content": ""}},
     'normalizer.pattern is {"Glob": "*"}; expected {"String": text} or {"Regex": pattern}'),
    ("bert", {"normalizer": {"type": "Replace", "pattern": {"String": " "}}},
     "normalizer.content is missing; expected a string"),
    ("bert", {"normalizer": {"type": "Prepend", "prepend": 5}}, "normalizer.prepend is 5; expected a string"),
    ("bert", {"pre_tokenizer": dict(SPLIT, pattern={"Regex": "("})},
     'pre_tokenizer.pattern.Regex "(" does not compile (missing ), unterminated subpattern at position 0)'),
    ("bert", {"pre_tokenizer": dict(SPLIT, pattern={"Regex": "a)|(b"})},  # grouped as "(a)|(b)", it would compile
     'pre_tokenizer.pattern.Regex "a)|(b" does not compile (unbalanced parenthesis at position 1)'),
    ("bert", {"pre_tokenizer": dict(SPLIT, pattern={"Regex": "a{99999999999}"})},
     'pre_tokenizer.pattern.Regex "a{99999999999}" does not compile (the repetition number is too large)'),
    ("bert", {"pre_tokenizer": dict(SPLIT, pattern={"String": " "}, behavior=DROP)},
     "pre_tokenizer.behavior is missing; expected one of Removed, Isolated, MergedWithPrevious, MergedWithNext, "
     "Contiguous"),
    ("bert", {"pre_tokenizer": dict(SPLIT, pattern={"String": " "}, invert="no")},
     'pre_tokenizer.invert is "no" (a string); expected true or false'),
    ("bert", {"pre_tokenizer": {"type": "Metaspace", "replacement": ""}},
     'pre_tokenizer.replacement is ""; expected a single character'),
    ("bert", {"pre_tokenizer": {"type": "Metaspace", "prepend_scheme": "sometimes"}},
     'pre_tokenizer.prepend_scheme is "sometimes"; expected one of always, first, never'),
    ("bert", {"pre_tokenizer": {"type": "CharDelimiterSplit"}},
     "pre_tokenizer.delimiter is missing; expected a single character"),
    ("bert", {"pre_tokenizer": {"type": "Digits", "individual_digits": 1}},
     "pre_tokenizer.individual_digits is 1; expected true or false"),
    ("bert", {"pre_tokenizer": {"type": "ByteLevel", "use_regex": "true"}},
     'pre_tokenizer.use_regex is "true" (a string); expected true or false'),
    ("bert", {"post_processor.single.0": {"SpecialToken": {"id": "[X]", "type_id": 0}}},
     'post_processor.single[0] names the special token "[X]", which post_processor.special_tokens does not define'),
    ("bert", {"post_processor.single.1.Sequence.id": "B"}, 'post_processor.single[1].Sequence.id is "B"; expected A'),
    ("bert", {"post_processor.pair.3.Sequence.id": "C"}, 'post_processor.pair[3].Sequence.id is "C"; expected A or B'),
    ("bert", {"post_processor.single.0": "[CLS]"}, 'post_processor.single[0] is "[CLS]" (a string); expected an '
                                                   "object"),
    ("bert", {"post_processor.single.0": {"Token": {"id": "[CLS]"}}},
     'post_processor.single[0] is {"Token": {"id": "[CLS]"}}; expected an object {"Sequence": {...}} or '
     '{"SpecialToken": {...}}'),
    ("bert", {"post_processor.single.0.SpecialToken.type_id": -1},
     "post_processor.single[0].SpecialToken.type_id is -1; expected an integer >= 0"),
    ("bert", {"post_processor.special_tokens.[CLS].ids": [99]},
     'post_processor.special_tokens["[CLS]"].ids[0] is 99; expected the id of a token in model.vocab or added_tokens'),
    ("bert", {"post_processor.special_tokens.[CLS].ids": "2"},
     'post_processor.special_tokens["[CLS]"].ids is "2" (a string); expected a list'),
    ("bert", {"post_processor.special_tokens.[CLS]": [2]},
     'post_processor.special_tokens["[CLS]"] is [2] (a list); expected an object with "ids"'),
    ("bert", {"post_processor.pair": DROP}, "post_processor.pair is missing; expected a list"),
    ("bert", {"post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 3], "cls": ["[CLS]"]}},
     'post_processor.cls is ["[CLS]"]; expected a ["token", id] pair'),
    ("bert", {"post_processor": {"type": "BertProcessing", "sep": ["[SEP]", 99], "cls": ["[CLS]", 2]}},
     "post_processor.sep[1] is 99; expected the id of a token in model.vocab or added_tokens"),
    ("bert", {"decoder": {"type": "Strip", "content": "ab"}}, 'decoder.content is "ab"; expected a single character'),
    ("bert", {"decoder": {"type": "Strip", "content": " ", "start": -1}}, "decoder.start is -1; expected an integer "
                                                                          ">= 0"),
    ("bert", {"decoder.cleanup": "no"}, 'decoder.cleanup is "no" (a string); expected true or false'),
    ("bert", {"decoder": {"type": "Replace", "pattern": {"String": "_"}, "content": None}},
     "decoder.content is null; expected a string"),
    ("bert", {"added_tokens": {"a": 1}}, 'added_tokens is {"a": 1} (an object); expected a list'),
    ("bert", {"added_tokens.0": 5}, "added_tokens[0] is 5; expected an object"),
    ("bert", {"added_tokens.0.content": 5}, "added_tokens[0].content is 5; expected a string"),
    ("bert", {"added_tokens.0.id": "0"}, 'added_tokens[0].id is "0" (a string); expected an integer >= 0'),
    ("bert", {"added_tokens.0.special": "true"}, 'added_tokens[0].special is "true" (a string); expected true or '
                                                 "false"),
    ("bert", {"padding": {"pad_token": "[PADX]"}},
     'padding.pad_token is "[PADX]", which is in neither model.vocab nor added_tokens'),
    ("bert", {"padding": "yes"}, 'padding is "yes" (a string); expected an object'),
]


def changed(base: str, changes: dict) -> dict:
    """The base spec with each dotted path (list items by index) set to its value, or removed for DROP."""
    spec = json.loads(json.dumps(spec_of(**BASES[base]())))  # a copy: the bases share their templates
    for path, value in changes.items():
        *parents, last = path.split(".")
        node = spec
        for key in parents:
            node = node[int(key)] if isinstance(node, list) else node[key]
        key = int(last) if isinstance(node, list) else last
        if value is DROP:
            del node[key]
        else:
            node[key] = {k: v for k, v in value.items() if v is not DROP} if isinstance(value, dict) else value
    return spec


@pytest.mark.parametrize("base,changes,message", BAD_TOKENIZERS)
def test_malformed_tokenizer_json_is_one_line_naming_the_json_path(tmp_path, base, changes, message):
    path = tmp_path / "tokenizer.json"
    path.write_text(json.dumps(changed(base, changes)))
    with pytest.raises(ValueError) as err:
        Tokenizer.from_file(path)
    assert str(err.value) == f"{path}: {message}"


def test_sequences_nest_eight_deep_at_most(tmp_path):
    pre = {"type": "WhitespaceSplit"}
    for _ in range(8):
        pre = {"type": "Sequence", "pretokenizers": [pre]}
    tok = make(tmp_path, bert_parts()["model"], pre_tokenizer=pre)
    assert tok.encode("hello  world").ids == [5, 6]
    path = tmp_path / "deep.json"
    path.write_text(json.dumps(spec_of(bert_parts()["model"], pre_tokenizer={"type": "Sequence",
                                                                            "pretokenizers": [pre]})))
    with pytest.raises(ValueError) as err:
        Tokenizer.from_file(path)
    assert str(err.value) == f"{path}: pre_tokenizer{'.pretokenizers[0]' * 8}: Sequences nested more than 8 deep"


def test_special_token_files_are_checked_and_the_roles_must_be_tokens(tmp_path):
    bert(tmp_path)
    config, smap = tmp_path / "tokenizer_config.json", tmp_path / "special_tokens_map.json"
    cases = [(smap, {"pad_token": 5}, f'{smap}: pad_token is 5; expected a token: a string, or an object with a '
                                      '"content" string'),
             (smap, {"mask_token": ["[MASK]"]}, f'{smap}: mask_token is ["[MASK]"]; expected a token: a string, or '
                                                'an object with a "content" string'),
             (config, {"eos_token": {"lstrip": False}}, f"{config}: eos_token.content is missing; expected a string"),
             (config, {"eos_token": "</s>"}, f'{config}: eos_token is "</s>", which is not a token of '
                                             f'{tmp_path / "tokenizer.json"}')]
    for path, data, message in cases:
        path.write_text(json.dumps(data))
        with pytest.raises(ValueError) as err:
            Tokenizer.from_pretrained(tmp_path)
        assert str(err.value) == message
        path.unlink()
    # true/false are flags and null names no token; a role the later file names again is that file's
    config.write_text(json.dumps({"add_bos_token": True, "bos_token": None, "eos_token": "</s>", "pad_token": ""}))
    smap.write_text(json.dumps({"eos_token": "[SEP]", "pad_token": {"content": "[PAD]"}}))
    tok = Tokenizer.from_pretrained(tmp_path)
    assert (tok.bos_id, tok.eos_id, tok.pad_id) == (None, 3, 0)


def tokenizer_variants(seed=0, n=300):
    """Seeded mutations of the valid test tokenizers: a random walk down the JSON to one node, which is then replaced
    by a hostile value or removed."""
    rng = random.Random(seed)
    pool = [-1, 0, 1, 2, 99, 1.5, "", "a", "(", "[CLS]", "Ġ", None, True, False, [], [1], ["a", 1], {},
            {"type": "Sequence"}, {"String": " "}, {"Regex": "(["}, {"Regex": "\\p{L}+"}, "Isolated", "first",
            {"SpecialToken": {"id": "[CLS]", "type_id": 0}}, {"Sequence": {"id": "B", "type_id": 1}}]
    for i in range(n):
        spec = json.loads(json.dumps(spec_of(**BASES["bert" if i % 2 else "bpe"]())))
        spec["padding"] = {"pad_token": BERT_VOCAB[0] if i % 2 else BL_VOCAB[1]}
        node, key = spec, rng.choice(sorted(spec))
        while isinstance(node[key], (dict, list)) and node[key] and rng.random() < 0.7:
            node = node[key]
            key = rng.randrange(len(node)) if isinstance(node, list) else rng.choice(sorted(node))
        if isinstance(node, dict) and rng.random() < 0.2:
            del node[key]
        else:
            node[key] = json.loads(json.dumps(rng.choice(pool)))
        yield spec


def test_tokenizer_fuzz_only_one_line_value_errors_and_accepted_files_encode():
    outcomes = {"loaded": 0, "refused": 0}
    for i, spec in enumerate(tokenizer_variants()):
        try:
            tok = Tokenizer(spec)
        except ValueError as e:
            outcomes["refused"] += 1
            assert "\n" not in str(e), f"variant {i}: {e}"
            continue
        outcomes["loaded"] += 1
        try:  # what loads must encode and decode: a malformed part that slipped through would raise here
            for a, b in (("Hello, world! é 12 [MASK]", None), ("hello", "world"), ("", "")):
                ids = tok.encode(a, b, max_length=6).ids + tok.encode(a, b).ids
                tok.decode(ids + [len(BERT_VOCAB) + 5]), tok.decode(ids, skip_special_tokens=False)
        except ValueError as e:  # a WordPiece/WordLevel file that names no unk_token meets an unknown word
            assert str(e).startswith("unknown piece"), f"variant {i}: {e}"
    assert outcomes["refused"] > 80 and outcomes["loaded"] > 80, outcomes  # both paths were really exercised
