"""Names inside a training run's folder (runs/<name>/), shared by training, sweeps and registration
without importing the training stack (torch, Ray Train)."""

FINAL_CHECKPOINT = "final"  # the checkpoint folder the last report writes: the trained weights
LOG_HISTORY_FILE = "log_history.json"  # HF Trainer's log history, inside the final checkpoint
