"""The math data (recipes/math_data.py): the official protocol's constants, GSM8K answers in MetaMath's form, bad
files named by file and line, and downloads that send the hub token to the hub only (two servers on 127.0.0.1)."""
import http.server
import json
import threading

import pytest

from recipes import math_data
from recipes.math_data import to_metamath_format
from recipes.math_scoring import official_gsm8k_answer
from recipes.training import UserError


def problem(a, b):
    return dict(question=f"What is {a} plus {b}?", answer=f"{a} plus {b} is <<{a}+{b}={a + b}>>{a + b}.\n#### {a + b}")


def test_official_protocol_constants():
    official = math_data.PROTOCOLS["official"]
    assert official["stop"] == ("Instruction:", "Instruction", "Response:", "Response")
    assert official["max_new_tokens"] == {"gsm8k": 1024, "math": 2048}
    assert official["separator"] == "" and official["eval_suffix"] == " Let's think step by step."



def test_gsm8k_answers_take_metamath_form():
    converted = to_metamath_format(problem(2, 3)["answer"])
    assert converted == "2 plus 3 is 5.\nThe answer is: 5"  # calculator notes gone, '#### 5' rewritten
    assert official_gsm8k_answer(converted) == 5
    assert to_metamath_format("Plain MetaMathQA text.\nThe answer is: 4") == "Plain MetaMathQA text.\nThe answer is: 4"



def test_bad_lines_name_file_and_line(tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(problem(1, 2)) + "\n\n{not json\n")
    with pytest.raises(UserError, match=r"bad\.jsonl:3: not valid JSON"):
        math_data.read_records(bad)
    bad.write_text(json.dumps(problem(1, 2)) + "\n" + json.dumps({"question": "q"}) + "\n")
    records = math_data.read_records(bad)
    with pytest.raises(UserError, match=r"bad\.jsonl:2: has no field 'answer'"):
        math_data.get_pairs(records, "question", "answer")
    odd = tmp_path / "odd.jsonl"
    odd.write_text(json.dumps({"q": "x", "a": "y"}) + "\n")
    with pytest.raises(UserError, match="--prompt_field"):
        math_data.pick_fields(math_data.read_records(odd), None, None, odd)
    assert math_data.pick_fields(math_data.read_records(odd), "q", "a", odd) == ("q", "a")


def test_bom_is_accepted_and_other_encodings_name_the_line(tmp_path):
    path = tmp_path / "bom.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(problem(1, 2)).encode() + b"\n")
    assert math_data.read_records(path)[0][1]["question"] == "What is 1 plus 2?"
    latin = tmp_path / "latin1.jsonl"
    latin.write_bytes(json.dumps(problem(1, 2)).encode() + b'\n{"question": "caf\xe9", "answer": "#### 1"}\n')
    with pytest.raises(UserError, match=r"latin1\.jsonl:2: not UTF-8") as err:
        math_data.read_records(latin)
    assert "\n" not in str(err.value)


SURROGATE = "a string holds a lone surrogate escape (\\ud800-\\udfff), which no UTF-8 text can hold"
DEEP = "arrays or objects nested too deeply to read"


@pytest.mark.parametrize("name,text,message", [
    ("s.jsonl", json.dumps(problem(1, 2)) + '\n{"question": "\\ud800?", "answer": "#### 1"}\n',
     f"{{path}}:2: not valid JSON ({SURROGATE}); fix or delete that line"),
    ("k.jsonl", '{"\\udfff": 1}\n', f"{{path}}:1: not valid JSON ({SURROGATE}); fix or delete that line"),
    ("d.jsonl", json.dumps(problem(1, 2)) + '\n{"a": ' + "[" * 100_000 + "]" * 100_000 + "}\n",
     f"{{path}}:2: not valid JSON ({DEEP}); fix or delete that line"),
    ("a.json", '[{"question": "\\udc00", "answer": "#### 1"}]',
     f"{{path}}: not valid JSON ({SURROGATE}); fix the file or re-download it"),
    ("d.json", "[" * 100_000 + "]" * 100_000, f"{{path}}: not valid JSON ({DEEP}); fix the file or re-download it"),
])
def test_lone_surrogates_and_deep_nesting_name_the_file_and_line(tmp_path, name, text, message):
    path = tmp_path / name
    path.write_text(text, encoding="utf-8")
    with pytest.raises(UserError) as err:
        math_data.read_records(path)
    assert str(err.value) == message.format(path=path)


def test_surrogate_pairs_and_escaped_backslashes_still_load(tmp_path):
    path = tmp_path / "ok.json"  # a pair is one character; "\\\\ud800" is a backslash and the text ud800
    path.write_text('[{"question": "\\ud83d\\ude00", "answer": "\\\\ud800"}]', encoding="utf-8")
    assert math_data.read_records(path)[0][1] == {"question": "\U0001F600", "answer": "\\ud800"}


class Recorder(http.server.BaseHTTPRequestHandler):
    """Serves a small JSONL for any path and remembers the Authorization header of each request."""
    seen = []

    def do_GET(self):
        Recorder.seen.append((self.server.server_address[1], self.path, self.headers.get("Authorization")))
        body = (json.dumps(problem(1, 1)) + "\n").encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *a):
        pass


def test_the_token_goes_to_the_hub_only(tmp_path, monkeypatch):
    hub, other = (http.server.ThreadingHTTPServer(("127.0.0.1", 0), Recorder) for _ in range(2))
    for server in (hub, other):
        threading.Thread(target=server.serve_forever, daemon=True).start()
    Recorder.seen = []
    try:
        hub_port, other_port = hub.server_address[1], other.server_address[1]
        monkeypatch.setenv("HF_ENDPOINT", f"http://127.0.0.1:{hub_port}")
        monkeypatch.setenv("HF_TOKEN", "secret-from-env")
        monkeypatch.setattr(math_data, "GSM8K_URL", f"http://127.0.0.1:{other_port}/{{split}}.jsonl")
        monkeypatch.setattr(math_data, "MATH_URL", f"http://127.0.0.1:{other_port}/MATH_test.jsonl")
        math_data.fetch("metamathqa", "train", tmp_path / "a", token="secret")
        math_data.fetch("metamathqa", "train", tmp_path / "b", token=None)
        math_data.fetch(f"http://127.0.0.1:{hub_port}/datasets/x/y.jsonl", "train", tmp_path, token="secret")
        math_data.fetch(f"http://127.0.0.1:{other_port}/my.jsonl", "train", tmp_path, token="secret")
        odd = math_data.fetch(f"http://127.0.0.1:{other_port}/x/..", "train", tmp_path, token="secret")
        math_data.fetch("gsm8k", "test", tmp_path, token="secret")
        math_data.fetch("math", "test", tmp_path, token="secret")
    finally:
        hub.shutdown()
        other.shutdown()
    by_port = {(port, path): auth for port, path, auth in Recorder.seen}
    assert by_port[(hub_port, "/datasets/meta-math/MetaMathQA/resolve/main/MetaMathQA-395K.json")] in (
        "Bearer secret", "Bearer secret-from-env")
    assert [a for p, _, a in Recorder.seen if p == hub_port] == ["Bearer secret", "Bearer secret-from-env",
                                                                 "Bearer secret"]
    assert sorted(path for p, path, _ in Recorder.seen if p == other_port) == ["/MATH_test.jsonl", "/my.jsonl",
                                                                              "/test.jsonl", "/x/.."]
    assert odd.name == "data" and odd.parent.parent == tmp_path / "urls"  # a URL never names a path outside
    assert all(auth is None for p, _, auth in Recorder.seen if p == other_port)
