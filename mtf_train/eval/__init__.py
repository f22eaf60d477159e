"""Zero-shot evaluation on held-out tasks (`mtf-train eval`): lm-evaluation-harness as a library, with the
project's own task definitions for XCOPA, XNLI, XStoryCloze and XWinograd (`tasks.py`)."""
