"""The results stage: typed records (:mod:`.records`), statistics (:mod:`.stats`), verdicts
(:mod:`.verdicts`), rendering (:mod:`.render`), a run's report (:mod:`.report`), sweep folders
(:mod:`.sweep`) and their aggregate (:mod:`.aggregate`)."""
