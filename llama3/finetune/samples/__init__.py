"""Sample data shipped with the package (written by make_pirate.py): a name here can stand for a data file."""

from pathlib import Path

_HERE = Path(__file__).parent
SAMPLES = {"pirate": _HERE / "pirate.jsonl", "pirate_preferences": _HERE / "pirate_preferences.jsonl"}
