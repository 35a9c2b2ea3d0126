"""Training the policy: gold trajectories and SFT warm start, GRPO + LoRA on the loop's own rollouts."""
