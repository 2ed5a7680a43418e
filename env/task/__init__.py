"""The MATH task: problems (loaded with ``datasets``), the prompt format, answer grading and the
voting rules.  Everything that judges an answer or combines answers imports it from here, so
"correct" and "the vote" mean one thing across profiling, replay, evaluation and serving."""
