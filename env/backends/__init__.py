"""What runs a test-time-scaling call: a recorded profile replayed under its latency model
(``replay``: a whole call at once; ``replay_race``: event by event, for controllers that decide
while it runs), and the live vLLM engine (``live_race``: the same race on real steps;
``sample_vote``: the vote over its finished branches).  ``protocol`` holds what they share: the
problem description and the outcome of a call."""
