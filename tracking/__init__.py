"""MLflow and DVC bookkeeping for the pipeline: runs logged through explicit run ids, the Model
Registry, and the content digests and git commit that tie a run to its bytes and code."""
