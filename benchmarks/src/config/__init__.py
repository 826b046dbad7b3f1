"""The configuration stage: the schema Hydra composes (:mod:`.schema`, a leaf), the plan that turns a
composed config into the objects a run needs (:mod:`.plan`, the one place that knows config keys) and
the checks that run before any encoder does (:mod:`.checks`)."""
