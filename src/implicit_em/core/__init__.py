"""The maths, pure functions on tensors: :mod:`.objective` (the paper's implicit-EM objective and the SAE
objectives), :mod:`.truncated` (the sparse model's truncated objective) and :mod:`.distributed` (gathering a
batch across ranks with gradients, for the global-batch objective)."""
