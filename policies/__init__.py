"""Controllers of a race, their tuning, training and evaluation, and serving them.

- ``race_controllers``: the ``RaceController`` interface, the tuned rules (static table, time
  budget, ESC, Adaptive-Consistency, margin), the per-deadline table, the batch-size k rule;
- ``learned_controller``: a trained SB3 model as a controller (light enough for serving);
- ``race_eval``: the one loop that runs any controller on a replayed race, tuning the rules
  per deadline, the deadline grid;
- ``saved_policy``: the trained policy on disk, its one compatibility check, loading;
- ``ppo_training``: PPO's environments, logging, warm start and model selection (``train.py``);
- ``evaluate``, ``report_plots``, ``frontier``: every method on MATH-500 on the same draws,
  the targets, tables and plots; ``confidence`` / ``confidence_fit``: the calibrated
  probability that an answer is right (the load study, which builds on ``train.py``, is
  ``scripts/load_study.py``);
- ``controller``, ``server``, ``openai_api``, ``admission``, ``serving_latency``: the deployed
  controller on the live engine and its OpenAI-compatible service (many calls at once,
  admitted by predicted latency); ``bench_server``, ``bench_decisions``: their benchmarks.
"""
