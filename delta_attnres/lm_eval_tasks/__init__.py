"""Task definitions for the lm-evaluation-harness. Pass `TASKS_DIR` to `lm_eval --include_path`."""

from pathlib import Path

TASKS_DIR = Path(__file__).parent
