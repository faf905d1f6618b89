"""The `qwenvl` command (`main.py`), its interactive >>> session and quick bench. The top room: it may
import every other one, and nothing imports it."""
