"""Recorded engine profiles: the on-disk format (``store``), recording on the live engine
(``record``), timing calibration and the latency-model fit (``calibrate``) and its validation
on held-out live calls (``validate``).  Offline tooling: training and serving only read
profiles through ``store``."""
