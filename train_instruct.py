"""Instruction-tune a causal LM with Uni-LoRA on Cleaned Alpaca, then answer MT-Bench for FastChat's judge.

This is the paper's third experiment (Uni-LoRA, NeurIPS 2025, Table 4) as one plain script: Llama-2 with 4-bit NF4
base weights, Uni-LoRA on every linear layer but lm_head, trained on Cleaned Alpaca under the official Alpaca
prompts with the loss on the response only; then the held-out responses' log-likelihood, and (--mt_bench) the
model's answers to MT-Bench's 80 two-turn questions in FastChat's format. Table 4's scores are GPT-4's grades of
those answers: FastChat's gen_judgment.py makes them (docs/instruct.md); this script never calls an API.

    python train_instruct.py                            # small recipe: SmolLM2-135M-Instruct, 320 examples, a CPU
    python train_instruct.py --recipe paper             # the official Llama-2-7B run (a GPU; see the recipe below)
    python train_instruct.py --recipe paper13b          # the official Llama-2-13B run: d = 1,048,576
    python train_instruct.py --mt_bench download        # also answer MT-Bench: <run>/mt_bench_answers.jsonl
    python train_instruct.py --method lora              # the official LoRA baseline (r 64, alpha 32, lr 2e-4)
    python train_instruct.py --method none --mt_bench download     # the base model's answers, no training
    python train_instruct.py --eval_only --load out/instruct-unilora --mt_bench download   # into eval-N/
    python train_instruct.py --resume --output_dir out/instruct-unilora                    # continue a run
    torchrun --nproc_per_node 8 -- train_instruct.py --recipe paper   # data parallel: 8 copies share each batch

--recipe paper is the Uni-LoRA repository's instruction_tuning/scripts/finetune_llama2_7b_unilora.sh running
instruction_tuning/qlora_unilora.py (QLoRA's script with Uni-LoRA in the authors' PEFT), value by value:

  value                         here                  official (file: flag, or code)
  model                         --model               7b.sh: --model_name_or_path meta-llama/Llama-2-7b-hf
  base weights                  --quantize nf4        7b.sh: --bits 4 --quant_type nf4 --double_quant
  precision                     --dtype/--amp bf16    7b.sh: --bf16 (bf16 compute, norms fp32; qlora_unilora.py)
  adapted layers                all linear but lm_head  7b.sh: --lora_modules all; find_all_linear_names
  rank                          --r 4                 7b.sh: --lora_r 4
  d (theta_d)                   --d 524,288           7b.sh: --num_vectors 2048; qlora_unilora.py:
                                                      UniLoRAConfig(vector_length=256*args.num_vectors)
  theta_d init, P               U(-0.02, 0.02),       the authors' peft: UniLoRAConfig init_vector_bank_bound
                                P without signs       0.02 (default); UniLoRAModel.generate_index
  adapter dropout               --dropout 0.05        7b.sh: --lora_dropout 0.05
  data                          alpaca-clean          7b.sh: --dataset alpaca-clean (yahma/alpaca-cleaned)
  prompts                       ALPACA_PROMPT_DICT    qlora_unilora.py: ALPACA_PROMPT_DICT, extract_alpaca_dataset
  source / target cut           --source_max_len 16   7b.sh: --source_max_len 16 --target_max_len 512;
                                --target_max_len 512  DataCollatorForCausalLM (train_on_source False)
  batch                         --batch_size 16       7b.sh: --per_device_train_batch_size 4
                                (micro 4)             --gradient_accumulation_steps 4 (one GPU)
  loss                          --loss micro          transformers' Trainer: each forward's token mean / 4
  epochs                        --epochs 1            7b.sh: --num_train_epochs 1
  learning rate                 --lr 8e-4             7b.sh: --learning_rate_vector_bank 8e-4 (create_optimizer;
                                                      --learning_rate 0 is the other groups', empty)
  schedule                      linear, 10% warmup    7b.sh: --lr_scheduler_type linear --warmup_ratio 0.1
  optimiser                     AdamW (0.9, 0.999)    7b.sh: --adam_beta2 0.999; qlora_unilora.py: the default
                                                      --optim paged_adamw_32bit (AdamW; paging saves memory)
  gradient clipping             --grad_clip 0.3       7b.sh: --max_grad_norm 0.3
  weight decay                  --weight_decay 0      7b.sh: --weight_decay 0.0
  batches of similar lengths    --group_by_length     7b.sh: --group_by_length
  activations recomputed        --gradient_checkpointing  7b.sh: --gradient_checkpointing
  seeds                         --seed 0              7b.sh: --seed 0 (P, theta_d)
                                --data_seed 42        7b.sh: --data_seed 42 (the data order)
  held-out set                  --eval_size 1024      13b.sh: --eval_dataset_size 1024 --max_eval_samples 1000
                                --max_eval_samples 1000   (train_test_split seed 42, in make_data_module)

--recipe paper13b is finetune_llama2_13b_unilora.sh: --model meta-llama/Llama-2-13b-hf, --num_vectors 4096 so
d = 1,048,576, everything else the same (its --learning_rate_vector_bank 0.0008 is 8e-4). The 7B script evaluates
nothing (--evaluation_strategy no) and so trains on all 51,760 records; the recipes hold out 1,024 as the 13B
script does, for the log-likelihood (--eval_size 0 trains on all, as the 7B run). Also as the official run:
--group_by_length (its sampler's rule on our seeded shuffle: megabatches of 50 batches sorted by characters of prompt
+ output, the longest first), --gradient_checkpointing, and the [PAD] token it adds when the tokenizer has none
(Llama-2: id 32,000, embedding and lm_head rows the mean of the others). Not reproduced: transformers' own shuffle
(torch's global RNG; here numpy default_rng([data_seed, epoch])), the last partial batch (dropped here), and the
paged optimiser (CUDA unified memory for AdamW's state; the same AdamW numbers, here 8 MB of state, nothing to page).
The official source cut of 16 tokens
keeps BOS and the start of the prompt's preamble, never the instruction: that is the official run, reproduced
(docs/instruct.md).

Needs only torch, numpy and tqdm (models, tokenizers and hub downloads from pretrained/, the adapters from
unilora.py and projections.py, the training loop from recipes/causal_lm.py, shared with train_math.py, the data
from recipes/instruct_data.py, MT-Bench from recipes/mt_bench.py). Outputs in --output_dir: run.json,
train_log.jsonl, checkpoint.pt (--resume), adapter.pt, results.json, mt_bench_answers.jsonl (--mt_bench).
"""
import argparse
import os
import re
import sys
import time
from pathlib import Path

