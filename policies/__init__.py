"""Allocation policies: the controllers, their training and evaluation, and serving them.

- ``allocator``: the interface every allocation controller implements (``Allocator``: an
  ``env.allocation.AllocationRequest`` in, one ``Allocation`` per problem out) and the one loop
  that scores a controller through the environment (``run_episodes``).
- ``baselines``: plain, the static tables (the published method and its budgeted search),
  max-fit and the oracle bound; the evaluation deadline grid.
- ``saved_policy``: the trained policy on disk, its one compatibility check, loading (what the
  serving path imports; no training code).
- ``ppo_training``: PPO's environments, callbacks, warm start and model selection (``train.py``).
- ``evaluate``: the policy against every baseline on MATH-500; table, plot, report.
- ``controller``, ``server``, ``openai_api``, ``deadline_queue``: the deployed controller on the
  live engine and its OpenAI-compatible service.
"""
