"""Online drafter learner: reward-weighted KD of the EAGLE-3 drafter between RL steps, hot-swapped into vLLM."""