import torch
import torch.nn as nn

from projections import PROJECTIONS
from recipes.causal_lm import (LOSSES, SavedRun, Script, adapt_and_train, add_machine_flags, add_precision_flags,
                               add_run_flags, add_training_flags, check_run_flags, check_signs, complete,
                               count_or_all, load_base, read_run_checkpoint, run_folder, set_up, settle_eval_only)
from recipes.checkpoint import resume_hint
from recipes.generation import answer_loglik
from recipes.instruct_data import Collator, load_examples
from recipes.mt_bench import (MAX_NEW_TOKENS, TEMPERATURE, answer_questions, load_questions, read_generation_config,
                              write_answers)
from recipes.training import (Parser, UserError, choice, data_parallel_until_done, errors_as_exit,
                              interrupt_on_sigterm, main_first, nonnegative_int, positive_int, printing_on_main_copy,
                              real, seed_number, text, whole)

# ----------------------------------------------------------------------------------------------------------
# Recipes.  Every flag left unset on the command line takes its value from the chosen recipe.

OFFICIAL = dict(train_data="alpaca-clean", source_max_len=16, target_max_len=512, epochs=1, batch_size=16,
                micro_batch_size=4, r=4, warmup_ratio=0.1, seed=0, data_seed=42, loss="micro", group_by_length=True,
                gradient_checkpointing=True)
