"""Reinforcement learning from feedback: `lmsmith rl`.

    prompts.py   the prompts file: chat prompts with (optional) reference answers
    rewards.py   reward functions: exact match, a reward model, a user's `module:function`
    rollout.py   Rollouts: the loop's batch source (sample G responses per prompt with the engine,
                 score them, group-normalised advantages); resumable exactly
    evaluate.py  held-out accuracy (greedy) and pass@k (sampled), for the loop's `eval_fn`

The objective (clipped importance-weighted policy gradient with a KL penalty) is
`train.grpo`; the reward model and its Bradley-Terry objective are `reward_model` and
`train.reward`. Everything runs on the one training loop.
"""
