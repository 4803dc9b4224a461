"""Arrow schemas of the files that stages hand to each other (documented in README.md).

Token ids are int32 (vocabularies are < 2^31), log-probs float32.
"""

import pyarrow as pa

MESSAGE = pa.struct([("role", pa.string()), ("content", pa.string())])

# data/train.arrow, data/eval.arrow: prompts in dapo-math-17k's shape.
PROMPTS = pa.schema(
    [
        pa.field("index", pa.int64(), nullable=False),  # row number in the source
        pa.field("prompt", pa.list_(MESSAGE), nullable=False),  # chat messages
        pa.field("label", pa.string(), nullable=False),  # ground-truth answer
    ]
)

# data/eval.arrow: every eval benchmark's prompts, in config order, with the fields its
# results are broken down by (MATH-500: {"subject": "Algebra", "level": "3"}).
EVAL_PROMPTS = pa.schema(
    [
        *PROMPTS,
        pa.field("benchmark", pa.string(), nullable=False),  # eval.benchmarks[].name
        pa.field("tags", pa.map_(pa.string(), pa.string()), nullable=False),
    ]
)

# train/round_NNNN/rollouts.arrow: one row per student sample.
ROLLOUTS = pa.schema(
    [
        pa.field("round", pa.int32(), nullable=False),
        pa.field("prompt_index", pa.int64(), nullable=False),  # PROMPTS.index
        pa.field("sample_index", pa.int32(), nullable=False),  # 0..n_samples_per_prompt-1
        pa.field("prompt_ids", pa.list_(pa.int32()), nullable=False),  # chat-templated prompt
        pa.field("response_ids", pa.list_(pa.int32()), nullable=False),  # generated tokens
        pa.field("response_text", pa.string(), nullable=False),
        pa.field(
            "rollout_logprobs", pa.list_(pa.float32()), nullable=False
        ),  # engine's, per response token
        pa.field("finish_reason", pa.string(), nullable=False),  # stop | length | abort
        pa.field("label", pa.string(), nullable=False),
        pa.field("reward", pa.float32(), nullable=False),  # after any post-process hook
        pa.field("correct", pa.bool_(), nullable=False),  # math verifier, whatever the reward
        # The policy version that generated it: the engine's weight_version, which the round
        # loop sets to the number of policy updates in its weights ("0" = the initial student).
        pa.field("weight_version", pa.string(), nullable=False),
    ]
)

# train/round_NNNN/teacher_logprobs.arrow: the teacher's log-prob of every response token.
TEACHER_LOGPROBS = pa.schema(
    [
        pa.field("prompt_index", pa.int64(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field(
            "teacher_logprobs", pa.list_(pa.float32()), nullable=False
        ),  # len == len(response_ids)
        # algorithm.opd_topk > 0 only (else null): the teacher's k most likely tokens at each
        # response position and their log-probs, [len(response_ids)][k].
        pa.field("teacher_topk_ids", pa.list_(pa.list_(pa.int32())), nullable=True),
        pa.field("teacher_topk_logprobs", pa.list_(pa.list_(pa.float32())), nullable=True),
    ]
)

# <eval stage>/samples.arrow: one row per generated evaluation sample.
EVAL_SAMPLES = pa.schema(
    [
        pa.field("prompt_index", pa.int64(), nullable=False),
        pa.field("sample_index", pa.int32(), nullable=False),
        pa.field("greedy", pa.bool_(), nullable=False),  # the pass@1 sample (temperature 0)
        pa.field("response_text", pa.string(), nullable=False),
        pa.field("predicted", pa.string(), nullable=True),  # extracted answer, null if none
        pa.field("label", pa.string(), nullable=False),
        pa.field("correct", pa.bool_(), nullable=False),
        pa.field("benchmark", pa.string(), nullable=False),  # eval.benchmarks[].name
        pa.field("response_tokens", pa.int32(), nullable=False),
        pa.field("finish_reason", pa.string(), nullable=True),  # stop | length | abort
    ]
)
