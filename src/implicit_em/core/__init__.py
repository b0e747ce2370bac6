"""The maths, pure functions on tensors: :mod:`.objective` (the paper's implicit-EM objective and the SAE
objectives), :mod:`.truncated` (the sparse model's truncated objective), :mod:`.sae` (the SAE baselines'
training recipe: unit-norm decoder, the Gao learning rate, AuxK, the BatchTopK threshold) and :mod:`.distributed` (gathering a
batch across ranks with gradients, for the global-batch objective)."""