RECIPES = {
    # Runs on a laptop CPU: SmolLM2-135M-Instruct (a LlamaForCausalLM, Apache-2.0, ungated) in full precision,
    # 320 Alpaca examples (20 steps), 64 held out; d = 2^16 as in train_math's small recipe (D is 1.22M).
    "small": OFFICIAL | dict(model="HuggingFaceTB/SmolLM2-135M-Instruct", quantize="none", max_train_samples=320,
                             eval_size=64, max_eval_samples="all", d=65536, dtype="auto", amp="auto",
                             eval_batch_size=8, save_every=10, gradient_checkpointing=False),  # no memory to save
    # The official 7B run (the recipe table above).
    "paper": OFFICIAL | dict(model="meta-llama/Llama-2-7b-hf", quantize="nf4", max_train_samples="all",
                             eval_size=1024, max_eval_samples=1000, d=524_288, dtype="bfloat16", amp="bf16",
                             eval_batch_size=16, save_every=250),
}
RECIPES["paper13b"] = RECIPES["paper"] | dict(model="meta-llama/Llama-2-13b-hf", d=1_048_576)
# Learning rates: theta_d's is the official --learning_rate_vector_bank; LoRA's, its rank and alpha are the official
# LoRA baseline's (instruction_tuning/scripts/finetune_llama2_7b_lora.sh: --learning_rate 0.0002 --lora_r 64
# --lora_alpha 32).
DEFAULT_LR = {"unilora": 8e-4, "lora": 2e-4}
PER_METHOD = {"lora": dict(r=64, lora_alpha=32.0)}

# Settings that must match for --resume to continue a run.  train_sha256 is the data file's content.
RESUME_KEYS = ("method", "model", "quantize", "train_data", "train_sha256", "max_train_samples", "eval_size",
               "source_max_len", "target_max_len", "epochs", "max_steps", "batch_size", "lr", "warmup_ratio",
               "weight_decay", "grad_clip", "d", "r", "lora_alpha", "signs", "projection", "dropout", "seed",
               "data_seed", "dtype", "amp", "loss", "group_by_length", "n_train")
# What this script is to the shared loop (recipes/causal_lm.py): the linear schedule, the data order by --data_seed.
SCRIPT = Script(name="train_instruct.py", folder="instruct", resume_keys=RESUME_KEYS, decay="linear",
                data_seed="data_seed")
# What --eval_only --load takes from the saved run: the model, how it was adapted and prompted, its held-out set.
RUN_KEYS = ("method", "model", "quantize", "r", "lora_alpha", "projection", "source_max_len", "target_max_len",
            "train_data", "eval_size")
SAVED = SavedRun(dict(method=choice(("unilora", "lora", "none")), model=text(), quantize=choice(("nf4", "none")),
                      r=whole(null=True), lora_alpha=real(null=True), projection=choice(tuple(PROJECTIONS), null=True),
                      source_max_len=whole(), target_max_len=whole(), train_data=text(), eval_size=whole(low=0),
                      max_eval_samples=whole(null=True), max_new_tokens=whole(null=True),
                      eval_batch_size=whole(null=True)),
                 taken=RUN_KEYS, carried=("max_eval_samples", "max_new_tokens", "eval_batch_size"),
                 hint="not a run folder of train_instruct.py (needs run.json and adapter.pt)")
# What --eval_only uses besides the run's own settings: where and how to evaluate, never how to train.
EVAL_ONLY_KEYS = (*RUN_KEYS, "eval_only", "load", "output_dir", "overwrite", "recipe", "max_eval_samples", "data_dir",
                  "mt_bench", "model_id", "max_new_tokens", "eval_batch_size", "micro_batch_size", "dtype", "amp",
                  "device", "threads", "hf_token")


