"""Optimizers and schedules: Muon's parameter groups, lr schedules' values, Muon training and resume, MFU.

    pytest tests/test_optim.py -q
"""

from __future__ import annotations

import math

import pytest
import torch
from pretrain_helpers import final_weights, read_events, recipe_dict, run_in_process, write_corpus

from llmkit.errors import RecipeError
from llmkit.recipes import recipe_from_dict
from llmkit.training.optim import MuonWithAdamW, hidden_matrices, lr_multiplier, make_optimizer


def _train_cfg(**overrides):
    base = {"stage": "pretrain", "output_dir": "x", "tokenizer": "t", "model": {"type": "llama"}, "data": {"train": "a.txt"},
            "train": {"max_steps": 10, "optimizer": "muon", **overrides}}
    return recipe_from_dict(base, stage="pretrain").train


# ----------------------------------------------------------------------------------------------
# Schedules
# ----------------------------------------------------------------------------------------------


def _lr(step, schedule, max_steps=100, warmup=10, min_ratio=0.1, decay_fraction=0.2):
    return lr_multiplier(step, warmup_steps=warmup, max_steps=max_steps, schedule=schedule, min_ratio=min_ratio, decay_fraction=decay_fraction)


@pytest.mark.parametrize("schedule", ["cosine", "linear", "constant", "wsd"])
def test_warmup_is_linear_and_reaches_the_peak_at_its_last_step(schedule):
    assert _lr(0, schedule) == pytest.approx(0.1)
    assert _lr(4, schedule) == pytest.approx(0.5)
    assert _lr(9, schedule) == pytest.approx(1.0)  # the last warmup step trains at the peak


def test_cosine_linear_and_constant_values():
    # After warmup, progress p = (step - 10) / 90 runs from 0 at step 10 towards 1 at max_steps.
    assert _lr(10, "cosine") == pytest.approx(1.0)
    assert _lr(55, "cosine") == pytest.approx(0.1 + 0.9 * 0.5)  # p = 0.5: half way between peak and min
    assert _lr(99, "cosine") == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 89 / 90)))
    assert _lr(100, "cosine") == pytest.approx(0.1)
    assert _lr(10, "linear") == pytest.approx(1.0)
    assert _lr(55, "linear") == pytest.approx(0.55)
    assert _lr(99, "linear") == pytest.approx(0.1 + 0.9 / 90)
    assert _lr(100, "linear") == pytest.approx(0.1)
    assert {_lr(s, "constant") for s in (10, 55, 99, 150)} == {1.0}


def test_wsd_holds_the_peak_then_decays_as_one_minus_sqrt():
    # 100 steps, decay_fraction 0.2: steps 80..99 decay, step 80 is the first of them (p = 0).
    assert [_lr(s, "wsd") for s in (10, 40, 79)] == [1.0, 1.0, 1.0]  # warmup end, plateau, last plateau step
    assert _lr(80, "wsd") == pytest.approx(1.0)  # decay start
    assert _lr(85, "wsd") == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(5 / 20)))
    assert _lr(90, "wsd") == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(0.5)))
    assert _lr(99, "wsd") == pytest.approx(0.1 + 0.9 * (1 - math.sqrt(19 / 20)))  # the last step
    assert _lr(100, "wsd") == pytest.approx(0.1)
    values = [_lr(s, "wsd") for s in range(80, 101)]
    assert values == sorted(values, reverse=True)
    # decay steps are rounded: 0.25 x 10 = 2.5 -> 2, so steps 8 and 9 decay
    assert [round(_lr(s, "wsd", max_steps=10, warmup=0, min_ratio=0.0, decay_fraction=0.25), 6) for s in (7, 8, 9)] == [
        1.0, 1.0, round(1 - math.sqrt(0.5), 6)]


def test_wsd_warmup_overlapping_the_decay_is_refused():
    with pytest.raises(RecipeError, match=r"train.warmup_steps \(9\) \+ the wsd decay \(2 steps"):
        _train_cfg(schedule="wsd", warmup_steps=9)
    assert _train_cfg(schedule="wsd", warmup_steps=8).decay_fraction == 0.2


# ----------------------------------------------------------------------------------------------
# Parameter groups
# ----------------------------------------------------------------------------------------------


