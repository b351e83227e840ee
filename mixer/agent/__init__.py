"""The Data Mixing Agent (Yang et al. 2025, arXiv:2507.15640): learn domain re-weighting from recorded runs.

- trajectory.py: the randomised weight trajectories, the recorded runs and the RL transitions built from them (pure);
- collect.py: short proxy runs through a real `mixer serve`, fanned out as Ray tasks, one file per trajectory;
- train.py: conservative Q-learning on the recorded transitions (torch, CPU); saves safetensors and a JSON card;
- policy.py: load a trained agent and turn it into the `agent` strategy of a job spec (mixer/strategies/agent.py).

Nothing is imported here, so that the pure strategy can use trajectory.py without pulling in Ray or torch.
"""