# ----------------------------------------------------------------------------------------------------------
# main: the settings, where the run happens, then the experiment as named steps.

def main(argv=None):
    with printing_on_main_copy():  # under torchrun, the first copy alone prints
        args = parse_args(argv)  # every copy checks the flags alike, so a user error stops them all
        run = set_up(args, sys.argv[1:] if argv is None else list(argv), SCRIPT)
        with data_parallel_until_done(run.ranks), run_folder(run) as run.folder, resume_hint(run):
            return train_and_evaluate(run)


def train_and_evaluate(run):
    """The experiment: model, data, the base model's score, adapter, training, evaluation, results."""
    args, ranks = run.args, run.ranks
    # model, the official collator (the prompts, the source and target cuts), the sampling settings
    tok, model, collator, generation_config = main_first(ranks, load_model, args, run.device)
    args.pad_id = tok.pad_id if tok.pad_id is not None else add_pad_token(model, tok)
    # data: the training examples (and the checkpoint they continue), the held-out ones, MT-Bench's questions
    train, held_out = main_first(ranks, load_examples, args, collator, ranks)
    ckpt = read_run_checkpoint(run, train)
    questions = main_first(ranks, load_questions, args.mt_bench, args.data_dir) if args.mt_bench else []
    results = dict(status="running", method=args.method, model=args.model, quantize=args.quantize, recipe=args.recipe,
                   projection=args.projection, world_size=ranks.world, evaluated_run=args.load,
                   precision=dict(dtype=args.dtype, amp=args.amp),
                   args={k: v for k, v in vars(args).items() if k not in ("hf_token", "pad_id")})
    # the base model's held-out score, the adapter and its training (recipes/causal_lm.py: AdamW, warmup + linear
    # decay, checkpoints, exact resume)
    before, _, ends_here = adapt_and_train(run, model, train, ckpt, held_out, results)
    if ends_here:  # stopped by --stop_after, or --no_eval
        return results
    # evaluation (the adapter unmerged): the held-out log-likelihood, MT-Bench's answers; results
    results.update(before=before, after=evaluate(run, model, collator, held_out, questions, generation_config),
                   status="finished")
    run.save("results.json", results)
    after = results["after"]
    if "loglik" in after:
        print(f"held-out response log-likelihood {after['loglik']:.4f}"
              + (f" (before training {before['loglik']:.4f})" if before else "") + f" over {after['n']} examples")
    if "mt_bench" in after:
        print(f"MT-Bench: {after['mt_bench']['questions']} questions answered in {after['mt_bench']['file']}; "
              f"judge them with FastChat (docs/instruct.md)")
    print(f"wrote {run.final('results.json')}")
    return results


# ----------------------------------------------------------------------------------------------------------
# Settings: the flags, completed from the recipe (and, for --eval_only, from the saved run), checked together.

