"""Token classification (NER, POS, chunking), one module per job: `conll` (reading), `alignment` (word tags onto
sub-tokens), `tags` (schemes, entities, metrics), `decoding` (predict's entities), `report` (validate's report) and
`task` (TASK, what the loop and the verbs ask). Nothing is imported here: `finetune.problems` reads `tags` alone."""
