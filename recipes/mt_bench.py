"""MT-Bench answers for FastChat's judge: a model's answers to the 80 two-turn questions, written in FastChat's
model_answer JSONL format, so that FastChat's gen_judgment.py / show_result.py turn them into the first-turn,
second-turn and mean scores of the paper's Table 4 (the judge is GPT-4 behind an API: never called from here).

FastChat's rules (fastchat/llm_judge/gen_model_answer.py and common.py, lm-sys/FastChat at commit 0e6d3e4, April
2025), point by point:
  - questions: fastchat/llm_judge/data/mt_bench/question.jsonl, one JSON object a line with question_id, category,
    turns (two user messages);
  - temperature per category (common.py temperature_config; a category not in it: 0.7); temperature < 1e-4 means
    greedy decoding (do_sample=False), else sampling; torch.manual_seed(0) before each question (choice 0);
  - at most 1,024 new tokens per turn (--max-new-token's default);
  - the second turn's prompt is the whole conversation: the first question, its answer, the second question;
  - an answer is the decoded new tokens with the special tokens removed, stripped of surrounding white space;
  - one line per question: question_id, answer_id, model_id, choices [{index 0, turns [answer 1, answer 2]}],
    tstamp; the file sorted by question_id (reorg_answer_file).
Where transformers' sampling takes top_k / top_p from the model's generation_config.json (defaults 50 and 1.0), so
does this; the random draws themselves are torch's, seeded 0 per question and turn, not transformers' stream.

The conversation is written in the prompt the model was trained with, not in a FastChat template: the official
Alpaca prompt (recipes/instruct_data.py) for the first turn, and for each later turn the answer so far followed by
the same template's instruction and response headers ("\\n\\n### Instruction:\\n{q}\\n\\n### Response: "). A model
tuned on Alpaca has seen nothing else; FastChat's own "alpaca" template (used only for model paths containing
"alpaca") differs from the training text ("### Instruction: q" on one line, "</s>" between turns).

Why it exists: Table 4 is MT-Bench; the answers are the part of it that needs the model, so they are made here, in
exactly FastChat's format and sampling rules, and judged wherever an API key is.
"""
import json
import time
import uuid
from pathlib import Path

from pretrained.files import atomic_write
from recipes.generation import Sampling, generate
from recipes.instruct_data import alpaca_prompt
from recipes.math_data import fetch, read_records
from recipes.training import UserError, gather_shares, my_share

QUESTIONS_URL = ("https://raw.githubusercontent.com/lm-sys/FastChat/main/fastchat/llm_judge/data/mt_bench/"
                 "question.jsonl")
TEMPERATURE = {"writing": 0.7, "roleplay": 0.7, "extraction": 0.0, "math": 0.0, "coding": 0.0, "reasoning": 0.0,
               "stem": 0.1, "humanities": 0.1}  # fastchat/llm_judge/common.py temperature_config
OTHER_TEMPERATURE = 0.7  # gen_model_answer.py: a category that temperature_config lacks
MAX_NEW_TOKENS = 1024  # gen_model_answer.py --max-new-token
SEED = 0  # gen_model_answer.py: torch.manual_seed(i) for choice i, and one choice
NEXT_TURN = "\n\n### Instruction:\n{instruction}\n\n### Response: "  # a later turn, in the Alpaca prompt's words


def fetch_questions(source, data_dir):
    """--mt_bench download (FastChat's question.jsonl from GitHub, kept in data_dir) or a local file."""
    if source != "download":
        if not Path(source).expanduser().is_file():
            raise UserError(f"--mt_bench {source}: no such file; pass FastChat's question.jsonl or download")
        return Path(source).expanduser()
    try:
        return fetch(QUESTIONS_URL, "test", data_dir, None)  # no hub token: GitHub never sees it
    except UserError as e:
        raise UserError(f"could not download {QUESTIONS_URL} ({e.__cause__}); without network, pass a local copy: "
                        f"--mt_bench question.jsonl") from None


