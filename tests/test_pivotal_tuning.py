"""Pivotal tuning: new tokens in every tokenizer, only their embedding rows trained until the pivot,
saved as <name>_emb.safetensors and loaded back by `sample --embeddings`; resume; SDXL's pooled
output at the end-of-text token when new tokens follow it in the vocabulary."""
import dataclasses
import os
import subprocess
import sys

import numpy as np
import mindspore as ms
import pytest
from safetensors.numpy import load_file

from mindscedit.cli import main
from mindscedit.errors import UserError
from mindscedit.models import load_components
from mindscedit.training.config import load_config
from mindscedit.training.trainer import Trainer
from mindscedit.tuners.textual_inversion import (
    ExtendedTokenEmbedding,
    NewTokens,
    add_new_tokens,
    new_rows_of,
    read_embeddings,
    save_embeddings,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CAT2 = os.path.join(REPO, "mindscedit", "assets", "cat2")
PROMPT = "a photo of TOK cat"


def test_each_abstraction_gets_its_own_numbered_tokens_and_whole_words_are_replaced():
    tokens = NewTokens.for_abstractions("TOK, SKS", 2)
    assert tokens.tokens == ["<s0>", "<s1>", "<s2>", "<s3>"]
    assert tokens.rewrite("TOK and SKS, not TOKEN or sks: (TOK)") == "<s0><s1> and <s2><s3>, not TOKEN or sks: (<s0><s1>)"
    assert tokens.mentioned_in("a <s2><s3> dog") and not tokens.mentioned_in("a TOKEN")


def test_the_extended_embedding_reads_old_ids_from_the_table_and_trains_only_the_new_rows():
    table = np.random.default_rng(0).standard_normal((10, 4)).astype(np.float32)
    base = ms.nn.Embedding(10, 4, embedding_table=ms.Tensor(table))
    base.embedding_table.requires_grad = False
    rows = np.full((2, 4), 7.0, np.float32)
    embedding = ExtendedTokenEmbedding(base, rows, "new")
    ids = ms.Tensor([[1, 10, 9, 11, 10]], ms.int32)
    out = embedding(ids).asnumpy()[0]
    np.testing.assert_array_equal(out[[0, 2]], table[[1, 9]])
    np.testing.assert_array_equal(out[[1, 3, 4]], rows[[0, 1, 0]])
    weights = ms.ParameterTuple([embedding.new_embeddings])

    def total(i):
        return embedding(i).sum()

    grad = ms.grad(total, grad_position=None, weights=weights)(ids)[0].asnumpy()
    np.testing.assert_array_equal(grad, [[2.0] * 4, [1.0] * 4])  # row 0 used twice, row 1 once


@pytest.fixture(scope="module")
def sd_components(tiny_model_dir):
    return load_components(tiny_model_dir)


def test_new_tokens_get_the_ids_after_the_vocabulary_and_leave_other_prompts_alone(tiny_model_dir):
    components = load_components(tiny_model_dir)
    encoder = components.family.prompt_encoder(components)
    tokenize = components.family.prompt_tokenizer(components)
    plain = tokenize("a photo of a cat")
    before = encoder(ms.Tensor(plain[None])).asnumpy()
    vocab = len(components.tokenizer)
    components.add_new_tokens(NewTokens.for_abstractions("TOK", 2), seed=0)
    tokenize = components.family.prompt_tokenizer(components)
    ids = list(tokenize(PROMPT))
    assert ids[ids.index(vocab):ids.index(vocab) + 3] == [vocab, vocab + 1, tokenize("cat")[1]]
    encoder = components.family.prompt_encoder(components)  # a compiled Cell keeps the graph it compiled
    np.testing.assert_array_equal(encoder(ms.Tensor(plain[None])).asnumpy(), before)
    # The rows start as random normal times the spread of the existing embeddings.
    table = components.text_encoder.get_input_embeddings().base.embedding_table.asnumpy()
    rows = new_rows_of(components.text_encoders)["clip_l"]
    assert rows.shape == (2, table.shape[1]) and 0.5 < rows.std() / table.std() < 2
    with pytest.raises(UserError, match="already has new tokens"):
        components.add_new_tokens(NewTokens.for_abstractions("TOK", 2))


def test_a_token_already_in_the_vocabulary_is_refused(tiny_model_dir):
    components = load_components(tiny_model_dir)
    with pytest.raises(UserError, match="token a</w> is already in the clip_l tokenizer's vocabulary"):
        add_new_tokens([components.tokenizer], [components.text_encoder], NewTokens.of_tokens(["a</w>"]))


def test_sdxl_pools_at_the_end_of_text_token_when_new_tokens_have_larger_ids(tiny_sdxl_model_dir):
    """CLIP configs with eos_token_id 2 (SD's and SDXL's) pool at the largest id: a new token
    (diffusers #10754). The prompt encoder pools at the first end-of-text token instead."""
    components = load_components(tiny_sdxl_model_dir)
    second = components.text_encoder_2
    second.text_model.eos_token_id = 2  # as the real SDXL configs say
    family = components.family
    components.add_new_tokens(NewTokens.for_abstractions("TOK", 2), seed=0)  # before anything compiles
    encoder = family.prompt_encoder(components)
    tokenize = family.prompt_tokenizer(components)
    plain = ms.Tensor(tokenize("a photo of a cat")[None])  # no new token: the largest id is end-of-text
    np.testing.assert_allclose(encoder(plain)[1].asnumpy(), second(plain[:, 1])[0].asnumpy(), rtol=1e-6, atol=1e-6)

    ids = tokenize(PROMPT)[None]
    _, pooled = encoder(ms.Tensor(ids))
    eos = list(ids[0, 1]).index(components.tokenizer_2.eos_token_id)
    last_hidden = second(ms.Tensor(ids[:, 1]))[1]
    want = second.text_projection(last_hidden[:, eos]).asnumpy()
    np.testing.assert_allclose(pooled.asnumpy(), want, rtol=1e-6, atol=1e-6)
    assert not np.allclose(second(ms.Tensor(ids[:, 1]))[0].asnumpy(), want, atol=1e-4)  # what argmax pools


def test_the_embeddings_file_refuses_what_does_not_fit(tmp_path):
    file = str(tmp_path / "run_emb.safetensors")
    save_embeddings(file, {"clip_l": np.ones((2, 4), np.float32)}, NewTokens.for_abstractions("TOK", 2))
    rows, tokens = read_embeddings(file, ["clip_l"])
    assert tokens.tokens == ["<s0>", "<s1>"] and tokens.rewrite("TOK") == "<s0><s1>"
    assert read_embeddings(file, ["clip_l"], "<a>, <b>")[1].tokens == ["<a>", "<b>"]
    with pytest.raises(UserError, match="no 'clip_g' tensor .* this model's text encoders take clip_l, clip_g"):
        read_embeddings(file, ["clip_l", "clip_g"])
    with pytest.raises(UserError, match=r"'clip_l' has shape \(2, 4\), expected 3 rows"):
        read_embeddings(file, ["clip_l"], "<a>,<b>,<c>")
    save_embeddings(file, {"clip_l": np.full((2, 4), np.nan, np.float32)}, NewTokens.for_abstractions("TOK", 2))
    with pytest.raises(UserError, match="'clip_l' holds 8 non-finite value"):
        read_embeddings(file, ["clip_l"])


def ti_config(model_dir, out, **overrides):
    values = dict(pretrained_model_name_or_path=model_dir, instance_data_dir=CAT2, instance_prompt=PROMPT,
                  train_text_encoder_ti=True, method="lora", output_dir=str(out), resolution=32, max_train_steps=6,
                  checkpointing_steps=2, learning_rate=1e-2, text_encoder_lr=2e-2,
                  adam_weight_decay_text_encoder=0.1, device_target="CPU", seed=3)
    values.update(overrides)
    return load_config(None, values)


def emb(folder, name="run"):
    return load_file(os.path.join(folder, f"{name}_emb.safetensors"))


def lora(folder):
    return load_file(os.path.join(folder, "pytorch_lora_weights.safetensors"))


@pytest.fixture(scope="module")
def ti_run(tiny_model_dir, tmp_path_factory):
    """6 LoRA steps with pivotal tuning (pivot after step 3), then steps 3-6 again from checkpoint-2."""
    out = tmp_path_factory.mktemp("ti") / "run"
    config = ti_config(tiny_model_dir, out)
    trainer = Trainer(config)
    result = trainer.train()
    first = {step: (emb(out / f"checkpoint-{step}"), lora(out / f"checkpoint-{step}")) for step in (2, 4, 6)}
    final = (emb(out), lora(out))
    trainer.config = dataclasses.replace(config, resume_from_checkpoint=str(out / "checkpoint-2"))
    resumed = trainer.train()
    return trainer, result, first, final, resumed, out


@pytest.mark.slow
def test_only_the_new_rows_train_and_they_stop_at_the_pivot(ti_run, tiny_model_dir):
    trainer, result, first, final, _, out = ti_run
    assert result.global_step == 6 and trainer.pivot_step == 3
    fresh = load_components(tiny_model_dir)
    # Every weight of the text encoder but the new rows is the base model's, bit for bit.
    trained = dict(trainer.components.text_encoder.parameters_and_names())
    for name, param in fresh.text_encoder.parameters_and_names():
        key = name.replace("embeddings.token_embedding.", "embeddings.token_embedding.base.")
        np.testing.assert_array_equal(trained[key].asnumpy(), param.asnumpy(), err_msg=name)
    start = NewTokens.for_abstractions("TOK", 2)
    fresh.add_new_tokens(start, seed=3)
    initial = new_rows_of(fresh.text_encoders)["clip_l"]
    (emb2, _), (emb4, lora4), (emb6, lora6) = first[2], first[4], first[6]
    assert not np.array_equal(emb2["clip_l"], initial)  # trained before the pivot
    assert not np.array_equal(emb4["clip_l"], emb2["clip_l"])  # step 3 still trains them
    np.testing.assert_array_equal(emb6["clip_l"], emb4["clip_l"])  # after the pivot: not at all
    assert any(not np.array_equal(lora6[k], lora4[k]) for k in lora4)  # while the LoRA goes on
    assert set(final[0]) == {"clip_l"}
    np.testing.assert_array_equal(final[0]["clip_l"], emb6["clip_l"])


@pytest.mark.slow
def test_a_resumed_run_ends_with_the_same_lora_and_embeddings(ti_run):
    _, _, _, final, resumed, out = ti_run
    assert resumed.global_step == 6
    np.testing.assert_array_equal(emb(out)["clip_l"], final[0]["clip_l"])
    for key, value in final[1].items():
        np.testing.assert_array_equal(lora(out)[key], value, err_msg=key)


@pytest.mark.slow
def test_saved_embeddings_load_back_into_a_fresh_pipeline_and_sample(ti_run, tiny_model_dir, tmp_path, capsys):
    trainer, _, _, _, _, out = ti_run
    rows, tokens = read_embeddings(str(out / "run_emb.safetensors"), ["clip_l"])
    fresh = load_components(tiny_model_dir)
    fresh.add_new_tokens(tokens, rows)
    ids = ms.Tensor(fresh.family.prompt_tokenizer(fresh)(PROMPT)[None])
    trained_ids = ms.Tensor(trainer.family.prompt_tokenizer(trainer.components)(PROMPT)[None])
    np.testing.assert_array_equal(ids.asnumpy(), trained_ids.asnumpy())
    np.testing.assert_array_equal(fresh.family.prompt_encoder(fresh)(ids).asnumpy(),
                                  trainer.family.prompt_encoder(trainer.components)(trained_ids).asnumpy())
    card = (out / "README.md").read_text()
    assert "`TOK` -> `<s0><s1>`" in card and "a photo of <s0><s1> cat" in card
    assert 'pipe.load_textual_inversion(state_dict["clip_l"], token=[\'<s0>\', \'<s1>\']' in card

    args = ["sample", "--pretrained_model_name_or_path", tiny_model_dir, "--lora", str(out), "--embeddings",
            str(out / "run_emb.safetensors"), "--prompt", "TOK on a beach", "--num_inference_steps", "2",
            "--height", "32", "--width", "32", "--device_target", "CPU", "--output_dir", str(tmp_path / "s")]
    assert main(args) == 0
    assert main(args[:-1] + [str(tmp_path / "s2"), "--tokens", "<s0>,<s1>,<s2>"]) == 2
    assert "expected 3 rows (one per token: <s0>, <s1>, <s2>)" in capsys.readouterr().err


def test_pivotal_tuning_settings_are_checked_before_loading(tiny_model_dir, tmp_path, capsys):
    base = ["train", "--pretrained_model_name_or_path", tiny_model_dir, "--output_dir", str(tmp_path / "o"),
            "--device_target", "CPU", "--instance_data_dir", CAT2]
    cases = [
        (["--instance_prompt", "a photo of a cat", "--train_text_encoder_ti", "true"],
         "train_text_encoder_ti: instance_prompt never use token_abstraction 'TOK' (e.g. instance_prompt 'a photo "
         "of TOK dog')"),
        (["--instance_prompt", PROMPT, "--text_encoder_lr", "1e-4"],
         "text_encoder_lr applies to the text side: set train_text_encoder_ti (pivotal tuning) or train_text_encoder "
         "(text-encoder LoRA) too"),
        (["--instance_prompt", PROMPT, "--train_text_encoder_ti", "true", "--train_text_encoder", "true"],
         "train_text_encoder_ti and train_text_encoder: choose one (pivotal tuning trains new token embeddings, "
         "train_text_encoder LoRA on the encoders)"),
        (["--instance_prompt", PROMPT, "--train_text_encoder", "true", "--method", "scedit"],
         "train_text_encoder trains LoRA on the text encoders beside the UNet's: method lora, not scedit"),
        (["--instance_prompt", PROMPT, "--train_text_encoder_ti", "true", "--optimizer", "prodigy",
          "--learning_rate", "1.0", "--text_encoder_lr", "0.5"],
         "text_encoder_lr 0.5 with --optimizer prodigy: Prodigy estimates one step size for all weights on one "
         "learning rate; give it learning_rate's value (1.0) or leave it unset"),
        (["--instance_prompt", PROMPT, "--train_text_encoder_ti", "true", "--train_text_encoder_ti_frac", "1.5"],
         "train_text_encoder_ti_frac must be <= 1, got 1.5"),
        (["--instance_prompt", PROMPT, "--train_text_encoder_ti", "true", "--token_abstraction", "a b"],
         "token_abstraction: 'a b' must be words without spaces, comma-separated"),
    ]
    for flags, message in cases:
        assert main(base + flags) == 2, flags
        assert capsys.readouterr().err.strip().splitlines()[-1] == f"error: {message}"


@pytest.mark.slow
def test_sdxl_pivotal_tuning_with_prodigy_trains_both_encoders_rows(tiny_sdxl_model_dir, tmp_path):
    out = tmp_path / "xl"
    config = ti_config(tiny_sdxl_model_dir, out, max_train_steps=2, checkpointing_steps=2, optimizer="prodigy",
                       learning_rate=1.0, text_encoder_lr=None, adam_weight_decay_text_encoder=None,
                       prodigy_safeguard_warmup=True, prodigy_use_bias_correction=True, adam_beta2=0.99,
                       snr_gamma=5.0)
    trainer = Trainer(config)
    fresh = load_components(tiny_sdxl_model_dir)
    fresh.add_new_tokens(NewTokens.for_abstractions("TOK", 2), seed=3)
    initial = new_rows_of(fresh.text_encoders)
    result = trainer.train()
    assert result.global_step == 2 and np.isfinite(result.losses).all()
    saved = emb(out, "xl")
    widths = {"clip_l": fresh.text_encoder.config.hidden_size, "clip_g": fresh.text_encoder_2.config.hidden_size}
    assert {k: v.shape for k, v in saved.items()} == {k: (2, w) for k, w in widths.items()}
    for key in saved:
        assert not np.array_equal(saved[key], initial[key]), key


@pytest.mark.slow
def test_the_pivot_holds_in_a_step_loaded_from_the_compile_cache(tiny_model_dir, tmp_path):
    """The pivot is a Parameter the loop sets, not a constant of the graph: a second run loads the step from
    the compile cache and trains the same way, the embeddings only before the pivot. Each run is a process of
    its own, as a user's: MindSpore's compile cache serves a process's first graph only."""
    def run(name):
        out = tmp_path / name
        args = [os.path.join(os.path.dirname(sys.executable), "mindscedit"), "train", "--method", "lora", "--pretrained_model_name_or_path", tiny_model_dir, "--instance_data_dir",
                CAT2, "--instance_prompt", PROMPT, "--train_text_encoder_ti", "true", "--output_dir", str(out),
                "--resolution", "32", "--max_train_steps", "4", "--checkpointing_steps", "1", "--learning_rate", "1e-2",
                "--device_target", "CPU", "--compile_cache_dir", str(tmp_path / "cache")]
        proc = subprocess.run(args, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert ("saved to the compile cache" if name == "a" else "from the compile cache") in proc.stdout
        return [emb(out / f"checkpoint-{step}", name)["clip_l"] for step in (1, 2, 3, 4)]

    first, cached = run("a"), run("b")
    assert len(os.listdir(tmp_path / "cache")) == 1  # one step, compiled once
    assert not np.array_equal(cached[0], cached[1])  # step 2 trains them (the pivot is after 2 of 4 steps)
    np.testing.assert_array_equal(cached[1], cached[3])  # steps 3 and 4 do not
    for a, b in zip(first, cached):
        np.testing.assert_array_equal(a, b)
