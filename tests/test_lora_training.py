"""Training with --lora / --qlora: only adapters change, checkpoints hold only the adapters plus a pointer to the
base, resume continues bit-exactly, and the export loads back (peft_args)."""

from __future__ import annotations

import argparse
import json

import numpy as np
import pytest
import torch

from intro2llm.data.pretrain_dataset import PretrainDataset, ShardWriter
from intro2llm.model.causal_lm import CausalLM
from intro2llm.model.config import ModelConfig
from intro2llm.model.lora import lora_layers
from intro2llm.training import PretrainTrainer, TrainerConfig
from intro2llm.training.checkpoint import CheckpointError, latest_checkpoint, load_checkpoint
from intro2llm.training.peft_args import add_peft_args, apply_peft_args, export_model, load_adapted_model

VOCAB, BLOCK = 64, 16


def micro_model(seed=0):
    torch.manual_seed(seed)
    return CausalLM(ModelConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64))


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    path = tmp_path_factory.mktemp("shards")
    rng = np.random.default_rng(0)
    with ShardWriter(path, VOCAB, eos_token_id=0, shard_tokens=3000) as w:
        for _ in range(200):
            start = int(rng.integers(1, VOCAB))
            w.add([(start + i) % (VOCAB - 1) + 1 for i in range(int(rng.integers(10, 60)))])
    return path


@pytest.fixture(scope="module")
def base_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("base")
    micro_model().save_pretrained(path)
    return path


def parse(*argv):
    p = argparse.ArgumentParser()
    p.add_argument("--strategy", default="ddp")
    add_peft_args(p)
    return p.parse_args(list(argv))


def trainer(model, shards, out, steps=4):
    tc = TrainerConfig(steps=steps, batch_size=4, lr=1e-2, warmup_steps=0, schedule="constant", progress=False,
                       tensorboard=False, wandb=False, out_dir=str(out), precision="fp32", grad_clip=1.0)
    return PretrainTrainer(model, tc, PretrainDataset(shards, BLOCK, seed=0, vocab_size=VOCAB))


