"""The methods side by side: tables, plots and statistics over seeds, read back from MLflow runs
and ablation files."""
