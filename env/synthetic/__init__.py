"""The calibrated synthetic profile: answer distributions (``answers``) and branch lengths and
acceptance (``branches``) fitted to public per-sample figures, an H100 roofline for step times
(``roofline``), the generator (``generate``: ``python -m env.synthetic.generate``) and its
calibration report (``report``).  Offline tooling, never imported by training or serving."""
