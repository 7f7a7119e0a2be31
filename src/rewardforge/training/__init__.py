"""Training machinery the recipe in :mod:`rewardforge.train` calls: atomic resumable checkpoints
(``checkpoint``), the distributed strategy and its state I/O (``distributed``), how a step computes
(``precision``), memory estimates and the free-space check (``memory``), validation during training
(``validation``) and the named fault points the reliability tests use (``faults``)."""
