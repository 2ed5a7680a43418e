"""What runs a test-time-scaling call: the backend protocol, the replay of a recorded profile
(training, evaluation) and the live vLLM engine (validation).  The environment and the
controllers see only the protocol in ``env.backends.protocol``."""
