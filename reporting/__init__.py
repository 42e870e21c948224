"""Reports over the engine's results for people: tables printed by the CLI and plots logged to
MLflow and shown by `dvc plots`."""