def _names(model, params) -> set[str]:
    by_id = {id(p): n for n, p in model.named_parameters()}
    return {by_id[id(p)] for p in params}


@pytest.mark.parametrize("tied", [True, False])
def test_muon_gets_llamas_attention_and_mlp_matrices_and_adamw_the_rest(tied):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=40, num_hidden_layers=2, num_attention_heads=2,
                         num_key_value_heads=1, tie_word_embeddings=tied)
    model = LlamaForCausalLM(config)
    optimizer = make_optimizer(model, _train_cfg(weight_decay=0.1, muon_weight_decay=0.02))
    assert isinstance(optimizer, MuonWithAdamW)
    hidden = {f"model.layers.{i}.{m}.weight" for i in range(2)
              for m in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")}
    assert set(hidden_matrices(model)) == hidden and not any(hidden_matrices(model).values())
    (muon_group,) = optimizer.muon.param_groups  # nn.Linear only: one lr
    assert _names(model, muon_group["params"]) == hidden
    assert muon_group["lr"] == 0.02 and muon_group["weight_decay"] == 0.02 and muon_group["momentum"] == 0.95
    assert muon_group["nesterov"] is True and muon_group["adjust_lr_fn"] == "original"
    decay, plain = optimizer.adamw.param_groups if not tied else ({"params": []}, *optimizer.adamw.param_groups)
    assert _names(model, decay["params"]) == (set() if tied else {"lm_head.weight"})
    norms = {n for n, p in model.named_parameters() if p.ndim == 1}
    assert _names(model, plain["params"]) == norms | {"model.embed_tokens.weight"} and plain["weight_decay"] == 0.0
    assert optimizer.param_groups[0]["lr"] == 3e-4  # AdamW's groups come first: the logged lr is train.lr's
    every = [p for g in optimizer.param_groups for p in g["params"]]
    assert len(every) == len(set(map(id, every))) == len(list(model.parameters()))


def test_muon_gets_gpt2s_conv1d_matrices_with_lr_read_as_out_by_in():
    from torch.optim._muon import _adjust_lr
    from transformers import GPT2Config, GPT2LMHeadModel

    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=32, n_embd=16, n_layer=2, n_head=2))
    optimizer = make_optimizer(model, _train_cfg(muon_lr=0.04, muon_weight_decay=0.01))
    hidden = {f"transformer.h.{i}.{m}.weight" for i in range(2) for m in ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")}
    assert hidden_matrices(model) == dict.fromkeys(hidden, True)  # Conv1D: stored [in, out]; c_attn fused q|k|v
    params = dict(model.named_parameters())
    groups = {n: g for g in optimizer.muon.param_groups for n in _names(model, g["params"])}
    assert set(groups) == hidden
    for name in hidden:
        rows, cols = params[name].shape  # [in, out]
        group = groups[name]
        # torch scales the update by its reading of the shape; the group's lr makes that equal the
        # [out, in] reading, and the decay per step (lr x weight_decay) stays muon_lr x muon_weight_decay.
        assert _adjust_lr(group["lr"], None, params[name].shape) == pytest.approx(_adjust_lr(0.04, None, (cols, rows)))
        assert group["lr"] * group["weight_decay"] == pytest.approx(0.04 * 0.01)
    assert groups["transformer.h.0.attn.c_attn.weight"]["lr"] == pytest.approx(0.04 * math.sqrt(3))
    assert groups["transformer.h.0.mlp.c_fc.weight"]["lr"] == pytest.approx(0.04 * 2)
    assert groups["transformer.h.0.mlp.c_proj.weight"]["lr"] == pytest.approx(0.04 / 2)
    assert groups["transformer.h.0.attn.c_proj.weight"]["lr"] == pytest.approx(0.04)
    adamw = {n for g in optimizer.adamw.param_groups for n in _names(model, g["params"])}
    assert adamw == set(params) - hidden  # wte (tied with lm_head), wpe, layer norms, every bias
    assert {"transformer.wte.weight", "transformer.wpe.weight", "transformer.h.0.attn.c_attn.bias"} <= adamw


def test_lora_with_muon_is_refused():
    recipe = {"stage": "finetune", "output_dir": "x", "model": {"path": "m"}, "task": {"type": "text"}, "data": {"train": "a.jsonl"},
              "train": {"max_steps": 1, "optimizer": "muon"}, "lora": {"enabled": True}}
    with pytest.raises(RecipeError, match="train.optimizer: muon .* use train.optimizer: adamw with lora.enabled"):
        recipe_from_dict(recipe, stage="finetune")


def test_muon_state_dict_round_trips_through_weights_only_load(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                         num_attention_heads=2, num_key_value_heads=2))
    optimizer = make_optimizer(model, _train_cfg())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 0.5 ** step)
    ids = torch.randint(0, 64, (2, 8))
    model(input_ids=ids, labels=ids).loss.backward()
    optimizer.step()
    scheduler.step()
    torch.save(optimizer.state_dict(), tmp_path / "optimizer.pt")
    again = make_optimizer(model, _train_cfg())
    again_scheduler = torch.optim.lr_scheduler.LambdaLR(again, lambda step: 0.5 ** step)
    again.load_state_dict(torch.load(tmp_path / "optimizer.pt", weights_only=True))
    again_scheduler.load_state_dict(scheduler.state_dict())
    again_scheduler.step()  # the schedule reaches the reloaded inner optimizers' groups
    assert [g["lr"] for g in again.adamw.param_groups + again.muon.param_groups] == pytest.approx([3e-4 / 4, 3e-4 / 4, 0.02 / 4])
    buffers = [again.muon.state[p]["momentum_buffer"] for p in again.muon.param_groups[0]["params"]]
    assert all(b.abs().sum() > 0 for b in buffers) and len(again.state) == len(list(model.parameters()))
    # The joined state reads each parameter from its own optimizer, and reading plants nothing in the other.
    hidden = again.muon.param_groups[0]["params"]
    assert all(again.state.get(p, {}).get("momentum_buffer") is again.muon.state[p]["momentum_buffer"] for p in hidden)
    assert len(again.adamw.state) == len(list(model.parameters())) - len(hidden)
    with pytest.raises(ValueError, match="not a Muon \\+ AdamW optimizer state"):
        again.load_state_dict(torch.optim.AdamW(model.parameters()).state_dict())


