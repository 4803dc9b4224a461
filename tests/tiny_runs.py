"""Overrides for tests of the pipeline's plumbing (not of model quality): tiny random toy
models, with no teacher or student training, and the smallest batches that run every stage."""

TINY_TOY = [
    "toy.num_train=64",
    "toy.num_eval=16",
    "toy.teacher.train_steps=0",
    "toy.student.train_steps=0",
    "toy.teacher_min_pass_at_1=0",
    "toy.student_pass_at_1_window=[0,1]",
]

SMALL_BATCHES = [
    "rollout.rollout_batch_size=4",
    "rollout.n_samples_per_prompt=2",
    "train.global_batch_size=8",
    "train.micro_batch_size=8",
    "train.lr_warmup_iters=0",  # the toy's 10 warmup steps need a run longer than 10 rounds
]
