"""Stage 2, rules: the ConSequence rule format (``ruleset.py``), mining and violation checks (``mining.py``).
No torch here; compiling rules into masks is the model's job (``model/consequence.py``)."""