def parse_args(argv=None):
    p = Parser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter,
               short_errors=True)
    p.add_argument("--recipe", choices=sorted(RECIPES), default="small",
                   help="defaults for unset flags (small; paper: Llama-2-7B; paper13b: Llama-2-13B)")
    p.add_argument("--method", choices=("unilora", "lora", "none"),
                   help="unilora (default), lora (baseline), none (evaluate the base model)")
    p.add_argument("--model", help="hub name or local folder (recipe)")
    p.add_argument("--quantize", choices=("nf4", "none"),
                   help="base linear layers in 4-bit NormalFloat (recipe: paper nf4, small none)")
    # data
    p.add_argument("--train_data", help="alpaca-clean (yahma/alpaca-cleaned from the hub) | path to .json/.jsonl\n"
                                        "with instruction, input, output | http(s) URL (recipe)")
    p.add_argument("--max_train_samples", type=count_or_all, help="use the first N training examples, or all")
    p.add_argument("--eval_size", type=nonnegative_int,
                   help="records of --train_data held out (seed 42, as the official split), never trained on;\n"
                        "0: train on all (recipe)")
    p.add_argument("--max_eval_samples", type=count_or_all, help="score the first N held-out examples, or all")
    p.add_argument("--data_dir", default=os.environ.get("UNILORA_DATA", str(Path.home() / ".cache/unilora/data")),
                   help="where downloaded data files are kept (env UNILORA_DATA)")
    p.add_argument("--source_max_len", type=positive_int,
                   help="tokens of BOS + prompt kept, from the start (recipe: 16, the official cut)")
    p.add_argument("--target_max_len", type=positive_int,
                   help="tokens of response + EOS kept, from the start (recipe: 512)")
    # optimisation
    add_training_flags(p, lr_help=f"peak learning rate (default per method: {DEFAULT_LR})",
                       seed_help="projection and LoRA init (recipe: 0, as the official run)", dropout=0.05,
                       grad_clip=0.3)
    p.add_argument("--data_seed", type=seed_number, help="the data order (recipe: 42, as the official run)")
    p.add_argument("--loss", choices=sorted(LOSSES),
                   help="\n".join(f"{k}: {v}" for k, v in LOSSES.items()) + "\n(recipe: micro, as the official "
                                                                            "run's transformers Trainer)")
    # precision
    add_precision_flags(p, "base weights: auto = bfloat16 on CUDA, float32 on CPU (recipe: small auto, paper\n"
                           "bfloat16 as the official --bf16)",
                        "autocast: auto = bf16 on CUDA (fp16 for float16 weights), none on CPU (recipe: small\n"
                        "auto, paper bf16)")
    # runs, checkpoints
    p.add_argument("--output_dir", help="run folder (default out/instruct-<method>; --eval_only: <load>/eval-N)")
    add_run_flags(p)  # --overwrite, --save_every, --resume, --eval_only
    p.add_argument("--load", help="a run folder written by this script (with --eval_only)")
    p.add_argument("--no_eval", action="store_true", help="train only")
    # evaluation: the held-out log-likelihood, MT-Bench
    p.add_argument("--mt_bench", metavar="download|FILE",
                   help="answer MT-Bench's questions into <run>/mt_bench_answers.jsonl: download FastChat's\n"
                        "question.jsonl, or a local file in its format (question_id, category, turns)")
    p.add_argument("--model_id", help="the model's name in the answer file (default: the run folder's name)")
    p.add_argument("--max_new_tokens", type=positive_int,
                   help=f"generation budget per MT-Bench turn (default {MAX_NEW_TOKENS}, FastChat's)")
    p.add_argument("--eval_batch_size", type=positive_int,
                   help="MT-Bench prompts decoded together by one copy, left-padded (recipe)")
    add_machine_flags(p)
    args = p.parse_args(argv)
    settle_eval_only(p, args, EVAL_ONLY_KEYS, SAVED)  # --eval_only: the saved run's settings
    complete(args, RECIPES[args.recipe], DEFAULT_LR, PER_METHOD)  # the method, then the recipe's values
    args.max_new_tokens = args.max_new_tokens or MAX_NEW_TOKENS
    args.model_id = args.model_id or Path(args.load or args.output_dir or f"out/{SCRIPT.folder}-{args.method}").name
    check_flag_combinations(args)
    return args


def check_flag_combinations(args):
    check_run_flags(args)  # --resume, --overwrite, --no_eval, the batch (recipes/causal_lm.py)
    named = args.train_data == "alpaca-clean" or re.match(r"https?://", args.train_data)
    if not named and not Path(args.train_data).expanduser().is_file():
        raise UserError(f"data file {args.train_data} does not exist (--train_data); pass a .json/.jsonl path, a "
                        f"URL, or alpaca-clean to download")
    if args.mt_bench not in (None, "download") and not Path(args.mt_bench).expanduser().is_file():
        raise UserError(f"--mt_bench {args.mt_bench}: no such file; pass FastChat's question.jsonl or download")
    if not args.train and not args.eval_size and not args.mt_bench:
        raise UserError("nothing to evaluate: hold out examples (--eval_size N) or answer MT-Bench (--mt_bench "
                        "download)")
    check_signs(args)


