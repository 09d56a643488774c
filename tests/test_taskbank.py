"""taskbank.py: every row of a mixed batch equals the same row run alone with its task loaded (float64, a tiny
random RoBERTa with GLUE heads of different widths, a tiny random Llama, greedy generation with the KV cache),
per-task gradients of a mixed batch, the files a bank refuses, and what a task costs."""
import copy

import pytest
import torch
import torch.nn as nn

import unilora
from pretrained import decoder, encoder
from recipes.glue_model import GlueModel
from references import DECODERS, ROBERTA, decoder_weights, encoder_weights, save_model
from taskbank import TaskBank, load_tasks

torch.set_num_threads(1)
D_SMALL = 48


@pytest.fixture(scope="module")
def roberta(tmp_path_factory):
    return encoder.Encoder.from_pretrained(save_model(tmp_path_factory.mktemp("rob"), ROBERTA,
                                                      encoder_weights(ROBERTA, pooler=False)))


def glue(roberta, n_out, dtype=torch.float64):
    torch.manual_seed(0)
    return GlueModel(copy.deepcopy(roberta), n_out).to(dtype).eval()


def llama(dtype=torch.float64):
    c = DECODERS["llama-gqa-untied"]
    model = decoder.CausalLM(c)
    model.load_state_dict(decoder_weights(c), strict=False)
    return model.to(dtype).eval()


def trained_file(model, path, seed, p_seed=0, keep=("classifier",)):
    """A task as training would leave it: Uni-LoRA on `model` with its own theta_d and head, saved."""
    adapter = unilora.apply_unilora(model, d=D_SMALL, seed=p_seed, keep_trainable=list(keep))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in adapter.trained_tensors().values():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.3)
        adapter.theta_d.copy_(torch.randn(D_SMALL, generator=g, dtype=torch.float64))
    adapter.refresh()
    adapter.save(str(path))
    return str(path)


@pytest.fixture(scope="module")
def glue_tasks(roberta, tmp_path_factory):
    root = tmp_path_factory.mktemp("tasks")
    return {"pos": trained_file(glue(roberta, 2), root / "pos.pt", 1),
            "reg": trained_file(glue(roberta, 1), root / "reg.pt", 2),  # a regression head: one column
            "neg": trained_file(glue(roberta, 2), root / "neg.pt", 3)}


