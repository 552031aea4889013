"""zowarmup.hf: ZOTrainer / ZOTrainingArguments against an independent MeZO-style loop, gradient
accumulation as a larger batch, bit-identical resume, PEFT/LoRA, evaluation and logging, and the
argument checks. Models are built from configs (random init, nothing downloaded)."""
import copy
import math

import pytest
import torch

transformers = pytest.importorskip(
    "transformers", reason="zowarmup.hf needs transformers: pip install -e '.[hf]'")

import zo_kernels  # noqa: E402
from zowarmup.seeds import sample_seeds  # noqa: E402

from zowarmup.hf import ZOTrainer, ZOTrainingArguments  # noqa: E402

VOCAB, SEQ = 64, 8


def tiny_opt(dropout=0.0, seed=0):
    from transformers import OPTConfig, OPTForCausalLM
    torch.manual_seed(seed)
    cfg = OPTConfig(vocab_size=VOCAB, hidden_size=16, ffn_dim=32, num_hidden_layers=2,
                    num_attention_heads=2, max_position_embeddings=32, word_embed_proj_dim=16,
                    dropout=dropout, attention_dropout=0.0, activation_dropout=0.0,
                    pad_token_id=1, bos_token_id=2, eos_token_id=2)
    return OPTForCausalLM(cfg)


class Tokens(torch.utils.data.Dataset):
    def __init__(self, n, seed=0):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (n, SEQ), generator=g)

    def __len__(self):
        return self.ids.shape[0]

    def __getitem__(self, i):
        return {"input_ids": self.ids[i], "labels": self.ids[i]}


def args(tmp_path, **kw):
    base = dict(output_dir=str(tmp_path / "out"), report_to="none", disable_tqdm=True,
                learning_rate=1e-2, lr_scheduler_type="constant", per_device_train_batch_size=4,
                max_steps=3, logging_steps=1, save_strategy="no", seed=0, zo_eps=1e-3,
                zo_num_samples=2, zo_scale=1.0, use_cpu=True, dataloader_num_workers=0)
    base.update(kw)
    return ZOTrainingArguments(**base)


