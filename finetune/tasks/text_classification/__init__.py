"""Text classification (and sentence pairs), one module per job: `reading` (the text zoo, files, hub sets, pairs),
`tokens` (the cached tokenised dataset and its batches) and `task` (TASK). Nothing is imported here."""
