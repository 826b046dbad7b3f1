"""The timing stage: the language model (:mod:`.llm`), each pipeline's timed stages
(:mod:`.pipeline`), the round robin (:mod:`.timer`), FLOPs (:mod:`.flops`), memory (:mod:`.memory`)
and the whole measurement (:mod:`.measure`)."""