# ----------------------------------------------------------------------------------------------
# Training with Muon
# ----------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    return write_corpus(tmp_path_factory.mktemp("optim-corpus"), docs=24)


def _muon_recipe(tmp_path, tokenizer_dir, corpus, name, **train):
    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus, train={"optimizer": "muon", "schedule": "constant", **train})
    recipe["output_dir"] = str(tmp_path / name)
    return recipe


def test_muon_trains_a_tiny_model_and_its_loss_falls(tmp_path, tokenizer_dir, corpus, capsys):
    run_in_process(_muon_recipe(tmp_path, tokenizer_dir, corpus, "muon", max_steps=24, log_every=4, save_every=100))
    losses = [e["loss"] for e in read_events(tmp_path / "muon", "train")]
    assert losses[-1] < losses[0] - 0.5, losses
    out = capsys.readouterr().out
    assert "optimizer:        Muon on 14 hidden matrices" in out and "AdamW on 6 other tensors" in out


def test_resume_with_muon_is_bit_identical(tmp_path, tokenizer_dir, corpus):
    straight = _muon_recipe(tmp_path, tokenizer_dir, corpus, "straight", max_steps=12, save_every=6)
    run_in_process(straight)
    split = _muon_recipe(tmp_path, tokenizer_dir, corpus, "split", max_steps=6, save_every=6)
    run_in_process(split)
    split["train"]["max_steps"] = 12  # a constant schedule does not depend on max_steps: same steps as straight
    summary = run_in_process(split)
    assert summary["resumed_from"] == 6
    saved = torch.load(tmp_path / "split" / "checkpoints" / "step-00000006" / "optimizer.pt", weights_only=True)
    assert set(saved) == {"adamw", "muon"}
    a, b = final_weights(tmp_path / "straight"), final_weights(tmp_path / "split")
    assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a)


