"""CPU backends: each produces one normalized stream of exits (``exits.py``)."""
