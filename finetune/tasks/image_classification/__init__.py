"""Image classification, one module per job: `files` (one image: decoding, why it is unreadable), `reading` (the zoo,
folders, tables, hub sets), `transforms` (timm's, augmentation, Mixup), `loaders` (datasets, the decoded-image cache)
and `task` (TASK). Nothing is imported here."""