def bits(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


# -- an independent reference: MeZO's loop over copies, noise materialized --------------------------
def mezo_reference(model, batch, order, steps, lr, eps, scale, S, seed, wd_of=lambda n: 0.0):
    """``steps`` SPSA steps of ``model`` (a copy is trained) on the same full batch every step,
    losses evaluated on perturbed copies of the weights (torch.func.functional_call), noise
    materialized with zo_kernels.noise at each parameter's offset in ``order`` (names)."""
    from torch.func import functional_call
    model = copy.deepcopy(model).eval()
    params = dict(model.named_parameters())
    w = {n: params[n].detach().clone() for n in order}
    offs = dict(zip(order, zo_kernels.offsets([w[n] for n in order])))

    def z(s, n):
        return zo_kernels.noise(s, w[n].numel(), offset=offs[n]).reshape(w[n].shape)

    def loss_at(d):
        with torch.no_grad():
            return float(functional_call(model, d, (), dict(batch)).loss)
    for t in range(steps):
        seeds = sample_seeds(seed, t, S)
        grads = []
        for s in seeds:
            lp = loss_at({n: w[n] + eps * scale * z(s, n) for n in order})
            lm = loss_at({n: w[n] - eps * scale * z(s, n) for n in order})
            grads.append((lp - lm) / (2 * eps))
        for n in order:
            upd = sum(-lr * scale * g / S * z(s, n) for s, g in zip(seeds, grads))
            w[n] = w[n] * (1 - lr * wd_of(n)) + upd
    return w


def test_zo_trainer_matches_the_mezo_loop_and_keeps_no_gradient_state(tmp_path):
    model = tiny_opt()
    ref_model = copy.deepcopy(model)
    data = Tokens(4)
    a = args(tmp_path, weight_decay=0.1, zo_eps=1e-2)
    tr = ZOTrainer(model=model, args=a, train_dataset=data)
    tr.train()
    zo = tr.zo_optimizer
    order = [n for g in zo.param_groups for n, p in model.named_parameters()
             if any(p is q for q in g["params"])]
    assert sorted(order) == sorted(n for n, _ in model.named_parameters())
    decayed = {n for n, p in model.named_parameters()
               if any(p is q for q in zo.param_groups[0]["params"])}
    assert decayed and "model.decoder.final_layer_norm.weight" not in decayed
    batch = {"input_ids": data.ids, "labels": data.ids}  # every step sees the whole dataset
    want = mezo_reference(ref_model, batch, order, 3, 1e-2, 1e-2, 1.0, 2, 0,
                          wd_of=lambda n: 0.1 if n in decayed else 0.0)
    # the loss differences are rounded (shuffled rows, in-place perturbation): tolerance 1e-5,
    # far below how far the weights moved
    moved = max(float((p - q).detach().abs().max()) for p, q in
                zip(model.parameters(), ref_model.parameters()))
    assert moved > 1e-3
    for n, p in model.named_parameters():
        torch.testing.assert_close(p.detach(), want[n], rtol=0, atol=1e-5)
    # no gradient or moment exists
    assert all(p.grad is None for p in model.parameters())
    sd = zo.state_dict()
    assert sd["state"] == {} and sd["zo"]["step"] == 3 and sd["zo"]["seed"] == 0
    losses = [h["loss"] for h in tr.state.log_history if "loss" in h]
    assert len(losses) == 3 and all(math.isfinite(x) for x in losses)


def test_gradient_accumulation_is_one_perturbation_over_a_larger_batch(tmp_path):
    """batch 2 x 2 accumulation steps == batch 4: the same weights (up to summation rounding),
    the same as the reference on the whole batch, and the closure evaluates each micro-batch
    2S times per step."""
    data = Tokens(4)
    out = {}
    calls = {}
    for name, bs, ga in (("big", 4, 1), ("accum", 2, 2)):
        model = tiny_opt()
        tr = ZOTrainer(model=model, args=args(tmp_path / name, per_device_train_batch_size=bs,
                                              gradient_accumulation_steps=ga, max_steps=2,
                                              zo_eps=1e-2),
                       train_dataset=data)
        n = {"fwd": 0}
        orig = tr.compute_loss

        def counting(*a, _orig=orig, _n=n, **k):
            _n["fwd"] += 1
            return _orig(*a, **k)
        tr.compute_loss = counting
        tr.train()
        out[name], calls[name] = bits(model), n["fwd"]
    assert calls["big"] == 2 * 2 * 2 and calls["accum"] == 2 * 2 * 2 * 2  # steps * 2S * micro
    # equal up to the rounding of the loss sums (amplified by 1 / 2eps), far below the movement
    init = bits(tiny_opt())
    assert max(float((out["big"][k] - init[k]).abs().max()) for k in init) > 1e-3
    for k in out["big"]:
        torch.testing.assert_close(out["accum"][k], out["big"][k], rtol=0, atol=1e-5)
    ref = tiny_opt()
    tr = ZOTrainer(model=tiny_opt(), args=args(tmp_path / "o"), train_dataset=data)
    tr.create_optimizer()
    names = {id(p): n for n, p in tr.model.named_parameters()}
    order = [names[id(p)] for g in tr.zo_optimizer.param_groups for p in g["params"]]
    want = mezo_reference(ref, {"input_ids": data.ids, "labels": data.ids}, order, 2, 1e-2,
                          1e-2, 1.0, 2, 0)
    for k in out["accum"]:
        torch.testing.assert_close(out["accum"][k], want[k], rtol=0, atol=1e-5)


def test_resume_from_checkpoint_continues_bit_identically(tmp_path):
    """Shuffled data, dropout on, linear schedule with warm-up, weight decay: 6 steps straight
    equal 3 steps + save + a new process-like trainer resuming from the checkpoint."""
    data = Tokens(8, seed=3)
    kw = dict(per_device_train_batch_size=2, max_steps=6, learning_rate=5e-3,
              lr_scheduler_type="linear", warmup_steps=2, weight_decay=0.05, save_strategy="steps",
              save_steps=3, zo_num_samples=1)
    straight = tiny_opt(dropout=0.1)
    ZOTrainer(model=straight, args=args(tmp_path / "a", **kw), train_dataset=data).train()
    first = tiny_opt(dropout=0.1)
    ZOTrainer(model=first, args=args(tmp_path / "b", **dict(kw, max_steps=6)),
              train_dataset=data).train()
    # resume a fresh model (different init: everything must come from the checkpoint)
    resumed = tiny_opt(dropout=0.1, seed=99)
    tr = ZOTrainer(model=resumed, args=args(tmp_path / "b", **kw), train_dataset=data)
    tr.train(resume_from_checkpoint=str(tmp_path / "b" / "out" / "checkpoint-3"))
    assert tr.state.global_step == 6 and tr.zo_optimizer.step_count == 6
    for (n, p), q in zip(straight.named_parameters(), resumed.parameters()):
        assert torch.equal(p, q), n
    for p, q in zip(straight.parameters(), first.parameters()):
        assert torch.equal(p, q)
    assert not torch.equal(straight.lm_head.weight, tiny_opt(dropout=0.1).lm_head.weight)


def test_lora_perturbs_only_the_adapters_and_never_writes_frozen_weights(tmp_path):
    peft = pytest.importorskip("peft", reason="LoRA needs peft: pip install -e '.[hf]'")
    base = tiny_opt()
    model = peft.get_peft_model(base, peft.LoraConfig(r=2, lora_alpha=4, lora_dropout=0.0,
                                                       target_modules=["q_proj", "v_proj"],
                                                       init_lora_weights=False))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    train = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    assert frozen and train
    writes = []
    orig = zo_kernels.apply_seeds_

    def spy(tensors, *a, **k):
        ts = tensors if isinstance(tensors, (list, tuple)) else [tensors]
        writes.extend(t.data_ptr() for t in ts)
        return orig(tensors, *a, **k)
    import zowarmup.optim.optimizer as optmod
    optmod.zo_kernels.apply_seeds_ = spy
    try:
        tr = ZOTrainer(model=model, args=args(tmp_path, max_steps=2), train_dataset=Tokens(4))
        tr.train()
    finally:
        optmod.zo_kernels.apply_seeds_ = orig
    for n, p in model.named_parameters():
        if not p.requires_grad:
            assert torch.equal(p, frozen[n]), n
            assert p.data_ptr() not in writes, n
    assert any(not torch.equal(p, train[n]) for n, p in model.named_parameters()
               if p.requires_grad)
    assert len(tr.zo_optimizer.param_groups[0]["params"]) + sum(
        len(g["params"]) for g in tr.zo_optimizer.param_groups[1:]) == len(train)


def test_evaluation_logging_and_the_lr_schedule(tmp_path):
    model = tiny_opt()
    tr = ZOTrainer(model=model, args=args(tmp_path, max_steps=4, lr_scheduler_type="linear",
                                          eval_strategy="steps", eval_steps=2),
                   train_dataset=Tokens(4), eval_dataset=Tokens(4, seed=5))
    tr.train()
    hist = tr.state.log_history
    lrs = [h["learning_rate"] for h in hist if "learning_rate" in h]
    assert lrs == pytest.approx([1e-2, 7.5e-3, 5e-3, 2.5e-3])
    assert sum("eval_loss" in h for h in hist) == 2
    ev = tr.evaluate()
    assert math.isfinite(ev["eval_loss"])


def test_bad_arguments_fail_with_one_line_errors(tmp_path):
    for kw, match in ((dict(zo_eps=0.0), "zo_eps"), (dict(zo_num_samples=0), "zo_num_samples"),
                      (dict(zo_dist="uniform"), "zo_dist"), (dict(zo_seed=-1), "zo_seed"),
                      (dict(zo_scale=float("nan")), "zo_scale"),
                      (dict(max_grad_norm=1.0), "max_grad_norm"), (dict(fp16=True), "fp16")):
        with pytest.raises(ValueError, match=match) as e:
            args(tmp_path, **kw)
        assert "\n" not in str(e.value)
    plain = transformers.TrainingArguments(output_dir=str(tmp_path / "p"), report_to="none")
    with pytest.raises(TypeError, match="ZOTrainingArguments"):
        ZOTrainer(model=tiny_opt(), args=plain, train_dataset=Tokens(4))
    with pytest.raises(TypeError, match="optimizers"):
        m = tiny_opt()
        ZOTrainer(model=m, args=args(tmp_path), train_dataset=Tokens(4),
                  optimizers=(torch.optim.SGD(m.parameters(), lr=0.1), None))


def test_exact_mode_keeps_bf16_weights_from_drifting(tmp_path):
    """zo_exact=True with bfloat16 weights and lr = 0: after the steps the weights are bit for bit
    the initial ones; the in-place mode (the same run, zo_exact=False) has drifted."""
    moved = {}
    for exact in (False, True):
        model = tiny_opt().to(torch.bfloat16)
        w0 = bits(model)
        ZOTrainer(model=model, args=args(tmp_path / str(exact), learning_rate=0.0, zo_exact=exact,
                                         max_steps=4), train_dataset=Tokens(4)).train()
        moved[exact] = sum(int((p.detach() != w0[n]).sum()) for n, p in model.named_parameters())
    assert moved[True] == 0 and moved[False] > 0