def read_questions(path):
    """[{question_id, category, turns}] of a question.jsonl, each checked: an integer id (FastChat sorts by it), a
    category, one or more turns of text."""
    questions = []
    for where, rec in read_records(path):
        turns = rec.get("turns")
        if type(rec.get("question_id")) is not int or not isinstance(rec.get("category"), str) or not (
                isinstance(turns, list) and turns and all(isinstance(t, str) for t in turns)):
            raise UserError(f"{where}: not an MT-Bench question (an integer question_id, a category, turns: a list of "
                            f"strings); --mt_bench needs FastChat's question.jsonl format")
        questions.append(dict(question_id=rec["question_id"], category=rec["category"], turns=turns))
    return questions


def load_questions(source, data_dir):
    path = fetch_questions(source, data_dir)
    questions = read_questions(path)
    print(f"MT-Bench: {len(questions)} questions from {path}, up to {max(len(q['turns']) for q in questions)} turns")
    return questions


def conversation(turns, answers):
    """The prompt of turn len(answers) + 1: every earlier turn with its answer, then the next question."""
    text = alpaca_prompt(turns[0])
    for answer, turn in zip(answers, turns[1:]):
        text += answer + NEXT_TURN.format(instruction=turn)
    return text


def sampling_for(category, generation_config):
    """FastChat's temperature for the category; top_k / top_p as transformers reads them (generation_config.json)."""
    return Sampling(TEMPERATURE.get(category, OTHER_TEMPERATURE), seed=SEED, **generation_config)


def read_generation_config(model_dir):
    """The model's top_k and top_p for sampling, as transformers' GenerationConfig reads generation_config.json:
    missing, 50 and 1.0; null, off (0 and 1.0)."""
    path = Path(model_dir) / "generation_config.json"
    try:
        config = json.loads(path.read_text()) if path.is_file() else {}
    except (OSError, ValueError) as e:
        raise UserError(f"{path} is not readable ({e.__class__.__name__}); restore it or delete it") from None
    config = config if isinstance(config, dict) else {}
    top_k, top_p = config.get("top_k", 50), config.get("top_p", 1.0)
    if not (top_k is None or type(top_k) is int and top_k >= 0) or not (
            top_p is None or type(top_p) in (int, float) and 0 < top_p <= 1):
        raise UserError(f"{path}: top_k {top_k!r} / top_p {top_p!r} are not a count and a probability; fix the file")
    return dict(top_k=top_k or 0, top_p=1.0 if top_p is None else float(top_p))


def answer_questions(model, collator, questions, generation_config, *, pad_id, max_new_tokens, batch_size, device,
                     autocast, ranks):
    """Every question's answers, turn after turn, at most max_new_tokens each. Questions of one temperature are
    decoded together, longest prompts first; every copy answers its share of the questions, and gets all of them
    back in order. Returns, per question, its answers and why each ended ("eos" or "length")."""
    mine = my_share(list(range(len(questions))), ranks)
    answers, ended = {i: [] for i in mine}, {i: [] for i in mine}
    for turn in range(max(len(q["turns"]) for q in questions)):
        pending = [i for i in mine if len(questions[i]["turns"]) > turn]
        prompts = {i: collator.source_ids(conversation(questions[i]["turns"], answers[i]), cut=False)
                   for i in pending}
        by_sampling = {}
        for i in sorted(pending, key=lambda i: -len(prompts[i])):
            by_sampling.setdefault(sampling_for(questions[i]["category"], generation_config), []).append(i)
        for sampling, group in by_sampling.items():
            for k in range(0, len(group), batch_size):
                chunk = group[k:k + batch_size]
                rows, why = generate(model, [prompts[i] for i in chunk], pad_id, collator.end_id, max_new_tokens, (),
                                     collator.tok.decode, device, autocast, sampling)
                for i, ids, reason in zip(chunk, rows, why):
                    answers[i].append(collator.tok.decode(ids).strip())
                    ended[i].append(reason)
    return gather_shares([answers[i] for i in mine], ranks), gather_shares([ended[i] for i in mine], ranks)


def write_answers(path, questions, answers, model_id):
    """FastChat's model_answer file: one line per question, sorted by question_id."""
    rows = sorted(({"question_id": q["question_id"], "answer_id": uuid.uuid4().hex, "model_id": model_id,
                    "choices": [{"index": 0, "turns": a}], "tstamp": time.time()}
                   for q, a in zip(questions, answers, strict=True)), key=lambda row: row["question_id"])
    atomic_write(path, lambda f: f.write("".join(json.dumps(row) + "\n" for row in rows).encode()))