# ----------------------------------------------------------------------------------------------------------
# Model: the base model (NF4 or not), the official collator, the model's sampling settings.

def load_model(args, device):
    model_dir, tok, model = load_base(args, device, quantize=None if args.quantize == "none" else "nf4")
    collator = Collator(tok, args.source_max_len, args.target_max_len)
    print(f"model {args.model} ({sum(x.numel() for x in model.parameters()) / 1e6:.1f}M params) on {device}, "
          f"weights {args.dtype}{' (linear layers nf4)' if args.quantize == 'nf4' else ''}, autocast {args.amp}; "
          f"Alpaca prompts, sources cut to {args.source_max_len} tokens, targets to {args.target_max_len}")
    return tok, model, collator, read_generation_config(model_dir)


def add_pad_token(model, tok):
    """The official [PAD] (qlora_unilora.py: smart_tokenizer_and_embedding_resize, when the tokenizer has no pad
    token, as Llama-2's has none): a new id, the tokenizer's size, and a row for it in the embeddings and lm_head,
    each the mean of the tokenizer's rows (resize_token_embeddings keeps exactly the tokenizer's rows before it).
    Padding is masked and never a label, so the row changes one thing: every softmax has one more, small, term.
    Returns the new id."""
    new = tok.vocab_size

    def grown(weight):
        kept = weight.detach()[:new]
        mean = kept.mean(0, keepdim=True, dtype=torch.promote_types(kept.dtype, torch.float32))  # bf16: in fp32
        return nn.Parameter(torch.cat([kept, mean.to(kept.dtype)]), requires_grad=False)
    embed = model.model.embed_tokens
    embed.weight, embed.num_embeddings = grown(embed.weight), new + 1
    model.lm_head.weight = embed.weight if model.tied else grown(model.lm_head.weight)
    model.lm_head.out_features = new + 1
    print(f"the tokenizer has no pad token: [PAD] added as id {new}, its embedding and lm_head rows the mean of the "
          f"others (as the official run)")
    return new


# ----------------------------------------------------------------------------------------------------------
# Evaluation: the held-out responses' log-likelihood, MT-Bench's answers.

def evaluate(run, model, collator, items, questions, generation_config):
    """With the adapter in place, unmerged (an NF4 base cannot take B A exactly) and dropout off: the mean
    log-likelihood of the held-out responses (each response + EOS as trained, given its cut source), then every
    MT-Bench question answered, turn after turn, into mt_bench_answers.jsonl. Each copy takes its share."""
    args, ranks = run.args, run.ranks
    model.eval()
    out = {}
    if items:
        out["loglik"] = answer_loglik(model, items, args.pad_id, args.micro_batch_size, run.autocast, ranks)
        out["n"] = len(items)
    if questions:
        t0 = time.time()
        answers, ended = answer_questions(model, collator, questions, generation_config, pad_id=args.pad_id,
                                          max_new_tokens=args.max_new_tokens, batch_size=args.eval_batch_size,
                                          device=run.device, autocast=run.autocast, ranks=ranks)
        if ranks.main:
            write_answers(run.folder / "mt_bench_answers.jsonl", questions, answers, args.model_id)
        out["mt_bench"] = dict(file="mt_bench_answers.jsonl", questions=len(questions), model_id=args.model_id,
                               max_new_tokens=args.max_new_tokens, temperature=TEMPERATURE,
                               answers_at_length_limit=sum(why.count("length") for why in ended),
                               generate_seconds=round(time.time() - t0, 1))
    return out


if __name__ == "__main__":
    interrupt_on_sigterm()  # a job scheduler's time limit: the same clean-up and message as Ctrl-C
    with errors_as_exit():  # every copy meets it; the main copy says it
        main()
