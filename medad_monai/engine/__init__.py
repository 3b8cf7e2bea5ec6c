"""MONAI/Ignite glue of the bundles: the evaluator that produces the output contract (``evaluator``), handlers
(``handlers``), checkpoints and safe weight files (``checkpoints``), DDP helpers (``distributed``) and the helpers
bundle configs call (``bundle_utils``)."""
