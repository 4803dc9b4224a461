"""A byte-level BPE tokenizer with a Qwen-style chat template, built deterministically.

Byte-level means any UTF-8 text encodes (so the toy models also run on real dataset rows);
the BPE merges are learned from the task's own fixed text (the DAPO instruction, the answer
format), so a toy prompt is ~60 tokens instead of ~300 bytes. Digits stay single tokens
(like Qwen's pre-tokenizer), which is what makes arithmetic learnable by a tiny model.

    tokenizer = build_tokenizer(vocab_size=384)
    tokenizer.save_pretrained(model_dir)   # tokenizer.json + tokenizer_config.json
"""

from __future__ import annotations

from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

PAD_TOKEN = "<|endoftext|>"
IM_START = "<|im_start|>"
IM_END = "<|im_end|>"  # the end of an assistant turn is the end of generation (as in Qwen3)
SPECIAL_TOKENS = [PAD_TOKEN, IM_START, IM_END]

# Qwen's template without tools/thinking: the only part of it the pipeline relies on.
CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)

DAPO_INSTRUCTION = (
    "Solve the following math problem step by step. The last line of your response should be "
    "of the form Answer: $Answer (without quotes) where $Answer is the answer to the problem."
    '\n\n{problem}\n\nRemember to put your answer on its own line after "Answer:"'
)


def _corpus() -> list[str]:
    """Text the merges are learned from: fixed phrases repeated, plus the answer format."""
    phrases = [
        DAPO_INSTRUCTION.format(problem="What is 12 + 34?"),
        "<|im_start|>user\n",
        "<|im_end|>\n",
        "<|im_start|>assistant\n",
        "Answer: \\boxed{42}",
        "What is 7 - 3?",
    ]
    return phrases * 50


def build_tokenizer(vocab_size: int = 384) -> PreTrainedTokenizerFast:
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence(
        [
            # Each digit its own piece, before GPT-2's byte-level word split.
            pre_tokenizers.Split(Regex(r"\d"), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(_corpus(), trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        eos_token=IM_END,
        pad_token=PAD_TOKEN,
        chat_template=CHAT_TEMPLATE,
        model_max_length=4096,
    )
