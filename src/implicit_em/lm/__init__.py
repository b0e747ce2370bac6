"""The language-model wing: harvesting a transformer's activations into shards (:mod:`.harvest`, :mod:`.shards`),
the DataModule that streams them (:mod:`.activations`), splicing a reconstruction back into a causal LM for CE loss
recovered (:mod:`.causal_lm`), and the component dashboard (:mod:`.dashboard`)."""
