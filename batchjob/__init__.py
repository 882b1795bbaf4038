"""batchjob: batch inference for Hugging Face encoders compiled to fixed shapes."""
