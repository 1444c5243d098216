"""What every phase's trainers share: the training loop (loop.py) and its checkpoints
(checkpoint.py) and loss guard (guards.py), and one definition each of the helpers the
losses are made of: token log-probs and position ids (logprobs.py), KL estimators named for
their direction (kl.py), REINFORCE losses, group baselines and diversity
(policy_gradient.py), and which examples a step reads (batching.py)."""