@pytest.mark.parametrize("flags", [("--lora", "4"), ("--qlora", "--lora", "4")], ids=["lora", "qlora"])
def test_only_adapters_train_and_checkpoints_hold_only_them(shards, base_dir, tmp_path, flags):
    model = apply_peft_args(CausalLM.from_pretrained(base_dir), parse(*flags), base=str(base_dir))
    frozen = {k: v.clone() for k, v in model.state_dict().items() if ".lora_" not in k}
    tr = trainer(model, shards, tmp_path / "run")
    hist = tr.train()
    assert hist[-1]["loss"] < hist[0]["loss"]
    for k, v in model.state_dict().items():
        if ".lora_" not in k:
            assert torch.equal(v, frozen[k]), k  # the base (fp32 or NF4 codes) never moves
    assert any(layer.lora_B.weight.abs().sum() > 0 for layer in lora_layers(model).values())
    ck = load_checkpoint(latest_checkpoint(tmp_path / "run" / "checkpoints"))
    assert ck.model_state and all(".lora_A." in k or ".lora_B." in k for k in ck.model_state)
    assert len(ck.model_state) == 2 * len(lora_layers(model))
    adapter = ck.trainer_state["adapter"]
    assert adapter["base_model_name_or_path"] == str(base_dir.resolve()) and adapter["r"] == 4
    assert (adapter["extra"]["qlora"] is not None) == ("--qlora" in flags)
    # the export: PEFT-layout adapters pointing at the base; loading them rebuilds the trained model
    export_model(model, tmp_path / "export")
    again = load_adapted_model(tmp_path / "export")
    ids = torch.randint(1, VOCAB, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(again.eval()(ids).logits, model.eval()(ids).logits)


def test_resume_from_adapter_checkpoint_is_bit_exact(shards, base_dir, tmp_path):
    args = parse("--lora", "4", "--lora-alpha", "16")

    def adapted(seed):  # A's Kaiming init draws from the global RNG, as the CLIs seed it before building
        torch.manual_seed(seed)
        return apply_peft_args(CausalLM.from_pretrained(base_dir), args, base=str(base_dir))

    full = trainer(adapted(0), shards, tmp_path / "full", steps=4)
    full.train()
    part = trainer(adapted(0), shards, tmp_path / "part", steps=2)
    part.train()
    resumed = trainer(adapted(1), shards, tmp_path / "part", steps=4)  # other init: the checkpoint must win
    assert resumed.resume(tmp_path / "part") == 2
    resumed.train()
    for (k, a), (_, b) in zip(full.raw_model.state_dict().items(), resumed.raw_model.state_dict().items()):
        assert torch.equal(a, b), k
    # a checkpoint of adapters does not resume into a model without them (and the error says what to do)
    plain = trainer(CausalLM.from_pretrained(base_dir), shards, tmp_path / "part", steps=4)
    with pytest.raises(CheckpointError, match="LoRA adapters.*same --lora/--qlora"):
        plain.resume(tmp_path / "part")


def test_bad_flags():
    from intro2llm.training.peft_args import peft_settings

    assert peft_settings(parse()) is None
    with pytest.raises(ValueError, match="--lora must be"):
        peft_settings(parse("--lora", "0"))
    assert peft_settings(parse("--lora", "4", "--strategy", "fsdp"))["r"] == 4  # FSDP takes adapters too
    with pytest.raises(ValueError, match="no linear layer matches"):
        apply_peft_args(micro_model(), parse("--lora", "4", "--lora-targets", "nope"))
    s = peft_settings(parse("--qlora"))
    assert s["r"] == 8 and s["alpha"] == 16 and s["qlora"] == {"double_quant": True, "compute_dtype": "fp32"}
    assert json.dumps(s)


def test_activation_checkpointing_flag_defaults_on_for_qlora_only():
    from intro2llm.training.peft_args import peft_settings

    assert peft_settings(parse("--qlora"))["activation_checkpointing"] is True  # the QLoRA recipe
    assert peft_settings(parse("--qlora", "--no-activation-checkpointing"))["activation_checkpointing"] is False
    assert peft_settings(parse("--lora", "4"))["activation_checkpointing"] is False
    assert peft_settings(parse("--lora", "4", "--activation-checkpointing"))["activation_checkpointing"] is True
    assert apply_peft_args(micro_model(), parse("--qlora", "--lora", "4")).gradient_checkpointing
    assert not apply_peft_args(micro_model(), parse("--qlora", "--no-activation-checkpointing")).gradient_checkpointing
    assert not apply_peft_args(micro_model(), parse("--lora", "4")).gradient_checkpointing
    assert apply_peft_args(micro_model(), parse("--activation-checkpointing")).gradient_checkpointing  # full FT
    assert not apply_peft_args(micro_model(), parse()).gradient_checkpointing
    with pytest.raises(ValueError, match="activation checkpointing.*Linear has no set_gradient_checkpointing"):
        apply_peft_args(torch.nn.Linear(4, 4), parse("--activation-checkpointing"))


# ---------------------------------------------------------------------------------------------------- the CLI
MICRO = {"vocab_size": 8, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2,
         "num_attention_heads": 4, "num_key_value_heads": 2, "max_position_embeddings": 64}


def cli_train(out, config, *extra, steps=3):
    from intro2llm.cli import main

    return main(["train", "--config", config, "--out", str(out), "--steps", str(steps), "--batch-size", "4",
                 "--seq-len", "16", "--synthetic-docs", "300", "--no-progress", "--no-tensorboard",
                 "--precision", "fp32", "--accuracy-samples", "0", "--warmup", "1", *extra])


def test_train_cli_lora_init_resume_and_errors(tmp_path, capsys):
    from safetensors.torch import load_file

    from intro2llm.model.lora import DEFAULT_TARGETS
    from intro2llm.training import peft_args

    assert peft_args.DEFAULT_TARGETS == DEFAULT_TARGETS
    config = tmp_path / "micro.json"
    config.write_text(json.dumps(MICRO))
    assert cli_train(tmp_path / "base", str(config), steps=2) == 0
    assert cli_train(tmp_path / "nobase", str(config), "--lora", "4") == 2
    assert "--init DIR" in capsys.readouterr().err
    out = tmp_path / "lora"
    assert cli_train(out, str(config), "--init", str(tmp_path / "base"), "--qlora", "--lora", "4", steps=2) == 0
    ck = load_checkpoint(latest_checkpoint(out / "checkpoints"))
    assert ck.model_state and all(".lora_" in k for k in ck.model_state)
    assert ck.trainer_state["adapter"]["base_model_name_or_path"] == str((tmp_path / "base").resolve())
    exported = load_file(str(out / "adapter_model.safetensors"))
    assert exported and all(k.startswith("base_model.model.") and ".lora_" in k for k in exported)
    assert not (out / "model.safetensors").exists()
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["r"] == 4 and json.loads((out / "qlora_config.json").read_text())["double_quant"] is True
    assert cli_train(out, str(config), "--init", str(tmp_path / "base"), "--qlora", "--lora", "4", "--resume",
                     steps=3) == 0
    assert latest_checkpoint(out / "checkpoints").name.endswith("3")
    model = load_adapted_model(out)
    assert len(lora_layers(model)) == 7 * MICRO["num_hidden_layers"]
    # the DPO command takes the same flags: adapters on the policy, the reference stays the full base
    from intro2llm.cli import main

    dpo = tmp_path / "dpo"
    assert main(["dpo", "--ckpt", str(tmp_path / "base"), "--lora", "2", "--steps", "1", "--batch-size", "2",
                 "--num-train", "8", "--accuracy-samples", "0", "--out", str(dpo), "--no-progress",
                 "--no-tensorboard"]) == 0
    ck = load_checkpoint(latest_checkpoint(dpo / "checkpoints"))
    assert ck.model_state and all(".lora_" in k for k in ck.model_state)
    assert json.loads((dpo / "adapter_config.json").read_text())["r"] == 2