@pytest.fixture(scope="module")
def llama_tasks(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    return {name: trained_file(llama(), root / f"{name}.pt", seed, keep=()) for name, seed in (("a", 1), ("b", 2))}


IDS = torch.tensor([[0, 5, 6, 7, 2], [0, 9, 2, 1, 1], [0, 11, 12, 13, 2], [0, 8, 2, 1, 1], [0, 3, 4, 2, 1]])
MASK = (IDS != 1).long()


def alone(make, path):
    """The reference: a fresh model with one task loaded, as without a bank (None: the adapter at theta_d = 0,
    whose B A is exactly 0, and the first file's head)."""
    model = make()
    adapter = unilora.load_unilora(model, path)
    return model, adapter


def test_each_row_of_a_mixed_encoder_batch_equals_its_task_alone(roberta, glue_tasks):
    model = glue(roberta, 2)
    bank = load_tasks(model, glue_tasks)
    tasks = ["pos", "reg", None, "neg", "pos"]
    with torch.no_grad(), bank.rows(tasks):
        out = model(IDS, MASK, None)
    assert out.shape == (5, 2)
    for i, task in enumerate(tasks):
        width = 1 if task == "reg" else 2
        ref_model, adapter = alone(lambda: glue(roberta, width), glue_tasks[task or "pos"])
        if task is None:
            with torch.no_grad():
                adapter.theta_d.zero_()
            adapter.refresh()
        with torch.no_grad():
            ref = ref_model(IDS[i:i + 1, :int(MASK[i].sum())], MASK[i:i + 1, :int(MASK[i].sum())], None)[0]
        torch.testing.assert_close(out[i, :width], ref, rtol=0, atol=1e-12)
        assert bool(out[i, width:].isnan().all())  # past the row's own head: NaN, never a number
    # outside rows(): the model is the first file's task alone
    with torch.no_grad():
        plain = model(IDS, MASK, None)
        ref_model, _ = alone(lambda: glue(roberta, 2), glue_tasks["pos"])
        torch.testing.assert_close(plain, ref_model(IDS, MASK, None), rtol=0, atol=1e-12)


def test_each_row_of_a_mixed_decoder_batch_and_its_greedy_generation_equal_its_task_alone(llama_tasks):
    model = llama()
    bank = load_tasks(model, llama_tasks)
    ids = torch.tensor([[0, 0, 5, 9, 13], [3, 44, 6, 9, 10], [0, 7, 22, 31, 4]])  # left-padded rows
    mask = (ids != 0).long()
    tasks = ["b", None, "a"]
    with torch.no_grad(), bank.rows(tasks):
        logits = model(ids, mask)
        generated = model.generate(ids, mask, max_new_tokens=6, eos_token_id=[])
    for i, task in enumerate(tasks):
        ref_model, adapter = alone(llama, llama_tasks[task or "a"])
        if task is None:
            with torch.no_grad():
                adapter.theta_d.zero_()
            adapter.refresh()
        keep = mask[i].bool()
        with torch.no_grad():
            ref = ref_model(ids[i:i + 1, keep])[0]
            ref_tokens = ref_model.generate(ids[i:i + 1, keep], max_new_tokens=6, eos_token_id=[])[0]
        torch.testing.assert_close(logits[i, keep], ref, rtol=0, atol=1e-12)
        assert generated[i].tolist() == ref_tokens.tolist()
    assert generated[0].tolist() != generated[2].tolist()  # the tasks differ, so the check can fail


def test_a_mixed_training_batch_gives_each_task_exactly_its_own_rows_gradient(roberta, glue_tasks):
    model = glue(roberta, 2)
    bank = load_tasks(model, {"pos": glue_tasks["pos"], "neg": glue_tasks["neg"]})
    tasks = ["neg", "pos", "pos", "neg", "neg"]
    with bank.rows(tasks):
        out = model(IDS, MASK, None)
    weights = torch.arange(1.0, 11.0, dtype=torch.float64).view(5, 2)
    (out * weights).sum().backward()
    for task in ("pos", "neg"):
        ref_model, adapter = alone(lambda: glue(roberta, 2), glue_tasks[task])
        rows = [i for i, t in enumerate(tasks) if t == task]
        (ref_model(IDS[rows], MASK[rows], None) * weights[rows]).sum().backward()
        torch.testing.assert_close(bank.vectors[task].grad, adapter.theta_d.grad, rtol=0, atol=1e-12)
        for mine, ref in zip(bank.heads[task].parameters(), ref_model.classifier.parameters(), strict=True):
            torch.testing.assert_close(mine.grad, ref.grad, rtol=0, atol=1e-12)
    assert all(p.grad is None for p in model.encoder.parameters())  # the base stays frozen


def test_tasks_train_from_scratch_in_one_bank_and_save_as_ordinary_adapters(llama_tasks, tmp_path):
    model = llama()
    bank = TaskBank(model, unilora.apply_unilora(model, d=D_SMALL, seed=0))
    bank.add("x")
    bank.add("y")
    opt = torch.optim.SGD(bank.parameters(), lr=0.5)
    ids = torch.tensor([[5, 9, 13, 7], [3, 44, 6, 9]])
    with bank.rows(["x", "y"]):
        logits = model(ids)
    (logits[0, :, 3].sum() - logits[1, :, 3].sum()).backward()  # opposite goals for the two tasks
    opt.step()
    assert not torch.equal(bank.vectors["x"], bank.vectors["y"])
    bank.save("y", str(tmp_path / "y.pt"))
    fresh, _ = alone(llama, str(tmp_path / "y.pt"))
    with torch.no_grad(), bank.rows(["y", "x"]):
        mixed = model(ids)
    torch.testing.assert_close(mixed[0], fresh(ids[:1])[0].detach(), rtol=0, atol=1e-12)
    with pytest.raises(FileExistsError):
        bank.save("y", str(tmp_path / "y.pt"))


def test_a_task_costs_its_vector_and_head_and_never_touches_the_base(roberta, glue_tasks):
    model = glue(roberta, 2, dtype=torch.float32)
    bank = load_tasks(model, {"pos": glue_tasks["pos"]})
    base = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = sum(t.numel() * t.element_size() for t in bank.state_dict().values())
    bank.add("reg", glue_tasks["reg"])
    added = sum(t.numel() * t.element_size() for t in bank.state_dict().values()) - before
    head = sum(p.numel() for p in glue(roberta, 1).classifier.parameters())
    assert added == bank.nbytes("reg") == 4 * D_SMALL + 4 * head
    bank.remove("reg")
    assert bank.names() == ["pos"]
    assert all(torch.equal(p, base[n]) for n, p in model.named_parameters() if n in base)


def test_files_that_cannot_share_the_bank_are_refused_by_name(roberta, glue_tasks, tmp_path):
    other_p = trained_file(glue(roberta, 2), tmp_path / "other.pt", 4, p_seed=5)
    model = glue(roberta, 2)
    fingerprints = [unilora.read_adapter_file(f)[0]["fingerprint"] for f in (other_p, glue_tasks["pos"])]
    with pytest.raises(ValueError, match=rf"other.pt \(fingerprint {fingerprints[0]}\) cannot join a bank with "
                                         rf".*pos.pt \(fingerprint {fingerprints[1]}\): seed differs \(5 vs 0\)"):
        load_tasks(model, {"pos": glue_tasks["pos"], "other": other_p})
    assert not any(isinstance(m, unilora.AdaptedLinear) for m in model.modules())  # as it was
    bank = load_tasks(model, {"pos": glue_tasks["pos"]})
    with pytest.raises(ValueError, match="seed differs"):
        bank.add("other", other_p)
    with pytest.raises(ValueError, match="in the bank already"):
        bank.add("pos", glue_tasks["pos"])
    with pytest.raises(KeyError, match=r"no task 'nope' in the bank \(tasks: pos\)"):
        with bank.rows(["pos", "nope"]):
            pass
    with pytest.raises(ValueError, match="was given 2 tasks, but an adapted layer sees a batch of 5 rows"):
        with bank.rows(["pos", None]):
            model(IDS, MASK, None)
    assert "forward" not in vars(model.classifier)  # restored after the error


def test_a_head_that_may_mix_rows_is_refused_at_load(roberta, tmp_path):
    model = glue(roberta, 2)
    model.classifier = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 2)).double()
    path = trained_file(model, tmp_path / "bn.pt", 1)
    fresh = glue(roberta, 2)
    fresh.classifier = nn.Sequential(nn.Linear(16, 16), nn.BatchNorm1d(16), nn.Linear(16, 2)).double()
    with pytest.raises(ValueError, match=r"'classifier.1' is a BatchNorm1d, which a bank cannot apply per row"):
        load_tasks(fresh, {"bn": path})
    assert not any(isinstance(m, unilora.AdaptedLinear) for m in fresh.modules())


