"""The model card a DreamBooth run writes next to its weights (output_dir/README.md): what was
trained on what, the trigger words, and how to load the weights in diffusers and in mindscedit."""
import os

CARD_NAME = "README.md"


def model_card(config, method, family, steps: int, learning_rate: float, new_tokens=None) -> str:
    out = os.path.abspath(config.output_dir)
    base = os.path.abspath(config.pretrained_model_name_or_path)
    flags = method.sample_flags.replace("OUT", out)
    prompt = config.instance_prompt
    embeddings_flag, embeddings_python = "", ""
    if new_tokens is not None:  # prompts write the new tokens; mindscedit also takes the abstraction
        from ..tuners.textual_inversion import EMBEDDING_KEYS, embeddings_file_name

        prompt = new_tokens.rewrite(prompt)
        file = os.path.join(out, embeddings_file_name(out))
        embeddings_flag = f" --embeddings {file}"
        embeddings_python = "\n".join(
            ["from safetensors.torch import load_file", f'state_dict = load_file("{file}")']
            + [f'pipe.load_textual_inversion(state_dict["{key}"], token={new_tokens.tokens}, '
               f'text_encoder=pipe.{encoder}, tokenizer=pipe.{tokenizer})'
               for key, encoder, tokenizer in zip(EMBEDDING_KEYS, family.text_encoders, family.tokenizers)])
    lines = [
        f"# {os.path.basename(out)}",
        "",
        f"DreamBooth ({config.method}) fine-tune of `{base}` ({family.__name__}) with mindscedit.",
        "",
        f"- instance prompt (the trigger): `{config.instance_prompt}`",
        f"- instance images: `{os.path.abspath(config.instance_data_dir)}` (captioned with the instance prompt, "
        "or with their own captions where the folder has metadata.jsonl, parquet or a CSV)",
    ]
    if new_tokens is not None:
        pairs = ", ".join(f"`{word}` -> `{tokens}`" for word, tokens in new_tokens.replacements.items())
        lines.append(f"- pivotal tuning: {pairs} (new tokens, their embeddings trained for "
                     f"{int(config.train_text_encoder_ti_frac * steps)} steps): write the tokens in prompts, "
                     f"e.g. `{prompt}`")
    if config.with_prior_preservation:
        lines.append(f"- prior preservation: `{config.class_prompt}`, {config.num_class_images} class images, "
                     f"weight {config.prior_loss_weight:g}")
    lines += [
        f"- steps: {steps}, batch {config.train_batch_size}, learning rate {learning_rate:g} "
        f"({config.optimizer}), resolution {config.resolution}, seed {config.seed}",
        "",
        "## Use",
        "",
        "```bash",
        f'mindscedit sample --pretrained_model_name_or_path {base} {flags}{embeddings_flag} \\',
        f'    --prompt "{prompt}" --output_dir samples/',
        "```",
        "",
        "```python",
        f"from diffusers import {family.diffusers_pipeline}",
        f'pipe = {family.diffusers_pipeline}.from_pretrained("{base}")',
        method.pytorch_usage.replace("OUT", out),
        *([embeddings_python] if embeddings_python else []),
        f'image = pipe("{prompt}").images[0]',
        "```",
        "",
    ]
    return "\n".join(lines)


def write_model_card(folder: str, config, method, family, steps: int, learning_rate: float, new_tokens=None) -> None:
    with open(os.path.join(folder, CARD_NAME), "w") as f:
        f.write(model_card(config, method, family, steps, learning_rate, new_tokens))
