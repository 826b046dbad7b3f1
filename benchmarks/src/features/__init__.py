"""The features stage: the on-disk cache of encoder grids (:mod:`.cache`), the content fingerprints
of image files it is keyed by (:mod:`.fingerprint`) and planted-signal features (:mod:`.planted`)."""