def test_muon_under_fsdp_is_refused_before_writing(tmp_path, tokenizer_dir, corpus, monkeypatch):
    # What `accelerate launch --config_file recipes/accelerate/fsdp.yaml --num_processes 2` sets; the
    # refusal comes before any process group or data (a real 2-process launch: tests/test_sharded.py).
    for name, value in {"ACCELERATE_USE_FSDP": "true", "FSDP_VERSION": "2", "WORLD_SIZE": "2"}.items():
        monkeypatch.setenv(name, value)
    with pytest.raises(RecipeError, match="muon orthogonalizes whole weight matrices, which FSDP2 shards"):
        run_in_process(_muon_recipe(tmp_path, tokenizer_dir, corpus, "fsdp"))
    assert not (tmp_path / "fsdp").exists()


# ----------------------------------------------------------------------------------------------
# MFU
# ----------------------------------------------------------------------------------------------


def _short(tmp_path, tokenizer_dir, corpus, name):
    recipe = recipe_dict(tmp_path, tokenizer_dir, corpus, train={"max_steps": 4, "log_every": 1, "save_every": 100})
    recipe["output_dir"] = str(tmp_path / name)
    return recipe


def test_mfu_against_an_absurdly_low_given_peak_is_null_never_above_one(tmp_path, tokenizer_dir, corpus, monkeypatch, capsys):
    monkeypatch.setenv("LLMKIT_PEAK_FLOPS", "1")  # 1 FLOP/s: training outruns it at once
    summary = run_in_process(_short(tmp_path, tokenizer_dir, corpus, "given"))
    events = read_events(tmp_path / "given", "train")
    assert len(events) == 4 and all(e["mfu"] is None for e in events)  # respected, not raised; never > 1.0
    out = capsys.readouterr()
    assert "MFU against 1e-12 TFLOP/s (LLMKIT_PEAK_FLOPS)" in out.out  # the log names the peak's source
    assert (out.out + out.err).count("above the peak from LLMKIT_PEAK_FLOPS") == 1
    assert summary["peak_flops"] == 1.0 and summary["peak_source"] == "LLMKIT_PEAK_FLOPS"


def test_mfu_against_a_low_probe_is_clamped_to_one(tmp_path, tokenizer_dir, corpus, monkeypatch, capsys):
    from llmkit.training import loop
    from llmkit.training.hardware import Peak

    monkeypatch.setattr(loop, "peak_flops", lambda device, precision: Peak(1.0, "measured matmul peak on cpu, float32", "probe"))
    summary = run_in_process(_short(tmp_path, tokenizer_dir, corpus, "probe"))
    events = read_events(tmp_path / "probe", "train")
    assert all(0 < e["mfu"] <= 1.0 for e in events) and events[0]["mfu"] == 1.0  # the probe was raised to the first window
    assert summary["peak_flops"] > 1.0 and "(measured matmul peak on cpu, float32)" in capsys.readouterr().out


def test_mfu_on_a_cpu_is_unknown_not_a_clamped_number(tmp_path, tokenizer_dir, corpus, monkeypatch, capsys):
    # Report 2026-12-06 section 8: a CPU probe read too low and MFU sat at the 100% clamp.
    import torch

    from llmkit.training.hardware import peak_flops

    monkeypatch.delenv("LLMKIT_PEAK_FLOPS", raising=False)
    peak = peak_flops(torch.device("cpu"), "no")
    assert peak.flops is None and peak.kind == "unknown" and "LLMKIT_PEAK_FLOPS" in peak.description
    from llmkit.training import loop

    monkeypatch.setattr(loop, "peak_flops", lambda device, precision: peak)
    summary = run_in_process(_short(tmp_path, tokenizer_dir, corpus, "cpu"))
    events = read_events(tmp_path / "cpu", "train")
    assert events and all(e["mfu"] is None and e["tokens_per_s"] > 0 for e in events)
    out = capsys.readouterr()
    assert "MFU not reported (no known peak on a CPU" in out.out and "above the peak" not in out.out + out.err
    assert summary["peak_flops"] is None


def test_malformed_peak_flops_is_bad_input_and_writes_nothing(tmp_path, tokenizer_dir, corpus, monkeypatch):
    monkeypatch.setenv("LLMKIT_PEAK_FLOPS", "989 TFLOPS")
    with pytest.raises(RecipeError, match=r"LLMKIT_PEAK_FLOPS='989 TFLOPS': not a positive number of FLOP/s; write it like 989e12"):
        run_in_process(_short(tmp_path, tokenizer_dir, corpus, "bad-peak"))
    assert not (tmp_path / "bad-peak").exists()
