"""Data: shipped corpora and users' files, chat JSON lines, image folders, the paper's
synthetic tasks."""