def test_bf16_mixed_rows_follow_their_tasks(llama_tasks):
    model = llama(torch.bfloat16)
    bank = load_tasks(model, llama_tasks)
    ids = torch.tensor([[5, 9, 13, 7], [3, 44, 6, 9]])
    bank.to(torch.bfloat16)  # as model.to(bf16): theta_d stays fp32 (optimizer state), heads would be cast
    assert all(v.dtype == torch.float32 for v in bank.vectors.values())
    with torch.no_grad(), bank.rows(["a", "b"]):
        mixed = model(ids).float()
    for i, task in enumerate(("a", "b")):
        ref_model, _ = alone(lambda: llama(torch.bfloat16), llama_tasks[task])
        with torch.no_grad():
            torch.testing.assert_close(mixed[i], ref_model(ids[i:i + 1])[0].float(), rtol=0, atol=0.05)


def test_any_task_name_and_a_p_of_another_kind(tmp_path):
    """Task names are the user's (even "keys" or "train", nn.Module's own names); a P other than the paper's is
    passed as to load_unilora."""
    from projections import PROJECTIONS

    def net():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 8), nn.ReLU(), nn.Linear(8, 3)).double()
    model = net()
    unilora.apply_unilora(model, d=16, targets=["0"], seed=0, projection=PROJECTIONS["local"]).save(str(tmp_path / "l.pt"))
    with pytest.raises(ValueError, match="trained with the 'local' projection"):
        load_tasks(net(), {"keys": str(tmp_path / "l.pt")})
    bank = load_tasks(net(), {"keys": str(tmp_path / "l.pt")}, projection=PROJECTIONS["local"])
    bank.add("train", str(tmp_path / "l.pt"))
    assert bank.names() == ["keys", "train"] and set(bank.vectors) == {"keys", "train"}
    x = torch.randn(3, 8, dtype=torch.float64)
    with torch.no_grad(), bank.rows(["train", None, "keys"]):
        out = bank.model(x)
    torch.testing.assert_close(out[[0, 2]], model(x)[[0, 2]].detach(), rtol=0, atol=1e-12)


def test_each_present_task_builds_its_a_and_b_once_per_pass(llama_tasks):
    model = llama()
    bank = load_tasks(model, llama_tasks)
    calls = []
    hook = bank.adapter.shared.projection.register_forward_hook(lambda m, args, out: calls.append(args[0]))
    ids = torch.tensor([[5, 9, 13, 7], [3, 44, 6, 9], [1, 2, 3, 4]])
    with bank.rows(["a", "b", "a"]):
        model(ids).sum().backward()  # training: a fresh graph per pass
    assert len(calls) == 2 and {id(c) for c in calls} == {id(bank.vectors["a"]), id(bank.vectors["b"])}
    assert all(not bank._task(t).shared._cache for t in "ab")  # after the block: 4d bytes a task, no (A, B) kept
    hook.remove()
