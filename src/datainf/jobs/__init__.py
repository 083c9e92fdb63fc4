"""What a user runs (detect-mislabeled, explain-generation, explain-image), with the
run-folder and pairwise-scoring code they share."""
